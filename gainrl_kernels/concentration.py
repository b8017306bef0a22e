"""Angle-concentration metrics as exact functions of the segment statistics (DESIGN.md §1). O(B K^2 D)."""
from __future__ import annotations

import math

import torch

from .types import AngleConcentration

TRITON_MAX_SEGMENTS = 16  # triton_concentration's Gram tile limit; more segments take the PyTorch form


def concentration_from_stats(
    unit_sum: torch.Tensor, count: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor, inter_weight: float
) -> AngleConcentration:
    """unit_sum [B, K, D] f32, count [B, K] int, sq_norm [B, K] f32, adjacent [B] f32 -> AngleConcentration (f32).

    CUDA tensors with 1 to 16 segments: one Triton launch (``triton_concentration``). Otherwise PyTorch, written
    for few kernel launches: means are plain quotients whose empty cases (0/0, x/0) are replaced by NaN with one
    ``where`` each."""
    if unit_sum.is_cuda and 1 <= unit_sum.shape[1] <= TRITON_MAX_SEGMENTS:
        # one launch instead of ~40 small ops (the eager cost of a short batch); float32 whatever autocast says
        from .triton_concentration import concentration_triton  # deferred: importing triton costs ~1 s

        return concentration_triton(unit_sum.float(), count, sq_norm.float(), adjacent.float(), inter_weight)
    # Probes call this inside the model's forward, often under autocast, which would run bmm in bf16 (seen: C_causal
    # off by 5e-3 in a TRL loss forward): the metric is always computed in float32.
    with torch.autocast(unit_sum.device.type, enabled=False):
        return _concentration(unit_sum.float(), count, sq_norm.float(), adjacent.float(), inter_weight)


def _concentration(unit_sum: torch.Tensor, count: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor,
                   inter_weight: float) -> AngleConcentration:
    nan = math.nan
    n = count.to(torch.float32)
    gram = torch.bmm(unit_sum, unit_sum.transpose(1, 2))  # [B, K, K]: S_k . S_l
    # the self terms feed differences that cancel (||S||² - Σ||u||²): elementwise, fp32, whatever the matmul does
    self_dot = (unit_sum * unit_sum).sum(-1)
    intra = torch.where(count >= 2, (self_dot - sq_norm) / (n * (n - 1)), nan)
    pair_n = n.unsqueeze(2) * n.unsqueeze(1)
    inter = torch.where(pair_n > 0, gram / pair_n, nan)
    if unit_sum.shape[1] >= 2:
        score = intra[:, -1] + inter_weight * inter[:, -1, -2]
    else:
        score = intra[:, 0]
    n_all = n.sum(1)
    q_all = sq_norm.sum(1)
    total = unit_sum.sum(1)
    s2 = (total * total).sum(1)  # ||Σ_k S_k||²
    causal = torch.where(n_all >= 2, (s2 - q_all) / (n_all * (n_all - 1)), nan)
    # causal pairs i >= j plus the adjacent pairs: n(n+1)/2 + n - 1
    ref_den = n_all * (n_all + 3) * 0.5 - 1
    causal_ref = torch.where(n_all >= 1, ((s2 + q_all) * 0.5 + adjacent) / ref_den, nan)
    return AngleConcentration(intra, inter, score, causal, causal_ref)
