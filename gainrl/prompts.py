"""Render a question through a tokenizer's chat template and locate its P / Q token segments.

The prompt is ``[system] + few-shot (user, assistant) turns + user(question)`` rendered with
``add_generation_prompt=True``. The segment offsets come from the fast tokenizer's offset mapping of that exact
text (never from hard-coded token counts, see DESIGN.md §1):

* **P** = tokens ``[0, q_start)``: everything before the question (template specials, system prompt, few-shot
  turns, the final user turn's header and any text of ``user_template`` before the question);
* **Q** = tokens ``[q_start, q_end)``: every token whose character span overlaps the question's characters (a token
  straddling a boundary, e.g. ``"\\nWhat"``, belongs to Q);
* the closing tokens (end of turn, generation prompt) come after ``q_end`` and belong to no segment.

The question's character span is found by rendering the same conversation a second time with the question
replaced by a one-character sentinel: the two texts differ exactly where the template put the question, so the
common prefix and suffix bound it. This is exact even when the question also occurs in the few-shot turns or is a
substring of the template's own text (e.g. the question ``"user"``), and the token ids still come from the real
text only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gainrl.data import Example

#: The R1-style system prompt of the GAIN-RL paper (answers in ``<think>``/``<answer>`` tags).
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
#: One worked 2+2 turn in the tag format.
R1_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "What is 2+2?",
        "<think> To calculate 2+2, we simply add the numbers together: 2 + 2 = 4. </think> <answer> 4 </answer>",
    ),
)
#: The system prompt and 2+2 turn of the released angle-sorting script (``\\boxed{}`` answers); only for
#: reproducing the released orderings.
RELEASED_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. Let's think step by step and output the final answer within \\boxed{}."
)
RELEASED_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "What is 2+2?",
        "To calculate 2+2, we simply add the numbers together: 2 + 2 = 4. The answer is \\boxed{4}",
    ),
)

QUESTION_FIELD = "{question}"
_SENTINELS = ("\ue000", "\ue001", "\ue002", "\U000f0000")


@dataclass(frozen=True)
class PromptConfig:
    """What surrounds the question.

    Attributes:
        system_prompt: system message, or ``None`` for none (the template may still insert its own default).
        few_shot: ``(user, assistant)`` turns placed before the question.
        user_template: the final user message; ``{question}`` (exactly once) is replaced by the question, other
            braces are kept as written (``\\boxed{}`` is fine). Text around the question belongs to P (before)
            or to no segment (after).
    """

    system_prompt: str | None = R1_SYSTEM_PROMPT
    few_shot: tuple[tuple[str, str], ...] = R1_FEW_SHOT
    user_template: str = QUESTION_FIELD

    def __post_init__(self) -> None:
        if self.user_template.count(QUESTION_FIELD) != 1:
            raise ValueError(f"user_template must contain {QUESTION_FIELD} exactly once, got {self.user_template!r}")
        turns = tuple(tuple(turn) for turn in self.few_shot)
        if any(len(turn) != 2 or not all(isinstance(t, str) for t in turn) for turn in turns):
            raise ValueError("few_shot must be a sequence of (user, assistant) string pairs")
        object.__setattr__(self, "few_shot", turns)

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat messages for ``question``."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        for user, assistant in self.few_shot:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": self.user_template.replace(QUESTION_FIELD, question)})
        return messages

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> PromptConfig:
        """Build from a config mapping: an optional ``preset`` name overridden by ``system_prompt``,
        ``few_shot`` (pairs or ``{"user", "assistant"}`` mappings) and ``user_template``."""
        unknown = set(cfg) - {"preset", "system_prompt", "few_shot", "user_template"}
        if unknown:
            raise ValueError(f"unknown prompt config keys: {sorted(unknown)}")
        preset = cfg.get("preset", "r1")
        if preset not in PROMPT_PRESETS:
            raise ValueError(f"unknown prompt preset {preset!r} (known: {sorted(PROMPT_PRESETS)})")
        overrides: dict[str, Any] = {}
        if "system_prompt" in cfg:
            overrides["system_prompt"] = cfg["system_prompt"]
        if "few_shot" in cfg:
            overrides["few_shot"] = tuple(
                (t["user"], t["assistant"]) if isinstance(t, Mapping) else tuple(t) for t in cfg["few_shot"] or ()
            )
        if "user_template" in cfg:
            overrides["user_template"] = cfg["user_template"]
        return replace(PROMPT_PRESETS[preset], **overrides)


PROMPT_PRESETS: dict[str, PromptConfig] = {
    "r1": PromptConfig(),
    "released": PromptConfig(system_prompt=RELEASED_SYSTEM_PROMPT, few_shot=RELEASED_FEW_SHOT),
    "bare": PromptConfig(system_prompt=None, few_shot=()),
}


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt and its segments.

    Attributes:
        text: the chat-template text (with the generation prompt).
        input_ids: its token ids (``add_special_tokens=False``: the template renders its own specials).
        seg_offsets: ``[0, q_start, q_end]`` token offsets: P = ``[0, q_start)``, Q = ``[q_start, q_end)``
            (one row of ``seg_offsets`` for ``gainrl_kernels.angle_stats``).
        n_tokens: ``len(input_ids)``.
        question_span: the question's ``[start, end)`` character span in ``text``.
    """

    text: str
    input_ids: list[int]
    seg_offsets: list[int]
    n_tokens: int
    question_span: tuple[int, int] = field(default=(0, 0))


def _render(tokenizer: Any, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def locate_question(
    tokenizer: Any,
    question: str,
    config: PromptConfig,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, tuple[int, int]]:
    """Render ``question`` and return ``(text, (start, end))``, the question's character span in ``text``."""
    kwargs = dict(template_kwargs or {})
    text = _render(tokenizer, config.messages(question), kwargs)
    sentinel = next((s for s in _SENTINELS if s not in question and s not in text), None)
    if sentinel is None:
        raise ValueError("the question and template contain every private-use sentinel character")
    other = _render(tokenizer, config.messages(sentinel), kwargs)
    start = _common_prefix(text, other)
    max_suffix = min(len(text), len(other)) - start
    suffix = _common_prefix(text[::-1][:max_suffix], other[::-1][:max_suffix])
    end = len(text) - suffix
    if text[start:end] != question:
        found = text.find(question, start, end)
        if found < 0:
            raise ValueError(
                "the question's text was not found in the rendered chat template (does the template rewrite "
                f"message contents?); rendered part where it should be: {text[start:end]!r}"
            )
        start, end = found, found + len(question)
    return text, (start, end)


def render_prompt(
    tokenizer: Any,
    question: str | Example,
    config: PromptConfig | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedPrompt:
    """Render ``question`` through ``tokenizer``'s chat template and find its P / Q token segments.

    Args:
        tokenizer: a fast (``tokenizers``-backed) Hugging Face tokenizer with a ``chat_template``.
        question: the question text (or an :class:`~gainrl.data.Example`, whose ``question`` is used); surrounding
            whitespace is stripped (templates often trim contents).
        config: system prompt, few-shot turns and user template (default: :data:`PROMPT_PRESETS` ``"r1"``).
        template_kwargs: extra keyword arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).

    Raises:
        ValueError: slow tokenizer, no chat template, empty question, or the question not found in the
            rendered text / in its tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: offset mappings (return_offsets_mapping=True) "
            "need a tokenizers-backed (PreTrainedTokenizerFast) tokenizer"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat_template")
    if isinstance(question, Example):
        question = question.question
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    question = question.strip()
    config = config or PromptConfig()

    text, (char_start, char_end) = locate_question(tokenizer, question, config, template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    overlapping = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < e and s < char_end and e > char_start]
    if not overlapping:
        raise ValueError("no token overlaps the question's characters (empty offset mapping?)")
    q_start, q_end = overlapping[0], overlapping[-1] + 1
    return RenderedPrompt(
        text=text,
        input_ids=input_ids,
        seg_offsets=[0, q_start, q_end],
        n_tokens=len(input_ids),
        question_span=(char_start, char_end),
    )


def render_prompts(
    tokenizer: Any,
    questions: Iterable[str | Example],
    config: PromptConfig | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[RenderedPrompt]:
    """:func:`render_prompt` for each question."""
    return [render_prompt(tokenizer, q, config, template_kwargs=template_kwargs) for q in questions]


__all__ = [
    "PROMPT_PRESETS",
    "PromptConfig",
    "R1_FEW_SHOT",
    "R1_SYSTEM_PROMPT",
    "RELEASED_FEW_SHOT",
    "RELEASED_SYSTEM_PROMPT",
    "RenderedPrompt",
    "locate_question",
    "render_prompt",
    "render_prompts",
]
