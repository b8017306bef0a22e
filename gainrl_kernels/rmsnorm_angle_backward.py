"""Backward of the fused RMSNorm + angle op: Triton kernels, tuning knobs, launch shapes and the launcher ``_backward``.

    dx, dw = _backward(x2d, weight, rstd, dy)

Gradients of the RMSNorm only (HF ``LlamaRMSNorm``; the angle statistics are outputs marked non-differentiable),
for :mod:`gainrl_kernels.rmsnorm_angle`'s autograd function and its ``gainrl::rmsnorm_angle_bwd`` op:
    x2d     [R, D] float16 / bfloat16 / float32, the forward's rows (any strides)
    weight  [D] float16 / bfloat16 / float32
    rstd    [R] float32, the forward's rsqrt(mean(x²) + eps) per row
    dy      [R, D], the gradient of y (any strides)
    ->  dx  [R, D] x's dtype,   dw  [D] weight's dtype
With g = dy·w and n = x·rstd (fp32, the casts treated as identity, as autograd does):
    dx = rstd · (g − n · mean(g·n)),     dw = Σ_rows dy · n.to(x.dtype)
Each program walks a contiguous range of rows (grid <= 4 x SMs, ``_BWD_PROGRAMS_PER_SM``) and owns one fp32 partial
row of dw; the [programs, D] partials are summed by torch (deterministic, no atomics). Two kernels, by D:
  * D <= 8192 (``_bwd_kernel``): whole rows in registers (BLOCK_D = next_pow2(D); past 4096 one row a step as a
    4096-wide tile and a power-of-two tail, 5120 = 4096 + 1024), one pass per row tile, the dw partial kept in
    registers and stored once. The row loop is software-pipelined (``_BWD_STAGES``: x, dy and rstd arrive by
    cp.async two steps ahead, fewer where the device's shared memory cannot hold them), and 16-bit rows of
    4096 + a tail <= 1024 run capped at 64 registers on sm_90 (``_BWD_SPLIT_CAP_TAIL``).
  * D > 8192 (``_bwd_blocked_kernel``, any D): 4-row tiles, two passes over 512-wide column slices: pass 1 sums
    dy·w·x per row, pass 2 re-reads the tile (just loaded: usually cached), writes dx and adds the tile's dw into
    the program's partial row in global memory (read-modify-write behind a barrier; same order every run).
Both are spill-free at sm_80 / sm_90a (tests/test_triton_compile.py lowers the launcher's configs up to D = 16384).

dx and n.to(x.dtype) are rounded to x's dtype by ``_round_to``, on the GPU too: for bf16 an explicit
round-to-nearest-even on the fp32 bits, as the interpreter's own fp32 -> bf16 cast truncates and its bf16 arithmetic
is wrong (bf16 is stored as uint16 there), so kernels never compute in bf16.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .rmsnorm_angle_forward_kernels import _TL_DTYPE, _capability_major, _vector_aligned
from .validate import on_first_tensors_device


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 -> nearest ``DTYPE`` value (round to nearest even), returned as fp32."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d):
    """The [BLOCK_T, BLOCK_D] tiles of x and dy at rows ``rows64`` and columns ``dd`` (masked by ``m``), as fp32."""
    x = tl.load(x_ptr + rows64[:, None] * sx_r + dd[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64[:, None] * sdy_r + dd[None, :] * sdy_d, mask=m, other=0.0).to(tl.float32)
    return x, dy


@triton.jit
def _bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, part_dw_ptr,
    R, D, rows_per_prog, sx_r, sx_d, sdy_r, sdy_d,
    XT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr = 0,
    STAGES: tl.constexpr = 0,
):
    """Single pass, whole rows in registers (BLOCK_D + BLOCK_D2 >= D): dx of each row tile, dw partial of the
    program. BLOCK_D2 > 0: a row is two tiles, columns [0, BLOCK_D) and a tail [BLOCK_D, BLOCK_D + BLOCK_D2) with
    BLOCK_D < D, so a row of 5120 holds 4096 + 1024 values, not a padded 8192 (names with suffix 2: the tail's).
    STAGES >= 2: the row loop software-pipelined (Triton issues the x and dy loads STAGES - 1 steps ahead as cp.async
    into shared memory: more rows in flight without registers; the interpreter runs it in order)."""
    pid = tl.program_id(0)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < (BLOCK_D if BLOCK_D2 > 0 else D)  # with a tail the first tile lies inside the row
    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = d2 < D
        w2 = tl.load(w_ptr + d2, mask=d2_ok, other=0.0).to(tl.float32)
        dw2 = tl.zeros([BLOCK_D2], dtype=tl.float32)
    r_begin = pid * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, R)
    for r0 in tl.range(r_begin, r_end, BLOCK_T, num_stages=STAGES if STAGES > 0 else None):
        rows = r0 + tl.arange(0, BLOCK_T)
        r_ok = rows < r_end
        rows64 = rows.to(tl.int64)
        m = r_ok[:, None] & d_ok[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        x, dy = _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        gn = tl.sum(g * n, axis=1)
        if BLOCK_D2 > 0:
            m2 = r_ok[:, None] & d2_ok[None, :]
            x2, dy2 = _load_x_dy(x_ptr, dy_ptr, rows64, d2, m2, sx_r, sx_d, sdy_r, sdy_d)
            n2 = x2 * rstd[:, None]
            g2 = dy2 * w2[None, :]
            gn += tl.sum(g2 * n2, axis=1)
        c = gn / D
        dx = rstd[:, None] * (g - n * c[:, None])
        tl.store(dx_ptr + rows64[:, None] * D + dd[None, :], _round_to(dx, XT).to(XT), mask=m)
        dw += tl.sum(dy * _round_to(n, XT), axis=0)
        if BLOCK_D2 > 0:
            dx2 = rstd[:, None] * (g2 - n2 * c[:, None])
            tl.store(dx_ptr + rows64[:, None] * D + d2[None, :], _round_to(dx2, XT).to(XT), mask=m2)
            dw2 += tl.sum(dy2 * _round_to(n2, XT), axis=0)
    tl.store(part_dw_ptr + pid.to(tl.int64) * D + dd, dw, mask=d_ok)
    if BLOCK_D2 > 0:
        tl.store(part_dw_ptr + pid.to(tl.int64) * D + d2, dw2, mask=d2_ok)


@triton.jit
def _slice_x_dy_w(x_ptr, dy_ptr, w_ptr, rows64, r_ok, d0, D, sx_r, sx_d, sdy_r, sdy_d, BLOCK_D: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of a row tile: (columns, their mask, the tile's mask, w, x, dy), fp32, masked 0."""
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    m = r_ok[:, None] & d_ok[None, :]
    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    x, dy = _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d)
    return dd, d_ok, m, w, x, dy


@triton.jit
def _bwd_blocked_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, part_dw_ptr,
    R, D, rows_per_prog, sx_r, sx_d, sdy_r, sdy_d,
    XT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Two passes over BLOCK_D column slices per row tile (any D): pass 1 sums dy·w·x per row, pass 2 writes dx
    and adds the tile's dw into the program's partial row ``part_dw[pid]`` (zero-initialised by the caller)."""
    pid = tl.program_id(0)
    r_begin = pid * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, R)
    dw_row = part_dw_ptr + pid.to(tl.int64) * D
    for r0 in range(r_begin, r_end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        r_ok = rows < r_end
        rows64 = rows.to(tl.int64)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        gx = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd, d_ok, m, w, x, dy = _slice_x_dy_w(x_ptr, dy_ptr, w_ptr, rows64, r_ok, d0, D, sx_r, sx_d, sdy_r,
                                                  sdy_d, BLOCK_D)
            gx += tl.sum(dy * w[None, :] * x, axis=1)
        c = gx * rstd / D  # mean(g·n) with n = x·rstd
        # the previous tile's partial-dw stores must be visible to every thread before they are re-read
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            dd, d_ok, m, w, x, dy = _slice_x_dy_w(x_ptr, dy_ptr, w_ptr, rows64, r_ok, d0, D, sx_r, sx_d, sdy_r,
                                                  sdy_d, BLOCK_D)
            n = x * rstd[:, None]
            dx = rstd[:, None] * (dy * w[None, :] - n * c[:, None])
            tl.store(dx_ptr + rows64[:, None] * D + dd[None, :], _round_to(dx, XT).to(XT), mask=m)
            dw = tl.load(dw_row + dd, mask=d_ok, other=0.0) + tl.sum(dy * _round_to(n, XT), axis=0)
            tl.store(dw_row + dd, dw, mask=d_ok)


# --------------------------------------------------------------------------------------------------------------
# launch shapes and the launcher
# --------------------------------------------------------------------------------------------------------------
class _BwdConfig(NamedTuple):
    """Backward launch shape: which kernel, its [BLOCK_T, BLOCK_D] tile and warps."""

    blocked: bool  # True: _bwd_blocked_kernel (two passes over BLOCK_D slices); False: whole rows (_bwd_kernel)
    block_t: int
    block_d: int
    num_warps: int
    block_d2: int = 0  # whole rows as two tiles: the tail's width (0: one tile)
    maxnreg: Optional[int] = None  # register cap of the compiled whole-row kernel (None: ptxas decides)
    stages: int = 0  # whole-row kernel: software-pipelining stages of the row loop (0: none)


_BWD_ROW_MAX = 4096  # widest row (next_pow2(D)) the single-pass kernel holds in registers without spills
# ... as one tile; up to this next_pow2(D) as two, _BWD_ROW_MAX columns and a power-of-two tail (5120 = 4096 + 1024),
# one row a step
_BWD_SPLIT_MAX = 8192
# Tuning knobs of the whole-row backward, for bench/fused_backward.py's variants (defaults: the rules below). On an
# H200 one row a step capped at 64 registers lowers without spills for 16-bit rows (sm_90a) and fits two programs
# per SM (backward alone at 16x4096x5120: 0.692 ms with 3 stages against 0.767 uncapped), but not for fp32 rows.
_BWD_ROW_STEP: Optional[int] = None  # rows per step of one-tile rows (None: up to 4096 elements a step, >= 2)
_BWD_MAXNREG: Optional[int] = None  # register cap of whole-row launches (None: _BWD_SPLIT_CAP_TAIL's rule)
_BWD_PROGRAMS_PER_SM = 4  # grid cap: each program walks a contiguous range of rows
# whole-row launches: the row loop software-pipelined with this many stages (0: not): Triton issues x and dy
# S - 1 steps ahead by cp.async into shared memory. H200, backward alone
# (bench/results/fused_backward_h200_stages.json): 64x4096x4096 2.274 -> 1.693 ms (4 stages 1.633), 16x4096x5120
# 1.597 -> 0.767 ms. Fewer stages where the device's shared memory per block cannot hold them (_bwd_shared_bytes).
_BWD_STAGES = 3
# 16-bit rows split as 4096 + a tail at most this wide, with vector loads, on sm_90: one row a step capped at 64
# registers (spill-free at sm_90a, two programs per SM). H200 backward alone at 16x4096x5120: 0.767 -> 0.691 ms;
# 8192 (a 4096 tail) capped took 0.699 against 0.483 ms, 6144 spills, and at sm_80 5120 spills. 0: never capped
_BWD_SPLIT_CAP_TAIL = 1024
_BWD_BLOCKED_TILE = (4, 512, 8)  # BLOCK_T, BLOCK_D, warps of the blocked kernel: 8 values per thread, <= 48 registers


def _bwd_config(dim: int, elem_size: int = 2, shared_limit: Optional[int] = None, capability: int = 0,
                aligned: bool = True) -> _BwdConfig:
    """Tile rules of the backward (the compile test lowers exactly these for its D list). ``elem_size``: bytes of
    an element of x and dy; ``shared_limit``: shared memory a block may use on the device (None: no limit, as in
    the interpreter), which caps the pipelining stages; ``capability``: the device's compute capability major (0:
    not a GPU); ``aligned``: the launch compiles vector loads (``_vector_aligned`` for x and dy)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if _BWD_ROW_MAX < block_d <= _BWD_SPLIT_MAX:
        tail = max(16, triton.next_power_of_2(dim - _BWD_ROW_MAX))
        # sm_90 only: the one target lowered (spill-free) and timed, as the keys of rmsnorm_angle.py's
        # _ROWS_STATS_REGISTER_CAP
        capped = capability == 9 and elem_size == 2 and aligned and tail <= _BWD_SPLIT_CAP_TAIL
        maxnreg = _BWD_MAXNREG if _BWD_MAXNREG is not None else 64 if capped else None
        cfg = _BwdConfig(False, 1, _BWD_ROW_MAX, _bwd_warps(_BWD_ROW_MAX + tail), tail, maxnreg)
    elif block_d > _BWD_ROW_MAX:
        block_t, block_d, warps = _BWD_BLOCKED_TILE
        return _BwdConfig(True, block_t, block_d, warps)
    else:
        block_t = _BWD_ROW_STEP or max(2, min(16, 4096 // block_d))
        # warps of at least a 2-row tile: one row a step (_BWD_ROW_STEP = 1) keeps the default's warps
        cfg = _BwdConfig(False, block_t, block_d, _bwd_warps(max(block_t, 2) * block_d), 0, _BWD_MAXNREG)
    stages = _BWD_STAGES
    while stages >= 2 and shared_limit is not None and _bwd_shared_bytes(cfg, elem_size, stages) > shared_limit:
        stages -= 1
    return cfg._replace(stages=stages if stages >= 2 else 0)


def _bwd_shared_bytes(cfg: _BwdConfig, elem_size: int, stages: int) -> int:
    """Upper bound of the shared memory of a whole-row backward launch with ``stages`` pipelining stages: S - 1
    buffered steps of x, dy and rstd, plus an fp32 row of layout-conversion scratch (Triton's allocation; the
    compile test checks the bound against what Triton reports at sm_80 and sm_90a)."""
    width = cfg.block_d + cfg.block_d2
    return max(stages - 1, 0) * cfg.block_t * (width * elem_size * 2 + 4) + 4 * width + 512


def _device_shared_limit(device: torch.device) -> Optional[int]:
    """Shared memory one block may opt in to on ``device`` (None on a CPU: the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024)


def _bwd_warps(tile: int) -> int:
    """Warps for a whole-row [BLOCK_T, BLOCK_D] tile: no register spills on sm_80 / sm_90a up to 2 x 4096."""
    return 4 if tile <= 2048 else 8 if tile <= 4096 else 16


@on_first_tensors_device
def _backward(x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """dx [R, D] (x's dtype) and dw [D] (weight's dtype) of the RMSNorm; dw is summed in a fixed order."""
    rows, dim = x2d.shape
    dev = x2d.device
    dx = torch.empty(rows, dim, dtype=x2d.dtype, device=dev)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    # vector loads need unit column strides too (x2d has them; an expanded dy may not)
    aligned = _vector_aligned(x2d, weight) and dy.stride(1) == 1 and _vector_aligned(dy, None)
    cfg = _bwd_config(dim, x2d.element_size(), _device_shared_limit(dev), _capability_major(dev), aligned)
    if x2d.is_cuda:
        max_progs = _BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(dev).multi_processor_count
    else:
        max_progs = 4
    grid = min(triton.cdiv(rows, cfg.block_t), max_progs)
    rows_per_prog = triton.cdiv(triton.cdiv(rows, grid), cfg.block_t) * cfg.block_t
    grid = triton.cdiv(rows, rows_per_prog)
    # the blocked kernel adds into its partial row, the single-pass one stores it once
    part_dw = (torch.zeros if cfg.blocked else torch.empty)(grid, dim, dtype=torch.float32, device=dev)
    kernel = _bwd_blocked_kernel if cfg.blocked else _bwd_kernel
    kernel[(grid,)](
        x2d, weight, dy, rstd, dx, part_dw,
        rows, dim, rows_per_prog, x2d.stride(0), x2d.stride(1), dy.stride(0), dy.stride(1),
        XT=_TL_DTYPE[x2d.dtype], BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        **({"BLOCK_D2": cfg.block_d2} if cfg.block_d2 else {}),
        **({"STAGES": cfg.stages} if cfg.stages else {}),
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg is not None and x2d.is_cuda else {}),
    )
    return dx, part_dw.sum(0).to(weight.dtype)
