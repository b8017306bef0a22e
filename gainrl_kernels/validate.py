"""Input guards for the angle ops: every failure is a ValueError naming the argument.

Metadata checks (rank, dtype, device, shape) are free and always run. Value checks (monotonic ``cu_seqlens``,
segment bounds) read the index tensors; on CUDA that is one host sync, so callers on a hot path pass
``validate=False``. The kernels clamp offsets into range either way, so bad values never read out of bounds.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_hidden(hidden: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D [T, D] tensor of packed tokens, got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: expected dtype float16, bfloat16 or float32, got {hidden.dtype}")
    if hidden.shape[1] == 0:
        raise ValueError("hidden: the feature dimension D must be at least 1, got 0")


def check_cu_seqlens(cu_seqlens: torch.Tensor, hidden: torch.Tensor, values: bool) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D [B+1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens: expected dtype int32 (flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens: expected device {hidden.device} (that of hidden), got {cu_seqlens.device}")
    if not values:
        return
    cu = cu_seqlens.to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"cu_seqlens: expected non-decreasing values, got {int(cu[i])} then {int(cu[i + 1])} at index {i}")
    if int(cu[-1]) > hidden.shape[0]:
        raise ValueError(f"cu_seqlens: last value {int(cu[-1])} is past the {hidden.shape[0]} tokens of hidden")


def check_seg_offsets(seg_offsets: torch.Tensor, cu_seqlens: torch.Tensor, values: bool) -> None:
    batch = cu_seqlens.numel() - 1
    if not isinstance(seg_offsets, torch.Tensor):
        raise ValueError(f"seg_offsets: expected a torch.Tensor, got {type(seg_offsets).__name__}")
    if seg_offsets.dim() != 2 or seg_offsets.shape[0] != batch or seg_offsets.shape[1] < 2:
        raise ValueError(
            f"seg_offsets: expected shape [B, K+1] = [{batch}, >=2] (one row per sequence), got {tuple(seg_offsets.shape)}"
        )
    if seg_offsets.dtype != torch.int32:
        raise ValueError(f"seg_offsets: expected dtype int32, got {seg_offsets.dtype}")
    if seg_offsets.device != cu_seqlens.device:
        raise ValueError(f"seg_offsets: expected device {cu_seqlens.device} (that of hidden), got {seg_offsets.device}")
    if not values or batch == 0:
        return
    off = seg_offsets.to("cpu", torch.int64)
    cu = cu_seqlens.to("cpu", torch.int64)
    lens = (cu[1:] - cu[:-1]).unsqueeze(1)
    bad = (off < 0) | (off > lens)
    if bool(bad.any()):
        b, k = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"seg_offsets: offset {int(off[b, k])} at [{b}, {k}] is outside sequence {b} of length {int(lens[b, 0])}"
        )
    dec = off[:, 1:] < off[:, :-1]
    if bool(dec.any()):
        b, k = (int(v) for v in torch.nonzero(dec)[0])
        raise ValueError(
            f"seg_offsets: expected non-decreasing offsets per sequence, got {int(off[b, k])} then {int(off[b, k + 1])} in row {b}"
        )


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {backend!r}")
