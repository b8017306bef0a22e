"""Launch the bare RMSNorm and the fused RMSNorm + angle forward once each, after a warm-up, for a profiler.

Nsight Compute reads why the fused forward's row steps are slower than the bare kernel's (stall reasons, achieved
occupancy, DRAM throughput) where CUDA-graph timings (``bench/fused_variants.py``) only say by how much:

    ncu -k regex:rows_kernel --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python bench/profile_fused.py --shape 64x4096x4096

The warm-up runs each path once (compiles; 2 launches of a rows kernel: Triton's ``_fwd_rows_kernel`` for the bare
RMSNorm, for the fused forward the CUDA ``rows_kernel`` where the extension has it, else Triton's), then the profiled
pair follows: bare first, fused second. ``bench/gpu_check.sh`` runs this in its opt-in ``profile`` step.
``--smoke`` runs a tiny shape on any device (with TRITON_INTERPRET=1 on CPU) to check the script itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_angle_bench import make_input, parse_shape  # noqa: E402

from gainrl_kernels import rmsnorm_angle as M  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=(64, 4096, 4096))
    p.add_argument("--smoke", action="store_true", help="2x16x40 on whatever device there is")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, length, dim = (2, 16, 40) if args.smoke else args.shape
    x, cu = make_input(batch, length, dim, torch.bfloat16, device)
    w = torch.rand(dim, device=device, dtype=torch.bfloat16) + 0.5
    bare = lambda: M.rmsnorm_angle(x, w, 1e-6, validate=False)  # noqa: E731
    fused = lambda: M.rmsnorm_angle(x, w, 1e-6, cu, validate=False)  # noqa: E731
    for fn in (bare, fused):  # warm-up: compile both
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    for name, fn in (("bare", bare), ("fused", fused)):
        if device == "cuda":
            torch.cuda.nvtx.range_push(name)
        fn()
        if device == "cuda":
            torch.cuda.nvtx.range_pop()
    if device == "cuda":
        torch.cuda.synchronize()
    cfg = M._stats_plan(x, cu, None, None, w).cfg  # the launch shape the fused call above used
    print(f"profiled {batch}x{length}x{dim} bf16 on {device}: bare then fused; fused config {cfg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
