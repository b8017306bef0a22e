"""Load question/answer examples from files and ``datasets`` sources.

Supported row formats (detected from the rows' keys, or forced with ``fmt``):

* ``"gainrl"`` -- the released GAIN-RL JSON format: ``problem`` (or ``question``) and ``answer``.
  A raw GSM8K answer (worked solution ending in ``#### 72``) is reduced to its final number, with the
  thousands separators removed (``#### 1,000`` -> ``1000``); without ``answer``, the last ``\\boxed{...}`` of a
  ``solution`` column (raw MATH) is used.
* ``"verl"`` -- the verl parquet format: ``prompt`` (chat messages), ``reward_model.ground_truth``; the question
  is ``extra_info.question`` when present, else the last user message. verl's GSM8K ground truth is already the
  final number and MATH's may be LaTeX (``\\dfrac{3}{4}``): ground truths are kept verbatim (only stripped), the
  comparison is left to :mod:`gainrl.rewards`. verl's instruction suffix ("Let's think step by step and output
  the final answer ...") is removed from the question by default, so that Q holds the question's own text.

Sources: ``.json`` (a list of rows, a ``{column: [values]}`` table, or a ``{"data": [...]}`` wrapper),
``.jsonl``, ``.parquet``, a directory written by ``datasets.Dataset.save_to_disk``, a local directory of data
files (``datasets.load_dataset`` on the folder), or a dataset name already in the local ``datasets`` cache
(loaded with the Hub in offline mode: nothing is downloaded).

Rows without a question (or, with ``require_answers=True``, without an answer) are skipped and listed in the
:class:`LoadReport`, or raise ``ValueError`` naming the row index with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Format = Literal["auto", "gainrl", "verl"]

#: verl's preprocessing appends one of these instructions to the user message.
VERL_INSTRUCTION_RE = re.compile(
    r"\s*Let's think step by step and output the final answer (?:within \\boxed\{\}|after \"####\")\.?\s*$"
)

_QUESTION_KEYS = ("problem", "question")
_CONSUMED_KEYS = {"problem", "question", "answer", "prompt", "reward_model"}


@dataclass(frozen=True)
class Example:
    """One problem.

    Attributes:
        index: position of the row in its source (0-based; skipped rows leave gaps).
        question: the question's own text (no chat template, no instruction suffix).
        answer: the reference final answer (a number or LaTeX), or ``None`` when the source has none.
        meta: every other column of the row (e.g. ``level``, ``type``, ``data_source``, ``extra_info``).
    """

    index: int
    question: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    """A row left out of the load, with the reason."""

    index: int
    reason: str


@dataclass
class LoadReport:
    """What a load read, kept and skipped."""

    source: str
    fmt: str
    n_rows: int = 0
    n_loaded: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    split: str | None = None  # the split read from a multi-split dataset

    @property
    def n_skipped(self) -> int:
        """Number of rows left out."""
        return len(self.skipped)

    def reasons(self) -> dict[str, int]:
        """Count of skipped rows per reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        """One line for logs."""
        where = self.source if self.split is None else f"{self.source} (split {self.split!r})"
        text = f"{where}: {self.n_loaded}/{self.n_rows} rows loaded ({self.fmt} format)"
        if self.skipped:
            parts = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.reasons().items()))
            first = ", ".join(str(s.index) for s in self.skipped[:10])
            text += f"; skipped {self.n_skipped} ({parts}; rows {first}{', ...' if self.n_skipped > 10 else ''})"
        return text


class RowError(ValueError):
    """A malformed row (raised in strict mode); ``index`` is the row's position in the source."""

    def __init__(self, index: int, reason: str, source: str) -> None:
        super().__init__(f"row {index} of {source}: {reason}")
        self.index = index
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# Answer helpers
# --------------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; ``None`` if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None


def normalize_reference_answer(value: Any) -> str | None:
    """Reference answer as a string, or ``None`` when missing.

    A GSM8K worked solution (``... #### 1,000``) becomes its final number without separators (``1000``), as
    verl's preprocessing does; anything else is kept verbatim (stripped) -- verl's GSM8K ground truth already
    is the final number and MATH's may be LaTeX, which :mod:`gainrl.rewards` compares symbolically.
    Integral floats (``72.0`` from a numeric column) become ``"72"``.
    """
    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        return None
    if "####" in value:
        value = value.rsplit("####", 1)[1].strip().replace(",", "")
    value = value.strip()
    return value or None


# --------------------------------------------------------------------------------------------------------------
# Row parsing
# --------------------------------------------------------------------------------------------------------------


def detect_format(row: Mapping[str, Any]) -> Literal["gainrl", "verl"]:
    """``"verl"`` for a ``reward_model`` column, else ``"gainrl"`` for ``problem``/``question``, else ``"verl"`` for
    ``prompt``."""
    if "reward_model" in row:
        return "verl"
    if any(k in row for k in _QUESTION_KEYS):
        return "gainrl"
    if "prompt" in row:
        return "verl"
    raise ValueError(
        f"cannot tell the data format from the columns {sorted(row)}: expected `problem`/`answer` (GAIN-RL) "
        "or `prompt`/`reward_model` (verl)"
    )


def _auto_format(rows: Sequence[Any], strip_instruction: bool) -> Literal["gainrl", "verl"]:
    """The format of the first object row whose question parses in the format its columns suggest (malformed rows
    before it are skipped later, not taken as the file's format); without one, that of the first row whose columns
    tell; ``"gainrl"`` when there are no object rows. ValueError when no row's columns tell."""
    fallback: Literal["gainrl", "verl"] | None = None
    first_error: ValueError | None = None
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        try:
            fmt = detect_format(row)
        except ValueError as e:
            first_error = first_error or e
            continue
        if parse_row(row, fmt, strip_instruction=strip_instruction)[0] is not None:
            return fmt
        fallback = fallback or fmt
    if fallback is not None:
        return fallback
    if first_error is not None:
        raise first_error
    return "gainrl"


def _clean_question(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _verl_question(row: Mapping[str, Any], strip_instruction: bool) -> str | None:
    extra = row.get("extra_info")
    if isinstance(extra, Mapping):
        question = _clean_question(extra.get("question"))
        if question is not None:
            return question
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        text: Any = prompt
    else:
        try:
            users = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        except TypeError:
            return None
        text = users[-1] if users else None
    if isinstance(text, str) and strip_instruction:
        text = VERL_INSTRUCTION_RE.sub("", text)
    return _clean_question(text)


def parse_row(
    row: Any, fmt: Literal["gainrl", "verl"], *, strip_instruction: bool = True
) -> tuple[str | None, str | None, dict[str, Any]]:
    """Split one row into ``(question, answer, meta)``; ``question`` is ``None`` when the row has none."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row is a {type(row).__name__}, not an object")
    if fmt == "verl":
        question = _verl_question(row, strip_instruction)
        reward_model = row.get("reward_model")
        answer = normalize_reference_answer(
            reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None
        )
    else:
        question = next((q for q in (_clean_question(row.get(k)) for k in _QUESTION_KEYS) if q is not None), None)
        answer = normalize_reference_answer(row.get("answer"))
        if answer is None and isinstance(row.get("solution"), str):
            answer = last_boxed(row["solution"])
    meta = {k: v for k, v in row.items() if k not in _CONSUMED_KEYS}
    return question, answer, meta


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


class _BadRow:
    """Placeholder for a row that could not even be decoded (e.g. invalid JSON on a JSONL line)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _read_json(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, Mapping):
        for key in ("data", "examples", "rows", "train"):
            if isinstance(data.get(key), list):
                return data[key]
        columns = list(data.values())
        if columns and all(isinstance(c, list) for c in columns):
            n = len(columns[0])
            if any(len(c) != n for c in columns):
                raise ValueError(f"{path}: JSON columns have different lengths")
            return [dict(zip(data.keys(), values)) for values in zip(*columns)]
        raise ValueError(f"{path}: expected a JSON list of rows or a {{column: [values]}} table")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(_BadRow(f"invalid JSON (line {line_no}): {e.msg}"))
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force the Hugging Face Hub clients offline for the duration (only the local cache is read)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _pick_split(
    dataset: Any, split: str | None, source: str, default_splits: Sequence[str] = ("train",)
) -> tuple[Any, str | None]:
    """``(the split's dataset, its name)``; without ``split``: the first of ``default_splits`` the dataset has, else
    its only split (a single ``Dataset``: itself, name ``None``)."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset, split
    if split is None:
        split = next((s for s in default_splits if s in dataset), None)
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"{source} has splits {sorted(dataset)}, none of {list(default_splits)}: pass split=")
            split = next(iter(dataset))
    if split not in dataset:
        raise ValueError(f"{source} has no split {split!r} (splits: {sorted(dataset)})")
    return dataset[split], split


def _read_datasets(
    source: str, split: str | None, default_splits: Sequence[str] = ("train",)
) -> tuple[list[Any], str | None]:
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    else:
        with _hub_offline():
            try:
                loaded = datasets.load_dataset(source, split=split)
            except (FileNotFoundError, ConnectionError) as e:
                raise FileNotFoundError(
                    f"{source!r} is neither a data file, a local dataset folder, nor a dataset in the local "
                    f"`datasets` cache (nothing is downloaded): {e}"
                ) from e
    picked, name = _pick_split(loaded, split, source, default_splits)
    return picked.to_list(), name


def _read_rows(
    source: str | Path, split: str | None, default_splits: Sequence[str] = ("train",)
) -> tuple[list[Any], str | None]:
    """``(rows, the split read)`` (the split is ``None`` for a data file)."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".json":
            return _read_json(path), None
        if suffix == ".jsonl":
            return _read_jsonl(path), None
        if suffix == ".parquet":
            return _read_parquet(path), None
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")
    if suffix in (".json", ".jsonl", ".parquet"):
        raise FileNotFoundError(f"no such file: {path}")
    return _read_datasets(str(source), split, default_splits)


def read_rows(source: str | Path, split: str | None = None, default_splits: Sequence[str] = ("train",)) -> list[Any]:
    """Raw rows of ``source`` (see the module docstring for what a source may be; ``split`` /
    ``default_splits`` as :func:`load_examples`)."""
    return _read_rows(source, split, default_splits)[0]


def load_examples(
    source: str | Path,
    *,
    fmt: Format = "auto",
    split: str | None = None,
    strict: bool = False,
    require_answers: bool = False,
    strip_instruction: bool = True,
    limit: int | None = None,
    default_splits: Sequence[str] = ("train",),
) -> tuple[list[Example], LoadReport]:
    """Load the examples of ``source``.

    Args:
        source: a ``.json`` / ``.jsonl`` / ``.parquet`` file, a ``save_to_disk`` folder, a local folder of data
            files, or a dataset name present in the local ``datasets`` cache.
        fmt: ``"gainrl"``, ``"verl"``, or ``"auto"`` (from the first decodable row's columns).
        split: split to read from a multi-split dataset (default: the first of ``default_splits`` it has, else its
            only split; a ``ValueError`` when it has several others).
        strict: raise ``ValueError`` (a :class:`RowError` naming the row index) on the first malformed row
            instead of skipping it.
        require_answers: treat a row without a reference answer as malformed (for training).
        strip_instruction: remove verl's "Let's think step by step and output the final answer ..." suffix from
            a question taken from the prompt messages.
        limit: keep at most this many examples (rows after the limit are not read into examples).
        default_splits: splits to prefer, in order, when ``split`` is not given (evaluation: ``("test",
            "validation")``).

    Returns:
        ``(examples, report)``; ``Example.index`` is the row's position in the source.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows, split_read = _read_rows(source, split, default_splits)
    if fmt == "auto":
        resolved = _auto_format(rows, strip_instruction)
    elif fmt in ("gainrl", "verl"):
        resolved = fmt
    else:
        raise ValueError(f"fmt must be 'auto', 'gainrl' or 'verl', got {fmt!r}")

    report = LoadReport(source=str(source), fmt=resolved, split=split_read)
    examples: list[Example] = []
    for index, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        report.n_rows += 1
        reason = None
        if isinstance(row, _BadRow):
            reason = row.reason
        elif not isinstance(row, Mapping):
            reason = f"row is a {type(row).__name__}, not an object"
        else:
            question, answer, meta = parse_row(row, resolved, strip_instruction=strip_instruction)
            if question is None:
                reason = "missing question"
            elif require_answers and answer is None:
                reason = "missing answer"
        if reason is not None:
            if strict:
                raise RowError(index, reason, str(source))
            report.skipped.append(SkippedRow(index, reason))
            continue
        examples.append(Example(index=index, question=question, answer=answer, meta=meta))
    report.n_loaded = len(examples)
    if report.skipped:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())
    return examples, report
