"""Wall time of `gainrl score` against the released per-prompt way, on the same prompts and model.

    python bench/score_bench.py --data /work/shared/data/gsm8k_train.parquet --limit 128 \\
        --json bench/results/score_cpu.json

Each method runs as its own process, timed from the outside (interpreter start, imports, model load, prompt
rendering, scoring, outputs: the whole job). Both load the same model through ``gainrl.models`` (the embedded
SmolLM2 from its dequantised cache) and score the same rendered prompts with the same P / Q segments.

* released: what the released angle-sorting script does -- one prompt per forward through the whole model with
  ``output_hidden_states=True`` (every layer's activations kept) and logits, the probed layer's ``up_proj`` input
  stored by a hook, the L x L cosine matrix built, block means taken, ``.item()`` per prompt;
* gainrl: ``gainrl score`` (length-sorted batches by token budget, early exit at the probed layer's MLP input,
  the shared system-prompt / few-shot prefix run once, O(L·D) statistics, one host sync per batch);
* gainrl --no-prefix-cache: the same without the shared-prefix cache (every prompt's tokens all run).

Runs alternate (released, gainrl, gainrl-noprefix, then reversed) ``--repeats`` times; medians are reported.
The machine is shared, so the load average before and after each run is recorded too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------------------------
# The released way (runs in a worker process)
# ------------------------------------------------------------------------------------------------------------------


def released_worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    from gainrl.data import load_examples
    from gainrl.models import load_model_and_tokenizer
    from gainrl.prompts import PROMPT_PRESETS, render_prompt
    from gainrl_kernels.probe import find_decoder_layers

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(None if args.model == "embedded" else args.model)
    t_load = time.perf_counter() - t0
    examples, _ = load_examples(args.data, limit=args.limit)
    t0 = time.perf_counter()
    prompts = [render_prompt(tok, ex.question, PROMPT_PRESETS[args.prompt]) for ex in examples]
    t_render = time.perf_counter() - t0
    store: dict[str, torch.Tensor] = {}
    layer = find_decoder_layers(model)[args.layer]
    handle = layer.mlp.up_proj.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0]))
    scores = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for ex, r in zip(examples, prompts):
            ids = torch.tensor([r.input_ids], device=model.device)
            out = model(input_ids=ids, output_hidden_states=True)  # noqa: F841  all activations and logits kept
            h = store["h"][0]
            u = F.normalize(h, dim=-1)
            cos = u @ u.T  # L x L
            _, q0, q1 = r.seg_offsets
            qq = cos[q0:q1, q0:q1]
            n = q1 - q0
            intra = (qq.sum() - qq.diagonal().sum()) / (n * (n - 1))
            inter = cos[q0:q1, :q0].mean()
            scores.append([ex.index, (intra + args.inter_weight * inter).item()])  # host sync per prompt
    t_loop = time.perf_counter() - t0
    handle.remove()
    Path(args.result).write_text(json.dumps({
        "scores": scores, "model_load_s": t_load, "render_s": t_render, "forward_s": t_loop,
        "inside_s": time.perf_counter() - t_start,
    }))


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/shared/data/gsm8k_train.parquet")
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--model", default="embedded", help="'embedded' (default) or a model id / path")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--inter-weight", type=float, default=1.0)
    ap.add_argument("--prompt", default="r1")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS / MKL_NUM_THREADS for every run (default: torch's default, all cores)")
    ap.add_argument("--no-variant", action="store_true", help="skip the gainrl --no-prefix-cache run")
    ap.add_argument("--json", default=None, help="write the results here (e.g. bench/results/score_cpu.json); "
                    "rewritten with the runs so far after every run, so a killed job still leaves its timings")
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. 'random-init weights')")
    ap.add_argument("--released-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.released_worker:
        released_worker(args)
        return 0

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="score_bench."))
    common = ["--data", args.data, "--limit", str(args.limit), "--layer", str(args.layer),
              "--inter-weight", str(args.inter_weight)]
    model_flag = [] if args.model == "embedded" else ["--model", args.model]
    methods = {
        "released": [py, str(Path(__file__).resolve()), "--released-worker", *common, "--model", args.model,
                     "--prompt", args.prompt, "--result", str(tmp / "released.json")],
        "gainrl": [py, "-m", "gainrl", "score", *common, *model_flag, "--prompt", args.prompt,
                   "--out", str(tmp / "gainrl"), "--overwrite", "--no-progress"],
    }
    if not args.no_variant:
        methods["gainrl_no_prefix_cache"] = [*methods["gainrl"][:-4], "--out", str(tmp / "gainrl_np"),
                                             "--overwrite", "--no-progress", "--no-prefix-cache"]
    names = list(methods)
    env = None
    if args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    walls: dict[str, list[float]] = {n: [] for n in names}
    inner: dict[str, list[dict]] = {n: [] for n in names}
    loads = []
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            before = loadavg()
            wall = run(methods[name], env)
            loads.append({"run": f"{name}#{rep}", "loadavg_before": before, "loadavg_after": loadavg()})
            walls[name].append(wall)
            if name == "released":
                inner[name].append({k: v for k, v in json.loads((tmp / "released.json").read_text()).items()
                                    if k != "scores"})
            else:
                out = tmp / ("gainrl" if name == "gainrl" else "gainrl_np")
                inner[name].append(json.loads((out / "summary.json").read_text())["timing"])
            print(f"{name:24s} run {rep}: {wall:7.1f} s wall", flush=True)
            if args.json:  # partial results (replaced by the full record at the end)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"partial": True, "model": args.model, "note": args.note,
                                                       "wall_s": walls, "inner_timings": inner}, indent=1) + "\n")

    # same numbers? (released in the model dtype with an L x L matrix; gainrl with O(L D) statistics)
    released = {i: s for i, s in json.loads((tmp / "released.json").read_text())["scores"]}
    rows = [json.loads(x) for x in (tmp / "gainrl" / "scores.jsonl").read_text().splitlines()]
    diffs = [abs(r["score"] - released[r["index"]]) / abs(released[r["index"]]) for r in rows
             if r["score"] is not None and not math.isnan(released[r["index"]])]

    med = {n: statistics.median(w) for n, w in walls.items()}
    fwd = {n: statistics.median(x["forward_s"] for x in inner[n]) for n in names}
    import torch

    result = {
        "what": "whole `score` process wall time (interpreter start to outputs written), released per-prompt way vs "
                "`gainrl score`, same prompts / model / segments",
        "data": args.data,
        "limit": args.limit,
        "model": args.model,
        "note": args.note,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "threads_env": args.threads, "torch": torch.__version__,
                    "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()},
        "commands": {n: " ".join(c).replace(str(tmp), "$TMP") for n, c in methods.items()},
        "wall_s": walls,
        "wall_s_median": med,
        "forward_s_median": fwd,
        "inner_timings": inner,
        "speedup_vs_released": {n: med["released"] / med[n] for n in names if n != "released"},
        "speedup_vs_released_worst_case": {n: min(walls["released"]) / max(walls[n]) for n in names
                                           if n != "released"},
        "forward_speedup_vs_released": {n: fwd["released"] / fwd[n] for n in names if n != "released"},
        "score_max_rel_diff_vs_released": max(diffs) if diffs else None,
        "loadavg": loads,
    }
    print(json.dumps({k: result[k] for k in ("wall_s_median", "forward_s_median", "speedup_vs_released",
                                             "speedup_vs_released_worst_case",
                                             "forward_speedup_vs_released", "score_max_rel_diff_vs_released")},
                     indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
