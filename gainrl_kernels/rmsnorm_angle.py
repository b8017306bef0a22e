"""Fused RMSNorm + angle statistics (Triton, with an autograd backward for the RMSNorm).

    y, stats = rmsnorm_angle(x, weight, eps, cu_seqlens, seg_offsets=None, token_index=None)

RMSNorm (HF ``LlamaRMSNorm`` semantics, computed in fp32):
    n = x.float() * rsqrt(mean(x.float()², -1) + eps);   y = (weight.float() * n.to(x.dtype).float()).to(x.dtype)
When ``weight.dtype == x.dtype`` this is bit-for-bit HF's ``weight * n.to(input_dtype)`` (a 16-bit product is computed
in fp32 and rounded once). HF would return fp32 for an fp32 weight and a 16-bit ``x`` (type promotion); here ``y``
always has ``x``'s dtype and shape.

Statistics (DESIGN.md §1, same definitions and types as ``angle_stats``) are of **y as the model sees it**, i.e.
after the cast to ``x.dtype``: ``u_t = y_t / max(||y_t||, 1e-12)`` with the norm taken in fp32 of the rounded
values. So ``rmsnorm_angle(x, ...)[1]`` equals ``angle_stats(y, ...)`` up to fp32 summation order.
    unit_sum [B, K, D] f32,  count [B, K] i32,  sq_norm [B, K] f32,  adjacent [B] f32   (``types.AngleStats``)

Shapes and dtypes:
    x            [T, D] or [N, L, D], float16 / bfloat16 / float32, any strides (a 3-D input is viewed as its
                 N*L flat rows; a copy is made only when that view is impossible)
    weight       [D] float16 / bfloat16 / float32
    cu_seqlens   [B+1] int32 (flash-attn convention) over *packed* token positions; None -> plain RMSNorm,
                 stats None
    seg_offsets  [B, K+1] int32, relative to each sequence start; default [[0, len_b]] (K = 1)
    token_index  [T_packed] int32/int64 or None: flat row (of the [R, D] view of x) of each packed token, as made
                 by :func:`padded_to_cu_seqlens` for padded [N, L, D] batches. Each sequence must occupy
                 consecutive rows in order (left or right padding). None: packed token t is row t.

Forward algorithm (one launch + one small reduce launch; no host sync, no atomics):
  * The R rows are cut into regions in row order: gap, sequence 0, gap, sequence 1, ..., gap (gaps = rows in no
    sequence, e.g. padding). Each region is cut into chunks of BLOCK_T rows; a chunk never straddles two
    sequences. The work list (first row, row count, sequence per program) is computed on the device; the grid is
    the bound cdiv(R, BLOCK_T) + 2B + 1, spare programs exit at once.
  * A program (BLOCK_T = 32 rows, BLOCK_D <= 64, 8 warps: no register spills on sm_90) loops over D in BLOCK_D
    slices: pass A sums x² per row (rstd, saved for backward); pass B writes y
    and, for rows inside [o_0, o_K) of its sequence, accumulates ||y_t||², ||y_{t+1}||² and y_t·y_{t+1} (row t+1
    is loaded shifted by one, so pairs that cross chunk and segment boundaries are counted, once, by the chunk
    holding t); pass C re-reads x (L1/L2 hits), recomputes y, scales by 1 / max(||y||, 1e-12) and writes the
    per-segment sums of the chunk as fp32 partials ``[chunk, K, D]`` (a static loop over K, K a constexpr),
    together with the chunk's q and adjacent partials.
  * ``_reduce_kernel`` sums each sequence's partials in chunk order: the statistics are deterministic (bitwise
    run to run). ``count`` is exact integer arithmetic on the clamped offsets.

Backward (``torch.autograd.Function``): gradients of the RMSNorm only (the statistics are outputs marked
non-differentiable). With g = dy·w and n = x·rstd (fp32, the casts treated as identity, as autograd does):
    dx = rstd · (g − n · mean(g·n)),     dw = Σ_rows dy · n.to(x.dtype)
Each program walks a contiguous range of rows (grid <= 4 x SMs) and owns one fp32 partial row of dw; the
[programs, D] partials are summed by torch (deterministic, no atomics). Two kernels, by D:
  * D <= 4096 (``_bwd_kernel``): whole rows in registers (BLOCK_D = next_pow2(D)), one pass per row tile, the dw
    partial kept in registers and stored once.
  * D > 4096 (``_bwd_blocked_kernel``, any D): 4-row tiles, two passes over 512-wide column slices: pass 1 sums
    dy·w·x per row, pass 2 re-reads the tile (just loaded: usually cached), writes dx and adds the tile's dw into
    the program's partial row in global memory (read-modify-write behind a barrier; same order every run).
Both are spill-free at sm_80 / sm_90a (tests/test_triton_compile.py lowers the launcher's configs up to D = 16384).

bf16 rounding is done with an explicit round-to-nearest-even on the fp32 bits (``_round_to``): identical on GPU
and under ``TRITON_INTERPRET=1``, whose own fp32 -> bf16 cast truncates and whose bf16 arithmetic is wrong (bf16
is stored as uint16 there), so kernels never compute in bf16.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import nn

from .types import AngleStats
from .triton_segments import segment_ids as _segment_ids
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
)

__all__ = ["rmsnorm_angle", "FusedRMSNormAngle", "padded_to_cu_seqlens"]

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
# kernels
# --------------------------------------------------------------------------------------------------------------
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
def _rms_out(x, rstd, w, YT: tl.constexpr):
    """y = round(w * round(x * rstd)) with round = to the nearest YT value, as fp32 (HF LlamaRMSNorm).

    Same rounding as ``_round_to``, written inline (step 0 rounds n, step 1 rounds w * n): every nested jit call
    costs a language re-patch in the interpreter, and this runs once per tile and pass.
    """
    y = x * rstd[:, None]
    for step in tl.static_range(2):
        if step == 1:
            y = w[None, :] * y
        if YT == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
        elif YT == tl.float16:
            y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    item_row0_ptr, item_nrows_ptr, item_seq_ptr,
    seq_row0_ptr, seq_len_ptr, off_ptr,
    part_sum_ptr, part_q_ptr, part_adj_ptr,
    R, D, stride_r, stride_d, eps,
    YT: tl.constexpr, K: tl.constexpr, STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nrows = tl.load(item_nrows_ptr + pid)
    if nrows > 0:
        row0 = tl.load(item_row0_ptr + pid)
        t = tl.arange(0, BLOCK_T)
        rows = row0 + t
        r_ok = (t < nrows) & (rows >= 0) & (rows < R)
        x_off = rows.to(tl.int64) * stride_r  # int64 element offsets: R * D may pass 2**31
        y_off = rows.to(tl.int64) * D

        if STATS:
            b = tl.load(item_seq_ptr + pid)
            bb = tl.maximum(b, 0)
            seq_len = tl.load(seq_len_ptr + bb)
            pos = rows - tl.load(seq_row0_ptr + bb)
            off_row = off_ptr + bb * (K + 1)
            o_last = tl.minimum(tl.maximum(tl.load(off_row + K), 0), seq_len)
            seg = _segment_ids(pos, off_row, seq_len, K)
            seg = tl.where(r_ok & (b >= 0), seg, -1)
            p_ok = (seg >= 0) & (pos + 1 < o_last) & (rows + 1 < R)  # pair (t, t+1) inside [o_0, o_K)
            x1_off = x_off + stride_r
        else:
            p_ok = t < 0

        # pass A: sum of squares (row t, and row t+1 for the adjacent pairs)
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        ss1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            x = tl.load(x_ptr + x_off[:, None] + dd[None, :] * stride_d, mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
            if STATS:
                x1 = tl.load(x_ptr + x1_off[:, None] + dd[None, :] * stride_d, mask=p_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                ss1 += tl.sum(x1 * x1, axis=1)
        rstd = 1.0 / tl.sqrt_rn(ss / D + eps)
        rstd1 = 1.0 / tl.sqrt_rn(ss1 / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=r_ok)

        # pass B: y (written), ||y_t||², ||y_{t+1}||², y_t . y_{t+1}
        nn = tl.zeros([BLOCK_T], dtype=tl.float32)
        nn1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            m = r_ok[:, None] & d_ok[None, :]
            w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + x_off[:, None] + dd[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
            y = _rms_out(x, rstd, w, YT)
            tl.store(y_ptr + y_off[:, None] + dd[None, :], y.to(YT), mask=m)
            if STATS:
                x1 = tl.load(x_ptr + x1_off[:, None] + dd[None, :] * stride_d, mask=p_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                y1 = _rms_out(x1, rstd1, w, YT)
                nn += tl.sum(y * y, axis=1)
                nn1 += tl.sum(y1 * y1, axis=1)
                dot += tl.sum(y * y1, axis=1)

        if STATS:
            if b >= 0:
                inv = 1.0 / tl.maximum(tl.sqrt_rn(nn), 1e-12)
                inv1 = 1.0 / tl.maximum(tl.sqrt_rn(nn1), 1e-12)
                tl.store(part_adj_ptr + pid, tl.sum(tl.where(p_ok, dot * inv * inv1, 0.0), axis=0))
                q_row = nn * inv * inv
                for k in tl.static_range(K):
                    tl.store(part_q_ptr + pid * K + k, tl.sum(tl.where(seg == k, q_row, 0.0), axis=0))
                # pass C: per-segment unit-vector sums of this chunk
                part_row = part_sum_ptr + pid.to(tl.int64) * (K * D)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < D
                    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
                    x = tl.load(x_ptr + x_off[:, None] + dd[None, :] * stride_d,
                                mask=(seg >= 0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                    u = _rms_out(x, rstd, w, YT) * inv[:, None]
                    for k in tl.static_range(K):
                        s = tl.sum(tl.where((seg == k)[:, None], u, 0.0), axis=0)
                        tl.store(part_row + k * D + dd, s, mask=d_ok)


@triton.jit
def _reduce_kernel(
    part_sum_ptr, part_q_ptr, part_adj_ptr, lo_ptr, hi_ptr,
    unit_sum_ptr, sq_norm_ptr, adjacent_ptr, D,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the chunk partials of sequence b in chunk order (deterministic). Grid (B, cdiv(D, BLOCK_D))."""
    b = tl.program_id(0)
    pd = tl.program_id(1)
    lo = tl.load(lo_ptr + b)
    hi = tl.load(hi_ptr + b)
    kk = tl.arange(0, BLOCK_K)
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (kk < K)[:, None] & (dd < D)[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    part = part_sum_ptr + lo.to(tl.int64) * (K * D) + kk[:, None] * D + dd[None, :]  # int64 offsets
    for _ in range(lo, hi):
        acc += tl.load(part, mask=m, other=0.0)
        part += K * D
    tl.store(unit_sum_ptr + b.to(tl.int64) * (K * D) + kk[:, None] * D + dd[None, :], acc, mask=m)
    if pd == 0:
        q = tl.zeros([BLOCK_K], dtype=tl.float32)
        adj = tl.zeros([], dtype=tl.float32)
        for i in range(lo, hi):
            q += tl.load(part_q_ptr + i * K + kk, mask=kk < K, other=0.0)
            adj += tl.load(part_adj_ptr + i)
        tl.store(sq_norm_ptr + b * K + kk, q, mask=kk < K)
        tl.store(adjacent_ptr + b, adj)


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
    XT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Single pass, whole rows in registers (BLOCK_D >= D): dx of each row tile, dw partial of the program."""
    pid = tl.program_id(0)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    r_begin = pid * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, R)
    for r0 in range(r_begin, r_end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        r_ok = rows < r_end
        rows64 = rows.to(tl.int64)
        m = r_ok[:, None] & d_ok[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        x, dy = _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / D
        dx = rstd[:, None] * (g - n * c[:, None])
        tl.store(dx_ptr + rows64[:, None] * D + dd[None, :], _round_to(dx, XT).to(XT), mask=m)
        dw += tl.sum(dy * _round_to(n, XT), axis=0)
    tl.store(part_dw_ptr + pid.to(tl.int64) * D + dd, dw, mask=d_ok)


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
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            m = r_ok[:, None] & d_ok[None, :]
            w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
            x, dy = _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d)
            gx += tl.sum(dy * w[None, :] * x, axis=1)
        c = gx * rstd / D  # mean(g·n) with n = x·rstd
        # the previous tile's partial-dw stores must be visible to every thread before they are re-read
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            m = r_ok[:, None] & d_ok[None, :]
            w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
            x, dy = _load_x_dy(x_ptr, dy_ptr, rows64, dd, m, sx_r, sx_d, sdy_r, sdy_d)
            n = x * rstd[:, None]
            dx = rstd[:, None] * (dy * w[None, :] - n * c[:, None])
            tl.store(dx_ptr + rows64[:, None] * D + dd[None, :], _round_to(dx, XT).to(XT), mask=m)
            dw = tl.load(dw_row + dd, mask=d_ok, other=0.0) + tl.sum(dy * _round_to(n, XT), axis=0)
            tl.store(dw_row + dd, dw, mask=d_ok)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------
_BLOCK_T = 32  # rows per forward chunk: partials cost K / _BLOCK_T of a float32 copy of x
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class _Plan(NamedTuple):
    """Device-side work list of the forward kernel (see the module docstring)."""

    grid: int
    item_row0: torch.Tensor  # [G] int32 first row of each chunk
    item_nrows: torch.Tensor  # [G] int32 rows in the chunk (0: spare program)
    item_seq: torch.Tensor  # [G] int32 sequence of the chunk, -1 for gap rows
    seq_row0: torch.Tensor  # [B] int32 first row of each sequence
    seq_len: torch.Tensor  # [B] int32
    seq_item_lo: torch.Tensor  # [B] int32 first chunk of each sequence
    seq_item_hi: torch.Tensor  # [B] int32 one past its last chunk
    seg_offsets: torch.Tensor  # [B, K+1] int32, contiguous
    count: torch.Tensor  # [B, K] int32
    nseg: int


def _plain_plan(rows: int, device: torch.device) -> _Plan:
    grid = max(triton.cdiv(rows, _BLOCK_T), 1)
    row0 = torch.arange(grid, device=device, dtype=torch.int32) * _BLOCK_T
    nrows = (rows - row0).clamp(0, _BLOCK_T).to(torch.int32)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    seq = torch.full((grid,), -1, dtype=torch.int32, device=device)
    no_off = torch.zeros(0, 2, dtype=torch.int32, device=device)
    no_count = torch.zeros(0, 1, dtype=torch.int32, device=device)
    return _Plan(grid, row0, nrows, seq, empty, empty, empty, empty, no_off, no_count, 1)


def _stats_plan(rows: int, cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor],
                token_index: Optional[torch.Tensor]) -> _Plan:
    dev = cu_seqlens.device
    batch = cu_seqlens.numel() - 1
    if batch == 0:
        nseg = 1 if seg_offsets is None else seg_offsets.shape[1] - 1
        return _plain_plan(rows, dev)._replace(count=torch.zeros(0, nseg, dtype=torch.int32, device=dev), nseg=nseg)
    cu = cu_seqlens.to(torch.int64)
    seq_len = (cu[1:] - cu[:-1]).clamp_min(0)
    if token_index is None:
        seq_row0 = cu[:-1]
    else:
        n_packed = token_index.numel()
        if n_packed == 0:
            first = torch.zeros(batch, dtype=torch.int64, device=dev)
        else:
            first = token_index.to(torch.int64)[cu[:-1].clamp(0, n_packed - 1)]
        nonempty = seq_len > 0
        ends = torch.where(nonempty, first + seq_len, torch.zeros_like(first))
        prev_end = torch.cummax(torch.cat([ends.new_zeros(1), ends[:-1]]), 0).values
        seq_row0 = torch.where(nonempty, first, prev_end)  # empty sequences sit where the last one ended
    seq_end = seq_row0 + seq_len
    prev_end = torch.cat([seq_end.new_zeros(1), seq_end[:-1]])
    # regions in row order: gap_0, seq_0, gap_1, seq_1, ..., gap_B
    gap_len = (seq_row0 - prev_end).clamp_min(0)
    region_start = torch.cat([torch.stack([prev_end, seq_row0], 1).flatten(), seq_end[-1:]])
    region_len = torch.cat([torch.stack([gap_len, seq_len], 1).flatten(), (rows - seq_end[-1:]).clamp_min(0)])
    seq_ids = torch.arange(batch, device=dev)
    no_seq = torch.full_like(seq_ids, -1)
    region_seq = torch.cat([torch.stack([no_seq, seq_ids], 1).flatten(), seq_ids.new_full((1,), -1)])
    n_chunks = (region_len + _BLOCK_T - 1) // _BLOCK_T
    cum = torch.cumsum(n_chunks, 0)
    n_regions = 2 * batch + 1
    grid = triton.cdiv(rows, _BLOCK_T) + n_regions  # >= Σ cdiv(region_len, BLOCK_T) for valid input
    p = torch.arange(grid, device=dev)
    r = torch.searchsorted(cum, p, right=True)
    used = r < n_regions
    rc = r.clamp(max=n_regions - 1)
    c = p - (cum - n_chunks)[rc]
    item_row0 = (region_start[rc] + c * _BLOCK_T).to(torch.int32)
    item_nrows = torch.where(used, (region_len[rc] - c * _BLOCK_T).clamp(0, _BLOCK_T), 0).to(torch.int32)
    item_seq = torch.where(used, region_seq[rc], -1).to(torch.int32)
    lo = (cum - n_chunks)[1::2].clamp(max=grid).to(torch.int32)
    hi = cum[1::2].clamp(max=grid).to(torch.int32)
    if seg_offsets is None:
        seg_offsets = torch.stack([torch.zeros_like(seq_len), seq_len], 1).to(torch.int32)
    off = torch.minimum(seg_offsets.to(torch.int64).clamp_min(0), seq_len[:, None])
    count = (off[:, 1:] - off[:, :-1]).clamp_min(0).to(torch.int32)
    return _Plan(grid, item_row0, item_nrows, item_seq, seq_row0.to(torch.int32), seq_len.to(torch.int32),
                 lo, hi, seg_offsets.contiguous(), count, seg_offsets.shape[1] - 1)


def _fwd_block_d(dim: int) -> int:
    """BLOCK_D of the forward: it loops over D in slices, so 32 x 64 tiles on 8 warps serve every D (no spills
    at sm_80 / sm_90a; D is a runtime argument)."""
    return max(16, min(64, triton.next_power_of_2(dim)))


def _forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, plan: _Plan, stats: bool):
    rows, dim = x2d.shape
    dev = x2d.device
    y = torch.empty(rows, dim, dtype=x2d.dtype, device=dev)
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    batch, nseg = plan.count.shape
    unit_sum = torch.zeros(batch, nseg, dim, dtype=torch.float32, device=dev)
    sq_norm = torch.zeros(batch, nseg, dtype=torch.float32, device=dev)
    adjacent = torch.zeros(batch, dtype=torch.float32, device=dev)
    if rows == 0:
        return y, rstd, (unit_sum, plan.count, sq_norm, adjacent)
    stats = stats and batch > 0
    if stats:
        part_sum = torch.empty(plan.grid, nseg, dim, dtype=torch.float32, device=dev)
        part_q = torch.empty(plan.grid, nseg, dtype=torch.float32, device=dev)
        part_adj = torch.empty(plan.grid, dtype=torch.float32, device=dev)
    else:
        part_sum = part_q = part_adj = rstd  # never touched
    block_d = _fwd_block_d(dim)
    dummy = plan.item_seq
    _fwd_kernel[(plan.grid,)](
        x2d, weight, y, rstd,
        plan.item_row0, plan.item_nrows, plan.item_seq,
        plan.seq_row0 if stats else dummy, plan.seq_len if stats else dummy, plan.seg_offsets if stats else dummy,
        part_sum, part_q, part_adj,
        rows, dim, x2d.stride(0), x2d.stride(1), float(eps),
        YT=_TL_DTYPE[x2d.dtype], K=nseg, STATS=stats, BLOCK_T=_BLOCK_T, BLOCK_D=block_d, num_warps=8,
    )
    if stats:
        block_d = max(16, min(256, triton.next_power_of_2(dim)))
        _reduce_kernel[(batch, triton.cdiv(dim, block_d))](
            part_sum, part_q, part_adj, plan.seq_item_lo, plan.seq_item_hi,
            unit_sum, sq_norm, adjacent, dim,
            K=nseg, BLOCK_K=max(2, triton.next_power_of_2(nseg)), BLOCK_D=block_d,
        )
    return y, rstd, (unit_sum, plan.count, sq_norm, adjacent)


class _BwdConfig(NamedTuple):
    """Backward launch shape: which kernel, its [BLOCK_T, BLOCK_D] tile and warps."""

    blocked: bool  # True: _bwd_blocked_kernel (two passes over BLOCK_D slices); False: whole rows (_bwd_kernel)
    block_t: int
    block_d: int
    num_warps: int


_BWD_ROW_MAX = 4096  # widest row (next_pow2(D)) the single-pass kernel holds in registers without spills
_BWD_BLOCKED_TILE = (4, 512, 8)  # BLOCK_T, BLOCK_D, warps of the blocked kernel: 8 values per thread, <= 48 registers


def _bwd_config(dim: int) -> _BwdConfig:
    """Tile rules of the backward (the compile test lowers exactly these for its D list)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if block_d > _BWD_ROW_MAX:
        block_t, block_d, warps = _BWD_BLOCKED_TILE
        return _BwdConfig(True, block_t, block_d, warps)
    block_t = max(2, min(16, 4096 // block_d))  # >= 2 rows keeps the aranges non-trivial
    return _BwdConfig(False, block_t, block_d, _bwd_warps(block_t * block_d))


def _bwd_warps(tile: int) -> int:
    """Warps for a whole-row [BLOCK_T, BLOCK_D] tile: no register spills on sm_80 / sm_90a up to 2 x 4096."""
    return 4 if tile <= 2048 else 8 if tile <= 4096 else 16


def _backward(x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """dx [R, D] (x's dtype) and dw [D] (weight's dtype) of the RMSNorm; dw is summed in a fixed order."""
    rows, dim = x2d.shape
    dev = x2d.device
    dx = torch.empty(rows, dim, dtype=x2d.dtype, device=dev)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    cfg = _bwd_config(dim)
    if x2d.is_cuda:
        max_progs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
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
    )
    return dx, part_dw.sum(0).to(weight.dtype)


class _RMSNormAngleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, eps: float, plan: _Plan, stats: bool):
        y, rstd, (unit_sum, count, sq_norm, adjacent) = _forward(x2d, weight, eps, plan, stats)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.mark_non_differentiable(unit_sum, count, sq_norm, adjacent)
        return y, unit_sum, count, sq_norm, adjacent

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_unused: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2d, weight, rstd, dy)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None, None, None)


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
    CUDA); the kernels mask out-of-range rows either way. See the module docstring for the exact semantics.
    """
    _check_args(x, weight, eps, cu_seqlens, seg_offsets, token_index, validate)
    dim = x.shape[-1]
    x2d = x.reshape(-1, dim)  # a view whenever possible: the kernels take any strides
    stats = cu_seqlens is not None
    if stats:
        plan = _stats_plan(x2d.shape[0], cu_seqlens, seg_offsets, token_index)
    else:
        plan = _plain_plan(x2d.shape[0], x.device)
    y, unit_sum, count, sq_norm, adjacent = _RMSNormAngleFn.apply(x2d, weight, float(eps), plan, stats)
    y = y.view(x.shape)
    return y, (AngleStats(unit_sum, count, sq_norm, adjacent) if stats else None)


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
    n, length = mask.shape
    lens = mask.sum(1)
    ar = torch.arange(length, device=mask.device)
    first = torch.where(mask, ar, length).amin(1) if length else torch.zeros_like(lens)
    last = torch.where(mask, ar, -1).amax(1) if length else torch.zeros_like(lens)
    contiguous = (lens == 0) | (last - first + 1 == lens)
    if not bool(contiguous.all()):
        row = int(torch.nonzero(~contiguous)[0, 0])
        raise ValueError(f"attention_mask: row {row} has padding between tokens (only left or right padding)")
    cu_seqlens = torch.zeros(n + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lens, 0)
    token_index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return cu_seqlens, token_index


class FusedRMSNormAngle(nn.Module):
    """Drop-in for ``LlamaRMSNorm``-like modules (``weight``, ``variance_epsilon``) that can also collect stats.

    Without segment info it is a plain (Triton) RMSNorm. After :meth:`set_segments` (packed input) or
    :meth:`set_attention_mask` (padded ``[N, L, D]`` input), every forward also computes the angle statistics of
    its output and keeps them, detached, in ``self.stats`` (an :class:`AngleStats`, None before the first such
    forward). Forward passes skip the host-syncing value checks (``validate=False``); the segment info is checked
    once when it is set.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.stats: Optional[AngleStats] = None
        self._segments: Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = None

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
        self._segments = (cu_seqlens, seg_offsets, token_index)

    def set_attention_mask(self, attention_mask: torch.Tensor, seg_offsets: Optional[torch.Tensor] = None) -> None:
        """Padded-batch variant: ``seg_offsets`` are relative to each row's first real token."""
        cu_seqlens, token_index = padded_to_cu_seqlens(attention_mask)
        self.set_segments(cu_seqlens, seg_offsets, token_index)

    def clear_segments(self) -> None:
        self._segments = None
        self.stats = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._segments is None:
            y, _ = rmsnorm_angle(hidden_states, self.weight, self.variance_epsilon, validate=False)
            return y
        cu_seqlens, seg_offsets, token_index = self._segments
        y, stats = rmsnorm_angle(hidden_states, self.weight, self.variance_epsilon, cu_seqlens, seg_offsets,
                                 token_index, validate=False)
        self.stats = stats
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
