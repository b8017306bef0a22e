"""Static cost of the hand-written CUDA rows kernel of the fused RMSNorm + angle forward
(csrc/rmsnorm_angle_kernels.cuh), read from the compiled code (no GPU): per instantiation (dtype, vectors per thread
NV, ring stages S, next row carried in registers, weight in x's dtype) its registers, spills and machine
instructions in the row loop (SASS via Triton's nvdisasm), and per row width D the block size, resident blocks per
SM (by registers and by shared memory) and warp instructions per row.

    python bench/cuda_rows_static.py                      # sm_90a table
    python bench/cuda_rows_static.py --arch sm_80 --out bench/results/cuda_rows_static_sm80.json

"loop SASS (any block)" is the shipped kernel's row loop, which unrolls its per-warp sum for every warp count;
"loop SASS (this block)" is the loop compiled for the block size of that D (GAINRL_STATIC_WARPS), what a row step
issues but for the IEEE division's slow path. "hot path" is that loop less the long branches a row step skips
(``sass_loops.sass_hot_loop_instructions``: in the spans form the cursor's advance and a piece's flush, run where a
sequence or segment changes; in the work-list forms the whole loop); warp instructions per row use it. Compare with
bench/fused_static.py (the Triton kernel); GPU timings come from bench/fused_variants.py (variants cuda_rows_*).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from sass_loops import kernel_sass, sass_hot_loop_instructions, sass_loop_instructions  # noqa: E402
from test_csrc_compile import ARCHS, NVCC, SETUP_NVCC_FLAGS, demangle, parse_ptxas, torch_flags  # noqa: E402

REGISTERS_PER_SM = 65536
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90a": 228 * 1024}  # usable by blocks, 1 KiB reserved per block
SRC = ROOT / "csrc" / "rmsnorm_angle_cuda.cu"
ELEM = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def compile_kernels(arch: str, warps: int | None = None) -> tuple[dict[str, dict], str]:
    """({kernel name: ptxas figures}, SASS) of every instantiation in csrc/rmsnorm_angle_cuda.cu for ``arch``.
    ``warps``: compile the block reduction for this many warps (GAINRL_STATIC_WARPS), so that the loop holds only
    the code a block of that size runs (the shipped kernel unrolls its per-warp sum for every warp count)."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        define = [f"-DGAINRL_STATIC_WARPS={warps}"] if warps else []
        cmd = [NVCC, "-cubin", "-gencode", ARCHS[arch], "-Xptxas=-v", *SETUP_NVCC_FLAGS, *define,
               *torch_flags(Path(tmp) / "shim"), "-o", str(cubin), str(SRC)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    funcs = parse_ptxas(p.stdout + p.stderr, arch)
    names = demangle(list(funcs))
    return {names[k]: dict(v, mangled=k) for k, v in funcs.items()}, sass


def instantiation(name: str) -> tuple[str, int, int, bool, bool, bool] | None:
    """(dtype, NV, stages, carry, weight in x's dtype, spans) of a demangled ``rows_kernel<...>`` name (spans: the
    form without a work list; False where the name predates the flag), None for other kernels."""
    m = re.search(r"rows_kernel<(\w+), (\d+), (\d+), (true|false), (true|false)(?:, (true|false))?>", name)
    if not m:
        return None
    return (m.group(1), int(m.group(2)), int(m.group(3)), *(m.group(i) == "true" for i in (4, 5, 6)))


def loop_instructions(sass: str, mangled: str) -> int:
    return sass_loop_instructions(kernel_sass(sass, mangled)) or 0


def launch_shape(dim: int, elem_size: int, nv: int, stages: int, w_native: bool) -> tuple[int, int]:
    """(threads, dynamic shared memory bytes) of the launcher (csrc/rmsnorm_angle_kernels.cuh, launch_rows and
    smem_bytes) for rows of ``dim`` elements of ``elem_size`` bytes, ``nv`` 16-byte vectors per thread: whole warps,
    at least one; the ring of ``stages`` rows and the weight (16-bit in x's dtype when ``w_native``, else fp32).
    tests/test_rmsnorm_angle_cuda.py checks it against the emulated launcher."""
    vec = 16 // elem_size
    threads = max(32, -(-(-(-dim // vec) // nv) // 32) * 32)
    return threads, stages * threads * nv * 16 + threads * nv * (16 if w_native else vec * 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="sm_90a")
    p.add_argument("--dims", type=int, nargs="+", default=[896, 2048, 4096, 5120, 8192])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if NVCC is None:
        print("nvcc not found: nothing to report", file=sys.stderr)
        return 1
    funcs, sass = compile_kernels(args.arch)
    at_warps: dict[int, str] = {}  # warps -> SASS compiled for exactly that block size
    rows = []
    print("| dtype | NV | S | carry | native w | spans | values/thread | registers | spills | loop SASS (any block) "
          "| D | threads | loop SASS (this block) | hot path | blocks/SM (regs, smem) | warps/SM | warp instr / row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, f in sorted(funcs.items()):
        inst = instantiation(name)
        if inst is None:
            continue
        dt, nv, stages, carry, w_native, spans = inst
        vec = 16 // ELEM[dt]
        loop = loop_instructions(sass, f["mangled"])
        for dim in args.dims:
            threads, dynamic = launch_shape(dim, ELEM[dt], nv, stages, w_native)
            if threads > 512:
                continue
            smem = dynamic + f["smem"] + 1024  # dynamic, static (ptxas), 1 KiB reserved per block
            if threads // 32 not in at_warps:
                at_warps[threads // 32] = compile_kernels(args.arch, threads // 32)[1]
            loop_here = loop_instructions(at_warps[threads // 32], f["mangled"])
            hot = sass_hot_loop_instructions(kernel_sass(at_warps[threads // 32], f["mangled"])) or 0
            by_regs = REGISTERS_PER_SM // (threads * max(f["registers"], 1))
            by_smem = SMEM_PER_SM[args.arch] // smem
            blocks = min(by_regs, by_smem, 2048 // threads)
            row = dict(dtype=dt, nv=nv, stages=stages, carry=carry, w_native=w_native, spans=spans,
                       values_per_thread=nv * vec,
                       registers=f["registers"], spill_bytes=f.get("spill_stores", 0) + f.get("spill_loads", 0),
                       loop_sass_any_block=loop, D=dim, threads=threads, loop_sass=loop_here, hot_loop_sass=hot,
                       blocks_by_registers=by_regs, blocks_by_smem=by_smem, blocks_per_sm=blocks,
                       warps_per_sm=blocks * threads // 32, warp_instructions_per_row=hot * threads // 32)
            rows.append(row)
            print(f"| {dt} | {nv} | {stages} | {carry} | {w_native} | {spans} | {nv * vec} | {row['registers']} | "
                  f"{row['spill_bytes']} | {loop} | {dim} | {threads} | {loop_here} | {hot} | "
                  f"{blocks} ({by_regs}, {by_smem}) | {row['warps_per_sm']} | {row['warp_instructions_per_row']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(arch=args.arch, command=" ".join(["python"] + sys.argv), rows=rows),
                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
