"""Plain-PyTorch references for :mod:`gainrl_kernels.rmsnorm_angle` (tests only; small inputs).

``rmsnorm_reference`` is the HF ``LlamaRMSNorm`` forward with the output dtype rule of ``rmsnorm_angle``
(always ``x.dtype``); it is differentiable, so autograd of it is the gradient reference (and in float64 it is what
``torch.autograd.gradcheck`` checks). ``angle_stats_reference`` computes the statistics of DESIGN.md §1 in
float64 from explicit per-sequence cosine matrices ``C = U Uᵀ`` (L x L: references only): ``q_k`` and the
adjacent term are read off C's diagonal and first sub-diagonal, ``S_k`` is the direct sum of unit vectors.
``cosine_block_sums`` gives ``Σ_{i∈k, j∈l} C_ij`` so tests can check ``S_k · S_l`` against the explicit matrix.
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import AngleStats

__all__ = ["rmsnorm_reference", "angle_stats_reference", "cosine_block_sums", "packed_rows"]


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(weight.float() * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype).float()).to(x.dtype)``.

    For float64 inputs everything stays float64 (gradcheck).
    """
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(acc) * h.to(dtype).to(acc)).to(dtype)


def packed_rows(y: torch.Tensor, token_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The packed ``[T, D]`` rows of ``y`` ([T, D] or [N, L, D]) in token order."""
    flat = y.reshape(-1, y.shape[-1])
    return flat if token_index is None else flat[token_index.long()]


def _ranges(cu: list[int], off: Optional[list[list[int]]], b: int) -> list[tuple[int, int]]:
    length = cu[b + 1] - cu[b]
    row = [0, length] if off is None else [min(max(v, 0), length) for v in off[b]]
    return [(row[k], row[k + 1]) for k in range(len(row) - 1)]


def angle_stats_reference(
    y: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    token_index: Optional[torch.Tensor] = None,
) -> AngleStats:
    """Float64 statistics of ``y`` (unit_sum, sq_norm, adjacent float64; count int32), on the CPU."""
    rows = packed_rows(y, token_index).cpu().to(torch.float64)
    cu = cu_seqlens.cpu().tolist()
    off = None if seg_offsets is None else seg_offsets.cpu().tolist()
    batch = len(cu) - 1
    nseg = 1 if off is None else seg_offsets.shape[1] - 1
    dim = y.shape[-1]
    unit_sum = torch.zeros(batch, nseg, dim, dtype=torch.float64)
    sq_norm = torch.zeros(batch, nseg, dtype=torch.float64)
    count = torch.zeros(batch, nseg, dtype=torch.int32)
    adjacent = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        u = torch.nn.functional.normalize(rows[cu[b] : cu[b + 1]], dim=-1, eps=1e-12)
        cos = u @ u.T  # explicit L x L cosine matrix
        ranges = _ranges(cu, off, b)
        for k, (s, e) in enumerate(ranges):
            unit_sum[b, k] = u[s:e].sum(0)
            sq_norm[b, k] = torch.diagonal(cos)[s:e].sum()
            count[b, k] = e - s
        lo, hi = ranges[0][0], ranges[-1][1]
        if hi - lo >= 2:
            adjacent[b] = torch.diagonal(cos, offset=1)[lo : hi - 1].sum()
    return AngleStats(unit_sum, count, sq_norm, adjacent)


def cosine_block_sums(
    y: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    token_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B, K, K]`` float64: sum of the explicit cosine matrix over the block (segment k rows, segment l cols)."""
    rows = packed_rows(y, token_index).cpu().to(torch.float64)
    cu = cu_seqlens.cpu().tolist()
    off = None if seg_offsets is None else seg_offsets.cpu().tolist()
    batch = len(cu) - 1
    nseg = 1 if off is None else seg_offsets.shape[1] - 1
    out = torch.zeros(batch, nseg, nseg, dtype=torch.float64)
    for b in range(batch):
        u = torch.nn.functional.normalize(rows[cu[b] : cu[b + 1]], dim=-1, eps=1e-12)
        cos = u @ u.T
        ranges = _ranges(cu, off, b)
        for k, (ks, ke) in enumerate(ranges):
            for l, (ls, le) in enumerate(ranges):
                out[b, k, l] = cos[ks:ke, ls:le].sum()
    return out
