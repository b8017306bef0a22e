"""What the angle signal costs a model's forward: no probe, the hook probe, and the fused probe, end to end.

GAIN-RL reads its training signal from the policy's own log-prob forward (``AngleProbe``). The hook measures the
probed layer's MLP input with ``angle_stats`` (one more read of those activations, and a gather of a padded batch's
real tokens); ``fused=True`` computes the statistics inside the layer's RMSNorm (``gainrl_kernels.patching``) and
reads nothing again. Per batch shape this script times, eager (as a training step runs it), with CUDA events, the
minimum over --rounds rounds of --reps calls, the methods alternated:

* ``none``: the model's forward alone; ``hook``: with ``AngleProbe(model)``; ``fused``: ``AngleProbe(model,
  fused=True)``, ``set_batch`` included in both;
* ``norms`` and ``norms_fused``: ``none`` and ``fused`` with every RMSNorm of the model on our kernels
  (``gainrl_kernels.patching.apply_fused_rmsnorms``, ``gainrl train --fused-norms``) instead of HF's eager formula;
* mode ``forward`` (``torch.no_grad``) and ``train`` (forward and backward of the last position's logits).

The model is a randomly initialised Qwen2 decoder of Qwen2.5-0.5B's shape (no download: built from a config) in
bf16, the batch left padded (lengths L/2 to L), segments P = the first 30% of each sequence, Q = the rest. Before
timing, the fused probe's metrics are checked against the hook's.

    python bench/probe_overhead.py --out bench/results/probe_overhead_<gpu>.json      # GPU
    python bench/probe_overhead.py --config path/to/Llama-3-8B --layers 8   # another architecture's shape
    python bench/probe_overhead.py --smoke     # a tiny model on any device (TRITON_INTERPRET=1 on a CPU): checks only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_variants import error_status, exit_code, parse_names, parse_shapes, record_row  # noqa: E402

from gainrl_kernels.patching import apply_fused_rmsnorms, revert_fused_rmsnorms  # noqa: E402
from gainrl_kernels.probe import AngleProbe  # noqa: E402

METHODS = ("none", "hook", "fused", "norms", "norms_fused")
OVERHEADS = ("hook", "fused", "norms", "norms_fused")  # reported against none
MODES = ("forward", "train")
# Qwen2.5-0.5B's decoder (hidden 896, 24 layers); the vocabulary is cut to 32000 (only the last position's logits
# are computed, so its size barely matters) to keep the random embedding small
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=400, max_position_embeddings=512, rms_norm_eps=1e-6)


def build_model(spec: dict | str, device: torch.device, dtype: torch.dtype, layers: int | None) -> torch.nn.Module:
    """A randomly initialised causal LM: a Qwen2 of ``spec``'s shape, or of the architecture and shape of the HF
    config at ``spec`` (a local folder or config.json; no weights are read). ``layers`` overrides the depth."""
    import transformers

    torch.manual_seed(0)
    depth = {"num_hidden_layers": layers} if layers else {}
    if isinstance(spec, str):
        cfg = transformers.AutoConfig.from_pretrained(spec, **depth)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**spec, **depth}, tie_word_embeddings=False, pad_token_id=0)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(batch: int, length: int, vocab: int, device: torch.device) -> dict:
    """Left-padded random token ids, lengths in [L/2, L], and segments [0, 30%, len] relative to each first token."""
    g = torch.Generator().manual_seed(batch * 100003 + length)
    lens = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = (torch.arange(length)[None, :] >= (length - lens)[:, None]).long()
    ids = ids * mask
    seg = torch.stack([torch.zeros_like(lens), (lens * 3) // 10, lens], 1).int()
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), seg=seg.to(device))


def call(model, probe: AngleProbe | None, b: dict, mode: str):
    """One forward (and backward in train mode) with the probe's batch set: what a training step does per batch."""
    if probe is not None:
        probe.set_batch(b["seg"], attention_mask=b["attention_mask"])
    if mode == "forward":
        with torch.no_grad():
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                         use_cache=False)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1, use_cache=False)
    out.logits.float().sum().backward()
    return out


def check_fused_matches_hook(model, b: dict, atol: float) -> None:
    """The fused probe's metrics equal the hook's within ``atol`` (bf16: y differs by a rounding step at times)."""
    got = []
    for fused in (False, True):
        with AngleProbe(model, fused=fused) as probe:
            call(model, probe, b, "forward")
            got.append(probe.metrics())
    for name in ("intra", "inter", "score", "causal"):
        a, c = getattr(got[0], name).float(), getattr(got[1], name).float()
        if not torch.allclose(a, c, rtol=0, atol=atol, equal_nan=True):
            raise AssertionError(f"{name}: fused {c.tolist()} vs hook {a.tolist()}")


class Method:
    """The model set up as ``method`` names while the block runs: every norm on our kernels (``norms*``), and the
    probe it measures with (``None``: no probe)."""

    def __init__(self, model, method: str) -> None:
        self.model, self.method = model, method
        self.probe: AngleProbe | None = None

    def __enter__(self) -> AngleProbe | None:
        if self.method.startswith("norms"):
            apply_fused_rmsnorms(self.model)
        if self.method in ("hook", "fused", "norms_fused"):
            self.probe = AngleProbe(self.model, fused=self.method != "hook")
        return self.probe

    def __exit__(self, *exc) -> None:
        if self.probe is not None:
            self.probe.remove()
        revert_fused_rmsnorms(self.model)
        self.model.zero_grad(set_to_none=True)


def time_methods(model, b: dict, mode: str, methods: list[str], reps: int, rounds: int) -> dict[str, float]:
    """ms per call of each method: the minimum over ``rounds`` rounds of ``reps`` calls, methods alternated."""
    best = {m: float("inf") for m in methods}
    for _ in range(rounds):
        for m in methods:
            with Method(model, m) as probe:
                call(model, probe, b, mode)  # warm-up (Triton compiles on first use)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    call(model, probe, b, mode)
                end.record()
                torch.cuda.synchronize()
                best[m] = min(best[m], start.elapsed_time(end) / reps)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x2048,4x4096", help="BxL list (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--config", default=None,
                   help="an HF config (local folder or config.json) to build the random model from instead of "
                        "Qwen2.5-0.5B's shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON record (rewritten after every row)")
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes, checks only (any device)")
    args = p.parse_args(argv)
    methods = parse_names(p, "--methods", args.methods, METHODS)
    modes = parse_names(p, "--modes", args.modes, MODES)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = args.config or (TINY if args.smoke else QWEN_05B)
    shapes = [(2, 16)] if args.smoke else [tuple(s) for s in parse_shapes(args.shapes)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(spec, device, dtype, args.layers)
    cfg = model.config
    rows: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if cuda else device.type}; model: {type(model).__name__} "
          f"{cfg.hidden_size} x {cfg.num_hidden_layers} layers, {dtype}")
    print("| B | L | mode | " + " | ".join(f"{m} (ms)" for m in METHODS) + " | "
          + " | ".join(f"{m} vs none" for m in OVERHEADS) + " | status |")
    print("|---|---|---|" + "---|" * (len(METHODS) + len(OVERHEADS) + 1))
    for batch, length in shapes:
        b = make_batch(batch, length, cfg.vocab_size, device)
        try:
            check_fused_matches_hook(model, b, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
            checked = "ok"
        except Exception as e:  # recorded: a failure is a result
            checked = error_status(e, "check failed")
        for mode in modes:
            row = dict(B=batch, L=length, mode=mode, status=checked)
            if cuda and checked == "ok":
                try:
                    ms = time_methods(model, b, mode, methods, args.reps, args.rounds)
                    row.update({f"{m}_ms": ms[m] for m in methods})
                except Exception as e:
                    row["status"] = error_status(e)
            elif checked == "ok":
                for m in methods:  # any device: each method runs once (checks only)
                    with Method(model, m) as probe:
                        call(model, probe, b, mode)
                row["status"] = "ok (smoke: checked, not timed)" if args.smoke else "ok (no GPU: checked, not timed)"
            record_row(args.out, rows, row, cuda)
            base = row.get("none_ms")
            cells = [f"{row[f'{m}_ms']:.3f}" if f"{m}_ms" in row else "" for m in METHODS]
            over = [f"{100 * (row[f'{m}_ms'] / base - 1):+.2f}%" if base and f"{m}_ms" in row else ""
                    for m in OVERHEADS]
            print(f"| {batch} | {length} | {mode} | " + " | ".join(cells + over) + f" | {row['status']} |")
    return exit_code(rows)


if __name__ == "__main__":
    raise SystemExit(main())
