"""Does a thread-block cluster keep the fixed-order statistics at a short chunk's window? (issue 3; GPU only, sm_90)

``bench/cluster_walk.cu`` is a plain RMSNorm (HF's formula, bf16, D = 4096) that also sums its rows' unit vectors
y_t / ||y_t||. A cluster of CS blocks walks CS x C consecutive rows, C per block, and combines the blocks' sums in
distributed shared memory, in rank order, into one fp32 row per CS x C rows (see the .cu file). Session 22 measured
that fp32 partial rows cost more than the window they save: one per 8 rows is +24.5% even when meant to stay in the L2
(docs/fused_forward.md). A cluster's combine never leaves the SMs, so the question is what the cluster barrier and the
remote reads cost. Variants (VARIANTS, the .cu file's switch):

* ``cluster{CS}_c{C}``: the cluster walk (256 threads a block, two 16-byte vectors a thread and row, a ring of 4 rows
  in shared memory per block); ``cluster8_c8_512``: 512 threads a block;
* ``partials_c8``: no cluster, each block's sum of 8 rows stored as a partial row (what the fused forward's chunks do);
* ``walk_c8``, ``walk_c1``: the walk alone, 8 rows a block or one (the bare kernel's order), in the same code;
* ``pc{CS}_c{C}`` (session 23): persistent clusters of one 1024-thread block per SM, four row groups of 256 threads
  each with its own 3-row ring (``_s4``: 4 rows), C rows a block and chunk, chunks of CS x C rows taken from a
  counter two ahead so the rings load across a chunk's end: the window is ~132 x C rows, and one fp32 row per
  CS x C rows is stored; ``pc8_c16_nostats``: the counter and a cluster barrier per chunk, no statistics;
  ``pc8_c16_walk``: static chunks, no barriers, no statistics (the walk alone);
* ``pc8_c16_full``, ``pc16_c8_full`` (session 23; also timed with the partial rows then summed per segment, as
  the op's reduce kernel would: ``with_reduce_ms``): persistent clusters with the rest of the forward's statistics,
  each chunk's Σ ||u_t||² and adjacent pairs u_t · u_{t-1} inside segments of SEG_ROWS rows (two row groups of 512
  threads with 5-row rings: the pairs' registers do not fit four at 64 a thread), checked against torch;
  ``pc8_c16_rg2``: their geometry without the pairs; ``_d{J}``: each chunk's combine (the cluster wait, the remote
  reads) deferred J rows into the next chunk, so the rings are full and the other blocks have mostly arrived;

and ``triton_c1``, ``bench/walk_order.py``'s c1 (the bare Triton kernel's order), the yardstick ("/ c1"). Every
variant's y is checked against torch and its sums against float32 sums of torch's unit vectors first.
Graph-timed. The extension is built at run time with torch.utils.cpp_extension (nvcc and ninja, ~30 s).

H200, session 22 (bench/results/cluster_walk_h200.json, docs/fused_forward.md "session 22", call 4): the sums are
correct. walk_c1 0.99 and walk_c8 1.054 of triton_c1, partials_c8 1.244, cluster8_c16 1.10, cluster8_c8 1.13,
cluster8_c4 1.26. The combine is cheaper than partial rows but needs long blocks, and it is no better than the
default fused forward (1.10).

    PYTHONPATH=. python bench/cluster_walk.py --out bench/results/cluster_walk_<gpu>.json
    PYTHONPATH=. python bench/cluster_walk.py --variants walk_c1,cluster8_c8 --rows 65536
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_variants import error_status, exit_code, graph_time, parse_names, record_row  # noqa: E402
from run_kernels_bench import torch_rmsnorm  # noqa: E402
from walk_order import compare_block_sums, orders, walk  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "cluster_walk.cu"
# where its headers are (csrc/cuda_helpers.cuh, bench/cluster_primitives.cuh): load_inline compiles a copy of the
# source in a build directory, so the directory beside it is not searched by itself
INCLUDE_DIRS = [SOURCE.parents[1] / "csrc", SOURCE.parent]
DIM = 4096
# name: (index in cluster_walk_launch's switch, rows per sum row; 0: no sums)
VARIANTS = {
    "cluster8_c8": (0, 64),
    "cluster8_c4": (1, 32),
    "cluster8_c16": (2, 128),
    "cluster4_c8": (3, 32),
    "cluster8_c8_512": (4, 64),
    "partials_c8": (5, 8),
    "walk_c8": (6, 0),
    "walk_c1": (7, 0),
    "cluster8_c2": (8, 16),
    # session 23: persistent clusters of one 1024-thread block per SM (4 row groups), chunks from a counter
    "pc8_c16": (9, 128),
    "pc8_c8": (10, 64),
    "pc8_c32": (11, 256),
    "pc8_c16_s4": (12, 128),
    "pc16_c16": (13, 256),
    "pc16_c8": (14, 128),
    "pc8_c16_nostats": (15, 0),
    "pc8_c16_walk": (16, 0),
    # with the forward's other statistics, Σ ||u||² and the adjacent pairs in segments of SEG_ROWS rows (two row
    # groups of 512 threads, 5-row rings), and their statistics-only twin
    "pc8_c16_full": (17, 128),
    "pc16_c8_full": (18, 128),
    "pc8_c16_rg2": (19, 128),
    "pc8_c32_full": (20, 256),
    "pc8_c16_full_s4": (21, 128),  # 3 rows in flight a row group (6 per SM) instead of 4
    "pc8_c16_full_s7": (22, 128),  # 6 (12 per SM)
    # _d{J}: each chunk's combine deferred J rows into the next chunk (the rings full, the other blocks arrived)
    "pc8_c16_full_d2": (23, 128),
    "pc8_c16_full_s7_d1": (24, 128),
    "pc8_c16_d1": (25, 128),
    "pc8_c16_rg2_d2": (26, 128),
}
# the variants that also store (Σ ||u||², Σ u_t · u_{t-1}) per chunk and block: name -> blocks in a cluster
PAIR_VARIANTS = {"pc8_c16_full": 8, "pc16_c8_full": 16, "pc8_c32_full": 8, "pc8_c16_full_s4": 8,
                 "pc8_c16_full_s7": 8, "pc8_c16_full_d2": 8, "pc8_c16_full_s7_d1": 8}
SEG_ROWS = 4096  # rows per segment of the pairs (one sequence of the goal shape)
BINDING = """
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
extern "C" int cluster_walk_launch(int variant, const void* x, const void* w, void* y, float* part, int* counter,
                                   long long rows, long long seg_rows, float eps, void* stream);
extern "C" int cluster_walk_last_clusters();
int64_t last_clusters() { return cluster_walk_last_clusters(); }
int64_t launch(int64_t variant, torch::Tensor x, torch::Tensor w, torch::Tensor y, torch::Tensor part,
               torch::Tensor counter, int64_t seg_rows, double eps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) == 4096,
              "x: a contiguous CUDA bf16 tensor [R, 4096]");
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && w.numel() == 4096 && part.scalar_type() == at::kFloat,
              "y [R, 4096] contiguous, w [4096], part float32");
  TORCH_CHECK(counter.is_cuda() && counter.scalar_type() == at::kInt && counter.numel() >= 1, "counter: CUDA int32");
  return cluster_walk_launch(static_cast<int>(variant), x.data_ptr(), w.data_ptr(), y.data_ptr(),
                             part.data_ptr<float>(), counter.data_ptr<int>(), x.size(0), seg_rows,
                             static_cast<float>(eps),
                             c10::cuda::getCurrentCUDAStream().stream());
}
"""


def compare_pair_sums(y: torch.Tensor, chunk: int, blocks: int, seg_rows: int, part: torch.Tensor) -> str:
    """The full variants' per-chunk (Σ ||u_t||², Σ u_t · u_{t-1} over pairs inside a segment of ``seg_rows`` rows),
    stored per block after the R / chunk partial rows of ``part`` ([R / chunk, blocks, 2]), added over the blocks,
    against torch's (fp32, 1e-3): "ok" or what differs."""
    yf = y.float()
    u = yf / yf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = y.shape[0] // chunk
    adj = torch.zeros(y.shape[0], device=y.device)
    rows = torch.arange(1, y.shape[0], device=y.device)
    adj[1:] = (u[1:] * u[:-1]).sum(1) * (rows % seg_rows != 0)
    ref = torch.stack([(u * u).sum(1).view(n, chunk).sum(1), adj.view(n, chunk).sum(1)], dim=1)
    got = part.view(-1)[n * y.shape[1]:][:n * blocks * 2].view(n, blocks, 2).sum(1)
    try:
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    except AssertionError as e:
        return "differs: " + " ".join(str(e).split())[:300]
    return "ok"


def reduce_partials(part: torch.Tensor, rows: int, chunk: int) -> torch.Tensor:
    """The segment sums [R / SEG_ROWS, D] of the chunks' partial rows (a torch reduction reading them once, as the
    op's reduce kernel would): what a fused forward built on the persistent clusters would add to their time."""
    n = rows // chunk
    return part[:n].view(rows // SEG_ROWS, SEG_ROWS // chunk, DIM).sum(1)


def build() -> object:
    """The extension (torch.utils.cpp_extension.load_inline: nvcc for the .cu file, the host compiler for the
    binding), in a temporary build directory."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="gainrl_cluster_walk", cpp_sources=BINDING, cuda_sources=SOURCE.read_text(),
                       functions=["launch", "last_clusters"], extra_cuda_cflags=["-O3"],
                       extra_include_paths=[str(d) for d in INCLUDE_DIRS],
                       build_directory=tempfile.mkdtemp(prefix="cluster_walk_"), verbose=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64 * 4096, help="rows of x (default the goal shape's 262,144)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--variants", default="", help="comma list of VARIANTS names (default all, walk_c1 first)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    wanted = parse_names(p, "--variants", args.variants, VARIANTS) or list(VARIANTS)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("cluster_walk: needs a CUDA GPU of compute capability 9.0 or later (thread-block clusters)")
        return 0
    ext = build()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.rows, DIM, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.rand(DIM, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    ref = torch_rmsnorm(x, w, 1e-6)
    part = torch.empty(args.rows // 8 + 1, DIM, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")  # the persistent variants' chunk counter
    y = torch.empty_like(x)
    print(f"device: {torch.cuda.get_device_name()}")
    print("| R | D | variant | rows per sum row | graph ms | / c1 | sums |")
    print("|---|---|---|---|---|---|---|")
    rows_out: list[dict] = []
    c1_order = orders(args.rows, torch.cuda.get_device_properties(0).multi_processor_count)["c1"]
    timed = [("triton_c1", None)] + [(name, VARIANTS[name]) for name in wanted]
    c1 = None
    for name, spec in timed:
        row = dict(R=args.rows, D=DIM, variant=name)
        try:
            if spec is None:
                def fn():
                    walk(x, w, y, c1_order)
                per_sum = 0
            else:
                index, per_sum = spec

                def fn(index=index):
                    rc = ext.launch(index, x, w, y, part, counter, SEG_ROWS, 1e-6)
                    if rc:
                        raise RuntimeError(f"cluster_walk_launch({index}) returned CUDA error {rc}")
            y.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # rstd may move y by a step
            sums = compare_block_sums(y, per_sum, part, atol=1e-3) if per_sum else "none"
            if name in PAIR_VARIANTS:
                row.update(pairs=compare_pair_sums(y, per_sum, PAIR_VARIANTS[name], SEG_ROWS, part))
            if name.startswith("pc"):  # persistent: the resident clusters the occupancy query allowed
                row.update(clusters=int(ext.last_clusters()))
            ms = graph_time(fn, args.reps) * 1e3
            c1 = ms if name == "triton_c1" else c1
            row.update(status="ok", rows_per_sum=per_sum, sums=sums, ms=ms, vs_c1=ms / c1 if c1 else None)
            if name in PAIR_VARIANTS and c1:  # and what the op would add: the partial rows summed per segment
                with_reduce = graph_time(lambda: (fn(), reduce_partials(part, args.rows, per_sum)), args.reps) * 1e3
                row.update(with_reduce_ms=with_reduce, with_reduce_vs_c1=with_reduce / c1)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result
            row.update(status=error_status(e))
        ratio = f"{row['vs_c1']:.3f}" if row.get("vs_c1") else "-"  # "-": the Triton c1 yardstick failed
        shown = f"{row['ms']:.3f} | {ratio}" if "ms" in row else f"{row['status']} |"
        resident = f" ({row['clusters']} clusters)" if "clusters" in row else ""
        if "with_reduce_ms" in row:
            resident += f" (with the reduce {row['with_reduce_ms']:.3f} ms, {row['with_reduce_vs_c1']:.3f})"
        pairs = f"; pairs {row['pairs'][:120]}" if "pairs" in row else ""
        print(f"| {args.rows} | {DIM} | {name} | {row.get('rows_per_sum', '')} | {shown} | "
              f"{row.get('sums', '')[:120]}{pairs}{resident} |", flush=True)
        record_row(args.out, rows_out, row, True)
    return exit_code(rows_out)


if __name__ == "__main__":
    raise SystemExit(main())
