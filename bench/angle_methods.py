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


# One static graph per benchmarked shape: lift dynamo's default limit of 8 recompilations, past which it would
# silently fall back to eager PyTorch for the rest of a grid.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
_compiled = torch.compile(torch_vectorised, dynamic=False)


def torch_compiled(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """torch.compile of :func:`torch_vectorised`."""
    return _compiled(hidden, cu)


def ours(backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return angle_concentration(angle_stats(hidden, cu, backend=backend, validate_values=False)).causal_ref

    run.__name__ = f"gainrl_{backend}"
    return run


def methods(device: str) -> dict[str, Callable]:
    out = {"released": released, "torch_vectorised": torch_vectorised, "torch_compile": torch_compiled}
    if device == "cuda":
        out["gainrl_triton"] = ours("triton")
        from gainrl_kernels.extension import has_ext_kernel

        if has_ext_kernel("cuda"):
            out["gainrl_cuda"] = ours("cuda")
    else:
        out["gainrl_cpp"] = ours("torch")
    return out
