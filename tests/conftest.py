"""Test setup: Triton kernels run through the interpreter on CPU tensors when no GPU is present."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU the Triton kernels must run compiled on CUDA tensors. Pin the interpreter off unless the caller chose
    # otherwise: test modules that ``setdefault("TRITON_INTERPRET", "1")`` for CPU runs (test_pairwise,
    # test_rmsnorm_angle) would otherwise switch every later-imported kernel to the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests; a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. Tiny matmuls: one thread avoids OpenMP
    oversubscription on a shared 2-core machine (100x slower there)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
