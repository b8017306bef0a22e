"""Fused RMSNorm + angle statistics (Triton, with an autograd backward for the RMSNorm): host side and public API.

    y, stats = rmsnorm_angle(x, weight, eps, cu_seqlens, seg_offsets=None, token_index=None)

RMSNorm (HF ``LlamaRMSNorm`` semantics, computed in fp32):
    n = x.float() * rsqrt(mean(x.float()², -1) + eps);   y = (weight.float() * n.to(x.dtype).float()).to(x.dtype)
When ``weight.dtype == x.dtype`` this is bit-for-bit HF's ``weight * n.to(input_dtype)`` (a 16-bit product is computed
in fp32 and rounded once). HF would return fp32 for an fp32 weight and a 16-bit ``x`` (type promotion); here ``y``
always has ``x``'s dtype and shape (the drop-in module :class:`FusedRMSNormAngle` returns HF's dtype). Compiled, rsqrt is the hardware's (as ``torch.rsqrt`` on CUDA); the
interpreter uses the IEEE square root and reciprocal (``_rstd``).

Statistics (DESIGN.md §1, same definitions and types as ``angle_stats``) are of **y as the model sees it**, i.e.
after the cast to ``x.dtype``: ``u_t = y_t / max(||y_t||, 1e-12)`` with the norm taken in fp32 of the rounded
values (compiled, 1 / ||y_t|| is the hardware's rsqrt: relative error below 2**-22). So ``rmsnorm_angle(x, ...)[1]``
equals ``angle_stats(y, ...)`` up to fp32 rounding and summation order.
    unit_sum [B, K, D] f32,  count [B, K] i32,  sq_norm [B, K] f32,  adjacent [B] f32   (``types.AngleStats``)

Shapes and dtypes:
    x            [T, D] or [N, L, D], float16 / bfloat16 / float32, any strides (a 3-D input is viewed as its
                 N*L flat rows; a copy is made only when that view is impossible or its columns are strided: the
                 forward reads rows in vector loads)
    weight       [D] float16 / bfloat16 / float32
    cu_seqlens   [B+1] int32 (flash-attn convention) over *packed* token positions; None -> plain RMSNorm,
                 stats None
    seg_offsets  [B, K+1] int32, relative to each sequence start; default [[0, len_b]] (K = 1)
    token_index  [T_packed] int32/int64 or None: flat row (of the [R, D] view of x) of each packed token, as made
                 by :func:`padded_to_cu_seqlens` for padded [N, L, D] batches. Each sequence must occupy
                 consecutive rows in order (left or right padding). None: packed token t is row t.
    weight and the index tensors may have any strides (the kernels read a densely packed copy of a strided one).

Modules: this one checks the arguments, holds the forward's tuning knobs and launch rules (``_fwd_config``), builds
the plans (``_Plan``), launches the forward (Triton or the CUDA extension), and defines the autograd function, the
torch.library ops and the public API. The forward's Triton kernels (and their design) are in
:mod:`gainrl_kernels.rmsnorm_angle_forward_kernels`; the backward (kernels, knobs, launcher ``_backward``) is
:mod:`gainrl_kernels.rmsnorm_angle_backward`.

Forward (three launches with statistics, one without; no host sync, no atomics):
  * ``_plan_kernel`` builds the work list on the device (``_stats_plan``): chunks of at most ``chunk`` rows (256,
    fewer when there are under ~4 chunks per multiprocessor), each inside one segment or outside all of them.
    Without statistics there is no work list: the kernels derive the rows from the program id, one row (one
    [BLOCK_T, BLOCK_D] step) per program, as Inductor's RMSNorm does (no partial row to amortise).
  * ``_fwd_rows_kernel`` (next_pow2(D) <= 8192): whole rows in registers, x read once; a segment chunk also sums
    its unit vectors, their squared norms and the adjacent pairs into one fp32 partial row + two scalars.
  * or, where the extension is built with CUDA and takes the rows (``_cuda_rows_take``: 16-bit rows, 16-byte
    vectors, D <= 8192), the hand-written CUDA rows kernel on the same work list (csrc/rmsnorm_angle_kernels.cuh:
    rows through a cp.async ring in shared memory, one barrier a row); faster than the Triton rows kernel from
    D = 2048 on, as fast at 896 (H200, bench/results/fused_variants_h200_cuda_rows.json). Up to
    ``_CUDA_ROWS_SPANS_MAX_ROWS`` rows (0, off, until timed) its SPANS form needs no work list: block i takes rows
    [i chunk, (i + 1) chunk) across sequences and segments, finds them in cu_seqlens, seg_offsets and
    token_index itself, and writes a partial per piece (its rows of one segment) at slot i + b K + k;
    ``_reduce_spans_kernel`` finds a segment's slots from the indices alone (two launches instead of three).
  * ``_fwd_sliced_kernel`` (wider rows): 32-row chunks, three passes over 64-wide column slices.
  * ``_reduce_kernel`` sums each segment's partials in a fixed order: the statistics are deterministic (bitwise run
    to run). ``count`` is exact integer arithmetic on the clamped offsets. (``_REDUCE_PROGRAMS_PER_SM``, off until
    timed, narrows its column blocks for launches with few segments, so that more SMs read the partials.)

Backward (``torch.autograd.Function``, and the op ``gainrl::rmsnorm_angle_bwd`` under torch.compile): gradients of
the RMSNorm only (the statistics are outputs marked non-differentiable), by ``_backward`` of
:mod:`gainrl_kernels.rmsnorm_angle_backward` (dx, and dw summed in a fixed order).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import nn
from torch.autograd.function import once_differentiable

from .extension import has_ext_kernel
from .rmsnorm_angle_backward import _backward
from .rmsnorm_angle_forward_kernels import (
    _TL_DTYPE,
    _capability_major,
    _fwd_rows_kernel,
    _fwd_sliced_kernel,
    _plan_kernel,
    _reduce_kernel,
    _reduce_spans_kernel,
    _vector_aligned,
)
from .types import AngleStats
from .validate import (
    check_cu_seqlens_meta,
    check_cu_seqlens_values,
    check_device,
    check_feature_dim,
    check_float_dtype,
    check_seg_offsets_meta,
    check_seg_offsets_values,
    check_tensor,
    check_triton_device,
    on_first_tensors_device,
)

__all__ = ["rmsnorm_angle", "FusedRMSNormAngle", "consecutive_tokens", "padded_to_cu_seqlens"]

_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------------------
# validation (every failure is a ValueError naming the argument; shared checks live in validate.py)
# --------------------------------------------------------------------------------------------------------------
def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cu_seqlens: Optional[torch.Tensor],
    seg_offsets: Optional[torch.Tensor],
    token_index: Optional[torch.Tensor],
    validate: bool,
) -> None:
    """Metadata of every argument (see the module docstring); ``validate`` adds the index value checks."""
    _check_x_weight_eps(x, weight, eps)
    if cu_seqlens is None:
        if seg_offsets is not None:
            raise ValueError("seg_offsets: given without cu_seqlens")
        if token_index is not None:
            raise ValueError("token_index: given without cu_seqlens")
        return
    check_cu_seqlens_meta(cu_seqlens, x.device, owner="x")
    if seg_offsets is not None:
        check_seg_offsets_meta(seg_offsets, cu_seqlens.numel() - 1, x.device, owner="x")
    if token_index is not None:
        _check_token_index_meta(token_index, x.device)
    if validate:
        _check_values(cu_seqlens, seg_offsets, token_index, rows=x.numel() // x.shape[-1])


def _check_x_weight_eps(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """x [T, D] / [N, L, D] float (CUDA, or CPU under the interpreter), weight [D] float on x's device, eps >= 0."""
    check_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D [T, D] or 3-D [N, L, D] tensor, got shape {tuple(x.shape)}")
    check_float_dtype("x", x)
    check_feature_dim("x", x)
    check_triton_device("x", x)
    check_tensor("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape [{x.shape[-1]}] (D of x), got {tuple(weight.shape)}")
    check_float_dtype("weight", weight)
    check_device("weight", weight, x.device, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


def _check_token_index_meta(token_index: object, device: torch.device) -> None:
    """[T_packed] int32 / int64 on x's device."""
    token_index = check_tensor("token_index", token_index)
    if token_index.dim() != 1:
        raise ValueError(f"token_index: expected a 1-D [T] tensor, got shape {tuple(token_index.shape)}")
    if token_index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"token_index: expected dtype int32 or int64, got {token_index.dtype}")
    check_device("token_index", token_index, device, "x")


def _check_values(cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor], token_index: Optional[torch.Tensor],
                  rows: Optional[int]) -> None:
    """Value checks that read the index tensors (one host sync on CUDA). ``rows``: rows of x, None if unknown."""
    if token_index is None:
        check_cu_seqlens_values(cu_seqlens, rows, "rows of x")
    else:
        check_cu_seqlens_values(cu_seqlens, token_index.numel(), "entries of token_index")
    if seg_offsets is not None:
        check_seg_offsets_values(seg_offsets, cu_seqlens)
    if token_index is not None:
        _check_token_index_values(token_index, cu_seqlens, rows)


def _check_token_index_values(token_index: torch.Tensor, cu_seqlens: torch.Tensor, rows: Optional[int]) -> None:
    """The packed tokens' rows: inside x, strictly increasing, consecutive within each sequence."""
    cu = cu_seqlens.to("cpu", torch.int64)
    if int(cu[-1]) == 0:
        return
    idx = token_index[: int(cu[-1])].to("cpu", torch.int64)
    if bool((idx < 0).any()) or (rows is not None and bool((idx >= rows).any())):
        raise ValueError(f"token_index: values must lie in [0, {rows}) (rows of x)")
    if bool((idx[1:] <= idx[:-1]).any()):
        raise ValueError("token_index: expected strictly increasing rows (sequences in order)")
    step = idx[1:] - idx[:-1]
    t = torch.arange(1, idx.numel())
    same_seq = torch.searchsorted(cu[1:], t, right=True) == torch.searchsorted(cu[1:], t - 1, right=True)
    if bool((same_seq & (step != 1)).any()):
        raise ValueError("token_index: each sequence must occupy consecutive rows (left or right padding)")


# --------------------------------------------------------------------------------------------------------------
# forward: tuning knobs, launch shapes, plans, launches (kernels in rmsnorm_angle_forward_kernels.py)
# --------------------------------------------------------------------------------------------------------------
# widest row (next_pow2(D)) the whole-row forward holds in registers without spills at sm_80 / sm_90a (one row per
# step, 16 warps at 8192)
_ROWS_MAX_BLOCK_D = 8192
_ROWS_TILE = 4096  # elements of one [BLOCK_T, BLOCK_D] step of the whole-row forward (16 per thread at 8 warps)
_ROWS_ONE_ROW_MIN_D = 1024  # from this BLOCK_D on, one row per step (previous row kept, next row prefetched)
# warps of the whole-row forward: a [BLOCK_T, BLOCK_D] step of x over 32 x this many bytes, 4 to _ROWS_MAX_WARPS
# (32 bf16 or 16 fp32 values per thread)
_ROWS_BYTES_PER_THREAD = 64
# ... and with statistics: a one-row step's loop is bound by its dependent chain (load, block reduction, rsqrt, the
# accumulators), not by bandwidth, so more warps share a row: 16 values per thread (8 warps for a bf16 row of 4096),
# at least 8 warps from BLOCK_D = 2048. H100, bf16, same run: 64x4096x4096 fused 1.708 -> 1.651 ms, 16x4096x2048
# 0.221 -> 0.217 ms (bench/results/fused_variants_h100_706eee6.json, variant 32_values_per_thread = the old rule;
# 16 warps at 4096 was slower, 2.059 ms)
_ROWS_STATS_VALUES_PER_THREAD = 16
_ROWS_STATS_MIN_WARPS = (2048, 8)  # (from this BLOCK_D on, at least this many warps)
# one-row steps with statistics under a register cap: (compute capability major, BLOCK_D, bytes per element of x)
# -> (warps, ptxas .maxnreg). At BLOCK_D = 4096, 16-bit, sm_90: 4 warps at 168 registers hold the row in 32 values
# per thread with 3 programs (12 warps) per SM; the 8 uncapped warps of the rule above fit 2 (16 warps) and issue
# 2280 against 1940 warp instructions a row (bench/fused_static.py). H100, 64x4096x4096 bf16: fused 1.631 -> 1.605
# ms (bench/results/fused_variants_h100.json, variant 8_warps_at_4096 = without the cap). Not on sm_80 (64 bytes of
# spills) nor for fp32 (88 at sm_90a)
_ROWS_STATS_REGISTER_CAP: dict[tuple[int, int, int], tuple[int, int]] = {(9, 4096, 2): (4, 168)}
_ROWS_MAX_WARPS = 16
_PLAN_TILE = 1024  # [BLOCK_B, BLOCK_C] chunks a work-list program writes per step (short chunks: more programs)
_PLAN_SEQUENCE_READS = 1 << 16  # work-list programs x sequences at most (each program reads every sequence's bounds)
_REDUCE_TILE = (16, 128)  # chunks x columns the reduce kernel loads per step (16 values per thread)
# None: the reduce kernel's tile is _REDUCE_TILE. A number: its column blocks narrow (down to 16 columns, the tile's
# chunks growing to keep 2048 values a step) until there are about this many programs per SM, since each program
# reads its chunks at one SM's bandwidth: at 8x2048x896 (B K = 8) the fixed tile gives 56 programs (``_reduce_tile``).
# Off until timed on a GPU (variants reduce_fill_4, cuda_spans_reduce_fill_4 of bench/fused_variants.py).
_REDUCE_PROGRAMS_PER_SM: Optional[int] = None
# rows per program at most: the fp32 partial row costs 2 / chunk of a bf16 read + write of x (and the reduce reads it
# back). 128 -> 256, H100 bf16, two runs (variant chunk_256 of bench/results/fused_variants_h100.json and
# _h100_register_cap.json): 64x4096x4096 1.605 -> 1.597 and 1.601 -> 1.597 ms, the other shapes within +-0.3%
_MAX_CHUNK = 256
# ... and without statistics (no partial row to amortise): one row (one BLOCK_T step) per program, as Inductor's
# RMSNorm. H100 bf16, bare kernel against 128 rows per program: 64x4096x4096 1.517 -> 1.440 ms (torch.compile
# 1.436), 16x4096x5120 0.508 -> 0.446, 16x4096x2048 0.197 -> 0.182, 8x2048x896 0.0275 -> 0.0228 ms
# (bench/results/fused_variants_h100_register_cap.json, variants bare_chunk_*; fused_variants_h100.json: today's)
_BARE_MAX_CHUNK = 1
# chunks shrink (halving from _MAX_CHUNK) until the launch has about this many programs per multiprocessor, so that
# small batches still fill the GPU; None: 4, or the CUDA rows kernel's by width (_CUDA_ROWS_FILL). A knob for
# bench/fused_variants.py (variants cuda_rows_fill_*)
_FILL_PER_SM: Optional[int] = None
_SLICED_TILE = (32, 64, 8)  # BLOCK_T (= chunk), BLOCK_D, warps of the sliced forward: no spills at sm_80 / sm_90a
# one-row steps: one joint block reduction per row (see _row_sums3); None = in compiled code only (the interpreter
# sums a stacked tensor in another order than tl.sum)
_JOINT_SUMS: Optional[bool] = None
# 1 / ||y_t|| of the statistics by the hardware's rsqrt rather than an IEEE square root and division (_inv_norm):
# 285 against 314 machine instructions per thread and row step at D = 4096 bf16 (bench/fused_static.py, variant
# exact_inverse_norm). None = in compiled code only (the interpreter keeps the IEEE form); True / False force either
# form (tests, bench/fused_variants.py)
_RSQRT_INV: Optional[bool] = None
# rstd = rsqrt(mean(x²) + eps) by the hardware's rsqrt, as torch.rsqrt in HF's RMSNorm on CUDA, rather than an IEEE
# square root and reciprocal (_rstd), in the bare and the fused kernels alike: 2520 -> 2280 warp instructions a row
# of the fused step, 984 -> 888 of the bare one (bf16, D = 4096, sm_90a, bench/fused_static.py; variant exact_rstd
# the old form). None = in compiled code only; True / False force either form
_RSQRT_RSTD: Optional[bool] = None
# one-row steps with statistics: besides the next row, which is loaded into registers a step ahead, hint the L2 to
# fetch the row this many rows further ahead (0: off; compiled code only). More bytes in flight per program without
# registers: the capped kernel keeps 3 programs (one row load each) per SM and waits on global loads in a third of
# its stalls (bench/results/profile_fused_h100_register_cap.txt). Not yet timed on a GPU: variants prefetch_* of
# bench/fused_variants.py
_PREFETCH_ROWS = 0
_PREFETCH_L1 = False  # ... into the L1 as well (prefetch.global.L1)
# one-row steps with statistics: 0 = row t+2 loaded into registers during step t (above); S >= 2 = row t+1 loaded
# where step t uses it, in a loop Triton's software pipeliner runs with S stages: the load becomes a cp.async into
# shared memory issued S - 1 steps ahead (S - 1 rows in flight per program, none of them in registers). The
# interpreter runs the same loop without pipelining. Not yet timed: variants pipeline_*
_PIPELINE_STAGES = 0
# eviction policy of the one-row steps' x loads with statistics ("" = the default; "evict_first": x is read once,
# so its lines may leave the L2 first, before prefetched ones). Not yet timed: variant x_evict_first
_X_EVICTION = ""
# one-row steps with statistics: a row whose width D lies strictly between powers of two P and 2P, with P +
# next_pow2(D - P) < 2P, held as two tiles, [P] and a tail [next_pow2(D - P)], instead of one padded [2P]: D = 5120
# as 4096 + 1024 values on 8 warps (114 registers, 2 programs per SM) in place of 8192 on 16 warps (95, one per
# SM), 4656 -> 3152 warp instructions a row in bf16, 4512 -> 2912 in fp32 (sm_90a, Triton 3.9, bench/fused_static.py
# --variant split_tail). Costs a second block reduction per row, which outweighs the padding below 2P = 8192 (D =
# 3072 bf16: 1940 -> 2352 against the capped 4-warp row of 4096, variant split_tail_from_4096), hence only from a
# padded width of _ROWS_SPLIT_FROM on. Timed on an H200 (bf16, 16x4096x5120, graph replays; session 17,
# bench/results/fused_variants_h200_cuda_rows.json): 0.480 ms split against 0.523-0.530 padded (variant split_tail).
# True / False: always / never; None (the default): by dtype and width only, so that the same rows in any layout
# take the same tiles (and the statistics the same rounding): 16-bit rows with D % 16 == 0 (vector loads where the
# pointers allow) and a tail of at most _ROWS_SPLIT_MAX_TAIL, i.e. D = 4112-5120 (4096 + a tail of 16-1024: 102-114
# registers at sm_90a, two programs of 8 warps per SM, as timed). Not fp32 rows: aligned at 4608 and unaligned at
# 4104 they spill (4-12 bytes at sm_90a) and the split is untimed there; not longer tails: 150 registers from a
# tail of 2048 (one program per SM, untimed); not D % 16 != 0: scalar loads take 200-242 registers. Figures:
# bench/fused_static.py --variant split_tail [--unaligned] --dims 4104 4608 5120 6144
_ROWS_SPLIT_TAIL: Optional[bool] = None
_ROWS_SPLIT_FROM = 8192
_ROWS_SPLIT_MAX_TAIL = 1024
# rows with statistics through the hand-written CUDA rows kernel of the extension (csrc/rmsnorm_angle_kernels.cuh:
# a cp.async ring of _CUDA_ROWS_STAGES rows in shared memory, one barrier per row, the weight in shared memory,
# _CUDA_ROWS_VALUES columns per thread) instead of _fwd_rows_kernel, where it takes the rows (``_cuda_rows_take``:
# the extension built with CUDA, 16-byte vectors, D <= 8192, fp32 <= 4096). Same work list, outputs and reduce
# kernel. Checked in the CPU emulator and on GPUs (tests/test_rmsnorm_angle_cuda.py). Timed on an H200 (graph
# replays, bf16, bench/results/fused_variants_h200_cuda_rows.json, Triton rows -> CUDA rows): 64x4096x4096
# 1.224 -> 1.176 ms (bare 1.053), 16x4096x2048 0.173 -> 0.159, 16x4096x5120 0.530 -> 0.401, 8x2048x896 0.033 ->
# 0.033; again as the default in bench/results/fused_variants_h200_cuda_default.json (1.178 ms); with stages and
# carry by width (_cuda_rows_tuning, session 18) 1.155 ms (bench/results/fused_variants_h200_width_rule.json)
_CUDA_ROWS = True
_CUDA_ROWS_MAX_DIM, _CUDA_ROWS_MAX_THREADS = 8192, 512  # kMaxDim, kMaxThreads of csrc/rmsnorm_angle_launch.h
# fp32 rows too (8 values per thread, D <= 4096): checked, and slower than the Triton rows kernel on an H200 (graph
# replays, fp32, bench/results/fused_variants_h200_fp32.json, Triton -> CUDA rows): 16x4096x2048 0.308 -> 0.387 ms,
# 16x4096x4096 0.587 -> 0.831 ms (bare 0.263 / 0.527), so fp32 rows keep Triton
_CUDA_ROWS_FP32 = False
# 32 or 16 columns per thread in 16-bit rows (fp32 rows: always 8, so D <= 4096). 32: at D = 4096 bf16 a row
# costs 1992 warp instructions on 4 blocks of 4 warps per SM, 16: 2416 on 2 blocks of 8 warps (sm_90a,
# bench/cuda_rows_static.py; Triton's: 1940 on 3 programs of 4 warps)
_CUDA_ROWS_VALUES = 32
# 2 to 4 rows in the ring (stages - 1 loaded ahead); None: the per-width rule of ``_cuda_rows_tuning``.
_CUDA_ROWS_STAGES: Optional[int] = None
# 32 values per thread: keep the next row's fp32 values in registers rather than reading the ring twice. At D =
# 4096 bf16: 1840 warp instructions a row on 3 blocks of 4 warps per SM (156 registers), against 1992 on 4 blocks
# (126); the 16-value tuning always carries. None: the per-width rule of ``_cuda_rows_tuning``.
_CUDA_ROWS_CARRY: Optional[bool] = None
# (stages, carry) by width: the fastest of 2 / 3 / 4 stages and carry on an H200, graph-timed bf16 fused forward
# (bench/fused_variants.py; bench/results/fused_variants_h200_cuda_rows.json, _cuda_default.json, _mma.json,
# _no_segments.json, _width_rule.json, _width_rule_2.json), ms as 3 stages / 2 stages / carry on 3 stages:
#   8x2048x896    0.032-0.033 / 0.036       / 0.031-0.032   (6 runs)
#   16x4096x1536  0.127       / 0.130       / 0.155-0.159   (2 runs)
#   16x4096x2048  0.158-0.159 / 0.155-0.157 / 0.179-0.182   (6 runs)
#   16x4096x3584  0.269-0.273 / 0.280       / 0.273-0.276   (2 runs)
#   64x4096x4096  1.172-1.178 / 1.154-1.171 / 1.205-1.214   (6 runs)
#   16x4096x5120  0.398-0.402 / 0.412-0.423 / 0.374-0.379   (7 runs)
#   4x4096x8192   0.188       / 0.195       / 0.211         (session 25, _8192.json; 4 stages 0.190, carried 0.205)
#   16x4096x8192  0.607       / 0.622       / 0.633         (session 25; 4 stages 0.625, carried 0.608)
_CUDA_ROWS_TUNED: dict[int, tuple[int, bool]] = {
    896: (3, True), 1536: (3, False), 2048: (2, False), 3584: (3, False), 4096: (2, False), 5120: (3, True),
    8192: (3, False)}
# programs per SM the chunks of the CUDA rows kernel shrink to, by width where not 4: past 4096 columns (2-3 blocks
# per SM) 1, i.e. chunks four times as long in small batches. H200, graph-timed bf16 fused forward, ms at fill
# 1 / 2 / 4 / 8 (bench/results/fused_variants_h200_fill.json and _fill_2.json, variants cuda_rows_fill_*):
#   4x4096x8192   0.164       / 0.172-0.173 / 0.188       / 0.220
#   16x4096x8192  0.596       / 0.597-0.598 / 0.608-0.610 / 0.626
#   16x4096x5120  0.368       / 0.371       / 0.378       / -
#   16x4096x3584  0.279       / 0.268       / 0.270-0.271 / -        (4 stays: within noise of 2)
#   16x4096x2048  -           / 0.188       / 0.154       / 0.164
#   8x2048x896    -           / 0.033       / 0.031       / 0.040
# At 64x4096x4096 fill 2 / 4 / 8 are within 1% (1.156 / 1.155 / 1.165: the chunk is at its longest).
_CUDA_ROWS_FILL: dict[int, int] = {5120: 1, 8192: 1}
# Launches of at most this many rows with statistics skip the work list where the CUDA rows kernel takes the rows
# (16-bit, packed or padded): the kernel's SPANS form (csrc/rmsnorm_angle_kernels.cuh), block i on rows
# [i chunk, (i + 1) chunk) whatever the segments, following cu_seqlens, seg_offsets and token_index itself, its
# partials per piece (the block's rows of one segment) at slots i + b K + k, reduced by ``_reduce_spans_kernel``.
# Two launches instead of three: at 8x2048x896 the work-list kernel alone takes 3.5-5.9 us of the forward's ~31
# (plan_ms, H200, sessions 17-27). 0: off (the default until timed on a GPU; variant ``cuda_spans`` of
# bench/fused_variants.py).
_CUDA_ROWS_SPANS_MAX_ROWS = 0


class _FwdConfig(NamedTuple):
    """Forward launch shape: which kernel, rows per program (chunk), its [BLOCK_T, BLOCK_D] tile and warps."""

    rows: bool  # True: _fwd_rows_kernel (whole rows in registers); False: _fwd_sliced_kernel (any D)
    chunk: int
    block_t: int
    block_d: int
    num_warps: int
    maxnreg: Optional[int] = None  # register cap of the compiled kernel (None: ptxas decides)
    block_d2: int = 0  # rows kernel, one-row steps: a second tile of the row, columns [block_d, block_d + block_d2)


def _row_warps(tile: int, elem_size: int) -> int:
    """Warps of a step without statistics over ``tile`` values of ``elem_size`` bytes: ``_ROWS_BYTES_PER_THREAD``
    of x per thread, 4 to ``_ROWS_MAX_WARPS`` (the bare kernel's rule)."""
    return min(_ROWS_MAX_WARPS, max(4, tile * elem_size // (32 * _ROWS_BYTES_PER_THREAD)))


def _rsqrt_forms(cuda: bool) -> dict:
    """The RSQRT_INV / RSQRT_RSTD constexprs of a forward launch: the hardware rsqrt on CUDA, IEEE forms in the
    interpreter, unless ``_RSQRT_INV`` / ``_RSQRT_RSTD`` force one."""
    return dict(RSQRT_INV=cuda if _RSQRT_INV is None else _RSQRT_INV,
                RSQRT_RSTD=cuda if _RSQRT_RSTD is None else _RSQRT_RSTD)


def _fill_target(device: torch.device, per_sm: int) -> int:
    """Programs a forward launch should have at least: ``per_sm`` per multiprocessor (4 SMs on a CPU)."""
    return per_sm * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4)


def _fill_per_sm(dim: int, cuda_rows: bool) -> int:
    """Programs per multiprocessor the forward's chunks shrink to (``_fwd_config``): ``_FILL_PER_SM`` where set,
    else the CUDA rows kernel's entry of ``_CUDA_ROWS_FILL`` for width ``dim`` (``cuda_rows``: that kernel takes
    the rows), else 4."""
    if _FILL_PER_SM is not None:
        return _FILL_PER_SM
    return _CUDA_ROWS_FILL.get(dim, 4) if cuda_rows else 4


def _fwd_config(n_rows: int, dim: int, elem_size: int, device: torch.device, stats: bool,
                capability: Optional[int] = None, aligned: bool = True,
                split: Optional[bool] = None, fill_per_sm: Optional[int] = None) -> _FwdConfig:
    """Tile rules of the forward (tests/test_triton_compile.py lowers these), with or without the statistics. The
    chunk shrinks (to BLOCK_T at least) until there are about ``fill_per_sm`` programs per multiprocessor, so small
    batches still fill the GPU. ``capability``: the compute capability major the rules assume (default: ``device``'s);
    ``aligned``: the launch compiles vector loads (``_vector_aligned``), else no register cap (scalar loads take
    more registers: a capped row of 4096 would spill ~400-500 bytes). ``split``: hold a row as two tiles where
    ``_ROWS_SPLIT_FROM`` allows (``_split_tail``; default: ``_ROWS_SPLIT_TAIL``). ``fill_per_sm``: the
    programs per multiprocessor the chunk shrinks to (default: ``_fill_per_sm`` for the Triton kernels)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if block_d > _ROWS_MAX_BLOCK_D:
        block_t, block_d, warps = _SLICED_TILE
        return _FwdConfig(False, block_t, block_t, block_d, warps)
    block_t = 1 if block_d >= _ROWS_ONE_ROW_MIN_D else max(1, min(16, _ROWS_TILE // block_d))
    target = _fill_target(device, _fill_per_sm(dim, False) if fill_per_sm is None else fill_per_sm)
    chunk = _MAX_CHUNK if stats else _BARE_MAX_CHUNK
    while chunk > block_t and chunk * target > n_rows:
        chunk //= 2
    maxnreg = None
    block_d2 = 0
    if stats and block_t == 1:
        block_d2 = _split_tail(dim, block_d, elem_size, _ROWS_SPLIT_TAIL if split is None else split)
        if block_d2:
            block_d //= 2
        min_d, min_warps = _ROWS_STATS_MIN_WARPS
        warps = max(block_d // (32 * _ROWS_STATS_VALUES_PER_THREAD), min_warps if block_d >= min_d else 4)
        if aligned and not block_d2:
            major = _capability_major(device) if capability is None else capability
            warps, maxnreg = _ROWS_STATS_REGISTER_CAP.get((major, block_d, elem_size), (warps, None))
    else:
        warps = _row_warps(block_t * block_d, elem_size)
    warps = min(_ROWS_MAX_WARPS, max(4, warps))
    return _FwdConfig(True, max(chunk, block_t), block_t, block_d, warps, maxnreg, block_d2)


def _split_tail(dim: int, block_d: int, elem_size: int, split: Optional[bool]) -> int:
    """The tail tile (BLOCK_D2) of a one-row step over rows of width ``dim`` padded to ``block_d``, 0 for one tile:
    next_pow2(dim - block_d / 2) where that holds the row in less than ``block_d`` and the padded width is at least
    ``_ROWS_SPLIT_FROM``; ``split`` True: then always, False: never, None (``_ROWS_SPLIT_TAIL``'s default) by dtype and
    width only: 16-bit rows, ``dim`` a multiple of 16, a tail of at most ``_ROWS_SPLIT_MAX_TAIL`` (see the knob)."""
    if split is False or block_d < _ROWS_SPLIT_FROM:
        return 0
    tail = max(16, triton.next_power_of_2(dim - block_d // 2))  # dim > block_d / 2 >= 8
    if block_d // 2 + tail >= block_d:
        return 0
    return tail if split or (elem_size == 2 and dim % 16 == 0 and tail <= _ROWS_SPLIT_MAX_TAIL) else 0


class _Plan(NamedTuple):
    """Device-side work list of the forward kernels (see the module docstring)."""

    cfg: _FwdConfig
    grid: int
    item_row0: torch.Tensor  # [G] int32 first row of each chunk
    item_nrows: torch.Tensor  # [G] int32 rows in the chunk (0: spare program)
    item_seg: torch.Tensor  # [G] int32 segment slot b * K + k of the chunk, -1 for rows in no segment
    item_pair_end: torch.Tensor  # [G] int32 pairs (t, t+1) of the chunk are counted while t + 1 < this row
    seg_lo: torch.Tensor  # [B * K] int32 first chunk of each segment
    seg_hi: torch.Tensor  # [B * K] int32 one past its last chunk
    count: torch.Tensor  # [B, K] int32
    nseg: int
    # the forward kernel the plan is for: "cuda_rows" (statistics, ``_cuda_rows_take``), "cuda_spans" (the same
    # kernel without a work list, ``_spans_plan``), else the Triton "triton_rows" or "triton_sliced" kernel (the
    # config's); the chunk length may depend on it (``_fill_per_sm``)
    kernel: str
    # "cuda_spans" only: the [B + 1] cu_seqlens, [B, K + 1] seg_offsets (None: K = 1) and token_index (None: packed
    # token t is row t) the kernels follow, and the row count R of x
    cu_seqlens: Optional[torch.Tensor] = None
    seg_offsets: Optional[torch.Tensor] = None
    rows: int = 0
    token_index: Optional[torch.Tensor] = None


def _plain_plan(x2d: torch.Tensor, count: Optional[torch.Tensor] = None) -> _Plan:
    """No statistics: consecutive chunks of the [R, D] rows of ``x2d``, no work list (the kernels derive each
    program's rows from its id). ``count``: the [B, K] counts to return (no sequences or no segments), default
    [0, 1]."""
    rows, dim = x2d.shape
    device = x2d.device
    cfg = _fwd_config(rows, dim, x2d.element_size(), device, stats=False)
    empty = torch.empty(0, dtype=torch.int32, device=device)
    if count is None:
        count = torch.zeros(0, 1, dtype=torch.int32, device=device)
    return _Plan(cfg, max(triton.cdiv(rows, cfg.chunk), 1), empty, empty, empty, empty, empty, empty, count,
                 count.shape[1], _triton_kernel(cfg))


def _stats_plan(x2d: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor],
                token_index: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None) -> _Plan:
    """Work list over the [R, D] rows of ``x2d``. Regions in row order, per sequence b: gap (rows in no sequence),
    [0, o_0), the K segments [o_k, o_k+1), [o_K, len_b); then the gap after the last sequence. Each region is cut
    into chunks of cfg.chunk rows, one per program of a grid of static size cdiv(rows, chunk) + B (K + 3) + 1 (a
    bound: spare programs get 0 rows); only segment chunks collect statistics. Built on the device by
    ``_plan_kernel`` (one launch, no host sync). ``weight``: the [D] weight the forward reads (its alignment picks
    the launch shape)."""
    dev = cu_seqlens.device
    batch = cu_seqlens.numel() - 1
    nseg = 1 if seg_offsets is None else seg_offsets.shape[1] - 1
    if batch * nseg == 0:
        return _plain_plan(x2d, torch.zeros(batch, nseg, dtype=torch.int32, device=dev))
    rows, dim = x2d.shape
    cuda_rows = weight is not None and _cuda_rows_take(x2d, weight)
    cfg = _fwd_config(rows, dim, x2d.element_size(), dev, stats=True, aligned=_vector_aligned(x2d, weight),
                      fill_per_sm=_fill_per_sm(dim, cuda_rows))
    if (cuda_rows and cfg.rows and 0 < rows <= _CUDA_ROWS_SPANS_MAX_ROWS
            and has_ext_kernel("cuda", "rmsnorm_angle_spans_ext")):
        return _spans_plan(cfg, rows, cu_seqlens, seg_offsets, token_index)
    grid = triton.cdiv(rows, cfg.chunk) + batch * (nseg + 3) + 1
    items = torch.empty(4, grid, dtype=torch.int32, device=dev)
    seg_range = torch.empty(2, batch * nseg, dtype=torch.int32, device=dev)
    count = torch.empty(batch, nseg, dtype=torch.int32, device=dev)
    cu = cu_seqlens  # int32, checked
    block_b = min(256, max(16, triton.next_power_of_2(batch)))
    block_c = max(1, _PLAN_TILE // block_b)
    # programs: enough that each writes one column block of the longest possible region (rows / chunk chunks), but
    # every program reads all B sequences, so at most _PLAN_SEQUENCE_READS / B of them (one for huge batches)
    programs = min(triton.cdiv(triton.cdiv(rows, cfg.chunk), block_c), _PLAN_SEQUENCE_READS // max(batch, 1))
    _plan_kernel[(max(1, programs),)](
        cu, seg_offsets if seg_offsets is not None else cu, token_index if token_index is not None else cu,
        token_index.numel() if token_index is not None else 0, batch, rows, cfg.chunk, grid,
        items[0], items[1], items[2], items[3], seg_range[0], seg_range[1], count,
        K=nseg, HAS_OFF=seg_offsets is not None, HAS_TOK=token_index is not None,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_I=1024,
    )
    return _Plan(cfg, grid, items[0], items[1], items[2], items[3], seg_range[0], seg_range[1], count, nseg,
                 "cuda_rows" if cuda_rows and cfg.rows else _triton_kernel(cfg))


def _spans_plan(cfg: _FwdConfig, rows: int, cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor],
                token_index: Optional[torch.Tensor] = None) -> _Plan:
    """No work list: the CUDA spans kernel's blocks take rows [i chunk, (i + 1) chunk); ``grid`` is its partial
    slots, cdiv(rows, chunk) + B K. ``count`` is written by ``_reduce_spans_kernel``."""
    batch = cu_seqlens.numel() - 1
    nseg = 1 if seg_offsets is None else seg_offsets.shape[1] - 1
    empty = torch.empty(0, dtype=torch.int32, device=cu_seqlens.device)
    count = torch.empty(batch, nseg, dtype=torch.int32, device=cu_seqlens.device)
    return _Plan(cfg, triton.cdiv(rows, cfg.chunk) + batch * nseg, empty, empty, empty, empty, empty, empty, count,
                 nseg, "cuda_spans", cu_seqlens, seg_offsets, rows, token_index)


def _cuda_rows_supported(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the CUDA rows kernel takes these [R, D] rows (mirrors ``supported`` of csrc/rmsnorm_angle_launch.h):
    D a multiple of 16 bytes and at most 8192 (fp32: 4096, 8 columns on each of 512 threads), unit column stride,
    16-byte aligned rows and weight (host values only, no sync; y is allocated aligned)."""
    dim = x2d.shape[1]
    vec = 16 // x2d.element_size()
    values = 8 if x2d.dtype == torch.float32 else _CUDA_ROWS_VALUES
    return (0 < dim <= min(_CUDA_ROWS_MAX_DIM, _CUDA_ROWS_MAX_THREADS * values) and dim % vec == 0
            and x2d.stride(1) == 1 and x2d.stride(0) % vec == 0 and x2d.data_ptr() % 16 == 0
            and weight.is_contiguous() and weight.data_ptr() % 16 == 0 and (dim * weight.element_size()) % 16 == 0)


def _cuda_rows_take(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """``_CUDA_ROWS`` is on (for fp32 rows ``_CUDA_ROWS_FP32`` too), the extension has the CUDA rows kernel and it
    takes these rows."""
    return (_CUDA_ROWS and x2d.is_cuda and (_CUDA_ROWS_FP32 or x2d.dtype != torch.float32)
            and has_ext_kernel("cuda", "rmsnorm_angle_rows_ext") and _cuda_rows_supported(x2d, weight))


def _cuda_rows_tuning(dim: int) -> tuple[int, bool]:
    """(ring stages, carry) of the CUDA rows kernel for 16-bit rows of width ``dim`` at 32 values per thread: the
    knobs ``_CUDA_ROWS_STAGES`` / ``_CUDA_ROWS_CARRY`` where set, else the width's entry in ``_CUDA_ROWS_TUNED``,
    else 3 stages, carried when a block is one warp (D <= 1024) or wider than 4 warps (D > 4096), as the timed
    widths have it. (fp32 rows and 16 values per thread always carry: the flag is unused there.)"""
    stages, carry = _CUDA_ROWS_TUNED.get(dim, (3, dim <= 1024 or dim > 4096))
    if _CUDA_ROWS_CARRY is not None:
        carry = _CUDA_ROWS_CARRY
    if _CUDA_ROWS_STAGES is not None:
        stages = _CUDA_ROWS_STAGES
    return stages, carry


def _rows_tuning(cfg: _FwdConfig, compiled: bool) -> dict:
    """The constexprs of ``_fwd_rows_kernel`` beyond the tile: the row's tail (``cfg.block_d2``) and the cache
    options from the module's knobs (the prefetch is inline PTX: compiled code only). The launcher,
    bench/fused_static.py and tests/test_triton_compile.py all lower the kernel with these."""
    prefetch = _PREFETCH_ROWS if compiled else 0
    return dict(PREFETCH=prefetch, PREFETCH_L1=bool(prefetch and _PREFETCH_L1), X_EVICT=_X_EVICTION,
                PIPELINE=_PIPELINE_STAGES, BLOCK_D2=cfg.block_d2)


@on_first_tensors_device
def _forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, plan: _Plan, stats: bool):
    rows, dim = x2d.shape
    dev = x2d.device
    y = torch.empty(rows, dim, dtype=x2d.dtype, device=dev)
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    batch, nseg = plan.count.shape
    stats = stats and batch * nseg > 0 and rows > 0
    alloc = torch.empty if stats else torch.zeros  # with statistics the reduce kernel writes every entry
    unit_sum = alloc(batch, nseg, dim, dtype=torch.float32, device=dev)
    sq_norm = alloc(batch, nseg, dtype=torch.float32, device=dev)
    adjacent = alloc(batch, dtype=torch.float32, device=dev)
    if rows == 0:
        return y, rstd, (unit_sum, plan.count, sq_norm, adjacent)
    if stats:
        part_sum = torch.empty(plan.grid, dim, dtype=torch.float32, device=dev)
        part_q = torch.empty(plan.grid, dtype=torch.float32, device=dev)
        part_adj = torch.empty(plan.grid, dtype=torch.float32, device=dev)
    else:
        part_sum = part_q = part_adj = rstd  # never touched
    if stats and plan.kernel == "cuda_rows":
        stages, carry = _cuda_rows_tuning(dim)
        torch.ops.gainrl.rmsnorm_angle_rows_ext(
            x2d, weight, y, rstd, plan.item_row0, plan.item_nrows, plan.item_seg, plan.item_pair_end,
            part_sum, part_q, part_adj, float(eps), _CUDA_ROWS_VALUES, stages, carry)
    elif stats and plan.kernel == "cuda_spans":
        stages, carry = _cuda_rows_tuning(dim)
        torch.ops.gainrl.rmsnorm_angle_spans_ext(
            x2d, weight, y, rstd, plan.cu_seqlens, plan.seg_offsets, plan.token_index, part_sum, part_q, part_adj,
            plan.cfg.chunk, float(eps), _CUDA_ROWS_VALUES, stages, carry)
    else:
        _launch_triton_forward(x2d, weight, y, rstd, plan, stats, eps, part_sum, part_q, part_adj)
    if stats:
        _reduce_partials(plan, part_sum, part_q, part_adj, unit_sum, sq_norm, adjacent)
    return y, rstd, (unit_sum, plan.count, sq_norm, adjacent)


def _triton_kernel(cfg: _FwdConfig) -> str:
    """The Triton forward kernel of a launch config: "triton_rows" (whole rows in registers) or "triton_sliced"."""
    return "triton_rows" if cfg.rows else "triton_sliced"


def _launch_triton_forward(x2d: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor,
                           plan: _Plan, stats: bool, eps: float, part_sum: torch.Tensor, part_q: torch.Tensor,
                           part_adj: torch.Tensor) -> None:
    """One launch of the Triton forward the plan's config picks (whole rows or column slices), into y, rstd and the
    partials."""
    rows, dim = x2d.shape
    cfg = plan.cfg
    kernel = _fwd_rows_kernel if cfg.rows else _fwd_sliced_kernel
    kernel[(plan.grid,)](
        x2d, weight, y, rstd,
        plan.item_row0, plan.item_nrows, plan.item_seg, plan.item_pair_end,
        part_sum, part_q, part_adj,
        rows, dim, x2d.stride(0), float(eps), cfg.chunk,
        YT=_TL_DTYPE[x2d.dtype], STATS=stats, NATIVE_CAST=x2d.is_cuda,
        JOINT_SUMS=x2d.is_cuda if _JOINT_SUMS is None else _JOINT_SUMS,
        **_rsqrt_forms(x2d.is_cuda),
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d,
        **(_rows_tuning(cfg, x2d.is_cuda) if cfg.rows else {}),
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg is not None else {}),
    )


def _reduce_partials(plan: _Plan, part_sum: torch.Tensor, part_q: torch.Tensor, part_adj: torch.Tensor,
                     unit_sum: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor) -> None:
    """Sums the forward's per-chunk partials (part_sum [G, D], part_q / part_adj [G] f32) of each segment, in chunk
    order, into unit_sum [B, K, D], sq_norm [B, K] and adjacent [B] (f32, written in place)."""
    batch, nseg, dim = unit_sum.shape
    block_c, block_d = _reduce_tile(dim, batch * nseg, unit_sum.device)
    grid = (batch * nseg, triton.cdiv(dim, block_d))
    if plan.kernel == "cuda_spans":  # the slots come from cu_seqlens and the offsets; count is written here too
        off, tok = plan.seg_offsets, plan.token_index
        _reduce_spans_kernel[grid](
            part_sum, part_q, part_adj, plan.cu_seqlens, off if off is not None else plan.cu_seqlens,
            tok if tok is not None else plan.cu_seqlens, tok.numel() if tok is not None else 0,
            unit_sum, sq_norm, adjacent, plan.count, plan.rows, dim, plan.cfg.chunk,
            K=nseg, HAS_OFF=off is not None, HAS_TOK=tok is not None, BLOCK_C=block_c, BLOCK_D=block_d,
        )
        return
    _reduce_kernel[grid](
        part_sum, part_q, part_adj, plan.seg_lo, plan.seg_hi,
        unit_sum, sq_norm, adjacent, dim, nseg, BLOCK_C=block_c, BLOCK_D=block_d,
    )


def _reduce_tile(dim: int, n_segments: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C chunks, BLOCK_D columns) a reduce program loads per step, for ``n_segments`` = B K segments of rows
    of width ``dim``: ``_REDUCE_TILE`` (its columns cut to next_pow2(dim), at least 16), or with
    ``_REDUCE_PROGRAMS_PER_SM`` the widest power-of-two column block from 16 to the tile's that gives the grid
    (B K, cdiv(dim, BLOCK_D)) about that many programs per SM, with BLOCK_C BLOCK_D kept at the tile's size."""
    block_c, block_d = _REDUCE_TILE
    block_d = max(16, min(block_d, triton.next_power_of_2(dim)))
    if _REDUCE_PROGRAMS_PER_SM is None:
        return block_c, block_d
    size = block_c * block_d
    want = triton.cdiv(dim * n_segments, _fill_target(device, _REDUCE_PROGRAMS_PER_SM))
    narrow = max(16, min(block_d, triton.next_power_of_2(max(want, 1))))
    return size // narrow, narrow


# --------------------------------------------------------------------------------------------------------------
# autograd, torch.library ops and the public API (the backward is rmsnorm_angle_backward._backward)
# --------------------------------------------------------------------------------------------------------------
class _RMSNormAngleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, eps: float, plan: _Plan, stats: bool):
        y, rstd, (unit_sum, count, sq_norm, adjacent) = _forward(x2d, weight, eps, plan, stats)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.mark_non_differentiable(unit_sum, count, sq_norm, adjacent)
        return y, unit_sum, count, sq_norm, adjacent

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable again: raise rather than drop terms
    def backward(ctx, dy: torch.Tensor, *_unused: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2d, weight, rstd, dy)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None, None, None)


def _unit_column_stride(x2d: torch.Tensor) -> torch.Tensor:
    """``x2d`` [R, D], copied only if its columns are strided (rows are read in vector loads; any row stride)."""
    return x2d.contiguous() if x2d.stride(1) != 1 and x2d.shape[1] > 1 else x2d


def _dense(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The weight and the index tensors as the kernels read them: densely packed (a copy only for other strides)."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


@on_first_tensors_device
def _plan_for(x2d: torch.Tensor, weight: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
              seg_offsets: Optional[torch.Tensor], token_index: Optional[torch.Tensor]) -> _Plan:
    if cu_seqlens is None:
        return _plain_plan(x2d)
    return _stats_plan(x2d, cu_seqlens, seg_offsets, token_index, weight)


# torch.library ops: what torch.compile sees (opaque calls with fake implementations, so Dynamo never traces the
# launchers or the Triton interpreter). Eager calls skip the dispatcher and use _RMSNormAngleFn on the same
# _forward / _backward (tens of microseconds less per call).
@torch.library.custom_op("gainrl::rmsnorm_angle_fwd", mutates_args=())
def rmsnorm_angle_fwd_op(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, cu_seqlens: Optional[torch.Tensor],
    seg_offsets: Optional[torch.Tensor], token_index: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [R, D] x's dtype, rstd [R] f32, unit_sum [B, K, D] f32, count [B, K] i32, sq_norm [B, K] f32,
    adjacent [B] f32) of the [R, D] rows ``x2d`` (row stride any, column stride 1); without ``cu_seqlens``
    B = 0, K = 1. Arguments already checked by :func:`rmsnorm_angle`."""
    x2d = _unit_column_stride(x2d)  # guards for direct calls (rmsnorm_angle passes them so already)
    weight, cu_seqlens, seg_offsets, token_index = _dense(weight, cu_seqlens, seg_offsets, token_index)
    plan = _plan_for(x2d, weight, cu_seqlens, seg_offsets, token_index)
    y, rstd, (unit_sum, count, sq_norm, adjacent) = _forward(x2d, weight, eps, plan, cu_seqlens is not None)
    return y, rstd, unit_sum, count, sq_norm, adjacent


@rmsnorm_angle_fwd_op.register_fake
def _(x2d, weight, eps, cu_seqlens, seg_offsets, token_index):
    rows, dim = x2d.shape
    batch = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    nseg = 1 if seg_offsets is None else seg_offsets.shape[1] - 1
    f32 = dict(dtype=torch.float32, device=x2d.device)
    return (x2d.new_empty((rows, dim)), torch.empty((rows,), **f32), torch.empty((batch, nseg, dim), **f32),
            torch.empty((batch, nseg), dtype=torch.int32, device=x2d.device), torch.empty((batch, nseg), **f32),
            torch.empty((batch,), **f32))


@torch.library.custom_op("gainrl::rmsnorm_angle_bwd", mutates_args=())
def rmsnorm_angle_bwd_op(x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                         dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [R, D] x's dtype, dw [D] weight's dtype) of the RMSNorm, from the forward's ``rstd`` [R] f32."""
    (weight, rstd) = _dense(weight, rstd)
    return _backward(_unit_column_stride(x2d), weight, rstd, dy)


@rmsnorm_angle_bwd_op.register_fake
def _(x2d, weight, rstd, dy):
    return x2d.new_empty(x2d.shape), torch.empty_like(weight)


def _fwd_op_setup_context(ctx, inputs, output) -> None:
    x2d, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x2d, weight, output[1])
    ctx.mark_non_differentiable(*output[1:])  # rstd and the statistics, as in _RMSNormAngleFn


def _fwd_op_backward(ctx, dy, *_unused):
    x2d, weight, rstd = ctx.saved_tensors
    dx, dw = rmsnorm_angle_bwd_op(x2d, weight, rstd, dy)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None, None, None, None)


rmsnorm_angle_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup_context)


def rmsnorm_angle(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    cu_seqlens: Optional[torch.Tensor] = None,
    seg_offsets: Optional[torch.Tensor] = None,
    token_index: Optional[torch.Tensor] = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, Optional[AngleStats]]:
    """RMSNorm of ``x`` (differentiable in ``x`` and ``weight``) and the angle statistics of its output.

    Returns ``(y, stats)``: ``y`` has the shape and dtype of ``x``; ``stats`` is an :class:`AngleStats` of
    ``y`` (unit_sum [B, K, D] f32, count [B, K] i32, sq_norm [B, K] f32, adjacent [B] f32), or None when
    ``cu_seqlens`` is None. ``validate=False`` skips the value checks that read the index tensors (one host sync on
    CUDA); the kernels mask out-of-range rows either way. Under ``torch.compile`` it is the opaque op
    ``torch.ops.gainrl.rmsnorm_angle_fwd`` (its backward ``rmsnorm_angle_bwd``) and the value checks are skipped
    (they read the index tensors). See the module docstring for the exact semantics.
    """
    compiling = torch.compiler.is_compiling()
    _check_args(x, weight, eps, cu_seqlens, seg_offsets, token_index, validate and not compiling)
    dim = x.shape[-1]
    x2d = _unit_column_stride(x.reshape(-1, dim))  # a view whenever possible: the kernels take any row stride
    weight, cu_seqlens, seg_offsets, token_index = _dense(weight, cu_seqlens, seg_offsets, token_index)
    stats = cu_seqlens is not None
    if compiling:
        y, _rstd, unit_sum, count, sq_norm, adjacent = rmsnorm_angle_fwd_op(
            x2d, weight, float(eps), cu_seqlens, seg_offsets, token_index)
    else:
        plan = _plan_for(x2d, weight, cu_seqlens, seg_offsets, token_index)
        y, unit_sum, count, sq_norm, adjacent = _RMSNormAngleFn.apply(x2d, weight, float(eps), plan, stats)
    y = y.view(x.shape)
    return y, (AngleStats(unit_sum, count, sq_norm, adjacent) if stats else None)


def consecutive_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool, on the mask's device (no host sync): row n's tokens (``attention_mask [N, L]`` != 0) are
    consecutive, i.e. the row is left or right padded (or not at all), as the fused op needs."""
    mask = attention_mask != 0
    lens = mask.sum(1)
    length = mask.shape[1]
    if length == 0:
        return torch.ones_like(lens, dtype=torch.bool)
    ar = torch.arange(length, device=mask.device)
    first = torch.where(mask, ar, length).amin(1)
    last = torch.where(mask, ar, -1).amax(1)
    return (lens == 0) | (last - first + 1 == lens)


def padded_to_cu_seqlens(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed view of a padded batch: ``attention_mask [N, L]`` (1 = token) -> ``(cu_seqlens, token_index)``.

    ``cu_seqlens [N+1]`` int32 (flash-attn convention, sequence n = batch row n, empty rows allowed) and
    ``token_index [T]`` int64, the flat row ``n * L + l`` of each packed token, in order. Left and right padding
    (any contiguous run of ones per row) are accepted; holes raise ValueError. One host sync (``nonzero``).
    """
    check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D [N, L] tensor, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask != 0
    n = mask.shape[0]
    lens = mask.sum(1)
    contiguous = consecutive_tokens(mask)
    if not bool(contiguous.all()):
        row = int(torch.nonzero(~contiguous)[0, 0])
        raise ValueError(f"attention_mask: row {row} has padding between tokens (only left or right padding)")
    cu_seqlens = torch.zeros(n + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lens, 0)
    token_index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return cu_seqlens, token_index


class FusedRMSNormAngle(nn.Module):
    """Drop-in for ``LlamaRMSNorm``-like modules (``weight``, ``variance_epsilon``) that can also collect stats.

    Without segment info it is a plain RMSNorm (our Triton / CUDA kernels) of any rank ``[..., D]``. After :meth:`set_segments` (packed input) or
    :meth:`set_attention_mask` (padded ``[N, L, D]`` input), every forward also computes the angle statistics of
    its output and keeps them, detached, in ``self.stats`` (an :class:`AngleStats`, None before the first such
    forward). Forward passes skip the host-syncing value checks (``validate=False``); the segment info is checked
    once when it is set.

    The output dtype is HF's, ``promote_types(x.dtype, weight.dtype)``: for a 16-bit input with a wider weight (e.g.
    Qwen3's q / k norms under autocast with fp32 weights) the kernel normalises with a unit weight and the weight
    multiplies in the wider dtype, exactly as HF computes it. Statistics there are those of y rounded to x's dtype,
    which is what the next matmul sees under autocast to that dtype; outside such autocast they are refused
    (ValueError).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.stats: Optional[AngleStats] = None
        self._segments: Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = None
        self._unit_weights: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _unit_weight(self, x: torch.Tensor) -> torch.Tensor:
        """A [D] weight of ones in x's dtype and device (cached; not a buffer, so state_dict is unchanged)."""
        key = (x.dtype, x.device)
        if key not in self._unit_weights:
            self._unit_weights[key] = torch.ones(self.weight.shape[0], dtype=x.dtype, device=x.device)
        return self._unit_weights[key]

    @classmethod
    def from_rmsnorm(cls, module: nn.Module) -> "FusedRMSNormAngle":
        """Wrap an existing RMSNorm module, sharing its weight ``Parameter``."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        new = cls(module.weight.shape[0], eps=float(eps), device="meta")
        new.weight = module.weight
        return new

    def set_segments(self, cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor] = None,
                     token_index: Optional[torch.Tensor] = None, validate: bool = True) -> None:
        """Collect stats on the next forwards for these packed sequences (see :func:`rmsnorm_angle`).

        ``validate`` checks the index values now (one host sync), except the bounds that need the input's rows.
        """
        probe = torch.empty(0, self.weight.shape[0], dtype=self.weight.dtype, device=cu_seqlens.device
                            if isinstance(cu_seqlens, torch.Tensor) else "cpu")
        _check_args(probe, probe.new_empty(self.weight.shape[0]), self.variance_epsilon, cu_seqlens, seg_offsets,
                    token_index, validate=False)
        if validate:
            _check_values(cu_seqlens, seg_offsets, token_index, rows=None)
        self._segments = _dense(cu_seqlens, seg_offsets, token_index)

    def set_attention_mask(self, attention_mask: torch.Tensor, seg_offsets: Optional[torch.Tensor] = None) -> None:
        """Padded-batch variant: ``seg_offsets`` are relative to each row's first real token."""
        cu_seqlens, token_index = padded_to_cu_seqlens(attention_mask)
        self.set_segments(cu_seqlens, seg_offsets, token_index)

    def clear_segments(self) -> None:
        self._segments = None
        self.stats = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., D]`` in HF's output dtype, ``promote_types(x.dtype, weight.dtype)``."""
        wider = torch.promote_types(hidden_states.dtype, self.weight.dtype) != hidden_states.dtype
        if self._segments is None:  # any rank: e.g. Qwen3's per-head q / k norms on [N, L, H, head_dim]
            x = hidden_states if hidden_states.dim() in (2, 3) else hidden_states.reshape(-1, hidden_states.shape[-1])
            if wider:  # HF: weight * n.to(x.dtype) in the wider dtype (e.g. bf16 q / k under autocast, fp32 weight)
                n, _ = rmsnorm_angle(x, self._unit_weight(x), self.variance_epsilon, validate=False)
                y = self.weight * n
            else:
                y, _ = rmsnorm_angle(x, self.weight, self.variance_epsilon, validate=False)
            return y if x is hidden_states else y.view(hidden_states.shape)
        kind = hidden_states.device.type
        rounded_next = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == hidden_states.dtype
        if wider and not rounded_next:
            out = torch.promote_types(hidden_states.dtype, self.weight.dtype)
            raise ValueError(
                f"hidden_states: {hidden_states.dtype} with a {self.weight.dtype} weight: HF's norm returns {out} "
                f"here, and the statistics would be of y rounded to {hidden_states.dtype}; use one dtype for the "
                "model, autocast to the activations' dtype, or measure with the hook (AngleProbe(fused=False))")
        cu_seqlens, seg_offsets, token_index = self._segments
        y, stats = rmsnorm_angle(hidden_states, self.weight, self.variance_epsilon, cu_seqlens, seg_offsets,
                                 token_index, validate=False)
        self.stats = stats
        # under autocast to x's dtype the consumer (the MLP's matmuls) rounds HF's wider y to exactly this y
        return y.to(torch.promote_types(y.dtype, self.weight.dtype)) if wider else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
