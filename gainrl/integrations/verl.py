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

The angle signal (V1): with ``actor_angles: true`` the actor measures ``C_causal`` itself, inside the old-log-prob
forward verl runs anyway (DESIGN.md §2; no extra pass, no host sync per sample). verl 0.9.1 hard-codes its trainer and
worker classes, so the replay buffer, when built, re-classes its trainer (the owner of the ``refill_fn`` verl hands
it) to :func:`make_angle_trainer_class`: the actor workers become ``GainRLActorRolloutRefWorker`` (their FSDP engine
gets :class:`_AngleEngineMixin`), and after each ``compute_log_prob`` the per-trajectory ``gainrl_causal`` goes from
TransferQueue to :meth:`GainRLReplayBuffer.record_angles`. Without it, ``use_angle: false`` (the V1 default) updates
μ with accuracy alone, or call ``record_angles`` yourself; the old API reads a per-trajectory field (``angle_key``,
default ``gainrl_causal``) of its batch. With ``use_angle: true`` a missing angle is an error, never a silent zero.

Configuration keys (``trainer.v1.sampler.sampler_kwargs`` for V1, ``data.sampler`` for the old API):
``order`` (``gainrl score`` dir / ``order.pt`` / list, required), ``samples_per_epoch`` (required), ``sigma``,
``mu0``, ``seed``, ``shuffle``, ``mu_n``, ``mu_alpha``, ``mu_beta``, ``mu_adj_min``, ``mu_adj_max``, ``use_angle``,
``acc_key``, ``correct_threshold`` (default 0.5: a trajectory whose summed score is >= 0.5 is correct),
``angle_key``; V1 also ``restore_from`` (``trainer.default_local_dir`` or a ``global_step_N`` folder), ``name``,
``actor_angles`` (default false), ``probe_layer`` (default -1: the last decoder layer) and ``probe_backend``.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import sys
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
_V1_KEYS = {"restore_from", "name", "actor_angles", "probe_layer", "probe_backend"}
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


def _real_keys(batch: Any) -> list[str]:
    """Trajectory keys of a ``KVBatchMeta`` without the padding copies verl adds to balance data-parallel ranks."""
    tags = list(getattr(batch, "tags", None) or [{}] * len(batch.keys))
    return [k for k, tag in zip(batch.keys, tags, strict=True) if not (tag or {}).get("is_padding", False)]


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
        actor_angles = bool(_as_dict(sampler_kwargs).get("actor_angles", False))
        self.curriculum, kw = curriculum_from_config(
            sampler_kwargs, _CURRICULUM_KEYS | _FEEDBACK_KEYS | _V1_KEYS, use_angle_default=actor_angles
        )
        if actor_angles and not self.curriculum.use_angle:
            raise ValueError("GAIN-RL: actor_angles: true measures the angle term, which use_angle: false leaves out")
        #: what the actor measures with (sent along with every old-log-prob request when actor_angles is on)
        self.gainrl_probe = {"layer": int(kw.get("probe_layer", -1)), "backend": str(kw.get("probe_backend", "auto"))}
        if actor_angles:  # verl 0.9.1 builds us inside PPOTrainer.__init__ with refill_fn=trainer._add_prompts_...
            install_actor_angles(getattr(kwargs.get("refill_fn"), "__self__", None))
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

        keys = _real_keys(batch)
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
        """Feed per-trajectory ``C_causal`` ``[n]`` of the trajectories of the last sampled batch (measured in the
        policy's log-prob forward: done automatically with ``actor_angles: true``, see :class:`_AngleTrainerMixin`);
        closes the epoch when that completes its feedback. Returns the GAIN-RL metrics."""
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
# verl 0.9 V1: the angle signal from the actor's own old-log-prob forward
# --------------------------------------------------------------------------------------------------------------

#: non-tensor entry of the ``compute_log_prob`` data asking the actor to measure (value: ``{"layer", "backend"}``)
ANGLE_REQUEST = "gainrl_angle"
_ACTOR_ROLES = {"Actor", "ActorRollout", "ActorRolloutRef"}


def _non_tensor(data: Any, key: str) -> Any:
    """``data[key]`` of a TensorDict, unwrapped from ``NonTensorData``; ``None`` when absent."""
    try:
        value = data.get(key, None)
    except (KeyError, TypeError, AttributeError):
        return None
    return getattr(value, "data", value)


class _AngleEngineMixin:
    """verl 0.9.1's ``FSDPEngineWithLMHead`` (``verl/workers/engine/fsdp/transformer_impl.py``) measuring
    ``C_causal`` inside the forward it already runs.

    ``infer_batch(data)`` measures only when ``data`` carries the non-tensor :data:`ANGLE_REQUEST` (which GAIN-RL's
    trainer sets for the old-log-prob pass alone; the reference pass, updates and everything else run unchanged).
    For every micro-batch of ``forward_backward_batch``: ``prepare_model_inputs`` describes the real tokens to an
    :class:`~gainrl_kernels.probe.AngleProbe` on the chosen decoder layer's MLP input -- remove-padding path: the
    packed ``[1, T (+ pad)]`` row with ``cu_seqlens = input_ids.offsets()`` ``[B+1]`` (static / Ulysses pads lie after
    ``cu_seqlens[-1]`` and take part in nothing); padded path: the ``[B, L]`` attention mask --, the model forward
    runs as usual, and ``prepare_model_outputs`` adds ``model_output["gainrl_causal"]``: ``C_causal`` of each sequence
    (prompt + response tokens) as a jagged ``[B, 1]`` float32 tensor on the device, which verl's
    ``postprocess_batch_func`` concatenates and restores to the input order like ``log_probs``. No extra forward, no
    host sync; the activation is never kept."""

    _gainrl_probe: Any = None  # the probe while infer_batch measures

    def infer_batch(self, data: Any, loss_function: Any = None) -> Any:
        request = _non_tensor(data, ANGLE_REQUEST)
        if not request:
            return super().infer_batch(data, loss_function=loss_function)
        request = request if isinstance(request, Mapping) else {}
        if getattr(self, "use_ulysses_sp", False):
            raise NotImplementedError("GAIN-RL actor angles: Ulysses sequence parallelism splits every sequence across "
                                      "ranks; use ulysses_sequence_parallel_size=1")
        probes = self.__dict__.setdefault("_gainrl_probes", {})
        key = (int(request.get("layer", -1)), str(request.get("backend", "auto")))
        if key not in probes:
            from gainrl_kernels.probe import AngleProbe

            probes[key] = AngleProbe(self.module, layer=key[0], backend=key[1])
            probes[key].enabled = False
        self._gainrl_probe = probes[key]
        try:
            return super().infer_batch(data, loss_function=loss_function)
        finally:
            self._gainrl_probe.enabled = False
            self._gainrl_probe = None

    def prepare_model_inputs(self, micro_batch: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        probe = self._gainrl_probe
        if probe is not None:
            mask = model_inputs.get("attention_mask")
            if mask is not None:  # use_remove_padding=False: [B, L] right-padded rows
                probe.device = mask.device
                probe.set_batch(None, attention_mask=mask)
            else:  # remove padding: one packed row, sequence b = tokens [cu[b], cu[b+1])
                cu_seqlens = micro_batch["input_ids"].offsets()
                probe.device = cu_seqlens.device
                probe.set_batch(None, cu_seqlens=cu_seqlens)
            probe.enabled = True
        return model_inputs, output_args

    def prepare_model_outputs(self, output: Any, output_args: Any, micro_batch: Any, logits_processor_func: Any):
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        probe = self._gainrl_probe
        if probe is not None:
            probe.enabled = False
            causal = probe.metrics().causal  # [B] float32, NaN for a sequence of < 2 tokens
            import torch

            offsets = torch.arange(causal.shape[0] + 1, device=causal.device)
            model_output[DEFAULT_ANGLE_KEY] = torch.nested.nested_tensor_from_jagged(causal, offsets)
        return model_output


class _AngleTrainingWorkerMixin:
    """verl 0.9.1's ``TrainingWorker`` (``verl/workers/engine_workers.py``) whose engine measures ``C_causal`` on
    request (:class:`_AngleEngineMixin` is put under the engine's own class once it is built)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        engine = self.engine
        if not all(callable(getattr(engine, m, None)) for m in ("prepare_model_inputs", "prepare_model_outputs")):
            raise NotImplementedError(f"GAIN-RL actor angles need verl's FSDP engine (actor strategy fsdp / fsdp2), "
                                      f"not {type(engine).__name__}")
        if not isinstance(engine, _AngleEngineMixin):
            engine.__class__ = make_angle_engine_class(type(engine))


class _AngleWorkerMixin:
    """verl 0.9.1's ``ActorRolloutRefWorker`` (``verl/workers/engine_workers.py``) whose actor (``actor_worker_cls``)
    is a ``GainRLTrainingWorker``; its reference model (``ref_worker_cls``) is left as it is."""


class _AngleTrainerMixin:
    """verl 0.9.1's V1 ``PPOTrainer`` (``verl/trainer/ppo/v1/trainer_base.py``) feeding the actor's ``C_causal`` to
    its :class:`GainRLReplayBuffer`: ``_init_resource_pool_mgr`` makes the actor workers
    ``GainRLActorRolloutRefWorker``; ``_compute_old_log_prob`` sends :data:`ANGLE_REQUEST` with the
    ``compute_log_prob`` call, then reads the ``gainrl_causal`` the actor wrote to TransferQueue for the batch's real
    (non-padding) trajectories -- one ``kv_batch_get`` of one float per trajectory per step -- and passes it to
    ``replay_buffer.record_angles``."""

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        import ray

        worker = getattr(sys.modules[__name__], "GainRLActorRolloutRefWorker")
        roles = [role for role in self.role_worker_mapping if getattr(role, "name", None) in _ACTOR_ROLES]
        if not roles:
            raise RuntimeError("GAIN-RL actor angles: the trainer has no actor worker to measure in")
        for role in roles:
            stock = getattr(self.role_worker_mapping[role], "__ray_actor_class__", None)
            if stock is not None and not issubclass(worker, stock):
                raise RuntimeError(f"GAIN-RL actor angles: the {role} worker is {stock.__name__}, not one "
                                   f"{worker.__name__} extends")
            self.role_worker_mapping[role] = ray.remote(worker)

    def _compute_old_log_prob(self, batch: Any, metrics: dict) -> Any:
        batch.extra_info[ANGLE_REQUEST] = dict(self.replay_buffer.gainrl_probe)
        try:
            out = super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(ANGLE_REQUEST, None)
        if isinstance(getattr(out, "extra_info", None), dict):
            out.extra_info.pop(ANGLE_REQUEST, None)  # the reference pass (LoRA: the actor again) must not measure
        metrics.update(self.replay_buffer.record_angles(_read_angles(batch)))
        return out


def _read_angles(batch: Any) -> np.ndarray:
    """``gainrl_causal`` of the real trajectories of ``batch`` (a ``KVBatchMeta``) from TransferQueue, ``[n]``."""
    import transfer_queue as tq

    keys = _real_keys(batch)
    if not keys:
        return np.zeros(0)
    try:
        values = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=[DEFAULT_ANGLE_KEY])[
            DEFAULT_ANGLE_KEY]
    except Exception as e:  # noqa: BLE001 - TransferQueue's error for a field that was never written
        raise RuntimeError(f"GAIN-RL actor angles: no {DEFAULT_ANGLE_KEY!r} for the batch (the old-log-prob forward "
                           "did not run on GainRL workers, e.g. rollout_correction.bypass_mode)") from e
    if hasattr(values, "is_nested") and values.is_nested:
        out = _to_numpy(values.values())
    elif hasattr(values, "detach"):
        out = _to_numpy(values)
    else:
        out = np.concatenate([_to_numpy(v).reshape(-1) for v in values]) if len(values) else np.zeros(0)
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    if out.size != len(keys):
        raise RuntimeError(f"GAIN-RL actor angles: {out.size} angles for {len(keys)} trajectories")
    return out


def install_actor_angles(trainer: Any) -> Any:
    """Make ``trainer`` (verl 0.9.1's V1 ``PPOTrainer``, before ``init()``) measure ``C_causal`` in its actor: its class
    becomes :func:`make_angle_trainer_class` of it (two overridden methods, nothing else). ``GainRLReplayBuffer``
    calls this itself with ``actor_angles: true``. Returns ``trainer``."""
    if not all(callable(getattr(trainer, m, None)) for m in ("_init_resource_pool_mgr", "_compute_old_log_prob")):
        raise RuntimeError(
            "GAIN-RL actor_angles: expected verl 0.9's V1 PPOTrainer (it builds the replay buffer with "
            f"refill_fn=trainer._add_prompts_to_generate), got {type(trainer).__name__}; subclass your trainer with "
            "gainrl.integrations.verl.make_angle_trainer_class instead"
        )
    if not isinstance(trainer, _AngleTrainerMixin):
        trainer.__class__ = make_angle_trainer_class(type(trainer))
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Classes on verl's bases, built on first access
# --------------------------------------------------------------------------------------------------------------


def _build(name: str, mixin: type, base: type, **attrs: Any) -> type:
    return type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": mixin.__doc__, **attrs})


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


@functools.cache
def make_angle_engine_class(base: type) -> type:
    """:class:`_AngleEngineMixin` on ``base`` (verl's ``FSDPEngineWithLMHead`` or a subclass of it)."""
    return _build(f"GainRLAngle{base.__name__}", _AngleEngineMixin, base)


def make_angle_training_worker_class(base: type) -> type:
    """``GainRLTrainingWorker`` on ``base`` (verl's ``TrainingWorker``)."""
    return _build("GainRLTrainingWorker", _AngleTrainingWorkerMixin, base)


def make_angle_worker_class(base: type, training_worker_cls: type) -> type:
    """``GainRLActorRolloutRefWorker`` on ``base`` (verl's ``ActorRolloutRefWorker``): its actor is a
    ``training_worker_cls``; its reference model stays ``base.ref_worker_cls``."""
    return _build("GainRLActorRolloutRefWorker", _AngleWorkerMixin, base, actor_worker_cls=training_worker_cls)


@functools.cache
def make_angle_trainer_class(base: type) -> type:
    """:class:`_AngleTrainerMixin` on ``base`` (verl's V1 ``PPOTrainerSync``, or any V1 ``PPOTrainer``)."""
    return _build(f"GainRLAngle{base.__name__}", _AngleTrainerMixin, base)


_VERL_BASES = {
    "GainRLCurriculumSampler": ("verl.experimental.dataset.sampler", "AbstractCurriculumSampler",
                                make_curriculum_sampler_class),
    "GainRLReplayBuffer": ("verl.trainer.ppo.v1.replay_buffer", "ReplayBuffer", make_replay_buffer_class),
    "GainRLDataset": ("verl.utils.dataset.rl_dataset", "RLHFDataset", make_dataset_class),
    "GainRLCheckpointCallback": ("verl.trainer.ppo.checkpoint_callback", "CheckpointCallback",
                                 make_checkpoint_callback_class),
    "GainRLTrainingWorker": ("verl.workers.engine_workers", "TrainingWorker", make_angle_training_worker_class),
    "GainRLActorRolloutRefWorker": ("verl.workers.engine_workers", "ActorRolloutRefWorker", lambda base: (
        make_angle_worker_class(base, getattr(sys.modules[__name__], "GainRLTrainingWorker")))),
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
    "ANGLE_REQUEST",
    "DEFAULT_ANGLE_KEY",
    "STATE_FILE",
    "curriculum_from_config",
    "install_actor_angles",
    "make_angle_engine_class",
    "make_angle_trainer_class",
    "make_angle_training_worker_class",
    "make_angle_worker_class",
    "make_checkpoint_callback_class",
    "make_curriculum_sampler_class",
    "make_dataset_class",
    "make_replay_buffer_class",
]
