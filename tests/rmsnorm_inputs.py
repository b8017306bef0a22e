"""Inputs and comparisons shared by the fused RMSNorm + angle tests (the Triton kernels in test_rmsnorm_angle.py,
the CUDA rows kernel in test_rmsnorm_angle_cuda.py)."""
from __future__ import annotations

import torch


def concentrated(shape: tuple[int, ...], dim: int, noise: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Shared direction + noise (mean pairwise cosine ~0.4; no zero rows), float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    return base + noise * torch.randn(*shape, dim, generator=g) + 0.1 * torch.randn(dim, generator=g)


def ulp_tol(dtype: torch.dtype) -> dict:
    """assert_close tolerances of one rounding step of an RMSNorm output in ``dtype``."""
    return {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=0.0),
            torch.float16: dict(rtol=2**-11, atol=0.0)}[dtype]


def assert_stats_close(stats, ref, atol: float = 2e-5) -> None:
    """Kernel statistics (fp32, any device) against a float64 reference (``angle_stats_reference``): counts exact,
    the rest within fp32 accumulation error."""
    torch.testing.assert_close(stats.count.cpu(), ref.count, rtol=0, atol=0)
    for name in ("unit_sum", "sq_norm", "adjacent"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), getattr(ref, name), rtol=1e-5, atol=atol, msg=name)
