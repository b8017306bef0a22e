"""Float64 references for :func:`gainrl_kernels.pairwise.angle_pairwise` (tests and cross-checks only).

``angle_pairwise_naive`` builds the explicit ``L x L`` cosine matrix of every sequence, which is exactly what the
Triton kernel avoids; use it on small inputs only. ``segment_unit_sums`` + ``pairwise_from_segment_sums`` are the
O(L·D) path: for ``fn="cos"`` and no window the causal pair sums follow from the per-segment unit-vector sums
``S_k`` and ``q_k = Σ ||u_t||²`` (DESIGN.md §1):

    out[b, k, l] = S_k · S_l              k > l   (every token of k comes after every token of l)
                 = (||S_k||² − q_k) / 2   k == l  (unordered distinct pairs inside k)
                 = 0                      k < l   (no pair j < i with i in k and j in l)

Unit vectors follow ``F.normalize``: ``u_t = h_t / max(||h_t||, 1e-12)`` (a zero row stays zero).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["angle_pairwise_naive", "segment_unit_sums", "pairwise_from_segment_sums", "default_seg_offsets"]

_EPS = 1e-12


def default_seg_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[[0, len_b]]`` per sequence (K = 1), int32 on the device of ``cu_seqlens``."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
    return torch.stack([torch.zeros_like(lens), lens], dim=1)


def _unit64(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(h.to(torch.float64), dim=-1, eps=_EPS)


def _segment_ranges(off_row: list[int], length: int) -> list[tuple[int, int]]:
    o = [min(max(v, 0), length) for v in off_row]
    return [(o[k], o[k + 1]) for k in range(len(o) - 1)]


def angle_pairwise_naive(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    fn: str = "cos",
    window: Optional[int] = None,
) -> torch.Tensor:
    """Explicit-cosine-matrix reference of ``angle_pairwise``; returns ``[B, K, K]`` float64 on the CPU."""
    if seg_offsets is None:
        seg_offsets = default_seg_offsets(cu_seqlens)
    f = {"cos": lambda c: c, "abs": torch.abs, "square": torch.square}[fn]
    cu = cu_seqlens.cpu().tolist()
    off = seg_offsets.cpu().tolist()
    batch, nseg = len(cu) - 1, len(off[0]) - 1 if off else 1
    out = torch.zeros(batch, nseg, nseg, dtype=torch.float64)
    for b in range(batch):
        length = cu[b + 1] - cu[b]
        if length <= 0:
            continue
        u = _unit64(hidden[cu[b] : cu[b + 1]].cpu())
        cos = u @ u.T  # [L, L] -- references only
        i = torch.arange(length).unsqueeze(1)
        j = torch.arange(length).unsqueeze(0)
        causal = j < i
        if window is not None:
            causal &= (i - j) <= window
        vals = torch.where(causal, f(cos), torch.zeros((), dtype=torch.float64))
        ranges = _segment_ranges(off[b], length)
        for k, (ks, ke) in enumerate(ranges):
            for l, (ls, le) in enumerate(ranges):
                out[b, k, l] = vals[ks:ke, ls:le].sum()
    return out


def segment_unit_sums(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O(T·D) per-segment sums: ``unit_sum [B, K, D]`` and ``sq_norm [B, K]`` in ``dtype`` (device of ``hidden``).

    Vectorised (no Python loop over sequences): every token gets a flat (sequence, segment) slot, or none.
    """
    if seg_offsets is None:
        seg_offsets = default_seg_offsets(cu_seqlens)
    dev = hidden.device
    batch = cu_seqlens.numel() - 1
    nseg = seg_offsets.shape[1] - 1
    dim = hidden.shape[1]
    cu = cu_seqlens.to(dev, torch.int64)
    lens = (cu[1:] - cu[:-1]).clamp_min(0)
    off = torch.minimum(seg_offsets.to(dev, torch.int64).clamp_min(0), lens.unsqueeze(1))
    t = torch.arange(hidden.shape[0], device=dev)
    seq = torch.searchsorted(cu[1:], t, right=True)  # sequence of token t (== batch when past the end)
    inside = seq < batch
    seq_c = seq.clamp(max=max(batch - 1, 0))
    pos = t - cu[seq_c] if batch > 0 else t
    cnt = (pos.unsqueeze(1) >= off[seq_c]).sum(1) if batch > 0 else torch.zeros_like(t)
    seg = cnt - 1
    valid = inside & (cnt >= 1) & (cnt <= nseg)
    slot = torch.where(valid, seq_c * nseg + seg, torch.full_like(t, batch * nseg))  # dump slot at the end
    u = torch.nn.functional.normalize(hidden.to(dtype), dim=-1, eps=_EPS)
    sums = torch.zeros(batch * nseg + 1, dim, dtype=dtype, device=dev).index_add_(0, slot, u)
    sq = torch.zeros(batch * nseg + 1, dtype=dtype, device=dev).index_add_(0, slot, (u * u).sum(1))
    return sums[:-1].view(batch, nseg, dim), sq[:-1].view(batch, nseg)


def pairwise_from_segment_sums(unit_sum: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` causal pair sums of cosines (fn="cos", no window) from segment sums, in their dtype.

    ``unit_sum [B, K, D]``, ``sq_norm [B, K]``: see the module docstring for the formula.
    """
    gram = unit_sum @ unit_sum.transpose(1, 2)  # [B, K, K]: S_k · S_l
    diag = (torch.diagonal(gram, dim1=1, dim2=2) - sq_norm) / 2
    out = torch.tril(gram, diagonal=-1)
    return out + torch.diag_embed(diag)
