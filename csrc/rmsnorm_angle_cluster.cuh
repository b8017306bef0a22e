// The persistent thread-block-cluster forward of the fused RMSNorm + angle statistics (sm_90+): the same outputs as
// the rows kernel of csrc/rmsnorm_angle_kernels.cuh for the same kind of work list (items of at most CS x C rows,
// from the plan kernel of gainrl_kernels/rmsnorm_angle.py), except that an item's two scalars come as CS per item
// (one per block, in rank order), which the reduce kernel sums in that order.
//
// Why (docs/fused_forward.md, sessions 22-24): every fixed-order design so far trades the window of rows in flight
// against fp32 partial rows. Here one block per SM works in RG row groups, each with its own cp.async ring of S rows,
// so 132 SMs keep ~132 x RG x (S - 1) rows in flight, while a cluster of CS blocks combines its blocks' sums in
// distributed shared memory into one partial row per CS x C rows. Clusters stay resident and take items from a
// counter two ahead, so the rings keep loading the next item's rows across an item's end and through the cluster
// barrier. Prototyped and timed as bench/cluster_walk.cu (namespace persistent). A thread holds VPT vectors (8 VPT
// values) of a row; the op's builds take 32 values a thread, as the CUDA rows kernel does, with its one reduction a
// row (‖y_t‖², y_t · y_{t-1} and the next row's Σ x²) and its pair loop that also adds the previous row's unit
// vector. 8 values a thread take up to 5,376 warp instructions a 4096-wide row, past an H200 SM's issue rate;
// 32 up to 3,220 (bench/cluster_static.py, bench/results/cluster_static_sm90a.json).
//
// An item (row0, nrows <= CS C, seg, pair_end): block r takes its rows r C .. r C + C - 1, row group g the run
// g CR .. g CR + CR - 1 of those (CR = C / RG), rows past nrows none. Per row: rstd_t = rsqrt(Σ x_t² / D + eps),
// y_t = round(w · round(x_t · rstd_t)), stored with rstd_t; then, as in the rows kernel, 1 / ‖y_t‖ =
// rsqrt(max(‖y_t‖², 1e-24)), Σ y_t / ‖y_t‖ (the partial row), Σ ‖y_t‖² / ‖y_t‖² and the pairs (t, t+1) with
// t + 1 < pair_end. A pair inside a run is the thread's own (y_{t-1} stays packed in registers); a run's last row
// pairs with the next run's first through shared memory (the runs' first rows, "heads"), a block's last row with the
// next block's first through distributed shared memory ("tail"), and the item's last row with the row after it,
// which its row group recomputes from x (as the rows kernel reads it). Items in no segment (seg < 0) store y and
// rstd only.
//
// The sums are in a fixed order whichever cluster takes an item: a row group's rows in order; a block's row groups
// added in order into its row of shared memory; the combine adds the CS blocks' rows in rank order, block r storing
// column slice r of the partial row. Deterministic.
//
// Cluster barriers: each item's end arrives; the wait (and the combine that reads the other blocks' shared memory)
// runs J rows into the next item (J = 0: before its first row), so that a block does not stall at every item's end
// for the slowest block of its cluster; a second arrive after the remote reads is waited on at the next item's end,
// before the sums in shared memory are overwritten. The heads are double-buffered by item parity for the deferred
// reads.
//
// Under GAINRL_CUDA_EMULATOR (tests/cuda_emulator.py) the cluster primitives are the emulator's; on devices the
// kernel body exists for sm_90+ only (an sm_80 build compiles an empty kernel the launcher never starts).
#pragma once

#include "cluster_primitives.cuh"     // cluster_arrive / _wait, block_rank, shared_of, group_barrier, take_ticket
#include "rmsnorm_angle_kernels.cuh"  // Pair, Vec16, cp_async*, fast_rsqrt, div_rn, kMinSquaredNorm, warp_sum

namespace gainrl {
namespace rmsnorm_angle {
namespace cluster {

using namespace ::gainrl::cluster_sync;  // NOLINT: the primitives, unqualified as in the prototype

// ------------------------------------------------------------------------------------------------ geometry

// D columns of a 16-bit T, VPT 16-byte vectors a thread (8 VPT values): a row group is RT = D / (8 VPT) threads
// (whole warps), a block RG of them. CS blocks a cluster, C rows a block and item, S rows in each row group's ring,
// J rows of deferral.
template <int D, int RG, int CS, int C, int S, int J, int VPT>
struct Config {
  static constexpr int DIM = D, RGS = RG, BLOCKS = CS, ROWS = C, STAGES = S, DEFER = J, VECS = VPT;
  static constexpr int RT = D / (8 * VPT), THREADS = RG * RT, WARPS = RT / 32, CR = C / RG, CHUNK = CS * C;
  static constexpr int QUADS = D / 4, SLICE_QUADS = QUADS / CS;  // the combine: fp32 quads of a row, of a slice
  static constexpr int HEAD_BUFFERS = J > 0 ? 2 : 1;  // the deferred combine reads an item's heads in the next
  static_assert(RT * 8 * VPT == D && RT % 32 == 0 && THREADS <= 1024, "whole warps of VPT vectors a thread");
  static_assert(C % RG == 0 && S >= 3 && S - 1 <= CR, "rows j - 1, j, j + 1 in distinct slots; one item ahead");
  static_assert(J + S - 1 <= CR, "a deferred combine ends before the ring needs the item after next");
  static_assert(QUADS % CS == 0, "each block stores a whole number of quads of the partial row");
  static_assert(RG <= 8, "named barriers 1 .. RG");
};

// Byte offsets into the dynamic shared memory (no static __shared__: the emulator's would be one for all blocks),
// 16-byte aligned parts first: the rings [RG][S][D / 8] (vectors of x), the weight (W_NATIVE: [D / 8] vectors of T,
// else [D] fp32), the block's sums [D] fp32 (its row groups' added in order), the combine's [QUADS] float4, the
// heads [HEAD_BUFFERS][RG][D / 8] and the tail [D / 8] (vectors of y); then rank 0's item ids [4], the reduction
// slots [RG][2][WARPS] float4 (rows, double-buffered) and [RG][WARPS] float (pairs), the heads' and the tail's
// 1 / ‖y‖ [2 RG + 2] and the row groups' (q, adj) [RG] float2.
template <typename Cfg, bool W_NATIVE>
struct Layout {
  static constexpr size_t RG = Cfg::RGS, D = Cfg::DIM, WARPS = Cfg::WARPS, ROW = D * 2;  // bytes of a row of T
  static constexpr size_t ring = 0;
  static constexpr size_t weight = ring + RG * Cfg::STAGES * ROW;
  static constexpr size_t sums = weight + (W_NATIVE ? ROW : D * 4);
  static constexpr size_t combine = sums + D * 4;
  static constexpr size_t heads = combine + D * 4;
  static constexpr size_t tail = heads + Cfg::HEAD_BUFFERS * RG * ROW;
  static constexpr size_t ids = tail + ROW;
  static constexpr size_t red = ids + 16;
  static constexpr size_t red1 = red + RG * 2 * WARPS * 16;
  static constexpr size_t inv = red1 + RG * WARPS * 4;
  static constexpr size_t scal = inv + (2 * RG + 2) * 4;
  static constexpr size_t bytes = scal + RG * 8;
};

// ------------------------------------------------------------------------------------------------ the kernel

// Grid: whole clusters of CS blocks of Cfg::THREADS threads, persistent: each cluster walks items until the counter
// runs past n_items or hands out an item of no rows (the plan kernel writes its spare items, of no rows, after all
// others, so none with rows follows). part_q / part_adj: [n_items * CS], block r of item i at i * CS + r.
// A thread holds the vectors lt + RT v (v < VPT) of its row group's rows (coalesced for each v).
template <typename T, bool W_NATIVE, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1)
    cluster_kernel(const T* __restrict__ x, int64_t stride_r, const void* __restrict__ weight, DType w_dtype,
                   T* __restrict__ y, float* __restrict__ rstd_out, const int* __restrict__ item_row0,
                   const int* __restrict__ item_nrows, const int* __restrict__ item_seg,
                   const int* __restrict__ item_pair_end, float* __restrict__ part_sum, float* __restrict__ part_q,
                   float* __restrict__ part_adj, int* __restrict__ counter, int n_items, int64_t R, float eps) {
#ifdef GAINRL_HAS_CLUSTERS  // csrc/cluster_primitives.cuh: the emulator, host code or sm_90+
  constexpr int D = Cfg::DIM, RG = Cfg::RGS, CS = Cfg::BLOCKS, C = Cfg::ROWS, S = Cfg::STAGES, J = Cfg::DEFER;
  constexpr int RT = Cfg::RT, WARPS = Cfg::WARPS, CR = Cfg::CR, THREADS = Cfg::THREADS, VPT = Cfg::VECS;
  constexpr int QUADS = Cfg::QUADS, SLICE_QUADS = Cfg::SLICE_QUADS;
  using Vec = Vec16<T>;
  using PairT = Pair<T>;
  using L = Layout<Cfg, W_NATIVE>;
  constexpr int P = Vec::P, V = 16 / sizeof(T), NV = D / V;  // pairs and values a vector, vectors a row
  static_assert(sizeof(T) == 2, "16-bit rows");
#ifdef GAINRL_CUDA_EMULATOR
  unsigned char* smem = gainrl_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  Vec* const ring = reinterpret_cast<Vec*>(smem + L::ring);
  Vec* const w_v = reinterpret_cast<Vec*>(smem + L::weight);      // W_NATIVE
  float* const w_f = reinterpret_cast<float*>(smem + L::weight);  // else
  float* const acc_s = reinterpret_cast<float*>(smem + L::sums);
  float4* const tmp = reinterpret_cast<float4*>(smem + L::combine);
  Vec* const heads = reinterpret_cast<Vec*>(smem + L::heads);
  Vec* const tail = reinterpret_cast<Vec*>(smem + L::tail);
  int* const ids_s = reinterpret_cast<int*>(smem + L::ids);
  float* const inv_s = reinterpret_cast<float*>(smem + L::inv);  // heads' [HEAD_BUFFERS][RG], then the tail's
  float* const tail_inv = inv_s + 2 * RG;
  float2* const scal_s = reinterpret_cast<float2*>(smem + L::scal);

  const int tid = threadIdx.x, g = tid / RT, lt = tid % RT;
  const int rank = block_rank();
  const int local0 = rank * C + g * CR;  // this row group's first row in an item
  Vec* const my_ring = ring + g * S * NV + lt;
  // Reduction slots: rows' reductions (three sums) alternate between two buffers, so a buffer is rewritten only
  // after the next reduction's barrier, by which time every thread of the row group has read it; s1 takes the pairs
  // across runs and blocks, which never follow each other without a row's reduction or a cluster wait between.
  float4* const red = reinterpret_cast<float4*>(smem + L::red) + g * 2 * WARPS;
  float* const s1 = reinterpret_cast<float*>(smem + L::red1) + g * WARPS;
  int buf = 0;

  if constexpr (W_NATIVE) {
    for (int v = tid; v < NV; v += THREADS) w_v[v] = static_cast<const Vec*>(weight)[v];
  } else {
    for (int i = tid; i < D; i += THREADS) w_f[i] = load_weight(weight, w_dtype, i);
  }

  float acc[V * VPT];  // Σ y_t / ‖y_t‖ over this row group's rows of the item, this thread's columns (a row's
  // unit vector is added with the next row, or at the run's end)
#pragma unroll
  for (int e = 0; e < V * VPT; ++e) acc[e] = 0.f;
  Vec y_prev[VPT];  // the previous row's y (packed) and 1 / ‖y‖
#pragma unroll
  for (int v = 0; v < VPT; ++v)
#pragma unroll
    for (int e = 0; e < P; ++e) y_prev[v].p[e] = PairT::pack(0.f, 0.f);

  // An item's first row and row count (0 past the list): the rest of its entries are read where they are used,
  // which keeps the registers of the next item's prefetch to two
  const auto rows_of = [&](int id, int& row0, int& nrows) {
    row0 = id < n_items ? item_row0[id] : 0;
    nrows = id < n_items ? item_nrows[id] : 0;
  };
  // this row group's j-th row of the item (row0, nrows) into ring slot `slot`, if it has it; one commit either way
  const auto issue = [&](int row0, int nrows, int j, int slot) {
    if (local0 + j < nrows) {
      const T* src = x + (int64_t(row0) + local0 + j) * stride_r + lt * V;
#pragma unroll
      for (int v = 0; v < VPT; ++v) cp_async16(my_ring + slot * NV + RT * v, src + RT * V * v);
    }
    cp_async_commit();
  };
  const auto group_sum = [&](float v, float* slot) {
    v = warp_sum(v);
    const int lane = tid & 31;
    if (lane == 0) slot[lt >> 5] = v;
    group_barrier<RT>(g);
    return warp_sum(lane < WARPS ? slot[lane] : 0.f);
  };
  // (Σ a, Σ b, Σ c) over the row group, the same in each thread: one barrier, on the next of the two buffers
  const auto group_sum3 = [&](float a, float b, float c) {
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
    const int lane = tid & 31;
    float4* slot = red + buf * WARPS;
    buf ^= 1;
    if (lane == 0) slot[lt >> 5] = make_float4(a, b, c, 0.f);
    group_barrier<RT>(g);
    const float4 r = lane < WARPS ? slot[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
    return make_float3(warp_sum(r.x), warp_sum(r.y), warp_sum(r.z));
  };
  // Σ a · b over this thread's values of two rows given as its vectors a[v * as], b[v * bs] (v < VPT): registers
  // (stride 1) or a row in shared memory (stride RT)
  const auto dot = [](const Vec* a, int as, const Vec* b, int bs) {
    float d = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float2 f = PairT::unpack(a[v * as].p[e]), h = PairT::unpack(b[v * bs].p[e]);
        d = fmaf(f.y, h.y, fmaf(f.x, h.x, d));
      }
    }
    return d;
  };
  // this thread's Σ x² of the row whose vectors (this thread's) are xv[v * xs]
  const auto sum_sq = [&](const Vec* xv, int xs) {
    float sq = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const Vec xr = xv[v * xs];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float2 f = PairT::unpack(xr.p[e]);
        sq = fmaf(f.y, f.y, fmaf(f.x, f.x, sq));
      }
    }
    return sq;
  };
  // rstd from the row group's Σ x²: a power-of-two D divides exactly as a multiply by 1 / D
  const auto rstd_of = [&](float total) {
    if constexpr ((D & (D - 1)) == 0) {
      return fast_rsqrt(total * (1.f / D) + eps);
    } else {
      return fast_rsqrt(div_rn(total, float(D)) + eps);
    }
  };
  // y of that row (rms_pair, HF's formula), from x read again (rather than held unpacked across the
  // reduction: 8 VPT fewer registers)
  const auto make_y = [&](const Vec* xv, int xs, float rstd, Vec (&yv)[VPT]) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const Vec xr = xv[v * xs];
      float2 xf[P];
#pragma unroll
      for (int e = 0; e < P; ++e) xf[e] = PairT::unpack(xr.p[e]);
      if constexpr (W_NATIVE) {
        const Vec wn = w_v[lt + RT * v];
#pragma unroll
        for (int e = 0; e < P; ++e) yv[v].p[e] = rms_pair_native<T>(xf[e], rstd, wn.p[e]);
      } else {
        const float4* w4 = reinterpret_cast<const float4*>(w_f + (lt + RT * v) * V);
#pragma unroll
        for (int e = 0; e < P; e += 2) {
          const float4 w = w4[e / 2];
          yv[v].p[e] = rms_pair<T>(xf[e], rstd, w.x, w.y);
          yv[v].p[e + 1] = rms_pair<T>(xf[e + 1], rstd, w.z, w.w);
        }
      }
    }
  };
  // This thread's ‖y‖² of a row and y · y_prev with the previous row, each unpacked once; ADD (the rows of a run)
  // also adds the previous row's unit vector y_prev * inv_prev to the sums, where y_prev is unpacked anyway (as in
  // the rows kernel)
  const auto row_sums = [&](const Vec(&yv)[VPT], float inv_p, bool add) {
    float ysq = 0.f, d = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float2 f = PairT::unpack(yv[v].p[e]), h = PairT::unpack(y_prev[v].p[e]);
        ysq = fmaf(f.y, f.y, fmaf(f.x, f.x, ysq));
        d = fmaf(f.y, h.y, fmaf(f.x, h.x, d));
        if (add) {
          acc[V * v + 2 * e] = fmaf(h.x, inv_p, acc[V * v + 2 * e]);
          acc[V * v + 2 * e + 1] = fmaf(h.y, inv_p, acc[V * v + 2 * e + 1]);
        }
      }
    }
    return make_float2(ysq, d);
  };
  // this thread's ‖y‖² of a run's first row
  const auto first_sums = [&](const Vec (&yv)[VPT]) {
    float ysq = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float2 f = PairT::unpack(yv[v].p[e]);
        ysq = fmaf(f.y, f.y, fmaf(f.x, f.x, ysq));
      }
    }
    return ysq;
  };
  // the last row's unit vector into the sums (the rows' own are added one row late, by row_sums)
  const auto add_prev = [&](float inv_p) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float2 h = PairT::unpack(y_prev[v].p[e]);
        acc[V * v + 2 * e] = fmaf(h.x, inv_p, acc[V * v + 2 * e]);
        acc[V * v + 2 * e + 1] = fmaf(h.y, inv_p, acc[V * v + 2 * e + 1]);
      }
    }
  };
  const auto head = [&](int k, int gg) { return heads + ((J > 0 ? (k & 1) * RG : 0) + gg) * NV; };
  const auto head_inv = [&](int k, int gg) -> float& { return inv_s[(J > 0 ? (k & 1) * RG : 0) + gg]; };

  // The second half of item k's end (item id `idk`): the cluster meets, the id of the item after next arrives from
  // rank 0, this block's first row pairs with the previous block's last, and the block stores its column slice of
  // the item's partial row (the CS blocks' sums in rank order) and its (q, adj).
  const auto finish = [&](int k, int idk) {
    cluster_wait();
    const int id2 = *shared_of(&ids_s[(k + 2) & 3], 0);
    const int nrows_k = item_nrows[idk];
    if (item_seg[idk] >= 0 && nrows_k > 0) {  // the same in the whole cluster
      if (g == 0 && rank > 0 && rank * C < nrows_k) {
        const float d = group_sum(dot(head(k, 0) + lt, RT, shared_of(tail, rank - 1) + lt, RT), s1);
        if (lt == 0) scal_s[0].y += d * head_inv(k, 0) * *shared_of(tail_inv, rank - 1);
      }
      for (int i = tid; i < QUADS; i += THREADS) {  // quad i % SLICE_QUADS of this block's slice from block i / ...
        const int col = 4 * (rank * SLICE_QUADS + i % SLICE_QUADS);
        tmp[i] = *reinterpret_cast<const float4*>(shared_of(acc_s, i / SLICE_QUADS) + col);
      }
      __syncthreads();
      for (int q = tid; q < SLICE_QUADS; q += THREADS) {
        float4 total = tmp[q];
        for (int r = 1; r < CS; ++r) {
          const float4 p = tmp[r * SLICE_QUADS + q];
          total = make_float4(total.x + p.x, total.y + p.y, total.z + p.z, total.w + p.w);
        }
        *reinterpret_cast<float4*>(part_sum + int64_t(idk) * D + 4 * (rank * SLICE_QUADS + q)) = total;
      }
      if (tid == 0) {
        float2 t = scal_s[0];
        for (int gg = 1; gg < RG; ++gg) t = make_float2(t.x + scal_s[gg].x, t.y + scal_s[gg].y);
        part_q[int64_t(idk) * CS + rank] = t.x;
        part_adj[int64_t(idk) * CS + rank] = t.y;
      }
    }
    cluster_arrive();  // this block's remote reads are done (waited on at the next item's end)
    return id2;
  };

  // this item and the next: cluster c's first two are c and NC + c, then rank 0 hands out 2 NC + its tickets
  int id0 = blockIdx.x / CS, id1 = (gridDim.x + blockIdx.x) / CS;
  int row0_0, nrows_0, row0_1, nrows_1;
  rows_of(id0, row0_0, nrows_0);
  rows_of(id1, row0_1, nrows_1);
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(row0_0, nrows_0, s, s);
  __syncthreads();  // the weight

  float inv_prev = 0.f, q_acc = 0.f, adj_acc = 0.f;
  int n = 0;        // rows (ring steps) this row group has taken
  int id_done = 0;  // the item whose finish is pending
  int k = 0;
  for (; id0 < n_items && nrows_0 > 0; ++k) {  // items of no rows end the list (the plan puts its spares last)
    // the id of item k + 2, read by every block at item k's finish (the slot's last reader finished item k - 2's)
    if (rank == 0 && tid == 0) ids_s[(k + 2) & 3] = 2 * int(gridDim.x / CS) + take_ticket(counter);
    bool has_prev = false;
    const int m = min(max(nrows_0 - local0, 0), CR);  // this run's rows of the item (a prefix of its CR)
    float rstd = 0.f;  // row j's, from the previous row's reduction (the run's first: its own)
    if (J == 0 && k > 0) {  // item k - 1's combine before this item's first row (outside the row loop)
      id1 = finish(k - 1, id_done);
      rows_of(id1, row0_1, nrows_1);
    }
    for (int j = 0; j < CR; ++j, ++n) {
      if (J > 0 && k > 0 && j == J) {
        id1 = finish(k - 1, id_done);
        rows_of(id1, row0_1, nrows_1);
      }
      const int ahead = j + S - 1;  // into the slot of row j - 1, read by now
      if (ahead < CR) {
        issue(row0_0, nrows_0, ahead, (n + S - 1) % S);
      } else {
        issue(row0_1, nrows_1, ahead - CR, (n + S - 1) % S);
      }
      cp_async_wait<S - 2>();  // rows j and j + 1 have landed
      if (j >= m) continue;
      const Vec* xr = my_ring + (n % S) * NV;
      if (j == 0) rstd = rstd_of(group_sum3(0.f, 0.f, sum_sq(xr, RT)).z);
      const int64_t row = int64_t(row0_0) + local0 + j;
      Vec yv[VPT];
      make_y(xr, RT, rstd, yv);
      Vec* y_row = reinterpret_cast<Vec*>(y + row * D) + lt;
#pragma unroll
      for (int v = 0; v < VPT; ++v) y_row[RT * v] = yv[v];
      if (lt == 0) rstd_out[row] = rstd;
      // one reduction a row: its ‖y‖² and y · y_prev (and the previous row's unit vector into the sums), and the
      // next row's Σ x²
      const float2 own = has_prev ? row_sums(yv, inv_prev, true) : make_float2(first_sums(yv), 0.f);
      const float sq_next = j + 1 < m ? sum_sq(my_ring + ((n + 1) % S) * NV, RT) : 0.f;
      const float3 r = group_sum3(own.x, own.y, sq_next);
      const float inv = fast_rsqrt(fmaxf(r.x, kMinSquaredNorm));
      q_acc += r.x * inv * inv;
      if (has_prev) adj_acc += r.y * inv_prev * inv;
      rstd = rstd_of(r.z);  // row j + 1's (unused past the run)
      if (j == 0) {  // the run's first row, for the pair with the previous run's (or block's) last
#pragma unroll
        for (int v = 0; v < VPT; ++v) head(k, g)[lt + RT * v] = yv[v];
        if (lt == 0) head_inv(k, g) = inv;
      }
#pragma unroll
      for (int v = 0; v < VPT; ++v) y_prev[v] = yv[v];
      inv_prev = inv;
      has_prev = true;
    }
    if (has_prev) add_prev(inv_prev);  // the run's last row
    // item k's end, first half: the sums into shared memory (first: the accumulators are then free for the row
    // after the item), the row after the item, the pairs across runs, then the cluster barrier's arrive
    if (k > 0) cluster_wait();  // every block has read item k - 1's sums and tail
    if (g == RG - 1) {  // the block's last row, for the next block's first
#pragma unroll
      for (int v = 0; v < VPT; ++v) tail[lt + RT * v] = y_prev[v];
      if (lt == 0) *tail_inv = inv_prev;
    }
    // the block's sums: its row groups' added in order (a barrier each; the last also publishes heads and tail)
#pragma unroll 1
    for (int gg = 0; gg < RG; ++gg) {
      if (g == gg) {
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          float4* dst = reinterpret_cast<float4*>(acc_s + V * (lt + RT * v));
          const float* a = acc + V * v;
          if (gg == 0) {
            dst[0] = make_float4(a[0], a[1], a[2], a[3]);
            dst[1] = make_float4(a[4], a[5], a[6], a[7]);
          } else {
            const float4 d0 = dst[0], d1 = dst[1];
            dst[0] = make_float4(d0.x + a[0], d0.y + a[1], d0.z + a[2], d0.w + a[3]);
            dst[1] = make_float4(d1.x + a[4], d1.y + a[5], d1.z + a[6], d1.w + a[7]);
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int e = 0; e < V * VPT; ++e) acc[e] = 0.f;
    const int64_t row_end = int64_t(row0_0) + nrows_0;
    if (has_prev && nrows_0 - 1 < local0 + CR && item_seg[id0] >= 0 && row_end < item_pair_end[id0] &&
        row_end < R) {
      const Vec* src = reinterpret_cast<const Vec*>(x + row_end * stride_r) + lt;
      const float rstd_a = rstd_of(group_sum3(0.f, 0.f, sum_sq(src, RT)).z);
      Vec ya[VPT];
      make_y(src, RT, rstd_a, ya);
      const float2 own = row_sums(ya, 0.f, false);
      const float3 r = group_sum3(own.x, own.y, 0.f);
      adj_acc += r.y * inv_prev * fast_rsqrt(fmaxf(r.x, kMinSquaredNorm));
    }
    if (g < RG - 1 && local0 + CR < nrows_0) {  // this run's last row with the next run's first
      const float d = group_sum(dot(y_prev, 1, head(k, g + 1) + lt, RT), s1);
      adj_acc += d * inv_prev * head_inv(k, g + 1);
    }
    if (lt == 0) scal_s[g] = make_float2(q_acc, adj_acc);  // read in the finish, after its __syncthreads
    q_acc = adj_acc = 0.f;
    cluster_arrive();
    id_done = id0;
    id0 = id1;
    row0_0 = row0_1;
    nrows_0 = nrows_1;
  }
  if (k > 0) finish(k - 1, id_done);  // the last item's combine
  // no block leaves while another may still read its shared memory (the sums, the tail, rank 0's ids)
  if (k > 0) cluster_wait();
  cp_async_wait<0>();
#endif  // GAINRL_HAS_CLUSTERS
}

// ------------------------------------------------------------------------------------------------ host launcher

// Enqueues the kernel for the work list of a (item_row0 ... of a.grid items of at most CS x C rows each): zeroes
// a.counter, then launches min(a.clusters or as many as fit, items) clusters. No synchronisation, no exceptions;
// the resident cluster count is found once per device (on the first, uncaptured call).
template <typename T, bool W_NATIVE, typename Cfg>
inline cudaError_t launch_cluster_kernel(const Args& a, DType w_dtype, cudaStream_t stream) {
  constexpr size_t smem = Layout<Cfg, W_NATIVE>::bytes;
  auto* kernel = &cluster_kernel<T, W_NATIVE, Cfg>;
  if (a.grid <= 0) return cudaSuccess;
  const int n_items = static_cast<int>(a.grid);
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
#ifdef GAINRL_CUDA_EMULATOR
  (void)stream;
  const int clusters = std::min(a.clusters > 0 ? a.clusters : 1, n_items);
  *a.counter = 0;
  gainrl_emu::launch_cluster(Cfg::BLOCKS, smem, kernel, dim3(static_cast<unsigned>(clusters * Cfg::BLOCKS)),
                             dim3(Cfg::THREADS), x, a.stride_r, a.weight, w_dtype, y, a.rstd, a.item_row0,
                             a.item_nrows, a.item_seg, a.item_pair_end, a.part_sum, a.part_q, a.part_adj, a.counter,
                             n_items, a.R, a.eps);
  return cudaSuccess;
#else
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  int major = 0;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  if (major < 9) return cudaErrorInvalidDevice;  // thread-block clusters and distributed shared memory
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(Cfg::THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = Cfg::BLOCKS;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  static std::atomic<int> resident[kMaxDevices];  // 0: not yet asked
  int clusters = dev < kMaxDevices ? resident[dev].load() : 0;
  if (clusters == 0) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    cfg.gridDim = dim3(Cfg::BLOCKS);
    e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (e != cudaSuccess) return e;
    if (clusters <= 0) return cudaErrorInvalidConfiguration;
    if (dev < kMaxDevices) resident[dev].store(clusters);
  }
  if (a.clusters > 0 && a.clusters < clusters) clusters = a.clusters;
  if (clusters > n_items) clusters = n_items;
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * Cfg::BLOCKS));
  e = cudaMemsetAsync(a.counter, 0, sizeof(int), stream);
  if (e != cudaSuccess) return e;
  return cudaLaunchKernelEx(&cfg, kernel, x, a.stride_r, a.weight, w_dtype, y, a.rstd, a.item_row0, a.item_nrows,
                            a.item_seg, a.item_pair_end, a.part_sum, a.part_q, a.part_adj, a.counter, n_items, a.R,
                            a.eps);
#endif
}

// The instantiations the op uses (cluster_built of csrc/rmsnorm_angle_launch.h): clusters of kClusterBlocks blocks,
// 32 values (4 vectors) a thread, rows of D / 32 threads in 12288 / D row groups at D = 2048 and 4096 (384-thread
// blocks, up to 168 registers a thread), one row group of 256 threads at 8192; a.cluster_rows rows a block and item,
// a ring of a.stages rows, the combine deferred a.defer rows. Calls f(Config<...>{}) for a's build and returns what
// f returns.
template <typename F>
inline auto visit_build(const Args& a, F&& f) {
  constexpr int CS = kClusterBlocks;
  switch (a.D) {
    case 2048: return f(Config<2048, 6, CS, 24, 4, 0, 4>{});
    case 8192: return a.stages == 5 ? f(Config<8192, 1, CS, 16, 5, 0, 4>{}) : f(Config<8192, 1, CS, 16, 4, 0, 4>{});
    default:
      if (a.cluster_rows == 12) return f(Config<4096, 3, CS, 12, 4, 0, 4>{});
      if (a.defer != 0) return f(Config<4096, 3, CS, 24, 4, 2, 4>{});
      return a.stages == 5 ? f(Config<4096, 3, CS, 24, 5, 0, 4>{}) : f(Config<4096, 3, CS, 24, 4, 0, 4>{});
  }
}

// Dynamic shared memory of a's build (cluster_supported(a, ...) assumed) with a weight of x's dtype or fp32.
inline size_t cluster_smem_bytes(const Args& a, bool w_native) {
  return visit_build(a, [&](auto cfg) {
    return w_native ? Layout<decltype(cfg), true>::bytes : Layout<decltype(cfg), false>::bytes;
  });
}

template <typename T, bool W_NATIVE>
inline cudaError_t dispatch_cluster_width(const Args& a, DType w_dtype, cudaStream_t stream) {
  return visit_build(a, [&](auto cfg) {
    return launch_cluster_kernel<T, W_NATIVE, decltype(cfg)>(a, w_dtype, stream);
  });
}

inline cudaError_t launch_rmsnorm_angle_cluster(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) {
  if (!cluster_supported(a, x_dtype, w_dtype)) return cudaErrorInvalidValue;
  if (x_dtype == DType::kBFloat16) {
    return w_dtype == x_dtype ? dispatch_cluster_width<__nv_bfloat16, true>(a, w_dtype, stream)
                              : dispatch_cluster_width<__nv_bfloat16, false>(a, w_dtype, stream);
  }
  return w_dtype == x_dtype ? dispatch_cluster_width<__half, true>(a, w_dtype, stream)
                            : dispatch_cluster_width<__half, false>(a, w_dtype, stream);
}

}  // namespace cluster
}  // namespace rmsnorm_angle
}  // namespace gainrl
