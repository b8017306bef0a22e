"""VLLMRolloutEngine against a stand-in ``vllm`` module backed by a tiny random Hugging Face model (no GPU here).

The stand-in mirrors vLLM 0.33.0 (wheel ``vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl``, read, not installed):

* ``vllm/entrypoints/llm.py``: ``LLM(model, *, tokenizer, skip_tokenizer_init, dtype, seed, gpu_memory_utilization,
  enforce_eager, ..., **kwargs)`` (kwargs: ``EngineArgs`` fields, unknown ones a ``TypeError``), ``generate(prompts,
  sampling_params=None, *, use_tqdm, lora_request, priority, ...) -> list[RequestOutput]`` in prompt order
  (``sampling_params``: one for all prompts, or a sequence of one per prompt, else a ``ValueError``; ``None``:
  ``get_default_sampling_params()``), ``collective_rpc(method, timeout, args, kwargs)``, ``apply_model``,
  ``reset_prefix_cache(reset_running_requests, reset_connector) -> bool``.
* ``vllm/config/model.py``: ``generation_config="auto"`` (default) makes ``get_diff_sampling_param`` return the
  model's ``generation_config.json`` values of ``repetition_penalty``, ``temperature``, ``top_k``, ``top_p``,
  ``min_p``, ``max_new_tokens`` (-> ``max_tokens``), the defaults of a request without ``SamplingParams``;
  ``"vllm"``: none. Its EOS ids are merged into every request either way.
* ``vllm/config/parallel.py``: ``distributed_executor_backend="external_launcher"`` sets
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; ``vllm/v1/executor/uniproc_executor.py``: ``ExecutorWithExternalLauncher``
  reads ``RANK`` / ``LOCAL_RANK`` (env:// init needs ``MASTER_ADDR`` / ``MASTER_PORT``), ``UniProcExecutor`` has
  ``driver_worker = WorkerWrapperBase(...)`` and runs ``collective_rpc`` through ``run_method``
  (``vllm/v1/serial_utils.py``: an unknown method name is a ``NotImplementedError``).
* ``vllm/v1/engine/llm_engine.py``: ``llm_engine.model_executor`` exists only when
  ``VLLM_ENABLE_V1_MULTIPROCESSING`` is off (otherwise the engine core is another process).
* ``vllm/v1/worker/worker_base.py``: ``WorkerWrapperBase.__getattr__`` forwards to ``.worker``;
  ``vllm/v1/worker/gpu_worker.py``: ``Worker.model_runner`` (no ``load_weights``); ``gpu_model_runner.py``:
  ``get_model()`` unwraps the CUDA-graph wrapper (``vllm/compilation/cuda_graph.py`` forwards attributes).
* ``vllm/model_executor/models/utils.py`` (``AutoWeightsLoader``, used by llama.py / qwen2.py ``load_weights``):
  ``load_weights(Iterable[(name, tensor)]) -> set[str]`` under HF checkpoint names, a tied alias
  (``lm_head.weight``) skipped but its canonical name required in the same call, an unknown name a ``ValueError``.
* ``vllm/sampling_params.py``: field names and defaults, ``temperature`` in [0, 2] (< 1e-5: greedy, which resets
  ``top_p`` / ``top_k`` and refuses ``n > 1``), ``top_k`` 0 or -1 off, ``seed=-1`` -> None, generation-config EOS ids
  merged into ``stop_token_ids`` (``update_from_generation_config``); ``vllm/v1/engine/parallel_sampling.py``: the
  ``j``-th of the ``n`` samples of a seeded request is drawn with its own generator seeded ``seed + j`` (unseeded
  requests share the engine's generator, seeded once by ``LLM(seed=...)``).
* ``vllm/v1/core/sched/utils.py`` ``check_stop``: EOS, then ``stop_token_ids`` (``stop_reason`` the id), then
  ``max_model_len`` / ``max_tokens`` (``"length"``); the stop token stays in ``token_ids``;
  ``vllm/outputs.py``: ``RequestOutput`` / ``CompletionOutput`` fields, ``finish_reason`` ``"stop"`` / ``"length"``;
  ``vllm/v1/engine/input_processor.py``: a prompt of ``max_model_len`` tokens or more is refused.

Prefix caching is real in the stand-in (each prompt's KV is cached and reused), so a weight update without
``reset_prefix_cache`` would leave stale KV behind, as in vLLM.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from gainrl.rollout import (  # noqa: E402
    HFRolloutEngine,
    Rollouts,
    VLLMRolloutEngine,
    eos_ids,
    vllm_available,
    vllm_load_weights_fn,
    vllm_named_weights,
    vllm_weight_name,
)
from tiny_models import chat_tokenizer, tiny_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VLLM_VERSION = "0.33.0"
ENV_KEYS = ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PROMPT_TEXTS = ["What is 2+2?", "Compute 12 * (3 + 4).", "A", "user assistant system reasoning process"]
MAX_NEW = 8

# ------------------------------------------------------------------------------------------------------------------
# the stand-in vllm module
# ------------------------------------------------------------------------------------------------------------------

_SAMPLING_FIELDS: dict[str, Any] = dict(  # vllm/sampling_params.py SamplingParams, public fields and defaults
    n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0, watermarking=None,
    top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None, stop_token_ids=None, ignore_eos=False, max_tokens=16,
    min_tokens=0, logprobs=None, prompt_logprobs=None, prompt_logprob_token_ids=None, prompt_logprob_start=None,
    logprob_token_ids=None, flat_logprobs=False, detokenize=True, skip_special_tokens=True,
    spaces_between_special_tokens=True, include_stop_str_in_output=False, output_kind=None, stream_interval=None,
    skip_clone=False, output_text_buffer_length=0, structured_outputs=None, logit_bias=None, allowed_token_ids=None,
    extra_args=None, bad_words=None, skip_reading_prefix_cache=None, thinking_token_budget=None,
    repetition_detection=None, routed_experts_prompt_start=0, trace_decode_token_ids=None,
)
_ENGINE_ARGS = {  # the vllm/engine/arg_utils.py EngineArgs fields the stand-in accepts as LLM(**kwargs)
    "max_model_len", "enable_prefix_caching", "distributed_executor_backend", "max_num_batched_tokens",
    "max_num_seqs", "enable_sleep_mode", "disable_log_stats", "generation_config", "model_impl", "logprobs_mode",
}


class VLLMValidationError(ValueError):
    """vllm/exceptions.py (a client error)."""


class SamplingParams:
    """vllm/sampling_params.py ``SamplingParams`` (a msgspec Struct: unknown keywords are a TypeError)."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(_SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}")
        for k, v in {**_SAMPLING_FIELDS, **kwargs}.items():
            setattr(self, k, v)
        self._eos_token_id: int | None = None
        self._post_init()

    def _post_init(self) -> None:
        if 0 < self.temperature < 1e-2:
            self.temperature = 1e-2
        if self.seed == -1:
            self.seed = None
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 1e-5:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def update_from_generation_config(self, generation_config: dict[str, Any], eos_token_id: int | None) -> None:
        if not self.ignore_eos:
            self._eos_token_id = eos_token_id
        eos = generation_config.get("eos_token_id")
        if eos is not None:
            eos = {eos} if isinstance(eos, int) else set(eos)
            eos.discard(eos_token_id)
            if eos and not self.ignore_eos:
                self.stop_token_ids = list(eos | set(self.stop_token_ids))


@dataclasses.dataclass
class CompletionOutput:
    """vllm/outputs.py ``CompletionOutput``."""

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: Any
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    """vllm/outputs.py ``RequestOutput``."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool, metrics: Any = None,
                 lora_request: Any = None, encoder_prompt: str | None = None,
                 encoder_prompt_token_ids: list[int] | None = None, num_cached_tokens: int | None = None,
                 **kwargs: Any) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished
        self.num_cached_tokens = num_cached_tokens


class VLLMModel(torch.nn.Module):
    """A vLLM model (models/llama.py ``LlamaForCausalLM``) around its own HF copy, loading weights as
    ``AutoWeightsLoader`` does."""

    def __init__(self, hf: torch.nn.Module, events: list[str]) -> None:
        super().__init__()
        self.hf, self.events = hf, events

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params: dict[str, torch.nn.Parameter] = {}
        aliases: dict[str, str] = {}
        for name, p in self.hf.named_parameters(remove_duplicate=False):
            canonical = next((n for n, q in params.items() if q is p), None)
            if canonical is None:
                params[name] = p
            else:
                aliases[name] = canonical
        loaded: set[str] = set()
        skipped: dict[str, str] = {}
        for name, w in weights:
            if name in aliases:
                skipped[name] = aliases[name]
                continue
            if name not in params:
                raise ValueError(f"There is no module or parameter named {name!r} in {type(self.hf).__name__}")
            if params[name].shape != w.shape:
                raise AssertionError(f"{name}: {tuple(params[name].shape)} vs {tuple(w.shape)}")
            params[name].data.copy_(w)
            loaded.add(name)
        for alias, canonical in skipped.items():
            if canonical not in loaded:
                raise ValueError(f"{alias!r} was skipped because it is tied to {canonical!r}, but {canonical!r} "
                                 "was not found in the checkpoint")
        self.events.append("load_weights")
        return loaded


class CUDAGraphWrapper:
    """vllm/compilation/cuda_graph.py: forwards attributes to the runnable."""

    def __init__(self, runnable: VLLMModel) -> None:
        self.runnable = runnable

    def __getattr__(self, key: str) -> Any:
        return getattr(self.runnable, key)

    def unwrap(self) -> VLLMModel:
        return self.runnable


class GPUModelRunner:
    """vllm/v1/worker/gpu_model_runner.py."""

    def __init__(self, model: VLLMModel) -> None:
        self.model = CUDAGraphWrapper(model)

    def get_model(self) -> VLLMModel:
        return self.model.unwrap()


class Worker:
    """vllm/v1/worker/gpu_worker.py ``Worker``: no ``load_weights``."""

    def __init__(self, model: VLLMModel) -> None:
        self.model_runner = GPUModelRunner(model)

    def get_model(self) -> VLLMModel:
        return self.model_runner.get_model()


class WorkerWrapperBase:
    """vllm/v1/worker/worker_base.py."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.worker, attr)


def run_method(obj: Any, method: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """vllm/v1/serial_utils.py ``run_method``."""
    if isinstance(method, str):
        try:
            func = getattr(obj, method)
        except AttributeError:
            raise NotImplementedError(f"Method {method!r} is not implemented.") from None
        return func(*args, **kwargs)
    return method(obj, *args, **kwargs)


class UniProcExecutor:
    def __init__(self, worker: Worker) -> None:
        self.driver_worker = WorkerWrapperBase(worker)

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return [run_method(self.driver_worker, method, args, kwargs or {})]


class LLMEngine:
    """vllm/v1/engine/llm_engine.py: ``model_executor`` only in-process; the prefix cache lives in the core."""

    def __init__(self, executor: UniProcExecutor, in_process: bool, events: list[str]) -> None:
        self._executor, self.events = executor, events
        if in_process:
            self.model_executor = executor
        self.prefix_cache: dict[tuple[int, ...], Any] = {}

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self._executor.collective_rpc(method, timeout, args, kwargs)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.prefix_cache.clear()
        self.events.append("reset_prefix_cache")
        return True


class LLM:
    """vllm/entrypoints/llm.py ``LLM`` on CPU: the checkpoint at ``model`` in a HF model of its own."""

    instances: list[LLM] = []

    def __init__(self, model: str, *, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 quantization: str | None = None, seed: int = 0, gpu_memory_utilization: float = 0.92,
                 enforce_eager: bool = False, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        unknown = set(kwargs) - _ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            _ = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])  # KeyError when missing
            _ = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.init_args = dict(model=model, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init, dtype=dtype,
                              seed=seed, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        hf.set_attn_implementation("eager")
        self.hf = hf.eval().requires_grad_(False)
        self.tokenizer = None if skip_tokenizer_init else AutoTokenizer.from_pretrained(tokenizer or model)
        self.generation_config = GenerationConfig.from_pretrained(model).to_dict()
        self.max_model_len = kwargs.get("max_model_len") or hf.config.max_position_embeddings
        self.prefix_caching = kwargs.get("enable_prefix_caching") is not False  # V1 default: on
        self.generator = torch.Generator().manual_seed(seed)
        self.events: list[str] = []
        self.generate_calls: list[dict[str, Any]] = []
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        executor = UniProcExecutor(Worker(VLLMModel(self.hf, self.events)))
        self.llm_engine = LLMEngine(executor, in_process, self.events)
        LLM.instances.append(self)

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Any) -> list[Any]:
        return self.llm_engine.collective_rpc("apply_model", args=(func,))

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return self.llm_engine.reset_prefix_cache(reset_running_requests, reset_connector)

    def get_default_sampling_params(self) -> SamplingParams:
        if self.init_args.get("generation_config", "auto") == "vllm":
            return SamplingParams()
        names = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
                 "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}
        diff = {v: self.generation_config[k] for k, v in names.items() if self.generation_config.get(k) is not None}
        return SamplingParams(**diff)

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: Any = True, lora_request: Any = None, priority: Any = None, tokenization_kwargs: Any = None,
                 mm_processor_kwargs: Any = None) -> list[RequestOutput]:
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if isinstance(params, Sequence) and len(params) != len(prompts):
            raise ValueError("The lengths of prompts and params must be the same.")
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        self.generate_calls.append(dict(prompts=prompts, params=params, use_tqdm=use_tqdm))
        return [self._request(str(i), p, q) for i, (p, q) in enumerate(zip(prompts, per_prompt))]

    # -- engine core ------------------------------------------------------------------------------------------

    def _request(self, request_id: str, prompt: Any, params: SamplingParams) -> RequestOutput:
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
            raise TypeError(f"the stand-in takes TokensPrompt dicts only, got {type(prompt).__name__}")
        ids = [int(t) for t in prompt["prompt_token_ids"]]
        if len(ids) >= self.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                                      f"length of {self.max_model_len}.")
        params = copy.deepcopy(params)  # the input processor clones the request's params
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        params.update_from_generation_config(self.generation_config, eos)
        outputs = []
        for index in range(params.n):
            gen = self.generator
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.seed + index)
            tokens, reason, stop_reason = self._decode(ids, params, gen)
            outputs.append(CompletionOutput(index, "", tokens, None, None, finish_reason=reason,
                                            stop_reason=stop_reason))
        return RequestOutput(request_id, None, ids, None, outputs, True)

    @torch.no_grad()
    def _prefill(self, ids: list[int]) -> Any:
        """KV cache of ``ids[:-1]`` (``None`` when empty), from the prefix cache when enabled."""
        key = tuple(ids[:-1])
        if not key:
            return None
        if self.prefix_caching and key in self.llm_engine.prefix_cache:
            return copy.deepcopy(self.llm_engine.prefix_cache[key])
        cache = self.hf(input_ids=torch.tensor([key]), use_cache=True).cache
        if self.prefix_caching:
            self.llm_engine.prefix_cache[key] = copy.deepcopy(cache)
        return cache

    def _pick(self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        if params.temperature < 1e-5:
            return int(logits.argmax())
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > params.top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))

    @torch.no_grad()
    def _decode(self, ids: list[int], params: SamplingParams, gen: torch.Generator) -> tuple[list[int], str, Any]:
        cache, last, out = self._prefill(ids), ids[-1], []
        while True:
            pos = len(ids) + len(out) - 1
            step = self.hf(input_ids=torch.tensor([[last]]), position_ids=torch.tensor([[pos]]), cache=cache,
                           use_cache=True)
            cache, last = step.cache, self._pick(step.logits[0, -1].float(), params, gen)
            out.append(last)
            # v1/core/sched/utils.py check_stop
            if last == params._eos_token_id:
                return out, "stop", None
            if last in params.stop_token_ids:
                return out, "stop", last
            if len(ids) + len(out) >= self.max_model_len or len(out) >= params.max_tokens:
                return out, "length", None


def stand_in_vllm() -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.__version__ = VLLM_VERSION
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    mod.RequestOutput, mod.CompletionOutput = RequestOutput, CompletionOutput
    return mod


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The stand-in as ``vllm``; the colocation environment variables restored afterwards."""
    for key in ENV_KEYS:
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    mod = stand_in_vllm()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    LLM.instances.clear()
    return mod


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in PROMPT_TEXTS]


def hf_greedy(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]]) -> Rollouts:
    return HFRolloutEngine(model, tokenizer, max_new_tokens=MAX_NEW).generate(prompts, 1, greedy=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, prompts) -> Path:
    """A tiny random Llama + tokenizer saved as a HF folder. A token its greedy completions emit is a second EOS in
    its generation config, so that some completions finish early and others run to the budget."""
    model = tiny_lm(seed=0)
    raw = hf_greedy(model, tokenizer, prompts).completion_ids
    candidates = sorted({t for c in raw for t in c[1:-1]} - {tokenizer.eos_token_id, tokenizer.pad_token_id})
    extra = next(t for t in candidates if sum(t in c for c in raw) < len(raw))  # some completions do not emit it
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_policy(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation("eager")
    return model.eval()


def make_engine(path: Path, tokenizer: Any, policy: torch.nn.Module, **kw: Any) -> VLLMRolloutEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("max_model_len", 64)
    kw.setdefault("eos_token_ids", eos_ids(tokenizer, policy))
    return VLLMRolloutEngine(str(path), tokenizer, kw.pop("max_new_tokens", MAX_NEW), **kw)


# ------------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------------


def test_missing_vllm_is_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    assert not vllm_available()
    with pytest.raises(RuntimeError, match="vllm is not installed"):
        VLLMRolloutEngine("some/model", tokenizer)


def test_llm_arguments_and_colocation_env(fake_vllm, checkpoint, tokenizer):
    policy = load_policy(checkpoint)
    engine = make_engine(checkpoint, tokenizer, policy, seed=7, gpu_memory_utilization=0.25, max_model_len=48)
    args = engine.llm.init_args
    assert args["model"] == str(checkpoint) and args["seed"] == 7 and args["dtype"] == "float32"
    assert args["gpu_memory_utilization"] == 0.25 and args["max_model_len"] == 48
    assert args["enable_prefix_caching"] is True
    assert args["distributed_executor_backend"] == "external_launcher"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert int(os.environ["MASTER_PORT"]) > 0
    assert engine.eos == eos_ids(tokenizer, policy) and len(engine.eos) == 2
    with pytest.raises(ValueError, match="temperature"):
        make_engine(checkpoint, tokenizer, policy, temperature=2.5)  # vLLM refuses > 2: fail at construction


def test_greedy_matches_hf(fake_vllm, checkpoint, tokenizer, prompts):
    policy = load_policy(checkpoint)
    engine = make_engine(checkpoint, tokenizer, policy)
    ours = engine.generate(prompts, 3, greedy=True)
    ref = HFRolloutEngine(policy, tokenizer, max_new_tokens=MAX_NEW).generate(prompts, 3, greedy=True)
    assert len(ours) == 3 * len(prompts)
    assert ours.prompt_index == ref.prompt_index == [i for i in range(len(prompts)) for _ in range(3)]
    assert ours.prompt_ids == ref.prompt_ids
    assert ours.completion_ids == ref.completion_ids
    assert ours.completions == ref.completions
    assert ours.finished == ref.finished
    assert any(ours.finished) and not all(ours.finished)  # both EOS cut and budget cut covered
    for ids, done in zip(ours.completion_ids, ours.finished):
        assert (ids[-1] in engine.eos) == done and (done or len(ids) == MAX_NEW)
    params = engine.llm.generate_calls[-1]["params"]  # vLLM refuses n > 1 with greedy: one request, repeated
    assert params.n == 1 and params.temperature == 0.0 and params.top_k == 0 and params.top_p == 1.0
    p = ours.padded(tokenizer.pad_token_id)
    assert p.input_ids.shape == (len(ours), p.prompt_width + p.completion_ids.shape[1])


def test_sampling_parameters_and_layout(fake_vllm, checkpoint, tokenizer, prompts):
    policy = load_policy(checkpoint)
    engine = make_engine(checkpoint, tokenizer, policy, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, seed=3)
    torch.manual_seed(0)
    ro = engine.generate(prompts, 4)
    call = engine.llm.generate_calls[-1]
    assert call["prompts"] == [{"prompt_token_ids": p} for p in prompts] and call["use_tqdm"] is False
    assert len(call["params"]) == len(prompts)  # one SamplingParams per request: each its own seed
    for params in call["params"]:
        assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (4, 0.7, 0.9, 20, 6)
        assert params.stop_token_ids == engine.eos and params.detokenize is False
    seeds = [params.seed for params in call["params"]]
    assert all(b - a == 4 for a, b in zip(seeds, seeds[1:]))  # samples seeded s + j: no seed shared by two samples
    assert len(ro) == 4 * len(prompts) and ro.prompt_index == [i for i in range(len(prompts)) for _ in range(4)]
    assert ro.prompt_ids == [p for p in prompts for _ in range(4)]
    assert ro.completions == tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)
    for ids, done in zip(ro.completion_ids, ro.finished):
        assert 1 <= len(ids) <= 6 and (ids[-1] in engine.eos) == done
        assert all(t not in engine.eos for t in ids[:-1])
    assert len({tuple(c) for c in ro.completion_ids[:4]}) > 1  # samples of one prompt differ
    again = make_engine(checkpoint, tokenizer, policy, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, seed=3)
    torch.manual_seed(0)
    assert again.generate(prompts, 4).completion_ids == ro.completion_ids  # torch's seed fixes the samples
    assert engine.generate([], 4).completion_ids == []
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], 2)


def test_samples_follow_torch_seed_not_the_engine_history(fake_vllm, checkpoint, tokenizer, prompts):
    """A fresh engine (as after --resume) draws, after ``torch.manual_seed(k)``, the samples a long-lived engine
    draws after the same seed, whatever that one sampled before."""
    policy = load_policy(checkpoint)
    long_lived = make_engine(checkpoint, tokenizer, policy, seed=5)
    torch.manual_seed(1)
    first = long_lived.generate(prompts, 3).completion_ids
    torch.manual_seed(2)
    second = long_lived.generate(prompts, 3).completion_ids
    assert first != second
    fresh = make_engine(checkpoint, tokenizer, policy, seed=5)
    torch.manual_seed(2)
    assert fresh.generate(prompts, 3).completion_ids == second


def test_the_model_generation_config_does_not_reach_sampling(fake_vllm, tmp_path, tokenizer, prompts):
    """vLLM's request defaults would come from the model's generation_config.json: the engine turns that off and
    passes complete SamplingParams (penalties and the like at vLLM's neutral defaults)."""
    model = tiny_lm(seed=0)
    gc = model.generation_config
    gc.do_sample, gc.repetition_penalty, gc.top_k, gc.top_p, gc.temperature, gc.min_p = True, 1.3, 5, 0.5, 0.2, 0.1
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    engine = make_engine(tmp_path / "m", tokenizer, model)
    assert engine.llm.init_args["generation_config"] == "vllm"
    assert engine.llm.get_default_sampling_params().repetition_penalty == 1.0
    auto = make_engine(tmp_path / "m", tokenizer, model, llm_kwargs={"generation_config": "auto"})
    assert auto.llm.get_default_sampling_params().repetition_penalty == 1.3  # what "vllm" switches off
    engine.generate(prompts, 2)
    engine.generate(prompts, 1, greedy=True)
    sampled, greedy = engine.llm.generate_calls
    neutral = {k: _SAMPLING_FIELDS[k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p",
                                               "min_tokens", "bad_words", "logit_bias", "allowed_token_ids")}
    for params in [*sampled["params"], greedy["params"]]:
        assert {k: getattr(params, k) for k in neutral} == neutral
    assert (sampled["params"][0].temperature, sampled["params"][0].top_k, sampled["params"][0].top_p) == (1.0, 0, 1.0)


def test_sync_weights_makes_the_engine_sample_the_new_policy(fake_vllm, checkpoint, tokenizer, prompts):
    policy = load_policy(checkpoint)
    engine = make_engine(checkpoint, tokenizer, policy)
    before = engine.generate(prompts, 1, greedy=True).completion_ids  # fills the prefix cache
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if name.startswith(("lm_head", "model.layers.0.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    new_ref = hf_greedy(policy, tokenizer, prompts)
    assert new_ref.completion_ids != before  # the change matters
    assert engine.generate(prompts, 1, greedy=True).completion_ids == before  # not synced yet
    engine.llm.events.clear()
    engine.sync_weights(policy)
    assert engine.llm.events == ["load_weights", "reset_prefix_cache"]  # stale prefix KV otherwise
    after = engine.generate(prompts, 1, greedy=True)
    assert after.completion_ids == new_ref.completion_ids and after.finished == new_ref.finished
    vllm_params = dict(engine.llm.hf.named_parameters())
    for name, p in policy.named_parameters():
        torch.testing.assert_close(vllm_params[name], p, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="load_weights"):  # why collective_rpc("load_weights") is wrong
        engine.llm.collective_rpc("load_weights", args=([],))


def test_no_in_process_model_is_a_clear_error(fake_vllm, monkeypatch, checkpoint, tokenizer):
    policy = load_policy(checkpoint)
    engine = make_engine(checkpoint, tokenizer, policy)
    del engine.llm.llm_engine.model_executor  # as with VLLM_ENABLE_V1_MULTIPROCESSING=1 (engine core elsewhere)
    with pytest.raises(RuntimeError, match=f"vLLM {VLLM_VERSION} exposes no in-process model"):
        engine.sync_weights(policy)
    original = LLMEngine.__init__

    def multiprocess(self, executor, in_process, events):
        original(self, executor, False, events)

    monkeypatch.setattr(LLMEngine, "__init__", multiprocess)
    with pytest.raises(RuntimeError, match="no in-process model"):  # refused at construction
        make_engine(checkpoint, tokenizer, policy)


def test_weight_names_tied_and_peft(fake_vllm, tmp_path, tokenizer, prompts):
    import transformers

    assert vllm_weight_name("_orig_mod.model.norm.weight") == "model.norm.weight"
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    # tied embeddings: lm_head.weight is not sent (vLLM skips the alias and wants the canonical name)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(cfg).eval()
    tied.set_attn_implementation("eager")
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    names = [n for n, _ in vllm_named_weights(tied)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    engine = make_engine(tmp_path / "tied", tokenizer, tied)
    with torch.no_grad():
        tied.model.embed_tokens.weight.add_(torch.randn_like(tied.model.embed_tokens.weight))
    engine.sync_weights(tied)
    assert engine.llm.hf.lm_head.weight.data_ptr() == engine.llm.hf.model.embed_tokens.weight.data_ptr()
    assert engine.generate(prompts, 1, greedy=True).completion_ids == hf_greedy(tied, tokenizer, prompts).completion_ids
    with pytest.raises(ValueError, match="tied"):  # the stand-in is as strict as AutoWeightsLoader
        vllm_load_weights_fn(engine.llm)([("lm_head.weight", tied.lm_head.weight.detach())])
    # PEFT: the adapters are merged for the copy, under the base model's names, and unmerged afterwards
    peft = pytest.importorskip("peft")
    base = tiny_lm(seed=0, layers=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    engine = make_engine(tmp_path / "base", tokenizer, base)
    engine.sync_weights(lora)
    assert not any(getattr(m, "merged", False) for m in lora.modules())
    merged = copy.deepcopy(lora).merge_and_unload()
    vllm_params = dict(engine.llm.hf.named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(vllm_params[name], p, rtol=1e-6, atol=1e-6)


def test_trainer_builds_the_vllm_engine(fake_vllm, checkpoint, tokenizer, tmp_path):
    from gainrl.config import build_config
    from gainrl.trainer import Trainer

    cfg = build_config({}, dict(
        out=str(tmp_path / "run"), model=str(checkpoint), engine="vllm", synthetic_size=40, eval_size=4,
        eval_max_new_tokens=4, prompts_per_epoch=4, batch_prompts=2, group_size=3, max_new_tokens=6,
        micro_batch_size=6, max_prompt_len=200, max_steps=1, progress=False, threads=1, beta=0.0,
        temperature=0.8, top_p=0.95, top_k=30, seed=5,
    ))
    policy = load_policy(checkpoint)
    trainer = Trainer(cfg, model=policy, tokenizer=tokenizer)
    trainer._setup()
    engine = trainer.engine
    assert isinstance(engine, VLLMRolloutEngine)
    assert engine.llm.init_args == dict(
        model=str(checkpoint), tokenizer=None, skip_tokenizer_init=False, dtype="float32", seed=5,
        gpu_memory_utilization=0.3, max_model_len=206, enable_prefix_caching=True,
        distributed_executor_backend="external_launcher", max_num_batched_tokens=4096, generation_config="vllm",
    )
    assert (engine.max_new_tokens, engine.temperature, engine.top_p, engine.top_k) == (6, 0.8, 0.95, 30)
    assert engine.eos == eos_ids(tokenizer, policy)
    assert isinstance(trainer.eval_engine, HFRolloutEngine)


def test_trainer_step_with_the_vllm_engine(fake_vllm, checkpoint, tokenizer, tmp_path):
    """One optimiser step: rollouts come from the engine, and its weights follow the policy afterwards."""
    from gainrl.config import build_config
    from gainrl.rewards import REWARDS, register_reward
    from gainrl.trainer import Trainer, read_jsonl

    if "vllm_test_varied" not in REWARDS:  # varies between random completions: non-zero advantages

        @register_reward("vllm_test_varied")
        def varied(completions: list[str], answers: list[str]) -> list[float]:
            return [(len(c) % 5) / 4 for c in completions]

    cfg = build_config({}, dict(rewards={"accuracy": 1.0, "vllm_test_varied": 1.0},
        out=str(tmp_path / "run"), model=str(checkpoint), engine="vllm", synthetic_size=40, eval_size=4,
        eval_max_new_tokens=4, prompts_per_epoch=4, batch_prompts=2, group_size=3, max_new_tokens=6,
        micro_batch_size=6, max_prompt_len=200, max_steps=1, progress=False, threads=1, beta=0.0, lr=1e-2,
    ))
    policy = load_policy(checkpoint)
    trainer = Trainer(cfg, model=policy, tokenizer=tokenizer)
    trainer.train()
    llm = trainer.engine.llm
    assert [[p.n for p in c["params"]] for c in llm.generate_calls] == [[3, 3]]
    assert llm.events[-2:] == ["load_weights", "reset_prefix_cache"]
    vllm_params = dict(llm.hf.named_parameters())
    for name, p in policy.named_parameters():
        torch.testing.assert_close(vllm_params[name], p.detach(), rtol=0, atol=0)
    initial = dict(load_policy(checkpoint).named_parameters())
    assert any(not torch.equal(initial[n], p) for n, p in policy.named_parameters())  # the step moved the policy
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_resume_with_the_vllm_engine_continues_the_sample_stream(fake_vllm, checkpoint, tokenizer, tmp_path):
    """Interrupted after step 1 and resumed (a fresh vLLM engine), the run draws the samples of the uninterrupted
    one at step 2."""
    from gainrl.config import apply_resume_overrides, build_config, load_run_config
    from gainrl.rewards import REWARDS, register_reward
    from gainrl.trainer import Trainer, read_jsonl

    if "vllm_test_varied" not in REWARDS:

        @register_reward("vllm_test_varied")
        def varied(completions: list[str], answers: list[str]) -> list[float]:
            return [(len(c) % 5) / 4 for c in completions]

    def cfg(out: Path) -> Any:
        return build_config({}, dict(rewards={"accuracy": 1.0, "vllm_test_varied": 1.0},
            out=str(out), model=str(checkpoint), engine="vllm", synthetic_size=20, eval_size=0, order_by="index",
            prompts_per_epoch=4, batch_prompts=2, group_size=3, max_new_tokens=6, micro_batch_size=6,
            max_prompt_len=200, max_steps=2, save_every=1, progress=False, threads=1, beta=0.0, lr=1e-2, seed=5,
        ))

    class Interrupt(Exception):
        pass

    def stop_after_first(trainer: Any, row: Any) -> None:
        if trainer.step == 1:
            raise Interrupt

    def samples(trainer: Any) -> list[list[int]]:
        return trainer.last_rollouts.completion_ids

    straight = Trainer(cfg(tmp_path / "a"), model=load_policy(checkpoint), tokenizer=tokenizer)
    straight.train()
    with pytest.raises(Interrupt):
        Trainer(cfg(tmp_path / "b"), model=load_policy(checkpoint), tokenizer=tokenizer,
                callbacks=[stop_after_first]).train()
    resumed = Trainer(apply_resume_overrides(load_run_config(tmp_path / "b"), {}), model=load_policy(checkpoint),
                      tokenizer=tokenizer, resume=tmp_path / "b")
    resumed.train()
    assert samples(resumed) == samples(straight)
    timing = {"tokens_per_s", "gen_s", "step_s", "time"}
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(d / "metrics.jsonl")]
            for d in (tmp_path / "a", tmp_path / "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 2
