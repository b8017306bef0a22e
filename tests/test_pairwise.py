"""angle_pairwise (flash-style causal pair sums per segment pair) vs float64 explicit cosine matrices.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gainrl_kernels.naive_pairwise import (  # noqa: E402
    angle_pairwise_naive,
    pairwise_from_segment_sums,
    segment_unit_sums,
)
from gainrl_kernels.pairwise import angle_pairwise, angle_pairwise_check  # noqa: E402
from triton_env import needs_triton, triton_device  # noqa: E402

pytestmark = needs_triton

DEV = triton_device()
DIM = 40  # not a multiple of the 32-wide D slice
LENS = [5, 0, 1, 45, 23]  # 45 > BLOCK_M = 32: two query tiles, key loop over two tiles
SEG = [[0, 1, 3, 5], [0, 0, 0, 0], [0, 0, 1, 1], [2, 9, 30, 44], [0, 10, 10, 23]]


def concentrated(rows: int, dim: int, noise: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Shared direction + noise (mean pairwise cosine ~0.4; no zero rows), float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    return base + noise * torch.randn(rows, dim, generator=g)


@pytest.fixture(scope="module")
def data() -> dict:
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(cu[-1]) + 2  # trailing rows in no sequence
    return {"h": concentrated(rows, DIM).to(DEV), "cu": cu.to(DEV),
            "off": torch.tensor(SEG, dtype=torch.int32, device=DEV)}


def test_input_generator_is_concentrated(data):
    u = torch.nn.functional.normalize(data["h"].double(), dim=-1)
    n = u.shape[0]
    mean = ((u @ u.T).sum() - n) / (n * (n - 1))
    assert 0.2 < float(mean) < 0.8


# fp32: dot with TF32 off ("ieee"), fp32 accumulation -> ~1e-7 relative per term.
# bf16: the reference uses the same rounded inputs; products of bf16 are exact in fp32, so only accumulation
# order differs and the tolerance can stay tight.
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", ["cos", "abs", "square"])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_matches_naive(data, dtype, fn, window):
    h = data["h"].to(dtype)
    got = angle_pairwise(h, data["cu"], data["off"], fn=fn, window=window)
    assert got.shape == (5, 3, 3) and got.dtype == torch.float32
    ref = angle_pairwise_naive(h, data["cu"], data["off"], fn=fn, window=window)
    torch.testing.assert_close(got.cpu().double(), ref, **TOL[dtype])
    if window is None:
        assert bool((torch.triu(got, diagonal=1) == 0).all())  # no causal pair goes forward


def test_window_zero_and_default_segments(data):
    h, cu = data["h"], data["cu"]
    assert bool((angle_pairwise(h, cu, data["off"], window=0) == 0).all())
    got = angle_pairwise(h, cu, None, fn="square", window=40)
    assert got.shape == (5, 1, 1)
    ref = angle_pairwise_naive(h, cu, None, "square", 40)
    torch.testing.assert_close(got.double().cpu(), ref, **TOL[torch.float32])


def test_fp16_and_non_contiguous(data):
    h, cu, off = data["h"], data["cu"], data["off"]
    wide = torch.zeros(h.shape[0], 2 * DIM, device=DEV, dtype=torch.float16)
    wide[:, 1::2] = h.half()
    hv = wide[:, 1::2]
    assert not hv.is_contiguous()
    got = angle_pairwise(hv, cu, off, fn="abs", window=3)
    torch.testing.assert_close(got.double().cpu(), angle_pairwise_naive(hv, cu, off, "abs", 3), rtol=2e-3, atol=1e-3)
    cu_view, off_view = torch.stack([cu, cu + 3], dim=1)[:, 0], off.t().contiguous().t()  # strided index tensors
    assert torch.equal(angle_pairwise(hv, cu_view, off_view, fn="abs", window=3), got)


def test_unvalidated_bounds_are_clamped(data):
    """validate=False: a negative or too large cu_seqlens entry is clamped into [0, T] (never read out of bounds)."""
    h = data["h"]
    t = h.shape[0]
    cu = torch.tensor([0, 12], dtype=torch.int32, device=DEV)
    want = angle_pairwise(h, cu, None, fn="square")
    for bad in ([-40, 12], [0, 12]):
        got = angle_pairwise(h, torch.tensor(bad, dtype=torch.int32, device=DEV), None, fn="square", validate=False)
        torch.testing.assert_close(got, want)
    tail = angle_pairwise(h, torch.tensor([t - 5, t + 50], dtype=torch.int32, device=DEV), None, validate=False)
    ref = angle_pairwise(h[t - 5:], torch.tensor([0, 5], dtype=torch.int32, device=DEV), None)
    torch.testing.assert_close(tail, ref)


def test_long_window_multi_tile():
    """A 70-token sequence (3 query tiles), D = 96 (three D slices), window spanning tile borders."""
    h = concentrated(70, 96, seed=4).to(DEV, torch.bfloat16)
    cu = torch.tensor([0, 70], dtype=torch.int32, device=DEV)
    off = torch.tensor([[3, 20, 50, 68]], dtype=torch.int32, device=DEV)
    got = angle_pairwise(h, cu, off, fn="cos", window=40)
    torch.testing.assert_close(got.double().cpu(), angle_pairwise_naive(h, cu, off, "cos", 40), **TOL[torch.bfloat16])


def test_segment_sum_cross_check(data):
    res = angle_pairwise_check(data["h"], data["cu"], data["off"])
    assert res.ok, res.max_abs_err
    assert res.max_abs_err < 1e-3
    # the closed form itself equals the explicit-matrix reference
    s, q = segment_unit_sums(data["h"], data["cu"], data["off"])
    ref = angle_pairwise_naive(data["h"], data["cu"], data["off"], "cos", None)
    torch.testing.assert_close(pairwise_from_segment_sums(s, q).cpu(), ref, rtol=1e-10, atol=1e-10)


def test_deterministic(data):
    a = angle_pairwise(data["h"], data["cu"], data["off"], fn="abs")
    b = angle_pairwise(data["h"], data["cu"], data["off"], fn="abs")
    assert torch.equal(a, b)


def test_empty_batch():
    h = concentrated(4, DIM).to(DEV)
    out = angle_pairwise(h, torch.zeros(1, dtype=torch.int32, device=DEV))
    assert out.shape == (0, 1, 1)
    out = angle_pairwise(h, torch.tensor([0, 0, 1], dtype=torch.int32, device=DEV))
    assert out.tolist() == [[[0.0]], [[0.0]]]


def test_validation_errors(data):
    h, cu, off = data["h"], data["cu"], data["off"]
    cases = [
        ("hidden", dict(hidden=h[0])),
        ("hidden", dict(hidden=h.double())),
        ("cu_seqlens", dict(cu_seqlens=cu.long())),
        ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 900], dtype=torch.int32, device=DEV), seg_offsets=None)),
        ("cu_seqlens", dict(cu_seqlens=torch.tensor([1, 2], dtype=torch.int32, device=DEV), seg_offsets=None)),
        ("seg_offsets", dict(seg_offsets=off[:, :1])),
        ("seg_offsets", dict(seg_offsets=off.long())),
        ("seg_offsets", dict(seg_offsets=off + 50)),
        ("seg_offsets", dict(seg_offsets=off.flip(1))),
        ("fn", dict(fn="sin")),
        ("window", dict(window=-1)),
        ("window", dict(window=2.5)),
    ]
    for name, kw in cases:
        args = dict(hidden=h, cu_seqlens=cu, seg_offsets=off, fn="cos", window=None)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            angle_pairwise(**args)
