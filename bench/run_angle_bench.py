"""Microbenchmark of the angle signal: gainrl ops vs the released per-sequence code vs plain PyTorch.

    python bench/run_angle_bench.py                      # CPU default grid + the headline case, table + JSON
    python bench/run_angle_bench.py --grid full          # B in {1,8,64} x L in {256,...,16384} x D in {576,...,4096}
    python bench/run_angle_bench.py --cases 8x2048x896   # explicit B x L x D cases

Reports median time, speed-up over the released way, peak memory (CUDA: max_memory_allocated; CPU: torch
allocations seen by the profiler) and, on CUDA, achieved bandwidth as a fraction of a device-to-device copy of the
same bytes. Cases too large for a method (estimated FLOPs or memory) are marked skipped, never guessed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from angle_methods import methods  # noqa: E402

GRIDS = {
    "full": dict(batch=[1, 8, 64], length=[256, 1024, 4096, 16384], dim=[576, 896, 2048, 4096]),
    "cpu": dict(batch=[1, 8], length=[256, 1024, 4096], dim=[576, 896, 2048]),
}
HEADLINE = (8, 2048, 896)


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo), with bf16 matmul support named: CPU timings, the released way's bf16
    ``u @ u.T`` above all, differ by an order of magnitude between CPUs with and without AVX-512 BF16 / AMX."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({platform.machine()}{', ' + ', '.join(extras) if extras else ''})"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, min_time: float, max_reps: int) -> float:
    """Median seconds per call after one warm-up, repeating until min_time is spent (at least 3 calls); a method
    whose first timed call takes over 4 * min_time is timed by that one call."""
    fn()  # warm-up (compiles, caches)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > 4 * min_time:  # slow even warm (judged on a second call, not on a warm-up that compiled)
        return first
    times: list[float] = [first]
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def parse_shape(text: str) -> tuple[int, int, int]:
    """"BxLxD" (e.g. 64x4096x4096) -> (B, L, D); an argparse ``type``."""
    try:
        batch, length, dim = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxLxD, e.g. 64x4096x4096, got {text!r}") from None
    return batch, length, dim


def make_input(batch: int, length: int, dim: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(dim, device=device, generator=g)
    hidden = (base + torch.randn(batch * length, dim, device=device, generator=g)).to(dtype)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
    return hidden, cu


def too_big(name: str, batch: int, length: int, dim: int, args) -> str | None:
    tokens = batch * length
    if name == "released" and 2.0 * batch * length * length * dim > args.max_released_flop:
        return f"skipped: {2.0 * batch * length * length * dim:.1e} FLOP > --max-released-flop"
    if name.startswith("torch_") and 3 * tokens * dim * 4 > args.max_temp_gb * 2**30:
        return "skipped: [T, D] float32 temporaries > --max-temp-gb"
    return None


REFERENCE_METHODS = ("torch_vectorised", "gainrl_cpp", "gainrl_cuda", "gainrl_triton")


def check_outputs(rows: list[dict], outputs: dict[str, torch.Tensor]) -> None:
    """Adds ``max_abs_diff`` to each timed row: its per-sequence metric against the first reference method that ran
    (float64, NaN matching NaN): every method of a case must compute the same numbers."""
    ref_name = next((m for m in REFERENCE_METHODS if m in outputs), None)
    if ref_name is None:
        return
    ref = outputs[ref_name]
    for row in rows:
        out = outputs.get(row["method"])
        if out is not None:
            both_nan = torch.isnan(out) & torch.isnan(ref)
            diff = torch.where(both_nan, 0.0, (out - ref).abs()).nan_to_num(nan=float("inf"))
            row.update(max_abs_diff=float(diff.max()) if diff.numel() else 0.0, diff_reference=ref_name)


def run_case(batch, length, dim, args, fns) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    hidden, cu = make_input(batch, length, dim, dtype, device)
    n_bytes = hidden.numel() * hidden.element_size()
    copy_s = None
    if device == "cuda":
        dst = torch.empty_like(hidden)
        copy_s = time_it(lambda: dst.copy_(hidden), device, args.min_time, args.max_reps)
        del dst
    rows = []
    outputs: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        row = dict(method=name, B=batch, L=length, D=dim, dtype=args.dtype, device=device)
        reason = too_big(name, batch, length, dim, args)
        if reason:
            rows.append(dict(row, status=reason))
            continue
        try:
            kept: dict = {}
            call = lambda: kept.__setitem__("out", fn(hidden, cu))  # noqa: E731 -- keeps the last output
            seconds = time_it(call, device, args.min_time, args.max_reps)
            row.update(status="ok", seconds=seconds, peak_bytes=peak_bytes(call, device))
            outputs[name] = torch.as_tensor(kept["out"], dtype=torch.float64).cpu()
            if copy_s:
                row["bw_fraction_of_copy"] = (n_bytes / seconds) / (2 * n_bytes / copy_s)
        except torch.OutOfMemoryError:
            row.update(status="skipped: out of memory")
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 -- one method failing (e.g. an Inductor bug) must not stop the grid
            row.update(status=f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
        rows.append(row)
        print(f"  {name:18s} B={batch:<3d} L={length:<6d} D={dim:<5d} {row.get('seconds', float('nan')) * 1e3:10.3f} ms  {row['status']}", file=sys.stderr)
    check_outputs(rows, outputs)
    released = next((r["seconds"] for r in rows if r["method"] == "released" and r["status"] == "ok"), None)
    for r in rows:
        if released and r["status"] == "ok":
            r["speedup_vs_released"] = released / r["seconds"]
    return rows


def table(rows: list[dict]) -> str:
    has_bw = any("bw_fraction_of_copy" in r for r in rows)
    head = "| B | L | D | method | time (ms) | speed-up vs released | peak mem (MiB) |" + (" BW / copy |" if has_bw else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["B"], r["L"], r["D"], r["method"], r["status"], "", ""] + ([""] if has_bw else [])
        else:
            sp = r.get("speedup_vs_released")
            cells = [r["B"], r["L"], r["D"], r["method"], f"{r['seconds'] * 1e3:.3f}", f"{sp:.1f}x" if sp else "-", f"{r['peak_bytes'] / 2**20:.1f}"]
            if has_bw:
                bw = r.get("bw_fraction_of_copy")
                cells.append(f"{bw:.2f}" if bw else "")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_json(out: Path, result: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--grid", default=None, choices=sorted(GRIDS), help="default: full on CUDA, cpu on CPU")
    p.add_argument("--cases", nargs="*", type=parse_shape, default=None, help="BxLxD cases instead of a grid, e.g. 8x2048x896")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--max-released-flop", type=float, default=None, help="default: 7e10 on CPU, 1e15 on CUDA")
    p.add_argument("--max-temp-gb", type=float, default=None, help="default: 4 on CPU, 40 on CUDA")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/angle_<device>.json)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: cases not started by then are recorded as skipped (the JSON is rewritten after every case)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.max_released_flop = args.max_released_flop or (1e15 if cuda else 7e10)
    args.max_temp_gb = args.max_temp_gb or (40 if cuda else 4)
    if args.cases:
        cases = args.cases
    else:
        grid = GRIDS[args.grid or ("full" if cuda else "cpu")]
        cases = [HEADLINE] + [(b, l, d) for b in grid["batch"] for l in grid["length"] for d in grid["dim"]]
    fns = methods(args.device)
    if args.methods:
        fns = {k: v for k, v in fns.items() if k in args.methods}
    device_name = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    result = dict(
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        device=device_name, torch=torch.__version__, rows=[],
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"angle_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = result["rows"]
    start = time.perf_counter()
    for b, l, d in cases:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            rows += [dict(method=name, B=b, L=l, D=d, dtype=args.dtype, device=args.device, status="skipped: --time-budget")
                     for name in fns]
            continue
        rows += run_case(b, l, d, args, fns)
        _write_json(out, result)  # partial results survive a kill
    _write_json(out, result)
    print(f"device: {device_name}; torch {torch.__version__}; {args.dtype}\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
