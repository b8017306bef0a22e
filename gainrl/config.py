"""`gainrl train` configuration: one dataclass, a YAML file, CLI overrides, the resolved copy in the run folder.

Precedence (later wins): the dataclass defaults (GPU-scale GRPO, DESIGN.md §2 sampler constants) -> the
**embedded demo** values (:data:`DEMO_DEFAULTS`, used only when no ``data`` is given, i.e. the synthetic
arithmetic set with the embedded SmolLM2-135M: a CPU-sized run) -> the ``--config`` YAML -> CLI flags.
The resolved configuration is written to ``RUN/config.yaml``; ``--resume RUN`` reads it back (only the
run-length / logging keys of :data:`RESUME_OVERRIDABLE` may then change).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .checkpoint import atomic_write_text

SAMPLER_KINDS = ("gainrl", "uniform", "ordered")
ORDER_BY = ("score", "length", "index")
ENGINES = ("hf", "vllm")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")

#: Keys that ``--resume`` may change (how long to run and what to log, never what is computed per step).
RESUME_OVERRIDABLE = frozenset(
    {"max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "progress", "log_samples", "out",
     "overwrite"}
)


@dataclass
class TrainConfig:
    """Every setting of a `gainrl train` run (see ``gainrl train --help`` for the flags)."""

    # -- model and data ------------------------------------------------------------------------------------
    model: str | None = field(default=None, metadata={"help": "HF id, local folder or .gguf (default: embedded SmolLM2-135M-Instruct)"})
    data: str | None = field(default=None, metadata={"help": "JSON/JSONL/Parquet/datasets source (default: synthetic arithmetic)"})
    data_format: str = field(default="auto", metadata={"help": "auto, gainrl or verl"})
    split: str | None = field(default=None, metadata={"help": "split of a multi-split dataset"})
    limit: int | None = field(default=None, metadata={"help": "use the first N rows of --data"})
    synthetic_size: int = field(default=2000, metadata={"help": "examples in the synthetic set (train + eval)"})
    synthetic_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5], metadata={"help": "difficulty levels, e.g. 1,2"})
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic set and of the eval split"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out evaluation data (default: split off --data); of a multi-split dataset, its --eval-split"})
    eval_split: str | None = field(default=None, metadata={"help": "split of --eval-data (default: 'test', else 'validation', else its only split; never 'train' beside other splits)"})
    eval_size: int = field(default=256, metadata={"help": "held-out examples for greedy evaluation (0: no eval)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only before and after training)"})
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per greedy evaluation batch"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "evaluation budget (default: max_new_tokens)"})
    prompt: str = field(default="r1", metadata={"help": "prompt preset: r1, released, bare"})
    system_prompt: str | None = field(default=None, metadata={"help": "override the preset's system prompt ('' for none)"})
    few_shot: list[list[str]] | None = field(default=None, metadata={"help": "override the preset's few-shot turns (YAML: [[user, assistant], ...])"})
    max_prompt_len: int = field(default=1024, metadata={"help": "prompts longer than this (tokens) are skipped and counted"})
    scores: str | None = field(default=None, metadata={"help": "folder written by `gainrl score` (order.pt); default: score on the fly"})
    probe_layer: int = field(default=-1, metadata={"help": "decoder layer of the angle probe (negative from the end)"})
    inter_weight: float = field(default=1.0, metadata={"help": "w in score = C_intra(Q) + w*C_inter(Q,P)"})
    angle_backend: str = field(default="auto", metadata={"help": "angle_stats backend: auto, triton, cuda, torch"})
    fused_norms: bool = field(default=False, metadata={
        "help": "every HF LlamaRMSNorm-style norm of the policy runs our RMSNorm kernels (forward and backward; "
                "CUDA, or CPU under TRITON_INTERPRET=1)"})
    angle_fused: str = field(default="off", metadata={
        "help": "measure with the fused RMSNorm + angle kernel in place of the probed layer's norm: off, auto "
                "(where it applies: CUDA, HF LlamaRMSNorm-style norm), on"})

    # -- sampler (DESIGN.md §2) ----------------------------------------------------------------------------
    sampler: str = field(default="gainrl", metadata={"help": "gainrl (Gaussian over score ranks), uniform, ordered"})
    order_by: str = field(default="score", metadata={"help": "rank order: score (descending), length (ascending), index"})
    prompts_per_epoch: int = field(default=512, metadata={"help": "m: prompts drawn per epoch"})
    sigma: float = field(default=1000.0, metadata={"help": "Gaussian width over ranks"})
    mu0: float = field(default=0.0, metadata={"help": "initial centre rank"})
    mu_n: float = field(default=500.0, metadata={"help": "n of the mu update"})
    mu_alpha: float = field(default=2.0, metadata={"help": "alpha of the mu update"})
    mu_beta: float = field(default=0.5, metadata={"help": "beta (target accuracy) of the mu update"})
    mu_adj_min: float = field(default=0.0, metadata={"help": "lower clip of the mu step"})
    mu_adj_max: float = field(default=1000.0, metadata={"help": "upper clip of the mu step"})
    shuffle: bool = field(default=False, metadata={"help": "shuffle each epoch's prompts (default: rank order)"})
    epochs: int = field(default=10, metadata={"help": "sampler epochs (ignored when max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimiser steps"})

    # -- rollouts and rewards ------------------------------------------------------------------------------
    batch_prompts: int = field(default=16, metadata={"help": "b: prompts per optimiser step"})
    group_size: int = field(default=8, metadata={"help": "G: generations per prompt"})
    max_new_tokens: int = field(default=1024, metadata={"help": "completion budget (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    engine: str = field(default="hf", metadata={"help": "rollout engine: hf (generate + KV cache) or vllm"})
    gen_batch_size: int | None = field(default=None, metadata={"help": "sequences per generate call (default: all)"})
    share_prefix: bool | None = field(default=None, metadata={"help": "prefill each prompt once for its G samples (default: on CPU)"})
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0}, metadata={"help": "reward weights, e.g. accuracy=1,format=0.1 (or module:function names)"})

    # -- GRPO loss -----------------------------------------------------------------------------------------
    scale_rewards: str = field(default="group", metadata={"help": "group (divide by the group std) or none"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range (low side, and high side unless epsilon_high)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip range (DAPO clip-higher)"})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient to the frozen reference (k3); 0: no reference"})
    loss_agg: str = field(default="token", metadata={"help": "token (token-level mean) or sequence (per-sequence mean)"})
    num_iterations: int = field(default=1, metadata={"help": "policy updates per rollout batch (>1 makes the clip active)"})

    # -- optimisation --------------------------------------------------------------------------------------
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: off)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant or cosine (to 0 at the last step)"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward (gradient accumulation)"})
    train_layers: int | None = field(default=None, metadata={"help": "train only the last N decoder layers + final norm (default: all weights)"})

    # -- system --------------------------------------------------------------------------------------------
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on with CUDA"})
    attn_implementation: str | None = field(default=None, metadata={"help": "default: flash_attention_2 when flash-attn is installed (CUDA), else the model's"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: the cores not busy at start)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, rollouts and initialisation"})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/train-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out folder that holds a run"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end; 0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (older ones are deleted)"})
    log_samples: int = field(default=1, metadata={"help": "completions per step written to samples.jsonl"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})

    # ------------------------------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the key on an invalid value; returns ``self``."""
        def check(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ValueError(f"{key}: {what}, got {getattr(self, key)!r}")

        check(self.sampler in SAMPLER_KINDS, "sampler", f"expected one of {SAMPLER_KINDS}")
        check(self.order_by in ORDER_BY, "order_by", f"expected one of {ORDER_BY}")
        check(self.engine in ENGINES, "engine", f"expected one of {ENGINES}")
        check(self.precision in PRECISIONS, "precision", f"expected one of {PRECISIONS}")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"expected one of {LR_SCHEDULES}")
        check(self.scale_rewards in ("group", "none"), "scale_rewards", "expected group or none")
        check(self.loss_agg in ("token", "sequence"), "loss_agg", "expected token or sequence")
        check(self.data_format in ("auto", "gainrl", "verl"), "data_format", "expected auto, gainrl or verl")
        check(self.angle_fused in ("off", "auto", "on"), "angle_fused", "expected off, auto or on")
        for key in ("batch_prompts", "group_size", "max_new_tokens", "micro_batch_size", "prompts_per_epoch",
                    "num_iterations", "epochs", "max_prompt_len", "eval_batch_size", "keep_checkpoints"):
            check(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "expected an integer >= 1")
        for key in ("eval_size", "eval_every", "save_every", "warmup_steps", "log_samples", "synthetic_size"):
            check(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "expected an integer >= 0")
        for key in ("max_steps", "limit", "gen_batch_size", "eval_max_new_tokens", "threads"):
            value = getattr(self, key)
            check(value is None or (isinstance(value, int) and value >= 1), key, "expected an integer >= 1")
        check(self.train_layers is None or self.train_layers >= 0, "train_layers", "expected an integer >= 0")
        check(self.eval_split is None or self.eval_data is not None, "eval_split", "needs eval_data")
        check(self.group_size >= 2, "group_size", "GRPO needs at least 2 generations per prompt")
        check(self.temperature > 0, "temperature", "expected > 0")
        check(0 < self.top_p <= 1, "top_p", "expected in (0, 1]")
        check(self.lr > 0, "lr", "expected > 0")
        check(self.beta >= 0, "beta", "expected >= 0")
        check(self.epsilon >= 0, "epsilon", "expected >= 0")
        check(self.epsilon_high is None or self.epsilon_high >= 0, "epsilon_high", "expected >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "expected >= 0")
        check(self.sigma > 0, "sigma", "expected > 0")
        check(self.mu0 >= 0, "mu0", "expected >= 0")
        check(self.mu_adj_min <= self.mu_adj_max, "mu_adj_min", f"expected <= mu_adj_max ({self.mu_adj_max})")
        check(bool(self.synthetic_levels) and all(lv in (1, 2, 3, 4, 5) for lv in self.synthetic_levels),
              "synthetic_levels", "expected levels in 1..5")
        check(bool(self.rewards) and all(isinstance(w, (int, float)) for w in self.rewards.values()),
              "rewards", "expected {name: weight}")
        check(self.prompts_per_epoch >= self.batch_prompts, "prompts_per_epoch",
              f"expected >= batch_prompts ({self.batch_prompts})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The embedded default run (no --data): SmolLM2-135M-Instruct on level-1 synthetic arithmetic, sized for a 2-core
#: CPU (about 12 minutes, 24 steps of 2 prompts x 8). The template's own system prompt and no few-shot turn: the
#: model starts out rambling past the 24-token budget (held-out greedy accuracy ~0.3) and GRPO teaches it to answer
#: directly, a change that generalises to held-out questions (single arithmetic facts barely do). Sampler constants
#: are scaled to the small set (N = 236 ranks instead of GSM8K's 7473).
DEMO_DEFAULTS: dict[str, Any] = {
    "synthetic_size": 300,
    "synthetic_levels": [1],
    "eval_size": 64,
    "eval_every": 12,
    "eval_max_new_tokens": 24,
    "prompt": "bare",
    "max_prompt_len": 256,
    "prompts_per_epoch": 8,
    "sigma": 40.0,
    "mu_n": 20.0,
    "mu_adj_max": 40.0,
    "epochs": 6,
    "batch_prompts": 2,
    "group_size": 8,
    "max_new_tokens": 24,
    "temperature": 1.0,
    "beta": 0.0,
    "lr": 1e-5,
    "micro_batch_size": 8,
    "save_every": 12,
    "keep_checkpoints": 1,
}


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _kind(key: str) -> tuple[str, bool]:
    """``(kind, nullable)`` of a field: kind in bool, int, float, str, list, dict."""
    typ = _field_types()[key]
    args = get_args(typ)
    nullable = type(None) in args
    if nullable:
        typ = next(a for a in args if a is not type(None))
    origin = get_origin(typ)
    if origin is not None:
        return ("list" if origin is list else "dict"), nullable
    return typ.__name__, nullable


def _unknown_key_error(key: str, where: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def coerce(key: str, value: Any) -> Any:
    """``value`` converted to the type of ``TrainConfig.key`` (strings from the CLI, YAML scalars)."""
    kind, nullable = _kind(key)
    if value is None:
        if not nullable:  # e.g. `lr:` with no value in a YAML file
            raise ValueError(f"{key}: expected a {kind} value, got none (an empty YAML value?)")
        return None
    if nullable and isinstance(value, str) and value.strip().lower() in ("none", "null", "auto") and key != "system_prompt":
        return None
    if kind == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if key == "synthetic_levels":
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"synthetic_levels: expected integers, got {value!r}") from None
    if key == "rewards":
        try:
            if isinstance(value, str):
                out: dict[str, float] = {}
                for part in value.split(","):
                    name, _, weight = part.partition("=")
                    out[name.strip()] = float(weight) if weight else 1.0
                return out
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"rewards: expected name=weight[,name=weight] or {{name: weight}}, got {value!r}") from None
    if key == "few_shot":
        want = "few_shot: expected a list of [user, assistant] pairs or {user, assistant} objects (JSON on the CLI)"
        try:
            if isinstance(value, str):
                import json

                value = json.loads(value)
            turns = []
            for turn in value:
                if isinstance(turn, dict):
                    turn = [turn["user"], turn["assistant"]]
                if isinstance(turn, str) or len(turn) != 2:
                    raise ValueError
                turns.append([str(turn[0]), str(turn[1])])
            return turns
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{want}, got {value!r}") from None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return str(value)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Keys of a YAML config file (``-`` in keys read as ``_``); unknown keys are an error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: no such file: {p}")
    with p.open(encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise _unknown_key_error(k, str(p))
        out[k] = coerce(k, value)
    return out


def build_config(
    yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults -> demo defaults (when no data is given anywhere) -> YAML values -> overrides; validated."""
    yaml_values = dict(yaml_values or {})
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in list(yaml_values) + list(overrides):
        if k not in names:
            raise _unknown_key_error(k, "config")
    merged: dict[str, Any] = {}
    data = overrides.get("data", yaml_values.get("data"))
    if data is not None and data != "synthetic":
        data = coerce("data", data)  # `--data none` is `data: null`
    if data is None or data == "synthetic":
        merged.update(DEMO_DEFAULTS)
    merged.update(yaml_values)
    merged.update(overrides)
    if merged.get("data") == "synthetic":
        merged["data"] = None
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in merged.items()})
    return cfg.validate()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a resolved dict (e.g. ``RUN/config.yaml``), nothing merged in."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in values:
        if k not in names:
            raise _unknown_key_error(k, "config")
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def load_run_config(run: str | os.PathLike) -> TrainConfig:
    """The resolved config of a run folder (``RUN/config.yaml``)."""
    import yaml

    p = Path(run) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"--resume: {run} has no config.yaml (not a gainrl train run folder?)")
    with p.open(encoding="utf-8") as f:
        return config_from_dict(yaml.safe_load(f) or {})


def apply_resume_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with the allowed ``--resume`` overrides applied; any other changed key is an error."""
    values = cfg.to_dict()
    for k, v in overrides.items():
        v = coerce(k, v)
        if values.get(k) == v:
            continue
        if k not in RESUME_OVERRIDABLE:
            raise ValueError(
                f"--resume: {k} cannot change when resuming (run value {values.get(k)!r}, given {v!r}); only "
                f"{sorted(RESUME_OVERRIDABLE)} may"
            )
        if k in ("max_steps", "epochs") and cfg.lr_schedule != "constant":
            raise ValueError(f"--resume: {k} cannot change in a run with lr_schedule={cfg.lr_schedule!r} (the "
                             "schedule spans the run's length: every remaining step's learning rate would change)")
        values[k] = v
    return config_from_dict(values)


def add_config_arguments(parser: Any) -> None:
    """One ``--key-name`` flag per :class:`TrainConfig` field (absent flags leave the key unset)."""
    import argparse

    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = types[f.name]
        help_text = f.metadata.get("help", "")
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=help_text)


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The config keys given on the command line (strings as typed; :func:`coerce` converts them)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


__all__ = [
    "DEMO_DEFAULTS",
    "RESUME_OVERRIDABLE",
    "TrainConfig",
    "add_config_arguments",
    "apply_resume_overrides",
    "build_config",
    "coerce",
    "config_from_dict",
    "load_run_config",
    "load_yaml",
    "overrides_from_args",
    "save_config",
]
