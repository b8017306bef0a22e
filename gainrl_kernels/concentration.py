"""Angle-concentration metrics as exact functions of the segment statistics (DESIGN.md §1). O(B K^2 D)."""
from __future__ import annotations

import math

import torch

from .types import AngleConcentration


def concentration_from_stats(
    unit_sum: torch.Tensor, count: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor, inter_weight: float
) -> AngleConcentration:
    """unit_sum [B, K, D] f32, count [B, K] int, sq_norm [B, K] f32, adjacent [B] f32 -> AngleConcentration (f32)."""
    n_seg = unit_sum.shape[1]
    nan = torch.tensor(math.nan, dtype=torch.float32, device=unit_sum.device)
    n = count.to(torch.float32)
    gram = torch.bmm(unit_sum, unit_sum.transpose(1, 2))  # [B, K, K]: S_k . S_l
    self_dot = torch.diagonal(gram, dim1=1, dim2=2)
    intra = torch.where(count >= 2, (self_dot - sq_norm) / (n * (n - 1)).clamp_min(1.0), nan)
    pair_n = n.unsqueeze(2) * n.unsqueeze(1)
    inter = torch.where(pair_n > 0, gram / pair_n.clamp_min(1.0), nan)
    if n_seg >= 2:
        score = intra[:, -1] + inter_weight * inter[:, -1, -2]
    else:
        score = intra[:, 0]
    total = unit_sum.sum(1)
    n_all = n.sum(1)
    q_all = sq_norm.sum(1)
    s2 = (total * total).sum(1)
    causal = torch.where(n_all >= 2, (s2 - q_all) / (n_all * (n_all - 1)).clamp_min(1.0), nan)
    ref_den = n_all * (n_all + 1) / 2 + n_all - 1
    causal_ref = torch.where(n_all >= 1, ((s2 + q_all) / 2 + adjacent) / ref_den.clamp_min(1.0), nan)
    return AngleConcentration(intra, inter, score, causal, causal_ref)
