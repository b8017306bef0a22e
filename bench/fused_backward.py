"""Forward + backward of the fused RMSNorm + angle op on a GPU: what a training step pays for the patched layer.

``bench/fused_variants.py`` times the forward alone; a GRPO step also runs the RMSNorm backward (dx and dw; the
statistics are not differentiated). Per shape this script times, as CUDA-graph replays (kernels only, no Python or
launch overhead; the minimum of --rounds rounds, methods alternated):

* ``fused``: ``rmsnorm_angle`` with statistics, then ``torch.autograd.grad`` for x and the weight;
* ``bare``: the same op without statistics (our RMSNorm kernels, forward and backward);
* ``torch_compile``: HF's RMSNorm formula through ``torch.compile`` (Inductor's forward and backward kernels);
* ``hf_eager``: HF's formula in eager PyTorch (~10 kernels each way);
* ``torch_native``: PyTorch's own ``F.rms_norm`` (on CUDA ``aten::_fused_rms_norm`` and its backward kernel);
* ``liger``: Liger-Kernel's RMSNorm (its Triton forward and backward; GPU only, where ``liger-kernel`` is installed);
* ``backward_only``: our backward launch alone (dx and the dw partials, then their sum), from saved x, rstd and dy;
* ``backward_only:<variant>`` (``--variants``): the same with the backward's tuning knobs set as in BWD_VARIANTS;

and a device copy of x, so that ``floor_ms`` = (4 + 6 bytes per bf16 element: forward reads x and writes y, the
backward reads x and dy and writes dx) / the copy's bandwidth. Every method's dx and dw are checked against the
float64 autograd of HF's formula first.

    python bench/fused_backward.py --out bench/results/fused_backward_<gpu>.json
    python bench/fused_backward.py --variants one_row_cap_64,cap_64 --shapes 64x4096x4096,16x4096x5120
    python bench/fused_backward.py --smoke     # tiny shapes, any device, TRITON_INTERPRET=1 on a CPU: checks only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_variants import (  # noqa: E402
    error_status, exit_code, graph_time, overridden, parse_names, parse_shapes, write_rows,
)
from run_angle_bench import make_input  # noqa: E402
from run_kernels_bench import liger_rmsnorm, liger_unavailable, torch_native_rmsnorm, torch_rmsnorm  # noqa: E402

from gainrl_kernels import rmsnorm_angle as M  # noqa: E402
from gainrl_kernels import rmsnorm_angle_backward as B  # noqa: E402

EPS = 1e-6
# bytes moved per element of x (bf16) by a method that reads and writes each tensor once: forward + backward reads
# x, writes y, reads x and dy, writes dx; the backward alone the last three
BYTES_PER_ELEMENT = {"backward_only": 6}
BYTES_PER_ELEMENT_FWD_BWD = 10
# the backward's tuning knobs (gainrl_kernels.rmsnorm_angle_backward._BWD_*, set on that module), timed as
# backward_only:<name>. At sm_90a, 16-bit: one row a step on 16 warps capped at 64 registers lowers without spills at
# 4096 and 5120 (two programs per SM instead of one); the 2-row tile capped at 64 spills ~290 bytes at 4096
BWD_VARIANTS = {
    "one_row_cap_64": {"_BWD_ROW_STEP": 1, "_BWD_MAXNREG": 64},
    "one_row": {"_BWD_ROW_STEP": 1},
    "cap_64": {"_BWD_MAXNREG": 64},
    "cap_80": {"_BWD_MAXNREG": 80},
    "8_per_sm": {"_BWD_PROGRAMS_PER_SM": 8},
    "one_row_cap_64_8_per_sm": {"_BWD_ROW_STEP": 1, "_BWD_MAXNREG": 64, "_BWD_PROGRAMS_PER_SM": 8},
    # session 21: more rows in flight through shared memory (the loop software-pipelined: cp.async S - 1 steps
    # ahead), and shorter walks (64 programs per SM: ~31 rows each at 64x4096, more partial rows of dw)
    "stages_3": {"_BWD_STAGES": 3},
    "stages_4": {"_BWD_STAGES": 4},
    "one_row_stages_4": {"_BWD_ROW_STEP": 1, "_BWD_STAGES": 4},
    "one_row_cap_64_stages_3": {"_BWD_ROW_STEP": 1, "_BWD_MAXNREG": 64, "_BWD_STAGES": 3},
    "64_per_sm": {"_BWD_PROGRAMS_PER_SM": 64},
    "64_per_sm_stages_3": {"_BWD_PROGRAMS_PER_SM": 64, "_BWD_STAGES": 3},
    # session 22: 3 stages are the default (so stages_3 times the default, and one_row_cap_64 the same as
    # one_row_cap_64_stages_3); the loop without pipelining (the default before), and more stages with one capped
    # row a step
    "no_stages": {"_BWD_STAGES": 0},
    "one_row_cap_64_stages_4": {"_BWD_ROW_STEP": 1, "_BWD_MAXNREG": 64, "_BWD_STAGES": 4},
    # split rows with a tail of at most 1024 are capped at 64 registers on sm_90 by default: without the cap
    "split_uncapped": {"_BWD_SPLIT_CAP_TAIL": 0},
}


def step_fns(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, cu: torch.Tensor, cuda: bool,
             variants: tuple[str, ...] = ()) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """name -> a call returning (dx, dw) of one forward + backward (x and w are leaves that require grad), or of the
    backward alone (``backward_only``, and ``backward_only:<v>`` for each of ``variants``, BWD_VARIANTS' names)."""
    def through(forward: Callable[[], torch.Tensor]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def step():
            return torch.autograd.grad(forward(), (x, w), dy)
        return step

    fns = {
        "fused": through(lambda: M.rmsnorm_angle(x, w, EPS, cu, validate=False)[0]),
        "bare": through(lambda: M.rmsnorm_angle(x, w, EPS, validate=False)[0]),
        "hf_eager": through(lambda: torch_rmsnorm(x, w, EPS)),
        "torch_native": through(lambda: torch_native_rmsnorm(x, w, EPS)),
    }
    if cuda:  # Inductor on a CPU would compile for minutes in a smoke run
        compiled = torch.compile(torch_rmsnorm, dynamic=False)
        fns["torch_compile"] = through(lambda: compiled(x, w, EPS))
    if not liger_unavailable(x):
        fns["liger"] = through(lambda: liger_rmsnorm(x, w, EPS))
    x2d = x.detach()
    rstd = M._forward(x2d, w.detach(), EPS, M._plain_plan(x2d), stats=False)[1]
    fns["backward_only"] = lambda: B._backward(x2d, w.detach(), rstd, dy)

    def backward_with(settings: dict) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def step():
            with overridden(settings, B):  # read at launch: a graph captured in here keeps the variant's kernel
                return B._backward(x2d, w.detach(), rstd, dy)
        return step

    for v in variants:
        fns[f"backward_only:{v}"] = backward_with(BWD_VARIANTS[v])
    return fns


def reference_grads(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
                    rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """dx [R, D] (fp32) and dw [D] (fp64) of HF's formula by float64 autograd, ``rows`` rows at a time (a float64
    graph of the whole goal shape would take tens of GB)."""
    dxs, dw = [], torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    wr = w.detach().double().requires_grad_(True)
    for xc, dyc in zip(x.detach().split(rows), dy.split(rows)):
        xr = xc.double().requires_grad_(True)
        gx, gw = torch.autograd.grad(torch_rmsnorm(xr, wr, EPS), (xr, wr), dyc.double())
        dxs.append(gx.float())
        dw += gw
    return torch.cat(dxs), dw


def check_grads(dx: torch.Tensor, dw: torch.Tensor, dx_ref: torch.Tensor, dw_ref: torch.Tensor,
                rows: int = 16384) -> None:
    """bf16 tolerances (as the tests'), dx compared ``rows`` rows at a time."""
    for a, b in zip(dx.split(rows), dx_ref.split(rows)):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=2e-2, atol=2e-2 * float(dw_ref.abs().max()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="each method timed this many times, alternated (min)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--shapes", default="64x4096x4096,16x4096x2048,16x4096x5120,8x2048x896",
                   help="comma list of BxLxD (GPU only)")
    p.add_argument("--variants", default="", help=f"comma list of backward variants to time beside backward_only "
                   f"(known: {', '.join(BWD_VARIANTS)})")
    args = p.parse_args(argv)
    variants = tuple(parse_names(p, "--variants", args.variants, BWD_VARIANTS))
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    shapes = parse_shapes(args.shapes) if cuda else [(2, 16, 40)]
    rows: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print("| B | L | D | method | graph ms | / bare | / floor | dx, dw checked |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, length, dim in shapes:
        x, cu = make_input(batch, length, dim, torch.bfloat16, device)
        x.requires_grad_(True)
        w = (torch.rand(dim, device=device) + 0.5).to(torch.bfloat16).requires_grad_(True)
        dy = torch.randn(x.shape, device=device).to(torch.bfloat16)
        dx_ref, dw_ref = reference_grads(x, w, dy)
        fns = step_fns(x, w, dy, cu, cuda, variants)
        shape_rows = {}
        for name, fn in fns.items():
            row = dict(B=batch, L=length, D=dim, method=name)
            try:
                check_grads(*fn(), dx_ref, dw_ref)
                row.update(status="ok" if cuda else "ok (smoke: checked, not timed)")
            except Exception as e:  # noqa: BLE001 -- a failing method is a result, not a crash
                row.update(status=error_status(e))
            shape_rows[name] = row
        if "liger" not in fns:  # recorded with the reason, as fused_variants.py records its liger_bare row
            shape_rows["liger"] = dict(B=batch, L=length, D=dim, method="liger", status=liger_unavailable(x))
        if cuda:
            copy_ms = graph_time(lambda: x.detach().clone(), args.reps) * 1e3  # 4 bytes per bf16 element
            best = {k: float("inf") for k, r in shape_rows.items() if r["status"] == "ok"}
            for _ in range(args.rounds):
                for name in list(best):
                    try:
                        best[name] = min(best[name], graph_time(fns[name], args.reps) * 1e3)
                    except Exception as e:  # noqa: BLE001 -- e.g. a method that cannot be graph-captured
                        shape_rows[name].update(status=error_status(e, "error timing"))
                        del best[name]
            for name, ms in best.items():
                method = name.split(":")[0]  # a variant's bytes are its method's
                floor_ms = copy_ms * BYTES_PER_ELEMENT.get(method, BYTES_PER_ELEMENT_FWD_BWD) / 4
                shape_rows[name].update(ms=ms, floor_ms=floor_ms, vs_floor=ms / floor_ms)
                if best.get("bare") and method != "backward_only":
                    shape_rows[name].update(vs_bare=ms / best["bare"])
        for name, r in shape_rows.items():
            timed = "ms" in r
            vs_bare = f"{r['vs_bare']:.3f}" if "vs_bare" in r else ""
            print(f"| {batch} | {length} | {dim} | {name} | {r['ms']:.3f} | {vs_bare} | {r['vs_floor']:.2f} | "
                  f"{r['status']} |" if timed else
                  f"| {batch} | {length} | {dim} | {name} | | | | {r['status']} |", flush=True)
            rows.append(r)
        write_rows(args.out, rows, cuda)
        del fns, dx_ref, dw_ref
    return exit_code(rows)


if __name__ == "__main__":
    raise SystemExit(main())
