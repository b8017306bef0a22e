"""GAIN-RL inside existing RL engines: TRL (:mod:`gainrl.integrations.trl`) and verl (:mod:`gainrl.integrations.verl`).

This package holds the engine-agnostic part both plug-ins share, :class:`GainRLCurriculum`: the epoch state machine
of DESIGN.md §2 on top of :class:`gainrl.sampler.GaussianRankSampler`:

1. ``ranks()`` draws this epoch's ``m`` distinct score ranks once (a second call returns the same draw, so an engine
   that re-iterates its sampler, or resumes mid-epoch and skips batches, sees the same stream);
   ``indices()`` maps them to dataset indices through the ``gainrl score`` order;
2. the engine reports rollout feedback as sums (``add(acc_sum, acc_n, ang_sum, ang_n)``, or passes the global sums to
   ``finish_epoch``): ``acc`` is 0/1 correctness (not a raw reward), ``ang`` is ``C_causal``;
3. ``finish_epoch()`` applies ``μ ← μ + clip(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max)`` with the epoch
   means, logs a record in ``history`` and clears the draw: the next epoch samples with the *new* μ;
4. ``state_dict()`` / ``load_state_dict()`` are plain JSON (μ, the generator state, the draw in progress, the
   feedback gathered so far in it, and the history), so a resumed run draws what the uninterrupted run would have.

Importing this package imports neither TRL nor verl.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gainrl.sampler import GaussianRankSampler, MuUpdateConfig

STATE_VERSION = 1


def load_order(source: Any, dataset_size: int | None = None) -> list[int]:
    """Dataset indices sorted by descending angle score, i.e. rank ``r`` -> dataset index ``order[r]``.

    Args:
        source: a ``gainrl score`` output directory (its ``order.pt``), a ``.pt`` file holding an int64 tensor, a
            ``.json`` file holding a list, or the order itself (sequence, numpy array or tensor).
        dataset_size: when given, every index must be ``< dataset_size``.

    Raises:
        ValueError: not 1-D integers, empty, negative, duplicated, or out of range indices; FileNotFoundError.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "order.pt"
        if not path.exists():
            raise FileNotFoundError(f"order: {path} does not exist (run `gainrl score` first)")
        if path.suffix == ".json":
            source = json.loads(path.read_text())
        else:
            import torch

            source = torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(source, "detach"):  # torch tensor
        source = source.detach().cpu().numpy()
    arr = np.asarray(source)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"order: expected a non-empty 1-D list of dataset indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"order: expected integer dataset indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"order: negative dataset index {int(arr.min())}")
    if np.unique(arr).size != arr.size:
        raise ValueError("order: dataset indices must be distinct")
    if dataset_size is not None and arr.max() >= dataset_size:
        raise ValueError(f"order: dataset index {int(arr.max())} out of range for a dataset of {dataset_size} rows")
    return [int(i) for i in arr]


def _finite(x: float, name: str) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


class GainRLCurriculum:
    """GAIN-RL's epoch loop over a score order, independent of the training engine.

    Args:
        order: dataset indices by descending score (see :func:`load_order`); rank ``r`` is ``order[r]``.
        samples_per_epoch: ``m``, distinct prompts drawn per epoch.
        sigma, mu0, seed, shuffle, mu_cfg: as :class:`gainrl.sampler.GaussianRankSampler` (defaults σ = 1000, μ₀ = 0,
            ``n = 500, α = 2, β = 0.5, adj ∈ [0, 1000]``).
        use_angle: with ``False`` the angle term is left out (``ang = 0``: accuracy-only ablation).

    Attributes:
        epoch: index of the epoch in progress (= number of μ updates applied so far).
        history: one record per finished epoch: ``epoch, mu_before, mu_after, acc, ang, n_acc, n_ang``
            (``skipped`` when the epoch had no feedback and μ was left as it was).
    """

    def __init__(
        self,
        order: Sequence[int],
        samples_per_epoch: int,
        *,
        sigma: float = 1000.0,
        mu0: float = 0.0,
        seed: int = 0,
        shuffle: bool = False,
        mu_cfg: MuUpdateConfig | None = None,
        use_angle: bool = True,
    ) -> None:
        self.order = load_order(order)
        self.sampler = GaussianRankSampler(
            len(self.order), samples_per_epoch, sigma=sigma, mu0=mu0, seed=seed, shuffle=shuffle, mu_cfg=mu_cfg
        )
        self.use_angle = bool(use_angle)
        self.epoch = 0
        self._ranks: list[int] | None = None
        self._indices: list[int] = []
        self._mu_at_draw: float | None = None
        self.pending = [0.0, 0.0, 0.0, 0.0]  # acc_sum, acc_n, ang_sum, ang_n of the epoch in progress
        self.history: list[dict[str, Any]] = []

    # -- drawing ---------------------------------------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return self.sampler.n_items

    @property
    def m(self) -> int:
        return self.sampler.m

    @property
    def mu(self) -> float:
        return self.sampler.mu

    @property
    def drawn(self) -> bool:
        """Whether the epoch in progress has been drawn."""
        return self._ranks is not None

    def ranks(self, draw: bool = True) -> list[int]:
        """This epoch's ``m`` ranks, drawn at the first call of the epoch (with the current μ).

        With ``draw=False`` an epoch not drawn yet is an error (for copies of the curriculum, e.g. in data-loader
        worker processes, which must read the main process's draw, never make their own)."""
        if self._ranks is None:
            if not draw:
                raise RuntimeError(f"GAIN-RL epoch {self.epoch} has not been drawn")
            self._mu_at_draw = self.sampler.mu
            self._ranks = self.sampler.sample_epoch()
            self._indices = [self.order[r] for r in self._ranks]
        return list(self._ranks)

    def indices(self, draw: bool = True) -> list[int]:
        """This epoch's dataset indices, ``order[r]`` for each drawn rank ``r``, in draw order."""
        self.ranks(draw)
        return list(self._indices)

    def index_at(self, position: int, draw: bool = True) -> int:
        """Dataset index of the ``position``-th prompt of this epoch (O(1))."""
        if self._ranks is None:
            self.ranks(draw)
        return self._indices[position]

    # -- feedback --------------------------------------------------------------------------------------------------

    def add(self, acc_sum: float, acc_n: float, ang_sum: float = 0.0, ang_n: float = 0.0) -> None:
        """Add rollout feedback of the epoch in progress: sums of 0/1 correctness and of ``C_causal``, and counts."""
        vals = [_finite(acc_sum, "acc_sum"), _finite(acc_n, "acc_n"), _finite(ang_sum, "ang_sum"),
                _finite(ang_n, "ang_n")]
        if vals[1] < 0 or vals[3] < 0:
            raise ValueError("counts must be >= 0")
        if not 0.0 <= vals[0] <= vals[1]:
            raise ValueError(f"acc_sum={vals[0]} must lie in [0, acc_n={vals[1]}] (0/1 correctness, not a reward)")
        self.pending = [p + v for p, v in zip(self.pending, vals, strict=True)]

    def finish_epoch(self, totals: Sequence[float] | None = None) -> dict[str, Any]:
        """Close the epoch in progress and apply the μ update (DESIGN.md §2).

        Args:
            totals: ``[acc_sum, acc_n, ang_sum, ang_n]`` gathered elsewhere (e.g. across ranks); added to
                :attr:`pending` (which holds what :meth:`add` or a checkpoint carried in).

        Returns:
            the history record of the epoch. An epoch without any correctness feedback (``acc_n == 0``) leaves μ as
            it was (``skipped``).

        Raises:
            RuntimeError: correctness feedback but no angle (``ang_n == 0``) while ``use_angle``: the probe measured
                nothing, which is a wiring bug, not a signal.
            ValueError: ``acc`` outside ``[0, 1]`` (a raw reward was passed instead of 0/1 correctness).
        """
        if totals is not None:
            if len(totals) != 4:
                raise ValueError(f"totals: expected [acc_sum, acc_n, ang_sum, ang_n], got {list(totals)}")
            self.add(*totals)
        acc_sum, acc_n, ang_sum, ang_n = self.pending
        mu_before = self.sampler.mu
        record: dict[str, Any] = {
            "epoch": self.epoch, "mu_at_draw": self._mu_at_draw, "mu_before": mu_before,
            "n_acc": acc_n, "n_ang": ang_n, "acc_sum": acc_sum, "ang_sum": ang_sum,
        }
        if acc_n <= 0:
            record.update(acc=None, ang=None, mu_after=mu_before, skipped=True)
        else:
            acc = acc_sum / acc_n
            if self.use_angle:
                if ang_n <= 0:
                    raise RuntimeError(
                        f"GAIN-RL epoch {self.epoch}: {acc_n:g} correctness values but no angle measurement; the "
                        "angle probe did not run inside the policy forward (or pass use_angle=False)"
                    )
                ang = ang_sum / ang_n
            else:
                ang = 0.0
            mu_after = self.sampler.update_mu(acc, ang)
            record.update(acc=acc, ang=ang, mu_after=mu_after, skipped=False)
        self.history.append(record)
        self.epoch += 1
        self._ranks = None
        self._indices = []
        self._mu_at_draw = None
        self.pending = [0.0, 0.0, 0.0, 0.0]
        return record

    # -- checkpointing ---------------------------------------------------------------------------------------------

    def state_dict(self, pending: Sequence[float] | None = None) -> dict[str, Any]:
        """JSON-able state. ``pending`` overrides :attr:`pending` (e.g. with sums gathered across ranks)."""
        return {
            "version": STATE_VERSION,
            "order_len": len(self.order),
            "order_head": self.order[:8],
            "use_angle": self.use_angle,
            "epoch": self.epoch,
            "ranks": self._ranks,
            "mu_at_draw": self._mu_at_draw,
            "pending": [float(x) for x in (pending if pending is not None else self.pending)],
            "history": self.history,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the order must have the same length (and start)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"GAIN-RL state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["order_len"] != len(self.order) or state["order_head"] != self.order[: len(state["order_head"])]:
            raise ValueError("GAIN-RL state was saved with a different score order")
        if state["sampler"].get("m", self.m) != self.m:
            raise ValueError(f"GAIN-RL state has samples_per_epoch={state['sampler']['m']}, this run {self.m}")
        saved_angle = bool(state.get("use_angle", self.use_angle))
        if saved_angle != self.use_angle:  # the epoch's feedback (and the trainer's probe setup) depend on it
            raise ValueError(f"GAIN-RL state was saved with use_angle={saved_angle}, this run has "
                             f"use_angle={self.use_angle}: resume with the same setting")
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])
        self._ranks = None if state["ranks"] is None else [int(r) for r in state["ranks"]]
        self._indices = [self.order[r] for r in self._ranks] if self._ranks is not None else []
        self._mu_at_draw = state.get("mu_at_draw")
        self.pending = [float(x) for x in state["pending"]]
        self.history = list(state["history"])

    def save_json(self, path: str | os.PathLike, pending: Sequence[float] | None = None) -> None:
        """Write :meth:`state_dict` to ``path`` atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state_dict(pending), indent=1))
        os.replace(tmp, path)

    def load_json(self, path: str | os.PathLike) -> None:
        self.load_state_dict(json.loads(Path(path).read_text()))


#: Curricula shared inside one process by plug-ins that an engine builds separately (verl's replay buffer registers
#: its curriculum here, verl's dataset class reads it), keyed by name.
SHARED_CURRICULA: dict[str, GainRLCurriculum] = {}


__all__ = ["GainRLCurriculum", "SHARED_CURRICULA", "STATE_VERSION", "load_order"]
