"""The persistent thread-block-cluster forward of the fused RMSNorm + angle statistics (csrc/rmsnorm_angle_cluster.cuh),
against the float64 reference, on the work list of the Triton plan kernel.

  * `emulated`: the kernel header compiled by g++ against tests/cuda_emulator.py, whose clusters run their blocks
    together (named barriers, the split cluster barrier, other blocks' shared memory; clusters one after another,
    so the first takes every item the counter hands out). Small geometries of the same template: D = 256 or 512,
    clusters of 2 blocks of 8 rows (items of 16 rows), 1, 2 or 4 row groups, the combine deferred 0 or 1 rows. The
    plan (cluster chunk 16) and the reduce run in the Triton interpreter.
  * `cuda`: the extension's op through ``rmsnorm_angle`` with ``_CUDA_CLUSTER`` on (sm_90+ GPUs with the CUDA build),
    against the rows kernel and the reference.
"""
from __future__ import annotations

import ctypes
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cuda_emulator  # noqa: E402
from rmsnorm_inputs import concentrated, random_ragged  # noqa: E402
from test_rmsnorm_angle_cuda import (  # noqa: E402
    CODE, DTYPES, EPS, assert_rms, assert_same_again_and_in_graph, assert_stats, batch, item_pointers,
    poisoned_outputs, reduced, two_steps,
)
from gainrl_kernels import rmsnorm_angle as rmsnorm_module  # noqa: E402
from gainrl_kernels.extension import has_ext_kernel  # noqa: E402
from gainrl_kernels.rmsnorm_angle import padded_to_cu_seqlens, rmsnorm_angle  # noqa: E402

CS, C = 2, 8  # the emulated clusters: blocks a cluster; rows a block and item (most geometries)
CHUNK = CS * C

# (D, row groups, deferral, vectors a thread, rows a block and item) of the emulated instantiations (EMULATOR_BODY's
# table, in this order; rings of 3 rows)
GEOMETRIES = [(256, 1, 0, 1, 8), (256, 1, 1, 1, 8), (256, 2, 0, 1, 8), (256, 2, 1, 1, 8), (256, 4, 0, 1, 8),
              (512, 2, 0, 1, 8), (512, 2, 1, 1, 8), (512, 2, 0, 2, 8), (512, 2, 1, 2, 8), (1024, 3, 0, 4, 12),
              (1024, 3, 1, 4, 12)]

EMULATOR_BODY = r"""
#include "rmsnorm_angle_cluster.cuh"

namespace ra = gainrl::rmsnorm_angle;
namespace rc = gainrl::rmsnorm_angle::cluster;

template <typename T, bool W, int D, int RG, int J, int VPT = 1, int C = 8>
int run(const ra::Args& a, ra::DType w_dtype) {
  return static_cast<int>(
      rc::launch_cluster_kernel<T, W, rc::Config<D, RG, 2, C, 3, J, VPT>>(a, w_dtype, nullptr));
}

template <typename T, bool W>
int by_geometry(int geometry, const ra::Args& a, ra::DType w_dtype) {
  switch (geometry) {
    case 0: return run<T, W, 256, 1, 0>(a, w_dtype);
    case 1: return run<T, W, 256, 1, 1>(a, w_dtype);
    case 2: return run<T, W, 256, 2, 0>(a, w_dtype);
    case 3: return run<T, W, 256, 2, 1>(a, w_dtype);
    case 4: return run<T, W, 256, 4, 0>(a, w_dtype);
    case 5: return run<T, W, 512, 2, 0>(a, w_dtype);
    case 6: return run<T, W, 512, 2, 1>(a, w_dtype);
    case 7: return run<T, W, 512, 2, 0, 2>(a, w_dtype);
    case 8: return run<T, W, 512, 2, 1, 2>(a, w_dtype);
    case 9: return run<T, W, 1024, 3, 0, 4, 12>(a, w_dtype);
    default: return run<T, W, 1024, 3, 1, 4, 12>(a, w_dtype);
  }
}

extern "C" int emu_cluster(int geometry, int x_dtype, int w_dtype, const void* x, int64_t stride_r,
                           const void* weight, void* y, float* rstd, const int* row0, const int* nrows,
                           const int* seg, const int* pair_end, int64_t grid, float* part_sum, float* part_q,
                           float* part_adj, int* counter, int64_t R, int64_t D, float eps, int clusters) {
  ra::Args a{};
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.rstd = rstd;
  a.item_row0 = row0; a.item_nrows = nrows; a.item_seg = seg; a.item_pair_end = pair_end; a.grid = grid;
  a.part_sum = part_sum; a.part_q = part_q; a.part_adj = part_adj; a.R = R; a.D = D; a.eps = eps;
  a.counter = counter; a.clusters = clusters;
  const auto xt = static_cast<ra::DType>(x_dtype), wt = static_cast<ra::DType>(w_dtype);
  try {
    if (xt == ra::DType::kBFloat16) {
      return wt == xt ? by_geometry<__nv_bfloat16, true>(geometry, a, wt)
                      : by_geometry<__nv_bfloat16, false>(geometry, a, wt);
    }
    return wt == xt ? by_geometry<__half, true>(geometry, a, wt) : by_geometry<__half, false>(geometry, a, wt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emu_cluster: %s\n", e.what());
    return -1;
  }
}

// The op's own dispatch (clusters of 8 blocks of 1024 threads, items of 128 rows, D of 2048 / 4096 / 8192)
extern "C" int emu_cluster_op(int x_dtype, int w_dtype, const void* x, int64_t stride_r, const void* weight, void* y,
                              float* rstd, const int* row0, const int* nrows, const int* seg, const int* pair_end,
                              int64_t grid, float* part_sum, float* part_q, float* part_adj, int* counter, int64_t R,
                              int64_t D, float eps, int clusters, int rows, int stages, int defer) {
  ra::Args a{};
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.rstd = rstd;
  a.item_row0 = row0; a.item_nrows = nrows; a.item_seg = seg; a.item_pair_end = pair_end; a.grid = grid;
  a.part_sum = part_sum; a.part_q = part_q; a.part_adj = part_adj; a.R = R; a.D = D; a.eps = eps;
  a.counter = counter; a.clusters = clusters; a.cluster_rows = rows; a.stages = stages; a.defer = defer;
  try {
    return static_cast<int>(rc::launch_rmsnorm_angle_cluster(a, static_cast<ra::DType>(x_dtype),
                                                             static_cast<ra::DType>(w_dtype), nullptr));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emu_cluster_op: %s\n", e.what());
    return -1;
  }
}

extern "C" int64_t emu_cluster_smem(int64_t D, int rows, int stages, int defer, int w_native) {
  ra::Args a{};
  a.D = D; a.cluster_rows = rows; a.stages = stages; a.defer = defer;
  return static_cast<int64_t>(rc::cluster_smem_bytes(a, w_native != 0));
}

extern "C" void emu_set_eager_copies(int eager) { gainrl_emu::g_cp_async_eager = eager != 0; }

extern "C" int emu_cluster_supported(int x_dtype, int w_dtype, const void* x, int64_t stride_r, const void* weight,
                                     void* y, int64_t D, int rows, int stages, int defer) {
  ra::Args a{};
  int counter = 0;
  a.x = x; a.stride_r = stride_r; a.weight = weight; a.y = y; a.D = D; a.counter = &counter;
  a.cluster_rows = rows; a.stages = stages; a.defer = defer;
  return ra::cluster_supported(a, static_cast<ra::DType>(x_dtype), static_cast<ra::DType>(w_dtype)) ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = cuda_emulator.build(tmp_path_factory.mktemp("emu_cluster"), "#include <cstdio>\n" + EMULATOR_BODY)
    lib.emu_cluster.restype = ctypes.c_int
    lib.emu_cluster.argtypes = (
        [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [ctypes.c_int64]
        + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int])
    lib.emu_cluster_op.restype = ctypes.c_int
    lib.emu_cluster_op.argtypes = lib.emu_cluster.argtypes[1:] + [ctypes.c_int] * 3
    lib.emu_set_eager_copies.argtypes = [ctypes.c_int]
    lib.emu_cluster_smem.restype = ctypes.c_int64
    lib.emu_cluster_smem.argtypes = [ctypes.c_int64] + [ctypes.c_int] * 4
    lib.emu_cluster_supported.restype = ctypes.c_int
    lib.emu_cluster_supported.argtypes = ([ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int] * 3)
    return lib


@pytest.fixture(params=["lazy", "eager"])
def copies(request, emulator):
    """The emulator's cp.async performed as late (lazy) or as early (eager) as it may be."""
    emulator.emu_set_eager_copies(int(request.param == "eager"))
    yield request.param
    emulator.emu_set_eager_copies(0)


def emulated_forward(lib, geometry: int | None, x2d, weight, cu, off=None, token_index=None, clusters: int = 2,
                     plan=None, tickets: list | None = None, tuning: tuple[int, int, int] = (24, 4, 0)):
    """(y, rstd, AngleStats) of the cluster kernel in the emulator: the Triton plan with items of the geometry's
    CS x C rows, the emulated kernel on outputs poisoned with NaN, the Triton reduce (CS scalars an item).
    ``geometry`` None: the op's own dispatch instead, at ``tuning`` (rows a block and item, ring stages, deferral)
    with its CS. ``tickets``: gets the count the clusters took from the item counter (one per item
    walked)."""
    op = geometry is None
    cs = rmsnorm_module._CUDA_CLUSTER_BLOCKS if op else CS
    chunk = cs * (tuning[0] if op else GEOMETRIES[geometry][4])
    plan = plan or rmsnorm_module._stats_plan(x2d, cu, off, token_index, weight, cluster_chunk=chunk)
    rows, dim = x2d.shape
    y, rstd, part_sum, part_q, part_adj = poisoned_outputs(plan, x2d, cs)
    counter = torch.full((1,), -7, dtype=torch.int32)  # the launch zeroes it
    args = (CODE[x2d.dtype], CODE[weight.dtype], x2d.data_ptr(), x2d.stride(0), weight.data_ptr(), y.data_ptr(),
            rstd.data_ptr(), *item_pointers(plan), plan.grid, part_sum.data_ptr(), part_q.data_ptr(),
            part_adj.data_ptr(), counter.data_ptr(), rows, dim, EPS, clusters)
    rc = lib.emu_cluster_op(*args, *tuning) if op else lib.emu_cluster(geometry, *args)
    if rc != 0:
        raise RuntimeError(f"emulated launch failed: {rc}")
    if tickets is not None:
        tickets.append(int(counter))
    return y, rstd, reduced(plan, part_sum, part_q, part_adj, cs)


TUNING_KNOBS = ("_CUDA_CLUSTER_ROWS", "_CUDA_CLUSTER_STAGES", "_CUDA_CLUSTER_DEFER")


def set_tuning(monkeypatch, tuning: tuple[int, int, int]) -> None:
    """The cluster kernel's tuning knobs set to (rows a block and item, ring stages, deferral)."""
    for knob, value in zip(TUNING_KNOBS, tuning, strict=True):
        monkeypatch.setattr(rmsnorm_module, knob, value)


def long_batch(dim: int, dtype: torch.dtype, seed: int, w_dtype: torch.dtype | None = None):
    """Two long sequences and a short one (K = 2, rows before, between and after the segments, rows in no sequence
    at the end): items of 16 rows cover whole blocks, part of a block, part of a row group's run."""
    lens = [75, 3, 50]
    x = concentrated((sum(lens) + 5,), dim, seed=seed).to(dtype)
    off = torch.tensor([[4, 37, 70], [0, 1, 3], [0, 33, 49]], dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(seed + 1)
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(w_dtype or dtype)
    return x, w, cu, off


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)),
                         ids=lambda i: "D{}-rg{}-defer{}-vecs{}-rows{}".format(*GEOMETRIES[i]))
@pytest.mark.parametrize("clusters", [1, 3])
def test_emulated_geometries(emulator, geometry, clusters, copies):
    """Every emulated geometry, 1 or 3 clusters: rstd within fp32 rounding of torch's and y exactly HF's formula on it,
    the statistics those of y (pairs across row groups, blocks and items, none across a sequence end)."""
    dim = GEOMETRIES[geometry][0]
    x, w, cu, off = long_batch(dim, torch.bfloat16, seed=geometry)
    y, rstd, stats = emulated_forward(emulator, geometry, x, w, cu, off, clusters=clusters)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                             (torch.float16, torch.float32)])
def test_emulated_dtypes_and_strides(emulator, x_dtype, w_dtype):
    """fp16 rows, a weight in fp32 (read into shared memory as fp32), rows with a stride that is not D."""
    x, w, cu, off = long_batch(256, x_dtype, seed=4, w_dtype=w_dtype)
    x = torch.cat([x, x[:, :8]], dim=1)[:, :256]
    assert x.stride(0) == 264
    y, rstd, stats = emulated_forward(emulator, 3, x, w, cu, off)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


def test_emulated_same_bits_for_any_cluster_count(emulator):
    """Fixed summation order: y, rstd and the statistics are bitwise the same whichever cluster takes an item, and
    for every deferral; the row groups' split (another order) within rounding."""
    x, w, cu, off = long_batch(256, torch.bfloat16, seed=9)
    runs = [emulated_forward(emulator, g, x, w, cu, off, clusters=n) for g in (2, 3) for n in (1, 2, 5)]
    for y, rstd, stats in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(rstd, runs[0][1])
        assert all(torch.equal(a, b) for a, b in zip(stats, runs[0][2]))
    y, rstd, stats = emulated_forward(emulator, 4, x, w, cu, off)  # 4 row groups
    torch.testing.assert_close(rstd, runs[0][1], rtol=1e-6, atol=0)
    torch.testing.assert_close(y, runs[0][0], **two_steps(torch.bfloat16))
    for a, b in zip(stats, runs[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("seed", range(8))
def test_emulated_random_batches(emulator, seed):
    """Random ragged batches: dtype and weight dtype, sequence lengths (empty ones included), segment offsets
    anywhere in [0, len], rows in no sequence, geometry and cluster count drawn from the seed."""
    g = torch.Generator().manual_seed(300 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    dtype = pick([torch.bfloat16, torch.float16])
    geometry = int(torch.randint(len(GEOMETRIES), (1,), generator=g))
    dim = GEOMETRIES[geometry][0]
    cu, off, rows = random_ragged(g, max_seqs=6, max_len=45, max_segments=4, max_trailing=20)
    x = concentrated((rows,), dim, seed=seed).to(dtype)
    w = (1.0 + 0.2 * torch.randn(dim, generator=g)).to(pick([dtype, torch.float32]))
    y, rstd, stats = emulated_forward(emulator, geometry, x, w, cu, off, clusters=pick([1, 2, 4]))
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


def test_emulated_padded_batch_and_rows_in_no_segment(emulator):
    """A padded batch through its token index (rows in no sequence between sequences) with the default one segment
    per sequence; and the same rows with every segment empty: y and rstd bitwise the same, no statistics."""
    mask = torch.ones(4, 40, dtype=torch.int64)
    mask[0, :7] = 0
    mask[1, 30:] = 0
    mask[2] = 0
    x = concentrated((mask.numel(),), 256, seed=11).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, 256).to(torch.bfloat16)
    cu, tok = padded_to_cu_seqlens(mask)
    y, rstd, stats = emulated_forward(emulator, 2, x, w, cu, None, tok)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, None, tok)
    empty = torch.zeros(len(cu) - 1, 3, dtype=torch.int32)
    y1, r1, s1 = emulated_forward(emulator, 2, x, w, cu, empty, tok)
    assert torch.equal(y, y1) and torch.equal(rstd, r1)
    assert int(s1.count.sum()) == 0 and not s1.unit_sum.any() and not s1.sq_norm.any() and not s1.adjacent.any()


def test_emulated_nan_row(emulator):
    """A NaN in x makes its row, its segment's statistics and its sequence's adjacent term NaN, and nothing else."""
    x, w, cu, off = long_batch(256, torch.bfloat16, seed=13)
    x[cu[0] + 40, 7] = float("nan")  # sequence 0, segment 0 ([4, 37)... row 40 is in segment 1 ([37, 70))
    y, _, stats = emulated_forward(emulator, 3, x, w, cu, off)
    assert torch.isnan(y[40]).all() and not torch.isnan(y[41]).any()
    assert torch.isnan(stats.unit_sum[0, 1]).all() and torch.isnan(stats.adjacent[0])
    assert not torch.isnan(stats.unit_sum[0, 0]).any() and not torch.isnan(stats.unit_sum[1:]).any()
    assert not torch.isnan(stats.adjacent[1:]).any()


def test_emulated_spare_items_end_the_walk(emulator):
    """The plan's spare items (no rows) come last, and a cluster stops at the first it is handed (one cluster: it
    walks the items with rows, taking a ticket at each); a work list with many spares gives the same bits as one
    trimmed to the items with rows."""
    x, w, cu, off = long_batch(256, torch.bfloat16, seed=5)
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w, cluster_chunk=CHUNK)
    nrows = plan.item_nrows
    n_real = int((nrows > 0).sum())
    assert n_real < plan.grid and bool((nrows[:n_real] > 0).all()) and not nrows[n_real:].any()
    tickets = []
    emulated_forward(emulator, 3, x, w, cu, off, clusters=1, plan=plan, tickets=tickets)
    assert tickets == [n_real]
    full = emulated_forward(emulator, 3, x, w, cu, off, clusters=3, plan=plan)
    assert_stats(full[2], full[0], cu, off)
    trimmed = plan._replace(grid=n_real, item_row0=plan.item_row0[:n_real], item_nrows=nrows[:n_real],
                            item_seg=plan.item_seg[:n_real], item_pair_end=plan.item_pair_end[:n_real])
    part = emulated_forward(emulator, 3, x, w, cu, off, clusters=3, plan=trimmed)
    assert torch.equal(full[0], part[0]) and all(torch.equal(a, b) for a, b in zip(full[2], part[2]))


def test_python_supported_mirrors_launcher(emulator, monkeypatch):
    """``_cuda_cluster_supported`` agrees with ``cluster_supported`` of csrc/rmsnorm_angle_launch.h over widths,
    dtypes, row strides, misaligned x or weight and the tuning knobs (rows a block, ring stages, deferral), so the
    op never sends the kernel rows or a tuning it refuses."""
    y = torch.empty(4, dtype=torch.float32)
    checked = total = 0
    for dim in (256, 1024, 2048, 2056, 4096, 5120, 8192, 16384):
        for dtype in DTYPES:
            for w_dtype in {dtype, torch.float32, torch.bfloat16}:
                for pad, x_shift, w_shift in ((0, 0, 0), (8, 0, 0), (1, 0, 0), (16, 1, 0), (0, 0, 1)):
                    x = torch.ones(2, dim + pad + x_shift, dtype=dtype)[:, x_shift:x_shift + dim]
                    w = torch.ones(dim + w_shift, dtype=w_dtype)[w_shift:]
                    for tuning in ((24, 4, 0), (12, 4, 0), (24, 4, 2), (24, 5, 0), (16, 4, 0), (16, 5, 0),
                                   (16, 4, 2), (12, 5, 0), (24, 3, 0), (8, 4, 0)):
                        set_tuning(monkeypatch, tuning)
                        ours = rmsnorm_module._cuda_cluster_supported(x, w)
                        theirs = emulator.emu_cluster_supported(CODE[dtype], CODE[w_dtype], x.data_ptr(),
                                                                x.stride(0), w.data_ptr(), y.data_ptr(), dim, *tuning)
                        assert ours == bool(theirs), (dim, dtype, w_dtype, pad, x_shift, w_shift, tuning)
                        checked += ours
                        total += 1
    assert 50 < checked < total - 50


@pytest.mark.parametrize("dim,tuning", [(2048, (24, 4, 0)), (4096, (12, 4, 0)), (4096, (24, 4, 2)),
                                        (4096, (24, 5, 0)), (8192, (16, 4, 0))])
def test_emulated_op_dispatch(emulator, dim, tuning):
    """The op's own instantiations through its dispatch (clusters of 8 blocks of 32 values a thread: 384-thread
    blocks of 6 or 3 row groups, 256-thread blocks of one; items of 96-192 rows; rings of 4 or 5 rows), 2
    clusters: one sequence long enough for several items per cluster, pairs across every kind of boundary, a
    second sequence ending mid-item, rows in no segment."""
    x = concentrated((700,), dim, seed=dim).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, dim).to(torch.bfloat16)
    cu = torch.tensor([0, 531, 690], dtype=torch.int32)
    off = torch.tensor([[3, 300, 529], [0, 100, 159]], dtype=torch.int32)
    y, rstd, stats = emulated_forward(emulator, None, x, w, cu, off, clusters=2, tuning=tuning)
    assert_rms(y, rstd, x, w)
    assert_stats(stats, y, cu, off)


def cluster_schema_args() -> list[str]:
    """The argument names of ``rmsnorm_angle_cluster_ext``'s schema in csrc/rmsnorm_angle_cuda_binding.cpp."""
    text = (cuda_emulator.CSRC / "rmsnorm_angle_cuda_binding.cpp").read_text()
    schema = re.search(r'"rmsnorm_angle_cluster_ext\((.*?)\) ->', text.replace('"\n      "', ""))
    return [a.split()[-1] for a in schema.group(1).split(",")]


@pytest.mark.parametrize("dim,tuning", [(2048, (24, 4, 0)), (4096, (12, 4, 0))])
def test_op_path_through_emulated_kernel(emulator, dim, tuning, monkeypatch):
    """``rmsnorm_angle`` itself on the cluster path, on a CPU: the plan with the knobs' item size, the outputs and
    partials it allocates (CS scalars an item), the op call (its arguments by the binding's schema, handed to the
    emulated dispatch) and the reduce, against the float64 reference."""
    names = cluster_schema_args()
    calls = []

    def emulated_op(*args):
        a = dict(zip(names, args, strict=True))
        calls.append(a)
        x2d, w = a["x"], a["weight"]
        items = [a[k] for k in ("item_row0", "item_nrows", "item_seg", "item_pair_end")]
        rc = emulator.emu_cluster_op(
            CODE[x2d.dtype], CODE[w.dtype], x2d.data_ptr(), x2d.stride(0), w.data_ptr(), a["y"].data_ptr(),
            a["rstd"].data_ptr(), *(t.data_ptr() for t in items), items[0].numel(), a["part_sum"].data_ptr(),
            a["part_q"].data_ptr(), a["part_adj"].data_ptr(), a["counter"].data_ptr(), x2d.shape[0], x2d.shape[1],
            a["eps"], a["clusters"] or 2, a["rows"], a["stages"], a["defer"])
        assert rc == 0

    monkeypatch.setattr(torch.ops.gainrl, "rmsnorm_angle_cluster_ext", emulated_op, raising=False)
    monkeypatch.setattr(rmsnorm_module, "_cuda_cluster_take", lambda x2d, weight: True)
    set_tuning(monkeypatch, tuning)
    x = concentrated((400,), dim, seed=3).to(torch.bfloat16)
    w = torch.linspace(0.5, 1.5, dim).to(torch.float32)
    cu = torch.tensor([0, 290, 380], dtype=torch.int32)
    off = torch.tensor([[2, 200, 288], [0, 50, 90]], dtype=torch.int32)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    (call,) = calls
    assert call["part_q"].numel() == call["item_row0"].numel() * rmsnorm_module._CUDA_CLUSTER_BLOCKS
    assert 4 * tuning[0] < int(call["item_nrows"].max()) <= 8 * tuning[0]  # the knob's item size
    assert_rms(y, call["rstd"], x, w)
    assert_stats(stats, y, cu, off)


def test_every_build_fits_shared_memory(emulator):
    """Each build's dynamic shared memory, with a weight of x's dtype or fp32, fits an sm_90 block (227 KiB: the
    228 KiB of an SM less the 1 KiB each block reserves), and the widths' tunings are builds."""
    for dim, builds in rmsnorm_module._CUDA_CLUSTER_BUILT.items():
        assert rmsnorm_module._CUDA_CLUSTER_TUNED[dim] in builds
        for tuning in builds:
            for w_native in (1, 0):
                smem = emulator.emu_cluster_smem(dim, *tuning, w_native)
                assert 100 * 1024 < smem <= 227 * 1024, (dim, tuning, w_native, smem)


def test_cluster_plan_and_knob(monkeypatch):
    """Without an sm_90 GPU and the extension's cluster kernel the plan keeps the rows kernels' chunk, knob or not;
    an explicit cluster chunk plans items of that many rows (and the reduce then takes CS scalars an item)."""
    x, w, cu, off = batch(256, torch.bfloat16, seed=1)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_CLUSTER", True)
    monkeypatch.setattr(rmsnorm_module, "_CUDA_CLUSTER_MIN_ROWS", 0)
    assert not rmsnorm_module._cuda_cluster_take(x, w)  # a CPU tensor
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
    assert not plan.cfg.cluster
    plan = rmsnorm_module._stats_plan(x, cu, off, None, w, cluster_chunk=CHUNK)
    assert plan.cfg.cluster and plan.cfg.chunk == CHUNK
    assert int(plan.item_nrows.max()) <= CHUNK


# ---------------------------------------------------------------------------------------------------- on a GPU

needs_cluster = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") not in (None, "", "0")
    or torch.cuda.get_device_capability()[0] < 9 or not has_ext_kernel("cuda", "rmsnorm_angle_cluster_ext"),
    reason="needs an sm_90+ GPU, compiled Triton and the CUDA build of the extension (rmsnorm_angle_cluster_ext)",
)


@needs_cluster
@pytest.mark.parametrize("dim,tuning,dtype,w_dtype", [
    (d, tuning, t, w) for d, built in sorted(rmsnorm_module._CUDA_CLUSTER_BUILT.items()) for tuning in sorted(built)
    for t in (torch.bfloat16, torch.float16) for w in (t, torch.float32)], ids=str)
def test_cuda_cluster_matches_rows_kernel(dim, tuning, dtype, w_dtype, monkeypatch):
    """On the GPU, every build (width x rows a block, ring stages, deferral x dtypes): the cluster kernel's rstd
    within fp32 rounding of torch's and y exactly HF's formula on it, the statistics those of y and close to the
    rows kernel's; bitwise the same on a second call and replayed from a CUDA graph. Two batches: the short one of
    the emulator tests (fewer items than clusters) and up to 12 sequences of up to 800 tokens (clusters walk
    several items each, from the counter)."""
    g = torch.Generator().manual_seed(dim)
    cu, off, rows = random_ragged(g, max_seqs=13, max_len=800, max_segments=4, max_trailing=50)
    many = (concentrated((rows,), dim, seed=1).to(dtype), (1.0 + 0.2 * torch.randn(dim, generator=g)).to(w_dtype),
            cu, off)
    for inputs in (long_batch(dim, dtype, seed=dim, w_dtype=w_dtype), many):
        x, w, cu, off = (t.cuda() for t in inputs)
        monkeypatch.setattr(rmsnorm_module, "_CUDA_CLUSTER", False)
        y_r, s_r = rmsnorm_angle(x, w, EPS, cu, off)
        monkeypatch.setattr(rmsnorm_module, "_CUDA_CLUSTER", True)
        monkeypatch.setattr(rmsnorm_module, "_CUDA_CLUSTER_MIN_ROWS", 0)
        set_tuning(monkeypatch, tuning)
        assert rmsnorm_module._cuda_cluster_take(x, w)
        plan = rmsnorm_module._stats_plan(x, cu, off, None, w)
        assert plan.cfg.cluster and plan.cfg.chunk == 8 * tuning[0]
        y, rstd, stats = rmsnorm_module._forward(x, w, EPS, plan, True)
        assert_rms(y, rstd, x, w, rtol=2e-6)  # the hardware's approximate rsqrt
        y_api, s_api = rmsnorm_angle(x, w, EPS, cu, off, validate=False)
        assert torch.equal(y_api, y) and all(torch.equal(a, b) for a, b in zip(s_api, stats))
        assert_stats(type(s_api)(*stats), y.cpu(), cu.cpu(), off.cpu())
        torch.testing.assert_close(y, y_r, **two_steps(dtype))
        dy = float((y.float() - y_r.float()).abs().max())
        for a, b in zip(stats, s_r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 + dy)
        assert_same_again_and_in_graph(x, w, cu, off, y_api, s_api)
