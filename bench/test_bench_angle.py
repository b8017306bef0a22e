"""pytest-benchmark view of the angle microbenchmark (the table script is run_angle_bench.py).

    pytest bench/test_bench_angle.py --benchmark-enable    # CPU: small shapes; on a GPU machine: CUDA tensors
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from angle_methods import methods  # noqa: E402
from run_angle_bench import make_input, sync  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(8, 2048, 896), (1, 1024, 576)] if DEVICE == "cpu" else [(8, 2048, 896), (64, 4096, 4096), (1, 16384, 2048)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", list(methods(DEVICE)))
def test_angle(benchmark, method, shape):
    batch, length, dim = shape
    if method == "released" and DEVICE == "cpu" and batch * length * length * dim > 4e10:
        pytest.skip("released way takes tens of seconds per call on CPU; see run_angle_bench.py")
    hidden, cu = make_input(batch, length, dim, torch.bfloat16, DEVICE)
    fn = methods(DEVICE)[method]
    fn(hidden, cu)

    def call():
        fn(hidden, cu)
        sync(DEVICE)

    benchmark.extra_info.update(B=batch, L=length, D=dim, device=DEVICE)
    benchmark(call)
