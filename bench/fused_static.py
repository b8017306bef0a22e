"""Static cost of the fused RMSNorm + angle forward against the bare RMSNorm, read from the compiled code (no GPU).

Lowers ``_fwd_rows_kernel`` for the launcher's configs (Triton's NVIDIA backend, then ptxas, as
tests/test_triton_compile.py does) with the alignment a real launch sees (16-byte aligned pointers, row stride and
D divisible by 16), and reports per config: registers per thread, resident programs per SM by registers, and per row
step of the main loop the barriers (``bar.sync``), global loads and global stores, and its machine instructions
(SASS via Triton's nvdisasm: per thread per step, and warp instructions per row, the issue slots a row costs an SM).
One row per step is the path from D = 513 on; the bare kernel's loop is the yardstick (one block reduction per
row: two barriers).

    python bench/fused_static.py                                  # table
    python bench/fused_static.py --out bench/results/fused_static_sm90a.json
    python bench/fused_static.py --variant separate_sums          # a variant of bench/fused_variants.py instead
    python bench/fused_static.py --unaligned --dims 5120          # as a launch on unaligned rows (scalar loads)

A prediction aid, not a timing: the GPU figures come from ``bench/fused_variants.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # lowering needs real @triton.jit functions

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_triton_compile import (  # noqa: E402
    PTXAS, RMSNORM_FWD_SIG, TARGETS, compile_ptx, contiguous_launch_hints, ptxas_report,
)

from fused_variants import VARIANTS, overridden  # noqa: E402
from sass_loops import sass_loop_instructions  # noqa: E402

from gainrl_kernels import rmsnorm_angle as M  # noqa: E402
from gainrl_kernels import rmsnorm_angle_forward_kernels as F  # noqa: E402

REGISTERS_PER_SM = 65536
NVDISASM = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
DTYPES = {"bf16": (tl.bfloat16, 2), "fp32": (tl.float32, 4)}


def lower(cfg: M._FwdConfig, dt: str, stats: bool, arch: str, aligned: bool = True) -> tuple[str, str, Optional[str]]:
    """(PTX, ptxas report, SASS or None without Triton's nvdisasm) of the forward kernel for one config as a CUDA
    launch compiles it (the module's knobs, the config's register cap, and a real launch's divisibility hints, none
    where not ``aligned``)."""
    fn = F._fwd_rows_kernel if cfg.rows else F._fwd_sliced_kernel
    sig = {k: v.format(dt=dt) for k, v in RMSNORM_FWD_SIG.items()}
    consts = dict(YT=DTYPES[dt][0], STATS=stats, NATIVE_CAST=True,
                  JOINT_SUMS=M._JOINT_SUMS is not False, RSQRT_INV=M._RSQRT_INV is not False,
                  RSQRT_RSTD=M._RSQRT_RSTD is not False,
                  BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d,
                  **(M._rows_tuning(cfg, True) if cfg.rows else {}),
                  __aligned__=contiguous_launch_hints(sig) if aligned else [])
    ptx = compile_ptx(fn, sig, consts, TARGETS[arch], cfg.num_warps, cfg.maxnreg)
    with tempfile.TemporaryDirectory() as tmp:  # one ptxas run: the -v report and the cubin nvdisasm reads
        cubin = Path(tmp) / "k.cubin"
        report = ptxas_report(ptx, arch, cubin)
        sass = (subprocess.run([str(NVDISASM), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
                if NVDISASM.exists() else None)
    return ptx, report, sass


def programs_per_sm(regs: int, warps: int) -> int:
    """Resident programs per SM (sm_80 / sm_90): registers (allocated per thread in steps of 8), 64 warps, 32 blocks."""
    return min(REGISTERS_PER_SM // (-(-regs // 8) * 8 * 32 * warps), 64 // warps, 32)


def loops(ptx: str) -> list[dict]:
    """Per backward branch (a loop) of the PTX: its body's barriers, global loads and stores."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)]:i]
            counts = {k: sum(k in b for b in body) for k in ("bar.sync", "ld.global", "st.global")}
            out.append({"lines": len(body), **counts})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(TARGETS), default="sm_90a")
    p.add_argument("--dims", type=int, nargs="+", default=[896, 2048, 4096, 5120, 8192])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                   help="the module settings of this bench/fused_variants.py variant")
    p.add_argument("--unaligned", action="store_true",
                   help="lower as a launch whose pointers or row stride are not 16-byte aligned (scalar loads)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if PTXAS is None:
        print("no ptxas found (Triton's bundled one or CUDA's): nothing to report", file=sys.stderr)
        return 1
    with overridden(VARIANTS[args.variant]):
        rows = table(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(arch=args.arch, variant=args.variant, aligned=not args.unaligned, triton=triton.__version__,
                    command=" ".join(["python"] + sys.argv))
        args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    return 0


def table(args: argparse.Namespace) -> list[dict]:
    """Lower every (dtype, D, bare / fused) config under the current module settings; print and return the rows."""
    rows = []
    print(f"{args.arch}, variant {args.variant}{', unaligned rows' if args.unaligned else ''}, "
          f"Triton {triton.__version__}")
    print("| dtype | D | BLOCK_D | warps | kernel | registers | programs/SM | bar.sync per row | loads | stores "
          "| SASS per thread per step | warp instructions per row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dt, (_, size) in DTYPES.items():
        for dim in args.dims:
            for stats in (False, True):
                aligned = not args.unaligned and dim % 16 == 0
                cfg = M._fwd_config(1 << 20, dim, size, torch.device("cpu"), stats,
                                    capability=TARGETS[args.arch].arch // 10, aligned=aligned)
                ptx, report, sass = lower(cfg, dt, stats, args.arch, aligned)
                regs = int(re.search(r"Used (\d+) registers", report).group(1))
                spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
                # the main loop: with statistics the one-row loop of a segment chunk (the kernel's longest), without
                # them the only loop
                main = max(loops(ptx), key=lambda c: c["lines"]) if stats else loops(ptx)[0]
                row = dict(dtype=dt, D=dim, block_d=cfg.block_d, block_d2=cfg.block_d2, warps=cfg.num_warps,
                           block_t=cfg.block_t,
                           kernel="fused" if stats else "bare", registers=regs, spill_bytes=spill,
                           programs_per_sm=programs_per_sm(regs, cfg.num_warps), maxnreg=cfg.maxnreg,
                           loop_bar_sync=main["bar.sync"], loop_loads=main["ld.global"],
                           loop_stores=main["st.global"], sass_per_step=sass_loop_instructions(sass))
                # issue slots a row costs an SM (the schedulers issue one warp instruction each per cycle)
                row["warp_instructions_per_row"] = (None if row["sass_per_step"] is None
                                                    else row["sass_per_step"] * cfg.num_warps // cfg.block_t)
                rows.append(row)
                block = f"{cfg.block_d}+{cfg.block_d2}" if cfg.block_d2 else cfg.block_d
                print(f"| {dt} | {dim} | {block} | {cfg.num_warps} | {row['kernel']} | {regs}"
                      f"{f' (spills {spill} B)' if spill else ''} | {row['programs_per_sm']} | "
                      f"{row['loop_bar_sync']} | {row['loop_loads']} | {row['loop_stores']} | {row['sass_per_step']} | "
                      f"{row['warp_instructions_per_row']} |", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
