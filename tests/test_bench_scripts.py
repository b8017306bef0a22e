"""The benchmark scripts run end to end on tiny shapes (speed is measured by the scripts, never asserted here)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_angle_bench_script(tmp_path):
    import run_angle_bench

    out = tmp_path / "angle.json"
    assert run_angle_bench.main(["--cases", "2x64x32", "--min-time", "0", "--max-reps", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"released", "torch_vectorised", "torch_compile", "torch_lean"}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows)
    # every method computes the same metric (bf16 inputs: the released way normalises in bf16)
    assert all(r["diff_reference"] == "torch_vectorised" and r["max_abs_diff"] < 2e-2 for r in rows)
    assert max(r["max_abs_diff"] for r in rows if r["method"] != "released") < 1e-5


def test_kernels_bench_script(tmp_path):
    import run_kernels_bench

    out = tmp_path / "kernels.json"
    assert run_kernels_bench.main(["--smoke", "--out", str(out)]) == 0
    kernels = {r["kernel"] for r in json.loads(out.read_text())["rows"]}
    assert kernels == {"rmsnorm", "angle_stats", "pairwise"}


def test_fused_variants_script(tmp_path):
    import fused_variants

    out = tmp_path / "variants.json"
    assert fused_variants.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == set(fused_variants.VARIANTS) | {"bare_then_angle_stats_triton",
                                                                           "torch_native_bare", "liger_bare"}
    liger = [r for r in rows if r["variant"] == "liger_bare"]
    assert liger[0]["status"].startswith("skipped: Liger's RMSNorm needs a GPU"), liger  # recorded, not an error
    assert all(r["status"].startswith("ok") for r in rows if r["variant"] != "liger_bare"), rows
    with pytest.raises(SystemExit):  # an unknown name is refused before anything runs (parse_names)
        fused_variants.main(["--smoke", "--variants", "default,no_such_variant"])


def test_fused_backward_script(tmp_path):
    """bench/fused_backward.py: every method's dx and dw match the float64 autograd of HF's RMSNorm (interpreter,
    tiny; torch.compile is GPU-only there)."""
    import fused_backward

    out = tmp_path / "backward.json"
    variants = list(fused_backward.BWD_VARIANTS)
    assert fused_backward.main(["--smoke", "--out", str(out), "--variants", ",".join(variants)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"fused", "bare", "hf_eager", "torch_native", "backward_only", "liger",
                                           *(f"backward_only:{v}" for v in variants)}
    liger = [r for r in rows if r["method"] == "liger"]
    assert liger[0]["status"].startswith("skipped: Liger's RMSNorm needs a GPU"), liger  # recorded, not an error
    assert all(r["status"].startswith("ok") for r in rows if r["method"] != "liger"), rows
    from gainrl_kernels import rmsnorm_angle_backward as B  # the variants' knobs are set around each call only

    assert B._BWD_ROW_STEP is None and B._BWD_MAXNREG is None and B._BWD_PROGRAMS_PER_SM == 4
    assert B._BWD_STAGES == 3 and B._BWD_SPLIT_CAP_TAIL == 1024


def test_probe_overhead_script(tmp_path):
    """bench/probe_overhead.py: the fused probe's metrics match the hook's and every method runs (interpreter, tiny
    model; timing is GPU-only)."""
    import probe_overhead

    out = tmp_path / "probe.json"
    assert probe_overhead.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["status"]) for r in rows] == [("forward", "ok (smoke: checked, not timed)"),
                                                        ("train", "ok (smoke: checked, not timed)")]


def test_walk_order_script(tmp_path):
    """Every row order of bench/walk_order.py gives HF's RMSNorm (checked inside the script, interpreter, tiny)."""
    import walk_order

    out = tmp_path / "walk.json"
    assert walk_order.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["order"] for r in rows} == set(walk_order.orders(40, 2))


def test_fused_static_script(tmp_path):
    """Lowers the fused forward for real GPUs (needs Triton's ptxas; a subprocess, as TRITON_INTERPRET is set)."""
    import os
    import subprocess

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_triton_compile import PTXAS

    if PTXAS is None:
        pytest.skip("Triton's bundled ptxas not found")
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    def lowered(*variant: str) -> dict:
        res = subprocess.run([sys.executable, str(BENCH / "fused_static.py"), "--dims", "4096", "--out", str(out),
                              *variant], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        return {(r["dtype"], r["kernel"]): r for r in json.loads(out.read_text())["rows"]}

    rows = lowered()
    assert set(rows) == {(dt, k) for dt in ("bf16", "fp32") for k in ("bare", "fused")}
    assert all(r["spill_bytes"] == 0 for r in rows.values())
    # the fused row step keeps the bare step's one block reduction
    assert rows["bf16", "fused"]["loop_bar_sync"] == rows["bf16", "bare"]["loop_bar_sync"]
    # machine instructions per row step (None only without Triton's nvdisasm)
    counts = [r["sass_per_step"] for r in rows.values()]
    assert all(c is None for c in counts) or all(isinstance(c, int) and c > 0 for c in counts), counts
    # --variant applies a fused_variants.py variant: three block reductions per row step, three times the barriers
    separate = lowered("--variant", "separate_sums")
    assert separate["bf16", "fused"]["loop_bar_sync"] == 3 * rows["bf16", "fused"]["loop_bar_sync"]
    # --unaligned lowers without the vector hints: scalar loads, several per thread where one vector did
    unaligned = lowered("--unaligned")
    assert json.loads(out.read_text())["aligned"] is False
    assert unaligned["bf16", "bare"]["loop_loads"] > rows["bf16", "bare"]["loop_loads"]


def test_eager_overhead_script(tmp_path):
    import eager_overhead

    out = tmp_path / "eager.json"
    assert eager_overhead.main(["--device", "cpu", "--shape", "2x16x8", "--reps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["call"] for r in rows] == ["stats", "concentration", "both", "both_via_ops", "released"]
    assert all(r["latency_us"] > 0 for r in rows)


def test_profile_fused_script(capsys):
    import profile_fused

    assert profile_fused.main(["--smoke"]) == 0
    assert "bare then fused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_fused.main(["--shape", "3x4"])


def test_source_fingerprint_matches_head():
    """bench/source_fingerprint.sh gives the working tree's fingerprint that it gives HEAD's files, where the tree
    is clean (a fresh clone: CI), so a GPU run's summary line can be matched to a commit."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("no git checkout")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gainrl_kernels", "gainrl", "csrc", "bench",
                            "tests"], cwd=root, capture_output=True, text=True).stdout
    if dirty.strip():
        pytest.skip("uncommitted changes in the fingerprinted directories")
    script = str(root / "bench" / "source_fingerprint.sh")
    here = subprocess.run(["bash", script], capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["bash", script, "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(here) == 12 and here == head



WALK_LOWERINGS = """
import json, sys
sys.path.insert(0, {bench!r}); sys.path.insert(0, {tests!r})
import test_triton_compile as t, walk_order as W
sig = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", R="i32", D="i32", pitch="i32", eps="fp32")
atomic = dict(sig, sums_ptr="*fp32", G="i32", flush="i32")
group = dict(sig, part_ptr="*fp32", done_ptr="*i32", out_ptr="*fp32", part_pitch="i32", G="i32", n_chunks="i32")
cases = [(W._atomic_kernel, atomic, dict(BLOCK_D=4096, TILE_R=t_r, ROWS=8, EACH=each), 4 * t_r)
         for t_r in (1, 4) for each in ("step", "chunk")]
cases += [(W._group_kernel, group, dict(BLOCK_D=4096, TILE_R=4, ROWS=8, COMBINE=c, DISCARD=d, LINES=128), 16)
          for c, d in ((False, False), (True, False), (True, True))]
throttle = dict(sig, counter_ptr="*i32", err_ptr="*i32", n_iter="i32", slack="i32", spin_limit="i32")
aligned = ("x_ptr", "w_ptr", "y_ptr", "D", "pitch")  # as a launch on contiguous 16-byte aligned rows specialises
cases += [(W._throttle_kernel, throttle, dict(BLOCK_D=4096, WAIT=wait, __aligned__=aligned), 4, W._THROTTLE_MAXNREG)
          for wait in (False, True)]
out = []
for fn, s, consts, warps, *cap in cases:
    k = t.compile_kernel(fn, s, consts, t.TARGETS["sm_90a"], warps, maxnreg=cap[0] if cap else None)
    out.append(t.ptxas_report(k.asm["ptx"], "sm_90a"))
print(json.dumps(out))
"""


def test_walk_order_kernels_lower_for_sm90a():
    """The atomic and group orders' kernels compile for sm_90a (the interpreter accepts what the compiler refuses,
    e.g. a loop-carried accumulator changing shape): every EACH mode and tile, and the group kernel with and without
    its combine and discards (inline PTX); the throttled strided kernel within c1's 64 registers (8 programs per
    SM, all resident)."""
    import os
    import subprocess

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_triton_compile import PTXAS

    if PTXAS is None:
        pytest.skip("Triton's bundled ptxas not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = WALK_LOWERINGS.format(bench=str(BENCH), tests=str(BENCH.parent / "tests"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(reports) == 9 and all("Used" in r for r in reports)
    for r in reports[-2:]:
        assert int(re.search(r"Used (\d+) registers", r).group(1)) <= 64 and "0 bytes spill stores" in r, r


def test_cluster_walk_script_without_a_gpu(capsys):
    """bench/cluster_walk.py checks its variant names and, without an sm_90 GPU, says so and exits 0."""
    import cluster_walk

    with pytest.raises(SystemExit):
        cluster_walk.main(["--variants", "cluster8_c8,nonsense"])
    if not torch.cuda.is_available():
        assert cluster_walk.main(["--variants", "walk_c1,cluster8_c8"]) == 0
        assert "needs a CUDA GPU" in capsys.readouterr().out


def test_cluster_walk_kernel_compiles_without_spills():
    """bench/cluster_walk.cu's variants lower for sm_90a (clusters, distributed shared memory) without spills, with
    the flags torch.utils.cpp_extension adds (nvcc -cubin, device code only), compiled as load_inline does: a copy of
    the source in another directory, headers found through cluster_walk.INCLUDE_DIRS alone."""
    import subprocess

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_csrc_compile import DEFAULT_TORCH_NVCC_FLAGS, NVCC

    if NVCC is None:
        pytest.skip("nvcc not found")
    import tempfile

    import cluster_walk

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "cuda.cu"
        copy.write_text(cluster_walk.SOURCE.read_text())
        res = subprocess.run([NVCC, "-cubin", "-o", f"{tmp}/k.cubin", str(copy),
                              *(f"-I{d}" for d in cluster_walk.INCLUDE_DIRS), "-arch=sm_90a", "-O3", "-std=c++17",
                              *DEFAULT_TORCH_NVCC_FLAGS, "-Xptxas", "-v"],
                             capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    assert len(spills) == 2 * len(cluster_walk.VARIANTS) and not any(spills), res.stderr[-3000:]


def test_gpu_summary_lines():
    """bench/gpu_summary.py (the lines gpu_check.sh puts into summary.txt) on hand-made records: the fastest fused
    variant against the default's bare kernel and the goal, failed variants, walk orders whose sums differ, methods
    not yet timed, a cut-off score run."""
    import gpu_summary as S

    def fused(variant, fused_ms, ratio_bare, **kw):
        return dict(B=64, L=4096, D=4096, variant=variant, status="ok", bare_ms=1.0, fused_ms=fused_ms,
                    ratio=fused_ms, ratio_vs_default_bare=ratio_bare, **kw)
    rows = [dict(B=64, L=4096, D=4096, variant="plan_only", status="ok", plan_ms=0.004),
            fused("default", 1.10, 1.10, no_segments_ms=1.09), fused("cuda_rows_fill_1", 1.04, 1.04),
            dict(B=64, L=4096, D=4096, variant="cuda_rows_fill_8", status="error: RuntimeError: x"),
            dict(B=64, L=4096, D=4096, variant="torch_native_bare", status="ok", bare_ms=1.1),
            dict(B=64, L=4096, D=4096, variant="liger_bare", status="ok", bare_ms=1.25)]
    (line,) = S.variants(dict(rows=rows))
    assert "F.rms_norm bare 1.100 ms (default fused / it 1.000)" in line
    assert "Liger bare 1.250 ms (default fused / it 0.880)" in line
    assert "default fused/bare 1.100 (1.100 ms)" in line and "fastest cuda_rows_fill_1 1.040 ms = 1.040" in line
    assert "(goal <= 1.05: met), plan 4.0 us" in line
    assert "errors: ['cuda_rows_fill_8']" in line
    (line,) = S.variants(dict(rows=[dict(B=2, L=16, D=40, variant="default", status="ok (smoke)")]))
    assert line == "fused 2x16x40: (1 variants checked, not timed)"
    table = S.variant_table(dict(rows=rows + [dict(B=8, L=2048, D=896, variant="default", status="ok", bare_ms=0.5,
                                                   fused_ms=0.6)]))
    assert table[0] == "| variant | 64x4096x4096 | 8x2048x896 |" and table[1] == "|---|---|---|"
    assert table[2] == "| default | 1.1000 (1.000) | 0.6000 (1.000) |"
    assert table[3] == "| cuda_rows_fill_1 | 1.0400 (0.945) | - |"
    assert table[4:] == ["| our bare | 1.0000 | 0.5000 |", "| F.rms_norm bare | 1.1000 | - |",
                         "| Liger bare | 1.2500 | - |"]
    assert S.variant_table(dict(rows=[dict(B=2, L=16, D=40, variant="default", status="ok (smoke)")])) == []
    walk = [dict(R=8, D=48, order="c1", status="ok", ms=1.0), dict(R=8, D=48, order="atomic_c1", status="ok",
            ms=1.1, sums="differs: ..."), dict(R=8, D=48, order="nosync8_c8_sm1", status="ok", sums="not combined"),
            dict(R=8, D=48, order="t8_c8", status="error: X")]
    (line,) = S.walk(dict(rows=walk))
    assert line.startswith("walk D=48: c1@8 1.000, atomic_c1@8 1.100")
    assert "errors: ['t8_c8']" in line and "sums differ: ['atomic_c1']" in line
    cluster = [dict(variant="triton_c1", status="ok", ms=1.0, vs_c1=1.0, sums="none"),
               dict(variant="cluster8_c8", status="ok", ms=1.05, vs_c1=1.05, sums="differs: ..."),
               dict(variant="cluster8_c4", status="error: RuntimeError: x"),
               dict(variant="pc8_c16_full", status="ok", ms=1.02, vs_c1=1.02, sums="ok", pairs="ok", clusters=16,
                    with_reduce_vs_c1=1.03),
               dict(variant="pc16_c8_full", status="ok", ms=1.02, vs_c1=1.02, sums="ok", pairs="differs: ...")]
    (line,) = S.cluster(dict(rows=cluster))
    assert line.startswith("cluster walk: triton_c1 1.000 (1.000), cluster8_c8 1.050 (1.050)")
    assert "errors: ['cluster8_c4']" in line and "sums differ: ['cluster8_c8', 'pc16_c8_full']" in line
    assert "pc8_c16_full 1.020 (1.020) [16 clusters] [with the reduce 1.030]" in line
    (line,) = S.cluster(dict(rows=[dict(variant="walk_c1", status="ok", ms=1.0, vs_c1=None, sums="none")]))
    assert line == "cluster walk: walk_c1 1.000 (-)"  # the Triton c1 yardstick failed
    (line,) = S.backward(dict(rows=[dict(B=1, L=2, D=3, method="fused", status="ok", ms=2.0),
                                   dict(B=1, L=2, D=3, method="bare", status="ok (smoke)"),
                                   dict(B=1, L=2, D=3, method="liger", status="skipped: no liger-kernel")]))
    assert line == "fwd+bwd 1x2x3 ms: fused 2.000"
    (line,) = S.backward(dict(rows=[dict(B=1, L=2, D=3, method="torch_compile", status="error timing: X")]))
    assert line.endswith("errors: ['torch_compile']")
    (line,) = S.score(dict(partial=True, wall_s={"released": [1.23, 2.0]}))
    assert "PARTIAL" in line and "[1.2, 2.0]" in line
    assert S.angle(dict(rows=[dict(status="ok"), dict(status="ok")])) == ["angle_bench rows by status: {'ok': 2}"]
    assert S.probe(dict(rows=[dict(B=8, L=2048, mode="train", status="ok", none_ms=100.0, hook_ms=101.0,
                                   fused_ms=100.25), dict(B=2, L=16, mode="forward", status="ok (smoke)")])) == [
        "probe 8x2048 train: none 100.000 ms, hook +1.00%, fused +0.25%", "probe 2x16 forward: ok (smoke)"]
    assert S.main(["nonsense", "x.json"]) == 2


def test_sass_hot_loop_skips_long_forward_branches():
    """bench/sass_loops.py: the hot path of a loop drops the outermost region a conditional forward branch inside
    it skips when the region is long (a nested one is not counted twice), keeps short ones and unconditional
    jumps; the whole loop count is unchanged."""
    from sass_loops import sass_hot_loop_instructions, sass_loop_instructions

    lines, addr = [], 0

    def op(text):
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/                   {text} ;")
        addr += 16

    lines.append(".L_x_0:")
    op("IADD3 R1, R1, 0x1, RZ")
    op("@P0 BRA `(.L_x_1)")            # skips 6: the long region (threshold 5 below)
    op("@P1 BRA `(.L_x_2)")            # nested inside it, skips 2
    op("FADD R2, R2, R3")
    op("FADD R2, R2, R3")
    lines.append(".L_x_2:")
    op("FADD R2, R2, R3")
    op("FADD R2, R2, R3")
    op("FADD R2, R2, R3")
    lines.append(".L_x_1:")
    op("@P2 BRA `(.L_x_3)")            # short: kept
    op("FMUL R4, R4, R4")
    lines.append(".L_x_3:")
    op("BRA `(.L_x_0)")
    sass = "\n".join(lines)
    assert sass_loop_instructions(sass) == 11
    assert sass_hot_loop_instructions(sass, cold=5) == 11 - 6
    assert sass_hot_loop_instructions(sass, cold=100) == 11
    assert sass_hot_loop_instructions("no code") is None


def test_carry_site_packages_import_from_the_copy(tmp_path):
    """bench/make_gpu_carry.py site: the yardsticks' packages (Liger-Kernel) copied without byte code, importable
    from the copy alone, as gpu_check.sh puts .gpu_carry/site on a GPU machine's PYTHONPATH."""
    import os
    import subprocess

    import make_gpu_carry

    site = make_gpu_carry.copy_site_packages(tmp_path, make_gpu_carry.SITE_PACKAGES)
    assert (site / "liger_kernel" / "ops" / "rms_norm.py").is_file()
    assert not list(site.rglob("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    code = "import liger_kernel.ops.rms_norm as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site))
    with pytest.raises(SystemExit, match="no_such_package: not installed"):
        make_gpu_carry.copy_site_packages(tmp_path, ("no_such_package",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's RMSNorm needs a GPU (not the Triton interpreter)")
def test_liger_yardstick_is_hf_rmsnorm():
    """The Liger yardstick computes HF's RMSNorm (y to a bf16 step) and its gradients, on a GPU with liger-kernel;
    elsewhere it says why it cannot run."""
    from fused_backward import check_grads, reference_grads
    from run_kernels_bench import liger_rmsnorm, liger_unavailable, torch_rmsnorm

    x = torch.randn(300, 896, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = (torch.rand(896, device="cuda") + 0.5).to(torch.bfloat16).requires_grad_(True)
    if liger_unavailable(x):
        pytest.skip(liger_unavailable(x))
    dy = torch.randn_like(x)
    dy0 = dy.clone()
    y = liger_rmsnorm(x, w)
    torch.testing.assert_close(y, torch_rmsnorm(x, w), rtol=1e-2, atol=1e-2)
    check_grads(*torch.autograd.grad(y, (x, w), dy), *reference_grads(x, w, dy))
    assert torch.equal(dy, dy0)  # not in place: a replayed backward finds its dy intact


def test_liger_unavailable_on_cpu():
    from run_kernels_bench import liger_unavailable

    assert liger_unavailable(torch.zeros(2, 8)).startswith("skipped: Liger's RMSNorm needs a GPU")


@pytest.fixture(scope="module")
def cluster_walk_emulated(tmp_path_factory):
    """bench/cluster_walk.cu's persistent kernel compiled by g++ against tests/cuda_emulator.py."""
    import ctypes

    sys.path.insert(0, str(BENCH.parent / "tests"))
    import cuda_emulator

    lib = cuda_emulator.build(tmp_path_factory.mktemp("cluster_emu"), f'#include "{BENCH / "cluster_walk.cu"}"\n')
    fn = lib.cluster_walk_emulate
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_longlong] * 2 + [ctypes.c_int]
    return fn


@pytest.mark.parametrize("mode,rg,defer", [(0, 4, 0), (1, 4, 0), (2, 4, 0), (3, 4, 0), (0, 2, 0), (3, 2, 0),
                                           (0, 2, 1), (0, 2, 2), (1, 2, 1), (3, 2, 1), (3, 2, 2)])
@pytest.mark.parametrize("clusters", [1, 2, 3])
def test_persistent_cluster_walk_emulated(cluster_walk_emulated, mode, rg, defer, clusters):
    """The persistent clusters of bench/cluster_walk.cu on a CPU (clusters of 2 blocks of 1024 fibers, 8 rows a block
    and chunk, rg row groups, each chunk's combine deferred `defer` rows into the next; the emulator runs one cluster
    after another, so the first takes every chunk the counter hands out): y is HF's RMSNorm of every row; with
    statistics (modes 0, 3) each chunk's partial row is the sum of its 16 rows' unit vectors, combined across the
    cluster from the other block's shared memory; mode 3 also stores each chunk's Σ ||u||² and adjacent pairs
    inside segments of 32 rows (pairs across row groups, blocks and chunks; none across a segment start)."""
    from cluster_walk import DIM, compare_pair_sums
    from run_kernels_bench import torch_rmsnorm
    from walk_order import compare_block_sums

    chunk, n_chunks, seg_rows = 16, 5, 32
    gen = torch.Generator().manual_seed(mode * 10 + clusters)
    x = (torch.randn(chunk * n_chunks, DIM, generator=gen) + torch.randn(DIM, generator=gen)).to(torch.bfloat16)
    w = (torch.rand(DIM, generator=gen) + 0.5).to(torch.bfloat16)
    y = torch.full_like(x, float("nan"))
    part = torch.full((n_chunks + 1, DIM), float("nan"))  # the partial rows, then (mode 3) the pair sums
    counter = torch.zeros(1, dtype=torch.int32)
    args = (x.data_ptr(), w.data_ptr(), y.data_ptr(), part.data_ptr(), counter.data_ptr())
    assert cluster_walk_emulated(mode, rg, defer, *args, x.shape[0], seg_rows, clusters) == 0
    torch.testing.assert_close(y, torch_rmsnorm(x, w, 1e-6), rtol=2e-2, atol=2e-2)  # rstd may move y by a step
    if mode in (0, 3):
        assert compare_block_sums(y, chunk, part, atol=1e-4) == "ok"
    if mode == 3:
        assert compare_pair_sums(y, chunk, 2, seg_rows, part) == "ok"
    assert cluster_walk_emulated(mode, rg, defer, *args, x.shape[0] - 1, seg_rows, clusters) == 1  # no whole chunks
    assert cluster_walk_emulated(mode, rg, defer, *args, x.shape[0], seg_rows + 1, clusters) == 1


def test_cluster_walk_binding_compiles(tmp_path):
    """bench/cluster_walk.py's torch binding (built on the GPU machine by load_inline) is valid C++ against this
    torch's headers: g++ -fsyntax-only, with an empty stand-in for the one header a CPU wheel of torch lacks."""
    import shutil
    import subprocess

    import cluster_walk
    from torch.utils.cpp_extension import include_paths

    sys.path.insert(0, str(BENCH.parent / "tests"))
    import cuda_emulator

    cxx, cuda_inc = shutil.which("g++"), cuda_emulator.cuda_include_dir()
    if cxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")  # generated at torch's CUDA build only
    src = tmp_path / "binding.cpp"
    src.write_text(cluster_walk.BINDING)
    import sysconfig

    cmd = [cxx, "-std=c++17", "-fsyntax-only", *(f"-I{p}" for p in include_paths()), f"-I{tmp_path / 'stub'}",
           f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
