"""Where the Triton kernel tests run: compiled Triton on CUDA tensors on a GPU machine, else the Triton interpreter
(TRITON_INTERPRET=1, which the test modules set before triton is imported) on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from gainrl_kernels.validate import triton_interpreting


def triton_device() -> str:
    """"cuda" for compiled Triton on a GPU, else "cpu" (the interpreter, which a GPU machine does not use: there the
    kernels cannot take CPU tensors)."""
    return "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"


# module marker of the Triton kernel tests: they need one of the two
needs_triton = pytest.mark.skipif(not triton_interpreting() and not torch.cuda.is_available(),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
