"""The hand-written CUDA rows kernel of the fused RMSNorm + angle forward (csrc/rmsnorm_angle_kernels.cuh), against
the float64 reference and the Triton forward, on the work list of the Triton plan kernel.

Two runners:
  * `emulated`: the kernel header compiled by g++ against the CPU emulation of tests/cuda_emulator.py (one fiber per
    CUDA thread; cp.async is a copy there), with the plan and the reduce kernels run by the Triton interpreter. It
    checks the ring indexing, the one-barrier reduction, pairs across chunk ends, rows in no segment, strided rows,
    mixed weight dtypes and every tuning (values per thread, ring stages). No GPU-only effects (alignment faults,
    asynchronous copies in flight, fast-math).
  * `cuda`: the extension's op through ``rmsnorm_angle`` (``_CUDA_ROWS``, on by default for 16-bit rows; skipped
    without a GPU or without the CUDA build of the extension), against the Triton kernel and the reference, model
    widths included.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cuda_emulator  # noqa: E402
from rmsnorm_inputs import assert_stats_close, concentrated, random_ragged, ulp_tol  # noqa: E402
from triton_env import triton_device  # noqa: E402
from gainrl_kernels import rmsnorm_angle as rmsnorm_module  # noqa: E402
from gainrl_kernels.extension import has_ext_kernel  # noqa: E402
from gainrl_kernels.naive_rmsnorm_angle import angle_stats_reference  # noqa: E402
from gainrl_kernels.rmsnorm_angle import padded_to_cu_seqlens, rmsnorm_angle  # noqa: E402

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DType of csrc/rmsnorm_angle_launch.h

EMULATOR_BODY = r"""
#include "rmsnorm_angle_kernels.cuh"

namespace ra = gainrl::rmsnorm_angle;

extern "C" int emu_rows(int x_dtype, int w_dtype, const void* x, int64_t stride_r, const void* weight, void* y,
                        float* rstd, const int* row0, const int* nrows, const int* seg, const int* pair_end,
                        int64_t grid, float* part_sum, float* part_q, float* part_adj, int64_t R, int64_t D,
                        float eps, int values_per_thread, int stages, int carry) {
  ra::Args a{};
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.rstd = rstd;
  a.item_row0 = row0; a.item_nrows = nrows; a.item_seg = seg; a.item_pair_end = pair_end; a.grid = grid;
  a.part_sum = part_sum; a.part_q = part_q; a.part_adj = part_adj; a.R = R; a.D = D; a.eps = eps;
  a.values_per_thread = values_per_thread; a.stages = stages; a.carry = carry != 0;
  try {
    return static_cast<int>(ra::launch_rmsnorm_angle_rows(a, static_cast<ra::DType>(x_dtype),
                                                          static_cast<ra::DType>(w_dtype), nullptr));
  } catch (...) {
    return -1;
  }
}

extern "C" int emu_spans(int x_dtype, int w_dtype, const void* x, int64_t stride_r, const void* weight, void* y,
                         float* rstd, const int* cu, const int* off, const void* tok, int tok64, int64_t n_packed,
                         int64_t B, int K, int64_t chunk, int64_t grid,
                         float* part_sum, float* part_q, float* part_adj, int64_t R, int64_t D, float eps,
                         int values_per_thread, int stages, int carry) {
  ra::Args a{};
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.rstd = rstd; a.grid = grid;
  a.part_sum = part_sum; a.part_q = part_q; a.part_adj = part_adj; a.R = R; a.D = D; a.eps = eps;
  a.values_per_thread = values_per_thread; a.stages = stages; a.carry = carry != 0;
  a.spans = true; a.cu_seqlens = cu; a.seg_offsets = off; a.B = B; a.K = K; a.chunk = chunk;
  a.token_index = tok; a.token_index_64 = tok64 != 0; a.n_packed = n_packed;
  try {
    return static_cast<int>(ra::launch_rmsnorm_angle_rows(a, static_cast<ra::DType>(x_dtype),
                                                          static_cast<ra::DType>(w_dtype), nullptr));
  } catch (...) {
    return -1;
  }
}

extern "C" void emu_set_eager_copies(int eager) { gainrl_emu::g_cp_async_eager = eager != 0; }

extern "C" void emu_last_launch(unsigned* threads, size_t* smem) {
  *threads = gainrl_emu::g_last_threads;
  *smem = gainrl_emu::g_last_smem_bytes;
}

extern "C" int emu_supported(int x_dtype, int w_dtype, const void* x, int64_t stride_r, const void* weight,
                             void* y, int64_t D, int values_per_thread) {
  ra::Args a{};
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.D = D;
  a.values_per_thread = values_per_thread; a.stages = 3;
  return ra::supported(a, static_cast<ra::DType>(x_dtype), static_cast<ra::DType>(w_dtype)) ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = cuda_emulator.build(tmp_path_factory.mktemp("emu_rows"), EMULATOR_BODY)
    lib.emu_rows.restype = ctypes.c_int
    lib.emu_rows.argtypes = (
        [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        + [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
        + [ctypes.c_float] + [ctypes.c_int] * 3
    )
    lib.emu_spans.restype = ctypes.c_int
    lib.emu_spans.argtypes = (
        [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        + [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_int64]
        + [ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float] + [ctypes.c_int] * 3
    )
    lib.emu_set_eager_copies.argtypes = [ctypes.c_int]
    lib.emu_last_launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_size_t)]
    lib.emu_supported.restype = ctypes.c_int
    lib.emu_supported.argtypes = ([ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
    return lib


@pytest.fixture(params=["lazy", "eager"])
def copies(request, emulator):
    """The emulator's cp.async: performed when a wait covers it (lazy: a read before its wait sees the poisoned ring)
    or at once (eager: a copy into a slot still being read shows)."""
    emulator.emu_set_eager_copies(int(request.param == "eager"))
    yield request.param
    emulator.emu_set_eager_copies(0)


def emulated_forward(lib, x2d, weight, cu, off=None, token_index=None, values: int = 32, stages: int = 3,
                     carry: bool = False):
    """(y, rstd, AngleStats) of the CUDA rows kernel run in the emulator: the Triton plan (interpreter), the
    emulated kernel on outputs poisoned with NaN (``poisoned_outputs``), the Triton reduce (``reduced``, which also
    checks no partial was written past the last slot). Raises RuntimeError when the launcher refuses."""
    plan = rmsnorm_module._stats_plan(x2d, cu, off, token_index, weight)
    rows, dim = x2d.shape
    y, rstd, parts = poisoned_outputs(x2d, plan.grid)
    items = [t.contiguous() for t in (plan.item_row0, plan.item_nrows, plan.item_seg, plan.item_pair_end)]
    rc = lib.emu_rows(CODE[x2d.dtype], CODE[weight.dtype], x2d.data_ptr(), x2d.stride(0), weight.data_ptr(),
                      y.data_ptr(), rstd.data_ptr(), *(t.data_ptr() for t in items), plan.grid,
                      *(t.data_ptr() for t in parts), rows, dim, EPS, values, stages, int(carry))
    return y, rstd, reduced(plan, parts, rc, dim)


GUARD = 12345.0  # what the partial slots past the last one hold before and after an emulated launch


def poisoned_outputs(x2d, slots: int, guard: int = 3):
    """(y, rstd, [part_sum, part_q, part_adj]) for an emulated launch on the rows ``x2d``: y and rstd NaN, the
    partials NaN in their ``slots`` and ``GUARD`` in ``guard`` more (``reduced`` checks them untouched)."""
    rows, dim = x2d.shape
    y = torch.full((rows, dim), float("nan"), dtype=x2d.dtype)
    rstd = torch.full((rows,), float("nan"))
    parts = [torch.full((slots + guard, dim), float("nan")), torch.full((slots + guard,), float("nan")),
             torch.full((slots + guard,), float("nan"))]
    for t in parts:
        t[slots:] = GUARD
    return y, rstd, parts


def reduced(plan, parts, rc: int, dim: int):
    """AngleStats of an emulated launch's partials ``parts`` (launcher status ``rc``: RuntimeError when it refused),
    reduced by the plan's Triton reduce (interpreter), after checking that no slot past ``plan.grid`` was written."""
    if rc != 0:
        raise RuntimeError(f"emulated launch refused: {rc}")
    for t in parts:
        assert (t[plan.grid:] == GUARD).all(), "the kernel wrote past its slots"
    batch_size, nseg = plan.count.shape
    unit_sum = torch.empty(batch_size, nseg, dim)
    sq_norm = torch.empty(batch_size, nseg)
    adjacent = torch.empty(batch_size)
    rmsnorm_module._reduce_partials(plan, *(t[:plan.grid] for t in parts), unit_sum, sq_norm, adjacent)
    return rmsnorm_module.AngleStats(unit_sum, plan.count, sq_norm, adjacent)


def batch(dim: int, dtype: torch.dtype, seed: int, strided: bool = False, w_dtype: torch.dtype | None = None,
          device: str = "cpu"):
    """(x [R, D], w, cu_seqlens, seg_offsets) on ``device``: 7 sequences (an empty and a length-1 one, one long
    enough to span several chunks), K = 2 segments with rows before, between and after them, 3 trailing rows in no
    sequence. ``strided``: x's row stride is dim + 16."""
    lens = [3, 40, 1, 0, 9, 2, 13]
    x = concentrated((sum(lens) + 3,), dim, seed=seed).to(device, dtype)
    if strided:
        x = torch.cat([x, x[:, :16]], dim=1)[:, :dim]
    off = torch.tensor([[0, 1, 3], [2, 9, 37], [0, 0, 1], [0, 0, 0], [0, 4, 9], [0, 1, 2], [5, 5, 13]],
                       dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(seed + 1)
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(w_dtype or dtype)
    return x, w.to(device), cu.to(device), off.to(device)


def assert_rms(y, rstd, x, w, rtol: float = 1e-6) -> None:
    """rstd within fp32 rounding of torch's (another summation order), and y exactly HF's formula on that rstd,
    round(w * round(x * rstd)). A reference with its own rstd is not exact: an ulp of rstd can move round(x * rstd)
    by a step, and y by two."""
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + EPS), rtol=rtol, atol=0)
    assert torch.equal(y, (w.float() * (x.float() * rstd[:, None]).to(x.dtype).float()).to(x.dtype))


def two_steps(dtype: torch.dtype) -> dict:
    """Tolerance against a forward with its own rstd (see ``assert_rms``): two steps of y, i.e. two ulps (``ulp_tol``
    is half an ulp). One is not enough: a step of n = round(x * rstd), scaled by a weight above 1, can move y by two
    (fp16 at D = 5120 on an H200: 0.7051 -> 0.7061)."""
    return {k: 4 * v for k, v in ulp_tol(dtype).items()}


def assert_stats(stats, y, cu, off, token_index=None) -> None:
    """The statistics are those of y as stored (float64 reference), counts exact."""
    assert_stats_close(stats, angle_stats_reference(y, cu, off, token_index))


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    """Chunks of at most 4 rows: segments span several chunks, so pairs cross chunk ends."""
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 200, 1040])
def test_emulated_matches_reference_and_triton(emulator, dim, dtype):
    """rstd of every row and y exactly HF's formula on it (``assert_rms``), the statistics those of y, and close to
    the Triton kernel's. 1040 columns take several warps
    (the cross-warp reduction); 200 leaves threads without columns."""
    x, w, cu, off = batch(dim, dtype, seed=dim)
    y, rstd, stats = emulated_forward(emulator, x, w, cu, off)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
    y_t, rstd_t, stats_t = rmsnorm_module._forward(x, w, EPS, plan, True)
    torch.testing.assert_close(y, y_t, **two_steps(dtype))
    for a, b in zip(stats, stats_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("values,stages,carry", [
    (16, 2, True), (16, 4, True), (32, 2, False), (32, 4, False), (32, 3, True), (32, 2, True)])
def test_emulated_tunings(emulator, values, stages, carry, copies):
    """Every ring depth, carried or not, gives bitwise the default's y, rstd and statistics at the same values per
    thread (16 values always carry; ``carry`` is a 32-value option); the other values per thread (another split of
    the sums over threads) within a rounding step. bf16, strided rows, the asynchronous copies performed as late and
    as early as they may be."""
    x, w, cu, off = batch(256, torch.bfloat16, seed=3, strided=True)
    y0, r0, s0 = emulated_forward(emulator, x, w, cu, off, values=values)
    y1, r1, s1 = emulated_forward(emulator, x, w, cu, off, values=values, stages=stages, carry=carry)
    assert torch.equal(y0, y1) and torch.equal(r0, r1)
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert_stats(s1, y1, cu, off)
    y2, r2, s2 = emulated_forward(emulator, x, w, cu, off, values=48 - values)
    torch.testing.assert_close(y2, y1, **two_steps(torch.bfloat16))
    torch.testing.assert_close(r2, r1, rtol=1e-6, atol=0)
    for a, b in zip(s2, s1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("stages", [2, 4])
def test_emulated_long_chunks(emulator, stages, copies, monkeypatch):
    """Chunks of 32 rows (the ring wraps many times inside a chunk) over two long sequences, K = 2."""
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 128)
    x = concentrated((610,), 64, seed=17).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 333, 600], dtype=torch.int32)
    off = torch.tensor([[10, 100, 330], [0, 267, 267]], dtype=torch.int32)
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
    assert plan.cfg.chunk == 32
    y, rstd, stats = emulated_forward(emulator, x, w, cu, off, stages=stages)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


@pytest.mark.parametrize("seed", range(12))
def test_emulated_random_batches(emulator, seed, monkeypatch):
    """Random ragged batches: dtype, D (a multiple of the vector), sequence lengths (empty ones included), segment
    offsets anywhere in [0, len] (rows before, between and after the segments), chunk size, tuning and ring depth
    drawn from the seed; y, rstd and the statistics against the float64 reference."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    dtype = pick(DTYPES)
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    dim = vec * int(torch.randint(1, 40, (1,), generator=g))
    values = pick([16, 32])  # fp32 rows take 8 either way
    carry = bool(torch.randint(2, (1,), generator=g))  # a 32-value option
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", pick([1, 2, 3, 4, 7, 8, 16]))
    cu, off, rows = random_ragged(g, max_seqs=7, max_len=30, max_segments=4, max_trailing=3)
    x = concentrated((rows,), dim, seed=seed).to(dtype)
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(pick([dtype, torch.float32]))
    y, rstd, stats = emulated_forward(emulator, x, w, cu, off, values=values, stages=pick([2, 3, 4]), carry=carry)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_emulated_weight_dtypes_and_strides(emulator, x_dtype, w_dtype):
    """A weight in another dtype than x (read as fp32 into shared memory) and rows with a stride that is not D."""
    x, w, cu, off = batch(96, x_dtype, seed=5, strided=True, w_dtype=w_dtype)
    y, rstd, stats = emulated_forward(emulator, x, w, cu, off)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


def test_emulated_padded_batch_and_default_segments(emulator):
    """A padded [N, L, D] batch (left and right padding: rows in no sequence between sequences) through its token
    index, and the default one segment per sequence."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    x = concentrated((mask.numel(),), 64, seed=11).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    cu, tok = padded_to_cu_seqlens(mask)
    y, rstd, stats = emulated_forward(emulator, x, w, cu, None, tok)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, None, tok)


@pytest.mark.parametrize("values,carry", [(32, False), (32, True), (16, True)])
def test_emulated_rows_in_no_segment(emulator, values, carry):
    """Chunks in no segment run the loop without statistics: y and rstd bitwise those of the same rows inside
    segments, and no statistics (every segment empty)."""
    x, w, cu, off = batch(256, torch.bfloat16, seed=5, strided=True)
    y0, r0, _ = emulated_forward(emulator, x, w, cu, off, values=values, carry=carry)
    empty = torch.zeros_like(off)
    y1, r1, s1 = emulated_forward(emulator, x, w, cu, empty, values=values, carry=carry)
    assert torch.equal(y0, y1) and torch.equal(r0, r1)
    assert int(s1.count.sum()) == 0 and not s1.unit_sum.any() and not s1.sq_norm.any() and not s1.adjacent.any()


def test_emulated_nan_row(emulator):
    """A NaN in x makes its row, its segment's statistics and its sequence's adjacent term NaN, and nothing else."""
    x, w, cu, off = batch(64, torch.float32, seed=13)
    x[cu[1] + 5, 7] = float("nan")  # sequence 1, segment 0 ([2, 9))
    assert_nan_confined(*emulated_forward(emulator, x, w, cu, off), cu)


def assert_nan_confined(y, _rstd, stats, cu) -> None:
    """The NaN put in row cu[1] + 5 (sequence 1, segment 0 of ``batch``) is in that row, segment 0's sums and
    sequence 1's adjacent term, and nowhere else."""
    assert torch.isnan(y[cu[1] + 5]).all() and not torch.isnan(y[cu[1] + 6]).any()
    assert torch.isnan(stats.unit_sum[1, 0]).all() and torch.isnan(stats.adjacent[1])
    assert not torch.isnan(stats.unit_sum[1, 1]).any() and not torch.isnan(stats.sq_norm[1, 1])
    keep = torch.ones(len(cu) - 1, dtype=torch.bool)
    keep[1] = False
    assert not torch.isnan(stats.adjacent[keep]).any() and not torch.isnan(stats.unit_sum[keep]).any()


def test_emulated_refuses_unsupported_rows(emulator):
    """D not a multiple of the 16-byte vector, a row stride that breaks the alignment, rows wider than 8192 (fp32:
    4096): the launcher refuses (launches nothing); ``_cuda_rows_supported`` agrees, so ``rmsnorm_angle`` keeps
    Triton."""
    for dim, dtype, pad in [(60, torch.bfloat16, 0), (64, torch.bfloat16, 4), (8200, torch.bfloat16, 0),
                            (4100, torch.float32, 0)]:
        x, w, cu, off = batch(dim, dtype, seed=1)
        if pad:
            x = torch.cat([x, x[:, :pad]], dim=1)[:, :dim]
        assert not rmsnorm_module._cuda_rows_supported(x, w)
        with pytest.raises(RuntimeError, match="refused"):
            emulated_forward(emulator, x, w, cu, off)
    x, w, cu, off = batch(64, torch.bfloat16, seed=1)
    assert rmsnorm_module._cuda_rows_supported(x, w)
    with pytest.raises(RuntimeError, match="refused"):
        emulated_forward(emulator, x, w, cu, off, stages=5)  # a ring depth the kernel is not built with


@pytest.mark.parametrize("dim,dtype,w_dtype,values,stages", [
    (64, torch.bfloat16, torch.bfloat16, 32, 3), (200, torch.float16, torch.float32, 32, 2),
    (1040, torch.bfloat16, torch.float32, 16, 4), (4096, torch.bfloat16, torch.bfloat16, 32, 2),
    (5120, torch.bfloat16, torch.bfloat16, 16, 3), (96, torch.float32, torch.float32, 32, 4)])
def test_emulated_launch_shape_matches_static_script(emulator, dim, dtype, w_dtype, values, stages):
    """bench/cuda_rows_static.py's block size and dynamic shared memory (``launch_shape``) are the launcher's: the
    emulated launch records both."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cuda_rows_static import launch_shape

    x = concentrated((2,), dim, seed=1).to(dtype)
    w = torch.ones(dim, dtype=w_dtype)
    emulated_forward(emulator, x, w, torch.tensor([0, 2], dtype=torch.int32), None, values=values, stages=stages)
    threads, smem = ctypes.c_uint(), ctypes.c_size_t()
    emulator.emu_last_launch(ctypes.byref(threads), ctypes.byref(smem))
    size = x.element_size()
    nv = (8 if dtype == torch.float32 else values) * size // 16
    assert launch_shape(dim, size, nv, stages, w_dtype == dtype and size == 2) == (threads.value, smem.value)


# ---------------------------------------------------------------------------------------------- spans (no work list)

def emulated_spans_forward(lib, x2d, weight, cu, off=None, chunk: int = 4, values: int = 32, stages: int = 3,
                           carry: bool = False, token_index=None):
    """(y, rstd, AngleStats) of the CUDA rows kernel's SPANS form run in the emulator on outputs poisoned with NaN
    (blocks of ``chunk`` rows, no work list), then ``_reduce_spans_kernel`` (interpreter). The partial buffers end in
    guard slots, checked untouched. Raises RuntimeError when the launcher refuses."""
    rows, dim = x2d.shape
    cfg = rmsnorm_module._fwd_config(rows, dim, x2d.element_size(), x2d.device, stats=True)._replace(chunk=chunk)
    plan = rmsnorm_module._spans_plan(cfg, rows, cu, off, token_index)
    y, rstd, parts = poisoned_outputs(x2d, plan.grid)
    off = off.contiguous() if off is not None else None  # alive through the call
    tok = token_index
    batch_size, nseg = plan.count.shape
    rc = lib.emu_spans(CODE[x2d.dtype], CODE[weight.dtype], x2d.data_ptr(), x2d.stride(0), weight.data_ptr(),
                       y.data_ptr(), rstd.data_ptr(), cu.data_ptr(), off.data_ptr() if off is not None else None,
                       tok.data_ptr() if tok is not None else None, int(tok is not None and tok.dtype == torch.int64),
                       tok.numel() if tok is not None else 0, batch_size, nseg, chunk, plan.grid,
                       *(t.data_ptr() for t in parts), rows, dim, EPS, values, stages, int(carry))
    return y, rstd, reduced(plan, parts, rc, dim)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 64), (torch.float16, 200), (torch.bfloat16, 1040)], ids=str)
def test_emulated_spans_match_work_list(emulator, dim, dtype, chunk):
    """Blocks of ``chunk`` rows across sequences and segments (empty and length-1 sequences, rows before, between and
    after the segments, rows after the last sequence): y and rstd bitwise those of the work-list launch, the
    statistics those of y (float64 reference) and close to the work list's (another split of the sums)."""
    x, w, cu, off = batch(dim, dtype, seed=dim + chunk)
    y, rstd, stats = emulated_spans_forward(emulator, x, w, cu, off, chunk=chunk)
    y0, r0, s0 = emulated_forward(emulator, x, w, cu, off)
    assert torch.equal(y, y0) and torch.equal(rstd, r0)
    assert_stats(stats, y, cu, off)
    assert torch.equal(stats.count, s0.count)
    for a, b in zip(stats, s0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("values,stages,carry", [(16, 2, True), (16, 4, True), (32, 2, False), (32, 4, True)])
def test_emulated_spans_tunings(emulator, values, stages, carry, copies):
    """Every ring depth, carried or not, gives bitwise the 3-stage launch's y, rstd and statistics (bf16, strided
    rows, copies as late and as early as they may be); run twice, bitwise the same."""
    x, w, cu, off = batch(256, torch.bfloat16, seed=4, strided=True)
    y0, r0, s0 = emulated_spans_forward(emulator, x, w, cu, off, chunk=5, values=values)
    y1, r1, s1 = emulated_spans_forward(emulator, x, w, cu, off, chunk=5, values=values, stages=stages, carry=carry)
    y2, r2, s2 = emulated_spans_forward(emulator, x, w, cu, off, chunk=5, values=values, stages=stages, carry=carry)
    assert torch.equal(y0, y1) and torch.equal(r0, r1) and torch.equal(y1, y2) and torch.equal(r1, r2)
    assert all(torch.equal(a, b) for a, b in zip(s0, s1)) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert_stats(s1, y1, cu, off)


@pytest.mark.parametrize("seed", range(10))
def test_emulated_spans_random_batches(emulator, seed, monkeypatch):
    """Random ragged batches (empty sequences, segments anywhere in [0, len], trailing rows; sometimes the default
    one segment per sequence), 16-bit dtype, D, weight dtype, chunk, tuning, ring depth and the reduce's tile
    (``_REDUCE_PROGRAMS_PER_SM``) drawn from the seed."""
    g = torch.Generator().manual_seed(300 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    monkeypatch.setattr(rmsnorm_module, "_REDUCE_PROGRAMS_PER_SM", pick([None, 1, 64]))
    dtype = pick([torch.bfloat16, torch.float16])
    dim = 8 * int(torch.randint(1, 40, (1,), generator=g))
    cu, off, rows = random_ragged(g, max_seqs=7, max_len=30, max_segments=4, max_trailing=3)
    if seed % 4 == 3:
        off = None
    x = concentrated((max(rows, 1),), dim, seed=seed).to(dtype)
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(pick([dtype, torch.float32]))
    y, rstd, stats = emulated_spans_forward(emulator, x, w, cu, off, chunk=pick([1, 2, 3, 5, 8, 16]),
                                            values=pick([16, 32]), stages=pick([2, 3, 4]),
                                            carry=bool(torch.randint(2, (1,), generator=g)))
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


@pytest.mark.parametrize("n_seq", [1025])
def test_emulated_spans_many_sequences(emulator, n_seq):
    """Past 1024 sequences a block finds its first one by a 4-way search instead of a warp count (up to 1024: every
    other spans test): 0-3 row sequences (empty ones included) with random offsets."""
    g = torch.Generator().manual_seed(n_seq)
    lens = torch.randint(0, 4, (n_seq,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    off = torch.sort(torch.randint(0, 4, (n_seq, 3), generator=g), dim=1).values
    off = torch.minimum(off, lens[:, None]).to(torch.int32)
    x = concentrated((int(cu[-1]) + 2,), 64, seed=n_seq).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 64).to(torch.bfloat16)
    y, rstd, stats = emulated_spans_forward(emulator, x, w, cu, off, chunk=37)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


def test_emulated_spans_every_segment_empty_and_nan_row(emulator):
    """Every segment empty: no statistics, counts 0. A NaN in x: its row, its segment's sums and its sequence's
    adjacent term NaN, nothing else."""
    x, w, cu, off = batch(64, torch.bfloat16, seed=6)
    _, _, s = emulated_spans_forward(emulator, x, w, cu, torch.zeros_like(off), chunk=3)
    assert int(s.count.sum()) == 0 and not s.unit_sum.any() and not s.sq_norm.any() and not s.adjacent.any()
    x[cu[1] + 5, 7] = float("nan")  # sequence 1, segment 0 ([2, 9))
    assert_nan_confined(*emulated_spans_forward(emulator, x, w, cu, off, chunk=3), cu)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_emulated_spans_padded_batch(emulator, chunk, index_dtype):
    """A padded [N, L, D] batch through its token index (left and right padding, an all-padding row, a full one:
    rows in no sequence before, between and after sequences), with offsets and with the default segments, and a
    batch whose every sequence is empty (an empty token index)."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    x = concentrated((mask.numel(),), 64, seed=chunk).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 64).to(torch.bfloat16)
    cu, tok = padded_to_cu_seqlens(mask)
    tok = tok.to(index_dtype)
    off = torch.tensor([[1, 3, 5], [0, 0, 4], [0, 0, 0], [2, 6, 7]], dtype=torch.int32)
    for o in (off, None):
        y, rstd, stats = emulated_spans_forward(emulator, x, w, cu, o, chunk=chunk, token_index=tok)
        y0, r0, s0 = emulated_forward(emulator, x, w, cu, o, tok)
        assert torch.equal(y, y0) and torch.equal(rstd, r0)
        assert_stats(stats, y, cu, o, tok)
    empty = torch.zeros(0, dtype=index_dtype)
    _, _, s = emulated_spans_forward(emulator, x, w, torch.zeros(3, dtype=torch.int32), None, chunk=chunk,
                                     token_index=empty)
    assert int(s.count.sum()) == 0 and not s.unit_sum.any() and not s.adjacent.any()


@pytest.mark.parametrize("case", ["cu_decreasing", "cu_past_rows", "offsets_out_of_range", "offsets_decreasing",
                                  "token_index_garbage"])
def test_emulated_spans_unvalidated_indices(emulator, case):
    """Indices that validation would refuse (``validate=False`` skips it): the kernel still writes only its own
    slots (guards intact), and y and rstd, which do not depend on them, are still exact."""
    x, w, cu, off = batch(64, torch.bfloat16, seed=8)
    cu, off, tok = cu.clone(), off.clone(), None
    if case == "token_index_garbage":
        tok = torch.randint(-50, 200, (int(cu[-1]) + 5,), generator=torch.Generator().manual_seed(0))
    elif case == "cu_decreasing":
        cu[3] = 50
    elif case == "cu_past_rows":
        cu[-1] = 10_000
    elif case == "offsets_out_of_range":
        off[1] = torch.tensor([-7, 90, 3])
    else:
        off[:, 0] = 30
    y, rstd, _ = emulated_spans_forward(emulator, x, w, cu, off, chunk=3, token_index=tok)
    assert_rms(y, rstd, x, w)


def test_emulated_spans_refused(emulator):
    """fp32 rows (the SPANS form is built for 16-bit rows only) and a slot count that is not cdiv(R, chunk) + B K:
    the launcher refuses."""
    x, w, cu, off = batch(64, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="refused"):
        emulated_spans_forward(emulator, x, w, cu, off)
    x = x.to(torch.bfloat16)
    rc = emulator.emu_spans(CODE[x.dtype], CODE[w.dtype], x.data_ptr(), x.stride(0), w.data_ptr(), x.data_ptr(),
                            None, cu.data_ptr(), off.data_ptr(), None, 0, 0, len(cu) - 1, off.shape[1] - 1, 4, 1,
                            None, None,
                            None, x.shape[0], x.shape[1], EPS, 32, 3, 0)
    assert rc != 0


def test_spans_plan_selection(monkeypatch):
    """``_stats_plan`` takes the spans form only where the CUDA rows kernel takes the rows, the extension has the
    spans op and the launch has at most ``_CUDA_ROWS_SPANS_MAX_ROWS`` rows (0: never), token index or not; its
    slots are cdiv(R, chunk) + B K. (The CUDA checks are patched: this runs on CPU tensors.)"""
    monkeypatch.setattr(rmsnorm_module, "_cuda_rows_take", lambda x2d, weight: True)
    monkeypatch.setattr(rmsnorm_module, "has_ext_kernel", lambda device, op: True)
    x, w, cu, off = batch(64, torch.bfloat16, seed=1)
    rows = x.shape[0]
    assert rmsnorm_module._stats_plan(x, cu, off, None, w).kernel == "cuda_rows"  # off by default
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", rows)
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
    assert plan.kernel == "cuda_spans" and plan.rows == rows and plan.seg_offsets is off
    assert plan.grid == -(-rows // plan.cfg.chunk) + off.numel() - off.shape[0]
    assert tuple(plan.count.shape) == (len(cu) - 1, off.shape[1] - 1)
    assert rmsnorm_module._stats_plan(x, cu, None, None, w).grid == -(-rows // plan.cfg.chunk) + len(cu) - 1
    assert rmsnorm_module._stats_plan(x[:-1], cu, off, None, w).kernel == "cuda_spans"
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", rows - 1)
    assert rmsnorm_module._stats_plan(x, cu, off, None, w).kernel == "cuda_rows"
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", 1 << 40)
    tok = torch.arange(int(cu[-1]), dtype=torch.int32)
    plan = rmsnorm_module._stats_plan(x, cu, off, tok, w)
    assert plan.kernel == "cuda_spans" and plan.token_index is tok
    monkeypatch.setattr(rmsnorm_module, "has_ext_kernel", lambda device, op: op != "rmsnorm_angle_spans_ext")
    assert rmsnorm_module._stats_plan(x, cu, off, None, w).kernel == "cuda_rows"


def test_static_script_reads_both_forms():
    """bench/cuda_rows_static.py tells the work-list and the spans instantiations apart by their demangled names."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cuda_rows_static import instantiation

    base = "void gainrl::rmsnorm_angle::rows_kernel<__nv_bfloat16, 4, 3, false, true"
    assert instantiation(base + ", false>") == ("__nv_bfloat16", 4, 3, False, True, False)
    assert instantiation(base + ", true>") == ("__nv_bfloat16", 4, 3, False, True, True)
    assert instantiation(base + ">") == ("__nv_bfloat16", 4, 3, False, True, False)
    assert instantiation("void gainrl::angle_stats_kernel<float>") is None


def test_cuda_rows_tuning_by_width(monkeypatch):
    """Stages and carry of the CUDA rows kernel by width (``_cuda_rows_tuning``): the timed widths their entry of
    ``_CUDA_ROWS_TUNED``, others 3 stages carried outside (1024, 4096]; each knob, once set, overrides its half
    alone."""
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_STAGES", None)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_CARRY", None)
    widths = (64, 896, 1024, 1536, 2048, 2560, 3584, 4096, 5120, 6144, 8192)
    assert [rmsnorm_module._cuda_rows_tuning(d) for d in widths] == [
        (3, True), (3, True), (3, True), (3, False), (2, False), (3, False), (3, False), (2, False), (3, True),
        (3, True), (3, False)]
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_STAGES", 4)
    assert rmsnorm_module._cuda_rows_tuning(4096) == (4, False)
    assert rmsnorm_module._cuda_rows_tuning(5120) == (4, True)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_STAGES", None)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_CARRY", False)
    assert rmsnorm_module._cuda_rows_tuning(5120) == (3, False)
    assert rmsnorm_module._cuda_rows_tuning(896) == (3, False)
    assert rmsnorm_module._cuda_rows_tuning(2048) == (2, False)


def test_fill_by_width(monkeypatch):
    """Programs per SM the chunks shrink to (``_fill_per_sm``): 4, the CUDA rows kernel's 1 at D = 5120 and 8192,
    the knob over both; a plan whose rows the CUDA rows kernel takes at 8192 keeps chunks four times as long, and
    names that kernel for the forward."""
    monkeypatch.setattr(rmsnorm_module, "_FILL_PER_SM", None)
    assert [rmsnorm_module._fill_per_sm(d, True) for d in (2048, 3584, 4096, 5120, 8192)] == [4, 4, 4, 1, 1]
    assert rmsnorm_module._fill_per_sm(8192, False) == 4
    monkeypatch.setattr(rmsnorm_module, "_FILL_PER_SM", 8)
    assert rmsnorm_module._fill_per_sm(8192, True) == rmsnorm_module._fill_per_sm(2048, False) == 8
    monkeypatch.setattr(rmsnorm_module, "_FILL_PER_SM", None)
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 256)  # not this file's short chunks
    monkeypatch.setattr(rmsnorm_module, "_fill_target", lambda device, per_sm: 4 * per_sm)  # 4 "SMs", on GPUs too
    dev = triton_device()  # the plan kernel runs where compiled Triton can
    x = torch.randn(640, 8192, dtype=torch.bfloat16, device=dev)
    w = torch.ones(8192, dtype=torch.bfloat16, device=dev)
    cu = torch.tensor([0, 640], dtype=torch.int32, device=dev)
    planned = {}
    for take in (False, True):
        monkeypatch.setattr(rmsnorm_module, "_cuda_rows_take", lambda x2d, weight, take=take: take)
        plan = rmsnorm_module._stats_plan(x, cu, None, None, w)
        planned[take] = plan.cfg.chunk, plan.kernel
    # 640 rows over 4 "SMs" x 4 (or 1) programs
    assert planned == {False: (32, "triton_rows"), True: (128, "cuda_rows")}


@pytest.mark.parametrize("values", [16, 32])
def test_python_supported_mirrors_launcher(emulator, values, monkeypatch):
    """``_cuda_rows_supported`` (which rows ``rmsnorm_angle`` sends to the CUDA kernel) agrees with the launcher's
    ``supported`` (csrc/rmsnorm_angle_launch.h) over widths, dtypes, row strides and misaligned x or weight: a row
    the Python side sends must not be refused on the device, and one it keeps on Triton must be one the kernel
    refuses."""
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_VALUES", values)
    y = torch.empty(4, dtype=torch.float32)  # only its address is read: 16-byte aligned, as the op allocates y
    checked = total = 0
    for dim in (8, 16, 24, 40, 64, 1000, 1024, 2056, 4096, 4100, 5120, 8192, 8200, 16384):
        for dtype in DTYPES:
            for w_dtype in {dtype, torch.float32}:
                for pad, x_shift, w_shift in ((0, 0, 0), (8, 0, 0), (1, 0, 0), (16, 1, 0), (0, 0, 1)):
                    base = torch.ones(2, dim + pad + x_shift, dtype=dtype)
                    x = base[:, x_shift:x_shift + dim]
                    w = torch.ones(dim + w_shift, dtype=w_dtype)[w_shift:]
                    ours = rmsnorm_module._cuda_rows_supported(x, w)
                    theirs = emulator.emu_supported(CODE[dtype], CODE[w_dtype], x.data_ptr(), x.stride(0),
                                                    w.data_ptr(), y.data_ptr(), dim, values)  # as _forward passes
                    assert ours == bool(theirs), (dim, dtype, w_dtype, pad, x_shift, w_shift)
                    checked += ours
                    total += 1
    assert 20 < checked < total - 20  # both answers occur, each many times


# ---------------------------------------------------------------------------------------------------- on a GPU

needs_cuda_rows = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") not in (None, "", "0")
    or not has_ext_kernel("cuda", "rmsnorm_angle_rows_ext"),
    reason="needs a GPU, compiled Triton and the CUDA build of the extension (rmsnorm_angle_rows_ext)",
)


GPU_CASES = (  # (D, x dtype, weight dtype, values per thread, stages, carry): every tuning in bf16 (weight in
    # bf16: the packed product; in fp32: the fp32 weight), every dtype at 3 stages without carry
    [(d, torch.bfloat16, torch.bfloat16, v, s, c) for d in (64, 896, 2048, 4096, 5120, 8192)
     for v, c in ((16, True), (32, False), (32, True)) for s in (2, 3, 4)]
    + [(d, torch.bfloat16, torch.float32, v, 3, False) for d in (896, 4096, 5120) for v in (16, 32)]
    + [(d, t, t, 32, 3, False) for d in (64, 896, 4096, 5120, 8192) for t in (torch.float32, torch.float16)
       if t != torch.float32 or d <= 4096]
    + [(4096, torch.float16, torch.bfloat16, 32, 3, True), (4096, torch.float32, torch.bfloat16, 16, 3, False)]
)


@needs_cuda_rows
@pytest.mark.parametrize("dim,dtype,w_dtype,values,stages,carry", GPU_CASES, ids=str)
def test_cuda_rows_match_triton(dim, dtype, w_dtype, values, stages, carry, monkeypatch):
    """On the GPU: rstd within fp32 rounding of torch's and y exactly HF's formula on that rstd (``_forward``, the
    kernel's own rstd), ``rmsnorm_angle`` bitwise the same, the statistics those of y and close to the Triton
    kernel's; model widths included (5120 is no power of two: 160 or 320 threads)."""
    x, w, cu, off = batch(dim, dtype, seed=dim, strided=True, w_dtype=w_dtype, device="cuda")
    assert x.stride(0) == dim + 16
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS", False)
    y_t, s_t = rmsnorm_angle(x, w, EPS, cu, off)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS", True)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_FP32", True)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_VALUES", values)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_STAGES", stages)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_CARRY", carry)
    assert rmsnorm_module._cuda_rows_take(x, w)
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
    y, rstd, stats = rmsnorm_module._forward(x, w, EPS, plan, True)
    assert_rms(y, rstd, x, w, rtol=2e-6)  # the hardware's approximate rsqrt
    y_api, s_api = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y_api, y) and all(torch.equal(a, b) for a, b in zip(s_api, stats))
    torch.testing.assert_close(y, y_t, **two_steps(dtype))
    assert_stats(type(s_api)(*stats), y.cpu(), cu.cpu(), off.cpu())
    # the Triton kernel's statistics are those of its own y: where a value differs by a step or two (another rstd
    # rounding), a unit vector moves by up to that step over the row's norm (> 1 here)
    dy = float((y.float() - y_t.float()).abs().max())
    for a, b in zip(stats, s_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 + dy)


@needs_cuda_rows
@pytest.mark.parametrize("dim", [896, 4096, 8192])
def test_cuda_rows_deterministic_and_graph_capture(dim):
    """Bitwise the same twice, and the same replayed from a CUDA graph (no host sync in the op), by default (the CUDA
    rows kernel takes 16-bit rows). At 8192 the block takes 64 KB of shared memory, past the 48 KB default: the
    opt-in happens on the first call, not in the graph."""
    x, w, cu, off = batch(dim, torch.bfloat16, seed=2, device="cuda")
    assert rmsnorm_module._cuda_rows_take(x, w)
    deterministic_and_graph_safe(x, w, cu, off)


def deterministic_and_graph_safe(x, w, cu, off):
    """(y, stats) of ``rmsnorm_angle``, checked bitwise the same on a second call and replayed from a CUDA graph."""
    y0, s0 = rmsnorm_angle(x, w, EPS, cu, off, validate=False)
    y1, s1 = rmsnorm_angle(x, w, EPS, cu, off, validate=False)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y2, s2 = rmsnorm_angle(x, w, EPS, cu, off, validate=False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y0, y2) and all(torch.equal(a, b) for a, b in zip(s0, s2))
    return y0, s0


@needs_cuda_rows
@pytest.mark.parametrize("dim", [64, 896, 4096, 8192])
def test_cuda_spans_match_work_list_and_graph_capture(dim, monkeypatch):
    """On the GPU, without a work list (``_CUDA_ROWS_SPANS_MAX_ROWS``): y bitwise the work-list launch's, the
    statistics those of y and close to the work list's, bitwise the same twice and replayed from a CUDA graph."""
    x, w, cu, off = batch(dim, torch.bfloat16, seed=dim, strided=True, device="cuda")
    y_l, s_l = rmsnorm_angle(x, w, EPS, cu, off)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", 1 << 40)
    assert rmsnorm_module._stats_plan(x, cu, off, None, w).kernel == "cuda_spans"
    y0, s0 = deterministic_and_graph_safe(x, w, cu, off)
    assert torch.equal(y0, y_l)
    assert_stats(s0, y0.cpu(), cu.cpu(), off.cpu())
    for a, b in zip(s0, s_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@needs_cuda_rows
@pytest.mark.parametrize("seed", range(6))
def test_cuda_spans_random_batches(seed, monkeypatch):
    """On the GPU, without a work list: random ragged batches against the float64 reference, model widths and the
    fill rule's chunk (many blocks per sequence), sometimes the default segments."""
    g = torch.Generator().manual_seed(500 + seed)
    dim = [576, 896, 1536, 2048, 4096, 5120][seed]
    cu, off, rows = random_ragged(g, max_seqs=40, max_len=600, max_segments=5, max_trailing=9)
    off = None if seed % 3 == 2 else off
    x = concentrated((max(rows, 1),), dim, seed=seed).to(torch.bfloat16).cuda()
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(torch.bfloat16).cuda()
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", 1 << 40)
    cu_d, off_d = cu.cuda(), None if off is None else off.cuda()
    y, stats = rmsnorm_angle(x, w, EPS, cu_d, off_d)
    assert_stats(stats, y.cpu(), cu, off)


@needs_cuda_rows
@pytest.mark.parametrize("dim", [896, 4096])
def test_cuda_spans_padded_batch(dim, monkeypatch):
    """On the GPU, without a work list, a padded batch through its token index (left and right padding, random
    lengths): y bitwise the work-list launch's, the statistics those of y."""
    g = torch.Generator().manual_seed(dim)
    lens = torch.randint(0, 300, (12,), generator=g)
    pos = torch.arange(300)
    left = torch.arange(12) % 2 == 0  # even rows left-padded
    mask = torch.where(left[:, None], pos >= 300 - lens[:, None], pos < lens[:, None]).int()
    x = concentrated((mask.numel(),), dim, seed=dim).to(torch.bfloat16).cuda()
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(torch.bfloat16).cuda()
    cu, tok = padded_to_cu_seqlens(mask.cuda())
    y_l, _ = rmsnorm_angle(x, w, EPS, cu, None, tok)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS_SPANS_MAX_ROWS", 1 << 40)
    assert rmsnorm_module._stats_plan(x, cu, None, tok, w).kernel == "cuda_spans"
    y, stats = rmsnorm_angle(x, w, EPS, cu, None, tok)
    assert torch.equal(y, y_l)
    assert_stats(stats, y.cpu(), cu.cpu(), None, tok.cpu())
