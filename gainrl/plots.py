"""Plots of a `gainrl train` run (matplotlib, Agg): written at the end of training and by `gainrl plot RUN`.

``RUN/plots/``:

* ``accuracy_reward.png`` -- rollout accuracy and mean reward per step, held-out greedy accuracy markers;
* ``mu.png`` -- the sampler's centre rank ``μ`` per step (and after each epoch's update);
* ``angle_accuracy.png`` -- mean ``C_causal`` vs accuracy, per prompt (from ``epochs.jsonl``) and per step;
* ``overview.png`` -- the three above plus loss and KL, on one page.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .jsonl import read_jsonl


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else float("nan")


def _smooth(values: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _plot_acc(ax: Any, metrics: list[dict], evals: list[dict]) -> None:
    steps = [m["step"] for m in metrics]
    acc = [_num(m.get("accuracy")) for m in metrics]
    rew = [_num(m.get("reward")) for m in metrics]
    k = max(1, len(steps) // 10)
    ax.plot(steps, acc, color="#3b6ea8", alpha=0.3, lw=1)
    ax.plot(steps, _smooth(acc, k), color="#3b6ea8", lw=2, label=f"rollout accuracy (avg of {k})")
    ax.plot(steps, _smooth(rew, k), color="#d08a2e", lw=1.5, ls="--", label="mean reward")
    if evals:
        ax.plot([e["step"] for e in evals], [_num(e.get("eval_accuracy")) for e in evals], "o-", color="#2e8b57",
                label="held-out greedy accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy / reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_mu(ax: Any, metrics: list[dict], epochs: list[dict], cfg: dict) -> None:
    steps = [m["step"] for m in metrics]
    if cfg.get("sampler", "gainrl") != "gainrl":
        ax.set_title(f"{cfg.get('sampler')} sampler: μ is not used", fontsize=9)
    ax.step(steps, [_num(m.get("mu")) for m in metrics], where="post", color="#7b3fa0", label="μ (sampling)")
    if epochs:
        ax.plot([e["step"] for e in epochs], [_num(e.get("mu_next")) for e in epochs], "s", color="#7b3fa0",
                ms=4, alpha=0.6, label="μ after the epoch's update")
    ax.set_xlabel("step")
    ax.set_ylabel("μ (rank)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_angle(ax: Any, metrics: list[dict], epochs: list[dict]) -> None:
    prompts = [p for e in epochs for p in e.get("prompts", []) if p.get("angle") is not None]
    if prompts:
        sc = ax.scatter([p["angle"] for p in prompts], [p["accuracy"] for p in prompts],
                        c=[p.get("rank") or 0 for p in prompts], cmap="viridis", s=14, alpha=0.7)
        ax.figure.colorbar(sc, ax=ax, label="rank")
        ax.set_title("per prompt (G rollouts)", fontsize=9)
    else:
        ax.scatter([_num(m.get("angle")) for m in metrics], [_num(m.get("accuracy")) for m in metrics], s=14,
                   color="#3b6ea8")
        ax.set_title("per step", fontsize=9)
    ax.set_xlabel("mean C_causal (prompt + response)")
    ax.set_ylabel("rollout accuracy")
    ax.grid(alpha=0.3)


def _plot_loss(ax: Any, metrics: list[dict], cfg: dict) -> None:
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [_num(m.get("loss")) for m in metrics], color="#444", lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [_num(m.get("kl")) for m in metrics], color="#c0392b", lw=1, label="KL (k3)")
    ax2.set_ylabel("KL to reference", color="#c0392b")
    if not cfg.get("beta", 1.0):
        ax.set_title("β = 0: no reference model, KL not measured", fontsize=9)
    ax.grid(alpha=0.3)


def plot_run(run: str | os.PathLike) -> list[Path]:
    """Write the plots of a run folder into ``RUN/plots/``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    metrics = read_jsonl(run / "metrics.jsonl")
    if not metrics:
        raise FileNotFoundError(f"{run}: no metrics.jsonl rows to plot (is it a gainrl train run folder?)")
    evals = read_jsonl(run / "eval.jsonl")
    epochs = read_jsonl(run / "epochs.jsonl")
    cfg: dict = {}
    if (run / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    out = run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (
        ("accuracy_reward.png", lambda ax: _plot_acc(ax, metrics, evals)),
        ("mu.png", lambda ax: _plot_mu(ax, metrics, epochs, cfg)),
        ("angle_accuracy.png", lambda ax: _plot_angle(ax, metrics, epochs)),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        draw(ax)
        fig.suptitle(f"{run.name}", fontsize=9)
        fig.tight_layout()
        _save(fig, out / name)
        plt.close(fig)
        paths.append(out / name)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    _plot_acc(axes[0, 0], metrics, evals)
    _plot_mu(axes[0, 1], metrics, epochs, cfg)
    _plot_angle(axes[1, 0], metrics, epochs)
    _plot_loss(axes[1, 1], metrics, cfg)
    fig.suptitle(f"gainrl train · {run.name}", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "overview.png")
    plt.close(fig)
    paths.append(out / "overview.png")
    return paths


def add_plot_parser(sub: Any) -> Any:
    """Add the ``plot`` subcommand."""
    p = sub.add_parser("plot", help="write the plots of a `gainrl train` run folder (RUN/plots/*.png)")
    p.add_argument("run", metavar="RUN", help="run folder of gainrl train")
    return p


def main(args: Any) -> int:
    import sys

    try:
        paths = plot_run(args.run)
    except FileNotFoundError as e:
        print(f"[gainrl plot] error: {e}", file=sys.stderr)
        return 2
    print(f"[gainrl plot] wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


__all__ = ["add_plot_parser", "main", "plot_run"]
