"""Triton angle_concentration (one launch, the CUDA path) against the PyTorch form and explicit cosine matrices.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); on a GPU, angle_concentration takes this
kernel for every CUDA call with 1 to 16 segments, so tests/test_angle_stats.py covers it there too.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gainrl_kernels.concentration import _concentration  # noqa: E402
from gainrl_kernels.triton_concentration import MAX_SEGMENTS, block_sizes, concentration_triton  # noqa: E402
from triton_env import needs_triton, triton_device  # noqa: E402

pytestmark = needs_triton
DEV = triton_device()
NAMES = ("intra", "inter", "score", "causal", "causal_ref")


def random_stats(batch: int, n_seg: int, dim: int, seed: int, count_dtype=torch.int32):
    """Stats of real unit vectors (so every mean is a true mean): counts 0..6 per segment, some sequences empty.
    Also returns the vectors themselves, [b][k] -> [n_k, D] float64, for explicit pairwise means."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(0, 7, (batch, n_seg), generator=g)
    if batch > 1:
        count[1] = 0  # an empty sequence
    if n_seg > 1 and batch > 2:
        count[2, :] = torch.tensor([1] + [0] * (n_seg - 1))  # a single token in all
    unit_sum = torch.zeros(batch, n_seg, dim, dtype=torch.float64)
    sq = torch.zeros(batch, n_seg, dtype=torch.float64)
    adjacent = torch.zeros(batch, dtype=torch.float64)
    base = torch.randn(dim, generator=g, dtype=torch.float64)
    vectors = []
    for b in range(batch):
        us = [torch.nn.functional.normalize(base + torch.randn(int(c), dim, generator=g, dtype=torch.float64), dim=-1)
              for c in count[b]]
        for k, u in enumerate(us):
            unit_sum[b, k] = u.sum(0)
            sq[b, k] = (u * u).sum()
        allu = torch.cat(us)
        adjacent[b] = (allu[1:] * allu[:-1]).sum() if len(allu) > 1 else 0.0
        vectors.append(us)
    return unit_sum, count.to(count_dtype), sq, adjacent, vectors


def pair_mean(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Mean cosine over distinct pairs of a (b None) or over all pairs of a x b (self pairs included when b is a),
    read off the explicit cosine matrix; NaN without pairs."""
    if b is not None:
        return float((a @ b.T).mean()) if len(a) and len(b) else float("nan")
    n = len(a)
    return float(((a @ a.T).sum() - (a * a).sum()) / (n * (n - 1))) if n >= 2 else float("nan")


def as_device(*ts, dtype=torch.float32):
    return [t.to(DEV, dtype) if t.is_floating_point() else t.to(DEV) for t in ts]


@pytest.mark.parametrize("n_seg", [1, 2, 3, 5, MAX_SEGMENTS])
def test_matches_torch_form_and_float64(n_seg):
    u64, count, sq64, adj64, vectors = random_stats(6, n_seg, 37, seed=n_seg)
    unit_sum, sq, adj = as_device(u64, sq64, adj64)
    count = count.to(DEV)
    got = concentration_triton(unit_sum, count, sq, adj, 0.7)
    want = _concentration(unit_sum, count, sq, adj, 0.7)
    ref = _concentration(u64, count.cpu(), sq64, adj64, 0.7)  # the same formulas in float64
    for name in NAMES:
        g, w, r = getattr(got, name), getattr(want, name), getattr(ref, name)
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
    assert torch.isnan(got.causal[1]) and torch.isnan(got.causal_ref[1])  # the empty sequence
    # independent of the formulas: means read off the explicit cosine matrices
    for b, us in enumerate(vectors):
        explicit_causal = pair_mean(torch.cat(us))
        torch.testing.assert_close(float(got.causal[b]), explicit_causal, rtol=1e-4, atol=1e-5, equal_nan=True)
        for k in range(n_seg):
            torch.testing.assert_close(float(got.intra[b, k]), pair_mean(us[k]), rtol=1e-4, atol=1e-5,
                                       equal_nan=True)
            for j in range(n_seg):
                torch.testing.assert_close(float(got.inter[b, k, j]), pair_mean(us[k], us[j]), rtol=1e-4, atol=1e-5,
                                           equal_nan=True)


def test_wide_rows_int64_counts_and_strided_inputs():
    """D spans several column blocks; count int64; unit_sum a non-contiguous view."""
    n_seg = 3
    u64, count, sq64, adj64, _ = random_stats(4, n_seg, 300, seed=9, count_dtype=torch.int64)
    assert 300 > block_sizes(n_seg)[1]
    unit_sum, sq, adj = as_device(u64, sq64, adj64)
    wide = torch.zeros(4, n_seg, 600, device=DEV)
    wide[..., ::2] = unit_sum
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    got = concentration_triton(strided, count.to(DEV), sq, adj, 1.0)
    want = _concentration(unit_sum, count.to(DEV), sq, adj, 1.0)
    for name in NAMES:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-4, equal_nan=True)


def test_empty_batch_and_too_many_segments():
    got = concentration_triton(torch.zeros(0, 2, 8, device=DEV), torch.zeros(0, 2, dtype=torch.int32, device=DEV),
                               torch.zeros(0, 2, device=DEV), torch.zeros(0, device=DEV), 1.0)
    assert got.inter.shape == (0, 2, 2) and got.score.shape == (0,)
    k = MAX_SEGMENTS + 1
    with pytest.raises(ValueError, match="unit_sum: at most"):
        concentration_triton(torch.zeros(1, k, 8, device=DEV), torch.zeros(1, k, dtype=torch.int32, device=DEV),
                             torch.zeros(1, k, device=DEV), torch.zeros(1, device=DEV), 1.0)
