"""Fixed cost of one eager call of the angle signal: what a short batch pays before the kernels matter.

Times, per call, on a tiny input (default B = 1, L = 256, D = 896, bf16 on CUDA / fp32 on CPU):
  stats           angle_stats(..., validate_values=False)                 (the functional API, eager fast path)
  concentration   angle_concentration(stats)
  both            the two together (what bench/run_angle_bench.py times as gainrl_*)
  both_via_ops    the same through torch.ops.gainrl.* (the custom-op dispatch the API skips in eager mode)
  released        the released per-sequence code
Each as latency (synchronised after every call) and, on CUDA, as throughput (synchronised once per batch of calls:
host cost when the GPU keeps up).

    python bench/eager_overhead.py                      # table
    python bench/eager_overhead.py --out bench/results/eager_overhead_<device>.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_angle_bench import make_input, parse_shape, sync  # noqa: E402

from gainrl_kernels import angle_concentration, angle_stats, whole_sequence_offsets  # noqa: E402
from gainrl_kernels.naive import released_causal_angle  # noqa: E402
from gainrl_kernels.types import AngleStats  # noqa: E402


def per_call(fn: Callable[[], object], device: str, reps: int, sync_each: bool) -> float:
    """Median seconds per call over 5 rounds of ``reps`` calls (after 20 warm-up calls)."""
    for _ in range(20):
        fn()
    sync(device)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
            if sync_each:
                sync(device)
        sync(device)
        rounds.append((time.perf_counter() - t0) / reps)
    return statistics.median(rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=parse_shape, default="1x256x896", help="B x L x D")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1: steadier host timings)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch, length, dim = args.shape
    shape = f"{batch}x{length}x{dim}"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden, cu = make_input(batch, length, dim, dtype, args.device)
    stats = angle_stats(hidden, cu, validate_values=False)

    def both() -> object:
        return angle_concentration(angle_stats(hidden, cu, validate_values=False)).causal_ref

    def both_via_ops() -> object:  # the same work as both(), default offsets included, through the dispatcher
        s = AngleStats(*torch.ops.gainrl.angle_stats(hidden, cu, whole_sequence_offsets(cu), "auto"))
        return torch.ops.gainrl.angle_concentration(*s, 1.0)[4]

    cases = {
        "stats": lambda: angle_stats(hidden, cu, validate_values=False),
        "concentration": lambda: angle_concentration(stats),
        "both": both,
        "both_via_ops": both_via_ops,
        "released": lambda: released_causal_angle(hidden, cu),
    }
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}, B x L x D = {shape}, {dtype}")
    print("| call | latency (µs) | throughput (µs per call) |")
    print("|---|---|---|")
    rows = []
    for name, fn in cases.items():
        latency = per_call(fn, args.device, args.reps, sync_each=True)
        throughput = per_call(fn, args.device, args.reps, sync_each=False) if args.device == "cuda" else None
        rows.append(dict(call=name, latency_us=latency * 1e6,
                         throughput_us=None if throughput is None else throughput * 1e6))
        print(f"| {name} | {latency * 1e6:.1f} | {'' if throughput is None else f'{throughput * 1e6:.1f}'} |",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=device_name, shape=shape, dtype=str(dtype), rows=rows,
                                            command=" ".join(["python"] + sys.argv)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
