"""The hand-written CUDA angle_stats against a float64 reference computed inline (F.normalize in float64, explicit
per-segment sums). The code under test: csrc/angle_stats_kernels.cuh (kernels + inline launcher, nvcc),
csrc/angle_stats_cuda.cu (nvcc; defines the non-throwing exported launcher), csrc/angle_stats_launch.h (the plain
host interface: DType, Args, sizing helpers) and csrc/angle_stats_cuda_binding.cpp (g++; the torch binding: checks,
allocation, stream, registration; every exception, e.g. the too-wide-rows error, is thrown from there).

Two runners share the cases:
  * `cuda`: torch.ops.gainrl.angle_stats_ext on a GPU (skipped without CUDA or without the extension's CUDA kernel);
  * `emulator`: the very same kernel header compiled by g++ against a small CPU emulation of the CUDA execution
    model (tests/cuda_emulator.py, shared with tests/test_rmsnorm_angle_cuda.py: one fiber per CUDA thread,
    barriers for __syncthreads and warp shuffles, blocks one after the other), called through ctypes. It checks
    the work decomposition, indexing, prev-row/adjacent handling, empty segments, NaN handling and the launcher's
    kernel choice on machines without a GPU (skipped without g++ or the
    CUDA headers). It cannot see GPU-only problems (alignment faults, races the barriers hide, fast-math). It
    includes angle_stats_kernels.cuh (which pulls in angle_stats_launch.h) from csrc/ and calls the inline
    launch_angle_stats directly; the binding's checks are not part of it.
Tolerances (relative to the largest reference magnitude): 2e-5 for fp32 input, 2e-3 for fp16/bf16, the reference
being computed from the same rounded inputs.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cuda_emulator
from angle_inputs import packed_batch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


# ---------------------------------------------------------------------------------------------------- reference


def reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor):
    """(unit_sum [B,K,D], count [B,K], sq_norm [B,K], adjacent [B]) in float64 / int32, by explicit loops."""
    h = hidden.detach().cpu().double()
    cu = [int(x) for x in cu_seqlens.cpu()]
    off = seg_offsets.cpu().tolist()
    n_seq, n_seg, dim = seg_offsets.shape[0], seg_offsets.shape[1] - 1, h.shape[1]
    u = F.normalize(h, dim=1, eps=1e-12)
    unit_sum = torch.zeros(n_seq, n_seg, dim, dtype=torch.float64)
    count = torch.zeros(n_seq, n_seg, dtype=torch.int32)
    sq_norm = torch.zeros(n_seq, n_seg, dtype=torch.float64)
    adjacent = torch.zeros(n_seq, dtype=torch.float64)
    for b in range(n_seq):
        o = off[b]
        for k in range(n_seg):
            rows = u[cu[b] + o[k] : cu[b] + o[k + 1]]
            unit_sum[b, k] = rows.sum(0)
            count[b, k] = rows.shape[0]
            sq_norm[b, k] = (rows * rows).sum()
        span = u[cu[b] + o[0] : cu[b] + o[n_seg]]
        adjacent[b] = (span[:-1] * span[1:]).sum()  # u_t·u_{t+1} for consecutive t, t+1 in [o_0, o_K)
    return unit_sum, count, sq_norm, adjacent


def assert_matches(out, ref, tol: float):
    unit_sum, count, sq_norm, adjacent = (t.cpu() for t in out)
    assert unit_sum.dtype == sq_norm.dtype == adjacent.dtype == torch.float32 and count.dtype == torch.int32
    assert unit_sum.shape == ref[0].shape and count.shape == ref[1].shape and adjacent.shape == ref[3].shape
    assert torch.equal(count, ref[1])
    pairs = (("unit_sum", unit_sum, ref[0]), ("sq_norm", sq_norm, ref[2]), ("adjacent", adjacent, ref[3]))
    for name, got, want in pairs:
        scale = max(1.0, float(want.nan_to_num(0.0, 0.0, 0.0).abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(
            got.double(), want, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}"
        )


# ---------------------------------------------------------------------------------------------------- cases


def _batch(lens, dim, dtype, n_seg=2, seed=0, **kw):
    return packed_batch(lens, dim, dtype, n_seg=n_seg, seed=seed, **kw)


RAGGED = [5, 0, 1, 130, 64, 65, 200, 3, 0]


def case_ragged(dtype):
    return _batch(RAGGED, 64, dtype, n_seg=2, zero_rows=3)


def case_three_segments(dtype):
    return _batch(RAGGED, 96, dtype, n_seg=3, seed=1)


def case_multi_warp(dtype):  # several warps per block: the cross-warp norm reduction
    return _batch([150, 2, 67], 520, dtype, n_seg=2, seed=10)


def case_many_sequences(dtype):  # B*K > 1024: the plan kernel's multi-warp, multi-tile scan
    lens = torch.randint(0, 6, (700,), generator=torch.Generator().manual_seed(11)).tolist()
    return _batch(lens, 16, dtype, n_seg=2, seed=11, pad=0, zero_rows=0)


def case_whole_sequences(dtype):  # K = 1, default offsets [[0, len_b]]
    h, cu, _ = _batch([7, 129, 1, 64], 40, dtype, seed=2)
    lens = (cu[1:] - cu[:-1]).to(torch.int32)
    return h, cu, torch.stack([torch.zeros_like(lens), lens], 1)


def case_length_one(dtype):
    return _batch([1, 1, 0, 1], 32, dtype, n_seg=1, seed=3, pad=0, zero_rows=0)


def case_transposed(dtype):  # stride(1) != 1: generic strided path
    h, cu, seg = _batch(RAGGED, 48, dtype, seed=4)
    return h.t().contiguous().t(), cu, seg


def case_misaligned(dtype):  # unit column stride but rows not 16-byte aligned: generic path
    h, cu, seg = _batch(RAGGED, 40, dtype, seed=5)
    wide = torch.zeros(h.shape[0], 41, dtype=dtype)
    wide[:, 1:] = h
    return wide[:, 1:], cu, seg


def case_odd_dim(dtype):  # D not a multiple of the vector width: generic path
    return _batch([70, 9], 37, dtype, seed=6)


def case_wide(dim):  # D large enough to need several 16-byte loads per thread and row
    def make(dtype):
        return _batch([66, 9], dim, dtype, n_seg=2, seed=7, zero_rows=0)

    make.__name__ = f"case_wide_{dim}"
    return make


def case_nan(dtype):
    h, cu, seg = _batch(RAGGED, 64, dtype, seed=8)
    h[int(cu[3]) + 10, 5] = float("nan")  # inside sequence 3's covered span
    h[int(cu[6]) + 20, 0] = float("inf")
    return h, cu, seg


def case_zero_tokens(dtype):
    return torch.zeros(0, 16, dtype=dtype), torch.zeros(3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32)


def case_no_sequences(dtype):
    return torch.randn(4, 16).to(dtype), torch.zeros(1, dtype=torch.int32), torch.zeros(0, 3, dtype=torch.int32)


def case_no_segments(dtype):  # K = 0
    h, cu, _ = _batch([4, 6], 16, dtype)
    return h, cu, torch.tensor([[1], [2]], dtype=torch.int32)


def case_zero_dim(dtype):
    return torch.zeros(6, 0, dtype=dtype), torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor(
        [[0, 1, 2], [0, 3, 4]], dtype=torch.int32
    )


SMALL_CASES = [
    case_ragged,
    case_three_segments,
    case_multi_warp,
    case_whole_sequences,
    case_length_one,
    case_transposed,
    case_misaligned,
    case_odd_dim,
    case_nan,
    case_zero_tokens,
    case_no_sequences,
    case_no_segments,
    case_zero_dim,
]
# 16-byte loads per thread and row: fp32 (4 per load) 2064 -> 2, 4100 -> 4, 8196 -> 8; fp16/bf16 (8 per load)
# 4104 -> 2, 8200 -> 4; a transposed 5000 takes the generic path with 16 elements per thread.
WIDE_CASES = [
    (torch.float32, 2064),
    (torch.float32, 4100),
    (torch.float32, 8196),
    (torch.float16, 4104),
    (torch.float16, 8200),
    (torch.bfloat16, 4104),
    (torch.bfloat16, 8200),
]


def _check(run, make, dtype):
    hidden, cu, seg = make(dtype)
    assert_matches(run(hidden, cu, seg), reference(hidden, cu, seg), TOL[dtype])


def test_reference_inputs_are_concentrated():
    """The inputs are meant to have mean cosines well away from 0 (a shared direction plus noise)."""
    unit_sum, count, sq_norm, _ = reference(*case_ragged(torch.float32))
    n = count.double()
    intra = ((unit_sum * unit_sum).sum(-1) - sq_norm) / (n * (n - 1))
    intra = intra[n >= 8]
    assert intra.numel() > 4 and 0.1 < float(intra.min()) and float(intra.max()) < 0.9


# ---------------------------------------------------------------------------------------------------- GPU runner


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from gainrl_kernels.extension import has_ext_kernel

    return has_ext_kernel("cuda")


cuda_only = pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and gainrl_kernels._C built with CUDA")


def to_cuda_same_layout(t: torch.Tensor) -> torch.Tensor:
    """Like t.cuda(), but keeping strides and storage offset (t.cuda() makes gappy views contiguous)."""
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return torch.as_strided(flat.cuda(), t.shape, t.stride(), t.storage_offset())


def run_cuda(hidden, cu, seg):
    h = to_cuda_same_layout(hidden)
    assert h.stride() == hidden.stride() and h.storage_offset() == hidden.storage_offset()
    return torch.ops.gainrl.angle_stats_ext(h, cu.cuda(), seg.cuda())


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", SMALL_CASES, ids=lambda f: f.__name__)
def test_cuda_matches_reference(make, dtype):
    _check(run_cuda, make, dtype)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_many_sequences(dtype):
    _check(run_cuda, case_many_sequences, dtype)


@cuda_only
@pytest.mark.parametrize("dtype,dim", WIDE_CASES, ids=str)
def test_cuda_wide_rows(dtype, dim):
    _check(run_cuda, case_wide(dim), dtype)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_wide_transposed(dtype):
    """D = 5000 strided: the generic path (16 elements per thread); 9000 strided: copied to the 16-byte path."""
    for dim in (5000, 9000):
        h, cu, seg = case_wide(dim)(dtype)
        h = h.t().contiguous().t()
        assert_matches(run_cuda(h, cu, seg), reference(h, cu, seg), TOL[dtype])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_model_sized_batch(dtype):
    lens = torch.randint(40, 700, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    h, cu, seg = _batch(lens, 4096 if dtype != torch.float32 else 2048, dtype, n_seg=2, seed=9)
    assert_matches(run_cuda(h, cu, seg), reference(h, cu, seg), TOL[dtype])


@cuda_only
def test_cuda_deterministic_and_no_host_sync():
    h, cu, seg = (t.cuda() for t in _batch([300, 5, 900, 1, 64], 1024, torch.bfloat16, n_seg=3))
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside the op raises
    try:
        first = torch.ops.gainrl.angle_stats_ext(h, cu, seg)
        second = torch.ops.gainrl.angle_stats_ext(h, cu, seg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise: fixed summation order, no atomics


@cuda_only
def test_cuda_graph_capture():
    h, cu, seg = (t.cuda() for t in _batch([100, 3, 257], 256, torch.float16))
    torch.ops.gainrl.angle_stats_ext(h, cu, seg)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.gainrl.angle_stats_ext(h, cu, seg)
    h.copy_(h.flip(0))  # new contents, same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, reference(h, cu, seg), TOL[torch.float16])


TOO_WIDE = """
import torch, gainrl_kernels.ops  # registers the ops and loads the extension
h = torch.randn(4, 16388, device="cuda")
try:
    torch.ops.gainrl.angle_stats_ext(h, torch.tensor([0, 4], dtype=torch.int32, device="cuda"),
                                     torch.tensor([[0, 4]], dtype=torch.int32, device="cuda"))
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
"""


@cuda_only
def test_cuda_rejects_too_wide_rows():
    """The binding (g++-compiled csrc/angle_stats_cuda_binding.cpp) raises; nothing is launched. In a subprocess:
    on an H200 (torch 2.11+cu130) raising this error crashed the process (SIGSEGV, also when the check was still in
    the .cu), which must not take the rest of the suite down."""
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", TOO_WIDE], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    assert "RAISED" in res.stdout and "exceeds the supported" in res.stdout, res.stdout


@cuda_only
def test_public_api_refuses_too_wide_rows_for_cuda():
    """The functional API checks the CUDA kernels' width limit in Python (a ValueError naming hidden) and "auto"
    routes such rows elsewhere."""
    from gainrl_kernels import angle_stats

    h = torch.randn(4, 16388, device="cuda")
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="hidden: D = 16388"):
        angle_stats(h, cu, backend="cuda")
    stats = angle_stats(h, cu)  # auto: not the CUDA kernel
    assert stats.unit_sum.shape == (1, 1, 16388) and torch.isfinite(stats.unit_sum).all()


# ---------------------------------------------------------------------------------------------------- CPU emulator
# tests/cuda_emulator.py runs the kernel header under g++; this body wraps its launcher for ctypes.

EMULATOR_BODY = r"""
#include "angle_stats_kernels.cuh"

namespace as = gainrl::angle_stats;

extern "C" int64_t emu_max_chunks(int64_t T, int64_t BK) { return as::max_chunks(T, BK); }

extern "C" int emu_plan(const int* cu, const int* seg, int64_t T, int K, int BK, int max_chunks, int* count,
                        int* chunk_start) {
  try {
    gainrl_emu::launch(&as::plan_kernel, dim3(1), dim3(as::kPlanThreads), cu, seg, T, K, BK, max_chunks, count,
                       chunk_start);
  } catch (...) {
    return -1;
  }
  return 0;
}

extern "C" int emu_angle_stats(int dtype, const void* hidden, int64_t T, int64_t D, int64_t stride_t,
                               int64_t stride_d, const int* cu, const int* seg, int64_t B, int64_t K,
                               float* unit_sum, int* count, float* sq_norm, float* adjacent, int* chunk_start,
                               float* part_sum, float* part_sq, float* part_adj) {
  as::Args a{};
  a.hidden = hidden; a.T = T; a.D = D; a.stride_t = stride_t; a.stride_d = stride_d;
  a.cu_seqlens = cu; a.seg_offsets = seg; a.B = B; a.K = K;
  a.unit_sum = unit_sum; a.count = count; a.sq_norm = sq_norm; a.adjacent = adjacent;
  a.chunk_start = chunk_start; a.part_sum = part_sum; a.part_sq = part_sq; a.part_adj = part_adj;
  try {
    return static_cast<int>(as::launch_angle_stats(a, static_cast<as::DType>(dtype), nullptr));
  } catch (...) {
    return -1;
  }
}
"""


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    lib = cuda_emulator.build(tmp_path_factory.mktemp("emu"), EMULATOR_BODY)
    lib.emu_max_chunks.restype = ctypes.c_int64
    lib.emu_max_chunks.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.emu_angle_stats.restype = ctypes.c_int
    lib.emu_angle_stats.argtypes = (
        [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
        + [ctypes.c_void_p] * 8
    )
    return lib


EMU_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def emulate(lib, hidden, cu, seg):
    """Mirrors the torch binding: outputs and workspace poisoned with NaN / -1 so unwritten entries show."""
    n_tok, dim = hidden.shape
    n_seq, n_seg = seg.shape[0], seg.shape[1] - 1
    cu, seg = cu.contiguous(), seg.contiguous()
    unit_sum = torch.full((n_seq, n_seg, dim), float("nan"))
    count = torch.full((n_seq, n_seg), -1, dtype=torch.int32)
    sq_norm = torch.full((n_seq, n_seg), float("nan"))
    adjacent = torch.zeros(n_seq) if n_seg == 0 else torch.full((n_seq,), float("nan"))
    mc = lib.emu_max_chunks(n_tok, n_seq * n_seg)
    chunk_start = torch.full((n_seq * n_seg + 1,), -1, dtype=torch.int32)
    part_sum = torch.full((mc * dim + 1,), float("nan"))
    part_scalars = torch.full((2, mc + 1), float("nan"))
    ptr = lambda t: t.data_ptr()  # noqa: E731
    rc = lib.emu_angle_stats(
        EMU_DTYPE[hidden.dtype], ptr(hidden), n_tok, dim, hidden.stride(0), hidden.stride(1), ptr(cu), ptr(seg),
        n_seq, n_seg, ptr(unit_sum), ptr(count), ptr(sq_norm), ptr(adjacent), ptr(chunk_start), ptr(part_sum),
        ptr(part_scalars[0]), ptr(part_scalars[1]),
    )
    if rc != 0:
        raise RuntimeError(f"emulated launch failed: {rc}")
    return unit_sum, count, sq_norm, adjacent


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", SMALL_CASES, ids=lambda f: f.__name__)
def test_emulated_matches_reference(emulator, make, dtype):
    _check(lambda h, c, s: emulate(emulator, h, c, s), make, dtype)


@pytest.mark.parametrize("dtype,dim", WIDE_CASES, ids=str)
def test_emulated_wide_rows(emulator, dtype, dim):
    _check(lambda h, c, s: emulate(emulator, h, c, s), case_wide(dim), dtype)


def test_emulated_many_sequences(emulator):
    _check(lambda h, c, s: emulate(emulator, h, c, s), case_many_sequences, torch.float32)


def test_emulated_plan_of_overlapping_unvalidated_segments(emulator):
    """Unvalidated offsets can make segments overlap: 256 whole-sequence segments of 2^30 rows would be 2^32 chunks.
    The plan's scan runs in 64 bits and clamps to the grid, so chunk_start stays in [0, max_chunks], non-decreasing
    (the chunk and reduce kernels then stay in bounds)."""
    n_tok, n_seg = 1 << 30, 512
    cu = torch.tensor([0, n_tok], dtype=torch.int32)
    seg = torch.zeros(1, n_seg + 1, dtype=torch.int32)
    seg[0, 1::2] = n_tok  # [0, T), [T, 0) (empty), [0, T), ...
    mc = emulator.emu_max_chunks(n_tok, n_seg)
    count = torch.full((n_seg,), -1, dtype=torch.int32)
    chunk_start = torch.full((n_seg + 1,), -1, dtype=torch.int32)
    emulator.emu_plan.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int] * 3 + [
        ctypes.c_void_p] * 2
    assert emulator.emu_plan(cu.data_ptr(), seg.data_ptr(), n_tok, n_seg, n_seg, mc, count.data_ptr(),
                             chunk_start.data_ptr()) == 0
    assert count[0::2].eq(n_tok).all() and count[1::2].eq(0).all()
    assert chunk_start.min() >= 0 and chunk_start.max() == mc and (chunk_start.diff() >= 0).all()


def test_emulated_wide_transposed(emulator):
    h, cu, seg = case_wide(5000)(torch.float32)
    h = h.t().contiguous().t()
    assert_matches(emulate(emulator, h, cu, seg), reference(h, cu, seg), TOL[torch.float32])
    with pytest.raises(RuntimeError, match="failed"):  # strided rows wider than 8192: the binding copies first
        h2, cu2, seg2 = case_wide(8196)(torch.float32)
        emulate(emulator, h2.t().contiguous().t(), cu2, seg2)
