"""Causal pairwise angle sums per (segment, segment), flash-attention style, in Triton.

    out = angle_pairwise(hidden, cu_seqlens, seg_offsets=None, fn="cos", window=None)   # [B, K, K] float32

    out[b, k, l] = Σ f(u_i · u_j)  over pairs j < i of sequence b with token i in segment k and token j in
                                   segment l (and i − j <= window when a window is given),
    u_t = h_t / max(||h_t||, 1e-12) (F.normalize), f = identity ("cos") / abs ("abs") / square ("square").

Shapes and dtypes (DESIGN.md §1, §3 conventions):
    hidden       [T, D]    float16 / bfloat16 / float32, any strides (packed tokens of B sequences)
    cu_seqlens   [B+1]     int32, flash-attn convention (cu[0] = 0, non-decreasing, cu[-1] <= T)
    seg_offsets  [B, K+1]  int32, offsets relative to each sequence start; default [[0, len_b]] (K = 1)
    -> [B, K, K] float32 (entries with k < l are 0 when no window is given: no causal pair goes forward)

Algorithm (O(L·D) memory, O(L²·D) compute; the L x L cosine matrix never reaches global memory):
  1. pre-pass: inverse norms ``inv[t] = 1 / max(||h_t||, 1e-12)`` in float32 ([T], torch).
  2. one program per (sequence b, query tile of BLOCK_M rows); BLOCK_M = BLOCK_N = BLOCK_D = 64 on 8 warps on the
     GPU (no register spills on sm_90), 32-row tiles in the interpreter. Work items are laid out on the device (no host
     sync): sequence b owns the contiguous item range [cum_b − tiles_b, cum_b) of a grid of cdiv(T, BLOCK_M) + B
     programs, unused items return at once.
  3. the program walks the key tiles j in [max(o_0, i_min − window), min(i_max, o_K) − 1) only (causal and
     windowed: tiles after the diagonal or out of the window are never visited). For each tile it forms
     ``s = Q Kᵀ`` with ``tl.dot`` over BLOCK_D slices of the *raw* rows (fp16/bf16 stay fp16/bf16 on the tensor
     cores, fp32 uses ``input_precision="ieee"``, i.e. TF32 off), with fp32 accumulation, then scales by
     ``inv_i inv_j``. Scaling after the dot keeps 16-bit inputs exact: a product of two 16-bit floats is exact in
     fp32, so the only rounding is the fp32 accumulation (no loss from normalising into bf16 first).
  4. mask (j < i, window, both tokens inside [o_0, o_K)), apply f, and fold the tile into a per-query-row
     accumulator ``acc[BLOCK_M, K]`` (column l = key segment l; a static loop over K, K is a constexpr).
  5. at the end the rows are folded by query segment into a [K, K] partial per program; a second small kernel
     sums the partials of each sequence in item order. No atomics: the result is deterministic (run to run).

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 tiles are upcast to fp32 before ``tl.dot`` because the interpreter
stores bf16 as uint16 and its dot/arithmetic on bf16 is wrong; the upcast is exact, so results match the GPU path
up to accumulation order.

``angle_pairwise_check`` compares the kernel (fn="cos", no window) with the O(L·D) closed form from segment sums
(``naive_pairwise.pairwise_from_segment_sums``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .naive_pairwise import default_seg_offsets, pairwise_from_segment_sums, segment_unit_sums
from .triton_segments import segment_ids as _segment_ids
from .validate import (
    check_cu_seqlens,
    check_hidden,
    check_seg_offsets,
    check_triton_device,
    on_first_tensors_device,
    triton_interpreting,
)

__all__ = ["angle_pairwise", "angle_pairwise_check", "PairwiseCheck", "FNS"]

FNS: dict[str, int] = {"cos": 0, "abs": 1, "square": 2}
_NO_WINDOW = 1 << 30  # "no window" as a runtime int: same compiled kernel for every window


# --------------------------------------------------------------------------------------------------------------
# validation (every failure is a ValueError naming the argument)
# --------------------------------------------------------------------------------------------------------------
def _check_args(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor],
    fn: str,
    window: Optional[int],
    validate: bool,
) -> None:
    """hidden [T, D] float (CUDA, or CPU under the interpreter), cu_seqlens [B+1] int32, seg_offsets [B, K+1] int32
    or None, ``fn`` in :data:`FNS`, ``window`` an int >= 0 or None; ``validate`` adds the index value checks."""
    check_hidden(hidden)
    check_triton_device("hidden", hidden)
    check_cu_seqlens(cu_seqlens, hidden, validate)
    if seg_offsets is not None:
        check_seg_offsets(seg_offsets, cu_seqlens, validate)
    if fn not in FNS:
        raise ValueError(f"fn: expected one of {tuple(FNS)}, got {fn!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window: expected an int or None, got {type(window).__name__}")
        if window < 0:
            raise ValueError(f"window: expected window >= 0, got {window}")


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _pairwise_kernel(
    h_ptr, inv_ptr, start_ptr, len_ptr, off_ptr, item_seq_ptr, item_tile_ptr, part_ptr,
    T, D, stride_t, stride_d, window,
    K: tl.constexpr, FN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.load(item_seq_ptr + pid)
    if b >= 0:
        tile = tl.load(item_tile_ptr + pid)
        seq_start = tl.load(start_ptr + b)  # cu_seqlens clamped into [0, T] (_query_tiles): never out of hidden
        length = tl.load(len_ptr + b)
        off_row = off_ptr + b * (K + 1)
        o_first = tl.minimum(tl.maximum(tl.load(off_row), 0), length)
        o_last = tl.maximum(tl.minimum(tl.maximum(tl.load(off_row + K), 0), length), o_first)

        q_lo = tile * BLOCK_M
        rows = q_lo + tl.arange(0, BLOCK_M)  # positions inside the sequence
        seg_i = _segment_ids(rows, off_row, length, K)
        row_ok = (seg_i >= 0) & (seq_start + rows < T)
        inv_i = tl.load(inv_ptr + seq_start + rows, mask=row_ok, other=0.0)
        q_rows = (seq_start + rows).to(tl.int64)  # int64 element offsets: T * D may pass 2**31
        kcols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # acc[i, l]: sum over keys of segment l

        # keys j < i, j >= i - window, both inside [o_first, o_last)
        kv_lo = tl.maximum(o_first, q_lo - window)
        kv_hi = tl.minimum(q_lo + BLOCK_M, o_last) - 1
        for n0 in range(kv_lo, kv_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            seg_j = _segment_ids(cols, off_row, length, K)
            col_ok = (seg_j >= 0) & (seq_start + cols < T)
            inv_j = tl.load(inv_ptr + seq_start + cols, mask=col_ok, other=0.0)
            k_rows = (seq_start + cols).to(tl.int64)
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                q = tl.load(
                    h_ptr + q_rows[:, None] * stride_t + dd[None, :] * stride_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                )
                kt = tl.load(
                    h_ptr + k_rows[None, :] * stride_t + dd[:, None] * stride_d,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0,
                )
                if UPCAST:
                    q = q.to(tl.float32)
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt, s, input_precision=PREC)
            c = s * inv_i[:, None] * inv_j[None, :]
            if FN == 1:
                c = tl.abs(c)
            elif FN == 2:
                c = c * c
            diff = rows[:, None] - cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :] & (diff > 0) & (diff <= window)
            c = tl.where(ok, c, 0.0)
            for l in tl.static_range(K):
                part = tl.sum(tl.where(seg_j[None, :] == l, c, 0.0), axis=1)  # [BLOCK_M]
                acc += tl.where(kcols[None, :] == l, part[:, None], 0.0)

        # fold query rows by their segment: partial[pid, k, l]
        for k in tl.static_range(K):
            red = tl.sum(tl.where(seg_i[:, None] == k, acc, 0.0), axis=0)  # [BLOCK_K]
            tl.store(part_ptr + (pid * K + k) * K + kcols, red, mask=kcols < K)


@triton.jit
def _sum_items_kernel(part_ptr, out_ptr, item_lo_ptr, item_hi_ptr, KK, BLOCK: tl.constexpr):
    """out[b] = Σ_{i in [lo_b, hi_b)} part[i], in item order (deterministic)."""
    b = tl.program_id(0)
    lo = tl.load(item_lo_ptr + b)
    hi = tl.load(item_hi_ptr + b)
    idx = tl.arange(0, BLOCK)
    m = idx < KK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(lo, hi):
        acc += tl.load(part_ptr + i * KK + idx, mask=m, other=0.0)
    tl.store(out_ptr + b * KK + idx, acc, mask=m)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------
def _query_tiles(cu_seqlens: torch.Tensor, block_m: int, total: int):
    """Device-side work list: (sequence, tile) per program, each sequence's item range, and its clamped start and
    length [B] int32; no host sync."""
    dev = cu_seqlens.device
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    start = cu[:-1].clamp(0, total)  # unvalidated bounds clamped into [0, T], as angle_stats's kernels do
    lens = torch.maximum(cu[1:], start).clamp_max(total) - start
    tiles = (lens + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    grid = triton.cdiv(total, block_m) + batch  # >= Σ_b cdiv(len_b, BLOCK_M) when Σ len_b <= T
    p = torch.arange(grid, device=dev)
    seq = torch.searchsorted(cum, p, right=True)
    used = seq < batch
    seq_c = seq.clamp(max=batch - 1)
    item_tile = (p - (cum - tiles)[seq_c]).to(torch.int32)
    item_seq = torch.where(used, seq_c, torch.full_like(seq_c, -1)).to(torch.int32)
    lo = (cum - tiles).clamp(max=grid).to(torch.int32)
    hi = cum.clamp(max=grid).to(torch.int32)
    return grid, item_seq, item_tile, lo, hi, start.to(torch.int32), lens.to(torch.int32)


def _block_sizes(dim: int, on_gpu: bool, fp32: bool) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_D, num_warps (tl.dot needs >= 16 on every side). On GPU: 64 x 64 x 64 tiles for
    16-bit input, 32 x 32 x 32 for fp32 (its IEEE dot needs far more registers); all on 8 warps without spills on
    sm_80 / sm_90a (tests/test_triton_compile.py). Smaller tiles in the interpreter."""
    if not on_gpu:
        return 32, 32, min(64, max(16, triton.next_power_of_2(dim))), 4
    block = 32 if fp32 else 64
    return block, block, min(block, max(16, triton.next_power_of_2(dim))), 8


@on_first_tensors_device
def angle_pairwise(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    fn: str = "cos",
    window: Optional[int] = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Σ f(cos) over causal (optionally windowed) token pairs per (query segment, key segment): ``[B, K, K]`` f32.

    See the module docstring. ``validate=False`` skips the value checks on ``cu_seqlens`` / ``seg_offsets``
    (they read the index tensors: one host sync on CUDA); out-of-range values are clamped in the kernel either way.
    """
    _check_args(hidden, cu_seqlens, seg_offsets, fn, window, validate)
    if seg_offsets is None:
        seg_offsets = default_seg_offsets(cu_seqlens)
    cu_seqlens, seg_offsets = cu_seqlens.contiguous(), seg_offsets.contiguous()  # read densely packed
    batch = cu_seqlens.numel() - 1
    nseg = seg_offsets.shape[1] - 1
    out = torch.zeros(batch, nseg, nseg, dtype=torch.float32, device=hidden.device)
    if batch == 0 or hidden.shape[0] == 0:
        return out
    total, dim = hidden.shape
    inv = 1.0 / torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).clamp_min(1e-12)
    block_m, block_n, block_d, warps = _block_sizes(
        dim, hidden.is_cuda and not triton_interpreting(), hidden.dtype == torch.float32
    )
    upcast = hidden.dtype == torch.bfloat16 and triton_interpreting()
    grid, item_seq, item_tile, lo, hi, seq_start, seq_len = _query_tiles(cu_seqlens, block_m, total)
    part = torch.empty(grid, nseg, nseg, dtype=torch.float32, device=hidden.device)
    _pairwise_kernel[(grid,)](
        hidden, inv, seq_start, seq_len, seg_offsets, item_seq, item_tile, part,
        total, dim, hidden.stride(0), hidden.stride(1), _NO_WINDOW if window is None else int(window),
        K=nseg, FN=FNS[fn], UPCAST=upcast, PREC="ieee" if hidden.dtype == torch.float32 or upcast else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=max(2, triton.next_power_of_2(nseg)),
        num_warps=warps,
    )
    _sum_items_kernel[(batch,)](part, out, lo, hi, nseg * nseg, BLOCK=max(2, triton.next_power_of_2(nseg * nseg)))
    return out


class PairwiseCheck(NamedTuple):
    """Result of :func:`angle_pairwise_check` (both ``[B, K, K]`` float64 on the CPU)."""

    kernel: torch.Tensor
    expected: torch.Tensor
    max_abs_err: float
    ok: bool


def angle_pairwise_check(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    rtol: float = 1e-4,
    atol: float = 1e-3,
) -> PairwiseCheck:
    """Cross-check ``angle_pairwise(fn="cos", window=None)`` against the O(L·D) segment-sum closed form.

    The closed form is evaluated in float64 from the same input; ``ok`` is ``allclose(kernel, expected, rtol,
    atol)``. The default atol allows for fp32 accumulation over long sequences (the sums grow like L²).
    """
    got = angle_pairwise(hidden, cu_seqlens, seg_offsets, fn="cos", window=None).double().cpu()
    unit_sum, sq_norm = segment_unit_sums(hidden, cu_seqlens, seg_offsets, dtype=torch.float64)
    expected = pairwise_from_segment_sums(unit_sum, sq_norm).cpu()
    err = float((got - expected).abs().max()) if got.numel() else 0.0
    return PairwiseCheck(got, expected, err, bool(torch.allclose(got, expected, rtol=rtol, atol=atol)))
