"""GAIN-RL plug-ins for verl, written against verl 0.9.1's interfaces (verl itself is not a dependency: the classes
are built on first access from verl's own base classes, so importing this module never imports verl).

verl 0.9 (V1 trainer) -- ``data.sampler.class_path`` is gone; three documented extension points are used instead:

* :class:`GainRLReplayBuffer` -- ``trainer.v1.sampler.custom_sampler`` (a ``ReplayBuffer`` subclass). It owns the
  :class:`~gainrl.integrations.GainRLCurriculum`: it keeps the built-in sampling of finished groups, reads the 0/1
  correctness of the groups it hands to the trainer (``rm_scores``, or ``reward_extra_info[acc_key]``), closes an
  epoch once ``samples_per_epoch`` prompt groups have been trained on (μ update, DESIGN.md §2) and draws the next
  epoch right away, before the trainer fetches the next prompts. It restores its state from ``restore_from``.
* :class:`GainRLDataset` -- ``data.custom_cls`` (an ``RLHFDataset`` subclass). The replay buffer can only choose
  among prompts already generated, so the prompts to generate are chosen here: on the training files the dataset
  is a view of length ``samples_per_epoch`` whose item ``i`` is the ``i``-th prompt of the current GAIN-RL draw
  (use ``data.shuffle=False`` for rank order); the validation files are left as they are.
* :class:`GainRLCheckpointCallback` -- ``trainer.checkpoint_callback_class``: writes ``gainrl_sampler.json`` into every
  ``global_step_N`` folder.

verl <= 0.8 -- :class:`GainRLCurriculumSampler` for ``data.sampler.class_path`` / ``class_name`` (an
``AbstractCurriculumSampler``): it yields the draw itself and reads feedback in ``update(batch)``; its state rides in
verl's ``data.pt`` through torchdata's ``Stateful`` protocol.

The angle signal: verl computes the policy log-probs inside its actor workers, which have no public hook, so the
plug-ins accept ``C_causal`` from wherever it is computed: a per-trajectory field (``angle_key``, default
``gainrl_causal``) in the old API's batch, or :meth:`GainRLReplayBuffer.record_angles` in V1. With
``use_angle: false`` (the default for V1, where nothing feeds angles in stock verl) the μ update uses accuracy alone;
with ``use_angle: true`` a missing angle is an error, never a silent zero.

Configuration keys (``trainer.v1.sampler.sampler_kwargs`` for V1, ``data.sampler`` for the old API):
``order`` (``gainrl score`` dir / ``order.pt`` / list, required), ``samples_per_epoch`` (required), ``sigma``,
``mu0``, ``seed``, ``shuffle``, ``mu_n``, ``mu_alpha``, ``mu_beta``, ``mu_adj_min``, ``mu_adj_max``, ``use_angle``,
``acc_key``, ``correct_threshold`` (default 0.5: a trajectory whose summed score is >= 0.5 is correct),
``angle_key``; V1 also ``restore_from`` (``trainer.default_local_dir`` or a ``global_step_N`` folder) and ``name``.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gainrl.integrations import SHARED_CURRICULA, GainRLCurriculum, load_order
from gainrl.sampler import MuUpdateConfig

logger = logging.getLogger(__name__)

STATE_FILE = "gainrl_sampler.json"
DEFAULT_ANGLE_KEY = "gainrl_causal"

_CURRICULUM_KEYS = {"order", "samples_per_epoch", "sigma", "mu0", "seed", "shuffle", "mu_n", "mu_alpha", "mu_beta",
                    "mu_adj_min", "mu_adj_max", "use_angle"}
_FEEDBACK_KEYS = {"acc_key", "correct_threshold", "angle_key"}
_V1_KEYS = {"restore_from", "name"}
_OLD_API_KEYS = {"class_path", "class_name"}


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:  # omegaconf DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover - verl always has omegaconf
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ValueError(f"GAIN-RL config: expected a mapping, got {type(cfg).__name__}")


def curriculum_from_config(
    cfg: Any, allowed: set[str], dataset_size: int | None = None, use_angle_default: bool = True
) -> tuple[GainRLCurriculum, dict[str, Any]]:
    """Build the curriculum from a verl config mapping; returns it and the mapping (validated keys)."""
    kw = _as_dict(cfg)
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"GAIN-RL config: unknown keys {sorted(unknown)} (known: {sorted(allowed)})")
    for key in ("order", "samples_per_epoch"):
        if kw.get(key) is None:
            raise ValueError(f"GAIN-RL config: `{key}` is required")
    defaults = MuUpdateConfig()
    mu_cfg = MuUpdateConfig(
        n=float(kw.get("mu_n", defaults.n)), alpha=float(kw.get("mu_alpha", defaults.alpha)),
        beta=float(kw.get("mu_beta", defaults.beta)), adj_min=float(kw.get("mu_adj_min", defaults.adj_min)),
        adj_max=float(kw.get("mu_adj_max", defaults.adj_max)),
    )
    curriculum = GainRLCurriculum(
        load_order(kw["order"], dataset_size=dataset_size),
        int(kw["samples_per_epoch"]),
        sigma=float(kw.get("sigma", 1000.0)),
        mu0=float(kw.get("mu0", 0.0)),
        seed=int(kw.get("seed", 0)),
        shuffle=bool(kw.get("shuffle", False)),
        mu_cfg=mu_cfg,
        use_angle=bool(kw.get("use_angle", use_angle_default)),
    )
    if not curriculum.use_angle:
        logger.warning("GAIN-RL: use_angle is false: the μ update uses accuracy only (no angle term)")
    return curriculum, kw


def _correct(scores: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 correctness from summed trajectory scores (NaN stays NaN: no verdict)."""
    out = (scores >= threshold).astype(np.float64)
    out[np.isnan(scores)] = np.nan
    return out


def _feedback_sums(acc: np.ndarray, ang: np.ndarray | None) -> tuple[float, float, float, float]:
    acc = np.asarray(acc, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(acc)
    if np.any((acc[ok] != 0) & (acc[ok] != 1)):
        raise ValueError("GAIN-RL: correctness must be 0/1 per trajectory (got other values; check acc_key)")
    sums = [float(acc[ok].sum()), float(ok.sum()), 0.0, 0.0]
    if ang is not None:
        ang = np.asarray(ang, dtype=np.float64).reshape(-1)
        okc = np.isfinite(ang)
        sums[2:] = [float(ang[okc].sum()), float(okc.sum())]
    return tuple(sums)  # type: ignore[return-value]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------------------------
# verl <= 0.8: data.sampler.class_path (AbstractCurriculumSampler)
# --------------------------------------------------------------------------------------------------------------


class _CurriculumSamplerMixin:
    """GAIN-RL as verl's ``AbstractCurriculumSampler``: ``sampler_cls(data_source=dataset, data_config=data)``; one
    ``__iter__`` per verl epoch yields the epoch's draw; ``update(batch)`` after every step feeds correctness (and
    the angle) back; after ``samples_per_epoch`` prompt groups the μ update runs and the next ``__iter__`` draws
    with the new μ. ``state_dict`` / ``load_state_dict`` (torchdata ``Stateful``) carry μ, the generator, the draw
    in progress, the feedback so far and the position in the epoch through verl's ``data.pt``."""

    def __init__(self, data_source: Any, data_config: Any) -> None:  # noqa: D107 - verl's signature
        sampler_cfg = data_config.get("sampler") if hasattr(data_config, "get") else None
        self.curriculum, kw = curriculum_from_config(
            sampler_cfg, _CURRICULUM_KEYS | _FEEDBACK_KEYS | _OLD_API_KEYS, dataset_size=len(data_source)
        )
        batch = data_config.get("train_batch_size") if hasattr(data_config, "get") else None
        if batch and self.curriculum.m % int(batch):
            raise ValueError(
                f"data.sampler.samples_per_epoch ({self.curriculum.m}) must be a multiple of data.train_batch_size "
                f"({batch}): one verl epoch is one GAIN-RL epoch"
            )
        self.acc_key = kw.get("acc_key", "acc")
        self.correct_threshold = float(kw.get("correct_threshold", 0.5))
        self.angle_key = kw.get("angle_key", DEFAULT_ANGLE_KEY)
        self.groups = 0  # prompt groups fed back in the epoch in progress
        self._position = 0  # prompts handed out in the epoch in progress
        self._resume_at = 0

    def __len__(self) -> int:
        return self.curriculum.m

    def __iter__(self) -> Iterator[int]:
        indices = self.curriculum.indices()
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for index in indices[start:]:
            self._position += 1
            yield index

    def update(self, batch: Any) -> None:
        """Feedback of one trained batch (a ``DataProto``): correctness from ``non_tensor_batch[acc_key]`` when
        present, else ``token_level_scores`` summed per trajectory ``>= correct_threshold``; ``C_causal`` from
        ``batch[angle_key]`` / ``non_tensor_batch[angle_key]``; prompt groups from ``non_tensor_batch['uid']``."""
        non_tensor = getattr(batch, "non_tensor_batch", {}) or {}
        tensors = getattr(batch, "batch", None)
        if self.acc_key and self.acc_key in non_tensor:
            acc = _to_numpy(non_tensor[self.acc_key]).astype(np.float64)
        elif tensors is not None and "token_level_scores" in tensors.keys():
            acc = _correct(_to_numpy(tensors["token_level_scores"]).reshape(len(batch), -1).sum(1),
                           self.correct_threshold)
        else:
            raise ValueError(f"GAIN-RL update: the batch has neither non_tensor_batch[{self.acc_key!r}] nor "
                             "token_level_scores")
        ang = None
        if self.angle_key and tensors is not None and self.angle_key in tensors.keys():
            ang = _to_numpy(tensors[self.angle_key])
        elif self.angle_key and self.angle_key in non_tensor:
            ang = _to_numpy(non_tensor[self.angle_key])
        if ang is None and self.curriculum.use_angle:
            raise RuntimeError(
                f"GAIN-RL update: no per-trajectory {self.angle_key!r} in the batch (the actor's log-prob forward "
                "must measure C_causal), or set data.sampler.use_angle=false for the accuracy-only variant"
            )
        if "uid" not in non_tensor:
            raise ValueError("GAIN-RL update: the batch has no non_tensor_batch['uid'] (prompt groups)")
        self.curriculum.add(*_feedback_sums(acc, ang if self.curriculum.use_angle else None))
        self.groups += len(np.unique(np.asarray(non_tensor["uid"])))
        if self.groups >= self.curriculum.m:
            self.groups -= self.curriculum.m
            record = self.curriculum.finish_epoch()
            logger.info("GAIN-RL epoch %d: acc=%s ang=%s mu %.2f -> %.2f", record["epoch"], record["acc"],
                        record["ang"], record["mu_before"], record["mu_after"])

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict(), "groups": self.groups, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state["curriculum"])
        self.groups = int(state["groups"])
        # torchdata does not fast-forward a Stateful sampler: resume inside the drawn epoch ourselves
        self._resume_at = int(state["position"]) if self.curriculum.drawn else 0
        if self._resume_at >= self.curriculum.m:
            self._resume_at = 0


# --------------------------------------------------------------------------------------------------------------
# verl 0.9 V1: trainer.v1.sampler.custom_sampler (ReplayBuffer) + data.custom_cls (RLHFDataset)
# --------------------------------------------------------------------------------------------------------------


def _checkpoint_folder(path: str | os.PathLike) -> Path | None:
    """``global_step_N`` folder to restore from: ``path`` itself, or the latest one recorded in
    ``path/latest_checkpointed_iteration.txt`` (verl's ``trainer.default_local_dir``); ``None`` when there is none."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        folder = path / f"global_step_{int(tracker.read_text().strip())}"
        return folder if folder.exists() else None
    return None


class _ReplayBufferMixin:
    """GAIN-RL's feedback side on verl V1 (see the module docstring).

    An epoch closes as soon as its feedback is complete: ``samples_per_epoch`` prompt groups handed to the trainer
    and, with ``use_angle``, an angle recorded (:meth:`record_angles`) for each of their trajectories. In the sync
    trainer that is before the next step fetches prompts, so the next epoch is drawn with the updated μ."""

    def __init__(self, *args: Any, sampler_kwargs: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, sampler_kwargs=sampler_kwargs, **kwargs)
        self.curriculum, kw = curriculum_from_config(
            sampler_kwargs, _CURRICULUM_KEYS | _FEEDBACK_KEYS | _V1_KEYS, use_angle_default=False
        )
        self.acc_key = kw.get("acc_key")
        self.correct_threshold = float(kw.get("correct_threshold", 0.5))
        self.groups = 0  # prompt groups handed to the trainer in the epoch in progress
        self.trajectories = 0  # their trajectories
        self.angles_seen = 0  # angles recorded for them
        self.gainrl_name = str(kw.get("name", "default"))
        restore = kw.get("restore_from")
        if restore:
            folder = _checkpoint_folder(restore)
            if folder is not None:
                self.load_gainrl_state(folder)
                logger.info("GAIN-RL: restored sampler state from %s (epoch %d, mu %.2f)", folder,
                            self.curriculum.epoch, self.curriculum.mu)
        SHARED_CURRICULA[self.gainrl_name] = self.curriculum
        self.curriculum.ranks()  # the dataset built after us (and its loader workers) read this draw

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        batch, metrics = super().sample(global_steps=global_steps, partition_id=partition_id, batch_size=batch_size)
        if partition_id == "train":
            if self.curriculum.m % batch_size:
                raise ValueError(f"GAIN-RL samples_per_epoch ({self.curriculum.m}) must be a multiple of the "
                                 f"train batch size ({batch_size}): one verl epoch is one GAIN-RL epoch")
            metrics = dict(metrics or {})
            metrics.update(self._gainrl_feedback(batch))
        return batch, metrics

    def _gainrl_feedback(self, batch: Any) -> dict[str, float]:
        import transfer_queue as tq  # verl's KV store, read as the built-in ReplayBuffer reads it

        tags = list(getattr(batch, "tags", None) or [{}] * len(batch.keys))
        keys = [k for k, tag in zip(batch.keys, tags, strict=True) if not (tag or {}).get("is_padding", False)]
        metrics: dict[str, float] = {}
        if keys:
            field = "extra_fields" if self.acc_key else "rm_scores"
            data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=[field])
            if self.acc_key:  # the same reading as the built-in DAPO filter
                acc = []
                for value in list(data["extra_fields"]):
                    extra = getattr(value, "data", value)
                    info = extra.get("reward_extra_info", {}) if isinstance(extra, dict) else {}
                    acc.append(float(info[self.acc_key]) if self.acc_key in info else math.nan)
                acc = np.asarray(acc, dtype=np.float64)
            else:
                scores = np.asarray([float(v.sum().item()) for v in list(data["rm_scores"])], dtype=np.float64)
                acc = _correct(scores, self.correct_threshold)
            acc_sum, acc_n, _, _ = _feedback_sums(acc, None)
            self.curriculum.add(acc_sum, acc_n)
            self.groups += len({key.split("_")[0] for key in keys})
            self.trajectories += len(keys)
            metrics["gainrl/batch_acc"] = acc_sum / acc_n if acc_n else math.nan
        metrics.update(self._gainrl_maybe_finish())
        return metrics

    def record_angles(self, values: Any) -> dict[str, float]:
        """Feed per-trajectory ``C_causal`` of the trajectories of the last sampled batch (measured in the policy's
        log-prob forward, e.g. by :class:`gainrl_kernels.probe.AngleProbe` in the actor); closes the epoch when
        that completes its feedback. Returns the GAIN-RL metrics."""
        values = _to_numpy(values).reshape(-1)
        _, _, ang_sum, ang_n = _feedback_sums(np.zeros(0), values)
        self.curriculum.add(0.0, 0.0, ang_sum, ang_n)
        self.angles_seen += int(values.size)
        return self._gainrl_maybe_finish()

    def _gainrl_maybe_finish(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        complete = self.groups >= self.curriculum.m and (
            not self.curriculum.use_angle or self.angles_seen >= self.trajectories
        )
        if complete:
            record = self.curriculum.finish_epoch()
            self.groups = self.trajectories = self.angles_seen = 0
            logger.info("GAIN-RL epoch %d: acc=%s ang=%s mu %.2f -> %.2f", record["epoch"], record["acc"],
                        record["ang"], record["mu_before"], record["mu_after"])
            metrics.update({"gainrl/epoch_acc": math.nan if record["acc"] is None else record["acc"],
                            "gainrl/epoch_ang": math.nan if record["ang"] is None else record["ang"]})
            self.curriculum.ranks()  # draw the next epoch before the trainer fetches its first prompts
        metrics.update({"gainrl/mu": self.curriculum.mu, "gainrl/epoch": float(self.curriculum.epoch)})
        return metrics

    def save_gainrl_state(self, checkpoint_dir: str | os.PathLike) -> Path:
        path = Path(checkpoint_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"curriculum": self.curriculum.state_dict(), "groups": self.groups,
                 "trajectories": self.trajectories, "angles_seen": self.angles_seen}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)
        return path

    def load_gainrl_state(self, checkpoint_dir: str | os.PathLike) -> None:
        state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
        self.curriculum.load_state_dict(state["curriculum"])
        self.groups = int(state["groups"])
        self.trajectories = int(state["trajectories"])
        self.angles_seen = int(state["angles_seen"])


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


class _DatasetMixin:
    """GAIN-RL's prompt side on verl V1 (see the module docstring): on the training files, a view of the current
    draw; on any other files (validation), the dataset as it is."""

    def __init__(self, data_files: Any, tokenizer: Any, config: Any, processor: Any = None, max_samples: int = -1,
                 **kwargs: Any) -> None:  # RLHFDataset's signature; verl passes keywords
        super().__init__(data_files=data_files, tokenizer=tokenizer, config=config, processor=processor,
                         max_samples=max_samples, **kwargs)
        self._gainrl: GainRLCurriculum | None = None
        train_files = config.get("train_files") if hasattr(config, "get") else None
        if train_files is None or _files(data_files) != _files(train_files):
            return
        name = str((config.get("gainrl_name") if hasattr(config, "get") else None) or "default")
        curriculum = SHARED_CURRICULA.get(name)
        if curriculum is None:
            raise RuntimeError(
                "GainRLDataset: no GAIN-RL curriculum registered; set trainer.v1.sampler.custom_sampler to "
                "gainrl.integrations.verl's GainRLReplayBuffer (it is built before the datasets)"
            )
        batch = config.get("train_batch_size") if hasattr(config, "get") else None
        if batch and curriculum.m % int(batch):
            raise ValueError(f"GAIN-RL samples_per_epoch ({curriculum.m}) must be a multiple of data.train_batch_size "
                             f"({batch}): one verl epoch is one GAIN-RL epoch")
        size = super().__len__()
        if max(curriculum.order) >= size:
            raise ValueError(f"GAIN-RL order has dataset index {max(curriculum.order)} for {size} training rows")
        self._gainrl = curriculum

    def __len__(self) -> int:
        if self._gainrl is None:
            return super().__len__()
        return self._gainrl.m

    def __getitem__(self, item: int):
        if self._gainrl is None:
            return super().__getitem__(item)
        # draw=False: a data-loader worker holds a copy taken when the epoch's iterator started; it must serve the
        # draw the replay buffer made in the main process, never draw on its own.
        return super().__getitem__(self._gainrl.index_at(int(item), draw=False))


class _CheckpointCallbackMixin:
    """Saves the replay buffer's GAIN-RL state next to verl's checkpoint (``global_step_N/gainrl_sampler.json``)."""

    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs: Any):
        super().on_save(trainer=trainer, global_step=global_step, checkpoint_dir=checkpoint_dir,
                        async_save=async_save, **kwargs)
        buffer = getattr(trainer, "replay_buffer", None)
        if not hasattr(buffer, "save_gainrl_state"):
            raise RuntimeError("GainRLCheckpointCallback: the trainer's replay buffer is not a GainRLReplayBuffer")
        buffer.save_gainrl_state(checkpoint_dir)


# --------------------------------------------------------------------------------------------------------------
# Classes on verl's bases, built on first access
# --------------------------------------------------------------------------------------------------------------


def _build(name: str, mixin: type, base: type) -> type:
    return type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": mixin.__doc__})


def make_curriculum_sampler_class(base: type) -> type:
    """``GainRLCurriculumSampler`` on ``base`` (verl's ``AbstractCurriculumSampler``, or a stand-in in tests)."""
    return _build("GainRLCurriculumSampler", _CurriculumSamplerMixin, base)


def make_replay_buffer_class(base: type) -> type:
    """``GainRLReplayBuffer`` on ``base`` (verl's V1 ``ReplayBuffer``)."""
    return _build("GainRLReplayBuffer", _ReplayBufferMixin, base)


def make_dataset_class(base: type) -> type:
    """``GainRLDataset`` on ``base`` (verl's ``RLHFDataset``)."""
    return _build("GainRLDataset", _DatasetMixin, base)


def make_checkpoint_callback_class(base: type) -> type:
    """``GainRLCheckpointCallback`` on ``base`` (verl's ``CheckpointCallback``)."""
    return _build("GainRLCheckpointCallback", _CheckpointCallbackMixin, base)


_VERL_BASES = {
    "GainRLCurriculumSampler": ("verl.experimental.dataset.sampler", "AbstractCurriculumSampler",
                                make_curriculum_sampler_class),
    "GainRLReplayBuffer": ("verl.trainer.ppo.v1.replay_buffer", "ReplayBuffer", make_replay_buffer_class),
    "GainRLDataset": ("verl.utils.dataset.rl_dataset", "RLHFDataset", make_dataset_class),
    "GainRLCheckpointCallback": ("verl.trainer.ppo.checkpoint_callback", "CheckpointCallback",
                                 make_checkpoint_callback_class),
}


def __getattr__(name: str) -> type:
    if name not in _VERL_BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, base_name, make = _VERL_BASES[name]
    try:
        base = getattr(importlib.import_module(module_name), base_name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"{name} needs verl's {module_name}.{base_name} (pip install verl; see docs/integrations.md)"
                          ) from e
    cls = make(base)
    globals()[name] = cls
    return cls


__all__ = [
    "DEFAULT_ANGLE_KEY",
    "STATE_FILE",
    "curriculum_from_config",
    "make_checkpoint_callback_class",
    "make_curriculum_sampler_class",
    "make_dataset_class",
    "make_replay_buffer_class",
]
