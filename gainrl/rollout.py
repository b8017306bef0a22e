"""Rollout generation behind one small interface: Hugging Face ``generate`` (default) or vLLM (when installed).

An engine turns tokenised prompts into sampled completions::

    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=256, temperature=1.0)
    rollouts = engine.generate(prompt_ids, n=G)          # G samples per prompt, a prompt's samples contiguous
    rollouts.completions[i], rollouts.completion_ids[i], rollouts.finished[i]
    batch = rollouts.padded(pad_id)                      # tensors for the training forward

Completions are cut after the first end-of-sequence token (kept: the policy learns to stop); a completion
without one was truncated at ``max_new_tokens`` (``finished=False``). Sampling draws from torch's default
generator, so ``torch.manual_seed`` before :meth:`generate` makes it reproducible (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class PaddedRollouts:
    """A rollout batch laid out for the training forward: prompts left-padded to ``P``, completions right-padded
    to ``R``, so that every completion starts at column ``P`` (``logits_to_keep = R + 1`` covers them).

    Attributes:
        input_ids: ``[N, P + R]``.
        attention_mask: ``[N, P + R]`` (1 on real tokens).
        position_ids: ``[N, P + R]``, 0 at each row's first real token (as during generation).
        completion_ids: ``[N, R]`` (padding where ``completion_mask`` is 0).
        completion_mask: ``[N, R]`` float32.
        prompt_lens, completion_lens: ``[N]`` int64.
        prompt_width: ``P``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lens: torch.Tensor
    completion_lens: torch.Tensor
    prompt_width: int

    def to(self, device: torch.device | str) -> PaddedRollouts:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PaddedRollouts(**moved)

    def rows(self, start: int, stop: int) -> PaddedRollouts:
        """Rows ``[start, stop)``, trimmed to their own widest prompt / completion."""
        plen, clen = self.prompt_lens[start:stop], self.completion_lens[start:stop]
        p_need = int(plen.max()) if plen.numel() else 0
        r_need = max(int(clen.max()) if clen.numel() else 0, 1)
        p0 = self.prompt_width - p_need
        sl = slice(p0, self.prompt_width + r_need)
        return PaddedRollouts(
            input_ids=self.input_ids[start:stop, sl],
            attention_mask=self.attention_mask[start:stop, sl],
            position_ids=self.position_ids[start:stop, sl],
            completion_ids=self.completion_ids[start:stop, :r_need],
            completion_mask=self.completion_mask[start:stop, :r_need],
            prompt_lens=plen,
            completion_lens=clen,
            prompt_width=p_need,
        )


@dataclass
class Rollouts:
    """Sampled completions of a batch of prompts (``n`` per prompt, contiguous).

    Attributes:
        prompt_ids: per rollout, the prompt's token ids (no padding).
        completion_ids: per rollout, the generated ids up to and including the first end-of-sequence token.
        completions: decoded completions (special tokens skipped).
        finished: whether the completion ended with an end-of-sequence token.
        prompt_index: per rollout, the position of its prompt in the ``prompts`` argument.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    finished: list[bool]
    prompt_index: list[int]

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def n_tokens(self) -> int:
        """Prompt plus completion tokens over all rollouts."""
        return sum(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))

    def padded(self, pad_id: int) -> PaddedRollouts:
        """The batch as tensors (see :class:`PaddedRollouts`)."""
        n = len(self)
        p_width = max((len(p) for p in self.prompt_ids), default=0)
        r_width = max(max((len(c) for c in self.completion_ids), default=0), 1)
        input_ids = torch.full((n, p_width + r_width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, p_width + r_width), dtype=torch.long)
        completion_mask = torch.zeros((n, r_width), dtype=torch.float32)
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            input_ids[i, p_width - len(p) : p_width] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, p_width - len(p) : p_width + len(c)] = 1
            if c:
                input_ids[i, p_width : p_width + len(c)] = torch.tensor(c, dtype=torch.long)
                completion_mask[i, : len(c)] = 1.0
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return PaddedRollouts(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            completion_ids=input_ids[:, p_width:].clone(),
            completion_mask=completion_mask,
            prompt_lens=torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long),
            completion_lens=torch.tensor([len(c) for c in self.completion_ids], dtype=torch.long),
            prompt_width=p_width,
        )


class RolloutEngine(Protocol):
    """What the trainer needs from a generator."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, *, greedy: bool = False) -> Rollouts:
        """``n`` completions per prompt (greedy: the argmax continuation, repeated ``n`` times)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        ...


def eos_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's ``eos_token_id`` plus the model's generation config's."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: cannot tell where a completion ends")
    return ids


def cut_completion(ids: Sequence[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """``ids`` up to and including the first EOS, and whether one was found."""
    eos_set = set(eos)
    for i, t in enumerate(ids):
        if t in eos_set:
            return list(ids[: i + 1]), True
    return list(ids), False


class HFRolloutEngine:
    """Sampling with ``model.generate`` (KV cache), in chunks of at most ``batch_size`` sequences.

    Args:
        model, tokenizer: the policy and its tokenizer (generation runs on the model's device).
        max_new_tokens: completion budget.
        temperature, top_p, top_k: sampling parameters (``top_k=0``: off).
        batch_size: sequences per ``generate`` call (``None``: all at once).
        autocast_dtype: e.g. ``torch.bfloat16`` to generate under autocast on CUDA.
        share_prefix: with ``n > 1`` samples per prompt, prefill each prompt once and repeat its KV cache ``n``
            times instead of prefilling ``n`` copies (same tokens up to float rounding, ``n``-fold less prefill
            compute: worth it on CPU, where the prefill dominates short rollouts). Falls back to plain
            ``generate`` when the model's cache cannot be repeated.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        share_prefix: bool = False,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.share_prefix = bool(share_prefix)
        self.eos = eos_ids(tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos[0]

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cache_kwarg(self) -> str:
        """``cache`` (transformers >= 5) or ``past_key_values`` (older): how ``generate`` takes a prefilled cache."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """KV cache of all prompt tokens but the last (``generate`` feeds that one), or ``None`` if unsupported."""
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        try:
            out = self.model(
                input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                use_cache=True, logits_to_keep=1,
            )
        except TypeError:
            return None
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return cache if hasattr(cache, "batch_repeat_interleave") else None

    def _generate_chunk(self, prompts: list[list[int]], greedy: bool, n: int = 1) -> list[list[int]]:
        """Raw completions (``max_new_tokens`` wide at most) of ``n`` samples per prompt, a prompt's contiguous."""
        device = self._device()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad_id, use_cache=True
        )
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast:
                if n > 1 and self.share_prefix and width > 1:
                    cache = self._prefill(ids, mask)
                    if cache is not None:
                        cache.batch_repeat_interleave(n)
                        kwargs[self._cache_kwarg()] = cache
                if n > 1:
                    ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            self.model.train(was_training)
        return out[:, width:].cpu().tolist()

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, *, greedy: bool = False) -> Rollouts:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return Rollouts([], [], [], [], [])
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        expanded = [list(p) for p in prompts for _ in range(n)]
        index = [i for i in range(len(prompts)) for _ in range(n)]
        if greedy and n > 1:  # one greedy continuation per prompt, repeated
            unique = self.generate(prompts, 1, greedy=True)
            reps = [[x] * n for x in zip(unique.completion_ids, unique.completions, unique.finished)]
            flat = [x for r in reps for x in r]
            return Rollouts(expanded, [f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], index)
        per_call = max(1, (self.batch_size or len(expanded)) // n)  # prompts per generate call
        raw: list[list[int]] = []
        for start in range(0, len(prompts), per_call):
            raw += self._generate_chunk([list(p) for p in prompts[start : start + per_call]], greedy, n)
        cut = [cut_completion(r, self.eos) for r in raw]
        completion_ids = [c for c, _ in cut]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(expanded, completion_ids, list(texts), [f for _, f in cut], index)


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported."""
    return importlib.util.find_spec("vllm") is not None


class VLLMRolloutEngine:
    """Sampling with vLLM (``pip install vllm``), same interface as :class:`HFRolloutEngine`.

    The engine loads ``model_path`` itself (colocated on the training GPU, ``gpu_memory_utilization``) and
    :meth:`sync_weights` copies the policy's current weights into it after every optimiser step. vLLM's internal
    API for that changes between versions: this uses ``LLM.llm_engine.model_executor.driver_worker`` (vLLM 0.6 -
    0.8) or ``LLM.collective_rpc`` (newer). Untested here (no vLLM in the CPU environment); not bit-reproducible.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
    ) -> None:
        if not vllm_available():
            raise RuntimeError("rollout engine 'vllm' asked for, but vllm is not installed (pip install vllm)")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.eos = eos_ids(tokenizer)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.llm = LLM(
            model=model_path, seed=seed, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
            enable_prefix_caching=True,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        if worker is not None:
            runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
            runner.model.load_weights(weights)
        elif hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc("load_weights", args=(weights,))
        else:  # pragma: no cover - depends on the vLLM version
            raise RuntimeError("this vLLM version exposes no known way to load new weights into the engine")
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, *, greedy: bool = False) -> Rollouts:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            max_tokens=self.max_new_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=-1 if greedy or not self.top_k else self.top_k,
            stop_token_ids=self.eos,
        )
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        prompt_ids, completion_ids, finished, index = [], [], [], []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                ids, done = cut_completion(list(sample.token_ids), self.eos)
                prompt_ids.append(list(prompts[i]))
                completion_ids.append(ids)
                finished.append(done)
                index.append(i)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(prompt_ids, completion_ids, list(texts), finished, index)


__all__ = [
    "HFRolloutEngine",
    "PaddedRollouts",
    "RolloutEngine",
    "Rollouts",
    "VLLMRolloutEngine",
    "cut_completion",
    "eos_ids",
    "vllm_available",
]
