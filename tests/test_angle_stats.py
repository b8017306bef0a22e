"""angle_stats / angle_concentration on every available backend against the float64 cosine-matrix reference."""
from __future__ import annotations

import math

import pytest
import torch

from angle_inputs import packed_batch
from gainrl_kernels import angle_concentration, angle_stats
from gainrl_kernels.extension import has_ext_kernel
from gainrl_kernels.naive import naive_angle_metrics
from gainrl_kernels.torch_impl import angle_stats_torch
from gainrl_kernels.types import AngleStats

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
LENS = [7, 0, 1, 2, 33, 19, 1, 64]


def _triton(chunk: int | None):
    def run(hidden, cu, seg):
        from gainrl_kernels.triton_angle import angle_stats_triton

        return angle_stats_triton(hidden, cu, seg, chunk=chunk)

    return run


BACKENDS = {
    "cpp": lambda h, cu, seg: angle_stats(h, cu, seg, backend="torch"),
    "torch_impl": angle_stats_torch,
    "triton": lambda h, cu, seg: angle_stats(h, cu, seg, backend="triton"),
    "triton_chunk3": _triton(3),
    "cuda": lambda h, cu, seg: angle_stats(h, cu, seg, backend="cuda"),
}


def _device_for(name: str) -> str:
    if name == "cuda":
        if not (HAS_CUDA and has_ext_kernel("cuda")):
            pytest.skip("needs a CUDA GPU and the extension built with CUDA")
        return "cuda"
    if name == "cpp" and not has_ext_kernel("cpu"):
        pytest.fail("the C++ extension is not built: run `make test` (pip install --no-build-isolation -e .)")
    return "cuda" if (name.startswith("triton") and HAS_CUDA) else "cpu"


def assert_matches(stats: AngleStats, hidden, cu, seg, rtol: float, inter_weight: float = 1.0) -> None:
    ref = naive_angle_metrics(hidden.cpu(), cu.cpu(), seg.cpu() if seg is not None else None, inter_weight)
    atol = 1e-6
    assert stats.unit_sum.dtype == torch.float32 and stats.count.dtype == torch.int32
    torch.testing.assert_close(stats.count.cpu().long(), ref["count"])
    torch.testing.assert_close(stats.unit_sum.cpu().double(), ref["unit_sum"], rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(stats.sq_norm.cpu().double(), ref["sq_norm"], rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(stats.adjacent.cpu().double(), ref["adjacent"], rtol=rtol, atol=atol * 10)
    conc = angle_concentration(stats, inter_weight)
    for name in ("intra", "inter", "score", "causal", "causal_ref"):
        got = getattr(conc, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), ref[name], rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_reference(backend, dtype):
    device = _device_for(backend)
    for seed, (dim, n_seg) in enumerate([(48, 2), (33, 3), (5, 1)]):
        hidden, cu, seg = packed_batch(LENS, dim, dtype, n_seg=n_seg, seed=seed, device=device)
        assert_matches(BACKENDS[backend](hidden, cu, seg), hidden, cu, seg, TOL[dtype], inter_weight=8.0 if seed else 1.0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_non_contiguous_and_default_offsets(backend):
    device = _device_for(backend)
    hidden, cu, seg = packed_batch(LENS, 40, seed=5, device=device)
    wide = torch.randn(hidden.shape[0], 2 * hidden.shape[1], device=device)
    wide[:, ::2] = hidden
    strided = wide[:, ::2]  # stride (2D, 2)
    transposed = hidden.t().contiguous().t()  # stride (1, T)
    for h in (strided, transposed):
        assert not h.is_contiguous()
        assert_matches(BACKENDS[backend](h, cu, seg), h, cu, seg, TOL[torch.float32])
    cu_view = torch.stack([cu, cu + 3], dim=1)[:, 0]  # strided index tensors: read as their values, not their memory
    seg_view = seg.t().contiguous().t()
    assert not (cu_view.is_contiguous() or seg_view.is_contiguous())
    assert_matches(BACKENDS[backend](hidden, cu_view, seg_view), hidden, cu, seg, TOL[torch.float32])
    if backend != "torch_impl":
        default = angle_stats(hidden, cu, None, backend={"triton_chunk3": "triton"}.get(backend, backend if backend != "cpp" else "torch"))
        assert default.unit_sum.shape == (len(LENS), 1, 40)
        assert_matches(default, hidden, cu, None, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch_impl"])
def test_empty_batches_and_tokens(backend):
    device = _device_for(backend)
    fn = BACKENDS[backend]
    hidden = torch.randn(4, 8, device=device)
    none = fn(hidden, torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(0, 2, dtype=torch.int32, device=device))
    assert none.unit_sum.shape == (0, 1, 8) and none.adjacent.shape == (0,)
    empty = fn(hidden[:0], torch.zeros(3, dtype=torch.int32, device=device), torch.zeros(2, 3, dtype=torch.int32, device=device))
    assert empty.count.abs().sum() == 0 and empty.unit_sum.abs().sum() == 0
    conc = angle_concentration(empty)
    assert torch.isnan(conc.score).all() and torch.isnan(conc.causal_ref).all()


@pytest.mark.parametrize("backend", ["cpp", "triton_chunk3", "torch_impl"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_hidden_gives_nan(backend, bad):
    """A NaN/Inf token poisons exactly its segment's statistics and its sequence's sequence-level metrics."""
    device = _device_for(backend)
    hidden, cu, seg = packed_batch([12, 10], 16, n_seg=2, seed=3, device=device, zero_rows=0)
    seg = torch.tensor([[0, 4, 12], [0, 5, 10]], dtype=torch.int32, device=device)
    hidden[2, 3] = bad  # sequence 0, segment 0
    stats = BACKENDS[backend](hidden, cu, seg)
    conc = angle_concentration(stats)
    nan_cols = torch.isnan(stats.unit_sum[0, 0])  # NaN: every column (as 1 / ||x||); Inf: its own column
    assert (nan_cols.all() if math.isnan(bad) else nan_cols.any()) and torch.isnan(stats.sq_norm[0, 0])
    assert torch.isfinite(stats.unit_sum[0, 1]).all() and torch.isfinite(stats.unit_sum[1]).all()
    assert torch.isnan(conc.intra[0, 0]) and torch.isnan(conc.score[0]) and torch.isnan(conc.causal[0])
    assert torch.isnan(conc.causal_ref[0]) and torch.isfinite(conc.intra[0, 1])
    assert torch.isfinite(conc.score[1]) and torch.isfinite(conc.causal[1]) and torch.isfinite(conc.causal_ref[1])


def test_cpu_kernel_is_deterministic_across_thread_counts():
    hidden, cu, seg = packed_batch([700, 300, 1], 64, torch.bfloat16, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = angle_stats(hidden, cu, seg, backend="torch")
        torch.set_num_threads(max(2, threads))
        many = angle_stats(hidden, cu, seg, backend="torch")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_auto_backend_and_ops_registration():
    hidden, cu, seg = packed_batch([5, 6], 8, seed=1)
    auto = angle_stats(hidden, cu, seg)
    direct = torch.ops.gainrl.angle_stats(hidden, cu, seg, "auto")
    for a, b in zip(auto, direct):
        torch.testing.assert_close(a, b)
    conc = torch.ops.gainrl.angle_concentration(*auto, 1.0)
    assert len(conc) == 5


def test_requires_grad_input_is_detached():
    hidden, cu, seg = packed_batch([5, 6], 8, seed=1)
    hidden.requires_grad_(True)
    stats = angle_stats(hidden, cu, seg)
    assert not stats.unit_sum.requires_grad


def test_torch_compile_fullgraph():
    hidden, cu, seg = packed_batch([9, 4, 1], 16, seed=2)

    def score(h, cu, seg):
        stats = angle_stats(h * 2.0, cu, seg)
        return angle_concentration(stats, 1.0).score + 1.0

    compiled = torch.compile(score, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(hidden, cu, seg), score(hidden, cu, seg), equal_nan=True)
    # K = 1 (the default segments): score is intra[:, 0], which the op must not return as a view
    whole = torch.compile(lambda h, cu: angle_concentration(angle_stats(h, cu)).score, fullgraph=True,
                          backend="aot_eager")
    torch.testing.assert_close(whole(hidden, cu), angle_concentration(angle_stats(hidden, cu)).score, equal_nan=True)


def test_concentration_is_float32_under_autocast():
    """Probes compute the metric inside the model's forward, often under autocast (bf16 bmm on CPU and GPU): intra
    and causal subtract nearly equal terms (||S||² - Σ||u||²), and a TRL run moved C_causal by 5e-3 that way."""
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(2, 400, 256, generator=g) + 0.3, dim=-1)
    unit_sum = torch.stack([u[:, :150].sum(1), u[:, 150:].sum(1)], 1)  # [2, 2, 256]
    stats = AngleStats(unit_sum, torch.tensor([[150, 250]] * 2, dtype=torch.int32),
                       torch.tensor([[150.0, 250.0]] * 2), torch.zeros(2))
    want = angle_concentration(stats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = angle_concentration(stats)
    for name in ("intra", "inter", "score", "causal", "causal_ref"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7, msg=name)
