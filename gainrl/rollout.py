"""Rollout generation behind one small interface: Hugging Face ``generate`` (default) or vLLM (when installed).

An engine turns tokenised prompts into sampled completions::

    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=256, temperature=1.0)
    rollouts = engine.generate(prompt_ids, n=G)          # G samples per prompt, a prompt's samples contiguous
    rollouts.completions[i], rollouts.completion_ids[i], rollouts.finished[i]
    batch = rollouts.padded(pad_id)                      # tensors for the training forward

Completions are cut after the first end-of-sequence token (kept: the policy learns to stop); a completion
without one was truncated at ``max_new_tokens`` (``finished=False``). Sampling draws from torch's default
generator (vLLM: per-request seeds drawn from it), so ``torch.manual_seed`` before :meth:`generate` makes it
reproducible (HF: bit-identical on CPU).

Samples come from ``softmax(logits / temperature)`` (restricted by ``top_k`` / ``top_p`` when set), the
distribution the GRPO loss scores them under, and greedy decoding is the plain argmax: the model's own generation
config (``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens``, ``min_p``, ...)
is not applied.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


def _check_generate_args(prompts: Sequence[Sequence[int]], n: int) -> bool:
    """Arguments every engine's ``generate`` takes: n >= 1 and no empty prompt; False when there are no prompts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    return bool(prompts)


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


@contextlib.contextmanager
def own_generation_config(model: Any, config: Any) -> Iterator[None]:
    """Within the block ``model`` (and every submodule, e.g. under a PEFT wrapper) has ``config`` as its
    ``generation_config``; the model's own configs are put back afterwards.

    transformers fills every field a ``generation_config=`` passed to ``generate`` leaves unset (``None``) from
    ``model.generation_config`` (``_prepare_generation_config``), and many logits processors are off only while
    their field is ``None`` (``suppress_tokens``, ``min_p``, ``bad_words_ids``, ...): a model whose config sets one
    would otherwise leak it into generation.
    """
    from transformers import GenerationConfig

    owners = list(model.modules()) if isinstance(model, torch.nn.Module) else [model]
    saved = [(m, vars(m)["generation_config"]) for m in owners
             if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    for m, _ in saved:
        m.generation_config = config
    try:
        yield
    finally:
        for m, original in saved:
            m.generation_config = original


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

    Every ``generate`` call runs with :meth:`generation_config` alone (the model's own generation config is swapped
    out for the call, see :func:`own_generation_config`).
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

    def generation_config(self, greedy: bool) -> Any:
        """The complete ``GenerationConfig`` of a ``generate`` call (see :func:`own_generation_config`): sampling
        from ``softmax(logits / temperature)`` (top-k / top-p when set), or the argmax; nothing else."""
        from transformers import GenerationConfig

        sampling: dict[str, Any] = (
            dict(do_sample=False) if greedy
            else dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, eos_token_id=list(self.eos), pad_token_id=self.pad_id,
            use_cache=True, num_beams=1, num_return_sequences=1, **sampling,
        )

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
        gen_cfg = self.generation_config(greedy)
        kwargs: dict[str, Any] = {}
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast, own_generation_config(self.model, gen_cfg):
                if n > 1 and self.share_prefix and width > 1:
                    cache = self._prefill(ids, mask)
                    if cache is not None:
                        cache.batch_repeat_interleave(n)
                        kwargs[self._cache_kwarg()] = cache
                if n > 1:
                    ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, **kwargs)
        finally:
            self.model.train(was_training)
        return out[:, width:].cpu().tolist()

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, *, greedy: bool = False) -> Rollouts:
        if not _check_generate_args(prompts, n):
            return Rollouts([], [], [], [], [])
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
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> Any:
    """The ``vllm`` module, or a ``RuntimeError`` saying how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            "rollout engine 'vllm' asked for, but vllm is not installed (pip install vllm; needs a CUDA GPU)"
        ) from e
    return vllm


def _free_port() -> int:
    """A TCP port nobody listens on now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def colocate_env() -> None:
    """Environment for a vLLM engine living in this (training) process, as TRL's ``vllm_mode="colocate"``.

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the V1 engine core, and so the model, in this process (otherwise
    ``LLM.llm_engine`` has no ``model_executor`` and the weights live in a child process); the
    ``external_launcher`` executor initialises torch.distributed from ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT``, set here to a single process on GPU 0 unless already set (torchrun).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
        os.environ.setdefault(key, value)
    if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
        os.environ["MASTER_PORT"] = str(_free_port())


def vllm_weight_name(name: str) -> str | None:
    """The checkpoint name vLLM's ``load_weights`` expects for a parameter of the training model, ``None`` to skip.

    Strips wrapper prefixes (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``, activation checkpointing's
    ``_checkpoint_wrapped_module.``) and PEFT's (``base_model.model.``, ``.base_layer``, ``modules_to_save.default.``);
    LoRA factors and PEFT's ``original_module`` copies are skipped (send merged weights, see :func:`merged_adapters`).
    """
    for prefix in ("_orig_mod.", "module."):
        name = name.removeprefix(prefix)
    name = name.replace("_checkpoint_wrapped_module.", "")
    name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")
    if ".lora_" in name or "original_module" in name:
        return None
    return name


@contextlib.contextmanager
def merged_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Within the block a PEFT model's adapters are merged into its base weights (no-op for other models)."""
    merge, unmerge = getattr(model, "merge_adapter", None), getattr(model, "unmerge_adapter", None)
    if not (hasattr(model, "peft_config") and callable(merge) and callable(unmerge)):
        yield
        return
    merge()
    try:
        yield
    finally:
        unmerge()


def vllm_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` per parameter, under vLLM's names, one at a time (no copy: detached views).

    ``named_parameters`` yields a tied parameter once (``model.embed_tokens.weight``, not ``lm_head.weight``): vLLM's
    loader skips the alias and wants the canonical name in the same call. Tensors keep the training dtype / device
    (vLLM's weight loaders copy into their own, e.g. float32 -> bfloat16).
    """
    for name, param in model.named_parameters():
        target = vllm_weight_name(name)
        if target is not None:
            yield target, param.detach()


def vllm_load_weights_fn(llm: Any) -> Callable[[Iterable[tuple[str, torch.Tensor]]], Any]:
    """The in-process model's ``load_weights`` of a ``vllm.LLM``, the path TRL's colocate mode uses.

    vLLM V1 (0.8 - 0.33): ``llm.llm_engine.model_executor`` exists only with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
    its ``driver_worker`` is a ``WorkerWrapperBase`` around the ``Worker``, whose ``model_runner.get_model()`` is the
    vLLM model (``load_weights(Iterable[(name, tensor)]) -> set[str]``). The Worker itself has no ``load_weights``,
    so ``LLM.collective_rpc("load_weights", ...)`` cannot work.

    Raises:
        RuntimeError: this vLLM exposes no in-process model.
    """
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # V1: WorkerWrapperBase -> Worker (older: the worker itself)
    runner = getattr(worker, "model_runner", None)
    model = None
    if runner is not None:
        model = runner.get_model() if callable(getattr(runner, "get_model", None)) else getattr(runner, "model", None)
    load = getattr(model, "load_weights", None)
    if not callable(load):
        version = getattr(sys.modules.get("vllm"), "__version__", "?")
        raise RuntimeError(
            f"vLLM {version} exposes no in-process model to load new weights into "
            "(expected LLM.llm_engine.model_executor.driver_worker.model_runner.get_model().load_weights; "
            f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING')!r} must be '0'): "
            "use --engine hf, or a vLLM version with this layout (tested against 0.33)"
        )
    return load


class VLLMRolloutEngine:
    """Sampling with vLLM (``pip install vllm``, CUDA), same interface as :class:`HFRolloutEngine`.

    The engine loads ``model_path`` itself, colocated on the training GPU (``gpu_memory_utilization`` of its memory
    for weights + KV cache) in this process, as TRL's ``vllm_mode="colocate"`` (see :func:`colocate_env`), and
    :meth:`sync_weights` streams the policy's parameters into its model after every optimiser step, then drops the
    prefix cache (KV computed with the old weights). Samples of one prompt share its prefill (``n`` per request,
    prefix caching). Every sampling request carries its own seed, drawn from torch's default generator at
    :meth:`generate` (vLLM seeds the ``n`` samples of request ``i`` with ``s + i·n + j``), so ``torch.manual_seed``
    before :meth:`generate` fixes the samples whatever the engine drew before (a resumed run draws the samples of
    the uninterrupted one, up to GPU non-determinism); they are not bit-identical to HF sampling. The engine is
    built with ``generation_config="vllm"``, and every request passes complete ``SamplingParams``: the model's
    generation config (repetition penalty, ...) never applies, only its EOS ids.

    Args:
        model_path: a Hugging Face folder or Hub id (the policy's initial weights).
        tokenizer: the policy's tokenizer (decoding; its EOS ends completions).
        max_new_tokens, temperature, top_p, top_k: as :class:`HFRolloutEngine` (vLLM: ``temperature`` in (0, 2];
            ``top_k=0``: off).
        seed: vLLM's engine seed (sampling itself is seeded per request, see above).
        max_model_len: longest prompt + completion, in tokens (``None``: the model's context; smaller: smaller KV
            cache reservation).
        gpu_memory_utilization: fraction of the GPU for vLLM (weights + KV cache); the rest is the trainer's.
        dtype: vLLM's weight / compute dtype ("bfloat16", "float32", "auto").
        eos_token_ids: ids that end a completion (default: the tokenizer's EOS); vLLM adds the model's
            generation-config EOS ids itself.
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes.
        llm_kwargs: more ``vllm.LLM`` / ``EngineArgs`` arguments (override the ones above).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        eos_token_ids: Sequence[int] | None = None,
        enable_prefix_caching: bool = True,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 < temperature <= 2:
            raise ValueError(f"temperature must be in (0, 2] for vLLM, got {temperature}")
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got {top_p}, {top_k}")
        vllm = _import_vllm()
        colocate_env()  # before LLM(): vLLM reads its environment lazily
        self.tokenizer = tokenizer
        self.eos = [int(i) for i in eos_token_ids] if eos_token_ids else eos_ids(tokenizer)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.llm = vllm.LLM(**self.llm_args(model_path, seed, max_model_len, gpu_memory_utilization, dtype,
                                            enable_prefix_caching, llm_kwargs))
        vllm_load_weights_fn(self.llm)  # fail now, not after the first optimiser step

    @staticmethod
    def llm_args(
        model_path: str,
        seed: int,
        max_model_len: int | None,
        gpu_memory_utilization: float,
        dtype: str,
        enable_prefix_caching: bool,
        llm_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` for a colocated engine."""
        args: dict[str, Any] = dict(
            model=str(model_path),
            seed=int(seed),
            dtype=dtype,
            gpu_memory_utilization=float(gpu_memory_utilization),
            max_model_len=max_model_len,
            enable_prefix_caching=bool(enable_prefix_caching),
            distributed_executor_backend="external_launcher",  # in-process, torch.distributed from env (TRL)
            max_num_batched_tokens=4096,  # the V1 memory profiler over-reserves with the 32k default (TRL)
            generation_config="vllm",  # vLLM's neutral defaults, not the model's generation_config.json
        )
        args.update(llm_kwargs or {})
        return args

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current parameters into the engine (adapters merged) and reset its prefix cache."""
        load = vllm_load_weights_fn(self.llm)
        with torch.no_grad(), merged_adapters(model):
            load(vllm_named_weights(model))
        self.llm.reset_prefix_cache()

    def sampling_params(self, n: int, greedy: bool, seed: int | None = None) -> Any:
        """``vllm.SamplingParams`` for ``n`` samples per prompt (greedy: ``n`` must be 1, vLLM refuses more);
        vLLM's defaults leave every other logits processor (penalties, ``min_p``, ``min_tokens``, ...) off."""
        from vllm import SamplingParams

        common = dict(n=n, max_tokens=self.max_new_tokens, stop_token_ids=list(self.eos), detokenize=False)
        if greedy:
            return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, **common)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed, **common)

    def request_seeds(self, n_requests: int, n: int) -> list[int]:
        """Seeds of ``n_requests`` requests of ``n`` samples, from torch's default generator: vLLM seeds the
        ``j``-th sample of a request with ``seed + j``, so requests are ``n`` apart (no two samples share a seed)."""
        base = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return [base + i * n for i in range(n_requests)]

    def _samples(self, outputs: Sequence[Any], n: int) -> list[tuple[list[int], bool]]:
        """``(completion ids cut after the first EOS, finished)`` per sample, ``n`` per request, in request order."""
        rows: list[tuple[list[int], bool]] = []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda s: s.index)
            if len(samples) != n:
                raise RuntimeError(f"vLLM returned {len(samples)} completions for a prompt, expected {n}")
            for s in samples:
                if s.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {out.request_id} ended with finish_reason={s.finish_reason!r}")
                ids, found = cut_completion(list(s.token_ids), self.eos)
                rows.append((ids, found or s.finish_reason == "stop"))
        return rows

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, *, greedy: bool = False) -> Rollouts:
        if not _check_generate_args(prompts, n):
            return Rollouts([], [], [], [], [])
        per_request = 1 if greedy else n
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]  # vllm.TokensPrompt
        if greedy:
            params: Any = self.sampling_params(1, True)
        else:
            params = [self.sampling_params(n, False, s) for s in self.request_seeds(len(prompts), n)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        rows = self._samples(outputs, per_request)
        if greedy:  # one greedy continuation per prompt, repeated
            rows = [r for r in rows for _ in range(n)]
        completion_ids = [ids for ids, _ in rows]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        expanded = [list(p) for p in prompts for _ in range(n)]
        index = [i for i in range(len(prompts)) for _ in range(n)]
        return Rollouts(expanded, completion_ids, list(texts), [f for _, f in rows], index)


__all__ = [
    "HFRolloutEngine",
    "PaddedRollouts",
    "RolloutEngine",
    "Rollouts",
    "VLLMRolloutEngine",
    "colocate_env",
    "cut_completion",
    "eos_ids",
    "merged_adapters",
    "own_generation_config",
    "vllm_available",
    "vllm_load_weights_fn",
    "vllm_named_weights",
    "vllm_weight_name",
]
