"""Launch-shape variants of the fused RMSNorm + angle forward on a GPU: which tile rules come closest to the bare
RMSNorm kernel. Every variant's output is checked against the default's (y to a bf16 step, statistics to 1e-3)
before it is timed; times are of CUDA-graph replays (kernels only, no Python or launch overhead), bare and fused
alternately --rounds times (the minimum of each), and of eager calls. ``ratio`` is fused over the variant's own bare
kernel, ``ratio_vs_default_bare`` over the first timed variant's (the default's, unless it failed) bare kernel.

    python bench/fused_variants.py --out bench/results/fused_variants_<gpu>.json
    python bench/fused_variants.py --smoke     # tiny shapes, any device (checks the script runs)
    python bench/fused_variants.py --variants pipeline_3,prefetch_2   # these and the default only
    python bench/fused_variants.py --dtype fp32 --variants cuda_rows_fp32   # fp32 rows: CUDA rows against Triton

Per shape it also times the device-side work list alone (``plan_only``), torch.compile's RMSNorm
(``torch_compile_bare``), PyTorch's own fused ``F.rms_norm`` (``torch_native_bare``), Liger-Kernel's RMSNorm where
installed (``liger_bare``: what TRL runs with ``use_liger_kernel=True``; GPU only) and the unfused pair the fused
call replaces: our bare RMSNorm, then ``angle_stats`` on its y (``bare_then_angle_stats_<backend>``, with
``angle_stats`` alone).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_angle_bench import make_input, time_it  # noqa: E402
from run_kernels_bench import liger_rmsnorm, liger_unavailable, torch_native_rmsnorm, torch_rmsnorm  # noqa: E402

from gainrl_kernels import rmsnorm_angle as M  # noqa: E402
from gainrl_kernels.extension import has_ext_kernel  # noqa: E402

# name -> module constants to override ({}: the defaults). A variant that sets no _CUDA_ROWS* knob is one
# of the Triton rows kernel and runs with _CUDA_ROWS = False (``rows_kernel_settings``): the CUDA rows kernel, the
# default where the extension has it, would otherwise take its rows.
VARIANTS: dict[str, dict] = {
    "default": {},
    "triton_rows": {"_CUDA_ROWS": False},  # the Triton rows kernel at its defaults (the default before session 17)
    # the hand-written CUDA rows kernel (csrc/rmsnorm_angle_kernels.cuh; needs the extension built with CUDA): a
    # cp.async ring of STAGES rows in shared memory, one barrier per row, VALUES columns per thread
    "cuda_rows": {"_CUDA_ROWS": True},  # 32 values, stages and carry by width (_cuda_rows_tuning)
    # fixed stages and carry at every width (the default before session 18: cuda_rows_s3)
    "cuda_rows_s2": {"_CUDA_ROWS": True, "_CUDA_ROWS_STAGES": 2, "_CUDA_ROWS_CARRY": False},
    "cuda_rows_s3": {"_CUDA_ROWS": True, "_CUDA_ROWS_STAGES": 3, "_CUDA_ROWS_CARRY": False},
    "cuda_rows_s4": {"_CUDA_ROWS": True, "_CUDA_ROWS_STAGES": 4, "_CUDA_ROWS_CARRY": False},
    # 3 blocks of 4 warps at 4096, fewer instructions
    "cuda_rows_carry": {"_CUDA_ROWS": True, "_CUDA_ROWS_CARRY": True, "_CUDA_ROWS_STAGES": 3},
    "cuda_rows_carry_s4": {"_CUDA_ROWS": True, "_CUDA_ROWS_CARRY": True, "_CUDA_ROWS_STAGES": 4},
    # ... with 512-row chunks (the default is 256): half the partial-row traffic again
    "cuda_rows_chunk_512": {"_CUDA_ROWS": True, "_MAX_CHUNK": 512},
    "cuda_rows_carry_chunk_512": {"_CUDA_ROWS": True, "_CUDA_ROWS_CARRY": True, "_CUDA_ROWS_STAGES": 3,
                                  "_MAX_CHUNK": 512},
    # ... and shorter chunks: more blocks (a shorter tail of the last wave), more partial rows
    "cuda_rows_chunk_128": {"_CUDA_ROWS": True, "_MAX_CHUNK": 128},
    "cuda_rows_chunk_64": {"_CUDA_ROWS": True, "_MAX_CHUNK": 64},
    # small batches: chunks shrink until there are _FILL_PER_SM programs per SM (by width: _fill_per_sm, 4 but 1 at
    # 5120 and 8192); 2 keeps them twice as long as 4 (fewer partial rows), 8 halves them (more blocks for the last
    # wave). H200, session 25 (results/fused_variants_h200_fill.json, _fill_2.json): longer chunks faster at 5120
    # and 8192, slower at 2048 and 896
    "cuda_rows_fill_1": {"_CUDA_ROWS": True, "_FILL_PER_SM": 1},
    "cuda_rows_fill_2": {"_CUDA_ROWS": True, "_FILL_PER_SM": 2},
    "cuda_rows_fill_4": {"_CUDA_ROWS": True, "_FILL_PER_SM": 4},
    "cuda_rows_fill_8": {"_CUDA_ROWS": True, "_FILL_PER_SM": 8},
    # odd chunks, so that blocks running together are not a power-of-two number of bytes apart (256 rows of 8 KiB
    # are 2 MiB); bench/walk_order.py's c7 / c9 / c255 / _pad orders ask the same of a plain RMSNorm. H200, session
    # 20 (results/fused_variants_h200_trail.json): as fast as the default (1.168-1.173 against 1.165 ms)
    "cuda_rows_chunk_255": {"_CUDA_ROWS": True, "_MAX_CHUNK": 255},
    "cuda_rows_chunk_257": {"_CUDA_ROWS": True, "_MAX_CHUNK": 257},
    # fp32 rows in the CUDA rows kernel (8 values per thread; run with --dtype fp32, where the default takes the
    # Triton rows kernel); with 16-bit rows the same as cuda_rows. H200, session 20 (results/fused_variants_h200_
    # fp32.json): slower than Triton's, 0.387 / 0.831 against 0.308 / 0.587 ms at 16x4096x2048 / 4096
    "cuda_rows_fp32": {"_CUDA_ROWS": True, "_CUDA_ROWS_FP32": True},
    # session 28: no work list below this many rows (the kernel's SPANS form, _CUDA_ROWS_SPANS_MAX_ROWS): two
    # launches instead of three; the work-list kernel alone took 3.5-5.9 us of ~31 at 8x2048x896 (plan_ms, H200,
    # sessions 17-27)
    "cuda_spans": {"_CUDA_ROWS": True, "_CUDA_ROWS_SPANS_MAX_ROWS": 1 << 40},
    "cuda_spans_s4": {"_CUDA_ROWS": True, "_CUDA_ROWS_SPANS_MAX_ROWS": 1 << 40, "_CUDA_ROWS_STAGES": 4},
    # the reduce kernel's [chunks, columns] tile (default (16, 128)): at 8x2048x896 it has 8 x 7 programs, each
    # summing 128 partial rows; narrower column blocks give 4x the programs (H100: one chunk per step,
    # serial_reduce, cost +9.5 us there: bench/results/fused_variants_h100.json)
    "reduce_16x32": {"_CUDA_ROWS": True, "_REDUCE_TILE": (16, 32)},
    "reduce_64x32": {"_CUDA_ROWS": True, "_REDUCE_TILE": (64, 32)},
    # column blocks narrowed until ~4 programs per SM (_REDUCE_PROGRAMS_PER_SM; at 896: 128 x 16, 448 programs)
    "reduce_fill_4": {"_CUDA_ROWS": True, "_REDUCE_PROGRAMS_PER_SM": 4},
    "cuda_spans_reduce_fill_4": {"_CUDA_ROWS": True, "_CUDA_ROWS_SPANS_MAX_ROWS": 1 << 40,
                                 "_REDUCE_PROGRAMS_PER_SM": 4},
    # ... with chunks half as long at small batches (more warps per SM for the walk; twice the partial rows, which
    # cost +8 us at 896 with the work list and the default reduce: fill_8, session 25)
    "cuda_spans_reduce_fill_4_fill_8": {"_CUDA_ROWS": True, "_CUDA_ROWS_SPANS_MAX_ROWS": 1 << 40,
                                        "_REDUCE_PROGRAMS_PER_SM": 4, "_FILL_PER_SM": 8},
    "cuda_rows_16": {"_CUDA_ROWS": True, "_CUDA_ROWS_VALUES": 16, "_CUDA_ROWS_STAGES": 3},
    "cuda_rows_16_s4": {"_CUDA_ROWS": True, "_CUDA_ROWS_VALUES": 16, "_CUDA_ROWS_STAGES": 4},
    # the alternatives to this session's defaults first, so that a run cut short by its time cap still has them
    "8_warps_at_4096": {"_ROWS_STATS_REGISTER_CAP": {}},  # no register cap: the statistics' warp rule everywhere
    "4_warps_160_registers": {"_ROWS_STATS_REGISTER_CAP": {(9, 4096, 2): (4, 160)}},  # 3 per SM, fewer spare regs
    # session 15 (Triton rows kernel): row t+1 loaded where it is used, the loop software-pipelined with this many
    # stages (cp.async into shared memory, S - 1 rows in flight per program). H200, session 17: pipeline_3 1.196 ms,
    # pipeline_3_8_warps 1.186 at 64x4096x4096, none near the CUDA rows kernel (docs/fused_forward.md)
    "pipeline_2": {"_PIPELINE_STAGES": 2},
    "pipeline_3": {"_PIPELINE_STAGES": 3},
    "pipeline_4": {"_PIPELINE_STAGES": 4},
    # 8 uncapped warps at 4096: 80 registers with Triton 3.9 (3 programs per SM), 108 with 3.6 (2 per SM)
    "pipeline_3_8_warps": {"_PIPELINE_STAGES": 3, "_ROWS_STATS_REGISTER_CAP": {}},
    "pipeline_4_8_warps": {"_PIPELINE_STAGES": 4, "_ROWS_STATS_REGISTER_CAP": {}},
    # D = 5120 (6144) as two tiles, 4096 + 1024 (2048) values on 8 warps, 2 programs per SM in bf16 (127 registers
    # with Triton 3.6 at sm_90a), instead of a padded 8192 on 16 warps, one program per SM. H200, session 17: 0.480
    # against the Triton default's 0.530 ms at 16x4096x5120, still behind the CUDA rows kernel. Since session 26 the
    # default for 16-bit rows of 4112-5120 (_split_tail); split_tail forces it on every dtype and tail,
    # triton_rows_unsplit off (the Triton default before)
    "split_tail": {"_ROWS_SPLIT_TAIL": True},
    "triton_rows_unsplit": {"_CUDA_ROWS": False, "_ROWS_SPLIT_TAIL": False},
    # ... and from a padded 4096 on (D = 2560, 3072), where the static counts say the second reduction costs more
    # than the padding saves (the reason for _ROWS_SPLIT_FROM = 8192)
    "split_tail_from_4096": {"_ROWS_SPLIT_TAIL": True, "_ROWS_SPLIT_FROM": 4096},
    # cache hints on the default loop, e.g. an L2 prefetch of the row this many rows past the one loaded into
    # registers. H200, session 17: prefetch_2 1.264 ms at 64x4096x4096 (the others not timed)
    "prefetch_1": {"_PREFETCH_ROWS": 1},
    "prefetch_2": {"_PREFETCH_ROWS": 2},
    "prefetch_4": {"_PREFETCH_ROWS": 4},
    "prefetch_2_8_warps": {"_PREFETCH_ROWS": 2, "_ROWS_STATS_REGISTER_CAP": {}},  # 2 uncapped programs per SM
    "prefetch_l1_1": {"_PREFETCH_ROWS": 1, "_PREFETCH_L1": True},  # into the L1 as well
    "prefetch_l1_2": {"_PREFETCH_ROWS": 2, "_PREFETCH_L1": True},
    "x_evict_first": {"_X_EVICTION": "evict_first"},  # x read once: its lines leave the L2 first
    "prefetch_2_x_evict_first": {"_PREFETCH_ROWS": 2, "_X_EVICTION": "evict_first"},
    # the bare kernel's rows per program at most (default 1; the fused kernel's stay _MAX_CHUNK = 256)
    "bare_chunk_128": {"_BARE_MAX_CHUNK": 128},
    "bare_chunk_8": {"_BARE_MAX_CHUNK": 8},
    "exact_rstd": {"_RSQRT_RSTD": False},  # rstd by IEEE sqrt and reciprocal (bare and fused), not the hardware rsqrt
    "exact_inverse_norm": {"_RSQRT_INV": False},  # 1 / ||y_t|| by IEEE sqrt and division, not the hardware rsqrt
    "row_tiles": {"_ROWS_ONE_ROW_MIN_D": 1 << 30},  # 2-D row tiles with the shifted reload of row t+1
    "row_tiles_2048": {"_ROWS_ONE_ROW_MIN_D": 1 << 30, "_ROWS_TILE": 2048},
    # warps of a one-row step with statistics, uncapped (the bare kernel keeps its own rule, _ROWS_BYTES_PER_THREAD)
    "32_values_per_thread": {"_ROWS_STATS_VALUES_PER_THREAD": 32, "_ROWS_STATS_MIN_WARPS": (1 << 30, 4),
                             "_ROWS_STATS_REGISTER_CAP": {}},
    "8_values_per_thread": {"_ROWS_STATS_VALUES_PER_THREAD": 8, "_ROWS_STATS_REGISTER_CAP": {}},
    "4_warps_at_2048": {"_ROWS_STATS_MIN_WARPS": (1 << 30, 4), "_ROWS_STATS_REGISTER_CAP": {}},
    "up_to_32_warps": {"_ROWS_MAX_WARPS": 32, "_ROWS_STATS_REGISTER_CAP": {}},
    "bare_16_values_per_thread": {"_ROWS_BYTES_PER_THREAD": 32},  # the bare kernel at the statistics' warps
    "separate_sums": {"_JOINT_SUMS": False},  # three block reductions per row instead of one
    "serial_reduce": {"_REDUCE_TILE": (1, 256)},  # the reduce kernel loads one chunk per step
    "serial_plan": {"_PLAN_TILE": 16},  # the work-list kernel writes one chunk per sequence per step (per program)
    "chunk_32": {"_MAX_CHUNK": 32},
    "chunk_128": {"_MAX_CHUNK": 128},  # the default before session 16 (chunk_256 in the tables before it)
    "chunk_512": {"_MAX_CHUNK": 512},
    "sliced": {"_ROWS_MAX_BLOCK_D": 0},  # the column-sliced kernel (the default above D = 8192)
    # session 21's statistics in no fixed order (unordered_c*: relaxed fp32 atomics instead of partial rows) were
    # timed in session 22 (results/fused_variants_h200_unordered.json: 2.1x at 4-row chunks, tying the default at
    # 64), then removed with the option in session 23 (its last version: git show b49763b:gainrl_kernels/...)
}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def error_status(e: Exception, what: str = "error") -> str:
    """A failure recorded as a row's status: ``what``, the exception's type and its first line (160 characters)."""
    text = str(e).strip()
    return f"{what}: {type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"


def parse_names(p: argparse.ArgumentParser, option: str, spec: str, known) -> list[str]:
    """The names of a comma list ``spec`` in its order (empty: none), each one of ``known``; otherwise ``p`` exits
    with an error naming the ``option``, the unknown names and the known ones."""
    names = [n for n in spec.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        p.error(f"{option}: unknown {unknown}; known: {', '.join(known)}")
    return names


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    """``"64x4096x4096,8x2048x896"`` -> [(64, 4096, 4096), (8, 2048, 896)] (any number of dimensions)."""
    return [tuple(int(v) for v in s.split("x")) for s in spec.split(",") if s]


def rows_kernel_settings(name: str, settings: dict) -> dict:
    """``settings`` with ``_CUDA_ROWS = False`` added where the variant tunes the Triton rows kernel (no _CUDA_ROWS*
    knob of its own; the default variant stays as it is)."""
    if name == "default" or any(k.startswith("_CUDA_ROWS") for k in settings):
        return settings
    return {"_CUDA_ROWS": False, **settings}


@contextmanager
def overridden(settings: dict, module: ModuleType = M) -> Iterator[None]:
    """``settings`` (knob name -> value) set on ``module`` (default: the forward's host module, which holds the
    forward's knobs; the backward's ``_BWD_*`` knobs are gainrl_kernels.rmsnorm_angle_backward's) while the block
    runs. A name the module lacks raises AttributeError (a knob set on the wrong module would change nothing)."""
    old = {k: getattr(module, k) for k in settings}
    for k, v in settings.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def write_rows(out: Path | None, rows: list[dict], cuda: bool) -> None:
    """Rewrite the record {device, rows} at ``out`` (nothing when None): called after every row, so that a run cut
    short keeps what it timed."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows), indent=1))


def record_row(out: Path | None, rows: list[dict], row: dict, cuda: bool) -> None:
    """Append ``row`` to ``rows`` and rewrite the record at ``out`` (``write_rows``)."""
    rows.append(row)
    write_rows(out, rows, cuda)


def exit_code(rows: list[dict]) -> int:
    """A script's exit status: 0 when every row's status is ok or skipped (a yardstick or kernel this machine lacks),
    else 1 (the failures are results in the record)."""
    return 0 if all(r["status"].startswith(("ok", "skipped")) for r in rows) else 1


def graph_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of fn replayed from a CUDA graph (the plan's small torch ops included)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def yardstick_rows(batch: int, length: int, dim: int, x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor,
                   cuda: bool, reps: int) -> list[dict]:
    """The other bare RMSNorms a user would reach for, graph-timed like the variants: HF's RMSNorm formula
    (``run_kernels_bench.torch_rmsnorm``) through torch.compile (Inductor fuses it into one kernel; on a GPU only, as
    a CPU compile would dominate a smoke run), PyTorch's own ``F.rms_norm`` (``aten::_fused_rms_norm`` on CUDA) and
    Liger-Kernel's RMSNorm (a row ``liger_bare`` either way: timed, or why it was skipped). Each y is checked against
    ``y_ref`` (the default fused call's) first, as the variants' are."""
    yardsticks = {"torch_native_bare": ("F.rms_norm (PyTorch's fused kernel)", lambda: torch_native_rmsnorm(x, w))}
    if cuda:
        compiled = torch.compile(torch_rmsnorm, dynamic=False)
        yardsticks["torch_compile_bare"] = ("torch.compile RMSNorm", lambda: compiled(x, w))
    rows = []
    why_not = liger_unavailable(x)
    if why_not:
        rows.append(dict(B=batch, L=length, D=dim, variant="liger_bare", status=why_not))
    else:
        yardsticks["liger_bare"] = ("Liger RMSNorm", lambda: liger_rmsnorm(x, w))
    for variant, (label, fn) in yardsticks.items():
        row = dict(B=batch, L=length, D=dim, variant=variant)
        try:
            torch.testing.assert_close(fn(), y_ref, rtol=1e-2, atol=1e-2)
            row.update(status="ok" if cuda else "ok (smoke: checked, not timed)")
            if cuda:
                row.update(bare_ms=graph_time(fn, reps) * 1e3)
                print(f"| {batch} | {length} | {dim} | {label} (no stats) | {row['bare_ms']:.3f} | | | | | | |",
                      flush=True)
        except Exception as e:  # noqa: BLE001 -- recorded, like a failing variant
            row.update(status=error_status(e))
            print(f"| {batch} | {length} | {dim} | {label} | {row['status']} |||||||", flush=True)
        rows.append(row)
    return rows


def unfused_rows(batch: int, length: int, dim: int, x: torch.Tensor, w: torch.Tensor, cu: torch.Tensor, s_ref,
                 cuda: bool, reps: int) -> list[dict]:
    """What the fused forward replaces: our bare RMSNorm, then ``angle_stats`` reading its y back (one row per
    backend the machine has; graph-timed on a GPU, the statistics checked against the fused call's), and
    ``angle_stats`` alone. Where this beats the fused call, small shapes pay more in fixed launches than in bytes."""
    from gainrl_kernels.api import angle_stats, whole_sequence_offsets

    off = whole_sequence_offsets(cu)
    backends = ["triton"] + (["cuda"] if cuda and has_ext_kernel("cuda") else [])
    rows = []
    for backend in backends:
        row = dict(B=batch, L=length, D=dim, variant=f"bare_then_angle_stats_{backend}")
        try:
            def unfused():
                y, _ = M.rmsnorm_angle(x, w, 1e-6, validate=False)
                return angle_stats(y, cu, off, backend=backend, validate_values=False)
            for a, b in zip(unfused(), s_ref):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
            row.update(status="ok" if cuda else "ok (smoke: checked, not timed)")
            if cuda:
                y, _ = M.rmsnorm_angle(x, w, 1e-6, validate=False)
                row.update(unfused_ms=graph_time(unfused, reps) * 1e3, angle_stats_ms=graph_time(
                    lambda: angle_stats(y, cu, off, backend=backend, validate_values=False), reps) * 1e3)
                print(f"| {batch} | {length} | {dim} | bare, then angle_stats ({backend}) | | "
                      f"{row['unfused_ms']:.3f} | | | | | | angle_stats alone {row['angle_stats_ms']:.3f} ms",
                      flush=True)
        except Exception as e:  # noqa: BLE001 -- recorded, like a failing variant
            row.update(status=error_status(e))
        rows.append(row)
    return rows


def check_and_time(x: torch.Tensor, w: torch.Tensor, cu: torch.Tensor, y_ref: torch.Tensor, s_ref, cuda: bool,
                   device: str, args: argparse.Namespace) -> dict:
    """Row fields of the module settings in force: the fused output checked against the default's, then (on a GPU)
    bare and fused graph times (ms), their ratio and the eager fused time."""
    y, s = M.rmsnorm_angle(x, w, 1e-6, cu, validate=False)
    x2d = x.reshape(-1, x.shape[-1])
    forward = M._stats_plan(x2d, cu, None, None, w).kernel  # the forward kernel these settings run
    # another reduction order may move rstd by an ulp: y by one bf16 step now and then
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(s, s_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    if not cuda:
        return dict(status="ok (smoke: checked, not timed)", forward=forward)
    bare, fused = float("inf"), float("inf")
    for _ in range(args.rounds):  # alternated: clock and temperature drift hits both alike
        bare = min(bare, graph_time(lambda: M.rmsnorm_angle(x, w, 1e-6, validate=False), args.reps))
        fused = min(fused, graph_time(lambda: M.rmsnorm_angle(x, w, 1e-6, cu, validate=False), args.reps))
    eager = time_it(lambda: M.rmsnorm_angle(x, w, 1e-6, cu, validate=False), device, 0.2, args.reps)
    # the same launches with every segment empty: each chunk takes the rows kernel's loop without statistics, so this
    # against the bare time prices the chunked walk itself, and the fused time against this the statistics' work
    off = torch.zeros(cu.numel() - 1, 2, dtype=torch.int32, device=x.device)
    no_seg = graph_time(lambda: M.rmsnorm_angle(x, w, 1e-6, cu, off, validate=False), args.reps)
    out = dict(status="ok", forward=forward, bare_ms=bare * 1e3, fused_ms=fused * 1e3, ratio=fused / bare,
               eager_ms=eager * 1e3, no_segments_ms=no_seg * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="bare and fused timed alternately this many times (min)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--variants", default="", help="comma list of variant names to run (default: all); 'default' "
                   "always runs first, the yardstick of ratio_vs_default_bare")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="x and the weight (fp32 with --variants cuda_rows_fp32: the CUDA rows kernel on fp32 rows)")
    p.add_argument("--shapes", default="64x4096x4096,16x4096x2048,16x4096x5120,8x2048x896",
                   help="comma list of BxLxD (GPU only; the first is the goal shape)")
    args = p.parse_args(argv)
    wanted = parse_names(p, "--variants", args.variants, VARIANTS)
    variants = {k: v for k, v in VARIANTS.items() if not wanted or k == "default" or k in wanted}
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    # the goal shape first: a run cut short by its time cap still answers it
    shapes = parse_shapes(args.shapes) if cuda else [(2, 16, 40)]
    rows: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print("| B | L | D | variant | bare graph ms | fused graph ms | fused / bare | fused / default bare "
          "| fused eager ms | copy GB/s frac | no segments ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, length, dim in shapes:
        x, cu = make_input(batch, length, dim, DTYPES[args.dtype], device)
        w = torch.rand(dim, device=device, dtype=DTYPES[args.dtype]) + 0.5
        copy_s = graph_time(lambda: x.clone(), args.reps) if cuda else None
        bare0 = None  # the yardstick every variant is also compared with: the default's bare RMSNorm
        y_ref, s_ref = M.rmsnorm_angle(x, w, 1e-6, cu, validate=False)
        if cuda:  # the device-side work list alone (one launch)
            plan_ms = graph_time(lambda: M._stats_plan(x, cu, None, None), args.reps) * 1e3
            rows.append(dict(B=batch, L=length, D=dim, variant="plan_only", status="ok", plan_ms=plan_ms))
            print(f"| {batch} | {length} | {dim} | plan kernel alone | | {plan_ms:.3f} | | | | | |", flush=True)
        rows.extend(yardstick_rows(batch, length, dim, x, w, y_ref, cuda, args.reps))
        rows.extend(unfused_rows(batch, length, dim, x, w, cu, s_ref, cuda, args.reps))
        for name, settings in variants.items():
            settings = rows_kernel_settings(name, settings)
            row = dict(B=batch, L=length, D=dim, variant=name)
            if cuda and settings.get("_CUDA_ROWS") and not has_ext_kernel("cuda", "rmsnorm_angle_rows_ext"):
                row.update(status="skipped: the extension has no CUDA rows kernel (build it with CUDA)")
            else:
                try:
                    with overridden(settings):
                        row.update(check_and_time(x, w, cu, y_ref, s_ref, cuda, device, args))
                    bare0 = row["bare_ms"] if bare0 is None and "bare_ms" in row else bare0
                    if "fused_ms" in row:
                        row.update(ratio_vs_default_bare=row["fused_ms"] / bare0,
                                   bw_frac_of_copy=copy_s * 1e3 / row["fused_ms"])
                except Exception as e:  # noqa: BLE001 -- a failing variant is a result, not a crash
                    row.update(status=error_status(e))
            if "fused_ms" in row:  # the variant's name, then the forward kernel it ran
                print(f"| {batch} | {length} | {dim} | {name} [{row['forward']}] | {row['bare_ms']:.3f} | "
                      f"{row['fused_ms']:.3f} | "
                      f"{row['ratio']:.3f} | {row['ratio_vs_default_bare']:.3f} | {row['eager_ms']:.3f} | "
                      f"{row['bw_frac_of_copy']:.2f} | {row['no_segments_ms']:.3f} |", flush=True)
            else:
                print(f"| {batch} | {length} | {dim} | {name} | {row['status']} |||||||", flush=True)
            record_row(args.out, rows, row, cuda)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
