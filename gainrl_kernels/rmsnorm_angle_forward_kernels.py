"""Triton kernels of the fused RMSNorm + angle forward, and the launch helpers its host side and the backward share.

The host side (argument checks, tuning knobs, launch shapes, plans, dispatch, autograd, public API) is
:mod:`gainrl_kernels.rmsnorm_angle`; its docstring has the semantics, shapes and dtypes. The backward's kernels are in
:mod:`gainrl_kernels.rmsnorm_angle_backward`. Kernels (three launches with statistics, one without; no host sync,
no atomics):
  * ``_plan_kernel`` builds the work list on the device: per sequence the regions gap (rows in no
    sequence, e.g. padding), [0, o_0), the K segments [o_k, o_k+1), [o_K, len), then the gap after the last
    sequence; each region cut into chunks of at most ``chunk`` rows (256, fewer when there are under ~4 chunks
    per multiprocessor), so a chunk lies inside one segment or outside all of them. The grid is the bound
    cdiv(R, chunk) + B (K + 3) + 1; spare programs exit at once. Each of its programs computes all regions and
    writes its share of the chunks (one block of columns per region). Without statistics there is no work list: the
    kernels derive the rows from the program id, one row (one [BLOCK_T, BLOCK_D] step) per program, as Inductor's
    RMSNorm does (no partial row to amortise).
  * ``_fwd_rows_kernel`` (next_pow2(D) <= 8192): whole rows in registers, x read once. From BLOCK_D = 1024 on one
    row per step: y_{t-1} stays in registers for the adjacent term, and row t+2 is prefetched while row t is
    computed (a third row in flight gained nothing on an H100 and was removed); with statistics 16 values per
    thread and at least 8 warps from BLOCK_D = 2048 (the step is bound by its dependent chain and instruction
    issue rather than bandwidth), but on sm_90 a vector-aligned 16-bit row of BLOCK_D = 4096 takes 4 warps capped
    at 168 registers (3 programs per SM, ``_ROWS_STATS_REGISTER_CAP``); compiled, ||y_t||², y_t . y_{t-1} and
    row t+1's sum of squares share one block reduction, so a step has the bare kernel's one shared-memory round,
    not three (the chunk's last pair reaches the row after the chunk). ``bench/fused_static.py`` reports
    registers, occupancy, barriers and instructions per step. 16-bit rows of 4112-5120 columns are held as
    4096 + a power-of-two tail rather than a padded 8192 (``_ROWS_SPLIT_TAIL``). Narrower rows take
    [BLOCK_T, BLOCK_D] steps and reload row t+1 shifted by one (cache hits). A segment chunk also sums
    u = y / max(||y||, 1e-12), ||u||² and the pairs (t, t+1) with t + 1 < o_K into one fp32 partial row + two
    scalars per chunk.
  * ``_fwd_sliced_kernel`` (wider rows): 32-row chunks, three passes over 64-wide column slices (x², then y and
    the norms and pair dots, then the unit vectors; later passes hit the cache).
  * ``_reduce_kernel`` sums each segment's partials, 16 chunks per step, in a fixed order: the statistics are
    deterministic (bitwise run to run). ``_reduce_spans_kernel`` does the same for the partials of the CUDA rows
    kernel's SPANS form (no work list): it finds a segment's slots from cu_seqlens, seg_offsets and token_index
    alone (``_span_slots``, reading them as the plan kernel does: ``_seq_span``, ``_offset``) and also writes
    ``count``.
(The ``_ROWS_*`` knobs named here are the host module's.) Compiled kernels round with the hardware's
round-to-nearest-even conversions; under ``TRITON_INTERPRET=1`` bf16 rounding is an explicit round-to-nearest-even
on the fp32 bits (``_rms_out``): the interpreter's own fp32 -> bf16 cast truncates and its bf16 arithmetic is wrong
(bf16 is stored as uint16 there), so kernels never compute in bf16.

Launch helpers shared by the host side and the backward (here, so that neither kernel module imports the host
module): ``_TL_DTYPE``, ``_capability_major``, ``_vector_aligned``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_out(x, rstd, w, YT: tl.constexpr, NATIVE_CAST: tl.constexpr):
    """y = round(w * round(x * rstd)) with round = to the nearest YT value, as fp32 (HF LlamaRMSNorm).

    NATIVE_CAST (compiled GPU code): the hardware's round-to-nearest-even conversion. Otherwise (interpreter) the
    same rounding on the fp32 bits, written inline (step 0 rounds n, step 1 rounds w * n): every nested jit call
    costs a language re-patch in the interpreter, and this runs once per tile and pass.
    """
    y = x * rstd[:, None]
    for step in tl.static_range(2):
        if step == 1:
            y = w[None, :] * y
        if NATIVE_CAST:
            if YT != tl.float32:
                y = y.to(YT).to(tl.float32)
        elif YT == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
        elif YT == tl.float16:
            y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _plan_kernel(
    cu_ptr, off_ptr, tok_ptr, n_packed, B, R, chunk, grid,
    item_row0_ptr, item_nrows_ptr, item_seg_ptr, item_pair_end_ptr, seg_lo_ptr, seg_hi_ptr, count_ptr,
    K: tl.constexpr, HAS_OFF: tl.constexpr, HAS_TOK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """The forward's work list (see ``_stats_plan``): BLOCK_B sequences at a time, carrying the last sequence end
    and the chunk count across blocks, each region's chunks written BLOCK_C at a time; then spare items (0 rows)
    up to ``grid``. Every program computes the same regions and counts (a few loads per sequence) and writes its
    share of the chunks: program p the columns [p BLOCK_C, p BLOCK_C + BLOCK_C) of every region (then every
    n_programs-th such block), so short chunks (many per region) are written in parallel; program 0 writes the
    per-segment entries."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    zero = tl.zeros([BLOCK_B], dtype=tl.int64)
    first_prog = zero + pid == 0  # [BLOCK_B] (a scalar mask operand is refused by the interpreter)
    prev_max = tl.zeros([], dtype=tl.int64)  # largest sequence end so far
    n_items = tl.zeros([], dtype=tl.int64)  # chunks written so far
    for b0 in range(0, B, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)
        ok = bi < B
        first, length = _seq_span(cu_ptr, tok_ptr, n_packed, bi, ok, HAS_TOK)
        p_first, p_length = _seq_span(cu_ptr, tok_ptr, n_packed, bi - 1, ok & (bi > b0), HAS_TOK)
        p_end = tl.where(p_length > 0, p_first + p_length, 0)
        # end of the previous non-empty sequences: an exclusive running max over the block, with the carry
        prev_end = tl.maximum(tl.associative_scan(p_end, 0, _max_i64), prev_max)
        start = tl.where(length > 0, first, prev_end)  # empty sequences sit where the last one ended
        prev_max = tl.maximum(prev_max, tl.max(tl.where(length > 0, first + length, 0), axis=0))
        # region bounds, in row order: gap, [0, o_0), the K segments, [o_K, len); pass 1 counts the chunks
        m = zero  # running max of the clamped offsets: monotone bounds for unvalidated offsets
        o = zero  # the clamped offset itself (counts use it as given)
        hi = tl.minimum(tl.maximum(start, 0), R)
        n_seq = tl.where(ok, (tl.maximum(hi - tl.minimum(tl.maximum(prev_end, 0), R), 0) + chunk - 1) // chunk, 0)
        for r in tl.static_range(1, K + 3):
            o_prev = o
            lo, hi, m, o = _next_region(r, hi, m, start, length, off_ptr, bi, ok, R, K, HAS_OFF)
            if r >= 2 and r <= K + 1:
                tl.store(count_ptr + bi * K + (r - 2), tl.maximum(o - o_prev, 0).to(tl.int32), mask=ok & first_prog)
            n_seq += tl.where(ok, (tl.maximum(hi - lo, 0) + chunk - 1) // chunk, 0)
        pair_end = start + m  # pairs (t, t+1) count while t + 1 < o_K
        # first chunk of each sequence: exclusive prefix sum over the block, plus the carry
        base = n_items + tl.cumsum(n_seq, 0) - n_seq
        n_items += tl.sum(n_seq, axis=0)
        # pass 2: the same regions, writing their chunks
        lo = tl.minimum(tl.maximum(prev_end, 0), R)
        hi = tl.minimum(tl.maximum(start, 0), R)
        m = zero
        for r in tl.static_range(K + 3):
            if r >= 1:
                lo, hi, m, _ = _next_region(r, hi, m, start, length, off_ptr, bi, ok, R, K, HAS_OFF)
            n_reg = tl.where(ok, (tl.maximum(hi - lo, 0) + chunk - 1) // chunk, 0)
            if r >= 2 and r <= K + 1:
                slot = bi * K + (r - 2)
                tl.store(seg_lo_ptr + slot, tl.minimum(base, grid).to(tl.int32), mask=ok & first_prog)
                tl.store(seg_hi_ptr + slot, tl.minimum(base + n_reg, grid).to(tl.int32), mask=ok & first_prog)
                seg = slot
            else:
                seg = zero - 1
            # [BLOCK_B, BLOCK_C] chunks at a time, in int32 (rows and items are below R and grid)
            base32, lo32, hi32, n32 = base.to(tl.int32), lo.to(tl.int32), hi.to(tl.int32), n_reg.to(tl.int32)
            seg32, pair_end32 = seg.to(tl.int32), pair_end.to(tl.int32)
            for c0 in range(pid * BLOCK_C, tl.max(n32, axis=0), n_prog * BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)[None, :]
                item = base32[:, None] + c
                w_ok = (c < n32[:, None]) & (item < grid)
                row0 = lo32[:, None] + c * chunk
                tl.store(item_row0_ptr + item, row0, mask=w_ok)
                tl.store(item_nrows_ptr + item, tl.minimum(hi32[:, None] - row0, chunk), mask=w_ok)
                tl.store(item_seg_ptr + item, seg32[:, None] + c * 0, mask=w_ok)
                tl.store(item_pair_end_ptr + item, pair_end32[:, None] + c * 0, mask=w_ok)
            base += n_reg
    # the gap after the last sequence, then spare programs
    tail_lo = tl.minimum(tl.maximum(prev_max, 0), R)
    for i0 in range(pid * BLOCK_I, grid, n_prog * BLOCK_I):
        item = i0 + tl.arange(0, BLOCK_I)
        c = item - n_items
        row0 = tail_lo + c * chunk
        mine = (item >= n_items) & (item < grid)
        tl.store(item_row0_ptr + item, row0.to(tl.int32), mask=mine)
        tl.store(item_nrows_ptr + item, tl.minimum(tl.maximum(R - row0, 0), chunk).to(tl.int32), mask=mine)
        tl.store(item_seg_ptr + item, tl.full([BLOCK_I], -1, tl.int32), mask=mine)
        tl.store(item_pair_end_ptr + item, tl.zeros([BLOCK_I], dtype=tl.int32), mask=mine)


@triton.jit
def _next_region(r: tl.constexpr, hi, m, start, length, off_ptr, bi, ok, R, K: tl.constexpr, HAS_OFF: tl.constexpr):
    """Region r >= 1 of the sequences ``bi`` (1: [0, o_0), 2..K+1: segment r-2, K+2: [o_K, len)), starting where
    region r-1 ended (``hi``). Returns (lo, hi, m, o): its absolute rows clamped to [0, R), the running max ``m`` of
    the clamped offsets and the clamped offset o_{r-1} itself (``m`` for r = K+2)."""
    lo = hi
    o = m
    if r <= K + 1:
        o = tl.minimum(tl.maximum(_offset(off_ptr, bi, r - 1, K, length, ok, HAS_OFF), 0), length)
        m = tl.maximum(m, o)
        hi = start + m
    else:
        hi = start + length
    return lo, tl.minimum(tl.maximum(hi, 0), R), m, o  # rows of x only, whatever unvalidated indices say


@triton.jit
def _row_sums3(a, b, c, JOINT: tl.constexpr):
    """Row sums (axis 1) of three [BLOCK_T, BLOCK_D] fp32 tensors.

    JOINT: one reduction of the stacked tensors, so the three cross-warp exchanges share one shared-memory round
    (two barriers instead of six). Compiled, each row is summed in the same order as ``tl.sum`` (same per-thread
    elements, same shuffles), so ``c``'s sum is bitwise the one a separate ``tl.sum`` gives at the same warps. The
    interpreter's ``np.sum`` orders a strided axis differently, so there three ``tl.sum`` are used.

    With the same warps as the bare kernel (BLOCK_D <= 1024) y is therefore bitwise the bare kernel's. From
    BLOCK_D = 2048 on the statistics run with more warps (``_ROWS_STATS_MIN_WARPS``): another split of Σx² over
    threads, so rstd, and y with it, may differ from the bare kernel's by one rounding step.
    """
    if JOINT:
        s = tl.sum(tl.join(tl.join(a, b), tl.join(c, c)), axis=1)
        ab, cc = tl.split(s)
        sa, sb = tl.split(ab)
        sc, _ = tl.split(cc)
        return sa, sb, sc
    else:
        return tl.sum(a, axis=1), tl.sum(b, axis=1), tl.sum(c, axis=1)


@triton.jit
def _inv_norm(sq, RSQRT: tl.constexpr):
    """1 / max(sqrt(sq), 1e-12) for row sums of squares ``sq`` (fp32). RSQRT: the hardware's approximate reciprocal
    square root (one instruction, relative error below 2**-22, on a clamp that keeps it off denormals), else the
    IEEE square root and division (a software sequence with a slow path: 29 more instructions per thread and row step
    at D = 4096 bf16, ``bench/fused_static.py --variant exact_inverse_norm``)."""
    if RSQRT:
        return tl.math.rsqrt(tl.maximum(sq, 1e-24))
    else:
        return 1.0 / tl.maximum(tl.sqrt_rn(sq), 1e-12)


@triton.jit
def _rstd(ss, D, eps, RSQRT: tl.constexpr):
    """rsqrt(ss / D + eps) of row sums of squares ``ss`` (fp32), the mean by IEEE division. RSQRT: the hardware's
    approximate reciprocal square root, as ``torch.rsqrt`` (HF's RMSNorm) computes it on CUDA: about 30 fewer
    machine instructions per row step than the IEEE square root and reciprocal, and every warp sharing a row runs
    them. Else those IEEE operations (the interpreter's form)."""
    if RSQRT:
        return tl.math.rsqrt(ss / D + eps)
    else:
        return 1.0 / tl.sqrt_rn(ss / D + eps)


@triton.jit
def _prefetch_row(x_ptr, row, stride_r, D, BLOCK_D: tl.constexpr, ELEM_BITS: tl.constexpr, L1: tl.constexpr):
    """Hint the L2 cache (L1: the L1 too) to fetch x's row ``row`` (int64 scalar): one ``prefetch.global`` per
    128-byte line (threads beyond the line count repeat one; a line already cached costs no DRAM traffic). Nothing
    waits on it and it holds no registers after it issues, unlike a load into registers. Compiled code only (inline
    PTX)."""
    LINE: tl.constexpr = 1024 // ELEM_BITS  # elements per 128-byte line
    cols = tl.minimum(tl.arange(0, BLOCK_D // LINE) * LINE, D - 1)
    if L1:
        asm: tl.constexpr = "mov.u32 $0, 0;\n\tprefetch.global.L1 [$1];"
    else:
        asm: tl.constexpr = "mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];"
    tl.inline_asm_elementwise(asm, "=r,l", [x_ptr + row * stride_r + cols], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _max_i64(a, b):
    return tl.maximum(a, b)


@triton.jit
def _seq_span(cu_ptr, tok_ptr, n_packed, bi, ok, HAS_TOK: tl.constexpr):
    """(first row, length) of sequences ``bi`` (int64; 0, 0 where not ``ok``)."""
    c0 = tl.load(cu_ptr + bi, mask=ok, other=0).to(tl.int64)
    c1 = tl.load(cu_ptr + bi + 1, mask=ok, other=0).to(tl.int64)
    length = tl.maximum(c1 - c0, 0)
    if HAS_TOK:
        idx = tl.minimum(tl.maximum(c0, 0), tl.maximum(n_packed - 1, 0))
        first = tl.load(tok_ptr + idx, mask=ok & (bi * 0 + n_packed > 0), other=0).to(tl.int64)
    else:
        first = c0
    return first, length


@triton.jit
def _offset(off_ptr, bi, j, K: tl.constexpr, length, ok, HAS_OFF: tl.constexpr):
    """Offset o_j of sequences ``bi`` (int64); without seg_offsets the default [[0, len]] (K = 1)."""
    if HAS_OFF:
        return tl.load(off_ptr + bi * (K + 1) + j, mask=ok, other=0).to(tl.int64)
    else:
        if j == 0:
            return tl.zeros_like(length)
        else:
            return length


@triton.jit
def _chunk_rows(pid, item_row0_ptr, item_nrows_ptr, R, chunk, STATS: tl.constexpr):
    """(first row, row count) of program ``pid``: from the work list with statistics, else consecutive chunks."""
    if STATS:
        return tl.load(item_row0_ptr + pid), tl.load(item_nrows_ptr + pid)
    else:
        row0 = pid * chunk
        return row0, tl.minimum(tl.maximum(R - row0, 0), chunk)


@triton.jit
def _fwd_rows_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    item_row0_ptr, item_nrows_ptr, item_seg_ptr, item_pair_end_ptr,
    part_sum_ptr, part_q_ptr, part_adj_ptr,
    R, D, stride_r, eps, chunk,
    YT: tl.constexpr, STATS: tl.constexpr, NATIVE_CAST: tl.constexpr, JOINT_SUMS: tl.constexpr,
    RSQRT_INV: tl.constexpr, RSQRT_RSTD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    PREFETCH: tl.constexpr = 0, PREFETCH_L1: tl.constexpr = False, X_EVICT: tl.constexpr = "",
    PIPELINE: tl.constexpr = 0, BLOCK_D2: tl.constexpr = 0,
):
    """Whole rows in registers (BLOCK_D >= D): one chunk of rows per program, BLOCK_T rows per step, x read once.

    A chunk with item_seg >= 0 lies inside one segment: it also sums u = y / ||y|| (tile-shaped, reduced over rows
    once at the end), ||u||² and, for rows t with t + 1 < item_pair_end, u_t . u_{t+1}. BLOCK_T == 1: the previous
    row's y stays in registers (pairs inside the chunk), row t+1's rstd comes out of step t's joint reduction
    (``_row_sums3``) and row t+2 is loaded during step t; past the chunk's end only the row after it is read, for
    the chunk's last pair. BLOCK_T > 1
    (narrow rows): row t+1 of each step is loaded shifted by one (cache hits but for the step's last row).
    Writes one partial row per chunk. PREFETCH > 0 (one-row steps with statistics, compiled code): step t also hints
    the L2 (PREFETCH_L1: and the L1) to fetch row t + 2 + PREFETCH (``_prefetch_row``), so more of the rows ahead
    are on their way without holding registers. X_EVICT: eviction policy of those steps' x loads. PIPELINE >= 2:
    instead of the register prefetch, step t loads row t+1 where it uses it, in a loop Triton software-pipelines
    with PIPELINE stages (cp.async into shared memory, PIPELINE - 1 rows ahead; the interpreter runs it in order).
    BLOCK_D2 > 0 (one-row steps only): a row is two tiles, columns [0, BLOCK_D) and a tail [BLOCK_D, BLOCK_D +
    BLOCK_D2), with BLOCK_D < D <= BLOCK_D + BLOCK_D2, so a row of 5120 takes 4096 + 1024 values, not a padded 8192.
    """
    pid = tl.program_id(0)
    row0, nrows = _chunk_rows(pid, item_row0_ptr, item_nrows_ptr, R, chunk, STATS)
    if nrows > 0:
        row_end = row0 + nrows
        t = tl.arange(0, BLOCK_T)
        dd = tl.arange(0, BLOCK_D)
        # with a tail the first tile lies inside the row: a mask the compiler folds away
        d_ok = dd < (BLOCK_D if BLOCK_D2 > 0 else D)
        w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
        tl.static_assert(BLOCK_D2 == 0 or BLOCK_T == 1, "a row tail needs one-row steps")
        if BLOCK_D2 > 0:  # the tail's columns (names with suffix 2 exist only with a tail)
            d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = d2 < D
            w2 = tl.load(w_ptr + d2, mask=d2_ok, other=0.0).to(tl.float32)
        seg = -1
        if STATS:
            seg = tl.load(item_seg_ptr + pid)
        if seg >= 0:
            pair_end = tl.load(item_pair_end_ptr + pid)
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            q_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
            adj_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
            if BLOCK_T == 1:
                # rows loaded: the chunk's, then the next one if the chunk's last pair counts
                load_end = tl.minimum(tl.where(row_end < pair_end, row_end + 1, row_end), R)
                x_cur = tl.load(x_ptr + (row0 + t).to(tl.int64)[:, None] * stride_r + dd[None, :],
                                mask=d_ok[None, :], other=0.0, eviction_policy=X_EVICT).to(tl.float32)
                ss = tl.sum(x_cur * x_cur, axis=1)
                # the tail's tiles (suffix 2) follow the first tile's through the loop; defined only with a tail,
                # so that a one-tile loop carries nothing more (dummies would cost registers and moves)
                if BLOCK_D2 > 0:
                    acc2 = tl.zeros([BLOCK_T, BLOCK_D2], dtype=tl.float32)
                    y_prev2 = tl.zeros([BLOCK_T, BLOCK_D2], dtype=tl.float32)
                    x_cur2 = tl.load(x_ptr + (row0 + t).to(tl.int64)[:, None] * stride_r + d2[None, :],
                                     mask=d2_ok[None, :], other=0.0, eviction_policy=X_EVICT).to(tl.float32)
                    ss += tl.sum(x_cur2 * x_cur2, axis=1)
                rstd = _rstd(ss, D, eps, RSQRT_RSTD)
                if PIPELINE == 0:
                    x_next = tl.load(x_ptr + (row0 + t + 1).to(tl.int64)[:, None] * stride_r + dd[None, :],
                                     mask=d_ok[None, :] & (row0 + t + 1 < load_end)[:, None], other=0.0,
                                     eviction_policy=X_EVICT)
                    if BLOCK_D2 > 0:
                        x_next2 = tl.load(x_ptr + (row0 + t + 1).to(tl.int64)[:, None] * stride_r + d2[None, :],
                                          mask=d2_ok[None, :] & (row0 + t + 1 < load_end)[:, None], other=0.0,
                                          eviction_policy=X_EVICT)
                y_prev = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # fp32: no unpacking per step
                inv_prev = tl.zeros([BLOCK_T], dtype=tl.float32)
                for r in tl.range(row0, row_end, num_stages=PIPELINE if PIPELINE > 0 else None):
                    rows = r + t
                    tl.store(rstd_ptr + rows, rstd)
                    y = _rms_out(x_cur, rstd, w, YT, NATIVE_CAST)
                    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], y.to(YT), mask=d_ok[None, :])
                    if BLOCK_D2 > 0:
                        y2 = _rms_out(x_cur2, rstd, w2, YT, NATIVE_CAST)
                        tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + d2[None, :], y2.to(YT),
                                 mask=d2_ok[None, :])
                    if PIPELINE > 0:  # row r+1 loaded where it is used; Triton's pipeliner issues it ahead (cp.async)
                        x_cur = tl.load(x_ptr + (rows.to(tl.int64) + 1)[:, None] * stride_r + dd[None, :],
                                        mask=d_ok[None, :] & (rows + 1 < load_end)[:, None], other=0.0,
                                        eviction_policy=X_EVICT).to(tl.float32)
                        if BLOCK_D2 > 0:
                            x_cur2 = tl.load(x_ptr + (rows.to(tl.int64) + 1)[:, None] * stride_r + d2[None, :],
                                             mask=d2_ok[None, :] & (rows + 1 < load_end)[:, None], other=0.0,
                                             eviction_policy=X_EVICT).to(tl.float32)
                    else:
                        x_cur = x_next.to(tl.float32)
                        x_next = tl.load(x_ptr + (rows.to(tl.int64) + 2)[:, None] * stride_r + dd[None, :],
                                         mask=d_ok[None, :] & (rows + 2 < load_end)[:, None], other=0.0,
                                         eviction_policy=X_EVICT)
                        if BLOCK_D2 > 0:
                            x_cur2 = x_next2.to(tl.float32)
                            x_next2 = tl.load(x_ptr + (rows.to(tl.int64) + 2)[:, None] * stride_r + d2[None, :],
                                              mask=d2_ok[None, :] & (rows + 2 < load_end)[:, None], other=0.0,
                                              eviction_policy=X_EVICT)
                        if PREFETCH > 0:  # a row further ahead into the cache only (clamped to this program's rows)
                            _prefetch_row(x_ptr, tl.minimum(r + 2 + PREFETCH, load_end - 1).to(tl.int64), stride_r,
                                          D, BLOCK_D if BLOCK_D2 == 0 else 2 * BLOCK_D,
                                          x_ptr.dtype.element_ty.primitive_bitwidth, PREFETCH_L1)
                    # one block reduction per row: ||y_r||², y_r . y_{r-1} (0 on the first row) and the next
                    # row's sum of squares, so its rstd is ready when the next step starts (a tail adds its own)
                    nn, dot, ss = _row_sums3(y * y, y * y_prev, x_cur * x_cur, JOINT_SUMS)
                    if BLOCK_D2 > 0:
                        nn2, dot2, ss2 = _row_sums3(y2 * y2, y2 * y_prev2, x_cur2 * x_cur2, JOINT_SUMS)
                        nn += nn2
                        dot += dot2
                        ss += ss2
                    inv = _inv_norm(nn, RSQRT_INV)
                    acc += y * inv[:, None]
                    if BLOCK_D2 > 0:
                        acc2 += y2 * inv[:, None]
                    q_acc += nn * inv * inv
                    adj_acc += dot * inv_prev * inv
                    rstd = _rstd(ss, D, eps, RSQRT_RSTD)
                    y_prev = y
                    if BLOCK_D2 > 0:
                        y_prev2 = y2
                    inv_prev = inv
                if load_end > row_end:  # pair (last row, first row after the chunk): x_cur and rstd are its
                    y = _rms_out(x_cur, rstd, w, YT, NATIVE_CAST)
                    # two forms: the one-tile one as it always was (summing ||y||² and the dot before the inverse
                    # norm gave the main loop 4-8 more instructions per step at fp32, bench/fused_static.py)
                    if BLOCK_D2 > 0:
                        y2 = _rms_out(x_cur2, rstd, w2, YT, NATIVE_CAST)
                        inv = _inv_norm(tl.sum(y * y, axis=1) + tl.sum(y2 * y2, axis=1), RSQRT_INV)
                        adj_acc += (tl.sum(y * y_prev, axis=1) + tl.sum(y2 * y_prev2, axis=1)) * inv_prev * inv
                    else:
                        inv = _inv_norm(tl.sum(y * y, axis=1), RSQRT_INV)
                        adj_acc += tl.sum(y * y_prev, axis=1) * inv_prev * inv
                if BLOCK_D2 > 0:
                    tl.store(part_sum_ptr + pid.to(tl.int64) * D + d2, tl.sum(acc2, axis=0), mask=d2_ok)
            else:
                for r0 in range(row0, row_end, BLOCK_T):
                    rows = r0 + t
                    r_ok = rows < row_end
                    p_ok = r_ok & (rows + 1 < pair_end) & (rows + 1 < R)
                    x_off = rows.to(tl.int64) * stride_r  # int64 element offsets: R * D may pass 2**31
                    m = r_ok[:, None] & d_ok[None, :]
                    x = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
                    x1 = tl.load(x_ptr + (x_off + stride_r)[:, None] + dd[None, :],
                                 mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                    rstd = _rstd(tl.sum(x * x, axis=1), D, eps, RSQRT_RSTD)
                    rstd1 = _rstd(tl.sum(x1 * x1, axis=1), D, eps, RSQRT_RSTD)
                    tl.store(rstd_ptr + rows, rstd, mask=r_ok)
                    y = _rms_out(x, rstd, w, YT, NATIVE_CAST)
                    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], y.to(YT), mask=m)
                    y1 = _rms_out(x1, rstd1, w, YT, NATIVE_CAST)
                    nn = tl.sum(y * y, axis=1)
                    inv = _inv_norm(nn, RSQRT_INV)
                    inv1 = _inv_norm(tl.sum(y1 * y1, axis=1), RSQRT_INV)
                    acc += y * inv[:, None]  # masked rows are 0
                    q_acc += tl.where(r_ok, nn * inv * inv, 0.0)
                    adj_acc += tl.where(p_ok, tl.sum(y * y1, axis=1) * inv * inv1, 0.0)
            tl.store(part_sum_ptr + pid.to(tl.int64) * D + dd, tl.sum(acc, axis=0), mask=d_ok)
            tl.store(part_q_ptr + pid, tl.sum(q_acc, axis=0))
            tl.store(part_adj_ptr + pid, tl.sum(adj_acc, axis=0))
        else:
            for r0 in range(row0, row_end, BLOCK_T):
                rows = r0 + t
                r_ok = rows < row_end
                m = r_ok[:, None] & d_ok[None, :]
                x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_r + dd[None, :], mask=m,
                            other=0.0).to(tl.float32)
                ss = tl.sum(x * x, axis=1)
                if BLOCK_D2 > 0:
                    m2 = r_ok[:, None] & d2_ok[None, :]
                    x2 = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_r + d2[None, :], mask=m2,
                                 other=0.0).to(tl.float32)
                    ss += tl.sum(x2 * x2, axis=1)
                rstd = _rstd(ss, D, eps, RSQRT_RSTD)
                tl.store(rstd_ptr + rows, rstd, mask=r_ok)
                y = _rms_out(x, rstd, w, YT, NATIVE_CAST)
                tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], y.to(YT), mask=m)
                if BLOCK_D2 > 0:
                    y2 = _rms_out(x2, rstd, w2, YT, NATIVE_CAST)
                    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + d2[None, :], y2.to(YT), mask=m2)


@triton.jit
def _fwd_sliced_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    item_row0_ptr, item_nrows_ptr, item_seg_ptr, item_pair_end_ptr,
    part_sum_ptr, part_q_ptr, part_adj_ptr,
    R, D, stride_r, eps, chunk,
    YT: tl.constexpr, STATS: tl.constexpr, NATIVE_CAST: tl.constexpr, JOINT_SUMS: tl.constexpr,
    RSQRT_INV: tl.constexpr, RSQRT_RSTD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Any D: one chunk of BLOCK_T rows per program, three passes over BLOCK_D column slices (rows too wide for
    registers). Pass A sums x² (rows t and t+1), pass B writes y and sums ||y_t||², ||y_{t+1}||², y_t . y_{t+1},
    pass C re-reads x (cached), recomputes y and sums u = y / ||y|| over the chunk's rows. Same outputs as
    ``_fwd_rows_kernel``; the per-slice products are kept tile-shaped and reduced over columns once per pass."""
    pid = tl.program_id(0)
    row0, nrows = _chunk_rows(pid, item_row0_ptr, item_nrows_ptr, R, chunk, STATS)
    if nrows > 0:
        t = tl.arange(0, BLOCK_T)
        rows = row0 + t
        r_ok = t < nrows
        x_off = rows.to(tl.int64) * stride_r
        y_off = rows.to(tl.int64) * D
        x1_off = x_off + stride_r
        seg = -1
        if STATS:
            seg = tl.load(item_seg_ptr + pid)
        p_ok = t < 0
        if seg >= 0:
            pair_end = tl.load(item_pair_end_ptr + pid)
            p_ok = r_ok & (rows + 1 < pair_end) & (rows + 1 < R)

        # pass A: sums of squares (row t, and row t+1 for the adjacent pairs)
        ss = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        ss1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            x = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            ss += x * x
            if seg >= 0:
                x1 = tl.load(x_ptr + x1_off[:, None] + dd[None, :], mask=p_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                ss1 += x1 * x1
        rstd = _rstd(tl.sum(ss, axis=1), D, eps, RSQRT_RSTD)
        rstd1 = _rstd(tl.sum(ss1, axis=1), D, eps, RSQRT_RSTD)
        tl.store(rstd_ptr + rows, rstd, mask=r_ok)

        # pass B: y (written), ||y_t||², ||y_{t+1}||², y_t . y_{t+1}
        nn = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        nn1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            m = r_ok[:, None] & d_ok[None, :]
            w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
            y = _rms_out(x, rstd, w, YT, NATIVE_CAST)
            tl.store(y_ptr + y_off[:, None] + dd[None, :], y.to(YT), mask=m)
            if seg >= 0:
                x1 = tl.load(x_ptr + x1_off[:, None] + dd[None, :], mask=p_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                y1 = _rms_out(x1, rstd1, w, YT, NATIVE_CAST)
                nn += y * y
                nn1 += y1 * y1
                dot += y * y1

        if seg >= 0:
            sq = tl.sum(nn, axis=1)
            inv = _inv_norm(sq, RSQRT_INV)
            inv1 = _inv_norm(tl.sum(nn1, axis=1), RSQRT_INV)
            tl.store(part_adj_ptr + pid, tl.sum(tl.where(p_ok, tl.sum(dot, axis=1) * inv * inv1, 0.0), axis=0))
            tl.store(part_q_ptr + pid, tl.sum(tl.where(r_ok, sq * inv * inv, 0.0), axis=0))
            # pass C: the chunk's sum of unit vectors
            part_row = part_sum_ptr + pid.to(tl.int64) * D
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                w = tl.load(w_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + x_off[:, None] + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                u = _rms_out(x, rstd, w, YT, NATIVE_CAST) * inv[:, None]
                tl.store(part_row + dd, tl.sum(u, axis=0), mask=d_ok)


@triton.jit
def _reduce_kernel(
    part_sum_ptr, part_q_ptr, part_adj_ptr, seg_lo_ptr, seg_hi_ptr,
    unit_sum_ptr, sq_norm_ptr, adjacent_ptr, D, K,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the chunk partials of segment slot s = b * K + k; the k == 0 program also sums the adjacent partials of
    all K segments of sequence b (their chunks are consecutive). BLOCK_C chunks are loaded at a time (loads in
    flight rather than one dependent load per chunk) and summed in a fixed order: the statistics are deterministic
    (bitwise run to run). Grid (B * K, cdiv(D, BLOCK_D))."""
    s = tl.program_id(0)
    pd = tl.program_id(1)
    lo = tl.load(seg_lo_ptr + s)
    hi = tl.load(seg_hi_ptr + s)
    _sum_partial_rows(part_sum_ptr, unit_sum_ptr, s, pd, lo, hi, D, BLOCK_C, BLOCK_D)
    if pd == 0:
        tl.store(sq_norm_ptr + s, _sum_range(part_q_ptr, lo, hi, BLOCK_C))
        if s % K == 0:
            tl.store(adjacent_ptr + s // K, _sum_range(part_adj_ptr, lo, tl.load(seg_hi_ptr + s + K - 1), BLOCK_C))


@triton.jit
def _sum_partial_rows(part_sum_ptr, unit_sum_ptr, s, pd, lo, hi, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """unit_sum[s, pd BLOCK_D : (pd + 1) BLOCK_D] = the sum of part_sum rows [lo, hi) there, BLOCK_C rows at a time
    (loads in flight rather than one dependent load per row), in a fixed order."""
    c = tl.arange(0, BLOCK_C)
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK_C):
        rows = (c0 + c).to(tl.int64)  # int64 offsets: chunks x D may pass 2**31
        acc += tl.load(part_sum_ptr + rows[:, None] * D + dd[None, :], mask=(c0 + c < hi)[:, None] & d_ok[None, :],
                       other=0.0)
    tl.store(unit_sum_ptr + s.to(tl.int64) * D + dd, tl.sum(acc, axis=0), mask=d_ok)


@triton.jit
def _span_slots(cu_ptr, off_ptr, tok_ptr, n_packed, b, k, R, chunk, K: tl.constexpr, HAS_OFF: tl.constexpr,
                HAS_TOK: tl.constexpr):
    """(first slot, one past the last, count) of segment k of sequence b for the CUDA spans kernel: its rows
    [first_b + o_k, first_b + max(o_k, o_k+1)) (first_b = cu_b, or token_index[cu_b]; offsets clamped to
    [0, len_b], rows to [0, R)) lie in blocks row // chunk, each of which wrote its piece at slot block + b K + k.
    count: max(o_k+1 - o_k, 0), as the plan's. Sequence bounds and offsets as the plan kernel reads them
    (``_seq_span``, ``_offset``)."""
    ok = b >= 0  # always: the helpers take a mask
    start, length = _seq_span(cu_ptr, tok_ptr, n_packed, b, ok, HAS_TOK)
    o0 = tl.minimum(tl.maximum(_offset(off_ptr, b, k, K, length, ok, HAS_OFF), 0), length)
    o1 = tl.minimum(tl.maximum(_offset(off_ptr, b, k + 1, K, length, ok, HAS_OFF), 0), length)
    lo = tl.minimum(tl.maximum(start + o0, 0), R)
    hi = tl.minimum(tl.maximum(start + tl.maximum(o0, o1), 0), R)
    first = lo // chunk + b * K + k
    last = tl.where(hi > lo, (hi - 1) // chunk + b * K + k + 1, first)
    return first, last, tl.maximum(o1 - o0, 0)


@triton.jit
def _reduce_spans_kernel(
    part_sum_ptr, part_q_ptr, part_adj_ptr, cu_ptr, off_ptr, tok_ptr, n_packed,
    unit_sum_ptr, sq_norm_ptr, adjacent_ptr, count_ptr, R, D, chunk,
    K: tl.constexpr, HAS_OFF: tl.constexpr, HAS_TOK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``_reduce_kernel`` for the partials of the CUDA spans kernel (no work list): segment slot s = b * K + k finds
    its slots from cu_seqlens and the offsets (``_span_slots``) and also writes count[b, k]; the k == 0 program
    sums the adjacent partials of the sequence's K segments, segment by segment (their slots need not be
    consecutive). Fixed orders: deterministic. Grid (B * K, cdiv(D, BLOCK_D))."""
    s = tl.program_id(0)
    pd = tl.program_id(1)
    b = s // K
    k = s % K
    lo, hi, count = _span_slots(cu_ptr, off_ptr, tok_ptr, n_packed, b, k, R, chunk, K, HAS_OFF, HAS_TOK)
    _sum_partial_rows(part_sum_ptr, unit_sum_ptr, s, pd, lo, hi, D, BLOCK_C, BLOCK_D)
    if pd == 0:
        tl.store(sq_norm_ptr + s, _sum_range(part_q_ptr, lo, hi, BLOCK_C))
        tl.store(count_ptr + s, count.to(tl.int32))
        if k == 0:
            adj = tl.zeros([], dtype=tl.float32)
            for kk in range(0, K):
                lo_k, hi_k, _ = _span_slots(cu_ptr, off_ptr, tok_ptr, n_packed, b, kk, R, chunk, K, HAS_OFF,
                                            HAS_TOK)
                adj += _sum_range(part_adj_ptr, lo_k, hi_k, BLOCK_C)
            tl.store(adjacent_ptr + b, adj)


@triton.jit
def _sum_range(ptr, lo, hi, BLOCK: tl.constexpr):
    """Sum of ptr[lo:hi] (fp32), BLOCK entries at a time, in a fixed order."""
    i = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(lo, hi, BLOCK):
        acc += tl.load(ptr + i0 + i, mask=i0 + i < hi, other=0.0)
    return tl.sum(acc, axis=0)


# --------------------------------------------------------------------------------------------------------------
# launch helpers shared by the host side (rmsnorm_angle.py) and the backward (rmsnorm_angle_backward.py)
# --------------------------------------------------------------------------------------------------------------
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _capability_major(device: torch.device) -> int:
    """Compute capability major of a CUDA ``device`` (9 on H100 / H200), 0 for any other device."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


def _vector_aligned(x2d: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether a launch on the [R, D] rows ``x2d`` (and ``weight``) compiles 16-byte vector loads: Triton
    specialises pointers that are 16-byte aligned and integers (D, the row stride) divisible by 16. Host-side
    values only (no sync). While torch.compile traces, pointers are taken as aligned (fake tensors have no
    address; a misaligned one then costs spills, not correctness)."""
    shape_ok = x2d.shape[1] % 16 == 0 and x2d.stride(0) % 16 == 0
    if torch.compiler.is_compiling():
        return shape_ok
    return shape_ok and x2d.data_ptr() % 16 == 0 and (weight is None or weight.data_ptr() % 16 == 0)
