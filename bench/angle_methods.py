"""The ways of computing the angle signal that the benchmarks compare. Each takes (hidden, cu_seqlens) and
returns per-sequence causal concentration (a tensor or a list of floats)."""
from __future__ import annotations

from typing import Callable

import torch

from gainrl_kernels import angle_concentration, angle_stats, whole_sequence_offsets
from gainrl_kernels.concentration import concentration_from_stats
from gainrl_kernels.naive import released_causal_angle
from gainrl_kernels.torch_impl import angle_stats_torch


def released(hidden: torch.Tensor, cu: torch.Tensor) -> list[float]:
    """Released GAIN-RL code: per sequence F.normalize, u @ u.T, tril(diagonal=1) mask, count_nonzero mean, .item()."""
    return released_causal_angle(hidden, cu)


def torch_vectorised(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """O(L·d) plain PyTorch (index_add over segment ids; materialises [T, D] float32 unit vectors)."""
    s = angle_stats_torch(hidden, cu, whole_sequence_offsets(cu))
    return concentration_from_stats(*s, 1.0).causal_ref


def torch_lean(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """The same metric in the fewest plain PyTorch ops (whole packed sequences, ``cu[-1] == T``): one fp32 norm per
    row, one [T, D] fp32 pass for the unit vectors, ``segment_reduce`` per sequence, the adjacent pairs as one
    batched dot. The fairest eager PyTorch baseline (``torch_vectorised`` is the general K-segment reference)."""
    total = hidden.shape[0]
    cu64 = cu.long()
    lengths = cu64[1:] - cu64[:-1]
    norm = torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32)
    inv = 1.0 / norm.clamp_min(1e-12)
    u = hidden * inv[:, None]
    s = torch.segment_reduce(u, "sum", lengths=lengths, axis=0)  # [B, D]
    q = torch.segment_reduce((norm * inv).square(), "sum", lengths=lengths)  # Σ ||u||² (0 for zero rows)
    opens = torch.zeros(total + 1, dtype=torch.bool, device=hidden.device)
    opens[cu64[1:-1]] = True  # token t opens a sequence b >= 1: the pair (t - 1, t) crosses a boundary
    pair = torch.einsum("td,td->t", u[:-1], u[1:])
    pair = torch.where(opens[1:total], 0.0, pair)
    a = torch.segment_reduce(torch.cat([pair.new_zeros(1), pair]), "sum", lengths=lengths)
    n = lengths.to(torch.float32)
    value = (((s * s).sum(1) + q) * 0.5 + a) / (n * (n + 3) * 0.5 - 1)
    return torch.where(n >= 1, value, torch.full_like(value, float("nan")))


# One static graph per benchmarked shape: lift dynamo's default limit of 8 recompilations, past which it would
# silently fall back to eager PyTorch for the rest of a grid.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
_compiled = torch.compile(torch_vectorised, dynamic=False)


def torch_compiled(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """torch.compile of :func:`torch_vectorised`."""
    return _compiled(hidden, cu)


_compiled_lean = torch.compile(torch_lean, dynamic=False)


def torch_lean_compiled(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """torch.compile of :func:`torch_lean`."""
    return _compiled_lean(hidden, cu)


def ours(backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return angle_concentration(angle_stats(hidden, cu, backend=backend, validate_values=False)).causal_ref

    run.__name__ = f"gainrl_{backend}"
    return run


def methods(device: str) -> dict[str, Callable]:
    out = {"released": released, "torch_vectorised": torch_vectorised, "torch_compile": torch_compiled,
           "torch_lean": torch_lean, "torch_lean_compile": torch_lean_compiled}
    if device == "cuda":
        out["gainrl_triton"] = ours("triton")
        from gainrl_kernels.extension import has_ext_kernel

        if has_ext_kernel("cuda"):
            out["gainrl_cuda"] = ours("cuda")
    else:
        out["gainrl_cpp"] = ours("torch")
    return out
