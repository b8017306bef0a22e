"""Loads the compiled extension ``gainrl_kernels._C`` (C++ CPU kernel, CUDA kernels when built with CUDA).

The package works without it: CPU calls then fall back to the plain-PyTorch implementation, with one warning.
"""
from __future__ import annotations

import functools
import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.gainrl.angle_stats_ext)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built: pure-Python install, or a torch ABI mismatch
    EXTENSION_ERROR = str(exc)

_warned = False


@functools.cache  # the registrations are fixed once _C is imported: one dispatcher query, not one per call
def has_ext_kernel(device_type: str, op: str = "angle_stats_ext") -> bool:
    """Whether the compiled extension has a ``device_type`` ("cpu" or "cuda") kernel for ``torch.ops.gainrl.<op>``:
    ``angle_stats_ext`` (C++ on CPU, CUDA when built with CUDA), ``rmsnorm_angle_rows_ext`` /
    ``rmsnorm_angle_spans_ext`` (the CUDA rows kernel of the fused RMSNorm + angle forward, with and without the work
    list; CUDA builds only, the ops are not even defined otherwise)."""
    if EXTENSION_ERROR is not None or not hasattr(torch.ops.gainrl, op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gainrl::{op}", key)


def warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "gainrl_kernels: the compiled extension gainrl_kernels._C is not available "
            f"({EXTENSION_ERROR}); CPU angle_stats uses the slower PyTorch fallback. "
            "Build it with `pip install --no-build-isolation -e .` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )
