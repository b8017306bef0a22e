"""Triton `angle_stats`: one read of the hidden states for a whole packed batch, in three fixed launches.

1. ``_segment_prep_kernel`` (one program): clamps each (sequence, segment) range into [0, T], writes the token
   counts and the exclusive prefix sum of per-segment chunk counts (a segment of n tokens has ceil(n / CHUNK)
   chunks). No host sync: the grid of step 2 uses the bound ceil(T / CHUNK) + B*K, known from shapes alone.
2. ``_chunk_kernel`` (one program per chunk slot): binary-searches its segment, then walks its rows BLOCK_T at a
   time with whole rows in registers (BLOCK_D = next power of two >= D): row norms, unit vectors, their sum,
   sum of squared norms, and the adjacent-token dot u_t . u_{t+1} (the next row is loaded shifted by one, so pairs
   across chunk and segment boundaries inside [o_0, o_K) are counted once, by the chunk holding t). Writes one
   float32 partial row per chunk.
3. ``_reduce_kernel`` sums the partials of each segment in chunk order: deterministic, no atomics.
Float32 accumulation throughout; any input strides (row offsets in int64); fp16 / bf16 / fp32 input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .types import AngleStats
from .validate import on_first_tensors_device

MAX_DIM = 8192  # 32 warps x 8 elements per thread


@triton.jit
def _segment_prep_kernel(
    cu_ptr, off_ptr, n_tokens, n_seq, n_seg, chunk,
    seg_lo_ptr, seg_hi_ptr, span_hi_ptr, count_ptr, chunk_start_ptr,
    BLOCK: tl.constexpr,
):
    n_total = n_seq * n_seg
    carry = tl.zeros([], dtype=tl.int32)
    tl.store(chunk_start_ptr, carry)
    for g0 in range(0, n_total, BLOCK):
        g = g0 + tl.arange(0, BLOCK)
        m = g < n_total
        b = g // n_seg
        k = g % n_seg
        seq_lo = tl.minimum(tl.maximum(tl.load(cu_ptr + b, mask=m, other=0), 0), n_tokens)
        seq_hi = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1, mask=m, other=0), seq_lo), n_tokens)
        length = seq_hi - seq_lo
        row = off_ptr + b * (n_seg + 1)
        o_k = tl.minimum(tl.maximum(tl.load(row + k, mask=m, other=0), 0), length)
        o_k1 = tl.minimum(tl.maximum(tl.load(row + k + 1, mask=m, other=0), o_k), length)
        o_last = tl.minimum(tl.maximum(tl.load(row + n_seg, mask=m, other=0), o_k1), length)
        n = o_k1 - o_k
        tl.store(seg_lo_ptr + g, seq_lo + o_k, mask=m)
        tl.store(seg_hi_ptr + g, seq_lo + o_k1, mask=m)
        tl.store(span_hi_ptr + g, seq_lo + o_last, mask=m)
        tl.store(count_ptr + g, n, mask=m)
        n_chunks = tl.where(m, (n + chunk - 1) // chunk, 0)
        tl.store(chunk_start_ptr + 1 + g, carry + tl.cumsum(n_chunks, axis=0), mask=m)
        carry += tl.sum(n_chunks, axis=0)


@triton.jit
def _chunk_kernel(
    x_ptr, stride_t, stride_d, dim, chunk, n_total, search_steps,
    seg_lo_ptr, seg_hi_ptr, span_hi_ptr, chunk_start_ptr,
    part_sum_ptr, part_sq_ptr, part_adj_ptr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    # largest g in [0, n_total] with chunk_start[g] <= pid; g == n_total means a spare slot past the last chunk
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + n_total
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(chunk_start_ptr + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    g = lo
    if g < n_total:
        c = pid - tl.load(chunk_start_ptr + g)
        seg_hi = tl.load(seg_hi_ptr + g)
        row_lo = tl.load(seg_lo_ptr + g) + c * chunk
        row_hi = tl.minimum(row_lo + chunk, seg_hi)
        span_hi = tl.load(span_hi_ptr + g)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        col_off = cols.to(tl.int64) * stride_d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        adj = tl.zeros([BLOCK_T], dtype=tl.float32)
        for r0 in range(row_lo, row_hi, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            row_mask = rows < row_hi
            ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_t + col_off[None, :]
            x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12, propagate_nan=tl.PropagateNan.ALL)
            u = x * inv[:, None]
            acc += tl.sum(u, axis=0)
            sq += tl.sum(u * u, axis=1)
            next_mask = row_mask & (rows + 1 < span_hi)
            xn = tl.load(ptrs + stride_t, mask=next_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(xn * xn, axis=1)), 1e-12, propagate_nan=tl.PropagateNan.ALL)
            adj += tl.sum(u * xn, axis=1) * inv_n
        out = pid.to(tl.int64) * dim
        tl.store(part_sum_ptr + out + cols, acc, mask=col_mask)
        tl.store(part_sq_ptr + pid, tl.sum(sq, axis=0))
        tl.store(part_adj_ptr + pid, tl.sum(adj, axis=0))


@triton.jit
def _reduce_kernel(
    chunk_start_ptr, part_sum_ptr, part_sq_ptr, part_adj_ptr, n_slots, dim, n_seg,
    unit_sum_ptr, sq_ptr, adjacent_ptr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    c0 = tl.load(chunk_start_ptr + g)
    c1 = tl.minimum(tl.load(chunk_start_ptr + g + 1), n_slots)  # min() only matters for unvalidated bad offsets
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    src = part_sum_ptr + c0.to(tl.int64) * dim + cols
    for _ in range(c0, c1):
        acc += tl.load(src, mask=col_mask, other=0.0)
        src += dim
    tl.store(unit_sum_ptr + g.to(tl.int64) * dim + cols, acc, mask=col_mask)
    if tl.program_id(1) == 0:
        sq = tl.zeros([], dtype=tl.float32)
        for c in range(c0, c1):
            sq += tl.load(part_sq_ptr + c)
        tl.store(sq_ptr + g, sq)
        if g % n_seg == 0:  # the sequence's first segment also reduces its adjacent-token term
            c_end = tl.minimum(tl.load(chunk_start_ptr + g + n_seg), n_slots)
            adj = tl.zeros([], dtype=tl.float32)
            for c in range(c0, c_end):
                adj += tl.load(part_adj_ptr + c)
            tl.store(adjacent_ptr + g // n_seg, adj)


def _tile_config(dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): whole rows per tile (at least 1024 elements), 8 elements per thread (one
    16-byte bf16 vector). At 8 per thread ptxas needs 56-102 registers; at 16 it needs 120-180, which drops
    occupancy to 1-4 programs per SM for this memory-bound loop (tests/test_triton_compile.py checks for spills)."""
    block_d = triton.next_power_of_2(dim)
    block_t = max(1, 1024 // block_d)
    num_warps = block_t * block_d // 256
    return block_t, block_d, num_warps


def default_chunk(n_tokens: int, block_t: int, device: torch.device) -> int:
    """Rows per program: enough programs to fill the GPU (about 8 per SM), at most 1024 rows each."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    rows = triton.cdiv(max(n_tokens, 1), 8 * n_sm)
    rows = triton.cdiv(rows, block_t) * block_t
    return int(min(max(rows, 4 * block_t), 1024))


@on_first_tensors_device
def angle_stats_triton(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor, chunk: int | None = None
) -> AngleStats:
    """hidden [T, D] fp16/bf16/fp32, cu_seqlens [B+1] int32, seg_offsets [B, K+1] int32 (any strides) ->
    AngleStats. ``chunk`` (rows per program) is a tuning knob; tests set it small to cross many chunk borders."""
    n_tokens, dim = hidden.shape
    n_seq, n_seg = seg_offsets.shape[0], seg_offsets.shape[1] - 1
    if dim > MAX_DIM:
        raise ValueError(f"hidden: the Triton backend supports D <= {MAX_DIM}, got D = {dim}; use backend='torch'")
    device = hidden.device
    cu_seqlens, seg_offsets = cu_seqlens.contiguous(), seg_offsets.contiguous()  # the kernels read them packed
    n_total = n_seq * n_seg
    unit_sum = torch.empty(n_seq, n_seg, dim, dtype=torch.float32, device=device)
    count = torch.empty(n_seq, n_seg, dtype=torch.int32, device=device)
    sq_norm = torch.empty(n_seq, n_seg, dtype=torch.float32, device=device)
    adjacent = torch.empty(n_seq, dtype=torch.float32, device=device)
    if n_total == 0:
        return AngleStats(unit_sum, count, sq_norm, adjacent)
    block_t, block_d, num_warps = _tile_config(dim)
    chunk = chunk or default_chunk(n_tokens, block_t, device)
    seg_lo = torch.empty(n_total, dtype=torch.int32, device=device)
    seg_hi = torch.empty_like(seg_lo)
    span_hi = torch.empty_like(seg_lo)
    chunk_start = torch.empty(n_total + 1, dtype=torch.int32, device=device)
    _segment_prep_kernel[(1,)](
        cu_seqlens, seg_offsets, n_tokens, n_seq, n_seg, chunk,
        seg_lo, seg_hi, span_hi, count, chunk_start,
        BLOCK=min(triton.next_power_of_2(n_total), 1024),
    )
    n_slots = triton.cdiv(n_tokens, chunk) + n_total
    part_sum = torch.empty(n_slots, dim, dtype=torch.float32, device=device)
    part_sq = torch.empty(n_slots, dtype=torch.float32, device=device)
    part_adj = torch.empty(n_slots, dtype=torch.float32, device=device)
    if n_tokens > 0:
        _chunk_kernel[(n_slots,)](
            hidden, hidden.stride(0), hidden.stride(1), dim, chunk, n_total, max(n_total, 1).bit_length(),
            seg_lo, seg_hi, span_hi, chunk_start,
            part_sum, part_sq, part_adj,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
        )
    block_r = min(block_d, 1024)
    _reduce_kernel[(n_total, triton.cdiv(dim, block_r))](
        chunk_start, part_sum, part_sq, part_adj, n_slots if n_tokens > 0 else 0, dim, n_seg,
        unit_sum, sq_norm, adjacent,
        BLOCK_D=block_r,
    )
    return AngleStats(unit_sum, count, sq_norm, adjacent)
