"""Public functional API (DESIGN.md §3): validated wrappers around the ``torch.ops.gainrl`` custom ops."""
from __future__ import annotations

import torch

from . import ops, validate
from .concentration import concentration_from_stats
from .types import AngleConcentration, AngleStats


def whole_sequence_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B+1] int32 cu_seqlens -> [B, 2] int32 offsets [[0, len_b]] (one segment per sequence), on device."""
    if cu_seqlens.numel() < 2:  # no sequences
        return cu_seqlens.new_zeros(0, 2)
    return cu_seqlens.unfold(0, 2, 1) - cu_seqlens[:-1, None]  # rows (cu[b], cu[b+1]) - cu[b]: one kernel


def angle_stats(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_offsets: torch.Tensor | None = None,
    backend: str = "auto",
    validate_values: bool = True,
) -> AngleStats:
    """Per (sequence, segment) statistics of the unit vectors of ``hidden`` in one pass.

    hidden       [T, D] float16 / bfloat16 / float32, packed tokens of B sequences, any strides
    cu_seqlens   [B+1] int32, cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] <= T
    seg_offsets  [B, K+1] int32 offsets relative to each sequence start (default [[0, len_b]], K = 1)
    backend      "auto" | "triton" | "cuda" | "torch" (see ``gainrl_kernels.ops``)
    validate_values  check cu_seqlens / seg_offsets values (one host sync on CUDA; skipped under torch.compile).
                 With False, out-of-range values are clamped into range by the kernels, never read out of bounds.
    Returns AngleStats(unit_sum [B,K,D] f32, count [B,K] i32, sq_norm [B,K] f32, adjacent [B] f32).
    NaN or Inf in a token makes the statistics of its segment (and its sequence's adjacent term) NaN, so every
    metric that uses them is NaN: never a plausible number. Not differentiable (hidden is detached).
    """
    validate.check_hidden(hidden)
    validate.check_backend(backend, ops.BACKENDS)
    values = validate_values and not torch.compiler.is_compiling()
    validate.check_cu_seqlens(cu_seqlens, hidden, values)
    if seg_offsets is None:
        seg_offsets = whole_sequence_offsets(cu_seqlens)
    validate.check_seg_offsets(seg_offsets, cu_seqlens, values)
    if not torch.compiler.is_compiling():  # eager: the op's body (it checks the backend) without the dispatch
        return AngleStats(*ops.angle_stats_impl(hidden.detach(), cu_seqlens, seg_offsets, backend))
    problem = ops.backend_problem(backend, hidden.device, hidden)
    if problem:  # at trace time, not inside the compiled graph
        raise ValueError(problem)
    return AngleStats(*torch.ops.gainrl.angle_stats(hidden.detach(), cu_seqlens, seg_offsets, backend))


def angle_concentration(stats: AngleStats, inter_weight: float = 1.0) -> AngleConcentration:
    """Metrics of DESIGN.md §1 from :func:`angle_stats` output: intra [B,K], inter [B,K,K], score [B],
    causal [B], causal_ref [B] (float32; NaN where a mean has no pairs)."""
    if not isinstance(stats, tuple) or len(stats) != 4:
        raise ValueError("stats: expected the AngleStats returned by angle_stats")
    unit_sum, count, sq_norm, adjacent = stats
    validate.check_stats_shapes(unit_sum, count, sq_norm, adjacent)
    if not torch.compiler.is_compiling():  # eager: the same function without the custom-op dispatch
        return concentration_from_stats(unit_sum, count, sq_norm, adjacent, float(inter_weight))
    out = torch.ops.gainrl.angle_concentration(unit_sum, count, sq_norm, adjacent, float(inter_weight))
    return AngleConcentration(*out)
