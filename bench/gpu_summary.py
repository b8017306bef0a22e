"""The lines bench/gpu_check.sh writes into its summary.txt for each result file: what a step found, one line or a
few, so that a reader of the summary does not need the JSON (and the lines are tested here, on CPU).

    python bench/gpu_summary.py variants OUT/fused_variants.json   # fused forward: default and fastest vs bare
    python bench/gpu_summary.py table    OUT/fused_variants.json   # fused ms of every variant x shape, / default
    python bench/gpu_summary.py walk     OUT/walk_order.json       # plain RMSNorm walks: ms per order
    python bench/gpu_summary.py cluster  OUT/cluster_walk.json     # the cluster walk prototype: ms, / c1
    python bench/gpu_summary.py backward OUT/fused_backward.json   # forward + backward: ms per method
    python bench/gpu_summary.py eager    OUT/eager_overhead.json   # fixed cost of one eager call
    python bench/gpu_summary.py score    OUT/score_gpu.json        # whole `gainrl score` process vs released
    python bench/gpu_summary.py angle    OUT/angle_cuda.json       # angle grid rows by status
    python bench/gpu_summary.py probe    OUT/probe_overhead.json   # model forward: no probe, hook, fused probe
"""
from __future__ import annotations

import collections
import json
import sys
from typing import Callable

GOAL = 1.05  # issue 3: the fused forward within 5% of our bare RMSNorm kernel


def _by_shape(rows: list[dict], key: str) -> dict[tuple, dict[str, dict]]:
    """{(B, L, D): {row[key]: row}} in first-seen order."""
    shapes: dict[tuple, dict[str, dict]] = collections.defaultdict(dict)
    for r in rows:
        shapes[(r["B"], r["L"], r["D"])][r[key]] = r
    return shapes


def _errors(names: list[str]) -> str:
    return f", errors: {sorted(names)}" if names else ""


def variants(record: dict) -> list[str]:
    """Per shape: the default's fused / bare, the fastest variant against the default's bare kernel and whether it
    meets the goal, the work list alone, torch.compile's RMSNorm, F.rms_norm, Liger's RMSNorm, rows in no segment and
    the unfused pair."""
    lines = []
    for (b, l, d), rows in _by_shape(record["rows"], "variant").items():
        timed = {k: r for k, r in rows.items() if "ratio" in r}
        line = f"fused {b}x{l}x{d}:"
        if "default" in timed:
            line += f" default fused/bare {timed['default']['ratio']:.3f} ({timed['default']['fused_ms']:.3f} ms)"
        if timed:
            best = min(timed, key=lambda k: timed[k]["fused_ms"])
            ratio = timed[best]["ratio_vs_default_bare"]
            line += (f", fastest {best} {timed[best]['fused_ms']:.3f} ms = {ratio:.3f} x the default bare kernel"
                     f" (goal <= {GOAL}: {'met' if ratio <= GOAL else 'not met'})")
        if "plan_only" in rows:
            line += f", plan {rows['plan_only']['plan_ms'] * 1e3:.1f} us"
        for key, label in (("torch_compile_bare", "torch.compile"), ("torch_native_bare", "F.rms_norm"),
                           ("liger_bare", "Liger")):
            if "bare_ms" in rows.get(key, {}):  # the other bare RMSNorms, and the default fused call against them
                line += f", {label} bare {rows[key]['bare_ms']:.3f} ms"
                if "fused_ms" in timed.get("default", {}):
                    line += f" (default fused / it {timed['default']['fused_ms'] / rows[key]['bare_ms']:.3f})"
        if "no_segments_ms" in timed.get("default", {}):
            line += f", rows in no segment {timed['default']['no_segments_ms']:.3f} ms"
        for k in ("bare_then_angle_stats_triton", "bare_then_angle_stats_cuda"):
            if "unfused_ms" in rows.get(k, {}):
                line += f", bare + angle_stats ({k.rsplit('_', 1)[1]}) {rows[k]['unfused_ms']:.3f} ms"
        bad = [k for k, r in rows.items() if r.get("status", "ok").startswith("error")]
        lines.append(line + _errors(bad) + ("" if timed else f" ({len(rows)} variants checked, not timed)"))
    return lines


def variant_table(record: dict) -> list[str]:
    """A markdown table of the timed fused forward: one row per variant (its fused ms and, in parentheses, over the
    default's at that shape), then the bare RMSNorms (ours, torch.compile, F.rms_norm, Liger: bare ms). Shapes are
    columns, in the record's order; "-" where a variant has no time there (failed, skipped, not run)."""
    shapes = _by_shape(record["rows"], "variant")
    names = list(dict.fromkeys(r["variant"] for r in record["rows"] if "fused_ms" in r))
    if not names:
        return []
    lines = ["| variant | " + " | ".join(f"{b}x{l}x{d}" for b, l, d in shapes) + " |",
             "|---" * (len(shapes) + 1) + "|"]
    for name in names:
        cells = []
        for rows in shapes.values():
            r, ref = rows.get(name, {}), rows.get("default", {})
            cell = f"{r['fused_ms']:.4f}" if "fused_ms" in r else "-"
            if "fused_ms" in r and "fused_ms" in ref:
                cell += f" ({r['fused_ms'] / ref['fused_ms']:.3f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bares = (("default", "our bare"), ("torch_compile_bare", "torch.compile bare"),
             ("torch_native_bare", "F.rms_norm bare"), ("liger_bare", "Liger bare"))
    for key, label in bares:
        values = [rows.get(key, {}).get("bare_ms") for rows in shapes.values()]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    return lines


def walk(record: dict) -> list[str]:
    """Per width: each timed order's ms at its row count; orders that failed, and orders whose segment sums (sync
    and atomic orders) differ from torch's."""
    rows = record["rows"]
    lines = []
    for d in sorted({r["D"] for r in rows}):
        mine = [r for r in rows if r["D"] == d]
        timed = [r for r in mine if r.get("ms") is not None]
        bad = [r["order"] for r in mine if r.get("status", "ok") != "ok"]
        wrong = [r["order"] for r in mine if r.get("sums", "ok") not in ("ok", "not combined")]
        lines.append(f"walk D={d}: " + (", ".join(f"{r['order']}@{r['R']} {r['ms']:.3f}" for r in timed) if timed
                                        else f"{len(mine)} orders checked, not timed")
                     + _errors(bad) + (f", sums differ: {wrong}" if wrong else ""))
    return lines


def cluster(record: dict) -> list[str]:
    """Each cluster_walk variant's ms and ratio to the Triton c1 walk; variants that failed or whose sums differ."""
    rows = record["rows"]
    timed = [r for r in rows if r.get("ms") is not None]
    bad = [r["variant"] for r in rows if r.get("status", "ok") != "ok"]
    wrong = [r["variant"] for r in rows
             if r.get("sums", "none") not in ("ok", "none") or r.get("pairs", "ok") != "ok"]  # pairs: full variants
    def ratio(r: dict) -> str:
        return f"{r['vs_c1']:.3f}" if r.get("vs_c1") else "-"
    def resident(r: dict) -> str:  # the persistent variants' clusters, and the full ones' time with the reduce
        out = f" [{r['clusters']} clusters]" if "clusters" in r else ""
        return out + (f" [with the reduce {r['with_reduce_vs_c1']:.3f}]" if "with_reduce_vs_c1" in r else "")
    return ["cluster walk: " + ", ".join(f"{r['variant']} {r['ms']:.3f} ({ratio(r)}){resident(r)}" for r in timed)
            + _errors(bad) + (f", sums differ: {wrong}" if wrong else "")]


def backward(record: dict) -> list[str]:
    """Per shape: ms of each timed method (forward + backward, or the backward alone and its variants)."""
    lines = []
    for (b, l, d), rows in _by_shape(record["rows"], "method").items():
        timed = ", ".join(f"{k} {r['ms']:.3f}" for k, r in rows.items() if "ms" in r)
        bad = [k for k, r in rows.items() if r["status"].startswith("error")]  # skipped: a result (no Liger here)
        lines.append(f"fwd+bwd {b}x{l}x{d} ms: " + (timed or f"{len(rows)} methods checked, not timed")
                     + _errors(bad))
    return lines


def eager(record: dict) -> list[str]:
    return [f"eager {record['shape']}: " + ", ".join(f"{r['call']} {r['latency_us']:.0f} us" for r in record["rows"])]


def score(record: dict) -> list[str]:
    """The whole-process walls and speedups of bench/score_bench.py (or the walls so far of a cut-off run)."""
    def f(d: dict) -> dict:
        return {k: round(v, 2) for k, v in d.items()}
    if record.get("partial"):
        walls = {k: [round(x, 1) for x in v] for k, v in record["wall_s"].items()}
        return [f"score_bench PARTIAL (cut off): whole-process walls so far (s): {walls}"]
    return [
        f"score_bench {record['limit']} prompts on {record['machine']['device']} ({record['note']})",
        f"score_bench whole-process wall median (s): {f(record['wall_s_median'])} | forward (s): "
        f"{f(record['forward_s_median'])}",
        f"score_bench speedup vs released, whole process: {f(record['speedup_vs_released'])} | worst case: "
        f"{f(record['speedup_vs_released_worst_case'])} | forward only: {f(record['forward_speedup_vs_released'])}",
        f"score_bench max relative score difference vs released: {record['score_max_rel_diff_vs_released']}",
    ]


def angle(record: dict) -> list[str]:
    return [f"angle_bench rows by status: {dict(collections.Counter(r['status'] for r in record['rows']))}"]


def probe(record: dict) -> list[str]:
    """Per batch shape and mode: the model's ms without a probe, and the overheads of the hook and the fused probe
    (and of every norm on our kernels, with and without the fused probe)."""
    lines = []
    for r in record["rows"]:
        head = f"probe {r['B']}x{r['L']} {r['mode']}: "
        if "none_ms" not in r:
            lines.append(head + r["status"])
            continue
        over = ", ".join(f"{k[:-3]} {100 * (v / r['none_ms'] - 1):+.2f}%" for k, v in r.items()
                         if k.endswith("_ms") and k != "none_ms")
        lines.append(head + f"none {r['none_ms']:.3f} ms, {over}")
    return lines


SUMMARIES: dict[str, Callable[[dict], list[str]]] = dict(
    variants=variants, table=variant_table, walk=walk, cluster=cluster, backward=backward, eager=eager, score=score,
    angle=angle, probe=probe)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in SUMMARIES:
        print(f"usage: gpu_summary.py {{{','.join(SUMMARIES)}}} FILE.json", file=sys.stderr)
        return 2
    with open(args[1]) as f:
        for line in SUMMARIES[args[0]](json.load(f)):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
