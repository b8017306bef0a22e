"""Triton `angle_concentration`: the DESIGN.md §1 metrics of a whole batch from its segment statistics, one launch.

The PyTorch form (``concentration._concentration``) is ~40 small ops: on a GPU, in eager mode, their launches
cost more than the statistics themselves for short batches. Here one program per sequence b reads its K segment
sums S_k ([K, D] f32) once, BLOCK_D columns at a time, accumulating the Gram matrix S_k . S_l and ||Σ_k S_k||²
in float32 (fixed order: deterministic), then writes every metric:

    intra [B, K], inter [B, K, K], score [B], causal [B], causal_ref [B]   (float32, NaN where a mean has no pairs)

into one flat buffer, returned as views. Same formulas and NaN rules as the PyTorch form (which stays the CPU path
and the reference); results agree to float32 rounding (the summation orders differ).
Inputs: unit_sum [B, K, D] f32, count [B, K] int32/int64, sq_norm [B, K] f32, adjacent [B] f32, contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .concentration import TRITON_MAX_SEGMENTS as MAX_SEGMENTS  # the Gram tile is [BLOCK_K, BLOCK_K, BLOCK_D]
from .types import AngleConcentration
from .validate import on_first_tensors_device

_TILE = 4096  # elements of that tile (32 per thread at 4 warps)


@triton.jit
def _concentration_kernel(
    unit_sum_ptr, count_ptr, sq_norm_ptr, adjacent_ptr, out_ptr, B, K, D, inter_weight,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program b: the metrics of sequence b. ``out`` holds [intra B*K | inter B*K*K | score B | causal B |
    causal_ref B]."""
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    d = tl.arange(0, BLOCK_D)
    rows = unit_sum_ptr + (b * K + k).to(tl.int64)[:, None] * D
    gram = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_D], dtype=tl.float32)  # (Σ_k S_k)² per column, summed over the column blocks
    for d0 in range(0, D, BLOCK_D):
        s = tl.load(rows + d0 + d[None, :], mask=k_ok[:, None] & (d0 + d < D)[None, :], other=0.0)
        gram += tl.sum(s[:, None, :] * s[None, :, :], axis=2)
        t = tl.sum(s, axis=0)
        total_sq += t * t
    n = tl.load(count_ptr + b * K + k, mask=k_ok, other=0).to(tl.float32)
    q = tl.load(sq_norm_ptr + b * K + k, mask=k_ok, other=0.0)
    eye = k[:, None] == k[None, :]
    self_dot = tl.sum(tl.where(eye, gram, 0.0), axis=1)
    nan = float("nan")  # empty means; their denominators are set to 1 first, so nothing divides by zero
    intra = tl.where(n >= 2, (self_dot - q) / tl.where(n >= 2, n * (n - 1), 1.0), nan)
    pair_n = n[:, None] * n[None, :]
    inter = tl.where(pair_n > 0, gram / tl.where(pair_n > 0, pair_n, 1.0), nan)
    if K >= 2:  # intra(Q) + w * inter(Q, P), Q = K-1, P = K-2
        score = tl.sum(tl.where(k == K - 1, intra, 0.0), axis=0) + inter_weight * tl.sum(
            tl.sum(tl.where((k[:, None] == K - 1) & (k[None, :] == K - 2), inter, 0.0), axis=1), axis=0)
    else:
        score = tl.sum(tl.where(k == 0, intra, 0.0), axis=0)
    n_all = tl.sum(n, axis=0)
    q_all = tl.sum(q, axis=0)
    s2 = tl.sum(total_sq, axis=0)
    causal = tl.where(n_all >= 2, (s2 - q_all) / tl.where(n_all >= 2, n_all * (n_all - 1), 1.0), nan)
    ref_den = tl.where(n_all >= 1, n_all * (n_all + 3) * 0.5 - 1, 1.0)  # pairs i >= j plus the adjacent pairs
    causal_ref = tl.where(n_all >= 1, ((s2 + q_all) * 0.5 + tl.load(adjacent_ptr + b)) / ref_den, nan)
    tl.store(out_ptr + b * K + k, intra, mask=k_ok)
    inter_ptr = out_ptr + B * K + b * K * K
    tl.store(inter_ptr + k[:, None] * K + k[None, :], inter, mask=k_ok[:, None] & k_ok[None, :])
    tail = out_ptr + B * K + B * K * K
    tl.store(tail + b, score)
    tl.store(tail + B + b, causal)
    tl.store(tail + 2 * B + b, causal_ref)


def block_sizes(n_seg: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) of the kernel for K segments (tests/test_triton_compile.py lowers the extremes)."""
    block_k = max(2, triton.next_power_of_2(n_seg))
    return block_k, max(16, _TILE // (block_k * block_k))


@on_first_tensors_device
def concentration_triton(unit_sum: torch.Tensor, count: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor,
                         inter_weight: float) -> AngleConcentration:
    """The metrics in one launch (shapes and dtypes in the module docstring; K <= MAX_SEGMENTS)."""
    batch, n_seg, dim = unit_sum.shape
    if n_seg > MAX_SEGMENTS:
        raise ValueError(f"unit_sum: at most {MAX_SEGMENTS} segments for the Triton form, got {n_seg}")
    out = torch.empty(batch * (n_seg + n_seg * n_seg + 3), dtype=torch.float32, device=unit_sum.device)
    if batch:
        block_k, block_d = block_sizes(n_seg)
        _concentration_kernel[(batch,)](
            unit_sum.contiguous(), count.contiguous(), sq_norm.contiguous(), adjacent.contiguous(), out,
            batch, n_seg, dim, float(inter_weight), BLOCK_K=block_k, BLOCK_D=block_d,
        )
    intra, inter, tail = out.split([batch * n_seg, batch * n_seg * n_seg, 3 * batch])
    score, causal, causal_ref = tail.view(3, batch).unbind(0)
    return AngleConcentration(intra.view(batch, n_seg), inter.view(batch, n_seg, n_seg), score, causal, causal_ref)
