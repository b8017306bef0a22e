"""Readable float64 references that build explicit cosine matrices, one sequence at a time.

For tests and benchmarks only: O(L^2 D) time and an L x L matrix per sequence. Never on a product path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit64(hidden: torch.Tensor) -> torch.Tensor:
    return F.normalize(hidden.to(torch.float64), dim=-1, eps=1e-12)


def naive_angle_metrics(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor | None = None, inter_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Every DESIGN.md §1 metric from explicit float64 cosine matrices.

    hidden [T, D] any float dtype; cu_seqlens [B+1]; seg_offsets [B, K+1] (default whole sequences).
    Returns float64 tensors: intra [B, K], inter [B, K, K], score [B], causal [B], causal_ref [B],
    plus the statistics unit_sum [B, K, D], count [B, K], sq_norm [B, K], adjacent [B].
    """
    cu = [int(v) for v in cu_seqlens.tolist()]
    batch = len(cu) - 1
    if seg_offsets is None:
        offs = [[0, cu[b + 1] - cu[b]] for b in range(batch)]
    else:
        offs = [[int(v) for v in row] for row in seg_offsets.tolist()]
    n_seg = len(offs[0]) - 1 if batch else 1
    dim = hidden.shape[1]
    nan = math.nan
    out = {
        "intra": torch.full((batch, n_seg), nan, dtype=torch.float64),
        "inter": torch.full((batch, n_seg, n_seg), nan, dtype=torch.float64),
        "score": torch.full((batch,), nan, dtype=torch.float64),
        "causal": torch.full((batch,), nan, dtype=torch.float64),
        "causal_ref": torch.full((batch,), nan, dtype=torch.float64),
        "unit_sum": torch.zeros(batch, n_seg, dim, dtype=torch.float64),
        "count": torch.zeros(batch, n_seg, dtype=torch.int64),
        "sq_norm": torch.zeros(batch, n_seg, dtype=torch.float64),
        "adjacent": torch.zeros(batch, dtype=torch.float64),
    }
    for b in range(batch):
        o = offs[b]
        u = _unit64(hidden[cu[b] + o[0] : cu[b] + o[-1]])  # covered span, [n, D]
        cos = u @ u.T
        n = cos.shape[0]
        seg = torch.zeros(n, dtype=torch.int64)
        for k in range(n_seg):
            seg[o[k] - o[0] : o[k + 1] - o[0]] = k
        for k in range(n_seg):
            ik = seg == k
            nk = int(ik.sum())
            out["count"][b, k] = nk
            out["unit_sum"][b, k] = u[ik].sum(0)
            out["sq_norm"][b, k] = (u[ik] * u[ik]).sum()
            block = cos[ik][:, ik]
            if nk >= 2:
                off_diag = ~torch.eye(nk, dtype=torch.bool)
                out["intra"][b, k] = block[off_diag].mean()
            for l in range(n_seg):
                il = seg == l
                if nk and int(il.sum()):
                    out["inter"][b, k, l] = cos[ik][:, il].mean()
        if n >= 2:
            out["causal"][b] = cos[torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)].mean()
            out["adjacent"][b] = torch.diagonal(cos, offset=1).sum()
        if n >= 1:
            mask = torch.tril(torch.ones(n, n, dtype=torch.float64), diagonal=1)
            out["causal_ref"][b] = (cos * mask).sum() / torch.count_nonzero(mask)
        q, p = n_seg - 1, n_seg - 2
        out["score"][b] = out["intra"][b, q] + inter_weight * out["inter"][b, q, p] if n_seg >= 2 else out["intra"][b, 0]
    return out


def released_causal_angle(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> list[float]:
    """The released GAIN-RL trainers' way: per sequence, normalise, build u @ u.T, mask with tril(diagonal=1),
    take the count_nonzero mean and sync it to the host. Kept as the benchmark baseline (works in hidden's dtype)."""
    values = []
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        h = hidden[cu[b] : cu[b + 1]]
        u = F.normalize(h, dim=-1)
        cos = u @ u.T
        mask = torch.tril(torch.ones_like(cos), diagonal=1)
        values.append(((cos * mask).sum() / torch.count_nonzero(mask)).item())
    return values
