"""Recompute every score of a `gainrl score` run from its `prompt_text` and `seg_offsets` alone.

    gainrl score --data /work/shared/data/gsm8k_train.parquet --limit 128 --out /tmp/score128
    python bench/score_check.py --out /tmp/score128            # exit status 1 if any score is off by > --rtol

Independent of the scoring path: the text is tokenized again (``add_special_tokens=False``), each prompt runs alone
through the *full* model (no probe, no early exit, no shared-prefix cache, no batching), the probed layer's
``mlp.up_proj`` input is taken from a plain forward pre-hook, and the metrics come from explicit float64 cosine
matrices (no gainrl_kernels code):

    C_intra(Q) = mean cos over distinct pairs in Q,  C_inter(Q, P) = mean cos over Q x P,  score = C_intra + w C_inter
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def reference_metrics(hidden: torch.Tensor, seg: list[int], inter_weight: float) -> tuple[float, float, float]:
    """(score, C_intra(Q), C_inter(Q, P)) from the [L, D] activation of one prompt, float64."""
    u = F.normalize(hidden.double(), dim=-1, eps=1e-12)
    cos = u @ u.T
    p0, q0, q1 = seg
    qq = cos[q0:q1, q0:q1]
    n = q1 - q0
    intra = ((qq.sum() - qq.diagonal().sum()) / (n * (n - 1))).item() if n >= 2 else math.nan
    inter = cos[q0:q1, p0:q0].mean().item() if n and q0 > p0 else math.nan
    return intra + inter_weight * inter, intra, inter


def rel_err(a: float | None, b: float) -> float:
    if a is None or math.isnan(b):
        return 0.0 if (a is None and math.isnan(b)) else math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/score128", help="the `gainrl score --out` directory")
    ap.add_argument("--model", default=None, help="the model the run used (default: the embedded SmolLM2)")
    ap.add_argument("--rtol", type=float, default=2e-3)
    ap.add_argument("--json", default=None, help="write the check's result here")
    args = ap.parse_args()

    from gainrl.models import load_model_and_tokenizer
    from gainrl_kernels.probe import find_decoder_layers

    out = Path(args.out)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    model, tok = load_model_and_tokenizer(args.model, summary["dtype"], summary["device"])
    layer = summary["layer"]
    got: list[torch.Tensor] = []
    handle = find_decoder_layers(model)[layer].mlp.up_proj.register_forward_pre_hook(
        lambda m, a: got.append(a[0][0].detach().float().cpu())
    )
    worst = {"score": 0.0, "c_intra": 0.0, "c_inter": 0.0}
    bad = []
    t0 = time.perf_counter()
    for r in rows:
        ids = tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
        if len(ids) != r["n_tokens"]:
            bad.append((r["index"], f"prompt_text tokenizes to {len(ids)} tokens, row says {r['n_tokens']}"))
            continue
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], device=model.device))
        score, intra, inter = reference_metrics(got.pop(), r["seg_offsets"], summary["inter_weight"])
        for key, ref in (("score", score), ("c_intra", intra), ("c_inter", inter)):
            e = rel_err(r[key], ref)
            worst[key] = max(worst[key], e)
            if e > args.rtol:
                bad.append((r["index"], f"{key} {r[key]} vs recomputed {ref} (rel {e:.2e})"))
    handle.remove()
    result = {
        "out": str(out),
        "rows": len(rows),
        "layer": layer,
        "dtype": summary["dtype"],
        "rtol": args.rtol,
        "max_rel_err": worst,
        "failures": [{"index": i, "why": w} for i, w in bad],
        "check_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=1))
    for i, why in bad[:20]:
        print(f"row {i}: {why}")
    print(f"{'OK' if not bad else 'FAILED'}: {len(rows) - len({i for i, _ in bad})}/{len(rows)} scores recomputed "
          f"from prompt_text + seg_offsets within {args.rtol:g} relative")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
