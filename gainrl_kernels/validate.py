"""Input guards for the angle ops: every failure is a ValueError naming the argument and what was expected.

Metadata checks (rank, dtype, device, shape) are free and always run. Value checks (monotonic ``cu_seqlens``,
segment bounds) read the index tensors; on CUDA that is one host sync, so callers on a hot path pass
``validate=False``. The kernels clamp offsets into range either way, so bad values never read out of bounds.

Shared by ``api.angle_stats`` (:func:`check_hidden`, :func:`check_cu_seqlens`, :func:`check_seg_offsets`), the
Triton ops ``pairwise.angle_pairwise`` and ``rmsnorm_angle.rmsnorm_angle`` (the building blocks below).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Callable, Optional, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` itself if it is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    """float16 / bfloat16 / float32."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16 or float32, got {tensor.dtype}")


def check_feature_dim(name: str, tensor: torch.Tensor) -> None:
    """Last dimension (D) of at least 1."""
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name}: the feature dimension D must be at least 1, got 0")


def check_device(name: str, tensor: torch.Tensor, device: torch.device, owner: str) -> None:
    """``tensor`` lives on ``device``, the device of argument ``owner``."""
    if tensor.device != device:
        raise ValueError(f"{name}: expected device {device} (that of {owner}), got {tensor.device}")


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is on, as Triton reads it (``1`` / ``true`` / ``on``): kernels then run on
    CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels take tensors on ``device``: CUDA, or any device under the Triton interpreter."""
    return device.type == "cuda" or triton_interpreting()


def on_first_tensors_device(fn: _F) -> _F:
    """Run ``fn(x, ...)`` with ``x``'s CUDA device current: Triton launches on the current device (and its
    stream), so a tensor on another GPU than the current one would be read from the wrong device."""

    first = next(iter(inspect.signature(fn).parameters))

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        x = args[0] if args else kwargs.get(first)
        if (isinstance(x, torch.Tensor) and x.is_cuda and x.device.index is not None
                and x.device.index != torch.cuda.current_device()):
            with torch.cuda.device(x.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def check_triton_device(name: str, tensor: torch.Tensor) -> None:
    """A CUDA tensor, or any tensor under the Triton interpreter (``triton_runs_on``)."""
    if not triton_runs_on(tensor.device):
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")


def check_cu_seqlens_meta(cu_seqlens: object, device: torch.device, owner: str = "hidden") -> torch.Tensor:
    """[B+1] int32 on ``device`` (that of ``owner``); returns it."""
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D [B+1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens: expected dtype int32 (flash-attn convention), got {cu_seqlens.dtype}")
    check_device("cu_seqlens", cu_seqlens, device, owner)
    return cu_seqlens


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, limit: Optional[int], what: str = "tokens of hidden") -> None:
    """cu[0] == 0, non-decreasing, cu[-1] <= ``limit`` (the ``limit`` ``what``; None: unknown, not checked)."""
    cu = cu_seqlens.to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(
            f"cu_seqlens: expected non-decreasing values, got {int(cu[i])} then {int(cu[i + 1])} at index {i}"
        )
    if limit is not None and int(cu[-1]) > limit:
        raise ValueError(f"cu_seqlens: last value {int(cu[-1])} is past the {limit} {what}")


def check_seg_offsets_meta(
    seg_offsets: object, batch: int, device: torch.device, owner: str = "hidden"
) -> torch.Tensor:
    """[B, K+1] int32 (K >= 1) on ``device`` (that of ``owner``); returns it."""
    seg_offsets = check_tensor("seg_offsets", seg_offsets)
    if seg_offsets.dim() != 2 or seg_offsets.shape[0] != batch or seg_offsets.shape[1] < 2:
        raise ValueError(
            f"seg_offsets: expected shape [B, K+1] = [{batch}, >=2] (one row per sequence), "
            f"got {tuple(seg_offsets.shape)}"
        )
    if seg_offsets.dtype != torch.int32:
        raise ValueError(f"seg_offsets: expected dtype int32, got {seg_offsets.dtype}")
    check_device("seg_offsets", seg_offsets, device, owner)
    return seg_offsets


def check_seg_offsets_values(seg_offsets: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Every offset in [0, len_b] of its sequence, non-decreasing along each row."""
    if seg_offsets.shape[0] == 0:
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
            f"seg_offsets: expected non-decreasing offsets per sequence, got {int(off[b, k])} then "
            f"{int(off[b, k + 1])} in row {b}"
        )


# --------------------------------------------------------------------------------------------------------------
# per-argument checks of the packed-token ops (api.angle_stats, pairwise.angle_pairwise)
# --------------------------------------------------------------------------------------------------------------
def check_hidden(hidden: torch.Tensor) -> None:
    """[T, D] float16 / bfloat16 / float32 packed tokens, D >= 1."""
    check_tensor("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D [T, D] tensor of packed tokens, got shape {tuple(hidden.shape)}")
    check_float_dtype("hidden", hidden)
    check_feature_dim("hidden", hidden)


def check_cu_seqlens(cu_seqlens: torch.Tensor, hidden: torch.Tensor, values: bool) -> None:
    """[B+1] int32 on hidden's device; with ``values``, also a valid flash-attn prefix sum within hidden's T rows."""
    check_cu_seqlens_meta(cu_seqlens, hidden.device)
    if values:
        check_cu_seqlens_values(cu_seqlens, hidden.shape[0])


def check_seg_offsets(seg_offsets: torch.Tensor, cu_seqlens: torch.Tensor, values: bool) -> None:
    """[B, K+1] int32 on cu_seqlens' (= hidden's) device; with ``values``, offsets within each sequence, sorted."""
    check_seg_offsets_meta(seg_offsets, cu_seqlens.numel() - 1, cu_seqlens.device)
    if values:
        check_seg_offsets_values(seg_offsets, cu_seqlens)


def check_stats_shapes(unit_sum: object, count: object, sq_norm: object, adjacent: object) -> None:
    """The AngleStats fields: tensors unit_sum [B, K, D], count [B, K], sq_norm [B, K], adjacent [B]."""
    fields = dict(unit_sum=unit_sum, count=count, sq_norm=sq_norm, adjacent=adjacent)
    for name, value in fields.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"stats: {name} must be a tensor (the AngleStats returned by angle_stats), got "
                             f"{type(value).__name__}")
    if (unit_sum.dim() != 3 or count.shape != unit_sum.shape[:2] or sq_norm.shape != count.shape
            or adjacent.shape != unit_sum.shape[:1]):
        raise ValueError("stats: inconsistent shapes " + ", ".join(f"{n} {tuple(v.shape)}" for n, v in fields.items())
                         + " (expected [B, K, D], [B, K], [B, K], [B])")


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {backend!r}")
