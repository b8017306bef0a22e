"""Tests for gainrl.prompts: P / Q segment offsets from the offset mapping, on locally built tokenizers."""

from __future__ import annotations

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from tokenizers import Tokenizer, models, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from gainrl.data import Example  # noqa: E402
from gainrl.prompts import (  # noqa: E402
    PROMPT_PRESETS,
    R1_FEW_SHOT,
    R1_SYSTEM_PROMPT,
    PromptConfig,
    render_prompt,
    render_prompts,
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

QUESTIONS = [
    "How many apples does Alice have if she buys 3 bags of 7 apples?",
    "Compute $\\frac{1}{2} + \\frac{1}{3}$.",
    "  What is 12 * (3 + 4)?\n",
    "What is 2+2?",  # the same text as the few-shot question: Q must be the final turn
    "user",  # a substring of the template's own header text
]
CORPUS = [R1_SYSTEM_PROMPT, *(t for turn in R1_FEW_SHOT for t in turn), *QUESTIONS, "user assistant system"]


def byte_level_bpe(specials: list[str], template: str, **special_kwargs: str) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (vocab 500) trained on this file's prompts and questions."""
    return tiny_models.byte_level_bpe(CORPUS, specials, template, vocab_size=500, **special_kwargs)


def char_bpe_without_pretokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A BPE without pre-tokenizer: merges cross whitespace, so a token like "\\nHow" straddles the question."""
    tok = Tokenizer(models.BPE())
    alphabet = sorted(set("".join(corpus)))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CHATML_SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    hf.chat_template = CHATML_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def chatml() -> PreTrainedTokenizerFast:
    return byte_level_bpe(CHATML_SPECIALS, CHATML_TEMPLATE, eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def llama3() -> PreTrainedTokenizerFast:
    return byte_level_bpe(LLAMA3_SPECIALS, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def pieces(tok: PreTrainedTokenizerFast, r) -> tuple[str, str, str]:
    _, q0, q1 = r.seg_offsets
    return tuple(tok.decode(r.input_ids[a:b]) for a, b in ((0, q0), (q0, q1), (q1, r.n_tokens)))


@pytest.mark.parametrize("question", QUESTIONS)
def test_chatml_segments(chatml, question):
    r = render_prompt(chatml, question)
    p, q, rest = pieces(chatml, r)
    assert r.seg_offsets[0] == 0 and 0 < r.seg_offsets[1] < r.seg_offsets[2] <= r.n_tokens == len(r.input_ids)
    assert r.input_ids == chatml(r.text, add_special_tokens=False)["input_ids"]
    assert q == question.strip()
    assert rest == "<|im_end|>\n<|im_start|>assistant\n"
    assert p.startswith("<|im_start|>system\n" + R1_SYSTEM_PROMPT + "<|im_end|>\n")
    assert p.endswith("<answer> 4 </answer><|im_end|>\n<|im_start|>user\n")
    assert r.text[slice(*r.question_span)] == question.strip()
    assert p + q + rest == r.text


@pytest.mark.parametrize("question", QUESTIONS)
def test_llama3_segments(llama3, question):
    r = render_prompt(llama3, question)
    p, q, rest = pieces(llama3, r)
    assert q == question.strip()
    assert p.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + R1_SYSTEM_PROMPT)
    assert p.endswith("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert rest == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert p + q + rest == r.text


def test_offsets_follow_the_template_not_constants(chatml, llama3):
    """Different templates and prompt configs move the offsets; nothing is a fixed count."""
    question = QUESTIONS[0]
    a, b = render_prompt(chatml, question), render_prompt(llama3, question)
    bare = render_prompt(chatml, question, PROMPT_PRESETS["bare"])
    assert a.seg_offsets[1] != b.seg_offsets[1]
    assert bare.seg_offsets[1] < a.seg_offsets[1]
    assert pieces(chatml, bare)[0] == "<|im_start|>user\n"
    # Q has the same length whatever the prefix, with this tokenizer (the question's pre-tokens are unchanged)
    assert bare.seg_offsets[2] - bare.seg_offsets[1] == a.seg_offsets[2] - a.seg_offsets[1]


def test_straddling_token_belongs_to_q():
    question = "How many apples?"
    rendered = "<|im_start|>user\nHow many apples?<|im_end|>\n<|im_start|>assistant\n"
    tok = char_bpe_without_pretokenizer(["user\nHow many apples?", "assistant\n"])
    r = render_prompt(tok, question, PROMPT_PRESETS["bare"])
    assert r.text == rendered
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    q0 = r.seg_offsets[1]
    start, end = enc["offset_mapping"][q0]
    assert start < r.question_span[0] < end, "the first Q token should straddle the question's start"
    assert enc["offset_mapping"][q0 - 1][1] <= start
    covered = "".join(tok.convert_ids_to_tokens(r.input_ids[q0 : r.seg_offsets[2]]))
    assert question in covered


def test_user_template_text_is_not_q(chatml):
    cfg = PromptConfig(user_template="Problem: {question} Answer in \\boxed{}.")
    r = render_prompt(chatml, "What is 3 + 4?", cfg)
    p, q, rest = pieces(chatml, r)
    assert q == " What is 3 + 4?"  # the byte-level token " What" straddles the question's start: it is in Q
    assert p.endswith("user\nProblem:")
    assert rest.startswith(" Answer in \\boxed{}.<|im_end|>")


def test_render_prompts_and_from_dict(chatml):
    cfg = PromptConfig.from_dict({"preset": "r1", "few_shot": [{"user": "1+1?", "assistant": "2"}]})
    assert cfg.few_shot == (("1+1?", "2"),) and cfg.system_prompt == R1_SYSTEM_PROMPT
    out = render_prompts(chatml, [QUESTIONS[0], Example(7, QUESTIONS[1], "5", {})], cfg)
    assert [pieces(chatml, r)[1] for r in out] == QUESTIONS[:2]
    assert PromptConfig.from_dict({"preset": "released"}) == PROMPT_PRESETS["released"]
    with pytest.raises(ValueError, match="preset"):
        PromptConfig.from_dict({"preset": "nope"})
    with pytest.raises(ValueError, match="unknown"):
        PromptConfig.from_dict({"sytem_prompt": "typo"})


def test_errors(chatml):
    with pytest.raises(ValueError, match=r"\{question\}"):
        PromptConfig(user_template="no field")
    with pytest.raises(ValueError, match="non-empty"):
        render_prompt(chatml, "   ")

    class Slow:
        is_fast = False
        chat_template = CHATML_TEMPLATE

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        render_prompt(Slow(), "What?")

    no_template = byte_level_bpe(CHATML_SPECIALS, CHATML_TEMPLATE)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(no_template, "What?")

    upper = byte_level_bpe(CHATML_SPECIALS, CHATML_TEMPLATE.replace("m['content']", "m['content'] | upper"))
    with pytest.raises(ValueError, match="not found"):
        render_prompt(upper, "What is two?")
