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
One Triton kernel with whole rows in registers (BLOCK_D = next_pow2(D)); each program walks a contiguous range of
rows and keeps its dw partial in registers; the [programs, D] partials are summed by torch (deterministic).

bf16 rounding is done with an explicit round-to-nearest-even on the fp32 bits (``_round_to``): identical on GPU
and under ``TRITON_INTERPRET=1``, whose own fp32 -> bf16 cast truncates and whose bf16 arithmetic is wrong (bf16
is stored as uint16 there), so kernels never compute in bf16.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import nn

from .types import AngleStats
from .triton_segments import segment_ids as _segment_ids

__all__ = ["rmsnorm_angle", "FusedRMSNormAngle", "padded_to_cu_seqlens"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------------------
# validation (every failure is a ValueError naming the argument)
# --------------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cu_seqlens: Optional[torch.Tensor],
    seg_offsets: Optional[torch.Tensor],
    token_index: Optional[torch.Tensor],
    validate: bool,
) -> None:
    _check_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D [T, D] or 3-D [N, L, D] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError("x: the feature dimension D must be at least 1, got 0")
    if not x.is_cuda and not _interpreting():
        raise ValueError("x: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    _check_tensor("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape [{x.shape[-1]}] (D of x), got {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (that of x), got {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if cu_seqlens is None:
        if seg_offsets is not None:
            raise ValueError("seg_offsets: given without cu_seqlens")
        if token_index is not None:
            raise ValueError("token_index: given without cu_seqlens")
        return
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D [B+1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens: expected dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens: expected device {x.device} (that of x), got {cu_seqlens.device}")
    batch = cu_seqlens.numel() - 1
    if seg_offsets is not None:
        _check_tensor("seg_offsets", seg_offsets)
        if seg_offsets.dim() != 2 or seg_offsets.shape[0] != batch or seg_offsets.shape[1] < 2:
            raise ValueError(f"seg_offsets: expected shape [B, K+1] = [{batch}, >=2], got {tuple(seg_offsets.shape)}")
        if seg_offsets.dtype != torch.int32:
            raise ValueError(f"seg_offsets: expected dtype int32, got {seg_offsets.dtype}")
        if seg_offsets.device != x.device:
            raise ValueError(f"seg_offsets: expected device {x.device} (that of x), got {seg_offsets.device}")
    rows = x.numel() // x.shape[-1]
    if token_index is not None:
        _check_tensor("token_index", token_index)
        if token_index.dim() != 1:
            raise ValueError(f"token_index: expected a 1-D [T] tensor, got shape {tuple(token_index.shape)}")
        if token_index.dtype not in _INDEX_DTYPES:
            raise ValueError(f"token_index: expected dtype int32 or int64, got {token_index.dtype}")
        if token_index.device != x.device:
            raise ValueError(f"token_index: expected device {x.device} (that of x), got {token_index.device}")
    if validate:
        _check_values(cu_seqlens, seg_offsets, token_index, rows)


def _check_values(cu_seqlens: torch.Tensor, seg_offsets: Optional[torch.Tensor], token_index: Optional[torch.Tensor],
                  rows: Optional[int]) -> None:
    """Value checks that read the index tensors (one host sync on CUDA). ``rows``: rows of x, None if unknown."""
    cu = cu_seqlens.to("cpu", torch.int64)
    batch = cu.numel() - 1
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens: expected non-decreasing values")
    packed = rows if token_index is None else token_index.numel()
    if packed is not None and int(cu[-1]) > packed:
        what = "rows of x" if token_index is None else "entries of token_index"
        raise ValueError(f"cu_seqlens: last value {int(cu[-1])} is past the {packed} {what}")
    if seg_offsets is not None and batch > 0:
        off = seg_offsets.to("cpu", torch.int64)
        lens = (cu[1:] - cu[:-1]).unsqueeze(1)
        if bool(((off < 0) | (off > lens)).any()):
            raise ValueError("seg_offsets: every offset must lie in [0, len_b] of its sequence")
        if bool((off[:, 1:] < off[:, :-1]).any()):
            raise ValueError("seg_offsets: expected non-decreasing offsets per sequence")
    if token_index is not None and int(cu[-1]) > 0:
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
def _bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, part_dw_ptr,
    R, D, rows_per_prog, sx_r, sx_d, sdy_r, sdy_d,
    XT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
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
        x = tl.load(x_ptr + rows64[:, None] * sx_r + dd[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * sdy_r + dd[None, :] * sdy_d, mask=m, other=0.0).to(tl.float32)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / D
        dx = rstd[:, None] * (g - n * c[:, None])
        tl.store(dx_ptr + rows64[:, None] * D + dd[None, :], _round_to(dx, XT).to(XT), mask=m)
        dw += tl.sum(dy * _round_to(n, XT), axis=0)
    tl.store(part_dw_ptr + pid.to(tl.int64) * D + dd, dw, mask=d_ok)


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
    block_d = max(16, min(64, triton.next_power_of_2(dim)))  # 32 x 64 tiles, 8 warps: no spills on sm_90
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


def _backward(x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    rows, dim = x2d.shape
    dev = x2d.device
    dx = torch.empty(rows, dim, dtype=x2d.dtype, device=dev)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block_d = max(16, triton.next_power_of_2(dim))
    block_t = max(2, min(16, 4096 // block_d))  # whole rows in registers; >= 2 rows keeps aranges non-trivial
    if x2d.is_cuda:
        max_progs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    else:
        max_progs = 4
    grid = min(triton.cdiv(rows, block_t), max_progs)
    rows_per_prog = triton.cdiv(triton.cdiv(rows, grid), block_t) * block_t
    grid = triton.cdiv(rows, rows_per_prog)
    part_dw = torch.empty(grid, dim, dtype=torch.float32, device=dev)
    _bwd_kernel[(grid,)](
        x2d, weight, dy, rstd, dx, part_dw,
        rows, dim, rows_per_prog, x2d.stride(0), x2d.stride(1), dy.stride(0), dy.stride(1),
        XT=_TL_DTYPE[x2d.dtype], BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=_bwd_warps(block_t * block_d),
    )
    return dx, part_dw.sum(0).to(weight.dtype)


def _bwd_warps(tile: int) -> int:
    """Warps for a [BLOCK_T, BLOCK_D] backward tile: no register spills on sm_90 up to D = 4096 (2 x 4096 on 16
    warps); D = 8192 spills a little on 32 warps, larger D more (whole rows are held in registers)."""
    return 4 if tile <= 2048 else 8 if tile <= 4096 else 16 if tile <= 8192 else 32


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
    _check_tensor("attention_mask", attention_mask)
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
