"""Epoch samplers over score ranks: GAIN-RL's Gaussian sampler and the baselines (DESIGN.md §2).

The data are sorted once by descending angle score; rank ``r = 0 .. N-1`` indexes that order (any other sort key,
e.g. length, works the same way). Each epoch a sampler returns ``m`` distinct ranks, in rank order unless
``shuffle=True``; after the epoch the trainer reports ``acc`` (mean 0/1 correctness of that epoch's rollouts) and
``ang`` (mean ``C_causal``) to :meth:`RankSampler.update_mu`, and the next epoch samples with the new ``μ``.

All randomness comes from one ``numpy.random.Generator`` (PCG64) per sampler whose state is part of
:meth:`RankSampler.state_dict`, so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MuUpdateConfig:
    """Constants of the μ update ``μ ← μ + clip(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max)``."""

    n: float = 500.0
    alpha: float = 2.0
    beta: float = 0.5
    adj_min: float = 0.0
    adj_max: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("n", "alpha", "beta", "adj_min", "adj_max"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.adj_min > self.adj_max:
            raise ValueError(f"adj_min ({self.adj_min}) must be <= adj_max ({self.adj_max})")


def mu_update(mu: float, acc: float, ang: float, n_items: int, cfg: MuUpdateConfig | None = None) -> float:
    """The GAIN-RL μ update (DESIGN.md §2).

    ``μ' = clamp(μ + clip(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max), 0, n_items − 1)``.

    Args:
        mu: current centre rank.
        acc: mean correctness of the epoch's rollouts, in ``[0, 1]`` (not a raw reward on another scale).
        ang: mean ``C_causal`` of the epoch's rollouts (any finite value; cosines lie in ``[-1, 1]``).
        n_items: number of ranked items ``N``.
        cfg: update constants (defaults ``n=500, α=2, β=0.5, adj_min=0, adj_max=1000``).

    Raises:
        ValueError: ``acc`` outside ``[0, 1]`` or not finite, ``ang`` NaN / infinite, ``mu`` not finite,
            ``n_items < 1``.
    """
    cfg = cfg or MuUpdateConfig()
    acc, ang, mu = float(acc), float(ang), float(mu)
    if not (0.0 <= acc <= 1.0):  # also rejects NaN
        raise ValueError(f"acc must be a mean correctness in [0, 1], got {acc}")
    if not math.isfinite(ang):
        raise ValueError(f"ang must be finite (mean C_causal of the epoch's rollouts), got {ang}")
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    step = cfg.n * math.tanh(cfg.alpha * (acc - cfg.beta)) + cfg.n * math.tanh(cfg.alpha * ang)
    step = min(max(step, cfg.adj_min), cfg.adj_max)
    return min(max(mu + step, 0.0), float(n_items - 1))


def gaussian_log_weights(n_items: int, mu: float, sigma: float) -> np.ndarray:
    """Unnormalized log-probabilities ``−(r − μ)² / (2σ²)`` of ranks ``r = 0 .. n_items − 1``."""
    r = np.arange(n_items, dtype=np.float64)
    return -((r - mu) ** 2) / (2.0 * sigma * sigma)


class RankSampler(ABC):
    """Base class: draws ``m`` distinct ranks out of ``n_items`` per epoch.

    Use::

        ranks = sampler.sample_epoch()      # this epoch's ranks; advances ``epoch``
        ...train on items[ranks]...
        sampler.update_mu(acc, ang)         # no-op except for the Gaussian sampler
    """

    kind: str = "base"

    def __init__(self, n_items: int, m: int, seed: int = 0, shuffle: bool = False) -> None:
        if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
            raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n_items:
            raise ValueError(f"m must be an integer in [1, n_items={n_items}], got {m!r}")
        self.n_items = int(n_items)
        self.m = int(m)
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._rng = np.random.default_rng(seed)

    @abstractmethod
    def _draw(self) -> np.ndarray:
        """This epoch's ranks (any order)."""

    def _order(self, ranks: np.ndarray) -> np.ndarray:
        """Sorted ranks, or permuted ones with ``shuffle``."""
        return self._rng.permutation(ranks) if self.shuffle else np.sort(ranks)

    def sample_epoch(self) -> list[int]:
        """Draw this epoch's ``m`` distinct ranks and advance ``epoch``."""
        ranks = self._order(self._draw())
        self.epoch += 1
        return [int(r) for r in ranks]

    def update_mu(self, acc: float, ang: float) -> float | None:
        """Feed back the epoch's accuracy and angle signal; only the Gaussian sampler uses them.

        The baselines validate the arguments like :func:`mu_update` (so a trainer bug shows up whichever sampler
        runs) and return ``None``.
        """
        mu_update(0.0, acc, ang, self.n_items)
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain Python types: fine for ``torch.save`` and JSON)."""
        return {
            "kind": self.kind,
            "n_items": self.n_items,
            "m": self.m,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the sampler kind and ``n_items`` must match."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for a {state.get('kind')!r} sampler, this is {self.kind!r}")
        if state.get("n_items") != self.n_items:
            raise ValueError(f"state has n_items={state.get('n_items')}, this sampler has {self.n_items}")
        m = state.get("m", self.m)
        if not 1 <= m <= self.n_items:
            raise ValueError(f"state has m={m} outside [1, {self.n_items}]")
        self.m = int(m)
        self.seed = state.get("seed", self.seed)
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self._rng.bit_generator.state = state["rng"]


class GaussianRankSampler(RankSampler):
    """GAIN-RL sampling: ``m`` distinct ranks per epoch, ``P(r) ∝ exp(−(r − μ)² / (2σ²))``.

    Without replacement means successive sampling: the first rank is drawn with those probabilities, the next
    from the remaining ranks renormalized, and so on. It is drawn in one pass with the Gumbel-top-k trick
    (the ``m`` largest ``log w_r + Gumbel`` keys), in log space, so far tails never underflow to an impossible
    draw when ``m`` approaches ``N``.
    """

    kind = "gaussian"

    def __init__(
        self,
        n_items: int,
        m: int,
        sigma: float = 1000.0,
        mu0: float = 0.0,
        seed: int = 0,
        shuffle: bool = False,
        mu_cfg: MuUpdateConfig | None = None,
    ) -> None:
        super().__init__(n_items, m, seed, shuffle)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}")
        if not (math.isfinite(mu0) and 0 <= mu0 <= self.n_items - 1):
            raise ValueError(f"mu0 must be in [0, n_items - 1 = {self.n_items - 1}], got {mu0}")
        self.sigma = float(sigma)
        self.mu = float(mu0)
        self.mu_cfg = mu_cfg or MuUpdateConfig()

    def probabilities(self) -> np.ndarray:
        """Single-draw probabilities of every rank at the current ``μ`` (sums to 1)."""
        logw = gaussian_log_weights(self.n_items, self.mu, self.sigma)
        w = np.exp(logw - logw.max())
        return w / w.sum()

    def _draw(self) -> np.ndarray:
        if self.m == self.n_items:
            return np.arange(self.n_items)
        keys = gaussian_log_weights(self.n_items, self.mu, self.sigma) + self._rng.gumbel(size=self.n_items)
        return np.argpartition(keys, -self.m)[-self.m :]

    def update_mu(self, acc: float, ang: float) -> float:
        """Apply :func:`mu_update` with this sampler's constants; returns the new ``μ``."""
        self.mu = mu_update(self.mu, acc, ang, self.n_items, self.mu_cfg)
        return self.mu

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mu": self.mu, "sigma": self.sigma, "mu_cfg": asdict(self.mu_cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mu = float(state["mu"])
        self.sigma = float(state.get("sigma", self.sigma))
        if "mu_cfg" in state:
            self.mu_cfg = MuUpdateConfig(**state["mu_cfg"])


class UniformSampler(RankSampler):
    """Vanilla GRPO baseline: ``m`` ranks uniformly without replacement each epoch."""

    kind = "uniform"

    def _draw(self) -> np.ndarray:
        return self._rng.choice(self.n_items, size=self.m, replace=False)


class OrderedSampler(RankSampler):
    """Fixed-order baseline: walks through the ranks sequentially, ``m`` per epoch, wrapping around at ``N``.

    With ``shuffle=False`` an epoch is returned in walk order (ascending, except across the wrap-around).
    """

    kind = "ordered"

    def __init__(self, n_items: int, m: int, seed: int = 0, shuffle: bool = False, start: int = 0) -> None:
        super().__init__(n_items, m, seed, shuffle)
        if not 0 <= start < self.n_items:
            raise ValueError(f"start must be in [0, n_items), got {start}")
        self.cursor = int(start)

    def _draw(self) -> np.ndarray:
        ranks = (self.cursor + np.arange(self.m)) % self.n_items
        self.cursor = int((self.cursor + self.m) % self.n_items)
        return ranks

    def _order(self, ranks: np.ndarray) -> np.ndarray:
        return self._rng.permutation(ranks) if self.shuffle else ranks

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cursor = int(state["cursor"])


SAMPLERS: dict[str, type[RankSampler]] = {
    cls.kind: cls for cls in (GaussianRankSampler, UniformSampler, OrderedSampler)
}


def make_sampler(kind: str, n_items: int, m: int, **kwargs: Any) -> RankSampler:
    """Build a sampler by name: ``"gaussian"`` (GAIN-RL), ``"uniform"`` or ``"ordered"``."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler kind {kind!r} (known: {sorted(SAMPLERS)})")
    return SAMPLERS[kind](n_items, m, **kwargs)
