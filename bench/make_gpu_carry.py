"""Inputs for the `score` step of bench/gpu_check.sh, which runs on a GPU machine with no internet.

Three subcommands:

* ``carry`` (default; run HERE, on the CPU machine, before the GPU call)::

      .venv/bin/python bench/make_gpu_carry.py [--n 512] [--data ../shared/data/gsm8k_train.parquet]

  writes the git-ignored folder ``.gpu_carry/`` (a few MB; name it in the `run` tool's ``carry``):
  ``tokenizer/`` -- the embedded SmolLM2-135M-Instruct tokenizer (with its chat template), saved from the
  dequantised cache under ``$GAINRL_CACHE`` (made first if missing: one GGUF load); ``gsm8k512.jsonl`` -- the first
  ``--n`` GSM8K questions in the released GAIN-RL format (``problem`` + final-number ``answer``), which
  ``gainrl score`` and the released per-prompt way of bench/score_bench.py both read; ``MANIFEST.json``.

* ``site`` (run HERE; ``carry`` does it too)::

      .venv/bin/python bench/make_gpu_carry.py site [--out .gpu_carry]

  copies the installed pure-Python packages of the benches' yardsticks that the GPU machine lacks and cannot
  install (no internet) into ``.gpu_carry/site/``, which gpu_check.sh puts on PYTHONPATH: ``liger_kernel``
  (Liger-Kernel's RMSNorm, what TRL runs with ``use_liger_kernel=True``; ~3.3 MiB, installed here by requirements.txt).

* ``model`` (run THERE, by gpu_check.sh)::

      python3 bench/make_gpu_carry.py model --out /tmp/qwen05b-random --size 0.5b [--device cuda]

  saves a randomly initialised Qwen2-architecture model of the named shape (bf16 on CUDA) with the carried
  tokenizer, so that ``gainrl score --model DIR`` and the released way load it as a local folder. Wall time does not
  depend on the weights' values (same shapes, same kernels; the scores themselves mean nothing). Shapes are those of
  Qwen2.5-0.5B / -1.5B except the vocabulary, which is the carried tokenizer's (49152 instead of 151936: the
  released way's per-prompt logits are then ~3x cheaper than with Qwen's vocabulary, so its time is if anything
  underestimated) unless ``--vocab`` says otherwise. ``--size tiny`` is the CPU dry run's 2-layer model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".gpu_carry"
SITE_PACKAGES = ("liger_kernel",)  # pure Python (+ Triton): a copy of the package directory imports anywhere

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B); tiny: the CPU dry run.
SIZES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}


def make_carry(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from gainrl.data import load_examples
    from gainrl.models import embedded_gguf_path, gguf_cache_dir, load_model_and_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = gguf_cache_dir(embedded_gguf_path())
    if not (cache / "tokenizer.json").is_file():  # first use: one GGUF load writes the dequantised cache
        load_model_and_tokenizer(None, dtype="fp32", device="cpu")
    tok = AutoTokenizer.from_pretrained(cache)
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"{cache}: the tokenizer has no chat template (gainrl's prompt presets need one)")
    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok.save_pretrained(tok_dir)

    examples, report = load_examples(args.data, limit=args.n, require_answers=True)
    if len(examples) < args.n:
        raise SystemExit(f"{args.data}: only {len(examples)} usable rows ({report.summary()})")
    data = out / f"gsm8k{args.n}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"problem": ex.question, "answer": ex.answer}, ensure_ascii=False) + "\n")
    copy_site_packages(out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    manifest = {"made_from": {"tokenizer": str(cache), "data": str(Path(args.data).resolve())},
                "vocab_size": len(tok), "n_questions": len(examples), "data_file": data.name,
                "files": {str(p.relative_to(out)): p.stat().st_size for p in files}, "total_bytes": total}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {len(files) + 1} files, {total / 2**20:.1f} MiB (tokenizer vocab {len(tok)}, "
          f"{len(examples)} questions in {data.name})")
    if total > 32 * 2**20:
        raise SystemExit("the carry folder is over 32 MiB: the `run` tool carries 64 MiB in all")
    return 0


def copy_site_packages(out: Path, names: tuple[str, ...] = SITE_PACKAGES) -> Path:
    """Copies the installed packages ``names`` (their directories, without byte code) into ``out``/site and returns
    that folder. Raises SystemExit naming a package that is not installed."""
    import importlib.util

    site = out / "site"
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{name}: not installed here (make setup installs it from requirements.txt)")
        dst = site / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(Path(list(spec.submodule_search_locations)[0]), dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(f"{site}: {', '.join(names)} ({size / 2**20:.1f} MiB)")
    return site


def make_model(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype]
    cfg = Qwen2Config(vocab_size=args.vocab or len(tok), tie_word_embeddings=True, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **SIZES[args.size])
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: seconds, not a minute of CPU init
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"random-init Qwen2 {args.size}: {n / 1e6:.0f}M parameters, vocab {cfg.vocab_size}, {dtype}, built on "
          f"{dev} and saved to {out} in {time.perf_counter() - t0:.1f}s (random weights: timings only, the scores "
          "mean nothing)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("carry", help="write .gpu_carry/ (default)")
    m = sub.add_parser("model", help="save a random-init Qwen2-shaped model folder (on the GPU machine)")
    st = sub.add_parser("site", help="copy the yardsticks' packages (liger_kernel) into .gpu_carry/site/")
    st.add_argument("--out", default=str(CARRY))
    for p in (ap, c):
        p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k_train.parquet"))
        p.add_argument("--n", type=int, default=512, help="number of questions (default 512)")
        p.add_argument("--out", default=str(CARRY))
    m.add_argument("--out", required=True)
    m.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    m.add_argument("--tokenizer", default=str(CARRY / "tokenizer"))
    m.add_argument("--vocab", type=int, default=None, help="vocab_size (default: the tokenizer's)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    args = ap.parse_args()
    if args.cmd == "site":
        copy_site_packages(Path(args.out))
        return 0
    return make_model(args) if args.cmd == "model" else make_carry(args)


if __name__ == "__main__":
    raise SystemExit(main())
