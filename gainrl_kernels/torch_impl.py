"""Vectorised plain-PyTorch `angle_stats`: the readable specification and the fallback backend.

One pass of index_add over the packed tokens; no Python loop over sequences. Unlike the compiled kernels it
materialises a [T, D] float32 copy of the unit vectors, so it is the slow path kept for clarity and portability.
"""
from __future__ import annotations

import torch

from .types import AngleStats


def token_segments(cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: the flat segment id b*K + k (or B*K when outside every segment), and whether the next
    token is in the same sequence's covered span [o_0, o_K). Returns ([T] int64, [T] bool)."""
    batch, n_seg = seg_offsets.shape[0], seg_offsets.shape[1] - 1
    device = seg_offsets.device
    t = torch.arange(n_tokens, device=device)
    cu = cu_seqlens.long().clamp(0, n_tokens)  # as the kernels clamp unvalidated bounds
    b = torch.searchsorted(cu[1:], t, right=True).clamp_max(max(batch - 1, 0))
    if batch == 0:
        return torch.zeros(n_tokens, dtype=torch.long, device=device), torch.zeros(n_tokens, dtype=torch.bool, device=device)
    rel = t - cu[b]
    off = seg_offsets.long()[b]  # [T, K+1]
    k = (rel.unsqueeze(1) >= off).sum(1) - 1
    inside = (t < cu[-1]) & (k >= 0) & (k < n_seg)
    seg = torch.where(inside, b * n_seg + k, torch.full_like(k, batch * n_seg))
    nxt = rel + 1
    next_inside = inside & (nxt < off[:, -1]) & (t + 1 < cu[b + 1])
    return seg, next_inside


def clamped_counts(cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B, K] int32 tokens per segment, with the kernels' clamping of unvalidated indices (equal to the offsets'
    differences for valid ones): sequence b spans [lo_b, hi_b) = [clamp(cu_b, 0, T), clamp(cu_{b+1}, lo_b, T)),
    and segment k [o_k, o_{k+1}) with o_k = clamp(off_k, 0, len_b), o_{k+1} = clamp(off_{k+1}, o_k, len_b)."""
    cu = cu_seqlens.long()
    lo = cu[:-1].clamp(0, n_tokens)
    length = (torch.maximum(cu[1:], lo).clamp_max(n_tokens) - lo).unsqueeze(1)
    off = seg_offsets.long()
    start = torch.minimum(off[:, :-1].clamp_min(0), length)
    end = torch.minimum(torch.maximum(off[:, 1:], start), length)
    return (end - start).to(torch.int32)


def angle_stats_torch(hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor) -> AngleStats:
    """hidden [T, D] float, cu_seqlens [B+1] int32, seg_offsets [B, K+1] int32 -> AngleStats (float32)."""
    n_tokens, dim = hidden.shape
    batch, n_seg = seg_offsets.shape[0], seg_offsets.shape[1] - 1
    x = hidden.float()
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    seg, next_inside = token_segments(cu_seqlens, seg_offsets, n_tokens)
    unit_sum = torch.zeros(batch * n_seg + 1, dim, dtype=torch.float32, device=hidden.device)
    unit_sum.index_add_(0, seg, u)
    sq = torch.zeros(batch * n_seg + 1, dtype=torch.float32, device=hidden.device)
    sq.index_add_(0, seg, (u * u).sum(1))
    adj_terms = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
    if n_tokens > 1:
        adj_terms[:-1] = torch.where(next_inside[:-1], (u[:-1] * u[1:]).sum(1), 0.0)
    adjacent = torch.zeros(batch * n_seg + 1, dtype=torch.float32, device=hidden.device)
    adjacent.index_add_(0, seg, adj_terms)
    count = clamped_counts(cu_seqlens, seg_offsets, n_tokens)
    return AngleStats(
        unit_sum[:-1].view(batch, n_seg, dim),
        count,
        sq[:-1].view(batch, n_seg),
        adjacent[:-1].view(batch, n_seg).sum(1),
    )
