"""torch.library registration: ``torch.ops.gainrl.angle_stats`` and ``torch.ops.gainrl.angle_concentration``.

Both are custom ops with CPU, CUDA and fake (meta) implementations, so they trace under ``torch.compile``
(fullgraph) and capture in CUDA graphs. The backend string picks the kernel:
  auto   -> CUDA tensors: the CUDA extension when built (faster than Triton at every measured shape: 1.6-4x on
            an H200, bench/results/kernels_cuda_h200.json), else Triton (D > 8192: PyTorch);
            CPU tensors: the compiled C++ kernel (PyTorch fallback if not built)
  triton -> the Triton kernel (CPU tensors only under TRITON_INTERPRET=1)
  cuda   -> the hand-written CUDA kernel of the extension (CUDA tensors, extension built with CUDA)
  torch  -> CPU: the compiled C++ kernel (PyTorch fallback if not built); CUDA: the vectorised PyTorch version
"""
from __future__ import annotations

import torch

from . import extension
from .concentration import concentration_from_stats
from .torch_impl import angle_stats_torch
from .validate import (
    check_backend,
    check_cu_seqlens,
    check_hidden,
    check_seg_offsets,
    check_stats_shapes,
    triton_runs_on,
)

MAX_TRITON_DIM = 8192  # triton_angle.MAX_DIM, without importing triton here
BACKENDS = ("auto", "triton", "cuda", "torch")


def _triton_usable(device: torch.device) -> bool:
    return triton_runs_on(device)


MAX_CUDA_DIM = 8192  # the CUDA kernel's row width for any layout (csrc/angle_stats_launch.h, max_supported_dim)
MAX_CUDA_DIM_VECTOR = 16384  # ... when rows can be read 16 bytes at a time (D a multiple of 16 / element size)


def cuda_ext_supports(hidden: torch.Tensor) -> bool:
    """Whether the CUDA extension's kernel takes rows this wide (it copies strided wide rows to contiguous)."""
    dim = hidden.shape[-1]
    return dim <= MAX_CUDA_DIM or (dim <= MAX_CUDA_DIM_VECTOR and dim % (16 // hidden.element_size()) == 0)


def backend_problem(backend: str, device: torch.device, hidden: torch.Tensor | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can); ``hidden`` adds the width check."""
    if backend == "triton" and not _triton_usable(device):
        return "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the interpreter on CPU)"
    if backend == "cuda" and not (device.type == "cuda" and extension.has_ext_kernel("cuda")):
        return "backend='cuda' needs CUDA tensors and gainrl_kernels._C built with CUDA (setup.py on a CUDA machine)"
    if backend == "cuda" and hidden is not None and not cuda_ext_supports(hidden):
        return (f"hidden: D = {hidden.shape[-1]} is wider than backend='cuda' supports (D <= {MAX_CUDA_DIM}, or "
                f"<= {MAX_CUDA_DIM_VECTOR} when D is a multiple of {16 // hidden.element_size()}); "
                "use backend='triton', 'torch' or 'auto'")
    return None


def _cpu_compiled(hidden, cu_seqlens, seg_offsets):
    if extension.has_ext_kernel("cpu"):
        return torch.ops.gainrl.angle_stats_ext(hidden, cu_seqlens, seg_offsets)
    extension.warn_fallback()
    return tuple(angle_stats_torch(hidden, cu_seqlens, seg_offsets))


@torch.library.custom_op("gainrl::angle_stats", mutates_args=())
def angle_stats_op(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit_sum [B,K,D] f32, count [B,K] i32, sq_norm [B,K] f32, adjacent [B] f32); inputs as in DESIGN.md §3.
    Called directly, it checks the arguments' metadata (no host sync; :func:`gainrl_kernels.angle_stats` also checks
    the index values)."""
    check_hidden(hidden)
    check_backend(backend, BACKENDS)
    check_cu_seqlens(cu_seqlens, hidden, values=False)
    check_seg_offsets(seg_offsets, cu_seqlens, values=False)
    return angle_stats_impl(hidden, cu_seqlens, seg_offsets, backend)


def angle_stats_impl(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, seg_offsets: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's body: picks the backend and runs it. The functional API calls it directly in eager mode: the custom
    op's Python dispatch costs more than the kernel for short batches (``bench/eager_overhead.py``, both_via_ops)."""
    problem = backend_problem(backend, hidden.device, hidden)
    if problem:
        raise ValueError(problem)
    on_cuda = hidden.device.type == "cuda"
    if backend == "auto" and on_cuda:
        if extension.has_ext_kernel("cuda") and cuda_ext_supports(hidden):
            backend = "cuda"
        elif hidden.shape[1] > MAX_TRITON_DIM:
            backend = "torch"
    if backend == "triton" or (backend == "auto" and on_cuda):
        from .triton_angle import angle_stats_triton  # deferred: importing triton costs ~1 s

        return tuple(angle_stats_triton(hidden, cu_seqlens, seg_offsets))
    if backend == "cuda":
        return torch.ops.gainrl.angle_stats_ext(hidden, cu_seqlens, seg_offsets)
    if on_cuda:
        return tuple(angle_stats_torch(hidden, cu_seqlens, seg_offsets))
    return _cpu_compiled(hidden, cu_seqlens, seg_offsets)


@angle_stats_op.register_fake
def _(hidden, cu_seqlens, seg_offsets, backend):
    n_seq, n_seg = seg_offsets.shape[0], seg_offsets.shape[1] - 1
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        hidden.new_empty((n_seq, n_seg, hidden.shape[1]), dtype=torch.float32),
        torch.empty((n_seq, n_seg), dtype=torch.int32, device=hidden.device),
        torch.empty((n_seq, n_seg), **f32),
        torch.empty((n_seq,), **f32),
    )


@torch.library.custom_op("gainrl::angle_concentration", mutates_args=())
def angle_concentration_op(
    unit_sum: torch.Tensor, count: torch.Tensor, sq_norm: torch.Tensor, adjacent: torch.Tensor, inter_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra [B,K], inter [B,K,K], score [B], causal [B], causal_ref [B]), all f32."""
    check_stats_shapes(unit_sum, count, sq_norm, adjacent)
    out = concentration_from_stats(unit_sum, count, sq_norm, adjacent, inter_weight)
    # custom ops may not return views of each other; under torch.compile `_base` is None even for views (K = 1:
    # score is intra[:, 0]; the one-launch CUDA form splits one buffer), so every output is copied (tiny tensors)
    return tuple(t.clone() for t in out)


@angle_concentration_op.register_fake
def _(unit_sum, count, sq_norm, adjacent, inter_weight):
    n_seq, n_seg = count.shape
    f32 = dict(dtype=torch.float32, device=unit_sum.device)
    return (
        torch.empty((n_seq, n_seg), **f32),
        torch.empty((n_seq, n_seg, n_seg), **f32),
        torch.empty((n_seq,), **f32),
        torch.empty((n_seq,), **f32),
        torch.empty((n_seq,), **f32),
    )
