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


def random_ragged(g: torch.Generator, max_seqs: int, max_len: int, max_segments: int,
                  max_trailing: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(cu_seqlens [B+1] int32, seg_offsets [B, K+1] int32, rows) of a random packed batch drawn from ``g``: 1 to
    max_seqs - 1 sequences of 0 to max_len - 1 tokens (empty ones included), K of 1 to max_segments - 1 segments
    with sorted offsets anywhere in [0, len] (tokens before, between and after them), and 0 to max_trailing - 1
    rows in no sequence after the last."""
    n_seq = int(torch.randint(1, max_seqs, (1,), generator=g))
    n_seg = int(torch.randint(1, max_segments, (1,), generator=g))
    lens = torch.randint(0, max_len, (n_seq,), generator=g)
    off = torch.sort(torch.randint(0, max_len + 1, (n_seq, n_seg + 1), generator=g), dim=1).values
    off = torch.minimum(off, lens[:, None]).to(torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    return cu, off, int(cu[-1]) + int(torch.randint(0, max_trailing, (1,), generator=g))
