"""GPU benchmarks of the issue-3 kernels (prints a table, writes bench/results/kernels_<device>.json):

* fused RMSNorm + angle statistics vs (PyTorch RMSNorm + angle_stats) vs the same Triton RMSNorm without
  statistics vs PyTorch RMSNorm alone: HF's formula eager and through torch.compile, and PyTorch's own fused
  ``F.rms_norm``, and vs Liger-Kernel's RMSNorm where installed (goal: fused within 5% of the bare RMSNorm kernel);
* angle_stats backends (Triton, CUDA extension when built) vs a device-to-device copy of the same bytes;
* the tiled pairwise-cosine kernel in TFLOP/s (2·D FLOP per causal pair).

    python bench/run_kernels_bench.py                 # on a CUDA machine
    python bench/run_kernels_bench.py --smoke         # tiny shapes, any device (checks the script runs)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_angle_bench import make_input, time_it  # noqa: E402

from gainrl_kernels import angle_stats  # noqa: E402
from gainrl_kernels.extension import has_ext_kernel  # noqa: E402
from gainrl_kernels.pairwise import angle_pairwise  # noqa: E402
from gainrl_kernels.rmsnorm_angle import rmsnorm_angle  # noqa: E402


def torch_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def liger_unavailable(x: torch.Tensor) -> str:
    """Why Liger-Kernel's RMSNorm cannot run on ``x`` ("" where it can): it needs the ``liger-kernel`` package and a
    GPU (its kernel does not run in the Triton interpreter: it calls ``.to`` on a Python float)."""
    if not x.is_cuda:
        return "skipped: Liger's RMSNorm needs a GPU (it does not run in the Triton interpreter)"
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
    except ImportError as e:
        return f"skipped: liger-kernel is not installed ({e})"
    return ""


def liger_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Liger-Kernel's RMSNorm (``LigerRMSNormFunction``, one Triton kernel each way): what TRL runs for the model's
    RMSNorms with ``use_liger_kernel=True``. Casting mode "llama" rounds as HF's Llama / Qwen2 formula
    (``torch_rmsnorm``): rstd in fp32, the normalised row rounded to x's dtype, then times the weight. Not in place,
    so that a replayed backward finds its dy intact. Check ``liger_unavailable`` first."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)


def torch_native_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch's own RMSNorm (``F.rms_norm``; on CUDA one fused kernel, ``aten::_fused_rms_norm``, with its own
    backward): the bare RMSNorm a user gets from ``torch.nn.RMSNorm``. It rounds once, after the weight, where
    HF's formula rounds before it, so y may differ from ``torch_rmsnorm``'s by a step of the output dtype."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)


def rmsnorm_rows(shapes, device, args) -> list[dict]:
    rows = []
    compiled = torch.compile(torch_rmsnorm, dynamic=False) if device == "cuda" else None
    for batch, length, dim in shapes:
        x, cu = make_input(batch, length, dim, torch.bfloat16, device)
        w = torch.rand(dim, device=device, dtype=torch.bfloat16) + 0.5
        cases = {
            "torch_rmsnorm": lambda: torch_rmsnorm(x, w),
            "torch_native_rmsnorm (F.rms_norm)": lambda: torch_native_rmsnorm(x, w),
            # Inductor's one fused kernel (CUDA only: on CPU the compile would dominate a smoke run)
            **({"torch_compile_rmsnorm": lambda: compiled(x, w)} if compiled is not None else {}),
            **({"liger_rmsnorm": lambda: liger_rmsnorm(x, w)} if not liger_unavailable(x) else {}),
            "torch_rmsnorm+angle_stats": lambda: angle_stats(torch_rmsnorm(x, w), cu, validate_values=False),
            # the unfused pair a user would otherwise run: PyTorch's fused RMSNorms, then the statistics
            "F.rms_norm+angle_stats": lambda: angle_stats(torch_native_rmsnorm(x, w), cu, validate_values=False),
            **({"torch_compile_rmsnorm+angle_stats": lambda: angle_stats(compiled(x, w), cu, validate_values=False)}
               if compiled is not None else {}),
            "triton_rmsnorm (no stats)": lambda: rmsnorm_angle(x, w, 1e-6),
            "fused_rmsnorm_angle": lambda: rmsnorm_angle(x, w, 1e-6, cu, validate=False),
        }
        for name, fn in cases.items():
            fn()  # warm-up outside the timing: compiles (Triton, Inductor)
            s = time_it(fn, device, args.min_time, args.max_reps)
            rows.append(dict(kernel="rmsnorm", method=name, B=batch, L=length, D=dim, ms=s * 1e3,
                             GBps=2 * x.numel() * x.element_size() / s / 1e9))
    return rows


def angle_rows(shapes, device, args) -> list[dict]:
    rows = []
    backends = ["triton"] + (["cuda"] if has_ext_kernel("cuda") else [])
    for batch, length, dim in shapes:
        x, cu = make_input(batch, length, dim, torch.bfloat16, device)
        n_bytes = x.numel() * x.element_size()
        dst = torch.empty_like(x)
        copy_s = time_it(lambda: dst.copy_(x), device, args.min_time, args.max_reps)
        for backend in backends:
            s = time_it(lambda: angle_stats(x, cu, backend=backend, validate_values=False), device, args.min_time, args.max_reps)
            rows.append(dict(kernel="angle_stats", method=backend, B=batch, L=length, D=dim, ms=s * 1e3,
                             GBps=n_bytes / s / 1e9, bw_fraction_of_copy=(n_bytes / s) / (2 * n_bytes / copy_s)))
    return rows


def pairwise_rows(shapes, device, args) -> list[dict]:
    rows = []
    for batch, length, dim in shapes:
        x, cu = make_input(batch, length, dim, torch.bfloat16, device)
        for fn_name in ("cos", "square"):
            s = time_it(lambda: angle_pairwise(x, cu, fn=fn_name, validate=False), device, args.min_time, args.max_reps)
            flop = 2.0 * dim * batch * length * (length - 1) / 2
            rows.append(dict(kernel="pairwise", method=fn_name, B=batch, L=length, D=dim, ms=s * 1e3, TFLOPs=flop / s / 1e12))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few reps")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.min_time, args.max_reps = 0.0, 3
        norm_shapes = angle_shapes = pair_shapes = [(2, 16, 32)]
    else:
        norm_shapes = [(8, 2048, 896), (64, 4096, 4096), (16, 4096, 2048)]
        angle_shapes = [(8, 2048, 896), (64, 4096, 4096), (1, 16384, 2048), (64, 1024, 576)]
        pair_shapes = [(8, 2048, 896), (8, 4096, 2048), (1, 16384, 4096)]
    rows = rmsnorm_rows(norm_shapes, device, args) + angle_rows(angle_shapes, device, args) + pairwise_rows(pair_shapes, device, args)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}\n\n| kernel | method | B | L | D | ms | GB/s | BW/copy | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['method']} | {r['B']} | {r['L']} | {r['D']} | {r['ms']:.3f} | {r.get('GBps', 0):.0f} "
              f"| {r.get('bw_fraction_of_copy', float('nan')):.2f} | {r.get('TFLOPs', float('nan')):.1f} |")
    out = Path(args.out or Path(__file__).parent / "results" / f"kernels_{device}{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(device=name, command="python bench/run_kernels_bench.py" + (" --smoke" if args.smoke else ""), rows=rows), indent=1))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
