"""Result containers of the angle ops (see DESIGN.md §3)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class AngleStats(NamedTuple):
    """Per (sequence, segment) statistics of unit vectors u_t = h_t / max(||h_t||, 1e-12).

    unit_sum  [B, K, D] float32  S_k = sum of u_t over segment k
    count     [B, K]    int32    n_k = tokens in segment k (zero rows included)
    sq_norm   [B, K]    float32  q_k = sum of ||u_t||^2 (= n_k minus the zero rows)
    adjacent  [B]       float32  a_b = sum of u_t . u_{t+1} over consecutive tokens inside [o_0, o_K)
    """

    unit_sum: torch.Tensor
    count: torch.Tensor
    sq_norm: torch.Tensor
    adjacent: torch.Tensor


class AngleConcentration(NamedTuple):
    """Angle-concentration metrics derived from :class:`AngleStats` (all float32).

    intra       [B, K]     mean cos over distinct pairs inside segment k (NaN when n_k < 2)
    inter       [B, K, K]  mean cos over pairs across segments k and l (NaN when a count is 0)
    score       [B]        intra(Q) + w * inter(Q, P), Q = K-1, P = K-2 (intra(0) when K == 1)
    causal      [B]        mean cos over pairs j < i in the covered span (NaN when n < 2)
    causal_ref  [B]        the released trainers' tril(diagonal=1) masked mean (NaN when n == 0)
    """

    intra: torch.Tensor
    inter: torch.Tensor
    score: torch.Tensor
    causal: torch.Tensor
    causal_ref: torch.Tensor
