"""Tiny random decoder LMs and a tiny chat tokenizer, built offline, for the probe and `gainrl score` tests."""
from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
CORPUS = [
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "<think> To calculate 2+2, we simply add the numbers together: 2 + 2 = 4. </think> <answer> 4 </answer>",
    "What is 2+2? How many apples does Alice have if she buys 3 bags of 7 apples? Compute 12 * (3 + 4).",
    "user assistant system reasoning process answer enclosed within tags respectively",
]


def byte_level_bpe(corpus: list[str], specials: list[str], template: str, vocab_size: int = 400,
                   **special_kwargs: str):
    """A GPT-2 style byte-level BPE trained on ``corpus`` (three passes), with the given special tokens and chat
    template; ``special_kwargs`` (eos_token=..., pad_token=...) go to PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 3, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special_kwargs)
    hf.chat_template = template
    return hf


def chat_tokenizer():
    """A byte-level BPE (vocab 400) with a ChatML chat template."""
    return byte_level_bpe(CORPUS, CHATML_SPECIALS, CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|pad|>")


def tiny_lm(kind: str = "llama", vocab_size: int = 400, seed: int = 0, layers: int = 2):
    """A random LlamaForCausalLM / Qwen2ForCausalLM with hidden size 32, in eval mode, float32, eager attention
    (sdpa on CPU gives the same numbers; eager keeps the tests independent of the kernel choice)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.set_attn_implementation("eager")
    return model.eval()


def save_tiny_chat_model(path, kind: str = "llama", seed: int = 0):
    """Save :func:`tiny_lm` with :func:`chat_tokenizer` to ``path`` (a folder `--model` accepts); returns ``path``."""
    tiny_lm(kind, seed=seed).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path
