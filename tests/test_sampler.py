"""Tests for gainrl.sampler: the Gaussian rank distribution, reproducibility, checkpoints and the μ update."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gainrl.sampler import (
    GaussianRankSampler,
    MuUpdateConfig,
    OrderedSampler,
    UniformSampler,
    make_sampler,
    mu_update,
)


def chi_square(counts: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic after merging (in rank order) bins whose expectation is below ``min_expected``;
    returns ``(statistic, degrees of freedom)``."""
    obs_bins, exp_bins = [], []
    o = e = 0.0
    for c, x in zip(counts, expected):
        o, e = o + c, e + x
        if e >= min_expected:
            obs_bins.append(o)
            exp_bins.append(e)
            o = e = 0.0
    if e > 0:  # leftover tail goes into the last bin
        obs_bins[-1] += o
        exp_bins[-1] += e
    obs, exp = np.asarray(obs_bins), np.asarray(exp_bins)
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


@pytest.mark.parametrize(("n_items", "sigma", "mu"), [(60, 8.0, 20.0), (40, 1000.0, 0.0), (50, 5.0, 49.0)])
def test_single_draw_matches_the_gaussian_formula(n_items, sigma, mu):
    draws = 20_000
    sampler = GaussianRankSampler(n_items, m=1, sigma=sigma, mu0=mu, seed=123)
    counts = np.bincount([sampler.sample_epoch()[0] for _ in range(draws)], minlength=n_items)
    r = np.arange(n_items)
    p = np.exp(-((r - mu) ** 2) / (2 * sigma**2))
    p /= p.sum()
    np.testing.assert_allclose(sampler.probabilities(), p, rtol=1e-12)
    stat, dof = chi_square(counts, draws * p)
    # 99.99th percentile of chi2(dof) is below dof + 6 * sqrt(2 dof) + 10 for these dof: a generous bound
    assert stat < dof + 6 * math.sqrt(2 * dof) + 10, (stat, dof)
    # and a wrong distribution (uniform) must fail the same test, so the test can fail
    wrong, _ = chi_square(counts, np.full(n_items, draws / n_items))
    if sigma < 100:
        assert wrong > dof + 6 * math.sqrt(2 * dof) + 10


def test_draws_are_distinct_sorted_and_concentrated_near_mu():
    sampler = GaussianRankSampler(5000, m=200, sigma=300, mu0=2500, seed=0)
    ranks = sampler.sample_epoch()
    assert len(ranks) == len(set(ranks)) == 200
    assert ranks == sorted(ranks)
    assert all(0 <= r < 5000 for r in ranks)
    assert abs(np.mean(ranks) - 2500) < 100
    assert sampler.epoch == 1
    shuffled = GaussianRankSampler(5000, m=200, sigma=300, mu0=2500, seed=0, shuffle=True).sample_epoch()
    assert sorted(shuffled) == ranks and shuffled != ranks


def test_m_equal_to_n_and_tiny_sigma_still_give_distinct_ranks():
    assert GaussianRankSampler(10, m=10, seed=1).sample_epoch() == list(range(10))
    ranks = GaussianRankSampler(100, m=90, sigma=0.01, mu0=50, seed=1).sample_epoch()
    assert len(set(ranks)) == 90


def test_reproducible_for_a_seed():
    a = GaussianRankSampler(1000, m=50, sigma=100, seed=7)
    b = GaussianRankSampler(1000, m=50, sigma=100, seed=7)
    c = GaussianRankSampler(1000, m=50, sigma=100, seed=8)
    ea = [a.sample_epoch() for _ in range(3)]
    assert ea == [b.sample_epoch() for _ in range(3)]
    assert ea != [c.sample_epoch() for _ in range(3)]


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "ordered"])
def test_state_round_trip_resumes_exactly(kind):
    kwargs = {"sigma": 50.0} if kind == "gaussian" else {}
    run = make_sampler(kind, 500, 37, seed=3, shuffle=True, **kwargs)
    for _ in range(2):
        run.sample_epoch()
        run.update_mu(0.8, 0.3)
    state = json.loads(json.dumps(run.state_dict()))  # plain types only
    expected = []
    for _ in range(3):
        expected.append(run.sample_epoch())
        run.update_mu(0.9, 0.1)

    resumed = make_sampler(kind, 500, 37, seed=999, **kwargs)  # another seed: the state must override it
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    got = []
    for _ in range(3):
        got.append(resumed.sample_epoch())
        resumed.update_mu(0.9, 0.1)
    assert got == expected
    assert resumed.state_dict() == run.state_dict()


def test_load_state_dict_rejects_mismatches():
    state = GaussianRankSampler(100, 10).state_dict()
    with pytest.raises(ValueError, match="kind|gaussian"):
        UniformSampler(100, 10).load_state_dict(state)
    with pytest.raises(ValueError, match="n_items"):
        GaussianRankSampler(101, 10).load_state_dict(state)


def test_mu_state_is_restored():
    s = GaussianRankSampler(10_000, 100, seed=0)
    s.update_mu(1.0, 0.5)
    t = GaussianRankSampler(10_000, 100, seed=0)
    t.load_state_dict(s.state_dict())
    assert t.mu == s.mu > 0


def expected_step(acc, ang, n=500, alpha=2, beta=0.5, lo=0, hi=1000):
    return min(max(n * math.tanh(alpha * (acc - beta)) + n * math.tanh(alpha * ang), lo), hi)


@pytest.mark.parametrize(
    ("acc", "ang"),
    [(0.5, 0.0), (0.75, 0.1), (0.6, -0.05), (0.9, 0.4), (1.0, 1.0), (0.2, 0.1), (0.0, -1.0), (0.55, 0.02)],
)
def test_mu_update_formula(acc, ang):
    mu = 3000.0
    assert mu_update(mu, acc, ang, 100_000) == pytest.approx(mu + expected_step(acc, ang), abs=1e-9)


def test_mu_update_clamps():
    n_items = 100_000
    # accuracy below β with no angle signal: negative step clipped to adj_min = 0
    assert mu_update(1234.0, 0.1, 0.0, n_items) == 1234.0
    # with the defaults the step is at most 500 tanh(1) + 500 tanh(2) ~ 862.8, below adj_max = 1000
    assert mu_update(1234.0, 1.0, 1.0, n_items) == pytest.approx(1234.0 + 500 * (math.tanh(1) + math.tanh(2)))
    # a large step is clipped to adj_max
    assert mu_update(1234.0, 1.0, 1.0, n_items, MuUpdateConfig(adj_max=300.0)) == 1534.0
    # above β, unclipped: 500 tanh(2 * 0.3) ~ 268.5
    assert mu_update(0.0, 0.8, 0.0, n_items) == pytest.approx(500 * math.tanh(0.6))
    # μ stays in [0, N - 1]
    assert mu_update(95.0, 1.0, 1.0, 100) == 99.0
    cfg = MuUpdateConfig(adj_min=-1000.0)
    assert mu_update(10.0, 0.0, -1.0, 100, cfg) == 0.0
    assert mu_update(500.0, 0.0, 0.0, 10_000, cfg) == pytest.approx(500 - 500 * math.tanh(1.0))
    # custom constants
    cfg = MuUpdateConfig(n=100, alpha=1, beta=0.25, adj_min=-50, adj_max=50)
    assert mu_update(200, 0.25, 0.3, 10_000, cfg) == pytest.approx(200 + 100 * math.tanh(0.3))


def test_mu_update_validation():
    with pytest.raises(ValueError, match="acc"):
        mu_update(0, 1.5, 0.0, 10)
    with pytest.raises(ValueError, match="acc"):
        mu_update(0, -0.1, 0.0, 10)
    with pytest.raises(ValueError, match="acc"):
        mu_update(0, float("nan"), 0.0, 10)
    with pytest.raises(ValueError, match="ang"):
        mu_update(0, 0.5, float("nan"), 10)
    with pytest.raises(ValueError, match="adj_min"):
        MuUpdateConfig(adj_min=10, adj_max=0)
    with pytest.raises(ValueError, match="acc"):
        UniformSampler(10, 2).update_mu(2.0, 0.0)
    with pytest.raises(ValueError, match="ang"):
        GaussianRankSampler(10, 2).update_mu(0.5, float("nan"))


def test_next_epoch_uses_the_new_mu():
    s = GaussianRankSampler(20_000, m=500, sigma=200, mu0=5000, seed=0)
    before = np.mean(s.sample_epoch())
    new_mu = s.update_mu(1.0, 1.0)
    assert new_mu == s.mu == pytest.approx(5000 + 500 * (math.tanh(1) + math.tanh(2)))
    after = np.mean(s.sample_epoch())
    assert after - before == pytest.approx(new_mu - 5000, abs=60)


def test_uniform_sampler():
    s = UniformSampler(100, 100, seed=0)
    assert s.sample_epoch() == list(range(100))
    s = UniformSampler(1000, 10, seed=0)
    draws = np.concatenate([s.sample_epoch() for _ in range(2000)])
    counts = np.bincount(draws, minlength=1000)
    stat, dof = chi_square(counts, np.full(1000, draws.size / 1000))
    assert stat < dof + 6 * math.sqrt(2 * dof) + 10
    assert s.update_mu(0.9, 0.2) is None


def test_ordered_sampler_walks_and_wraps():
    s = OrderedSampler(10, 4)
    assert [s.sample_epoch() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    s = OrderedSampler(10, 4, shuffle=True, seed=0)
    assert sorted(s.sample_epoch()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1), "n_items"),
        ((10, 0), "m"),
        ((10, 11), "m"),
    ],
)
def test_constructor_validation(args, match):
    with pytest.raises(ValueError, match=match):
        GaussianRankSampler(*args)
    with pytest.raises(ValueError, match="sigma"):
        GaussianRankSampler(10, 2, sigma=0)
    with pytest.raises(ValueError, match="mu0"):
        GaussianRankSampler(10, 2, mu0=10)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope", 10, 2)


def test_m2_draws_are_successive_sampling():
    """Without replacement = draw one ∝ w, then one ∝ w among the rest: check inclusion frequencies."""
    n, sigma, mu, draws = 6, 1.5, 1.0, 20_000
    s = GaussianRankSampler(n, m=2, sigma=sigma, mu0=mu, seed=5)
    p = s.probabilities()
    inclusion = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(n) if j != i) for i in range(n)])
    counts = np.bincount(np.concatenate([s.sample_epoch() for _ in range(draws)]), minlength=n)
    np.testing.assert_allclose(counts / draws, inclusion, atol=0.015)
