"""`gainrl train`: GRPO with GAIN-RL angle-guided data sampling (DESIGN.md §2), end to end.

The loop (issue 5):

1. load the data (same loaders as `gainrl score`; or the synthetic arithmetic set), hold out an evaluation split,
   render every prompt with its P / Q segment offsets, skip (and count) prompts over ``max_prompt_len``;
2. rank the training prompts: ``--scores DIR`` (``order.pt`` of `gainrl score`, checked against the data), or
   score them on the fly with the policy (early-exit angle probe, the functions of :mod:`gainrl.score`), or by
   length / index for the fixed-order baseline;
3. each epoch the sampler draws ``m`` ranks (GAIN-RL: Gaussian around ``μ``; or uniform / ordered), cut into
   batches of ``b`` prompts, each sampled ``G`` times (:mod:`gainrl.rollout`);
4. rewards (:mod:`gainrl.rewards`), group-normalised advantages and the clipped GRPO loss (:mod:`gainrl.grpo`),
   gradient accumulation over micro-batches, grad-norm clipping, AdamW;
5. the angle signal ``C_causal`` of every rollout (prompt + response, segments P, Q, R) comes from an
   :class:`~gainrl_kernels.probe.AngleProbe` on the policy's own log-prob forward: no extra pass, no host sync per
   sample (one transfer per step, with the other step metrics);
6. after each epoch ``μ`` is updated with that epoch's accuracy in [0, 1] and mean ``C_causal``; the next epoch
   samples with the new ``μ``;
7. greedy evaluation on the held-out split, atomic checkpoints, ``metrics.jsonl`` and plots.

Resuming (``--resume RUN``) restores weights, optimiser, sampler, epoch progress and RNG states from the latest
checkpoint, truncates the logs to it and continues exactly: rollouts are seeded per step (``torch.manual_seed``
before each step's rollouts; the vLLM engine draws its per-request seeds from that generator), so the resumed run
draws the same samples and follows the same ``μ`` trajectory (bit-identical on CPU; with vLLM up to GPU
non-determinism).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text, capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, save_config
from .data import Example
from .grpo import group_advantages, policy_loss, token_logprobs
from .jsonl import read_jsonl

logger = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "epoch", "mu", "accuracy", "angle", "loss", "reward", "kl", "lr", "tokens_per_s")
#: Splits of a multi-split ``--eval-data`` dataset tried in order without ``--eval-split`` (then its only split).
EVAL_SPLITS = ("test", "validation")


class TrainDataError(ValueError):
    """The data, the order file or the prompts do not allow training (the message says why)."""


@dataclass
class TrainItem:
    """One rendered training / evaluation prompt."""

    example: Example
    input_ids: list[int]
    seg_offsets: list[int]  # [0, q_start, q_end]
    text: str

    @property
    def index(self) -> int:
        return self.example.index

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class DataBundle:
    """Training items in rank order, evaluation items, and what was skipped."""

    ranked: list[TrainItem]
    eval_items: list[TrainItem]
    report: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[gainrl train] {msg}", file=sys.stderr, flush=True)


def auto_threads() -> int:
    """CPU threads for this run: the cores not already busy (1-minute load average) -- on a shared machine,
    OpenMP threads waiting on a busy core make small matmuls (decoding) an order of magnitude slower."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    return max(1, min(cores, torch.get_num_threads(), cores - int(round(load))))


def lr_at(cfg: TrainConfig, update: int, total_updates: int) -> float:
    """Learning rate of the ``update``-th optimiser update (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps and update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, total_updates - cfg.warmup_steps)
        progress = min(1.0, (update - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def resolve_reward_fn(name: str) -> Callable[[Sequence[str], Sequence[Any]], list[float]]:
    """A registered reward name (:mod:`gainrl.rewards`) or ``module:function``."""
    from .rewards import get_reward

    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"rewards: cannot import {name!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"rewards: {name!r} is not callable")
        return fn
    return get_reward(name)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows of ``path`` with ``step <= max_step`` (atomic rewrite)."""
    if not path.exists():
        return
    rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _hash_indices(indices: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prompt_config_of(cfg: TrainConfig) -> Any:
    """The :class:`~gainrl.prompts.PromptConfig` of a run (preset + overrides)."""
    from .prompts import PromptConfig

    spec: dict[str, Any] = {"preset": cfg.prompt}
    if cfg.system_prompt is not None:
        spec["system_prompt"] = cfg.system_prompt or None
    if cfg.few_shot is not None:
        spec["few_shot"] = [tuple(t) for t in cfg.few_shot]
    try:
        return PromptConfig.from_dict(spec)
    except ValueError as e:
        raise ValueError(f"prompt: {e}") from e


def load_train_examples(cfg: TrainConfig) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """``(train_examples, eval_examples, report)`` before rendering."""
    from .data import load_examples
    from .synthetic import make_arithmetic_dataset

    report: dict[str, Any] = {}
    if cfg.data is None:
        examples = make_arithmetic_dataset(cfg.synthetic_size, seed=cfg.data_seed, levels=cfg.synthetic_levels)
        report["data"] = f"synthetic arithmetic (n={cfg.synthetic_size}, levels={cfg.synthetic_levels}, seed={cfg.data_seed})"
        report["rows_skipped"] = {}
    else:
        examples, load_report = load_examples(
            cfg.data, fmt=cfg.data_format, split=cfg.split, require_answers=True, limit=cfg.limit
        )
        report["data"] = load_report.summary()
        report["rows_skipped"] = load_report.reasons()
        if load_report.skipped:
            _say(load_report.summary())
        if not examples:
            raise TrainDataError(f"--data {cfg.data}: no usable example ({load_report.summary()})")
    if cfg.eval_data is not None:
        try:  # a multi-split dataset is evaluated on its held-out split, never silently on "train"
            eval_examples, eval_report = load_examples(cfg.eval_data, fmt=cfg.data_format, split=cfg.eval_split,
                                                       require_answers=True, default_splits=EVAL_SPLITS)
        except ValueError as e:
            hint = " (choose one with --eval-split)" if "split" in str(e) else ""
            raise TrainDataError(f"--eval-data: {e}{hint}") from e
        report["eval_data"] = eval_report.summary()
        eval_examples = eval_examples[: cfg.eval_size] if cfg.eval_size else []
        train = examples
    else:
        # held out by question text: a question repeated in the data (e.g. a synthetic set larger than its
        # distinct questions) is either all in training or once in the eval set, never both
        rows_of: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            rows_of.setdefault(ex.question, []).append(i)
        questions = list(rows_of)
        n_eval = min(cfg.eval_size, len(questions) // 2)
        random.Random(cfg.data_seed).shuffle(questions)
        held = set(questions[:n_eval])
        eval_examples = sorted((examples[rows_of[q][0]] for q in held), key=lambda ex: ex.index)
        train = [ex for ex in examples if ex.question not in held]
        report["eval_data"] = f"{n_eval} questions held out of the training data (seed {cfg.data_seed})"
    return train, eval_examples, report


def render_items(
    tokenizer: Any, examples: Sequence[Example], cfg: TrainConfig, what: str
) -> tuple[list[TrainItem], dict[str, int]]:
    """Render prompts; skip (and count) render failures and prompts over ``max_prompt_len``."""
    from .prompts import render_prompt

    pcfg = prompt_config_of(cfg)
    items: list[TrainItem] = []
    skipped = {"prompt_too_long": 0, "render_failed": 0}
    for ex in examples:
        try:
            r = render_prompt(tokenizer, ex.question, pcfg)
        except ValueError as e:
            skipped["render_failed"] += 1
            logger.info("%s row %d: cannot render the prompt: %s", what, ex.index, e)
            continue
        if r.n_tokens > cfg.max_prompt_len:
            skipped["prompt_too_long"] += 1
            continue
        items.append(TrainItem(ex, list(r.input_ids), list(r.seg_offsets), r.text))
    if skipped["prompt_too_long"]:
        _say(f"{what}: skipped {skipped['prompt_too_long']} prompt(s) longer than max_prompt_len={cfg.max_prompt_len} tokens")
    if skipped["render_failed"]:
        _say(f"{what}: skipped {skipped['render_failed']} prompt(s) that could not be rendered")
    return items, skipped


def read_order_file(scores_dir: str | os.PathLike) -> list[int]:
    """Dataset indices of ``DIR/order.pt`` (``gainrl score`` output), validated."""
    d = Path(scores_dir)
    path = d / "order.pt" if d.is_dir() or not str(d).endswith(".pt") else d
    if not path.is_file():
        raise TrainDataError(f"--scores: {path} not found (write it with `gainrl score --data DATA --out {scores_dir}`)")
    try:
        order = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise TrainDataError(f"--scores: cannot read {path}: {e}") from e
    if isinstance(order, (list, tuple)):
        order = torch.tensor(order)
    if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype.is_floating_point:
        raise TrainDataError(f"--scores: {path} must hold a 1-D integer tensor of dataset indices")
    values = [int(v) for v in order.tolist()]
    if len(set(values)) != len(values):
        raise TrainDataError(f"--scores: {path} lists some dataset indices more than once")
    return values


def check_order_matches(order: Sequence[int], scores_dir: str | os.PathLike, items: Sequence[TrainItem],
                        all_indices: set[int], data_name: str) -> list[TrainItem]:
    """The training items in ``order`` (descending score), after checking that the order belongs to the data.

    Errors: an index of ``order`` that is no row of the data; ``scores.jsonl`` prompts that do not contain the
    question of the same row; more than half of the training items unranked. Training items missing from the
    order (rows that `gainrl score` skipped) are left out and reported.
    """
    strays = [i for i in order if i not in all_indices]
    if strays:
        raise TrainDataError(
            f"--scores: the order file does not match the data: {len(strays)} of its {len(order)} indices are not "
            f"rows of {data_name} (e.g. {strays[:5]}); was it scored on another data set or with another --limit?"
        )
    by_index = {it.index: it for it in items}
    scores_jsonl = Path(scores_dir) / "scores.jsonl" if Path(scores_dir).is_dir() else None
    if scores_jsonl is not None and scores_jsonl.is_file():
        mismatched = []
        for row in read_jsonl(scores_jsonl):
            it = by_index.get(int(row.get("index", -1)))
            text = row.get("prompt_text")
            if it is not None and isinstance(text, str) and it.example.question.strip() not in text:
                mismatched.append(it.index)
        if mismatched:
            raise TrainDataError(
                f"--scores: the order file does not match the data: the scored prompts of {len(mismatched)} rows "
                f"(e.g. {mismatched[:5]}) do not contain the questions of those rows of {data_name}"
            )
    ranked = [by_index[i] for i in order if i in by_index]
    unranked = len(items) - len(ranked)
    if unranked * 2 > len(items):
        raise TrainDataError(
            f"--scores: the order file does not match the data: it ranks {len(ranked)} of the {len(items)} training "
            f"examples of {data_name} (scored with --limit, or another data set?)"
        )
    if unranked:
        _say(f"--scores: {unranked} training example(s) have no score in the order file and are left out")
    return ranked


def score_on_the_fly(model: Any, tokenizer: Any, items: Sequence[TrainItem], cfg: TrainConfig,
                     device: torch.device, out_dir: Path, autocast: Any) -> list[int]:
    """Score the training prompts with the policy (early-exit probe, :mod:`gainrl.score`'s batching) and write
    ``out_dir/scores.jsonl`` + ``order.pt``; returns dataset indices by descending score."""
    from gainrl_kernels.probe import AngleProbe

    from .score import Item, default_batch_tokens, descending_order, plan_batches, score_batch

    from tqdm.auto import tqdm

    sitems = [Item(it.index, it.input_ids, it.seg_offsets[:3], it.text) for it in items]
    plan = plan_batches([s.n_tokens for s in sitems], default_batch_tokens(device.type), 256)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows: list[list[Any]] = []
    with AngleProbe(model, layer=cfg.probe_layer, early_exit=True, backend=cfg.angle_backend,
                    fused=cfg.angle_fused) as probe, autocast, \
            tqdm(total=len(sitems), unit="prompt", desc="score", disable=not cfg.progress, file=sys.stderr,
                 dynamic_ncols=True) as bar:
        for batch in plan:
            rows += score_batch(probe, [sitems[i] for i in batch], pad_id, device, cfg.inter_weight)
            bar.update(len(batch))
    order = descending_order([r[0] for r in rows], [r[1] for r in rows])
    out_dir.mkdir(parents=True, exist_ok=True)
    by_index = {r[0]: r for r in rows}
    lines = []
    for s in sorted(sitems, key=lambda s: s.index):
        _, score, intra, inter = by_index[s.index]
        lines.append(json.dumps({"index": s.index, "score": score, "c_intra": intra, "c_inter": inter,
                                 "n_tokens": s.n_tokens, "seg_offsets": s.seg_offsets, "prompt_text": s.prompt_text},
                                ensure_ascii=False, allow_nan=False))
    atomic_write_text(out_dir / "scores.jsonl", "\n".join(lines) + "\n")
    tmp = out_dir / ".order.pt.tmp"
    torch.save(torch.tensor(order, dtype=torch.int64), tmp)
    os.replace(tmp, out_dir / "order.pt")
    return order


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


class Trainer:
    """One `gainrl train` run.

    Args:
        cfg: the resolved configuration.
        model, tokenizer: an already loaded policy and tokenizer (tests); default: loaded from ``cfg.model``.
        resume: a run folder to continue (its ``config.yaml`` must be ``cfg``).
        callbacks: called as ``fn(trainer, metrics_row)`` after every step (after its checkpoint).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        resume: str | os.PathLike | None = None,
        callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),
    ) -> None:
        self.cfg = cfg.validate()
        self.callbacks = list(callbacks)
        self._model_arg, self._tokenizer_arg = model, tokenizer
        self.resume_dir = Path(resume) if resume is not None else None
        out = cfg.out or (str(self.resume_dir) if self.resume_dir else f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = Path(out)
        self.step = 0
        self.epoch = 0
        self.epoch_ranks: list[int] | None = None
        self.epoch_pos = 0
        self.epoch_acc = [0.0, 0]  # sum of correctness, rollouts
        self.epoch_ang = [0.0, 0]  # sum of finite C_causal, count
        self.epoch_prompts: list[dict[str, Any]] = []
        self.epoch_mu: float | None = None
        self.elapsed = 0.0
        self.last_eval: float | None = None
        self.first_eval: float | None = None

    # -- setup ------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from .models import load_model_and_tokenizer, model_name, resolve_device
        from .rollout import HFRolloutEngine, VLLMRolloutEngine, eos_ids
        from .sampler import GaussianRankSampler, MuUpdateConfig, OrderedSampler, UniformSampler

        cfg = self.cfg
        if self.resume_dir is None and not cfg.overwrite and (
            (self.out / "metrics.jsonl").is_file() or latest_checkpoint(self.out) is not None
        ):
            raise ValueError(
                f"--out {self.out} already holds a training run: continue it with --resume {self.out}, start afresh "
                "with --overwrite, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device) if self._model_arg is None else next(self._model_arg.parameters()).device
        info_path = self.out / "run_info.json"
        prev_info = json.loads(info_path.read_text()) if self.resume_dir and info_path.is_file() else {}
        if self.device.type == "cpu":
            self.threads = cfg.threads or prev_info.get("threads") or auto_threads()
            torch.set_num_threads(int(self.threads))
        else:
            self.threads = None
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        # model
        t0 = time.perf_counter()
        if self._model_arg is not None:
            model, tokenizer = self._model_arg, self._tokenizer_arg
            if tokenizer is None:
                raise ValueError("a model passed to Trainer needs its tokenizer too")
        else:
            kwargs: dict[str, Any] = {}
            attn = cfg.attn_implementation
            if attn is None and self.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
                attn = "flash_attention_2"
            if attn:
                kwargs["attn_implementation"] = attn
            model, tokenizer = load_model_and_tokenizer(cfg.model, torch.float32, self.device, **kwargs)
        self.model_load_s = time.perf_counter() - t0
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model, tokenizer
        from gainrl_kernels.probe import find_decoder_layers

        try:
            self.layers = find_decoder_layers(model)
        except ValueError as e:
            raise ValueError(f"--model {cfg.model or 'embedded'}: {e}") from e
        if not -len(self.layers) <= cfg.probe_layer < len(self.layers):
            raise ValueError(f"probe_layer: {cfg.probe_layer} outside the model's {len(self.layers)} decoder layers")
        self.fused_norms: list[str] = []
        if cfg.fused_norms:  # before scoring and the reference copy: both run the patched norms too
            from gainrl_kernels.patching import apply_fused_rmsnorms

            try:
                self.fused_norms = apply_fused_rmsnorms(model)
            except ValueError as e:
                raise ValueError(f"fused_norms: {e}") from None
            if not self.fused_norms:
                raise ValueError("fused_norms: the model has no HF LlamaRMSNorm-style norm to replace")

        # data
        self.bundle = self._prepare_data()
        n_items = len(self.bundle.ranked)
        if cfg.prompts_per_epoch > n_items:
            raise TrainDataError(
                f"prompts_per_epoch={cfg.prompts_per_epoch} exceeds the {n_items} usable training prompts"
            )

        # sampler
        kind = cfg.sampler
        if kind == "gainrl":
            mu_cfg = MuUpdateConfig(cfg.mu_n, cfg.mu_alpha, cfg.mu_beta, cfg.mu_adj_min, cfg.mu_adj_max)
            self.sampler = GaussianRankSampler(n_items, cfg.prompts_per_epoch, sigma=cfg.sigma,
                                               mu0=min(cfg.mu0, n_items - 1), seed=cfg.seed, shuffle=cfg.shuffle,
                                               mu_cfg=mu_cfg)
        elif kind == "uniform":
            self.sampler = UniformSampler(n_items, cfg.prompts_per_epoch, seed=cfg.seed, shuffle=cfg.shuffle)
        else:
            self.sampler = OrderedSampler(n_items, cfg.prompts_per_epoch, seed=cfg.seed, shuffle=cfg.shuffle)
        self.steps_per_epoch = math.ceil(cfg.prompts_per_epoch / cfg.batch_prompts)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch

        # trainable weights, reference, optimiser
        model.train()
        if cfg.train_layers is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            train_mods = list(self.layers[len(self.layers) - cfg.train_layers:]) if cfg.train_layers else []
            norm = getattr(getattr(model, "model", None), "norm", None)
            if norm is not None and cfg.train_layers:
                train_mods.append(norm)
            for mod in train_mods:
                for p in mod.parameters():
                    p.requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("train_layers=0 leaves nothing to train")
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else self.device.type == "cuda"
        if gc:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        self.gradient_checkpointing = bool(gc)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}),
        )

        # rollout engines
        share = cfg.share_prefix if cfg.share_prefix is not None else self.device.type == "cpu"
        if cfg.engine == "vllm":
            if cfg.model is None or str(cfg.model).endswith(".gguf"):
                raise ValueError("engine=vllm needs --model as a Hugging Face folder or Hub id")
            self.engine = VLLMRolloutEngine(
                str(cfg.model), tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, seed=cfg.seed,
                max_model_len=cfg.max_prompt_len + cfg.max_new_tokens,
                dtype="bfloat16" if self.autocast_dtype == torch.bfloat16 else "float32",
                eos_token_ids=eos_ids(tokenizer, model),
            )
        else:
            self.engine = HFRolloutEngine(model, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                          batch_size=cfg.gen_batch_size, autocast_dtype=self.autocast_dtype,
                                          share_prefix=share)
        self.eval_engine = HFRolloutEngine(model, tokenizer, cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                           autocast_dtype=self.autocast_dtype)
        self.pad_id = int(tokenizer.pad_token_id)
        self.reward_fns = {name: (resolve_reward_fn(name), float(w)) for name, w in cfg.rewards.items()}

        # the probe on the policy's training forward (created after the reference copy: hooks are not copied)
        from gainrl_kernels.probe import AngleProbe

        self.probe = AngleProbe(model, layer=cfg.probe_layer, backend=cfg.angle_backend, fused=cfg.angle_fused)
        self.info = {
            "model": model_name(cfg.model) if self._model_arg is None else type(model).__name__,
            "device": str(self.device),
            "threads": self.threads,
            "precision": "bf16-autocast" if self.autocast_dtype else "fp32",
            "gradient_checkpointing": self.gradient_checkpointing,
            "fused_norms": len(self.fused_norms),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "trainable_params": sum(p.numel() for p in self.params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "n_train": n_items,
            "n_eval": len(self.bundle.eval_items),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "order_hash": _hash_indices([it.index for it in self.bundle.ranked]),
            **self.bundle.report,
        }

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare_data(self) -> DataBundle:
        cfg = self.cfg
        train_ex, eval_ex, report = load_train_examples(cfg)
        all_indices = {ex.index for ex in train_ex}  # rows an order file may rank (held-out rows included)
        if cfg.eval_data is None:
            all_indices |= {ex.index for ex in eval_ex}
        items, skipped = render_items(self.tokenizer, train_ex, cfg, "train")
        eval_items, eval_skipped = render_items(self.tokenizer, eval_ex, cfg, "eval")
        report["prompts_skipped"] = skipped
        report["eval_prompts_skipped"] = eval_skipped
        if not items:
            raise TrainDataError("no training prompt left after skipping (see the counts above)")
        data_name = cfg.data or "the synthetic set"
        scores_dir = self.out / "scores"
        if cfg.order_by == "score" and cfg.sampler != "uniform":
            if cfg.scores is not None:
                order = read_order_file(cfg.scores)
                ranked = check_order_matches(order, cfg.scores, items, all_indices, data_name)
                report["order"] = f"scores from {cfg.scores}"
            elif (scores_dir / "order.pt").is_file() and self.resume_dir is not None:
                ranked = check_order_matches(read_order_file(scores_dir), scores_dir, items, all_indices, data_name)
                report["order"] = f"scores computed on the fly ({scores_dir})"
            else:
                _say(f"scoring {len(items)} training prompts with the policy (no --scores given) ...")
                t0 = time.perf_counter()
                order = score_on_the_fly(self.model, self.tokenizer, items, cfg, self.device, scores_dir,
                                         self._autocast())
                by_index = {it.index: it for it in items}
                ranked = [by_index[i] for i in order]
                report["order"] = f"scores computed on the fly ({scores_dir})"
                report["score_s"] = round(time.perf_counter() - t0, 2)
        elif cfg.order_by == "length":
            ranked = sorted(items, key=lambda it: (it.n_tokens, it.index))
            report["order"] = "by prompt length (ascending)"
        else:
            ranked = sorted(items, key=lambda it: it.index)
            report["order"] = "by data index"
        return DataBundle(ranked, eval_items, report)

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_ranks": self.epoch_ranks,
            "epoch_pos": self.epoch_pos,
            "epoch_acc": self.epoch_acc,
            "epoch_ang": self.epoch_ang,
            "epoch_prompts": self.epoch_prompts,
            "epoch_mu": self.epoch_mu,
            "sampler": self.sampler.state_dict(),
            "elapsed": self.elapsed,
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
            "order_hash": self.info["order_hash"],
            "n_items": len(self.bundle.ranked),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("order_hash") != self.info["order_hash"]:
            raise TrainDataError(
                "--resume: the training data or its order differ from the run's (order hash "
                f"{state.get('order_hash')} vs {self.info['order_hash']}); resume with the same data and scores"
            )
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.epoch_ranks = state["epoch_ranks"]
        self.epoch_pos = int(state["epoch_pos"])
        self.epoch_acc = list(state["epoch_acc"])
        self.epoch_ang = list(state["epoch_ang"])
        self.epoch_prompts = list(state.get("epoch_prompts", []))
        self.epoch_mu = state.get("epoch_mu")
        self.sampler.load_state_dict(state["sampler"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.first_eval = state.get("first_eval")
        self.last_eval = state.get("last_eval")

    def save(self) -> Path:
        """Checkpoint the run now (atomically)."""
        return save_checkpoint(self.out, self.step, self.model, self.optimizer, self.state_dict(),
                               rng_state=capture_rng(), tokenizer=self.tokenizer, keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.resume_dir)
        if ckpt is None:
            if any((self.out / n).exists() for n in ("metrics.jsonl",)):
                _say(f"--resume: no complete checkpoint in {self.resume_dir}; starting from step 0")
            for name in ("metrics.jsonl", "eval.jsonl", "epochs.jsonl", "samples.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            return
        state, rng = load_checkpoint(ckpt, self.model, self.optimizer)
        self._load_state(state)
        for name in ("metrics.jsonl", "eval.jsonl", "epochs.jsonl", "samples.jsonl"):
            _truncate_jsonl(self.out / name, self.step)
        restore_rng(rng)
        self.engine.sync_weights(self.model)
        _say(f"resumed from {ckpt} (step {self.step}, epoch {self.epoch})")

    # -- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any] | None:
        """Greedy accuracy on the held-out split (RNG state untouched); ``None`` without an eval split."""
        items = self.bundle.eval_items
        if not items:
            return None
        from .rewards import is_correct

        t0 = time.perf_counter()
        correct: list[bool] = []
        samples = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                self.probe.disabled():
            bs = self.cfg.eval_batch_size
            for start in range(0, len(items), bs):
                chunk = items[start : start + bs]
                ro = self.eval_engine.generate([it.input_ids for it in chunk], 1, greedy=True)
                for it, text in zip(chunk, ro.completions):
                    correct.append(is_correct(text, it.example.answer))
                    if len(samples) < 3:
                        samples.append({"question": it.example.question, "answer": it.example.answer,
                                        "completion": text})
        by_level: dict[str, list[bool]] = {}
        for it, c in zip(items, correct):
            level = it.example.meta.get("level")
            if level is not None:
                by_level.setdefault(str(level), []).append(c)
        acc = sum(correct) / len(correct)
        return {
            "step": self.step,
            "eval_accuracy": acc,
            "n": len(correct),
            "by_level": {k: sum(v) / len(v) for k, v in sorted(by_level.items())},
            "eval_s": round(time.perf_counter() - t0, 2),
            "samples": samples,
        }

    def _run_eval(self) -> float | None:
        res = self.evaluate()
        if res is None:
            return None
        _append_jsonl(self.out / "eval.jsonl", res)
        self.last_eval = res["eval_accuracy"]
        if self.first_eval is None:
            self.first_eval = res["eval_accuracy"]
        levels = ", ".join(f"L{k} {v:.2f}" for k, v in res["by_level"].items())
        _say(f"eval @ step {self.step}: greedy accuracy {res['eval_accuracy']:.3f} on {res['n']} held-out"
             + (f" ({levels})" if levels else "") + f" [{res['eval_s']:.0f} s]")
        return res["eval_accuracy"]

    # -- one step ---------------------------------------------------------------------------------------------

    def _rewards(self, completions: list[str], answers: list[Any]) -> tuple[list[float], list[float]]:
        from .rewards import accuracy_reward

        total = [0.0] * len(completions)
        correct = None
        for name, (fn, w) in self.reward_fns.items():
            values = [float(v) for v in fn(completions, answers)]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:  # a NaN would silently zero its group's advantages (or poison the loss)
                raise ValueError(f"reward {name!r} returned {values[bad]} for sample {bad} "
                                 f"(completion {completions[bad][:200]!r}): rewards must be finite")
            if name == "accuracy":
                correct = values
            total = [t + w * v for t, v in zip(total, values)]
        if correct is None:
            correct = accuracy_reward(completions, answers)
        return total, correct

    def _forward_logp(self, model: Any, mb: Any) -> tuple[torch.Tensor, Any]:
        r = mb.completion_ids.shape[1]
        with self._autocast():
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                        logits_to_keep=r + 1, use_cache=False)
        return token_logprobs(out.logits[:, :-1], mb.completion_ids, self.cfg.temperature), out

    def train_step(self, items: list[TrainItem]) -> dict[str, Any]:
        """Rollouts, rewards, GRPO update for one batch of prompts; returns the step's metrics."""
        cfg = self.cfg
        t_start = time.perf_counter()
        G = cfg.group_size
        torch.manual_seed(cfg.seed * 1_000_003 + self.step + 1)  # rollouts depend on (seed, step) only
        with self.probe.disabled():
            ro = self.engine.generate([it.input_ids for it in items], G)
        t_gen = time.perf_counter() - t_start
        answers = [items[i].example.answer for i in ro.prompt_index]
        rewards, correct = self._rewards(ro.completions, answers)
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        adv = group_advantages(reward_t, G, cfg.scale_rewards).to(self.device)
        batch = ro.padded(self.pad_id).to(self.device)
        seg = torch.tensor(
            [[0, items[i].seg_offsets[1], items[i].seg_offsets[2], int(pl) + int(cl)]
             for i, pl, cl in zip(ro.prompt_index, batch.prompt_lens.tolist(), batch.completion_lens.tolist())],
            dtype=torch.int32,
        )
        n = len(ro)
        num_tokens = float(batch.completion_mask.sum().item())
        mbs = cfg.micro_batch_size
        spans = [(s, min(s + mbs, n)) for s in range(0, n, mbs)]

        angles: list[torch.Tensor] = []
        old_logps: list[torch.Tensor] | None = None
        ref_logps: list[torch.Tensor | None] = []
        with torch.no_grad(), self.probe.disabled():
            for s, e in spans:
                ref_logps.append(self._forward_logp(self.ref_model, batch.rows(s, e))[0] if self.ref_model else None)
        if cfg.num_iterations > 1:  # the behaviour policy's log-probs, and the angles, from a no-grad pass
            old_logps = []
            with torch.no_grad():
                for s, e in spans:
                    mb = batch.rows(s, e)
                    self.probe.set_batch(seg[s:e], attention_mask=mb.attention_mask)
                    old_logps.append(self._forward_logp(self.model, mb)[0])
                    angles.append(self.probe.metrics(cfg.inter_weight).causal)

        losses, kl_sum, clip_sum, tok_sum, grad_norm = 0.0, 0.0, 0.0, 0.0, 0.0
        total_updates = self.total_steps * cfg.num_iterations
        for it in range(cfg.num_iterations):
            update = self.step * cfg.num_iterations + it
            lr = lr_at(cfg, update, total_updates)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            measure = old_logps is None
            step_loss = torch.zeros((), device=self.device)
            stats_acc = torch.zeros(3, device=self.device)
            for k, (s, e) in enumerate(spans):
                mb = batch.rows(s, e)
                if measure:
                    self.probe.set_batch(seg[s:e], attention_mask=mb.attention_mask)
                    logp, _ = self._forward_logp(self.model, mb)
                    angles.append(self.probe.metrics(cfg.inter_weight).causal)
                else:
                    with self.probe.disabled():
                        logp, _ = self._forward_logp(self.model, mb)
                old = logp.detach() if old_logps is None else old_logps[k]
                loss, st = policy_loss(
                    logp, old, adv[s:e], mb.completion_mask, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
                    beta=cfg.beta, ref_logp=ref_logps[k], agg=cfg.loss_agg, num_tokens=num_tokens, num_seqs=n,
                )
                loss.backward()
                step_loss += loss.detach()
                stats_acc += torch.stack([st.kl_sum, st.clipped_sum, st.tokens]).to(stats_acc)
            if cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            else:
                gn = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in self.params if p.grad is not None))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # one host transfer per update: loss, KL, clip statistics and the gradient norm
            vals = torch.cat([step_loss.reshape(1), stats_acc, gn.reshape(1).to(stats_acc)]).tolist()
            losses = vals[0]
            kl_sum, clip_sum, tok_sum, grad_norm = vals[1], vals[2], vals[3], vals[4]
        self.engine.sync_weights(self.model)

        ang = torch.cat(angles).float().cpu().tolist()  # C_causal per rollout: one transfer per step
        step_s = time.perf_counter() - t_start
        finite_ang = [a for a in ang if math.isfinite(a)]
        self.epoch_acc[0] += sum(correct)
        self.epoch_acc[1] += len(correct)
        self.epoch_ang[0] += sum(finite_ang)
        self.epoch_ang[1] += len(finite_ang)
        groups = [list(range(g * G, (g + 1) * G)) for g in range(len(items))]
        for g, it in zip(groups, items):
            a = [ang[i] for i in g if math.isfinite(ang[i])]
            self.epoch_prompts.append({
                "index": it.index, "rank": None, "accuracy": sum(correct[i] for i in g) / G,
                "angle": sum(a) / len(a) if a else None, "level": it.example.meta.get("level"),
            })
        zero_adv = sum(1 for g in groups if len({rewards[i] for i in g}) == 1) / len(groups)
        row = {
            "step": self.step + 1,
            "epoch": self.epoch,
            "mu": self.epoch_mu if self.epoch_mu is not None else 0.0,
            "accuracy": sum(correct) / len(correct),
            "angle": sum(finite_ang) / len(finite_ang) if finite_ang else float("nan"),
            "loss": losses,
            "reward": sum(rewards) / len(rewards),
            "kl": kl_sum / tok_sum if tok_sum else 0.0,
            "lr": lr,
            "tokens_per_s": ro.n_tokens / step_s,
            "grad_norm": grad_norm,
            "clip_frac": clip_sum / tok_sum if tok_sum else 0.0,
            "response_len": sum(len(c) for c in ro.completion_ids) / n,
            "truncated": 1.0 - sum(ro.finished) / n,
            "zero_adv_groups": zero_adv,
            "gen_s": round(t_gen, 3),
            "step_s": round(step_s, 3),
        }
        samples = []
        for i in range(min(cfg.log_samples, n)):
            j = (i * G) % n
            samples.append({"step": self.step + 1, "index": items[ro.prompt_index[j]].index,
                            "question": items[ro.prompt_index[j]].example.question, "answer": answers[j],
                            "completion": ro.completions[j], "reward": rewards[j], "correct": bool(correct[j])})
        self._samples = samples
        self.last_rollouts, self.last_angles = ro, ang  # for inspection (tests, debugging)
        return row

    # -- the loop ---------------------------------------------------------------------------------------------

    def _start_epoch(self) -> None:
        self.epoch_ranks = self.sampler.sample_epoch()
        self.epoch += 1
        self.epoch_pos = 0
        self.epoch_acc = [0.0, 0]
        self.epoch_ang = [0.0, 0]
        self.epoch_prompts = []
        self.epoch_mu = float(getattr(self.sampler, "mu", 0.0))

    def _end_epoch(self, row: dict[str, Any]) -> None:
        acc = self.epoch_acc[0] / max(self.epoch_acc[1], 1)
        ang = self.epoch_ang[0] / self.epoch_ang[1] if self.epoch_ang[1] else 0.0
        new_mu = self.sampler.update_mu(acc, ang)
        row["epoch_accuracy"] = acc
        row["epoch_angle"] = ang
        row["mu_next"] = float(new_mu) if new_mu is not None else row["mu"]
        _append_jsonl(self.out / "epochs.jsonl", {
            "step": self.step, "epoch": self.epoch, "mu": self.epoch_mu, "mu_next": row["mu_next"],
            "accuracy": acc, "angle": ang, "ranks": self.epoch_ranks, "prompts": self.epoch_prompts,
        })
        self.epoch_ranks = None
        self.epoch_pos = 0

    def train(self) -> dict[str, Any]:
        """Run (or continue) the training; returns a summary."""
        cfg = self.cfg
        self._setup()
        save_config(cfg, self.out / "config.yaml")
        if self.resume_dir is not None:
            self._resume()
        else:
            for name in ("metrics.jsonl", "eval.jsonl", "epochs.jsonl", "samples.jsonl", "summary.json"):
                (self.out / name).unlink(missing_ok=True)
            if cfg.overwrite:
                import shutil

                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        atomic_write_text(self.out / "run_info.json", json.dumps(self.info, indent=1, default=str))
        _say(f"{self.info['model']} on {self.info['device']} ({self.info['precision']}"
             + (f", {self.threads} thread(s)" if self.threads else "") + f"); {self.info['n_train']} training prompts"
             f" ({self.bundle.report.get('order')}), {self.info['n_eval']} held out; {self.total_steps} steps of "
             f"{cfg.batch_prompts} prompts x {cfg.group_size} -> {self.out}")
        if self.step == 0 and cfg.eval_size and self.last_eval is None:
            self._run_eval()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", disable=not cfg.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                if self.epoch_ranks is None:
                    self._start_epoch()
                ranks = self.epoch_ranks[self.epoch_pos : self.epoch_pos + cfg.batch_prompts]
                items = [self.bundle.ranked[r] for r in ranks]
                row = self.train_step(items)
                for p, r in zip(self.epoch_prompts[-len(items):], ranks):
                    p["rank"] = r
                self.step += 1
                self.epoch_pos += len(items)
                if self.epoch_pos >= len(self.epoch_ranks):
                    self._end_epoch(row)
                evaluated = cfg.eval_size and (
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps
                )
                if evaluated:
                    acc = self._run_eval()
                    if acc is not None:
                        row["eval_accuracy"] = acc
                self.elapsed += time.perf_counter() - t0
                row["time"] = round(self.elapsed, 2)
                _append_jsonl(self.out / "metrics.jsonl", {k: (_finite(v) if isinstance(v, float) else v)
                                                            for k, v in row.items()})
                for s in self._samples:
                    _append_jsonl(self.out / "samples.jsonl", s)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(acc=f"{row['accuracy']:.2f}", reward=f"{row['reward']:.2f}", mu=f"{row['mu']:.0f}",
                                angle=f"{row['angle']:.3f}", loss=f"{row['loss']:.3f}", refresh=False)
                for cb in self.callbacks:
                    cb(self, row)
        finally:
            bar.close()
            self.probe.remove()
        plots = []
        try:
            from .plots import plot_run

            plots = plot_run(self.out)
        except Exception as e:  # noqa: BLE001 - plotting must never fail a finished run
            _say(f"plots failed: {e}")
        summary = {
            "out": str(self.out), "steps": self.step, "epochs": self.epoch, "eval_before": self.first_eval,
            "eval_after": self.last_eval, "mu": float(getattr(self.sampler, "mu", 0.0)), "time_s": round(self.elapsed, 1),
            "plots": [str(p) for p in plots],
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        msg = f"done: {self.step} steps in {self.elapsed:.0f} s"
        if self.first_eval is not None and self.last_eval is not None:
            msg += f"; held-out greedy accuracy {self.first_eval:.3f} -> {self.last_eval:.3f}"
        _say(msg + f"; metrics {self.out / 'metrics.jsonl'}")
        if plots:
            _say(f"plots: {Path(plots[0]).parent}")
        return summary


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def add_train_parser(sub: Any) -> Any:
    """Add the ``train`` subcommand to an argparse subparsers object."""
    from .config import add_config_arguments

    p = sub.add_parser(
        "train",
        help="GRPO with GAIN-RL angle-guided sampling (default: a short CPU demo on the embedded model)",
        description="GRPO training with GAIN-RL data sampling. Without --data: SmolLM2-135M-Instruct (embedded) on "
        "a synthetic arithmetic set, a CPU-sized demo. Settings come from the defaults, --config YAML, then flags.",
    )
    p.add_argument("--config", default=None, help="YAML file of settings (keys as the flags, with _ or -)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in folder RUN exactly")
    add_config_arguments(p)
    return p


def main(args: Any) -> int:
    """Run `gainrl train` from parsed arguments."""
    from .config import apply_resume_overrides, build_config, load_run_config, load_yaml, overrides_from_args

    overrides = overrides_from_args(args)
    try:
        if args.resume:
            if args.config:
                raise ValueError("--resume takes the run's own config.yaml; drop --config")
            if overrides.get("out") is not None and Path(overrides["out"]).resolve() != Path(args.resume).resolve():
                raise ValueError(f"--out {overrides['out']}: --resume continues the run in its own folder "
                                 f"({args.resume}); copy the folder first to continue it elsewhere")
            cfg = apply_resume_overrides(load_run_config(args.resume), overrides)
            cfg.out = str(args.resume)  # the run's folder, wherever it was first written
        else:
            cfg = build_config(load_yaml(args.config) if args.config else {}, overrides)
        Trainer(cfg, resume=args.resume).train()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("GAINRL_TRACEBACK"):
            raise
        _say(f"error: {e} (GAINRL_TRACEBACK=1 shows the traceback)")
        return 2
    return 0


__all__ = [
    "EVAL_SPLITS",
    "METRIC_FIELDS",
    "DataBundle",
    "TrainDataError",
    "TrainItem",
    "Trainer",
    "add_train_parser",
    "check_order_matches",
    "load_train_examples",
    "lr_at",
    "main",
    "read_jsonl",
    "read_order_file",
    "render_items",
    "score_on_the_fly",
]
