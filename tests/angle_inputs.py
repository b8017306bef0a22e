"""Random packed batches for the angle-op tests: ragged, with empty and length-1 sequences, never all zeros."""
from __future__ import annotations

import torch


def packed_batch(
    lens: list[int], dim: int, dtype: torch.dtype = torch.float32, n_seg: int = 2, pad: int = 3, seed: int = 0,
    device: str = "cpu", zero_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, D] (a shared direction plus noise, random row scales, so mean cosines sit well away from 0),
    cu_seqlens [B+1] int32 and seg_offsets [B, n_seg+1] int32 with random cut points, tokens left outside the
    segments at both ends, and ``pad`` trailing tokens that belong to no sequence."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    n_tokens = int(cu[-1]) + pad
    base = torch.randn(dim, generator=g)
    scale = 0.5 + 3 * torch.rand(n_tokens, 1, generator=g)
    hidden = (base + torch.randn(n_tokens, dim, generator=g) * (0.3 + 1.5 * torch.rand(n_tokens, 1, generator=g))) * scale
    for i in torch.randint(0, max(n_tokens, 1), (zero_rows,), generator=g).tolist():
        if n_tokens:
            hidden[i] = 0
    offsets = []
    for n in lens:
        cuts = sorted(torch.randint(0, n + 1, (n_seg + 1,), generator=g).tolist()) if n else [0] * (n_seg + 1)
        if n >= 4:  # mostly cover the sequence so segments have pairs
            cuts[0], cuts[-1] = min(cuts[0], 1), max(cuts[-1], n - 1)
        offsets.append(cuts)
    seg = torch.tensor(offsets, dtype=torch.int32).reshape(len(lens), n_seg + 1)
    return hidden.to(dtype).to(device), cu.to(device), seg.to(device)
