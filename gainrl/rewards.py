"""Rule-based rewards: answer correctness through ``math_verify`` and an optional format reward.

A reward function is any callable ``(completions: list[str], answers: list[str]) -> list[float]``; the registry
maps names to them (:func:`register_reward`, :func:`get_reward`, :func:`combine_rewards`).

Correctness (:func:`is_correct`) compares the completion's final answer with the reference symbolically:

1. the answer is the content of the last ``<answer>...</answer>``, else of the last ``\\boxed{...}``, else the
   last number of the completion (:func:`extract_answer`);
2. prediction and reference are parsed with ``math_verify.parse`` -- a reference is read as LaTeX (MATH ground
   truths such as ``\\dfrac{3}{4}``; GSM8K's are plain numbers), a prediction as LaTeX math unless it contains
   words (``42 apples`` is read as plain text), see :func:`parse_prediction`;
3. ``math_verify.verify`` decides (so ``1,000`` = ``1000``, ``\\frac{1}{2}`` = ``0.5``, ``x=5`` = ``5``).

Any exception or timeout inside ``math_verify`` counts as incorrect (0.0); it never stops a run. Its timeouts use
``SIGALRM`` and so only work in the main thread: elsewhere they are disabled (math_verify refuses them there).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gainrl.data import last_boxed

logger = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[str], Sequence[Any]], list[float]]

#: Seconds allowed to each math_verify parse / comparison (main thread only).
TIMEOUT_SECONDS = 5

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d+(?:\.\d+)?|-?\.\d+")
_DOLLAR = re.compile(r"(?<!\\)\$")  # a math delimiter, not an escaped dollar sign
_WORD = re.compile(r"(?<!\w)[a-zA-Z]{3,}")  # a word, not `xy` or `2xy`
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The completion's final answer text: last ``<answer>`` content, else last ``\\boxed{}``, else last number."""
    if not isinstance(completion, str):
        return None
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip() or None
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(completion.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _safe_parse(text: str) -> list[Any]:
    import math_verify

    try:
        return math_verify.parse(text, parsing_timeout=_timeout())
    except BaseException as e:  # math_verify's TimeoutException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math_verify.parse failed on %r: %r", text[:200], e)
        return []


@functools.lru_cache(maxsize=65536)
def parse_reference(answer: str) -> tuple[Any, ...]:
    """Parsed reference answer (read as LaTeX; a bare number too). Cached: a group shares its reference."""
    answer = answer.strip()
    if not answer:
        return ()
    return tuple(_safe_parse(f"\\boxed{{{answer}}}") or _safe_parse(answer))


def parse_prediction(candidate: str) -> list[Any]:
    """Parsed prediction.

    As written when it has a ``$`` delimiter or ``\\boxed``; as LaTeX math when it has a LaTeX command
    (``\\frac{1}{2}``, ``\\begin{pmatrix}...``); as plain text when it has words (``42 apples``: LaTeX would
    read ``apples`` as a product of symbols); otherwise as LaTeX math (``(1, 2)``, ``x=5``, ``2xy + 1``: plain-text
    parsing would keep only the last number). The other reading is the fallback when the first finds nothing.
    """
    candidate = candidate.strip()
    if not candidate:
        return []
    if _DOLLAR.search(candidate) or "\\boxed" in candidate:
        return _safe_parse(candidate)
    if "\\" not in candidate and _WORD.search(candidate):
        return _safe_parse(candidate) or _safe_parse(f"${candidate}$")
    return _safe_parse(f"${candidate}$") or _safe_parse(candidate)


def is_correct(completion: str, answer: Any) -> bool:
    """Whether the completion's final answer equals the reference ``answer`` (never raises)."""
    if answer is None:
        return False
    candidate = extract_answer(completion)
    if candidate is None:
        return False
    gold = parse_reference(str(answer))
    pred = parse_prediction(candidate)
    if not gold or not pred:
        return False
    import math_verify

    try:
        return bool(math_verify.verify(list(gold), pred, timeout_seconds=_timeout()))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math_verify.verify failed: %r", e)
        return False


def has_format(completion: str) -> bool:
    """Whether the completion is ``<think>...</think>`` followed by ``<answer>...</answer>`` and nothing else."""
    return isinstance(completion, str) and _FORMAT.match(completion) is not None


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register a reward function under ``name`` (an existing name is an error)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"a reward named {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r} (known: {sorted(REWARDS)})") from None


def _check_lengths(completions: Sequence[str], answers: Sequence[Any]) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"completions ({len(completions)}) and answers ({len(answers)}) differ in length")


@register_reward("accuracy")
def accuracy_reward(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
    """1.0 for a correct final answer (:func:`is_correct`), else 0.0 -- the ``acc`` of the μ update."""
    _check_lengths(completions, answers)
    return [float(is_correct(c, a)) for c, a in zip(completions, answers)]


@register_reward("format")
def format_reward(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
    """1.0 when the completion follows ``<think>...</think> <answer>...</answer>`` (:func:`has_format`)."""
    _check_lengths(completions, answers)
    return [float(has_format(c)) for c in completions]


def combine_rewards(weights: Mapping[str, float]) -> RewardFn:
    """A reward function returning ``Σ weight · reward`` over the named registered rewards."""
    if not weights:
        raise ValueError("weights must name at least one reward")
    parts = [(get_reward(name), float(w)) for name, w in weights.items()]

    def combined(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in parts:
            total = [t + w * r for t, r in zip(total, fn(completions, answers))]
        return total

    return combined
