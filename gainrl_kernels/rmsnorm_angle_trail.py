"""The fused RMSNorm + angle forward without a walk (an opt-in experiment: ``rmsnorm_angle._TRAIL``, off).

The default forward (``rmsnorm_angle._fwd_rows_kernel`` or the CUDA rows kernel) walks each work item's rows in one
program, because a chunk's statistics are one fp32 partial row. On an H200 at D = 4096 any walk of rows loses 7-12%
against one row per program (``bench/walk_order.py``, docs/fused_forward.md). Here every program normalises one row,
as the bare kernel does, and the statistics come from a trailing pass:

* program p normalises row p (as the bare kernel: no spare programs) and finds its work item from the plan's row
  map (the item holding the first row of each 64-row block; the items tile the rows in order), then writes y, rstd
  and, in an item with statistics, 1 / ||y_t|| (a second block reduction);
* a count per item (one atomic per row program; nothing waits) tells the program that completes the item to sum
  the item's u_t = y_t / ||y_t||, ||u_t||² and the pairs u_t . u_{t+1} (t + 1 < pair_end) into the item's partial
  row and scalars, re-reading the item's y from the L2 (written microseconds before; loads that skip the L1, which
  may hold a stale line shared with an earlier item's rows) and its 1 / ||y|| (on lines of the item's own), RT rows
  of a column slice per step, each row once (the pair (t - 1, t) from the row carried over), in a fixed order: the
  statistics do not depend on which program completes the item;
* the item's last pair (its last row and the row after the item, which belongs to the next item and may not be
  written yet) recomputes that row's y from x, with the row programs' own code, so bitwise the y that row gets.

The partials are the rows kernel's (one fp32 row and two scalars per item) and ``rmsnorm_angle._reduce_kernel`` sums
them. DRAM traffic: the bare kernel's plus the partial rows. On an H200 it lost (bf16 graph replays, session 20,
``bench/results/fused_variants_h200_trail.json``): 1.86 ms with 64-row items at 64 x 4096 x 4096 against the
walking forward's 1.165 and the bare kernel's 1.05 ms; 2.5-4.6x the bare kernel at 16 x 4096 x 2048 and 5120. The
stripped-down prototype (``bench/walk_order.py`` orders ``trail_*``) loses as much (1.48-1.70x), while its parts
without the sum cost 0.8% (1 / ||y||) and 6% (the count): the completing programs' serial sums are the cost.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import rmsnorm_angle as _ra
from .rmsnorm_angle import _inv_norm, _rms_out, _rstd

# rows per step of the trailing sums (each its own row-slice load) and pipeline stages. A slice is one 16-byte copy
# per thread (1024 bf16 values at 4 warps), the size cp.async can take past the L1: 4 KB of a bf16 item's y per
# step, 12 KB in flight, 16 KB of shared memory (8 programs of 4 warps per SM keep fitting)
_ROWS_PER_STEP, _STAGES = 2, 4
# register cap of 16-bit rows on CUDA: the bare kernel's occupancy (8 blocks of 4 warps per SM at D = 4096); no
# spills at sm_80 / sm_90a (tests/test_triton_compile.py)
_MAXNREG_16BIT = 64


class TrailConfig(NamedTuple):
    """Launch shape of ``_fwd_trail_kernel`` (the launcher and tests/test_triton_compile.py lower these)."""

    block_d: int
    num_warps: int
    maxnreg: Optional[int]
    rt: int
    slice_d: int
    stages: int


def trail_config(dim: int, elem_size: int, cuda: bool = True, aligned: bool = True) -> TrailConfig:
    """The bare kernel's warps for one row of ``dim`` values (``rmsnorm_angle._row_warps``), the register cap for
    16-bit rows on CUDA, the trailing sums' step. ``aligned``: the launch compiles 16-byte vectors
    (``rmsnorm_angle._vector_aligned``). The sums are pipelined (cp.async) only where each thread's copy of a row
    slice is 16 bytes, which cp.async takes past the L1 (.cg); smaller copies would go through it, and a line shared
    with another item's rows could be read stale, so those load from the L2 unpipelined."""
    block_d = max(16, triton.next_power_of_2(dim))
    warps = _ra._row_warps(block_d, elem_size)
    slice_d = 16 * 32 * warps // elem_size
    stages = _STAGES if aligned and slice_d <= block_d else 1
    maxnreg = _MAXNREG_16BIT if cuda and elem_size == 2 else None
    if warps == 16 and cuda:  # fp32 rows of 8192: ptxas aims at 2 blocks per SM (64 registers) and spills
        maxnreg = 128
    return TrailConfig(block_d, warps, maxnreg, _ROWS_PER_STEP, min(slice_d, block_d), stages)


@triton.jit
def _load_row(x_ptr, w_ptr, row, stride_r, dd, d_ok):
    """(x [1, BLOCK_D], w [BLOCK_D]) of one row, fp32."""
    w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_r + dd[None, :], mask=d_ok[None, :], other=0.0).to(tl.float32)
    return x, w


@triton.jit
def _row_out(x, w, D, eps, YT: tl.constexpr, NATIVE_CAST: tl.constexpr, RSQRT_RSTD: tl.constexpr):
    """(y [1, BLOCK_D] fp32 of the rounded values, rstd [1]) of a loaded row, as the bare kernel's one-row step."""
    rstd = _rstd(tl.sum(x * x, axis=1), D, eps, RSQRT_RSTD)
    return _rms_out(x, rstd, w, YT, NATIVE_CAST), rstd


@triton.jit
def _item_of(row, map_ptr, item_row0_ptr, item_nrows_ptr, grid, MAP_BLOCK: tl.constexpr):
    """(item, its first row, its rows) of work item holding ``row``: the item of the row's block (the plan's row
    map), then the next ones while they end at or before ``row`` (at most MAP_BLOCK steps: the items tile the rows in
    order). Item indices are clamped into [0, grid), so a map left unwritten by a plan of unvalidated indices costs
    statistics, never an access out of bounds; such a row is found in no item (0 rows)."""
    item = tl.minimum(tl.maximum(tl.load(map_ptr + row // MAP_BLOCK), 0), grid - 1)
    row0 = tl.load(item_row0_ptr + item)
    nrows = tl.load(item_nrows_ptr + item)
    steps = 0
    while (row0 + nrows <= row) & (item + 1 < grid) & (steps < MAP_BLOCK):
        item += 1
        row0 = tl.load(item_row0_ptr + item)
        nrows = tl.load(item_nrows_ptr + item)
        steps += 1
    inside = (row0 <= row) & (row < row0 + nrows)
    return item, row0, tl.where(inside, nrows, 0)


@triton.jit
def _fwd_trail_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, inv_ptr, done_ptr, map_ptr,
    item_row0_ptr, item_nrows_ptr, item_seg_ptr, item_pair_end_ptr,
    part_sum_ptr, part_q_ptr, part_adj_ptr,
    R, D, stride_r, eps, grid, inv_stride,
    YT: tl.constexpr, NATIVE_CAST: tl.constexpr, RSQRT_INV: tl.constexpr, RSQRT_RSTD: tl.constexpr,
    BLOCK_D: tl.constexpr, RT: tl.constexpr, SLICE: tl.constexpr, STAGES: tl.constexpr, MAP_BLOCK: tl.constexpr,
):
    """Program p normalises row p; the program completing an item with statistics sums its partials (module
    docstring)."""
    row = tl.program_id(0)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    x, w = _load_row(x_ptr, w_ptr, row, stride_r, dd, d_ok)
    # the item lookup's dependent loads, issued while the row's are in flight
    item, row0, nrows = _item_of(row, map_ptr, item_row0_ptr, item_nrows_ptr, grid, MAP_BLOCK)
    y, rstd = _row_out(x, w, D, eps, YT, NATIVE_CAST, RSQRT_RSTD)
    tl.store(rstd_ptr + row + tl.arange(0, 1), rstd)
    tl.store(y_ptr + row.to(tl.int64) * D + dd[None, :], y.to(YT), mask=d_ok[None, :])
    if nrows > 0:
        if tl.load(item_seg_ptr + item) >= 0:
            # 1 / ||y_t|| at [item, t - row0]: an item's values share no cache line with another item's (below)
            inv_item = inv_ptr + item.to(tl.int64) * inv_stride
            tl.store(inv_item + (row - row0) + tl.arange(0, 1), _inv_norm(tl.sum(y * y, axis=1), RSQRT_INV))
            tl.debug_barrier()  # every thread's y and 1 / ||y|| stores precede the release below
            if tl.atomic_add(done_ptr + item, 1, sem="acq_rel") == nrows - 1:
                pair_end = tl.load(item_pair_end_ptr + item)
                q = tl.zeros([], dtype=tl.float32)
                adj = tl.zeros([], dtype=tl.float32)
                for s in range(0, D, SLICE):
                    cs = s + tl.arange(0, SLICE)
                    c_ok = cs < D
                    acc = tl.zeros([SLICE], dtype=tl.float32)
                    prev = tl.zeros([SLICE], dtype=tl.float32)  # u of the row before, for the pair (t - 1, t)
                    for t0 in tl.range(0, nrows, RT, num_stages=STAGES):
                        for r in tl.static_range(RT):  # RT rows a step, each its own [SLICE] load: y read once
                            t = t0 + r
                            ok = t < nrows
                            # another program's row: read from the L2 (.cg), never from this SM's L1, which may
                            # hold a line of it from before it was written (an earlier item sharing the line); its
                            # 1 / ||y|| from the item's own lines (a 4-byte cp.async goes through the L1 anyway)
                            u = tl.load(y_ptr + (row0 + t).to(tl.int64) * D + cs, mask=c_ok & (t + cs * 0 < nrows),
                                        other=0.0, cache_modifier=".cg").to(tl.float32)
                            u = u * tl.load(inv_item + tl.minimum(t, nrows - 1))  # u is 0 past the item
                            acc += u
                            q += tl.sum(u * u, axis=0)
                            adj += tl.where((t >= 1) & ok & (row0 + t < pair_end), tl.sum(prev * u, axis=0), 0.0)
                            prev = u
                    tl.store(part_sum_ptr + item.to(tl.int64) * D + cs, acc, mask=c_ok)
                last = row0 + nrows - 1
                if (last + 1 < pair_end) & (last + 1 < R):  # the pair reaching into the next item
                    x1, w1 = _load_row(x_ptr, w_ptr, last + 1, stride_r, dd, d_ok)
                    y1, _ = _row_out(x1, w1, D, eps, YT, NATIVE_CAST, RSQRT_RSTD)
                    y0 = tl.load(y_ptr + last.to(tl.int64) * D + dd[None, :], mask=d_ok[None, :], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                    inv0 = tl.load(inv_item + (nrows - 1) + tl.arange(0, 1))
                    adj += tl.sum(tl.sum(y0 * y1, axis=1) * inv0 * _inv_norm(tl.sum(y1 * y1, axis=1), RSQRT_INV),
                                  axis=0)
                tl.store(part_q_ptr + item, q)
                tl.store(part_adj_ptr + item, adj)


def trail_forward(x2d: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, plan, eps: float,
                  part_sum: torch.Tensor, part_q: torch.Tensor, part_adj: torch.Tensor) -> None:
    """One launch of ``_fwd_trail_kernel`` over the plan's work items (chunks of at most plan.cfg.chunk rows) into
    y [R, D], rstd [R] and the per-item partials (part_sum [G, D] f32, part_q / part_adj [G] f32; items without
    statistics leave theirs untouched, as the rows kernel does). Two scratch buffers: 1 / ||y_t|| per item row
    ([G, chunk rounded up to 32] f32) and the per-item counts [G] int32 (zeroed: one memset). Needs the plan's
    row map (``_stats_plan`` writes it when ``_TRAIL`` is on)."""
    rows, dim = x2d.shape
    # 1 / ||y_t|| per item, rows padded to whole 128-byte lines: the completing program may read them through its
    # SM's L1, which then never holds a line of another item's values from before they were written
    inv_stride = triton.cdiv(plan.cfg.chunk, 32) * 32
    inv = torch.empty(plan.grid * inv_stride, dtype=torch.float32, device=x2d.device)
    done = torch.zeros(plan.grid, dtype=torch.int32, device=x2d.device)
    cuda = x2d.is_cuda
    cfg = trail_config(dim, x2d.element_size(), cuda, _ra._vector_aligned(x2d, weight))
    _fwd_trail_kernel[(rows,)](
        x2d, weight, y, rstd, inv, done, plan.row_map,
        plan.item_row0, plan.item_nrows, plan.item_seg, plan.item_pair_end,
        part_sum, part_q, part_adj,
        rows, dim, x2d.stride(0), float(eps), plan.grid, inv_stride,
        YT=_ra._TL_DTYPE[x2d.dtype], NATIVE_CAST=cuda,
        **_ra._rsqrt_forms(cuda),
        BLOCK_D=cfg.block_d, RT=cfg.rt, SLICE=cfg.slice_d, STAGES=cfg.stages, MAP_BLOCK=_ra._TRAIL_MAP_BLOCK,
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
