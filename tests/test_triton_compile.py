"""Every Triton kernel compiles for real GPUs (sm_80, sm_90a) without a GPU, and ptxas reports no spills.

The interpreter (TRITON_INTERPRET=1) checks the numerics on CPU but not the compiled path: typing of loop-carried
values, constexpr rules, register pressure. This test lowers each kernel through Triton's NVIDIA backend (TTIR ->
PTX) and assembles the PTX with the ptxas that ships with Triton. Skips cleanly where that toolchain is absent.
Kernels are compiled in a subprocess: with TRITON_INTERPRET=1 set at import, @triton.jit yields interpreter
objects that cannot be lowered.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - very old or very new Triton
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

_BIN = Path(triton.__file__).parent / "backends/nvidia/bin"
# Triton 3.9 emits PTX 9.x: its ptxas-blackwell (or a CUDA 13 ptxas) reads it, its older bundled ptxas does not
PTXAS = next(
    (p for p in (_BIN / "ptxas-blackwell", shutil.which("ptxas"), _BIN / "ptxas") if p and os.access(p, os.X_OK)), None
)
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90a": GPUTarget("cuda", 90, 32)}
# shared memory a block may opt in to: A100 (163 KiB) and H100 / H200 (227 KiB)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
# integer arguments of the backward that a contiguous launch with D % 16 == 0 specialises as divisible by 16
BWD_ALIGNED = ("D", "sx_r", "sdy_r")


def compile_ptx(fn, signature: dict, constexprs: dict, target, num_warps: int, maxnreg: int | None = None) -> str:
    """PTX of ``fn`` (see ``compile_kernel``)."""
    return compile_kernel(fn, signature, constexprs, target, num_warps, maxnreg).asm["ptx"]


def compile_kernel(fn, signature: dict, constexprs: dict, target, num_warps: int, maxnreg: int | None = None):
    """``fn`` compiled by Triton for ``target``. Runtime arguments named in ``constexprs["__aligned__"]`` (if
    present; popped) get the hint a launch gives pointers and integers divisible by 16; all others none (the worst
    case for registers). ``maxnreg``: the launch option that caps registers per thread."""
    constexprs = dict(constexprs)
    aligned = constexprs.pop("__aligned__", ())
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=target,
                            options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    return kernel


class Case(NamedTuple):
    """One kernel lowering: the kernel, its runtime signature, constexprs, warps, register cap (``maxnreg``) and the
    targets (keys of TARGETS; None: all) whose launch uses this config."""

    name: str
    fn: Callable
    signature: dict
    constexprs: dict
    num_warps: int
    maxnreg: Optional[int] = None
    archs: Optional[tuple[str, ...]] = None
    shared_bound: Optional[int] = None  # the launcher's bound of the shared memory Triton allocates (None: none)


def ptxas_report(ptx: str, arch: str, cubin: Optional[Path] = None) -> str:
    """ptxas -v's resource report of ``ptx`` for ``arch``; the assembled code goes to ``cubin`` (default nowhere)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([str(PTXAS), f"-arch={arch}", "-v", f.name, "-o", str(cubin or os.devnull)],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert res.returncode == 0, res.stderr
    return res.stderr


def _angle_cases():
    from gainrl_kernels import triton_angle as A

    i32 = "i32"
    for dt in ("fp32", "bf16"):  # fp16 lowers like bf16
        for dim in (896, 4096, 8192):
            block_t, block_d, warps = A._tile_config(dim)
            yield Case(
                f"angle_chunk-{dt}-D{dim}", A._chunk_kernel,
                dict(x_ptr=f"*{dt}", stride_t=i32, stride_d=i32, dim=i32, chunk=i32, n_total=i32, search_steps=i32,
                     seg_lo_ptr="*i32", seg_hi_ptr="*i32", span_hi_ptr="*i32", chunk_start_ptr="*i32",
                     part_sum_ptr="*fp32", part_sq_ptr="*fp32", part_adj_ptr="*fp32"),
                dict(BLOCK_T=block_t, BLOCK_D=block_d), warps,
            )
    yield Case(
        "angle_prep", A._segment_prep_kernel,
        dict(cu_ptr="*i32", off_ptr="*i32", n_tokens=i32, n_seq=i32, n_seg=i32, chunk=i32, seg_lo_ptr="*i32",
             seg_hi_ptr="*i32", span_hi_ptr="*i32", count_ptr="*i32", chunk_start_ptr="*i32"),
        dict(BLOCK=1024), 4,
    )
    yield Case(
        "angle_reduce", A._reduce_kernel,
        dict(chunk_start_ptr="*i32", part_sum_ptr="*fp32", part_sq_ptr="*fp32", part_adj_ptr="*fp32", n_slots=i32,
             dim=i32, n_seg=i32, unit_sum_ptr="*fp32", sq_ptr="*fp32", adjacent_ptr="*fp32"),
        dict(BLOCK_D=1024), 4,
    )


# D values whose launch configs the RMSNorm cases lower: the forward holds whole rows in registers up to
# next_pow2(D) = 8192 and loops over 64-wide column slices beyond; the backward switches from whole rows
# (D <= 4096) to two passes over column slices (any D). The forward lowers D % 16 == 0 (every model width) with
# the vector hints of a contiguous launch and 40, 4104 and 16392 without (scalar loads, masks per element)
RMSNORM_DIMS = (40, 896, 2048, 4096, 4104, 5120, 8192, 16384, 16392)
RMSNORM_SPLIT_DIMS = (5120, 6144)  # 4096 + 1024 and 4096 + 2048, split whatever the dtype (_ROWS_SPLIT_TAIL = True)
# widths also lowered as a launch with unaligned pointers (scalar loads, the same tiles): 16-bit rows of 5120 take
# the split by default whatever their layout (``_split_tail``)
RMSNORM_UNALIGNED_DIMS = (5120,)


# runtime arguments of the fused forward kernels ({dt}: x's Triton type); bench/fused_static.py lowers them too
RMSNORM_FWD_SIG = dict(x_ptr="*{dt}", w_ptr="*{dt}", y_ptr="*{dt}", rstd_ptr="*fp32", item_row0_ptr="*i32",
                       item_nrows_ptr="*i32", item_seg_ptr="*i32", item_pair_end_ptr="*i32", part_sum_ptr="*fp32",
                       part_q_ptr="*fp32", part_adj_ptr="*fp32", R="i32", D="i32", stride_r="i64", eps="fp32",
                       chunk="i32")


def contiguous_launch_hints(signature: dict) -> list[str]:
    """The runtime arguments a launch with a contiguous input of D % 16 == 0 specialises as divisible by 16: the
    pointers (16-byte aligned allocations), the row stride and D."""
    return [k for k, v in signature.items() if v.startswith("*") or k in ("stride_r", "D")]


def _rmsnorm_angle_cases():
    import torch

    from gainrl_kernels import rmsnorm_angle as M
    from gainrl_kernels import rmsnorm_angle_backward as B
    from gainrl_kernels import rmsnorm_angle_forward_kernels as F

    tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    fwd_sig = RMSNORM_FWD_SIG
    for dt in ("fp32", "bf16"):
        size = 4 if dt == "fp32" else 2
        # each D as a contiguous input of that D launches it: 16-byte vector hints where D % 16 == 0; the configs
        # of each target (register caps depend on the compute capability)
        configs: dict[tuple, list[str]] = {}
        for arch, target in TARGETS.items():
            for dim in RMSNORM_DIMS:
                for aligned in {dim % 16 == 0, dim % 16 == 0 and dim not in RMSNORM_UNALIGNED_DIMS}:
                    for stats in (False, True):
                        cfg = M._fwd_config(1 << 20, dim, size, torch.device("cpu"), stats,
                                            capability=target.arch // 10, aligned=aligned)
                        configs.setdefault((cfg, stats, aligned), []).append(arch)
        for (cfg, stats, aligned), archs in sorted(configs.items(), key=repr):
            kind = "rows" if cfg.rows else "sliced"
            sig = {k: v.format(dt=dt) for k, v in fwd_sig.items()}
            hints = contiguous_launch_hints(sig) if aligned else []
            cap = f"-R{cfg.maxnreg}" if cfg.maxnreg else ""
            tail = f"+{cfg.block_d2}" if cfg.block_d2 else ""
            yield Case(
                f"rmsnorm_fwd_{kind}-{dt}-stats{int(stats)}-T{cfg.block_t}-BD{cfg.block_d}{tail}-W{cfg.num_warps}{cap}"
                f"-{'aligned' if aligned else 'unaligned'}",
                F._fwd_rows_kernel if cfg.rows else F._fwd_sliced_kernel, sig,
                dict(YT=tl_dtype[dt], STATS=stats, NATIVE_CAST=True, JOINT_SUMS=True, RSQRT_INV=True,
                     RSQRT_RSTD=True, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d,
                     __aligned__=hints, **(M._rows_tuning(cfg, False) if cfg.rows else {})),
                cfg.num_warps, cfg.maxnreg, None if len(archs) == len(TARGETS) else tuple(archs),
            )
            if stats and cfg.rows and cfg.block_t == 1 and cfg.block_d == 4096 and aligned:
                # the cache variants at the goal width: the prefetch (_PREFETCH_ROWS, inline PTX) and the
                # software-pipelined loop (_PIPELINE_STAGES, cp.async) lower without spills
                for tag, tuning in (("prefetch2", dict(PREFETCH=2)), ("pipeline3", dict(PIPELINE=3))):
                    yield Case(
                        f"rmsnorm_fwd_rows-{dt}-{tag}-BD{cfg.block_d}-W{cfg.num_warps}{cap}", F._fwd_rows_kernel, sig,
                        dict(YT=tl_dtype[dt], STATS=True, NATIVE_CAST=True, JOINT_SUMS=True, RSQRT_INV=True,
                             RSQRT_RSTD=True, BLOCK_T=1, BLOCK_D=cfg.block_d, __aligned__=hints,
                             **{**M._rows_tuning(cfg, False), **tuning}),
                        cfg.num_warps, cfg.maxnreg, None if len(archs) == len(TARGETS) else tuple(archs),
                    )
        for dim in RMSNORM_SPLIT_DIMS:  # a row as two tiles whatever the dtype and tail (_ROWS_SPLIT_TAIL = True)
            cfg = M._fwd_config(1 << 20, dim, size, torch.device("cpu"), True, capability=9, split=True)
            assert cfg.block_d2 and cfg.block_d < dim <= cfg.block_d + cfg.block_d2, cfg
            sig = {k: v.format(dt=dt) for k, v in fwd_sig.items()}
            yield Case(
                f"rmsnorm_fwd_rows-{dt}-split-BD{cfg.block_d}+{cfg.block_d2}-W{cfg.num_warps}", F._fwd_rows_kernel,
                sig, dict(YT=tl_dtype[dt], STATS=True, NATIVE_CAST=True, JOINT_SUMS=True, RSQRT_INV=True,
                          RSQRT_RSTD=True, BLOCK_T=1, BLOCK_D=cfg.block_d,
                          __aligned__=contiguous_launch_hints(sig), **M._rows_tuning(cfg, False)),
                cfg.num_warps,
            )
        # the launcher's configs per target (the pipelining stages depend on its shared memory), lowered as a launch
        # with a contiguous x and dy specialises them (unit column strides, 16-divisible pointers, D and row
        # strides), or without hints where D % 16 != 0; the configs without pipelining (devices with less shared
        # memory); in bf16 at sm_90a one row a step capped at 64 registers, pipelined (bench/fused_backward.py)
        bwd: dict[tuple, list[str]] = {}
        for dim in RMSNORM_DIMS + RMSNORM_SPLIT_DIMS:
            for arch in TARGETS:
                cfg = B._bwd_config(dim, size, SHARED_LIMIT[arch], TARGETS[arch].arch // 10, dim % 16 == 0)
                bwd.setdefault((cfg, dim % 16 == 0), []).append(arch)
                if cfg.stages:
                    bwd.setdefault((cfg._replace(stages=0), dim % 16 == 0), []).append(arch)
        if dt == "bf16":
            bwd[(B._bwd_config(4096, 2, SHARED_LIMIT["sm_90a"])._replace(block_t=1, maxnreg=64), True)] = ["sm_90a"]
        bwd_sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", dy_ptr=f"*{dt}", rstd_ptr="*fp32", dx_ptr=f"*{dt}",
                       part_dw_ptr="*fp32", R="i32", D="i32", rows_per_prog="i32", sx_r="i32", sx_d="i32",
                       sdy_r="i32", sdy_d="i32")
        for (cfg, aligned), archs in bwd.items():
            kind = "blocked" if cfg.blocked else "rows"
            if aligned:
                sig = {k: v for k, v in bwd_sig.items() if k not in ("sx_d", "sdy_d")}
                launch = dict(sx_d=1, sdy_d=1, __aligned__=[k for k in sig if k.endswith("_ptr") or k in BWD_ALIGNED])
            else:
                sig, launch = bwd_sig, {}
            yield Case(
                f"rmsnorm_bwd_{kind}-{dt}-T{cfg.block_t}-BD{cfg.block_d}"
                f"{f'+{cfg.block_d2}' if cfg.block_d2 else ''}-W{cfg.num_warps}"
                f"{f'-R{cfg.maxnreg}' if cfg.maxnreg else ''}{f'-S{cfg.stages}' if cfg.stages else ''}"
                f"-{'aligned' if aligned else 'unaligned'}",
                B._bwd_blocked_kernel if cfg.blocked else B._bwd_kernel, sig,
                dict(XT=tl_dtype[dt], BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, **launch,
                     **({} if cfg.blocked else {"BLOCK_D2": cfg.block_d2, "STAGES": cfg.stages})),
                cfg.num_warps, cfg.maxnreg, None if len(set(archs)) == len(TARGETS) else tuple(sorted(set(archs))),
                None if cfg.blocked else B._bwd_shared_bytes(cfg, size, cfg.stages),
            )
    # the work list's extreme tiles: 16 sequences x (_PLAN_TILE / 16) chunks, 256 x (_PLAN_TILE / 256)
    for (n_seg, has_off, has_tok), block_b in zip(((1, False, False), (3, True, True)), (16, 256)):
        yield Case(
            f"rmsnorm_plan-K{n_seg}-off{int(has_off)}-tok{int(has_tok)}-B{block_b}", F._plan_kernel,
            dict(cu_ptr="*i32", off_ptr="*i32", tok_ptr="*i64", n_packed="i32", B="i32", R="i32", chunk="i32",
                 grid="i32", item_row0_ptr="*i32", item_nrows_ptr="*i32", item_seg_ptr="*i32",
                 item_pair_end_ptr="*i32", seg_lo_ptr="*i32", seg_hi_ptr="*i32", count_ptr="*i32"),
            dict(K=n_seg, HAS_OFF=has_off, HAS_TOK=has_tok, BLOCK_B=block_b, BLOCK_C=M._PLAN_TILE // block_b,
                 BLOCK_I=1024), 4,
        )
    # the reduce kernels at the default tile and the narrowest _REDUCE_PROGRAMS_PER_SM makes (128 chunks x 16)
    for tile in (M._REDUCE_TILE, (128, 16)):
        yield Case(
            f"rmsnorm_reduce-{tile[0]}x{tile[1]}", F._reduce_kernel,
            dict(part_sum_ptr="*fp32", part_q_ptr="*fp32", part_adj_ptr="*fp32", seg_lo_ptr="*i32",
                 seg_hi_ptr="*i32", unit_sum_ptr="*fp32", sq_norm_ptr="*fp32", adjacent_ptr="*fp32", D="i32", K="i32"),
            dict(BLOCK_C=tile[0], BLOCK_D=tile[1]), 4,
        )
    # the CUDA spans kernel's reduce (slots from cu_seqlens and the offsets), at the default tile and the variants'
    for (n_seg, has_off, has_tok), tile in zip(((1, False, False), (3, True, True), (2, True, False)),
                                              (M._REDUCE_TILE, (64, 32), (128, 16))):
        yield Case(
            f"rmsnorm_reduce_spans-K{n_seg}-off{int(has_off)}-tok{int(has_tok)}-{tile[0]}x{tile[1]}",
            F._reduce_spans_kernel,
            dict(part_sum_ptr="*fp32", part_q_ptr="*fp32", part_adj_ptr="*fp32", cu_ptr="*i32", off_ptr="*i32",
                 tok_ptr="*i64", n_packed="i32", unit_sum_ptr="*fp32", sq_norm_ptr="*fp32", adjacent_ptr="*fp32",
                 count_ptr="*i32", R="i32", D="i32", chunk="i32"),
            dict(K=n_seg, HAS_OFF=has_off, HAS_TOK=has_tok, BLOCK_C=tile[0], BLOCK_D=tile[1]), 4,
        )


def _pairwise_cases():
    from gainrl_kernels import pairwise as P

    for dt, prec, block in (("fp32", "ieee", 32), ("bf16", "tf32", 64)):
        for n_seg, fn in ((1, 0), (3, 2)):
            yield Case(
                f"pairwise-{dt}-K{n_seg}-fn{fn}", P._pairwise_kernel,
                dict(h_ptr=f"*{dt}", inv_ptr="*fp32", start_ptr="*i32", len_ptr="*i32", off_ptr="*i32",
                     item_seq_ptr="*i32",
                     item_tile_ptr="*i32", part_ptr="*fp32", T="i32", D="i32", stride_t="i32", stride_d="i32",
                     window="i32"),
                dict(K=n_seg, FN=fn, UPCAST=False, PREC=prec, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block,
                     BLOCK_K=max(2, triton.next_power_of_2(n_seg))), 8,
            )
    yield Case(
        "pairwise_sum", P._sum_items_kernel,
        dict(part_ptr="*fp32", out_ptr="*fp32", item_lo_ptr="*i32", item_hi_ptr="*i32", KK="i32"), dict(BLOCK=16), 4,
    )


def _concentration_cases():
    from gainrl_kernels import triton_concentration as C

    for n_seg in (1, C.MAX_SEGMENTS):  # the extreme tiles: [2, 2, 1024] and [16, 16, 16]
        block_k, block_d = C.block_sizes(n_seg)
        yield Case(
            f"concentration-BK{block_k}-BD{block_d}", C._concentration_kernel,
            dict(unit_sum_ptr="*fp32", count_ptr="*i32", sq_norm_ptr="*fp32", adjacent_ptr="*fp32", out_ptr="*fp32",
                 B="i32", K="i32", D="i32", inter_weight="fp32"),
            dict(BLOCK_K=block_k, BLOCK_D=block_d), 4,
        )


def all_cases():
    yield from _angle_cases()
    yield from _concentration_cases()
    yield from _rmsnorm_angle_cases()
    yield from _pairwise_cases()


def case_archs(case: Case) -> tuple[str, ...]:
    return case.archs or tuple(TARGETS)


def compile_all() -> dict[str, str]:
    """{case-arch: ptxas report} for every case and its targets; run in a process without TRITON_INTERPRET."""
    reports = {}
    for c in all_cases():
        for arch in case_archs(c):
            kernel = compile_kernel(c.fn, c.signature, c.constexprs, TARGETS[arch], c.num_warps, c.maxnreg)
            reports[f"{c.name}-{arch}"] = (ptxas_report(kernel.asm["ptx"], arch)
                                           + f"\ntriton shared memory: {kernel.metadata.shared} bytes")
    return reports


@pytest.fixture(scope="module")
def reports() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, test_triton_compile as t; print(json.dumps(t.compile_all()))"
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(PTXAS is None, reason="Triton's bundled ptxas not found")
def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills(reports):
    expected = {f"{c.name}-{arch}" for c in all_cases() for arch in case_archs(c)}
    assert set(reports) == expected
    for name, report in reports.items():
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
        assert spills and not any(spills), f"{name}: {report}"


@pytest.mark.skipif(PTXAS is None, reason="Triton's bundled ptxas not found")
def test_shared_memory_fits_the_targets_and_the_launchers_bounds(reports):
    """Every lowering fits its target's shared memory per block, and the launcher's bound (which picks the
    backward's pipelining stages for the device) is at least what Triton allocates."""
    for case in all_cases():
        for arch in case_archs(case):
            report = reports[f"{case.name}-{arch}"]
            shared = int(re.search(r"triton shared memory: (\d+) bytes", report).group(1))
            assert shared <= SHARED_LIMIT[arch], f"{case.name}-{arch}: {shared} bytes"
            if case.shared_bound is not None:
                assert shared <= case.shared_bound, f"{case.name}-{arch}: {shared} > bound {case.shared_bound}"
