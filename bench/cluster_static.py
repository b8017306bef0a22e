"""Static cost of the thread-block-cluster forwards, read from the compiled code (no GPU): the op's cluster kernel
(csrc/rmsnorm_angle_cluster.cuh, every build) and the persistent prototype (bench/cluster_walk.cu, namespace
persistent). Per kernel: registers, spills, the machine instructions of its row loop per thread (SASS via Triton's
nvdisasm: the smallest loop that holds both a reciprocal square root and a 16-byte store, i.e. the loop over a
run's rows), the warps that share a row, and their product, the warp instructions of a row step.

    python bench/cluster_static.py --out bench/results/cluster_static_sm90a.json

The loop is an upper bound on a row's path: it also holds code a row skips (the run's first reduction, the second
prefetch branch, the first row's sums; with a deferred combine, the combine itself). Compare bench/cuda_rows_static.py
(the CUDA rows kernel: ~1,990 warp instructions a 4096-wide bf16 row) and an H200 SM's issue budget while it moves a
4096-wide bf16 row at its share of 4.1 TB/s: ~4,100 warp instructions (docs/fused_forward.md, session 24).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from cuda_rows_static import compile_kernels, write_record  # noqa: E402
from sass_loops import kernel_sass, sass_loops  # noqa: E402
from test_csrc_compile import ARCHS, DEFAULT_TORCH_NVCC_FLAGS, NVCC, demangle, parse_ptxas  # noqa: E402

PROTOTYPE = ROOT / "bench" / "cluster_walk.cu"


def row_loop_instructions(sass: str, mangled: str) -> int | None:
    """Instructions per thread in the row loop of kernel ``mangled`` in ``sass``: the smallest loop holding an
    MUFU.RSQ (a row's rstd or 1 / ||y||) and an STG.E.128 (a row's y)."""
    rows = [body for body in sass_loops(kernel_sass(sass, mangled))
            if any("MUFU.RSQ" in t for t in body) and any("STG.E.128" in t for t in body)]
    return min(map(len, rows)) if rows else None


def compile_prototype(arch: str) -> tuple[dict[str, dict], str]:
    """({kernel name: ptxas figures}, SASS) of bench/cluster_walk.cu as torch.utils.cpp_extension builds it."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [NVCC, "-cubin", "-gencode", ARCHS[arch], "-O3", "-std=c++17", *DEFAULT_TORCH_NVCC_FLAGS,
               f"-I{ROOT / 'csrc'}", "-Xptxas=-v", "-o", str(cubin), str(PROTOTYPE)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    funcs = parse_ptxas(p.stdout + p.stderr, arch)
    names = demangle(list(funcs))
    return {names[k]: dict(v, mangled=k) for k, v in funcs.items()}, sass


def table(arch: str) -> list[dict]:
    """One row per cluster kernel of the op and persistent kernel of the prototype (bf16, a weight of x's dtype)."""
    rows = []
    funcs, sass = compile_kernels(arch)
    for name, f in sorted(funcs.items()):
        # cluster_kernel<T, W_NATIVE, Config<D, RG, CS, C, S, J, VPT> >
        m = re.search(r"cluster_kernel<__nv_bfloat16, true, \S*Config<(\d+), (\d+), (\d+), (\d+), (\d+), (\d+), "
                      r"(\d+)>", name)
        if m:
            dim, rg, cs, c, s, j, vpt = map(int, m.groups())
            rows.append(dict(kernel="op", D=dim, row_groups=rg, blocks=cs, rows_a_block=c, stages=s, defer=j,
                             values_per_thread=8 * vpt, warps_a_row=dim // (8 * vpt) // 32, **_figures(sass, f)))
    funcs, sass = compile_prototype(arch)
    for name, f in sorted(funcs.items()):
        # persistent::walk_kernel<CS, C, S, MODE, RG, J> at D = 4096 and 1024 threads
        m = re.search(r"persistent::walk_kernel<(\d+), (\d+), (\d+), (\d+), (\d+), (\d+)>", name)
        if m:
            cs, c, s, mode, rg, j = map(int, m.groups())
            rows.append(dict(kernel="prototype", D=4096, row_groups=rg, blocks=cs, rows_a_block=c, stages=s,
                             defer=j, mode=mode, values_per_thread=4096 * rg // 1024,
                             warps_a_row=1024 // rg // 32, **_figures(sass, f)))
    for r in rows:
        r["warp_instructions_a_row"] = (r["loop_sass"] or 0) * r["warps_a_row"]
    return rows


def _figures(sass: str, f: dict) -> dict:
    return dict(registers=f["registers"], spill_bytes=f.get("spill_stores", 0) + f.get("spill_loads", 0),
                loop_sass=row_loop_instructions(sass, f["mangled"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sm_90a"], default="sm_90a")  # clusters: sm_90 only
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if NVCC is None:
        print("nvcc not found: nothing to report", file=sys.stderr)
        return 1
    rows = table(args.arch)
    print("| kernel | D | blocks | row groups | rows a block | stages | defer | mode | values/thread | registers "
          "| spills | row loop SASS | warps a row | warp instr / row (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['D']} | {r['blocks']} | {r['row_groups']} | {r['rows_a_block']} | {r['stages']} "
              f"| {r['defer']} "
              f"| {r.get('mode', '')} | {r['values_per_thread']} | {r['registers']} | {r['spill_bytes']} | "
              f"{r['loop_sass']} | {r['warps_a_row']} | {r['warp_instructions_a_row']} |")
    write_record(args.out, args.arch, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
