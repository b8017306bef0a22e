"""Which row orders a persistent RMSNorm walk can take at the bare kernel's speed (a diagnostic for issue 3).

The fused RMSNorm + angle forward walks each chunk of rows in one block (the statistics need a chunk's rows in
order), and on an H200 that walk costs ~9% over the bare kernel's one row per program even with the statistics
compiled out (``bench/fused_variants.py``, column "no segments ms"). This script times the same plain RMSNorm
(HF's formula, bf16) in one Triton kernel whose programs walk rows in different orders:

    program p = q * group + j walks rows  q * group * rows + j + group * i,   i = 0 .. rows - 1

* ``c{rows}``: group 1, contiguous chunks of ``rows`` rows per program (c1 is the bare kernel's order);
* ``g{group}_c{rows}``: ``group`` programs share a chunk of group * rows rows, interleaved row by row, so programs
  that run at the same time touch neighbouring rows (what a thread-block cluster walking one chunk would do);
* ``strided_{P}``: one group of P programs (a persistent grid), grid-strided rows;
* ``_w``: the weight reloaded each row rather than held in registers; ``_ahead``: the next row loaded into
  registers before this row's store; ``_s{S}``: the row loop software-pipelined with S stages (loads issued S - 1
  rows ahead, as the CUDA rows kernel's cp.async ring).
* ``c{rows}_pad``: x's row pitch is D + 64 elements, so rows are not a power-of-two number of bytes apart;
* ``t{T}_c{rows}``: T of the program's rows loaded together per step (4 warps a row), rows / T steps;
* ``c1_norm``: one row per program that also stores 1 / ||y_t|| (a second block reduction); ``c1_norm_count``: and
  counts each group of 64 rows done (one atomic per program); ``trail_{C}``: and the program that completes each
  group of C rows sums the group's unit vectors from the L2 (the statistics without a walk: DRAM traffic of the
  bare kernel plus one fp32 row per C rows; a prototype of the trail forward, removed in session 20 after it lost);
* ``ticket_sm{N}``: a persistent grid of N programs per SM taking rows one at a time from an atomic counter (the
  order the hardware block scheduler hands out c1's programs, without its block launches).
* ``strided_{P}_throttle{K}``: the strided order's grid held together (``_throttle_kernel``): each program adds 1
  to a counter after each row and, before its row i, waits until the count reaches P (i - K): static rows, whose
  window stays near c1's if drift is what the strided order loses; ``strided_{P}_count``: the adds alone. Capped at
  64 registers (8 programs per SM, all resident); GPU only with more than one program, as the sync orders.
* ``sync{T}_c{C}_sm{k}``: a persistent grid of k programs per SM in lock step (``_sync_kernel``): iteration i's
  program p sums chunk i * P + p (C rows, T a step) into an fp32 partial row in an L2 ring, waits until every
  program has finished iteration i - 1 and adds that iteration's partials, for its own column slice, into
  segment sums (checked against torch); ``nosync...``: the partials written, no wait and no combine. GPU only with
  more than one program (the interpreter runs programs one after another, so it runs one).
* ``atomic_c{C}`` / ``atomic_t{T}_c{C}``: the c / t orders whose programs also sum their chunk's unit vectors in
  registers and add the sum into its segment's fp32 sum row with relaxed atomics (``_atomic_kernel``; vector
  reductions on sm_90, held in the L2; no fixed summation order; checked against torch); ``unflushed_...``: the same
  sums computed, not added. They price a forward that keeps a short-chunk order that keeps up, by atomics per row.
  ``_acc``: added once per chunk from an accumulator row held across steps (the c orders: 4 programs per SM).
* ``group_t{T}_c{C}_g{G}``: the t orders whose programs store their chunk's unit-vector sum as an fp32 partial row
  (evict_last), and the program that completes each group of G chunks (an acq_rel count, no waiting) adds the
  group's partials, in chunk order, into one output row (``_group_kernel``; checked against torch): fixed-order
  statistics at a short chunk's window with the partials read back from the L2; ``_discard``: the consumed
  partials' L2 lines dropped unwritten (PTX discard.global.L2, GPU only), so they never reach the DRAM;
  ``group_t4_c8_uncombined``: the partials stored and left. H200, session 22
  (bench/results/walk_order_h200_group.json): +24.5% for the partial stores alone, +35-36% combined, 2x with the
  discards (timed before the barrier that now orders them after the group's loads: two of four sums differed).

Graph-timed; each order's y (and the trail orders' sums) is checked against torch first. H200, 2026-11-27
(bench/results/walk_order_h200*.json, docs/fused_forward.md "session 18"): at 64x4096x4096 every walk is 7-12%
slower than c1, interleaved and strided orders included, at the same registers and bytes; at D = 2048 and 5120
walks keep up. Session 20 (bench/results/walk_order_h200_causes.json, _sync.json; docs/fused_forward.md "session
20"): the loss follows the window of rows in flight (programs in flight x chunk: +1.3% for c2, +5% for c8, +7.5%
for c256, fat programs alike), odd chunks and a padded pitch do not help, the ticket order keeps up (+0.6-1.2%),
the trail orders lose 48-70% and the sync orders, correct, 85-226% in Triton.

    PYTHONPATH=. python bench/walk_order.py --out bench/results/walk_order_<gpu>.json
    PYTHONPATH=. python bench/walk_order.py --dims 4096 --orders c1,c8 --no-time   # once each, under a profiler
    PYTHONPATH=. python bench/walk_order.py --shapes 262144x4096,65536x4096 --orders c1,c8,c256   # size dependence
    python bench/walk_order.py --smoke     # tiny shapes, TRITON_INTERPRET=1 on a CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_variants import (  # noqa: E402
    error_status, exit_code, graph_time, parse_names, parse_shapes, record_row,
)
from run_kernels_bench import torch_rmsnorm  # noqa: E402


@triton.jit
def _norm_store(x, w, y_ptr, row, D, cols, m, eps):
    """Stores HF's RMSNorm of the loaded rows x ([BLOCK_D] or [TILE_R, BLOCK_D], f32) at rows ``row`` of y."""
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=-1, keep_dims=True) / D + eps)
    yt = y_ptr.dtype.element_ty
    y = (w * (x * rstd).to(yt).to(tl.float32)).to(yt)  # HF: w * round(x * rstd), rounded once
    tl.store(y_ptr + row * D + cols, y, mask=m)


@triton.jit
def _walk_kernel(x_ptr, w_ptr, y_ptr, R, D, pitch, eps, rows, group, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
                 W_EACH_ROW: tl.constexpr, AHEAD: tl.constexpr, TILE_R: tl.constexpr):
    pid = tl.program_id(0)
    q = pid // group
    j = pid - q * group
    base = q.to(tl.int64) * group * rows + j
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if TILE_R > 1:  # TILE_R of the program's rows per step, loaded together (rows = steps * TILE_R)
        k = tl.arange(0, TILE_R)[:, None]
        for i in tl.range(0, rows // TILE_R, num_stages=STAGES):
            row = base + (i * TILE_R + k) * group
            m = cm[None, :] & (row < R)
            x = tl.load(x_ptr + row * pitch + cols[None, :], mask=m, other=0.0).to(tl.float32)
            _norm_store(x, w[None, :], y_ptr, row, D, cols[None, :], m, eps)
    else:
        x_next = tl.load(x_ptr + base * pitch + cols, mask=cm & (base + cols * 0 < R), other=0.0)  # AHEAD only
        for i in tl.range(0, rows, num_stages=STAGES):
            if W_EACH_ROW:  # reloaded (an L1 hit) rather than held in registers across rows
                w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            row = base + i * group
            m = cm & (row + cols * 0 < R)
            if AHEAD:  # row i + 1 loaded into registers before row i's store is issued
                x = x_next.to(tl.float32)
                nxt = row + group
                x_next = tl.load(x_ptr + nxt * pitch + cols,
                                 mask=cm & (nxt + cols * 0 < R) & (i + 1 + cols * 0 < rows), other=0.0)
            else:
                x = tl.load(x_ptr + row * pitch + cols, mask=m, other=0.0).to(tl.float32)
            _norm_store(x, w, y_ptr, row, D, cols, m, eps)


@triton.jit
def _ticket_kernel(x_ptr, w_ptr, y_ptr, counter_ptr, R, D, pitch, eps, BLOCK_D: tl.constexpr):
    """A persistent grid whose programs take rows in the order the counter hands them out (the hardware block
    scheduler's order, one row at a time); the next ticket is taken before this row is loaded."""
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    row = tl.atomic_add(counter_ptr, 1, sem="relaxed").to(tl.int64)
    while row < R:
        nxt = tl.atomic_add(counter_ptr, 1, sem="relaxed").to(tl.int64)
        x = tl.load(x_ptr + row * pitch + cols, mask=cm, other=0.0).to(tl.float32)
        _norm_store(x, w, y_ptr, row, D, cols, cm, eps)
        row = nxt


@triton.jit
def _wait_count(ptr, target, n, spin_limit, err_ptr, SEM: tl.constexpr):
    """Polls the counter at ``ptr`` until it reaches ``target``, or until ``n`` (polls so far, returned) reaches
    spin_limit: then sets err_ptr and waits no more (programs that are not all resident would hang the GPU)."""
    cnt = tl.atomic_add(ptr, 0, sem=SEM)
    while (cnt < target) & (n < spin_limit):
        cnt = tl.atomic_add(ptr, 0, sem=SEM)
        n += 1
    if cnt < target:
        tl.atomic_max(err_ptr, 1)
    return n


@triton.jit
def _throttle_kernel(x_ptr, w_ptr, y_ptr, counter_ptr, err_ptr, R, D, pitch, eps, n_iter, slack, spin_limit,
                     BLOCK_D: tl.constexpr, WAIT: tl.constexpr):
    """The strided orders' persistent grid (program p of P: rows p + P i, one a step) held together by a counter:
    after each row a program adds 1 (relaxed: a pace, not a data handoff), and WAIT: before row i it polls until
    the count reaches P (i - slack): no program runs more than slack steps ahead of the grid's mean, so the rows in
    flight stay within ~P (slack + 1) rows (a pace on the mean, not a barrier: one straggler may fall behind).
    Static rows, so a program's statistics would have a fixed order, unlike the ticket order's. A program that has
    polled spin_limit times in all sets err_ptr and waits no more."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    n = 0  # polls so far
    for i in range(0, n_iter):
        if WAIT:
            target = P * (i - slack)
            if target > 0:
                n = _wait_count(counter_ptr, target, n, spin_limit, err_ptr, "relaxed")
        row = (i * P + p).to(tl.int64)  # < R + P: no int32 overflow
        m = cm & (row + cols * 0 < R)
        x = tl.load(x_ptr + row * pitch + cols, mask=m, other=0.0).to(tl.float32)
        _norm_store(x, w, y_ptr, row, D, cols, m, eps)
        tl.atomic_add(counter_ptr, 1, sem="relaxed")


@triton.jit
def _trail_kernel(x_ptr, w_ptr, y_ptr, inv_ptr, part_ptr, done_ptr, R, D, pitch, eps, C, BLOCK_D: tl.constexpr,
                  TRAIL: tl.constexpr, REDUCE: tl.constexpr, RT: tl.constexpr, SLICE: tl.constexpr,
                  STAGES: tl.constexpr):
    """One row per program (c1's order) that also stores 1 / ||y_t|| (a second block reduction). TRAIL: the program
    that completes a group of C rows (an atomic count per group, no waiting) sums that group's unit vectors
    y_t / ||y_t|| into one fp32 partial row, re-reading the group's y from the L2 (written microseconds before) in
    [RT, SLICE] tiles: a fused forward whose DRAM traffic is the bare kernel's plus one partial row per C rows.
    REDUCE = False: the count alone (its atomics' cost). The group's 1 / ||y_t|| loads may go through the L1 (4-byte
    cp.async): groups of a multiple of 32 rows keep each group's values on lines of their own, so no stale line of
    another group's can be there."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * pitch + cols, mask=cm, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    yt = y_ptr.dtype.element_ty
    y = (w * (x * rstd).to(yt).to(tl.float32)).to(yt)
    tl.store(y_ptr + row * D + cols, y, mask=cm)
    yf = y.to(tl.float32)
    tl.store(inv_ptr + row, 1.0 / tl.maximum(tl.sqrt(tl.sum(yf * yf, axis=0)), 1e-12))
    if TRAIL:
        g = row // C
        n_g = tl.minimum(C, R - g * C)
        tl.debug_barrier()  # every thread's y and 1 / ||y|| stores precede the release below
        last = tl.atomic_add(done_ptr + g, 1, sem="acq_rel") == n_g - 1
        if REDUCE and last:
            r0 = g * C
            for s in range(0, D, SLICE):
                cs = s + tl.arange(0, SLICE)
                sm = cs < D
                acc = tl.zeros([SLICE], dtype=tl.float32)
                for t0 in tl.range(0, n_g, RT, num_stages=STAGES):
                    k = t0 + tl.arange(0, RT)
                    rm = k < n_g
                    rr = r0 + k
                    ys = tl.load(y_ptr + rr[:, None] * D + cs[None, :], mask=rm[:, None] & sm[None, :], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                    iv = tl.load(inv_ptr + rr, mask=rm, other=0.0, cache_modifier=".cg")
                    acc += tl.sum(ys * iv[:, None], axis=0)
                tl.store(part_ptr + g * D + cs, acc, mask=sm)


@triton.jit
def _chunk_start(pid, w_ptr, D, BLOCK_D: tl.constexpr, TILE_R: tl.constexpr, ROWS: tl.constexpr):
    """Program ``pid``'s first row (chunks of ROWS rows), the columns and their mask, the tile's row offsets
    ([TILE_R, 1]) and the weight ([1, BLOCK_D] f32)."""
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    return pid.to(tl.int64) * ROWS, cols, cm, tl.arange(0, TILE_R)[:, None], w


@triton.jit
def _unit_rows(x_ptr, w, y_ptr, row, cols, m, pitch, D, eps, STREAM: tl.constexpr):
    """Loads rows ``row`` ([TILE_R, 1]) of x, stores HF's RMSNorm y and returns its unit vectors y_t / ||y_t||
    ([TILE_R, BLOCK_D] f32; 1 / max(||y||, 1e-12)). STREAM: x and y marked evict_first (read and written once)."""
    policy: tl.constexpr = "evict_first" if STREAM else ""
    x = tl.load(x_ptr + row * pitch + cols[None, :], mask=m, other=0.0, eviction_policy=policy).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1, keep_dims=True) / D + eps)
    yt = y_ptr.dtype.element_ty
    y = (w * (x * rstd).to(yt).to(tl.float32)).to(yt)
    tl.store(y_ptr + row * D + cols[None, :], y, mask=m, eviction_policy=policy)
    yf = y.to(tl.float32)
    return yf * tl.math.rsqrt(tl.maximum(tl.sum(yf * yf, axis=1, keep_dims=True), 1e-24))


@triton.jit
def _atomic_kernel(x_ptr, w_ptr, y_ptr, sums_ptr, R, D, pitch, eps, G, flush, BLOCK_D: tl.constexpr,
                   TILE_R: tl.constexpr, ROWS: tl.constexpr, EACH: tl.constexpr):
    """Each program normalises a chunk of ROWS rows (TILE_R a step, 4 warps a row; G % ROWS == 0, so a chunk lies
    in one segment of G rows, as the fused forward's work items do) and adds the unit vectors y_t / ||y_t|| into
    its segment's fp32 sum row (sums_ptr, zeroed by the caller) with relaxed atomics: vector reductions on sm_90,
    held in the L2, in no fixed order. EACH: how often a program adds: "chunk" (once, summed in registers across
    steps: an accumulator row held) or "step" (each step, the tile's rows summed across warps first; every row
    with TILE_R = 1). flush = 0: the same sums computed, nothing added (a run-time flag, so the compiler keeps
    them)."""
    pid = tl.program_id(0)
    r0, cols, cm, k, w = _chunk_start(pid, w_ptr, D, BLOCK_D, TILE_R, ROWS)
    sp = sums_ptr + (r0 // G) * D + cols[None, :]
    acc = tl.zeros([TILE_R, BLOCK_D], dtype=tl.float32)  # the tile's shape: summed across rows once, at the end
    for i in range(0, ROWS // TILE_R):
        row = r0 + i * TILE_R + k
        u = _unit_rows(x_ptr, w, y_ptr, row, cols, cm[None, :] & (row < R), pitch, D, eps, False)
        if EACH == "chunk":
            acc += u
        elif flush == 1:
            tl.atomic_add(sp, tl.sum(u, axis=0, keep_dims=True), mask=cm[None, :], sem="relaxed")
    if EACH == "chunk" and flush == 1:
        tl.atomic_add(sp, tl.sum(acc, axis=0, keep_dims=True), mask=cm[None, :], sem="relaxed")


@triton.jit
def _discard_l2(ptr, D, DISCARD: tl.constexpr, LINES: tl.constexpr):
    """Drops the L2 lines of one fp32 row at ``ptr`` (128-byte aligned, D % 32 == 0) without writing them back:
    PTX discard.global.L2 (sm_80+), so a consumed partial row never reaches the DRAM. A no-op unless DISCARD. The
    barrier first: every thread's load of the row precedes any thread's discard of its lines."""
    if DISCARD:
        tl.debug_barrier()
        line = tl.arange(0, LINES) * 32
        tl.inline_asm_elementwise("discard.global.L2 [$1], 128;\n mov.u32 $0, 0;", "=r,l",
                                  [tl.where(line < D, ptr + line, ptr)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _group_kernel(x_ptr, w_ptr, y_ptr, part_ptr, done_ptr, out_ptr, R, D, pitch, eps, part_pitch, G, n_chunks,
                  BLOCK_D: tl.constexpr, TILE_R: tl.constexpr, ROWS: tl.constexpr, COMBINE: tl.constexpr,
                  DISCARD: tl.constexpr, LINES: tl.constexpr):
    """Program p normalises chunk p (ROWS rows, TILE_R a step, 4 warps a row: the t orders' window) and stores the
    sum of its unit vectors y_t / ||y_t|| as one fp32 partial row (evict_last: it should stay in the L2). COMBINE:
    the program that completes a group of G chunks (an acq_rel count per group, no waiting) adds the group's
    partial rows, in chunk order, from the L2 into the group's output row, and with DISCARD drops their lines:
    the fixed-order statistics with no partial row in the DRAM and a window as short as the chunk. Without
    COMBINE the partials are written and left (their bytes reach the DRAM as the L2 evicts them)."""
    pid = tl.program_id(0)
    r0, cols, cm, k, w = _chunk_start(pid, w_ptr, D, BLOCK_D, TILE_R, ROWS)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS // TILE_R):
        row = r0 + i * TILE_R + k
        # summed across the step's rows at once (an accumulator of the tile's shape would take ~30 registers
        # more: one 16-warp program per SM instead of two)
        acc += tl.sum(_unit_rows(x_ptr, w, y_ptr, row, cols, cm[None, :] & (row < R), pitch, D, eps, True), axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * part_pitch + cols, acc, mask=cm,
             eviction_policy="evict_last")
    if COMBINE:
        g = pid // G
        n_g = tl.minimum(G, n_chunks - g * G)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        if tl.atomic_add(done_ptr + g, 1, sem="acq_rel") == n_g - 1:
            s = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in range(0, n_g):
                pr = part_ptr + (g * G + j).to(tl.int64) * part_pitch
                s += tl.load(pr + cols, mask=cm, other=0.0, cache_modifier=".cg")
                _discard_l2(pr, D, DISCARD, LINES)
            tl.store(out_ptr + g.to(tl.int64) * D + cols, s, mask=cm)


@triton.jit
def _sync_kernel(x_ptr, w_ptr, y_ptr, slot_ptr, sums_ptr, bar_ptr, err_ptr, R, D, pitch, eps, C, G, n_iter,
                 spin_limit, BLOCK_D: tl.constexpr, TILE_R: tl.constexpr, SL: tl.constexpr, P_BLOCK: tl.constexpr,
                 SLOTS: tl.constexpr, SYNC: tl.constexpr):
    """A persistent grid of P programs, all resident, moving through the rows in lock step: in iteration i program
    p normalises chunk i * P + p (C rows, TILE_R rows a step) and sums its unit vectors y_t / ||y_t|| into one fp32
    partial row, written to slot i % SLOTS (an L2-resident ring of SLOTS x P rows). Then it waits until every
    program has finished iteration i - 1 (a counter, one release-add per program and iteration), and adds
    iteration i - 1's partials, for its own column slice [p SL, p SL + SL), into the sums of the segments (G rows
    each, G % C == 0) they belong to, in chunk order (deterministic). So the rows in flight span P chunks at any
    time (no program can run ahead of the rest by more than an iteration) and the partials never reach the DRAM.
    Slot i % SLOTS is last read in iteration i - 2 (the combine of i - 3), which every program has finished before
    any passes the wait of iteration i - 1: 3 slots suffice. SYNC = False: the partials are written, nothing
    waits or is combined (prices the wait). A program that has polled the counter spin_limit times in all sets
    err_ptr and waits no more (programs that are not all resident would otherwise hang the GPU)."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    k = tl.arange(0, TILE_R)[:, None]
    cs = p * SL + tl.arange(0, SL)  # this program's column slice of the combine
    c_ok = cs < D
    ch = tl.arange(0, P_BLOCK)
    n = 0  # polls of the counter so far (a program that gave up waits no more)
    for i in range(0, n_iter + 1):
        if i < n_iter:
            r0 = (i * P + p).to(tl.int64) * C
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s in range(0, C // TILE_R):
                row = r0 + s * TILE_R + k
                m = cm[None, :] & (row < R)
                w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)  # an L1 hit, not held across steps
                x = tl.load(x_ptr + row * pitch + cols[None, :], mask=m, other=0.0).to(tl.float32)
                rstd = tl.math.rsqrt(tl.sum(x * x, axis=1, keep_dims=True) / D + eps)
                yt = y_ptr.dtype.element_ty
                y = (w[None, :] * (x * rstd).to(yt).to(tl.float32)).to(yt)
                tl.store(y_ptr + row * D + cols[None, :], y, mask=m)
                yf = y.to(tl.float32)
                inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(yf * yf, axis=1, keep_dims=True)), 1e-12)
                acc += tl.sum(yf * inv, axis=0)
            tl.store(slot_ptr + ((i % SLOTS) * P + p).to(tl.int64) * D + cols, acc, mask=cm)
        if SYNC:
            if i > 0:  # every program's partial of iteration i - 1 is written once all have arrived i times
                n = _wait_count(bar_ptr, P * i, n, spin_limit, err_ptr, "acquire")
                j = i - 1
                kc = j * P + ch  # chunks of iteration j
                kr = kc.to(tl.int64) * C
                seg = kr // G
                v = tl.load(slot_ptr + ((j % SLOTS) * P + ch).to(tl.int64)[:, None] * D + cs[None, :],
                            mask=((ch < P) & (kr < R))[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
                seg_lo = (j * P).to(tl.int64) * C // G
                seg_hi = tl.minimum((j * P + P).to(tl.int64) * C, R) - 1
                for sg in range(seg_lo, seg_hi // G + 1):
                    part = tl.sum(tl.where((seg == sg)[:, None], v, 0.0), axis=0)
                    sp = sums_ptr + sg * D + cs
                    tl.store(sp, tl.load(sp, mask=c_ok, other=0.0, cache_modifier=".cg") + part, mask=c_ok)
            tl.debug_barrier()  # every thread's slot and sum stores precede the release below
            tl.atomic_add(bar_ptr, 1, sem="release")


_PAD = 64  # elements added to x's row pitch by the _pad orders (128 bytes in bf16)
_MIN_TRAIL = 32  # smallest group of the trail orders
# RT rows x SLICE columns per step of the trail sum (16 values per thread; a thread's share of a row slice is one
# 16-byte copy), pipeline stages, as the full forward's (removed; e176011:gainrl_kernels/rmsnorm_angle_trail.py):
# 63 registers at sm_90a (c1's 64), where (8, 512, 3) takes 80 and spills
_TRAIL_TILE = (2, 1024, 4)
_SYNC_SLOTS = 3  # partial rows per program in the sync orders' ring (see _sync_kernel)
_SYNC_MAX_PER_SM = 2
_SYNC_SEG = (4096, 32)  # rows per segment of the sync orders' sums: on a GPU (one sequence of the goal shape), CPU
_MIN_GROUP_CHUNK = 4  # smallest chunk of the group orders
_THROTTLE_MAXNREG = 64  # registers per thread of the throttled strided orders: 8 programs of 4 warps per SM
_SYNC_SPIN_LIMIT = 1 << 22  # polls per program and launch (~0.5 µs each; a launch needs a few an iteration)


def sync_segment(x: torch.Tensor) -> int:
    """Rows per segment of the sync orders' sums for x (a multiple of every sync chunk)."""
    return _SYNC_SEG[0] if x.is_cuda else _SYNC_SEG[1]


def _check_resident(k: object, programs: int, warps: int) -> None:
    """Raises unless ``programs`` programs of the compiled kernel ``k`` fit on the GPU at once (a lock-step grid
    whose programs do not all run would wait forever; the spin limit would end it with wrong sums)."""
    try:
        getattr(k, "_init_handles", lambda: None)()
        n_regs, shared = int(k.n_regs), int(k.metadata.shared)
    except Exception:  # noqa: BLE001 - a Triton without these fields: the spin limit is the only guard
        return
    props = torch.cuda.get_device_properties(0)
    regs = -(-max(n_regs, 1) // 8) * 8
    per_sm = min(65536 // (regs * 32 * warps), 2048 // (32 * warps),
                 props.shared_memory_per_multiprocessor // max(shared, 1))
    if per_sm * props.multi_processor_count < programs:
        raise RuntimeError(f"{programs} programs of {warps} warps, {n_regs} registers, {shared} B "
                           f"shared do not fit at once ({per_sm} per SM)")


class Order(NamedTuple):
    rows: int  # rows per program (ticket: the grid is persistent and rows come from the counter)
    group: int  # programs sharing a chunk, interleaved row by row
    programs: int
    stages: int = 1  # software-pipelining stages of the row loop
    w_each_row: bool = False  # the weight reloaded each row (else held in registers)
    ahead: bool = False  # the next row loaded into registers before this row's store
    tile_r: int = 1  # rows loaded together per step (rows is a multiple), 4 warps per row
    ticket: bool = False  # rows handed out by an atomic counter, one at a time
    pad: int = 0  # x's row pitch is D + pad elements (no power-of-two strides between rows)
    norm: bool = False  # one row per program that also stores 1 / ||y_t|| (_trail_kernel)
    trail: int = 0  # ... and sums each group of this many rows' unit vectors from the L2 (the group's last program)
    reduce: bool = True  # trail: the sum itself (False: the per-group count alone)
    sync: str = ""  # "sync": a persistent grid in lock step, partials combined in the L2 (_sync_kernel); "nosync":
    # the same partials written, nothing waits or is combined
    atomic: str = ""  # "atomic": each chunk's unit-vector sum added into its segment's sum by fp32 atomics
    # (_atomic_kernel); "unflushed": the same sums computed, not added
    each: str = "step"  # atomic: added once a chunk or each step (_atomic_kernel's EACH)
    combine: int = 0  # > 0: chunk partial rows combined per group of this many chunks by its last program
    # (_group_kernel); -1: the partials written, nothing combined
    discard: bool = False  # combine: the consumed partials' L2 lines dropped (GPU only: inline PTX)
    throttle: int = 0  # > 0: a strided grid held within this many steps of its mean progress (_throttle_kernel);
    # -1: the counter's adds alone, no waiting


class Scratch(NamedTuple):
    """Buffers of the ticket, trail and sync orders for R rows of width D (rows is the largest R)."""

    counter: torch.Tensor  # int32 [1]
    inv_norm: torch.Tensor  # f32 [R]
    part: torch.Tensor  # f32 [cdiv(R, _MIN_TRAIL), D]
    done: torch.Tensor  # int32 [cdiv(R, _MIN_TRAIL)]
    slots: torch.Tensor  # f32 [_SYNC_SLOTS * _SYNC_MAX_PER_SM * n_sm, D]: the sync orders' partials
    sums: torch.Tensor  # f32 [cdiv(R, _SYNC_SEG[-1]), D]: their segment sums
    err: torch.Tensor  # int32 [1]: set by a sync wait that gave up
    chunk_part: torch.Tensor  # f32 [cdiv(R, _MIN_GROUP_CHUNK), cdiv(D, 32) * 32]: the group orders' partial rows

    @staticmethod
    def make(rows: int, dim: int, device: str, n_sm: int = 1) -> "Scratch":
        groups = triton.cdiv(rows, _MIN_TRAIL)
        i32, f32 = torch.int32, torch.float32
        return Scratch(torch.zeros(1, dtype=i32, device=device), torch.empty(rows, dtype=f32, device=device),
                       torch.empty(groups, dim, dtype=f32, device=device),
                       torch.zeros(groups, dtype=i32, device=device),
                       torch.empty(_SYNC_SLOTS * _SYNC_MAX_PER_SM * n_sm, dim, dtype=f32, device=device),
                       torch.zeros(triton.cdiv(rows, _SYNC_SEG[-1]), dim, dtype=f32, device=device),
                       torch.zeros(1, dtype=i32, device=device),
                       torch.empty(triton.cdiv(rows, _MIN_GROUP_CHUNK), triton.cdiv(dim, 32) * 32, dtype=f32,
                                   device=device))


def walk(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, o: Order, scratch: Optional[Scratch] = None,
         eps: float = 1e-6) -> object:
    """y [R, D] = RMSNorm(x [R, D], rows of any pitch) * w [D] (same dtype), programs walking rows in order ``o``
    (see the module docstring; 4 warps per row, the whole row in one tile). ``scratch``: the ticket and trail
    orders' buffers (counters zeroed here). Returns the launched compiled kernel (None in the interpreter)."""
    R, D = x.shape
    assert x.stride(1) == 1 and y.is_contiguous()
    block_d = triton.next_power_of_2(D)
    if o.ticket:
        scratch.counter.zero_()
        return _ticket_kernel[(o.programs,)](x, w, y, scratch.counter, R, D, x.stride(0), eps, BLOCK_D=block_d,
                                             num_warps=4)
    if o.sync:
        return _sync_launch(x, w, y, o, scratch, eps)
    if o.throttle:
        return _throttle_launch(x, w, y, o, scratch, eps)
    if o.atomic:
        seg = sync_segment(x)
        assert seg % o.rows == 0 and o.rows % o.tile_r == 0
        scratch.sums[:triton.cdiv(R, seg)].zero_()  # part of the order's cost, as it would be the forward's
        return _atomic_kernel[(o.programs,)](x, w, y, scratch.sums, R, D, x.stride(0), eps, seg,
                                             int(o.atomic == "atomic"), BLOCK_D=block_d, TILE_R=o.tile_r,
                                             ROWS=o.rows, EACH=o.each, num_warps=4 * o.tile_r)
    if o.combine:
        n_chunks = triton.cdiv(R, o.rows)
        G = max(o.combine, 1)
        assert o.rows % o.tile_r == 0 and o.rows >= _MIN_GROUP_CHUNK and (o.combine < 0 or o.rows * G >= _MIN_TRAIL)
        if o.combine > 0:
            scratch.done[:triton.cdiv(n_chunks, G)].zero_()
        return _group_kernel[(n_chunks,)](
            x, w, y, scratch.chunk_part, scratch.done, scratch.part, R, D, x.stride(0), eps,
            scratch.chunk_part.stride(0), G, n_chunks, BLOCK_D=block_d, TILE_R=o.tile_r, ROWS=o.rows,
            COMBINE=o.combine > 0, DISCARD=o.discard and x.is_cuda and D % 32 == 0,
            LINES=triton.next_power_of_2(triton.cdiv(D, 32)), num_warps=4 * o.tile_r)
    if o.norm:
        if o.trail:
            scratch.done[:triton.cdiv(R, o.trail)].zero_()
        rt, sl, st = _TRAIL_TILE
        return _trail_kernel[(R,)](x, w, y, scratch.inv_norm, scratch.part, scratch.done, R, D, x.stride(0), eps,
                                   max(o.trail, 1), BLOCK_D=block_d, TRAIL=o.trail > 0, REDUCE=o.reduce, RT=rt,
                                   SLICE=min(sl, block_d), STAGES=st, num_warps=4)
    assert o.rows % o.tile_r == 0 and not (o.ahead and o.tile_r > 1)
    return _walk_kernel[(o.programs,)](x, w, y, R, D, x.stride(0), eps, o.rows, o.group, BLOCK_D=block_d,
                                       STAGES=o.stages, W_EACH_ROW=o.w_each_row, AHEAD=o.ahead, TILE_R=o.tile_r,
                                       num_warps=4 * o.tile_r)


def _sync_launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, o: Order, scratch: Scratch,
                 eps: float) -> object:
    """The sync orders' launch (o.rows rows a chunk, o.tile_r a step, o.programs programs; one program in the
    interpreter, where programs run one after another and could not wait for each other)."""
    R, D = x.shape
    block_d = triton.next_power_of_2(D)
    programs = o.programs if x.is_cuda else 1
    assert o.rows % o.tile_r == 0 and programs <= scratch.slots.shape[0] // _SYNC_SLOTS
    seg = sync_segment(x)
    assert seg % o.rows == 0
    sl = triton.next_power_of_2(triton.cdiv(D, programs))
    scratch.counter.zero_()
    scratch.sums[:triton.cdiv(R, seg)].zero_()
    args = (x, w, y, scratch.slots, scratch.sums, scratch.counter, scratch.err, R, D, x.stride(0), eps, o.rows, seg,
            triton.cdiv(triton.cdiv(R, o.rows), programs), _SYNC_SPIN_LIMIT)
    meta = dict(BLOCK_D=block_d, TILE_R=o.tile_r, SL=sl, P_BLOCK=triton.next_power_of_2(programs),
                SLOTS=_SYNC_SLOTS, SYNC=o.sync == "sync", num_warps=4 * o.tile_r)
    if x.is_cuda and o.sync == "sync":
        _check_resident(_sync_kernel.warmup(*args, grid=(programs,), **meta), programs, 4 * o.tile_r)
    return _sync_kernel[(programs,)](*args, **meta)


def _throttle_launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, o: Order, scratch: Scratch,
                     eps: float) -> object:
    """The throttled strided orders' launch (o.programs programs, all resident; one in the interpreter, where
    programs run one after another and could not wait for each other)."""
    R, D = x.shape
    programs = o.programs if x.is_cuda else 1
    scratch.counter.zero_()
    args = (x, w, y, scratch.counter, scratch.err, R, D, x.stride(0), eps, triton.cdiv(R, programs),
            max(o.throttle, 0), _SYNC_SPIN_LIMIT)
    meta = dict(BLOCK_D=triton.next_power_of_2(D), WAIT=o.throttle > 0, num_warps=4)
    if x.is_cuda:  # c1's 64 registers at 4096 (Triton 3.9 takes 72 uncapped: 7 programs per SM, not all resident)
        meta.update(maxnreg=_THROTTLE_MAXNREG)
    if x.is_cuda and o.throttle > 0:
        _check_resident(_throttle_kernel.warmup(*args, grid=(programs,), **meta), programs, 4)
    return _throttle_kernel[(programs,)](*args, **meta)


def gave_up(o: Order, scratch: Scratch, when: str) -> None:
    """Raises if a wait of an order that waits (sync, throttle) gave up: its err flag is set (one host sync, after
    the launch, never inside the timing)."""
    if (o.sync or o.throttle > 0) and scratch.err.item():
        raise RuntimeError(f"a wait gave up{when} (err flag set)")


def check_sync(y: torch.Tensor, o: Order, scratch: Scratch) -> str:
    """The sync and atomic orders' segment sums of y_t / ||y_t|| against torch (fp32 sums: 1e-4 relative): "ok" or
    what differs (recorded; the order is timed either way, its bytes do not depend on it). The nosync and
    unflushed orders add nothing: "not combined"."""
    if o.sync not in ("", "sync") or o.atomic not in ("", "atomic"):
        return "not combined"
    return compare_block_sums(y, sync_segment(y), scratch.sums, atol=1e-3)


def compare_block_sums(y: torch.Tensor, rows: int, got: torch.Tensor, atol: float) -> str:
    """``got``'s first rows against the sums of y_t / ||y_t|| over consecutive blocks of ``rows`` rows of y (fp32
    sums: 1e-4 relative): "ok" or what differs."""
    yf = y.float()
    u = yf / yf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = triton.cdiv(y.shape[0], rows)
    ref = torch.nn.functional.pad(u, (0, 0, 0, n * rows - y.shape[0])).view(n, rows, -1).sum(1)
    try:
        torch.testing.assert_close(got[:n], ref, rtol=1e-4, atol=atol)
    except AssertionError as e:
        return "differs: " + " ".join(str(e).split())[:300]
    return "ok"


def check_trail(y: torch.Tensor, o: Order, scratch: Scratch) -> None:
    """The trail orders' 1 / ||y_t|| and group sums of y_t / ||y_t|| against torch (fp32 sums: 1e-4 relative)."""
    yf = y.float()
    inv = 1.0 / yf.norm(dim=1).clamp_min(1e-12)
    torch.testing.assert_close(scratch.inv_norm[:y.shape[0]], inv, rtol=1e-5, atol=0)
    if o.trail and o.reduce:
        n_g = triton.cdiv(y.shape[0], o.trail)
        u = torch.nn.functional.pad(yf * inv[:, None], (0, 0, 0, n_g * o.trail - y.shape[0]))
        ref = u.view(n_g, o.trail, -1).sum(1)
        torch.testing.assert_close(scratch.part[:n_g], ref, rtol=1e-4, atol=1e-4)


def check_group(y: torch.Tensor, o: Order, scratch: Scratch) -> str:
    """The group orders' output rows (sums of y_t / ||y_t|| over o.combine chunks of o.rows rows) against torch:
    "ok" or what differs; "not combined" where nothing is."""
    if o.combine < 0:
        return "not combined"
    return compare_block_sums(y, o.rows * o.combine, scratch.part, atol=1e-4)


def orders(n_rows: int, n_sm: int) -> dict[str, Order]:
    """The timed orders (names as in the module docstring) for ``n_rows`` rows on ``n_sm`` multiprocessors."""
    out: dict[str, Order] = {}
    cdiv = triton.cdiv
    for w_each in (False, True):
        tag = "_w" if w_each else ""
        for c in (1, 8, 64, 256) if not w_each else (8, 64, 256):
            out[f"c{c}{tag}"] = Order(c, 1, cdiv(n_rows, c), 1, w_each)
        for stages in (2, 3):
            out[f"c256_s{stages}{tag}"] = Order(256, 1, cdiv(n_rows, 256), stages, w_each)
        for g, c in ((8, 32), (64, 32)):
            out[f"g{g}_c{c}{tag}"] = Order(c, g, cdiv(n_rows, g * c) * g, 1, w_each)
        for per_sm in (4, 8):
            p = per_sm * n_sm
            out[f"strided_{p}{tag}"] = Order(cdiv(n_rows, p), p, p, 1, w_each)
    for c in (8, 64, 256):
        out[f"c{c}_ahead"] = Order(c, 1, cdiv(n_rows, c), ahead=True)
    for per_sm in (4, 8):
        p = per_sm * n_sm
        out[f"strided_{p}_ahead"] = Order(cdiv(n_rows, p), p, p, ahead=True)
    # session 19: how the loss grows with the chunk, and whether it is the power-of-two stride between the rows that
    # programs running together touch (odd chunks, a padded row pitch), the spread of those rows (ticket order: the
    # block scheduler's, persistent programs) or one row in flight per program (tiles of rows loaded together)
    for c in (2, 3, 4, 7, 9, 255, 257):
        out[f"c{c}"] = Order(c, 1, cdiv(n_rows, c))
    for c in (1, 8, 256):
        out[f"c{c}_pad"] = Order(c, 1, cdiv(n_rows, c), pad=_PAD)
    for t, c in ((2, 2), (2, 8), (4, 8)):
        out[f"t{t}_c{c}"] = Order(c, 1, cdiv(n_rows, c), tile_r=t)
    for per_sm in (4, 8):
        out[f"ticket_sm{per_sm}"] = Order(0, 1, per_sm * n_sm, ticket=True)
    # session 20: is it the window of rows in flight (programs in flight x chunk) or the regions per SM? Fat
    # programs with long chunks (few regions per SM, a wide window) tell them apart
    for t, c in ((8, 8), (8, 16), (8, 32), (4, 32), (4, 64), (8, 64)):
        out[f"t{t}_c{c}"] = Order(c, 1, cdiv(n_rows, c), tile_r=t)
    # a persistent grid in lock step (_sync_kernel): the window is P chunks, partials combined in the L2. At sm_90a
    # 16 warps (t4) take 128 registers and 32 warps (t8) 64 with a few spilled: one program per SM either way (sm2
    # orders are refused before launch unless a build fits two)
    for t, c, per_sm in ((8, 8, 1), (8, 16, 1), (8, 32, 1), (4, 8, 1), (4, 16, 1), (4, 16, 2)):
        out[f"sync{t}_c{c}_sm{per_sm}"] = Order(c, 1, per_sm * n_sm, tile_r=t, sync="sync")
    for t, c, per_sm in ((8, 8, 1), (8, 16, 1), (4, 16, 1)):
        out[f"nosync{t}_c{c}_sm{per_sm}"] = Order(c, 1, per_sm * n_sm, tile_r=t, sync="nosync")
    # session 21: a forward without a fixed summation order. Unit-vector sums go into their segment's fp32 sum by
    # relaxed vector atomics that stay in the L2: no partial row reaches the DRAM, so the orders that keep up (c1,
    # t2_c2, t4_c8) cost atomics instead of bytes. How many the L2 takes alongside the stream: one add per row
    # (c1), per 2 rows (t2) or per 4 (t4, 16 warps: 60-64 registers at sm_90a, two programs per SM as t4_c8),
    # against the same sums computed and not added. _acc: one add per chunk from an accumulator row held across
    # steps (t4_c8_acc: ~100 registers, one program per SM)
    for t, c in ((1, 1), (2, 2), (4, 4), (2, 8), (4, 8), (4, 16)):
        name = f"c{c}" if t == 1 else f"t{t}_c{c}"
        out[f"atomic_{name}"] = Order(c, 1, cdiv(n_rows, c), tile_r=t, atomic="atomic", each="step")
    out["atomic_t4_c8_acc"] = Order(8, 1, cdiv(n_rows, 8), tile_r=4, atomic="atomic", each="chunk")
    # one row a step on 4 warps with the accumulator row (~128 registers: 4 programs per SM, as the CUDA rows
    # kernel's 4 blocks at 4096), added once per chunk: the unordered forward's geometry in the plain walk
    for c in (4, 8, 16):
        out[f"atomic_c{c}_acc"] = Order(c, 1, cdiv(n_rows, c), atomic="atomic", each="chunk")
    for t, c in ((1, 1), (4, 4), (4, 8)):
        name = f"c{c}" if t == 1 else f"t{t}_c{c}"
        out[f"unflushed_{name}"] = Order(c, 1, cdiv(n_rows, c), tile_r=t, atomic="unflushed", each="step")
    out["unflushed_c8_acc"] = Order(8, 1, cdiv(n_rows, 8), atomic="unflushed", each="chunk")
    # session 22: fixed-order statistics at the window of an order that keeps up (t4_c8: +0.3% in session 20),
    # with the chunk partials kept in the L2: each group of G chunks is combined by the program that completes it
    # (_group_kernel), in chunk order, and with _discard its consumed lines are dropped unwritten. Group rows: one
    # fp32 row per 8G rows reaches the DRAM (G = 8: 1.6% of x's read + y's write at 4096 in bf16; G = 32: 0.4%)
    for g in (8, 32):
        for discard in (False, True):
            out[f"group_t4_c8_g{g}{'_discard' if discard else ''}"] = Order(8, 1, cdiv(n_rows, 8), tile_r=4,
                                                                            combine=g, discard=discard)
    out["group_t4_c8_uncombined"] = Order(8, 1, cdiv(n_rows, 8), tile_r=4, combine=-1)
    out["group_t2_c4_g16_discard"] = Order(4, 1, cdiv(n_rows, 4), tile_r=2, combine=16, discard=True)
    out["group_t4_c16_g16_discard"] = Order(16, 1, cdiv(n_rows, 16), tile_r=4, combine=16, discard=True)
    # session 23: is the static strided grid's loss (+8-11% in session 18, where the ticket order's same programs
    # keep up) its programs drifting apart? Held within `slack` steps of the grid's mean progress by a counter, its
    # rows in flight stay about as close together as c1's; static rows would let each program (or SM, or cluster)
    # keep one fixed-order accumulator per segment across the window. _count: the counter's adds, no waiting
    for per_sm in (4, 8):
        p = per_sm * n_sm
        out[f"strided_{p}_count"] = Order(cdiv(n_rows, p), p, p, throttle=-1)
        for slack in (1, 2, 4, 16):
            out[f"strided_{p}_throttle{slack}"] = Order(cdiv(n_rows, p), p, p, throttle=slack)
    # one row per program plus the unit-vector statistics without a walk: 1 / ||y_t|| per row (c1_norm), and each
    # group's sum re-read from the L2 by the group's last program (trail_{C})
    out["c1_norm"] = Order(1, 1, n_rows, norm=True)
    out["c1_norm_count"] = Order(1, 1, n_rows, norm=True, trail=64, reduce=False)
    for c in (_MIN_TRAIL, 64, 128, 256):
        out[f"trail_{c}"] = Order(1, 1, n_rows, norm=True, trail=c)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dims", default="4096,2048,5120", help="comma list of widths (GPU shapes: 64x4096 rows at 4096, "
                   "16x4096 otherwise)")
    p.add_argument("--shapes", default="", help="comma list of RxD (rows x width; GPU only), instead of --dims: e.g. "
                   "65536x4096 asks whether the loss at 262144x4096 depends on the tensor's size")
    p.add_argument("--orders", default="", help="comma list of order names, run in this order, c1 first for the "
                   "/ c1 column (default: all)")
    p.add_argument("--no-time", action="store_true", help="run and check each order once, untimed (for a profiler)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dims = [int(d) for d in args.dims.split(",")]
    shapes = [((64 if d == 4096 else 16) * 4096, d) for d in dims]
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    if not cuda:
        shapes = [(40, 48)]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 2
    wanted = parse_names(p, "--orders", args.orders, orders(64, n_sm))
    rows_out: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print("| R | D | order | rows/program | group | programs | stages | registers | graph ms | / c1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_rows, dim in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n_rows, dim, device=device, generator=gen).to(torch.bfloat16)
        w = (torch.rand(dim, device=device, generator=gen) + 0.5).to(torch.bfloat16)
        ref = torch_rmsnorm(x, w, 1e-6)
        x_pad = torch.empty(n_rows, dim + _PAD, dtype=x.dtype, device=device)[:, :dim].copy_(x)  # pitch D + _PAD
        scratch = Scratch.make(n_rows, dim, device, n_sm)
        c1 = None
        every = orders(n_rows, n_sm)
        for name in wanted or list(every):  # in --orders' order (c1 first!)
            o = every[name]
            row = dict(R=n_rows, D=dim, order=name, **o._asdict())
            try:  # a failing order is a result (recorded), not the end of the run
                scratch.err.zero_()  # a wait that gave up in an earlier order is that order's result only
                y = torch.empty_like(x)
                xo = x_pad if o.pad else x
                k = walk(xo, w, y, o, scratch)
                gave_up(o, scratch, "")
                torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # rstd may move y by a step
                if o.norm:
                    check_trail(y, o, scratch)
                if o.sync or o.atomic:
                    row.update(sums=check_sync(y, o, scratch))
                if o.combine:
                    row.update(sums=check_group(y, o, scratch))
                row.update(status="ok", registers=getattr(k, "n_regs", None))
                if cuda and not args.no_time:
                    ms = graph_time(lambda: walk(xo, w, y, o, scratch), args.reps) * 1e3
                    c1 = ms if name == "c1" else c1
                    row.update(ms=ms, vs_c1=ms / c1 if c1 else None)
                    gave_up(o, scratch, " while timed")
            except Exception as e:  # noqa: BLE001
                row.update(status=error_status(e))
            timed = f"{row['ms']:.3f} | {row['ms'] / c1:.3f}" if "ms" in row and c1 else (
                f"{row['ms']:.3f} |" if "ms" in row else f"{'checked' if row['status'] == 'ok' else row['status']} |")
            sums = row.get("sums", "ok")
            shown = name if sums in ("ok", "not combined") else f"{name} (sums {sums})"
            print(f"| {n_rows} | {dim} | {shown} | {o.rows} | {o.group} | {o.programs} | {o.stages} | "
                  f"{row.get('registers') or ''} | {timed} |", flush=True)
            record_row(args.out, rows_out, row, cuda)
    return exit_code(rows_out)


if __name__ == "__main__":
    raise SystemExit(main())
