#!/usr/bin/env bash
# One-call GPU check for issue 3: build the CUDA extension, run the GPU parity tests (CUDA extension + compiled
# Triton kernels on CUDA tensors), run both benchmark scripts, and leave every log and result under $OUT.
#
# How a session with a lent GPU runs it (the `run` tool; one call, nothing to carry, no internet needed):
#     command:   bash bench/gpu_check.sh
#     timeout_s: 570
# then call give_back. The script stops itself after GAINRL_GPU_CHECK_BUDGET seconds (default 470 s, under 8 min;
# each step's timeout is cut to what is left), so 570 leaves room for the kill margin and the copy-back. With ~1-2
# min of machine start-up this spends at most ~11.5 of the 15 device minutes. Budget notes (H100, estimates):
# env ~5-15 s, build ~60-120 s (one .cpp + one .cu, sm_90 only), CUDA parity tests ~20 s, Triton GPU tests ~60-120 s
# (mostly Triton JIT compiles), kernels bench ~40 s, angle bench --grid full gets what is left (~150-250 s; cases
# not started in time are recorded as "skipped: --time-budget" in the JSON, which is rewritten after every case).
#
# Files under $OUT (8 at most come back, all at top level):
#     summary.txt        one line per step: name, exit code, seconds; key result lines (bench/gpu_summary.py);
#                        read this first
#     env.log            nvidia-smi, nvcc, Python/torch/triton/... versions, CPU/memory
#     build.log          python3 setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0), ptxas -v register report
#     tests.log          pytest -v: tests/test_cuda_backend.py and tests/test_rmsnorm_angle_cuda.py (GPU part: the
#                        extension's CUDA kernels), then the Triton kernel tests on CUDA
#     kernels_bench.log  bench/fused_variants.py, bench/run_kernels_bench.py, bench/eager_overhead.py tables;
#                        kernels_cuda.json  the kernel bench rows;   fused_variants.json  fused RMSNorm+angle launch
#                        variants (graph-timed);   eager_overhead.json  the fixed cost of one eager call
#     angle_bench.log    bench/run_angle_bench.py --grid full table and per-case lines;   angle_cuda.json  its rows
#     profile.log        (profile step only) Nsight Compute sections of one bare and one fused forward launch
#     score_bench.log    (score step only) model build + bench/score_bench.py runs;   score_gpu.json  its record
# More than 8 files (all steps at once): the step logs other than env.log are merged into logs.txt.
#
# Steps (GAINRL_GPU_CHECK_STEPS, a comma list; default "env,build,tests,variants,kernels,angle" = everything above
# except profile and score; "default" stands for that list, "all" for it plus both). They run in the order env,
# build (with the extension check), tests, variants, walk, cluster, backward, probe, kernels, profile, score, angle
# whatever the list's order; the angle grid takes what time is left.
#
# The optional `walk` step times bench/walk_order.py (a plain RMSNorm whose programs walk rows in different orders)
# into walk_order.json, logged in kernels_bench.log: GAINRL_GPU_CHECK_WALK_ORDERS (a comma list, default all ~40
# orders, c1 first), GAINRL_GPU_CHECK_WALK_DIMS (default 4096) or GAINRL_GPU_CHECK_WALK_SHAPES (RxD list, e.g.
# 262144x4096,65536x4096), ~3-4 s an order at 262144x4096.
#
# The optional `cluster` step times bench/cluster_walk.py (a plain RMSNorm whose thread-block clusters combine
# their unit-vector sums in distributed shared memory; sm_90; builds its .cu with nvcc at run time, ~1 min) into
# cluster_walk.json, logged in kernels_bench.log: GAINRL_GPU_CHECK_CLUSTER_VARIANTS (a comma list; default all).
#
# The optional `backward` step times forward + backward (bench/fused_backward.py: fused, bare, torch.compile, HF
# eager, our backward alone; graph-timed, dx and dw checked first) into fused_backward.json, logged in
# kernels_bench.log: GAINRL_GPU_CHECK_BACKWARD_SHAPES (BxLxD list, default the script's four),
# GAINRL_GPU_CHECK_BACKWARD_VARIANTS (comma list of the script's BWD_VARIANTS, timed beside backward_only), ~40-60 s.
#
# The optional `probe` step times a random Qwen2.5-0.5B-shaped model's forward and training step without a probe,
# with the hook probe and with the fused probe, and with every norm on our kernels (bench/probe_overhead.py, eager,
# metrics checked first) into
# probe_overhead.json, logged in kernels_bench.log: GAINRL_GPU_CHECK_PROBE_SHAPES (BxL list, default
# 8x2048,4x4096), ~30-60 s.
#
# The optional `profile` step runs Nsight Compute (ncu, if the machine has it) on one bare and one fused forward
# launch per shape (bench/profile_fused.py; GAINRL_GPU_CHECK_PROFILE_SHAPES, default "64x4096x4096 16x4096x2048")
# into profile.log: stall reasons, occupancy and DRAM throughput, ~20-40 s a shape. Without ncu it records what
# /usr/local/cuda/bin holds in env.log. E.g. GAINRL_GPU_CHECK_STEPS=env,variants,profile GAINRL_GPU_CHECK_BUDGET=240.
#
# Liger-Kernel's RMSNorm (what TRL runs with use_liger_kernel=True) is a yardstick of the variants, kernels and
# backward steps beside torch.compile and F.rms_norm. The GPU machine lacks the package and cannot install it (no
# internet): `.venv/bin/python bench/make_gpu_carry.py site` (CPU machine) copies the installed pure-Python package
# into .gpu_carry/site/ (~3.3 MiB), which this script puts on PYTHONPATH; name .gpu_carry in the `run` tool's carry.
# Without it the benches record the yardstick as "skipped: liger-kernel is not installed".
#
# The optional `score` step (issue 4: the whole `gainrl score` process against the released per-prompt way, on the
# GPU, with a 0.5B model) needs nothing downloaded. Prepare once HERE (CPU machine; writes the git-ignored
# .gpu_carry/, ~3.5 MiB: the embedded SmolLM2 tokenizer + 512 GSM8K questions in JSONL):
#     .venv/bin/python bench/make_gpu_carry.py
# then, with the `run` tool (best as its own call, e.g. the session's only one or a later session's):
#     command:   GAINRL_GPU_CHECK_STEPS=env,score GAINRL_GPU_CHECK_BUDGET=330 bash bench/gpu_check.sh
#     carry:     [".gpu_carry"]
#     timeout_s: 420
# There the step saves a randomly initialised Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV
# heads, MLP 4864, tied embeddings, bf16, vocabulary of the carried tokenizer) to /tmp with
# `bench/make_gpu_carry.py model` -- wall time does not depend on the weights' values, the scores mean nothing --
# and runs bench/score_bench.py --repeats 3 on the 512 questions (released / gainrl / gainrl --no-prefix-cache, each
# its own process, alternating). Estimate (H100): env ~10 s, model ~20-30 s, 9 processes of ~15-25 s each
# (interpreter + torch/transformers imports + load dominate; the released loop ~5-10 s for 512 prompts, gainrl's
# forward ~1 s) -> ~3-4.5 min in all, ~5.5-6.5 device minutes with the start-up. score_gpu.json is rewritten after
# every process, so a cut-off run still leaves its timings. After the default call (570 s) on the same warm machine
# only ~3 device minutes are left: then use GAINRL_GPU_CHECK_BUDGET=150 GAINRL_GPU_CHECK_SCORE_REPEATS=1, timeout_s
# 200, or shorten the first call (GAINRL_GPU_CHECK_BUDGET=380, timeout_s 470).
#
# Knobs (environment): GAINRL_GPU_CHECK_BUDGET (seconds, default 470); GAINRL_GPU_CHECK_VARIANTS_CAP (seconds of
# the variants step, default 120; the JSON is rewritten after every variant, goal shape first);
# GAINRL_GPU_CHECK_TESTS_CUDA=0 skips the extension's half of the tests step (for a call without the build),
# GAINRL_GPU_CHECK_CUDA_TESTS names its files (default test_cuda_backend.py and test_rmsnorm_angle_cuda.py),
# GAINRL_GPU_CHECK_TESTS_TRITON=0 skips the Triton half; GAINRL_GPU_CHECK_EMULATOR=1 also runs the CPU emulator tests
# of those files (CPU-only, normally checked elsewhere); GAINRL_GPU_CHECK_PY (python, default python3);
# GAINRL_GPU_CHECK_DRY=1: CPU dry run of the plumbing (no build, TRITON_INTERPRET=1, a few fast tests, --smoke / tiny
# benchmark shapes, default python .venv/bin/python), e.g.
#     OUT=$(mktemp -d) GAINRL_GPU_CHECK_DRY=1 bash bench/gpu_check.sh
#     OUT=$(mktemp -d) GAINRL_GPU_CHECK_DRY=1 GAINRL_GPU_CHECK_STEPS=env,score bash bench/gpu_check.sh
# Score step knobs: GAINRL_GPU_CHECK_SCORE_SIZE (0.5b, 1.5b; dry: tiny), _SCORE_LIMIT (questions, default 512; dry
# 16), _SCORE_REPEATS (default 3; dry 1), _SCORE_DATA (default .gpu_carry/gsm8k512.jsonl), _SCORE_VOCAB
# (vocab_size; default the tokenizer's 49152, 151936 is Qwen2.5's), _SCORE_CAP (seconds, default: the time left
# less 20 s, or 300 s when the angle step follows).
set -u
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
DRY=${GAINRL_GPU_CHECK_DRY:-0}
BUDGET=${GAINRL_GPU_CHECK_BUDGET:-470}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
DEFAULT_STEPS=env,build,tests,variants,kernels,angle
STEPS=${GAINRL_GPU_CHECK_STEPS:-$DEFAULT_STEPS}
STEPS=${STEPS// /}
STEPS=${STEPS//default/$DEFAULT_STEPS}
STEPS=${STEPS//all/$DEFAULT_STEPS,profile,score}
for s in ${STEPS//,/ }; do
    case $s in
        env | build | tests | variants | walk | cluster | backward | probe | kernels | profile | angle | score) ;;
        *) echo "GAINRL_GPU_CHECK_STEPS: unknown step '$s' (known: env build tests variants walk cluster backward probe kernels profile score angle, default, all)" >&2
           exit 2 ;;
    esac
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }
if [ "$DRY" = 1 ]; then
    PY=${GAINRL_GPU_CHECK_PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    export TRITON_INTERPRET=1
else
    PY=${GAINRL_GPU_CHECK_PY:-python3}
    unset TRITON_INTERPRET  # compiled Triton kernels on CUDA tensors (tests/conftest.py pins it to 0 on a GPU)
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# pure-Python yardsticks the GPU machine lacks (Liger-Kernel's RMSNorm), carried in .gpu_carry/site (see the header)
[ -d "$REPO/.gpu_carry/site" ] && export PYTHONPATH="$PYTHONPATH:$REPO/.gpu_carry/site"
export PYTHONDONTWRITEBYTECODE=1

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s))); }

# step NAME LOG CAP_SECONDS CMD...: runs CMD under `timeout` (CAP cut to the time left), tees into $OUT/LOG,
# records "NAME rc=.. s=.." in the summary and keeps going whatever the exit code.
step() {
    local name=$1 log=$OUT/$2 cap=$3
    shift 3
    local t
    t=$(left)
    if [ "$t" -lt 15 ]; then
        note "$(printf '%-16s rc=skipped  (budget of %ss spent)' "$name" "$BUDGET")"
        FAILED=1
        return 0
    fi
    [ "$cap" -lt "$t" ] && t=$cap
    echo "=== [$name] $(date -u +%FT%TZ) timeout ${t}s: $*" | tee -a "$log"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local dt=$(($(date +%s) - t0))
    echo "=== [$name] rc=$rc after ${dt}s" | tee -a "$log"
    local why=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="  (timed out at ${t}s)"
    note "$(printf '%-16s rc=%-4s %5ss%s' "$name" "$rc" "$dt" "$why")"
    [ "$rc" = 0 ] || FAILED=1
    return 0
}

note "gpu_check.sh  mode=$([ "$DRY" = 1 ] && echo DRY-cpu || echo gpu)  start=$(date -u +%FT%TZ)  budget=${BUDGET}s  python=$PY$([ "$STEPS" != "$DEFAULT_STEPS" ] && echo "  steps=$STEPS")"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (+local changes)')"
# the machine's .git may lag the tree copied there: the source fingerprint names the code that ran (match it with
# `bash bench/source_fingerprint.sh COMMIT` on the development machine)
note "source: $(bash bench/source_fingerprint.sh 2>/dev/null || echo unknown)"

# ---------------------------------------------------------------------------------------------------- 1. environment
env_report() {
    echo "## uname / CPU / memory"; uname -a; nproc; free -g 2>/dev/null | head -2
    echo "## nvidia-smi"; nvidia-smi 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,persistence_mode \
        --format=csv 2>&1
    echo "## nvcc"; nvcc --version 2>&1 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo "## python packages"
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), platform.machine())
for name in ("torch", "triton", "numpy", "transformers", "peft", "pytest", "pytest_benchmark", "ninja", "setuptools",
             "liger_kernel"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:18s}", getattr(mod, "__version__", None) or f"(no __version__) {mod.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:18s} missing ({type(e).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
          f"| {p.total_memory / 2**30:.1f} GiB | {p.multi_processor_count} SMs")
from torch.utils.cpp_extension import CUDA_HOME
print("CUDA_HOME", CUDA_HOME)
EOF
}
export PY
export -f env_report
if want env; then
    step env env.log 60 bash -c env_report
    # Surface the GPU line in the summary.
    note "gpu: $(grep -m1 '^device ' "$OUT/env.log" 2>/dev/null || echo 'none seen')"
fi

# ---------------------------------------------------------------------------------------------------- 2. build
if ! want build; then
    :
elif [ "$DRY" = 1 ]; then
    note "$(printf '%-16s rc=skipped  (dry run: uses the extension already built here, if any)' build)"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "$(printf '%-16s rc=skipped  (no CUDA device visible to torch: the local build is left alone)' build)"
    FAILED=1
else
    # BuildExtension wants a `ninja` binary; the pip package may have put it outside PATH.
    if ! command -v ninja >/dev/null 2>&1; then
        NINJA_DIR=$("$PY" -c "import ninja, os; print(getattr(ninja, 'BIN_DIR', os.path.join(os.path.dirname(ninja.__file__), 'data', 'bin')))" 2>/dev/null)
        [ -n "${NINJA_DIR:-}" ] && export PATH="$NINJA_DIR:$PATH"
    fi
    if "$PY" -c "import setuptools" 2>/dev/null; then
        step build build.log 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
    else  # no setuptools: the same sources and flags through torch's JIT builder, copied in place as gainrl_kernels._C
        step build build.log 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" -c '
import glob, os, shutil, sysconfig
from torch.utils.cpp_extension import load
os.makedirs("build/jit", exist_ok=True)
m = load("_C", sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")), build_directory="build/jit",
         extra_cflags=["-O3", "-fopenmp", "-march=native"], extra_ldflags=["-fopenmp"],
         extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"], verbose=True)
shutil.copy(m.__file__, "gainrl_kernels/_C" + sysconfig.get_config_var("EXT_SUFFIX"))'
    fi
fi
ext_report() {
    "$PY" - <<'EOF'
import torch
from gainrl_kernels.extension import EXTENSION_ERROR, has_ext_kernel
cpu, cuda = has_ext_kernel("cpu"), has_ext_kernel("cuda")
rows, spans = (has_ext_kernel("cuda", f"rmsnorm_angle_{k}_ext") for k in ("rows", "spans"))
print(f"extension: cpu kernel={cpu} cuda kernel={cuda} rows={rows} spans={spans} error={EXTENSION_ERROR}")
raise SystemExit(0 if cpu and ((cuda and rows and spans) or not torch.cuda.is_available()) else 1)
EOF
}
export -f ext_report
if want build; then
    step ext_check build.log 60 bash -c ext_report
    note "$(grep -m1 '^extension:' "$OUT/build.log" 2>/dev/null || echo 'extension: not checked')"
fi

# ---------------------------------------------------------------------------------------------------- 3. parity tests
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -ra --durations=15 --color=no)
if ! want tests; then
    :
elif [ "$DRY" = 1 ]; then
    step tests_cuda tests.log 120 "${PYTEST[@]}" tests/test_cuda_backend.py -k "reference_inputs"
    step tests_triton tests.log 120 "${PYTEST[@]}" tests/test_angle_validation.py tests/test_pairwise.py \
        -k "bad_backend or empty_batch or deterministic"
else
    # The GPU half of test_cuda_backend.py; its CPU emulator tests are CPU-only (opt in with the knob).
    CUDA_K="not emulated"
    [ "${GAINRL_GPU_CHECK_EMULATOR:-0}" = 1 ] && CUDA_K=""
    # GAINRL_GPU_CHECK_TESTS_CUDA=0: skip this half (a call without the build step)
    # GAINRL_GPU_CHECK_CUDA_TESTS: the test files of this half (default: both)
    if [ "${GAINRL_GPU_CHECK_TESTS_CUDA:-1}" = 1 ]; then
        # shellcheck disable=SC2086  # a list of files
        step tests_cuda tests.log 150 "${PYTEST[@]}" ${GAINRL_GPU_CHECK_CUDA_TESTS:-tests/test_cuda_backend.py \
            tests/test_rmsnorm_angle_cuda.py} ${CUDA_K:+-k "$CUDA_K"}
    fi
    # Separate process: a CUDA fault in the extension cannot poison the Triton run.
    # GAINRL_GPU_CHECK_TRITON_K: a pytest -k filter for this half (e.g. "not torch_compile_fullgraph", ~40 s);
    # GAINRL_GPU_CHECK_TESTS_TRITON=0 skips it
    TRITON_K=${GAINRL_GPU_CHECK_TRITON_K:-}
    if [ "${GAINRL_GPU_CHECK_TESTS_TRITON:-1}" = 1 ]; then
        step tests_triton tests.log 240 "${PYTEST[@]}" tests/test_angle_stats.py tests/test_rmsnorm_angle.py \
            tests/test_pairwise.py tests/test_angle_validation.py tests/test_concentration_triton.py \
            tests/test_probe_fused.py \
            ${TRITON_K:+-k "$TRITON_K"}
    fi
fi
grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/tests.log" 2>/dev/null | sed 's/^/pytest: /' \
    | tee -a "$SUMMARY" >/dev/null

# ---------------------------------------------------------------------------------------------------- 4. benchmarks
# Launch-shape variants of the fused RMSNorm + angle forward (each checked against the default, CUDA-graph timed).
# GAINRL_GPU_CHECK_VARIANTS: a comma list of variant names (default all; the default config always runs first);
# GAINRL_GPU_CHECK_VARIANT_SHAPES: a comma list of BxLxD (default the script's four, goal shape first);
# GAINRL_GPU_CHECK_VARIANT_DTYPE: bf16 (default), fp16 or fp32 (e.g. fp32 with the variant cuda_rows_fp32).
if ! want variants; then
    :
elif [ "$DRY" = 1 ]; then
    step variants kernels_bench.log 120 "$PY" bench/fused_variants.py --smoke --out "$OUT/fused_variants.json" \
        ${GAINRL_GPU_CHECK_VARIANTS:+--variants "$GAINRL_GPU_CHECK_VARIANTS"}
else
    step variants kernels_bench.log "${GAINRL_GPU_CHECK_VARIANTS_CAP:-120}" "$PY" bench/fused_variants.py \
        --out "$OUT/fused_variants.json" \
        ${GAINRL_GPU_CHECK_VARIANTS:+--variants "$GAINRL_GPU_CHECK_VARIANTS"} \
        ${GAINRL_GPU_CHECK_VARIANT_SHAPES:+--shapes "$GAINRL_GPU_CHECK_VARIANT_SHAPES"} \
        ${GAINRL_GPU_CHECK_VARIANT_DTYPE:+--dtype "$GAINRL_GPU_CHECK_VARIANT_DTYPE"}
fi
if [ -f "$OUT/fused_variants.json" ]; then
    "$PY" bench/gpu_summary.py variants "$OUT/fused_variants.json" 2>&1 | tee -a "$SUMMARY"
    "$PY" bench/gpu_summary.py table "$OUT/fused_variants.json" 2>&1 | tee -a "$SUMMARY"
fi
# Row orders of a plain RMSNorm (bench/walk_order.py): which walks keep the one-row-per-program kernel's speed.
if want walk; then
    WALK_ARGS=(--out "$OUT/walk_order.json" ${GAINRL_GPU_CHECK_WALK_ORDERS:+--orders "$GAINRL_GPU_CHECK_WALK_ORDERS"})
    if [ "$DRY" = 1 ]; then
        step walk kernels_bench.log 120 "$PY" bench/walk_order.py --smoke "${WALK_ARGS[@]}"
    else
        step walk kernels_bench.log 200 "$PY" bench/walk_order.py --dims "${GAINRL_GPU_CHECK_WALK_DIMS:-4096}" \
            ${GAINRL_GPU_CHECK_WALK_SHAPES:+--shapes "$GAINRL_GPU_CHECK_WALK_SHAPES"} "${WALK_ARGS[@]}"
    fi
fi
if [ -f "$OUT/walk_order.json" ]; then
    "$PY" bench/gpu_summary.py walk "$OUT/walk_order.json" 2>&1 | tee -a "$SUMMARY"
fi
# The thread-block cluster prototype (bench/cluster_walk.py: builds its own extension at run time, sm_90 only).
if want cluster; then
    step cluster kernels_bench.log 200 "$PY" bench/cluster_walk.py --out "$OUT/cluster_walk.json" \
        ${GAINRL_GPU_CHECK_CLUSTER_VARIANTS:+--variants "$GAINRL_GPU_CHECK_CLUSTER_VARIANTS"}
fi
if [ -f "$OUT/cluster_walk.json" ]; then
    "$PY" bench/gpu_summary.py cluster "$OUT/cluster_walk.json" 2>&1 | tee -a "$SUMMARY"
fi
# Forward + backward of the fused op against our bare RMSNorm, torch.compile and HF eager (bench/fused_backward.py).
if want backward; then
    if [ "$DRY" = 1 ]; then
        step backward kernels_bench.log 120 "$PY" bench/fused_backward.py --smoke --out "$OUT/fused_backward.json"
    else
        step backward kernels_bench.log 150 "$PY" bench/fused_backward.py --out "$OUT/fused_backward.json" \
            ${GAINRL_GPU_CHECK_BACKWARD_SHAPES:+--shapes "$GAINRL_GPU_CHECK_BACKWARD_SHAPES"} \
            ${GAINRL_GPU_CHECK_BACKWARD_VARIANTS:+--variants "$GAINRL_GPU_CHECK_BACKWARD_VARIANTS"}
    fi
fi
if [ -f "$OUT/fused_backward.json" ]; then
    "$PY" bench/gpu_summary.py backward "$OUT/fused_backward.json" 2>&1 | tee -a "$SUMMARY"
fi
# What the angle signal costs a model's forward and training step: no probe, the hook, the fused probe
# (bench/probe_overhead.py, a random Qwen2.5-0.5B-shaped model, eager).
if want probe; then
    if [ "$DRY" = 1 ]; then
        step probe kernels_bench.log 120 "$PY" bench/probe_overhead.py --smoke --out "$OUT/probe_overhead.json"
    else
        step probe kernels_bench.log 150 "$PY" bench/probe_overhead.py --out "$OUT/probe_overhead.json" \
            ${GAINRL_GPU_CHECK_PROBE_SHAPES:+--shapes "$GAINRL_GPU_CHECK_PROBE_SHAPES"}
    fi
fi
if [ -f "$OUT/probe_overhead.json" ]; then
    "$PY" bench/gpu_summary.py probe "$OUT/probe_overhead.json" 2>&1 | tee -a "$SUMMARY"
fi
if ! want kernels; then
    :
elif [ "$DRY" = 1 ]; then
    step kernels_bench kernels_bench.log 120 "$PY" bench/run_kernels_bench.py --smoke --out "$OUT/kernels_cuda.json"
    step eager_overhead kernels_bench.log 60 "$PY" bench/eager_overhead.py --reps 5 --out "$OUT/eager_overhead.json"
else
    step kernels_bench kernels_bench.log 150 "$PY" bench/run_kernels_bench.py --out "$OUT/kernels_cuda.json"
    step eager_overhead kernels_bench.log 60 "$PY" bench/eager_overhead.py --out "$OUT/eager_overhead.json"
fi
if [ -f "$OUT/eager_overhead.json" ]; then
    "$PY" bench/gpu_summary.py eager "$OUT/eager_overhead.json" 2>&1 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------------------------------------------- 4a. profile (opt-in)
# Nsight Compute on one bare and one fused forward launch (bench/profile_fused.py): stall reasons, occupancy, DRAM
# throughput of the fused RMSNorm + angle forward against the bare kernel. Shapes: GAINRL_GPU_CHECK_PROFILE_SHAPES.
if want profile; then
    if [ "$DRY" = 1 ]; then
        step profile profile.log 60 "$PY" bench/profile_fused.py --smoke
    else
        NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
            /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1)
        if [ -z "$NCU" ]; then
            note "$(printf '%-16s rc=skipped  (no ncu on PATH, in /usr/local/cuda/bin or /opt/nvidia/nsight-compute)' profile)"
            { echo "## /usr/local/cuda/bin (no ncu)"; ls /usr/local/cuda/bin 2>&1; } >>"$OUT/env.log"
            FAILED=1
        else
            for shape in ${GAINRL_GPU_CHECK_PROFILE_SHAPES:-64x4096x4096 16x4096x2048}; do
                step "profile_$shape" profile.log 150 "$NCU" -k regex:rows_kernel --launch-skip 2 --launch-count 2 \
                    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                    --section MemoryWorkloadAnalysis --section SchedulerStats \
                    "$PY" bench/profile_fused.py --shape "$shape"
            done
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------------- 4b. score (opt-in)
# Issue 4: whole `gainrl score` process vs the released per-prompt way (bench/score_bench.py) on a random-init
# Qwen2.5-0.5B-shaped model; inputs carried in .gpu_carry/ (bench/make_gpu_carry.py). See the header.
if want score; then
    SC_DATA=${GAINRL_GPU_CHECK_SCORE_DATA:-.gpu_carry/gsm8k512.jsonl}
    SC_TOK=.gpu_carry/tokenizer
    SC_EXTRA=()
    if [ "$DRY" = 1 ]; then
        SC_SIZE=${GAINRL_GPU_CHECK_SCORE_SIZE:-tiny}
        SC_LIMIT=${GAINRL_GPU_CHECK_SCORE_LIMIT:-16}
        SC_REPEATS=${GAINRL_GPU_CHECK_SCORE_REPEATS:-1}
        SC_EXTRA=(--threads 2 --no-variant)
    else
        SC_SIZE=${GAINRL_GPU_CHECK_SCORE_SIZE:-0.5b}
        SC_LIMIT=${GAINRL_GPU_CHECK_SCORE_LIMIT:-512}
        SC_REPEATS=${GAINRL_GPU_CHECK_SCORE_REPEATS:-3}
    fi
    SC_MODEL=${TMPDIR:-/tmp}/gainrl_score_model_$SC_SIZE
    if [ ! -f "$SC_DATA" ] || [ ! -f "$SC_TOK/tokenizer.json" ]; then
        note "$(printf '%-16s rc=skipped  (%s or %s missing: run .venv/bin/python bench/make_gpu_carry.py on the CPU machine and name .gpu_carry in carry)' score "$SC_DATA" "$SC_TOK")"
        FAILED=1
    elif [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        note "$(printf '%-16s rc=skipped  (no CUDA device visible to torch)' score)"
        FAILED=1
    else
        rm -rf "$SC_MODEL"
        step score_model score_bench.log 180 "$PY" bench/make_gpu_carry.py model --out "$SC_MODEL" --size "$SC_SIZE" \
            --tokenizer "$SC_TOK" ${GAINRL_GPU_CHECK_SCORE_VOCAB:+--vocab "$GAINRL_GPU_CHECK_SCORE_VOCAB"}
        grep -m1 '^random-init' "$OUT/score_bench.log" 2>/dev/null | tee -a "$SUMMARY" >/dev/null
        if [ -f "$SC_MODEL/config.json" ]; then
            SC_CAP=$(($(left) - 20))
            want angle && SC_CAP=300
            SC_CAP=${GAINRL_GPU_CHECK_SCORE_CAP:-$SC_CAP}
            [ "$SC_CAP" -lt 15 ] && SC_CAP=15
            step score_bench score_bench.log "$SC_CAP" "$PY" bench/score_bench.py --data "$SC_DATA" --limit "$SC_LIMIT" \
                --model "$SC_MODEL" --repeats "$SC_REPEATS" --json "$OUT/score_gpu.json" \
                --note "random-init Qwen2 $SC_SIZE-shaped model (bench/make_gpu_carry.py model): timings only" \
                ${SC_EXTRA[@]+"${SC_EXTRA[@]}"}
        fi
    fi
    if [ -f "$OUT/score_gpu.json" ]; then
        "$PY" bench/gpu_summary.py score "$OUT/score_gpu.json" 2>&1 | tee -a "$SUMMARY"
    fi
fi

# ---------------------------------------------------------------------------------------------------- 4c. angle grid
if ! want angle; then
    :
elif [ "$DRY" = 1 ]; then
    step angle_bench angle_bench.log 120 "$PY" bench/run_angle_bench.py --device cpu --cases 2x64x32 1x32x16 \
        --methods released torch_vectorised gainrl_cpp --min-time 0 --max-reps 3 --time-budget 5 \
        --out "$OUT/angle_cuda.json"
else
    # The grid gets the time that is left, less a margin for the case in flight (the largest take ~10-20 s) and exit.
    T_ANGLE=$(($(left) - 45))
    [ "$T_ANGLE" -lt 10 ] && T_ANGLE=10
    step angle_bench angle_bench.log 600 "$PY" bench/run_angle_bench.py --grid full --min-time 0.25 --max-reps 50 \
        --time-budget "$T_ANGLE" --out "$OUT/angle_cuda.json"
fi
if [ -f "$OUT/angle_cuda.json" ]; then
    "$PY" bench/gpu_summary.py angle "$OUT/angle_cuda.json" 2>&1 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------------------------------------------- 5. summary
nvidia-smi --query-gpu=temperature.gpu,clocks.sm,clocks_throttle_reasons.active --format=csv,noheader >>"$OUT/env.log" 2>&1
# The `run` tool brings back 8 files: with more (all steps at once), merge the step logs other than env.log.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    for f in build.log tests.log kernels_bench.log profile.log angle_bench.log score_bench.log; do
        [ -f "$OUT/$f" ] || continue
        { echo "################################################## $f"; cat "$OUT/$f"; } >>"$OUT/logs.txt" && rm "$OUT/$f"
    done
    note "over 8 files: build/tests/kernels_bench/profile/angle_bench/score_bench logs merged into logs.txt"
fi
note "end=$(date -u +%FT%TZ)  total=$(($(date +%s) - START))s  all steps ok: $([ "$FAILED" = 0 ] && echo yes || echo NO)"
note "files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$FAILED"
