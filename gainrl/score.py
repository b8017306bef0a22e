"""`gainrl score`: prefill every prompt once and score it by angle concentration (GAIN-RL step 1).

Pipeline: load the examples (:mod:`gainrl.data`), render each question through the model's chat template with its
P / Q segment offsets (:mod:`gainrl.prompts`), sort by length and cut into batches by a token budget, run each
batch through the model with an early-exit :class:`~gainrl_kernels.probe.AngleProbe` on the chosen layer (the
forward stops at that layer's MLP input: no later layers, no ``lm_head``), and keep
``score = C_intra(Q) + w · C_inter(Q, P)`` (DESIGN.md §1). The leading tokens every prompt shares (system prompt,
few-shot turns: most of P) are run once; each batch runs only the rest of its prompts against their K/V cache
(``--no-prefix-cache`` runs every prompt in full).

Outputs in ``--out DIR``:

* ``scores.jsonl`` -- one row per scored example, in dataset order: ``index`` (row of the source), ``score``,
  ``c_intra``, ``c_inter`` (``null`` when undefined, e.g. a one-token question), ``n_tokens``, ``seg_offsets``
  (``[0, q_start, q_end]``: P = ``[0, q_start)``, Q = ``[q_start, q_end)``), ``prompt_text`` (the rendered chat
  text; ``tokenizer(prompt_text, add_special_tokens=False)`` gives the scored tokens back);
* ``order.pt`` -- int64 tensor of dataset indices by descending score (NaN scores last, ties by index);
* ``summary.json`` and ``score_hist.png`` -- score distribution, correlation with prompt length and level;
* ``scores.parquet`` with ``--parquet``.

Resumable: every finished batch is appended (flushed, fsynced) to ``DIR/scores.partial.rank<r>.jsonl``; a rerun with
the same settings skips the finished batches (a half-written last line is dropped and its batch recomputed) and
the final files are written atomically (temporary file + ``os.replace``). Batches are fixed by the settings, so a
resumed run computes bit-identical numbers.

Data parallel: ``torchrun --nproc-per-node N -m gainrl score …`` joins a process group (NCCL on GPU, each rank on
``cuda:$LOCAL_RANK``; gloo on CPU). The ranks check that they see the same settings and data, deal the unfinished
batches round-robin, append them to their own ``scores.partial.rank<r>.jsonl``, and rank 0 merges every shard by
index into the same outputs as a one-process run (``DIR`` must be a folder all ranks see). A resumed launch, with
any number of ranks, scores only what is left. Without torchrun, ``--rank r --world-size W`` shards by files only
(independent jobs, e.g. a SLURM array): each scores batches ``r, r+W, …`` and the process that sees every batch
done writes the merged outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .distributed import ProcessGroup

logger = logging.getLogger(__name__)

PARTIAL_GLOB = "scores.partial.rank*.jsonl"
RUN_FILE = "score_run.json"
FORMAT_VERSION = 1


@dataclass
class ScoreOptions:
    """Settings of a `gainrl score` run (the CLI flags)."""

    data: str
    out: str
    model: str | None = None
    limit: int | None = None
    layer: int = -1
    inter_weight: float = 1.0
    prompt: str = "r1"
    system_prompt: str | None = None
    fmt: str = "auto"
    split: str | None = None
    strict: bool = False
    batch_tokens: int | None = None
    max_batch: int = 256
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    angle_fused: str = "off"
    fused_norms: bool = False
    progress: bool = True
    parquet: bool = False
    prefix_cache: bool = True
    overwrite: bool = False
    rank: int = 0
    world_size: int = 1


@dataclass
class Item:
    """One example to score."""

    index: int
    input_ids: list[int]
    seg_offsets: list[int]
    prompt_text: str
    level: float | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------------------------


def parse_level(meta: dict[str, Any]) -> float | None:
    """Difficulty level of an example when the data has one (``level`` column, or ``extra_info.level``):
    numbers as they are, strings like ``"Level 3"`` by their number."""
    value = meta.get("level")
    if value is None and isinstance(meta.get("extra_info"), dict):
        value = meta["extra_info"].get("level")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = re.search(r"-?\d+(?:\.\d+)?", value)
        return float(m.group()) if m else None
    return None


def prompt_config(opts: ScoreOptions):
    from .prompts import PROMPT_PRESETS

    if opts.prompt not in PROMPT_PRESETS:
        raise ValueError(f"--prompt: unknown preset {opts.prompt!r} (known: {sorted(PROMPT_PRESETS)})")
    cfg = PROMPT_PRESETS[opts.prompt]
    if opts.system_prompt is not None:
        from dataclasses import replace

        cfg = replace(cfg, system_prompt=opts.system_prompt or None)
    return cfg


def render_items(tokenizer: Any, examples: Iterable[Any], config: Any, strict: bool) -> tuple[list[Item], list[dict]]:
    """Render every example; ``(items, skipped)`` where ``skipped`` lists ``{"index", "reason"}`` of examples whose
    prompt could not be rendered (raises with ``strict``)."""
    from .prompts import render_prompt

    items, skipped = [], []
    for ex in examples:
        try:
            r = render_prompt(tokenizer, ex.question, config)
        except ValueError as e:
            if strict:
                raise ValueError(f"row {ex.index}: cannot render the prompt: {e}") from e
            skipped.append({"index": ex.index, "reason": f"render failed: {e}"})
            continue
        items.append(Item(ex.index, r.input_ids, list(r.seg_offsets), r.text, parse_level(ex.meta)))
    return items, skipped


def default_batch_tokens(device_type: str) -> int:
    """Token budget per batch (rows × longest row): 16384 on GPU, 4096 on CPU."""
    return 16384 if device_type == "cuda" else 4096


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Positions into ``lengths`` cut into batches: sorted by descending length (ties by position, so the plan is
    deterministic), each batch at most ``max_batch`` rows and ``rows × longest ≤ batch_tokens`` (a longer row
    alone is a batch of its own)."""
    if batch_tokens < 1 or max_batch < 1:
        raise ValueError(f"batch_tokens and max_batch must be >= 1, got {batch_tokens}, {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch or (len(current) + 1) * longest > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------------------------
# Resumable state
# --------------------------------------------------------------------------------------------------------------


def _data_identity(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(path.resolve()) if path.exists() else source}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _sampled_digest(files: Sequence[Path], samples: int = 16, block: int = 1 << 16) -> str:
    """sha256 over each file's size and ``samples`` evenly spaced blocks (~1 MB read per file): changes when weights
    are replaced in place (a fine-tune of the same shapes has the same size), the same for copies on other nodes."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with path.open("rb") as f:
            for k in range(samples):
                f.seek(max(0, size - block) * k // max(1, samples - 1))
                digest.update(f.read(block))
    return digest.hexdigest()


def _model_identity(model: str | None) -> str | dict[str, Any]:
    """The model's name, or for a local file / folder its path and a sampled digest of its weight files, so that
    weights replaced in place start a new run instead of resuming the old one's scores."""
    from .models import model_name

    if model is None or not Path(model).exists():
        return model_name(model)
    path = Path(model).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
    return {"path": str(path), "weights_sha256_sampled": _sampled_digest([f for f in files if f.is_file()])}


def run_fingerprint(opts: ScoreOptions, config: Any, items: Sequence[Item], plan: Sequence[Sequence[int]],
                    device_type: str, dtype: str) -> dict[str, Any]:
    """Everything the numbers depend on; a rerun resumes only when this is unchanged."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.index}:{len(item.input_ids)}:{item.seg_offsets}\n".encode())
        digest.update(hashlib.sha256(item.prompt_text.encode()).digest())
    for batch in plan:
        digest.update(f"{batch}\n".encode())
    return _json_roundtrip({
        "format": FORMAT_VERSION,
        "data": _data_identity(opts.data),
        "model": _model_identity(opts.model),
        "limit": opts.limit,
        "fmt": opts.fmt,
        "split": opts.split,
        "layer": opts.layer,
        "inter_weight": opts.inter_weight,
        "prompt": asdict(config) if hasattr(config, "__dataclass_fields__") else repr(config),
        "batch_tokens": opts.batch_tokens,
        "max_batch": opts.max_batch,
        "device_type": device_type,
        "dtype": dtype,
        "backend": opts.backend,
        "angle_fused": opts.angle_fused,
        "fused_norms": opts.fused_norms,
        "prefix_cache": opts.prefix_cache,
        "items_and_plan_sha256": digest.hexdigest(),
    })


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through ``write(file)`` into a temporary file next to ``path``, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def check_run_file(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Start a run in ``out`` or check that it continues the same one (else ``ValueError``; ``overwrite`` starts
    afresh, deleting the partial results)."""
    run_file = out / RUN_FILE
    partials = sorted(out.glob(PARTIAL_GLOB))
    if run_file.exists() and not overwrite:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous == fingerprint:
            return
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{out} holds a score run with other settings (changed: {', '.join(changed)}): pass --overwrite to "
            "start afresh, or choose another --out"
        )
    if partials and not overwrite and not run_file.exists():
        raise ValueError(f"{out} has partial results but no {RUN_FILE}: pass --overwrite to start afresh")
    for p in partials:
        p.unlink()
    _atomic_write(run_file, lambda f: json.dump(fingerprint, f, indent=1, sort_keys=True))


def read_partials(out: Path, n_batches: int) -> dict[int, list[list[Any]]]:
    """Finished batches in ``out``'s partial files: ``{batch: [[index, score, c_intra, c_inter], ...]}``.
    A line that does not parse (a write cut short by an interruption) is ignored: its batch counts as not done."""
    done: dict[int, list[list[Any]]] = {}
    for path in sorted(out.glob(PARTIAL_GLOB)):
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    batch, rows = int(rec["batch"]), rec["rows"]
                except (ValueError, KeyError, TypeError):
                    continue
                if 0 <= batch < n_batches:
                    done[batch] = rows
    return done


def _repair_partial(path: Path) -> None:
    """Cut a half-written last line so that appended records start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:  # a complete record that only lacks its newline was counted as done: keep it
            json.loads(data[cut:])
            f.write(b"\n")
        except ValueError:
            f.truncate(cut)


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


MIN_SHARED_PREFIX = 16


def shared_prefix_length(items: Sequence[Item]) -> int:
    """Number of leading tokens every prompt shares inside its P segment (the system prompt and few-shot turns,
    as tokenized: the common prefix of the token ids, capped at each prompt's question start)."""
    if not items:
        return 0
    first = items[0].input_ids
    c = min(item.seg_offsets[1] for item in items)
    for item in items:
        ids = item.input_ids
        if ids[:c] != first[:c]:
            k = 0
            while k < c and ids[k] == first[k]:
                k += 1
            c = k
    return c


def _cache_kwarg(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class SharedPrefix:
    """The prompts' shared leading tokens, run once: their K/V cache up to the probed layer and their angle
    statistics there. Tokens of a causal LM never see what follows them, so the prefix's activations are the same in
    every prompt; each batch then runs only the remaining tokens against a copy of this cache, and the prefix's
    statistics are added to segment P (sums and counts are additive)."""

    def __init__(self, model: Any, probe: Any, prefix_ids: Sequence[int], device: Any) -> None:
        import torch
        from transformers import DynamicCache

        self.model = model
        self.length = len(prefix_ids)
        self.cache_arg = _cache_kwarg(model)
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        with torch.inference_mode():
            probe.set_batch(None)
            probe.run(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{self.cache_arg: cache})
            if probe.stats is None:
                raise RuntimeError("the angle probe measured nothing on the shared prefix")
            self.unit_sum = probe.stats.unit_sum[0, 0].clone()
            self.sq_norm = probe.stats.sq_norm[0, 0].clone()
        self.kv = [(layer.keys, layer.values) for layer in cache.layers[: probe.layer_index + 1]]

    def cache_for(self, n_rows: int) -> Any:
        """A fresh cache holding the prefix for ``n_rows`` rows."""
        from transformers import DynamicCache

        data = [(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1)) for k, v in self.kv]
        return DynamicCache(data, config=self.model.config)


def score_batch(probe: Any, items: Sequence[Item], pad_id: int, device: Any, inter_weight: float,
                prefix: SharedPrefix | None = None) -> list[list[Any]]:
    """``[[index, score, c_intra, c_inter], ...]`` of one batch (right-padded, early-exit forward; with ``prefix``,
    only the tokens after the shared prefix are run)."""
    import torch

    from gainrl_kernels import AngleStats, angle_concentration

    skip = prefix.length if prefix is not None else 0
    width = max(item.n_tokens for item in items) - skip
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : item.n_tokens - skip] = torch.tensor(item.input_ids[skip:], dtype=torch.long)
        mask[row, : item.n_tokens - skip] = 1
    seg = torch.tensor([[0, item.seg_offsets[1] - skip, item.seg_offsets[2] - skip] for item in items],
                       dtype=torch.int32)
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if prefix is not None:
        kwargs.update(
            attention_mask=torch.cat([torch.ones_like(mask[:, :1]).expand(-1, skip), mask], 1),
            position_ids=(torch.arange(width, device=ids.device) + skip).unsqueeze(0).expand(len(items), -1),
            use_cache=True,
            **{prefix.cache_arg: prefix.cache_for(len(items))},
        )
    else:
        kwargs["attention_mask"] = mask
    with torch.inference_mode():
        probe.set_batch(seg, attention_mask=mask)
        probe.run(**kwargs)
        stats = probe.stats
        if stats is None:
            raise RuntimeError("the angle probe measured nothing: the forward never reached the target layer")
        if prefix is not None:  # add the shared prefix to segment P
            unit_sum, count, sq_norm = stats.unit_sum.clone(), stats.count.clone(), stats.sq_norm.clone()
            unit_sum[:, 0] += prefix.unit_sum
            count[:, 0] += skip
            sq_norm[:, 0] += prefix.sq_norm
            stats = AngleStats(unit_sum, count, sq_norm, stats.adjacent)
        conc = angle_concentration(stats, inter_weight)
        values = torch.stack([conc.score, conc.intra[:, -1], conc.inter[:, -1, -2]], 1).cpu().tolist()
    return [[item.index, *(_nan_to_none(v) for v in vals)] for item, vals in zip(items, values)]


def _after_batch(batch: int) -> None:
    """Called after each batch is saved (tests replace it to simulate an interruption)."""


def descending_order(indices: Sequence[int], scores: Sequence[float | None]) -> list[int]:
    """Dataset indices by descending score; undefined (None/NaN) scores last; ties by ascending index."""
    def key(pair: tuple[int, float | None]) -> tuple[int, float, int]:
        index, score = pair
        if score is None or not math.isfinite(score):
            return (1, 0.0, index)
        return (0, -score, index)

    return [index for index, _ in sorted(zip(indices, scores), key=key)]


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def correlations(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, Any] | None:
    """Spearman and Pearson correlation over the pairs where both are defined (``None`` if under 3 or constant)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    pearson = _pearson(xs, ys)
    if pearson is None:
        return None
    return {"spearman": _pearson(_ranks(xs), _ranks(ys)), "pearson": pearson, "n": len(pairs)}


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def undefined_reason(row: dict[str, Any]) -> str | None:
    """Why a scores.jsonl row has no score: ``"question_under_2_tokens"`` (no pair inside Q), ``"empty_prefix"`` (no
    P for C_inter), or ``"non_finite_hidden_states"`` (a NaN / Inf in the measured activations: the metrics that
    should exist are NaN); None when it has one."""
    if row["score"] is not None:
        return None
    _, q_start, q_end = row["seg_offsets"]
    q_len = q_end - q_start
    if (row["c_intra"] is None and q_len >= 2) or (row["c_inter"] is None and q_len >= 1 and q_start >= 1):
        return "non_finite_hidden_states"
    return "question_under_2_tokens" if q_len < 2 else "empty_prefix"


def build_summary(rows: Sequence[dict[str, Any]], items_by_index: dict[int, Item]) -> dict[str, Any]:
    scores = [r["score"] for r in rows]
    finite = sorted(s for s in scores if s is not None)
    stats: dict[str, Any] = {"n_defined": len(finite), "n_undefined": len(scores) - len(finite)}
    reasons = [(r["index"], undefined_reason(r)) for r in rows]
    stats["undefined"] = dict(sorted(Counter(why for _, why in reasons if why is not None).items()))
    stats["non_finite_indices"] = [i for i, why in reasons if why == "non_finite_hidden_states"][:50]
    if finite:
        mean = sum(finite) / len(finite)
        stats.update(
            mean=mean,
            std=math.sqrt(sum((s - mean) ** 2 for s in finite) / len(finite)),
            min=finite[0],
            max=finite[-1],
            **{f"p{int(q * 100):02d}": _quantile(finite, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        )
    corr: dict[str, Any] = {
        "n_tokens": correlations(scores, [r["n_tokens"] for r in rows]),
        "question_tokens": correlations(scores, [r["seg_offsets"][2] - r["seg_offsets"][1] for r in rows]),
    }
    levels = [items_by_index[r["index"]].level for r in rows]
    if any(v is not None for v in levels):
        corr["level"] = correlations(scores, levels)
    return {"score": stats, "correlation": corr}


def plot_summary(path: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], title: str) -> None:
    """Score histogram and score vs prompt length, written atomically as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["score"], r["n_tokens"]) for r in rows if r["score"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    if pts:
        ax1.hist([p[0] for p in pts], bins=min(50, max(5, len(pts) // 10)), color="#3b6ea8")
        ax2.scatter([p[1] for p in pts], [p[0] for p in pts], s=4, alpha=0.5, color="#3b6ea8")
    ax1.set_xlabel("score = C_intra(Q) + w·C_inter(Q,P)")
    ax1.set_ylabel("examples")
    ax1.set_title(f"{len(pts)} prompts", fontsize=9)
    ax2.set_xlabel("prompt tokens")
    ax2.set_ylabel("score")
    corr = summary["correlation"].get("n_tokens")
    level = summary["correlation"].get("level")
    text = f"Spearman ρ(score, length) = {corr['spearman']:.2f}" if corr else "ρ(score, length): n/a"
    if level:
        text += f"\nρ(score, level) = {level['spearman']:.2f}"
    ax2.set_title(text, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png"), mode="wb")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Finalisation
# --------------------------------------------------------------------------------------------------------------


def finalize(out: Path, items: Sequence[Item], plan: Sequence[Sequence[int]], done: dict[int, list[list[Any]]],
             header: dict[str, Any], parquet: bool) -> dict[str, Any]:
    """Merge the finished batches and write scores.jsonl, order.pt, summary.json, score_hist.png (atomically)."""
    import torch

    by_index: dict[int, list[Any]] = {}
    for b in range(len(plan)):
        for rec in done[b]:
            by_index[int(rec[0])] = rec
    items_by_index = {item.index: item for item in items}
    if set(by_index) != set(items_by_index):
        raise RuntimeError("partial results do not cover the examples: rerun with --overwrite")
    rows = []
    for item in sorted(items, key=lambda it: it.index):
        _, score, intra, inter = by_index[item.index]
        rows.append({
            "index": item.index, "score": score, "c_intra": intra, "c_inter": inter, "n_tokens": item.n_tokens,
            "seg_offsets": item.seg_offsets, "prompt_text": item.prompt_text,
        })

    def write_rows(f: Any) -> None:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")

    _atomic_write(out / "scores.jsonl", write_rows)
    order = torch.tensor(descending_order([r["index"] for r in rows], [r["score"] for r in rows]), dtype=torch.int64)
    _atomic_write(out / "order.pt", lambda f: torch.save(order, f), mode="wb")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        _atomic_write(out / "scores.parquet", lambda f: pq.write_table(table, f), mode="wb")
    summary = {**header, **build_summary(rows, items_by_index)}
    summary["n_scored"] = len(rows)
    _atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=1, default=_json_default))
    title = f"{Path(header['data']).name} · {Path(header['model']).name} · layer {header['layer']}"
    plot_summary(out / "score_hist.png", rows, summary, title)
    return summary


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run_score(opts: ScoreOptions) -> dict[str, Any]:
    """Run `gainrl score`; returns the summary (also in ``DIR/summary.json``) or, on a rank that did not write
    the merged outputs, ``{"finished": False, ...}``."""
    from .distributed import join_from_env
    from .models import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    group = join_from_env(device)
    try:
        summary = _run_score(opts, device, group, t_start)
    except BaseException:
        if group is not None:
            group.close(finished=False)
        raise
    if group is not None:
        group.close()
    return summary


def _run_score(opts: ScoreOptions, device: Any, group: ProcessGroup | None, t_start: float) -> dict[str, Any]:
    import torch

    from gainrl_kernels.probe import AngleProbe, find_decoder_layers

    from .data import load_examples
    from .models import load_model_and_tokenizer, model_name, resolve_dtype

    if group is not None:
        if opts.world_size != 1 and (opts.rank, opts.world_size) != (group.rank, group.world_size):
            raise ValueError(f"--rank {opts.rank} --world-size {opts.world_size} contradict the torchrun launch "
                             f"(rank {group.rank} of {group.world_size}): leave them out under torchrun")
        opts.rank, opts.world_size = group.rank, group.world_size
    if not 0 <= opts.rank < opts.world_size:
        raise ValueError(f"--rank must be in [0, world_size={opts.world_size}), got {opts.rank}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    config = prompt_config(opts)
    examples, report = load_examples(opts.data, fmt=opts.fmt, split=opts.split, strict=opts.strict, limit=opts.limit)
    skipped = [{"index": s.index, "reason": s.reason} for s in report.skipped]
    lead = opts.rank == 0
    if skipped and lead:
        print(f"[gainrl score] {report.summary()}", file=sys.stderr)

    dtype = resolve_dtype(opts.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(opts.model, dtype, device)
    if opts.fused_norms:
        from gainrl_kernels.patching import apply_fused_rmsnorms

        if not apply_fused_rmsnorms(model):
            raise ValueError("--fused-norms: the model has no HF LlamaRMSNorm-style norm to replace")
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    items, render_skipped = render_items(tokenizer, examples, config, opts.strict)
    t_render = time.perf_counter() - t0
    for s in render_skipped if lead else ():
        print(f"[gainrl score] skipped row {s['index']}: {s['reason']}", file=sys.stderr)
    skipped += render_skipped
    if not items:
        raise ValueError(f"{opts.data}: no example to score ({report.summary()})")

    if opts.batch_tokens is None:
        opts.batch_tokens = default_batch_tokens(device.type)
    plan = plan_batches([item.n_tokens for item in items], opts.batch_tokens, opts.max_batch)
    n_shared = shared_prefix_length(items)
    fingerprint = run_fingerprint(opts, config, items, plan, device.type, str(dtype).replace("torch.", ""))
    if group is not None:
        todo = _join_run_collectively(group, out, fingerprint, opts.overwrite, len(plan))
    else:
        todo = _join_run_by_files(opts, out, fingerprint, len(plan))
    n_todo = sum(len(plan[b]) for b in todo)
    # the progress bar counts this rank's share: under torchrun the leftovers alone (they are dealt afresh), else
    # its fixed batches rank, rank + W, … of which the others are done
    n_mine = n_todo if group is not None else sum(len(plan[b]) for b in range(opts.rank, len(plan), opts.world_size))
    partial = out / f"scores.partial.rank{opts.rank}.jsonl"
    _repair_partial(partial)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with AngleProbe(model, layer=opts.layer, early_exit=True, backend=opts.backend, fused=opts.angle_fused) as probe, \
            partial.open("a", encoding="utf-8") as f, \
            tqdm(total=n_mine, initial=n_mine - n_todo, unit="ex", desc="score", disable=not (opts.progress and lead),
                 dynamic_ncols=True, file=sys.stderr) as bar:
        layer_index = probe.layer_index
        prefix = None
        if todo and opts.prefix_cache and n_shared >= MIN_SHARED_PREFIX:
            prefix = SharedPrefix(model, probe, items[0].input_ids[:n_shared], device)
        for b in todo:
            rows = score_batch(probe, [items[i] for i in plan[b]], pad_id, device, opts.inter_weight, prefix)
            f.write(json.dumps({"batch": b, "rows": rows}, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(plan[b]))
            _after_batch(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_forward = time.perf_counter() - t0

    timing = {
        "model_load_s": round(t_model, 3),
        "render_s": round(t_render, 3),
        "forward_s": round(t_forward, 3),
        "examples_scored_this_run": n_todo,
        "examples_per_s": round(n_todo / t_forward, 2) if t_forward > 0 and n_todo else None,
    }
    if group is not None:
        # Every shard is on disk once all ranks pass here; rank 0 merges, the others learn whether it worked.
        shards = group.all_gather((n_todo, t_forward))
        n_all, slowest = sum(n for n, _ in shards), max(t for _, t in shards)
        timing.update(world_size=group.world_size, forward_s=round(slowest, 3), examples_scored_this_run=n_all,
                      examples_per_s=round(n_all / slowest, 2) if slowest > 0 and n_all else None)
    done = read_partials(out, len(plan))
    unfinished = {"finished": False, "rank": opts.rank, "batches_done": len(done), "batches": len(plan),
                  "timing": timing}
    if group is not None and not lead:
        error = group.broadcast(None)
        if error:
            raise RuntimeError(f"rank {opts.rank}: rank 0 could not merge the shards: {error}")
        return unfinished
    if len(done) < len(plan):
        if group is not None:
            error = f"only {len(done)} of {len(plan)} batches are in {out} after every rank finished"
            group.broadcast(error)
            raise RuntimeError(error)
        print(f"[gainrl score] rank {opts.rank}: shard done ({len(done)}/{len(plan)} batches finished overall); "
              "the rank finishing the last batch writes the outputs", file=sys.stderr)
        return unfinished
    header = {
        "data": str(opts.data),
        "model": model_name(opts.model),
        "layer": layer_index,
        "n_layers": len(find_decoder_layers(model)),
        "inter_weight": opts.inter_weight,
        "prompt": opts.prompt,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
        "n_rows": report.n_rows,
        "skipped": skipped,
        "batches": len(plan),
        "batch_tokens": opts.batch_tokens,
        "shared_prefix_tokens": n_shared if opts.prefix_cache and n_shared >= MIN_SHARED_PREFIX else 0,
    }
    try:
        summary = finalize(out, items, plan, done, header, opts.parquet)
        timing["total_s"] = round(time.perf_counter() - t_start, 3)
        summary["timing"] = timing
        _atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=1, default=_json_default))
    except Exception as e:
        if group is not None:
            group.broadcast(f"{type(e).__name__}: {e}")
        raise
    if group is not None:
        group.broadcast(None)
    return summary


def _join_run_collectively(group: ProcessGroup, out: Path, fingerprint: dict[str, Any], overwrite: bool,
                           n_batches: int) -> list[int]:
    """Start or resume the run in ``out`` together with the other ranks of a torchrun launch; returns this rank's
    batches to score. The unfinished batches are dealt round-robin, so a resumed run spreads what is left evenly."""
    if any(fp != fingerprint for fp in group.all_gather(fingerprint)):
        raise ValueError("the ranks of this launch see different settings, data or models (run fingerprints "
                         "differ): every rank must get the same arguments and files")
    # Rank 0 alone reads what is done and deals the rest: a rank reading the partial files itself could see a batch
    # another rank has just finished, and the ranks would then deal different lists.
    error, left = None, []
    if group.rank == 0:
        try:
            check_run_file(out, fingerprint, overwrite)
            done = read_partials(out, n_batches)
            left = [b for b in range(n_batches) if b not in done]
        except ValueError as e:
            error = str(e)
    error, left = group.broadcast((error, left))
    if error:
        raise ValueError(error)
    return left[group.rank::group.world_size]


def _join_run_by_files(opts: ScoreOptions, out: Path, fingerprint: dict[str, Any], n_batches: int) -> list[int]:
    """Start or resume the run in ``out`` as shard ``--rank`` of ``--world-size`` independent processes (no process
    group: they meet only through ``out``); returns this rank's unfinished batches ``rank, rank + W, …``."""
    if opts.rank == 0 or opts.world_size == 1:
        check_run_file(out, fingerprint, opts.overwrite)
    elif opts.overwrite:  # it would count the old partials as done while rank 0 deletes them
        raise ValueError(f"--overwrite: only rank 0 starts a file-sharded run afresh; run rank 0 with --overwrite "
                         f"(or clear {out}), then rank {opts.rank} without it")
    else:  # other ranks wait for rank 0 to (re)start the run file
        for _ in range(600):
            run_file = out / RUN_FILE
            if run_file.exists() and json.loads(run_file.read_text(encoding="utf-8")) == fingerprint:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"rank {opts.rank}: rank 0 did not start the run in {out}")
    done = read_partials(out, n_batches)
    return [b for b in range(opts.rank, n_batches, opts.world_size) if b not in done]


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "score",
        help="score every prompt by angle concentration and write the data order (GAIN-RL step 1)",
        description="Prefill every prompt once (early exit at the probed layer) and score it by angle "
        "concentration: score = C_intra(Q) + w * C_inter(Q, P). Writes DIR/scores.jsonl, DIR/order.pt, "
        "DIR/summary.json, DIR/score_hist.png. Rerun the same command to resume an interrupted run.",
    )
    p.add_argument("--data", required=True,
                   help="JSON/JSONL/Parquet file (GAIN-RL or verl format) or datasets name/path")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--limit", type=int, default=None, help="score the first N examples")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer to probe, negative from the end (default -1)")
    p.add_argument("--inter-weight", type=float, default=1.0, help="w in C_intra(Q) + w*C_inter(Q,P) (default 1)")
    p.add_argument("--prompt", default="r1", help="prompt preset: r1 (default), released, bare")
    p.add_argument("--system-prompt", default=None, help="override the preset's system prompt ('' for none)")
    p.add_argument("--format", dest="fmt", default="auto", choices=["auto", "gainrl", "verl"])
    p.add_argument("--split", default=None, help="split of a multi-split dataset")
    p.add_argument("--strict", action="store_true", help="fail on a row without a question instead of skipping it")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="token budget per batch, rows x longest row (default 16384 on GPU, 4096 on CPU)")
    p.add_argument("--max-batch", type=int, default=256, help="at most this many rows per batch")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "torch"], help="angle_stats backend")
    p.add_argument("--angle-fused", default="off", choices=["off", "auto", "on"],
                   help="measure with the fused RMSNorm + angle kernel in place of the layer's norm (see README)")
    p.add_argument("--fused-norms", action="store_true",
                   help="every HF LlamaRMSNorm-style norm of the model on our RMSNorm kernels (CUDA; see README)")
    p.add_argument("--parquet", action="store_true", help="also write DIR/scores.parquet")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="run every prompt in full instead of running the shared prefix (system prompt, few-shot "
                   "turns) once and reusing its K/V cache")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's partial results in DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process's shard (torchrun)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="number of shards")
    return p


def main(args: argparse.Namespace) -> int:
    """Run from parsed CLI arguments."""
    fields = ScoreOptions.__dataclass_fields__
    opts = ScoreOptions(**{k: v for k, v in vars(args).items() if k in fields})
    summary = run_score(opts)
    if summary.get("finished") is False:
        return 0
    s, t = summary["score"], summary["timing"]
    corr = summary["correlation"].get("n_tokens") or {}
    msg = (f"[gainrl score] {summary['n_scored']} scored, {len(summary['skipped'])} skipped -> "
           f"{opts.out}/scores.jsonl, "
           f"order.pt; score mean {s.get('mean', float('nan')):.4f} sd {s.get('std', float('nan')):.4f}; "
           f"Spearman with length {corr.get('spearman', float('nan')):.3f}; {t['total_s']:.1f} s")
    print(msg, file=sys.stderr)
    bad = s.get("undefined", {}).get("non_finite_hidden_states", 0)
    if bad:
        print(f"[gainrl score] warning: {bad} rows with NaN / Inf hidden states at the probed layer have no score "
              f"(indices {s['non_finite_indices'][:10]}{', ...' if bad > 10 else ''}; all in summary.json)",
              file=sys.stderr)
    return 0


__all__ = [
    "Item",
    "ScoreOptions",
    "add_score_parser",
    "build_summary",
    "correlations",
    "descending_order",
    "main",
    "plan_batches",
    "render_items",
    "run_score",
    "score_batch",
    "shared_prefix_length",
    "SharedPrefix",
]
