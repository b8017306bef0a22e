// A plain RMSNorm (HF's formula, bf16, D = 4096) that also sums its rows' unit vectors y_t / ||y_t|| per block of
// CS x C rows, combined across a thread-block cluster in distributed shared memory: a prototype for issue 3 (the fused
// forward within 5% of the bare kernel), timed by bench/cluster_walk.py.
//
// The fused forward needs one fp32 partial row per chunk of rows, and short chunks (which keep the walk's window of
// rows in flight narrow) cost too many partial bytes (docs/fused_forward.md, session 22). Here a cluster of CS blocks
// walks CS x C consecutive rows, C per block, each block summing its rows' unit vectors in registers. At the end each
// block puts its sum in shared memory, and after a cluster barrier block r adds column slice r of all CS sums, in
// rank order (a fixed order), reading the others' shared memory, and stores it: one fp32 row per CS x C rows reaches
// the DRAM. The grid is not persistent: the hardware launches clusters in order, as it launches c1's blocks.
//
// Rows arrive through a ring of S row buffers per block in shared memory, filled by cp.async, S - 1 rows ahead; each
// thread copies and later reads its own 16-byte vectors, so the ring needs cp.async.wait_group and no barrier.
// MODE 0: the statistics and the cluster combine; 1: the statistics summed and each block's sum stored (one partial
// row per C rows, no cluster); 2: the walk alone (no statistics).
//
// Host side: cluster_walk_launch (plain C++; bench/cluster_walk.py binds it with torch.utils.cpp_extension).
// Under GAINRL_CUDA_EMULATOR (tests/cuda_emulator.py, g++) only the persistent kernel is compiled, with
// cluster_walk_emulate as its entry point: tests/test_bench_scripts.py runs it on a CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cluster_primitives.cuh"  // beside this file
#include "cuda_helpers.cuh"      // csrc/ (the include path of every build of this file)

#include <cstdint>
#ifdef GAINRL_CUDA_EMULATOR
#include <cmath>
#include <cstdio>
#include <stdexcept>
#else
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
#endif

namespace cluster_walk {

constexpr int D = 4096;

// csrc/cuda_helpers.cuh's: the warp sum, the hardware rsqrt (1 / sqrt in the emulator), cp.async (the emulator's
// per fiber under GAINRL_CUDA_EMULATOR)
using gainrl::cp_async16;
using gainrl::cp_async_commit;
using gainrl::cp_async_wait;
using gainrl::fast_rsqrt;
using gainrl::warp_sum;

// Sum over the block, the same value in every thread; `red` holds one slot per warp. Callers alternate between two
// `red` buffers, so a buffer is rewritten only after another barrier.
template <int WARPS>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < WARPS ? red[lane] : 0.f);
}

// The 8 bf16 of a 16-byte vector as floats.
__device__ __forceinline__ void unpack8(const uint4 v, float* out) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(p[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}

#ifndef GAINRL_CUDA_EMULATOR
// VPT 16-byte vectors (8 bf16 each) per thread and row: THREADS = D / (8 VPT).
template <int CS, int C, int S, int VPT, int MODE>
__global__ void __launch_bounds__(D / (8 * VPT)) walk_kernel(const __nv_bfloat16* __restrict__ x,
                                                             const __nv_bfloat16* __restrict__ w,
                                                             __nv_bfloat16* __restrict__ y, float* __restrict__ part,
                                                             long long rows, float eps) {
  constexpr int THREADS = D / (8 * VPT), WARPS = THREADS / 32, E = 8 * VPT;
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);                      // [S][D / 8]
  float* acc_s = reinterpret_cast<float*>(smem + S * D * 2);        // [D]   (MODE 0)
  __shared__ float red[2][WARPS];

  const int tid = threadIdx.x;
  const int rank = MODE == 0 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const long long block = MODE == 0 ? blockIdx.x / CS : blockIdx.x;  // cluster (MODE 0) or block index
  const long long r0 = MODE == 0 ? (block * CS + rank) * C : block * C;
  const int n = static_cast<int>(rows - r0 < C ? (rows - r0 > 0 ? rows - r0 : 0) : C);

  // thread tid owns vectors tid + THREADS * v (v < VPT) of each row: columns 8 (tid + THREADS v) ... + 7
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < n) {
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        cp_async16(ring + s * (D / 8) + tid + THREADS * v,
                   reinterpret_cast<const uint4*>(x + (r0 + s) * D) + tid + THREADS * v);
    }
    cp_async_commit();
  }
  float wf[E];
#pragma unroll
  for (int v = 0; v < VPT; ++v) unpack8(reinterpret_cast<const uint4*>(w)[tid + THREADS * v], wf + 8 * v);
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;

  for (int i = 0; i < n; ++i) {
    // issue row i + S - 1 (into the slot row i - 1 used), then wait for row i
    const int nxt = i + S - 1;
    if (nxt < n) {
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        cp_async16(ring + (nxt % S) * (D / 8) + tid + THREADS * v,
                   reinterpret_cast<const uint4*>(x + (r0 + nxt) * D) + tid + THREADS * v);
    }
    cp_async_commit();
    cp_async_wait<S - 1>();
    float xf[E];
#pragma unroll
    for (int v = 0; v < VPT; ++v) unpack8(ring[(i % S) * (D / 8) + tid + THREADS * v], xf + 8 * v);
    float sq = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) sq += xf[e] * xf[e];
    // two reductions a row alternate the buffers; the walk alone has one, so it alternates by row
    const float rstd = fast_rsqrt(block_sum<WARPS>(sq, red[MODE == 2 ? (i & 1) : 0]) / D + eps);
    float yf[E];
    float ysq = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      uint4 yv;
      __nv_bfloat162* yp = reinterpret_cast<__nv_bfloat162*>(&yv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = 8 * v + 2 * j;
        // HF: w * (x * rstd).to(bf16), rounded once more
        const float a = wf[e] * __bfloat162float(__float2bfloat16(xf[e] * rstd));
        const float b = wf[e + 1] * __bfloat162float(__float2bfloat16(xf[e + 1] * rstd));
        yp[j] = __floats2bfloat162_rn(a, b);
        const float2 r = __bfloat1622float2(yp[j]);
        yf[e] = r.x;
        yf[e + 1] = r.y;
        ysq += r.x * r.x + r.y * r.y;
      }
      reinterpret_cast<uint4*>(y + (r0 + i) * D)[tid + THREADS * v] = yv;
    }
    if (MODE != 2) {
      const float inv = fast_rsqrt(fmaxf(block_sum<WARPS>(ysq, red[1]), 1e-24f));
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += yf[e] * inv;
    }
  }
  if (MODE == 1) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      float4* dst = reinterpret_cast<float4*>(part + block * D + 8 * (tid + THREADS * v));
      dst[0] = make_float4(acc[8 * v], acc[8 * v + 1], acc[8 * v + 2], acc[8 * v + 3]);
      dst[1] = make_float4(acc[8 * v + 4], acc[8 * v + 5], acc[8 * v + 6], acc[8 * v + 7]);
    }
  } else if (MODE == 0) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      float4* dst = reinterpret_cast<float4*>(acc_s + 8 * (tid + THREADS * v));
      dst[0] = make_float4(acc[8 * v], acc[8 * v + 1], acc[8 * v + 2], acc[8 * v + 3]);
      dst[1] = make_float4(acc[8 * v + 4], acc[8 * v + 5], acc[8 * v + 6], acc[8 * v + 7]);
    }
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's sum is in its shared memory
    // block `rank` adds columns [rank D / CS, (rank + 1) D / CS) of the CS sums in rank order, 4 columns a thread
    constexpr int SLICE = D / CS;
    for (int c = 4 * tid; c < SLICE; c += 4 * THREADS) {
      const int col = rank * SLICE + c;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int r = 0; r < CS; ++r) {
        const float4 p = *reinterpret_cast<const float4*>(cluster.map_shared_rank(acc_s, r) + col);
        sum.x += p.x;
        sum.y += p.y;
        sum.z += p.z;
        sum.w += p.w;
      }
      *reinterpret_cast<float4*>(part + block * D + col) = sum;
    }
    cluster.sync();  // no block leaves (freeing its shared memory) while another reads it
  }
}

template <int CS, int C, int S, int VPT, int MODE>
cudaError_t launch(const void* x, const void* w, void* y, float* part, long long rows, float eps, cudaStream_t stream) {
  constexpr int THREADS = D / (8 * VPT);
  const long long blocks_needed = (rows + C - 1) / C;
  const long long grid = MODE == 0 ? (blocks_needed + CS - 1) / CS * CS : blocks_needed;
  const size_t shared = static_cast<size_t>(S) * D * 2 + (MODE == 0 ? D * 4 : 0);
  auto kernel = walk_kernel<CS, C, S, VPT, MODE>;
  static bool configured = false;  // once, on the first (uncaptured) call: not while a CUDA graph is captured
  if (!configured) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return err;
    configured = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = shared;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = MODE == 0 ? CS : 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
                            static_cast<__nv_bfloat16*>(y), part, rows, eps);
}

#endif  // GAINRL_CUDA_EMULATOR

// ---------------------------------------------------------------------------------------------------------------
// Persistent clusters (session 23). The walks above lose by their window (blocks in flight x rows a block walks before
// its sum is combined), and a block of 256 threads with 4 per SM puts 528 blocks in flight. Here one block of 1024
// threads per SM works as RG row groups (4 of 256 threads, or 2 of 512), each with its own cp.async ring of S rows, so
// the window is 132 x C rows for C rows a block and chunk while a chunk's sum still covers CS x C rows. Clusters stay
// resident and take chunks from a counter (the ticket order that kept up in bench/walk_order.py), two chunks ahead, so
// the rings keep loading across a chunk's end; a chunk's sum does not depend on which cluster took it.
//
// Chunk `id` covers rows [id CS C, (id + 1) CS C): block rank r the C rows from id CS C + r C, its row group g the rows
// g, g + RG, ... of those (CR = C / RG each; MODE 3: the run g CR ...). Each row group sums its rows' unit vectors in
// registers. At the chunk's end it puts that sum in shared memory, the cluster meets (barrier.cluster arrive + wait),
// and block r adds column slice r of the CS x RG sums in a fixed order (block rank, then row group) from distributed
// shared memory and stores it as the chunk's partial row: the same bits whichever cluster took the chunk. The second
// arrive (after the remote reads) is waited on only at the next chunk's end, before the sums are overwritten. With
// J > 0 the wait and the combine (the chunk end's second half, `finish`) run J rows into the next chunk.
// MODE 0: the statistics and the combine; 1: the counter and one cluster barrier per chunk, no statistics; 2: the walk
// alone, chunks in a static order (cluster c takes c, c + NC, ...), no barriers; 3: MODE 0 and the rest of the
// forward's statistics (below).
namespace persistent {

// A block is THREADS threads, RG row groups of RT = THREADS / RG: each holds a row, VPT 16-byte vectors a thread.
constexpr int THREADS = 1024;
template <int RG>
struct Geometry {
  static constexpr int RT = THREADS / RG, WARPS = RT / 32, VPT = D / (8 * RT), E = 8 * VPT;
  static_assert(THREADS % RG == 0 && D == RT * E && VPT >= 1, "row groups hold whole rows of 16-byte vectors");
};

// The cluster's primitives (bench/cluster_primitives.cuh): the split cluster
// barrier, this block's rank, another block's shared memory, the row group's named barrier (1 + g), the counter.
using gainrl::cluster_sync::block_rank;
using gainrl::cluster_sync::cluster_arrive;
using gainrl::cluster_sync::cluster_wait;
using gainrl::cluster_sync::group_barrier;
using gainrl::cluster_sync::shared_of;
using gainrl::cluster_sync::take_ticket;

// Sum over row group g's threads, the same value in each; `red` holds a slot per warp.
template <int RG>
__device__ __forceinline__ float group_sum(float v, float* red, int g) {
  constexpr int WARPS = Geometry<RG>::WARPS;
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & (WARPS - 1);
  if (lane == 0) red[warp] = v;
  group_barrier<Geometry<RG>::RT>(g);
  return warp_sum(lane < WARPS ? red[lane] : 0.f);
}

// Sum of two values over row group g's threads (one barrier), the same pair in each.
template <int RG>
__device__ __forceinline__ float2 group_sum2(float a, float b, float2* red, int g) {
  constexpr int WARPS = Geometry<RG>::WARPS;
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & (WARPS - 1);
  if (lane == 0) red[warp] = make_float2(a, b);
  group_barrier<Geometry<RG>::RT>(g);
  const float2 r = lane < WARPS ? red[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(r.x), warp_sum(r.y));
}

// Dynamic shared memory, in this order: the rings [RG][S][D / 8] and the weight [D / 8] (16-byte vectors); with the
// statistics the row groups' sums [RG][D] and the combine's partials [THREADS] (float4); with the pairs (MODE 3)
// each row group's first y [2][RG][D / 8] (by chunk parity) and the block's last y [D / 8]; then rank 0's chunk ids
// [8] (4 used), the reduction slots [RG][2][WARPS] and (MODE 3) [RG][WARPS] float2, the heads' and the tail's
// 1 / ||y|| [2 RG + 1] (and a pad) and the row groups' (q, adj) [RG] float2. No static __shared__: the emulator's
// would be one for all blocks.
template <int MODE>
__host__ __device__ constexpr bool with_stats() { return MODE == 0 || MODE == 3; }
template <int S, int MODE, int RG>
constexpr size_t shared_bytes() {
  constexpr size_t WARPS = Geometry<RG>::WARPS;
  return static_cast<size_t>(RG) * S * D * 2 + D * 2 +
         (with_stats<MODE>() ? static_cast<size_t>(RG) * D * 4 + static_cast<size_t>(THREADS) * 16 : 0) +
         (MODE == 3 ? static_cast<size_t>(2 * RG + 1) * D * 2 : 0) + 8 * 4 + RG * 2 * WARPS * 4 +
         (MODE == 3 ? RG * WARPS * 8 + (2 * RG + 2) * 4 + RG * 8 : 0);
}

// Σ over this thread's 8 VPT values of a · b, two rows of packed bf16 given as this thread's vectors: a[v * as] and
// b[v * bs] (v < VPT): registers (yv, 1) or a row in shared memory (row + lt, RT).
template <int VPT>
__device__ __forceinline__ float dot_rows(const uint4* a, int as, const uint4* b, int bs) {
  float d = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    float af[8], bf[8];
    unpack8(a[v * as], af);
    unpack8(b[v * bs], bf);
#pragma unroll
    for (int e = 0; e < 8; ++e) d += af[e] * bf[e];
  }
  return d;
}

// MODE 3 adds the rest of the forward's statistics, per chunk and block: Σ ||u_t||² and the adjacent pairs
// Σ u_t · u_{t-1} (both rows in the chunk's segment), stored as scal[id][rank] = (q, adj) after the partial rows
// (a reduce would add the CS blocks' in rank order). Its row groups walk contiguous runs of CR rows (block rows
// g CR ...), so a pair inside a run is the thread's own: y_{t-1} stays packed in registers, as in the CUDA rows
// kernel. A run's first row pairs with the previous run's last at the chunk's end, through the run's first y in
// shared memory (heads); a block's first row with the previous block's last through distributed shared memory
// (tail); the chunk's first with the previous chunk's last row, which rank 0's first row group recomputes from x,
// bitwise as its owner did (one extra row a chunk), unless the chunk starts a segment (seg_chunks chunks each).
template <int CS, int C, int S, int MODE, int RG, int J>
__global__ void __launch_bounds__(THREADS, 1) walk_kernel(const __nv_bfloat16* __restrict__ x,
                                                          const __nv_bfloat16* __restrict__ w,
                                                          __nv_bfloat16* __restrict__ y, float* __restrict__ part,
                                                          int* __restrict__ counter, long long n_chunks,
                                                          long long seg_chunks, float eps) {
  constexpr int CR = C / RG, CHUNK = CS * C, SLICE = D / CS, Q = SLICE / 4;
  constexpr int RT = Geometry<RG>::RT, RG_WARPS = Geometry<RG>::WARPS, VPT = Geometry<RG>::VPT, E = Geometry<RG>::E;
  constexpr bool STATS = with_stats<MODE>(), PAIRS = MODE == 3;
  static_assert(C % RG == 0 && S >= 2 && S - 1 <= CR, "the ring looks at most one chunk ahead");
  static_assert(J == 0 || (MODE != 2 && J + S - 1 <= CR), "a deferred combine ends before the ring needs id2");
  static_assert(Q * CS == THREADS, "the combine: a column quad and a source block per thread");
#ifdef GAINRL_CUDA_EMULATOR
  unsigned char* smem = gainrl_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  uint4* ring = reinterpret_cast<uint4*>(smem);
  uint4* w_s = ring + RG * S * (D / 8);
  float* acc_s = reinterpret_cast<float*>(w_s + D / 8);
  float4* tmp = reinterpret_cast<float4*>(acc_s + (STATS ? RG * D : 0));
  uint4* heads = reinterpret_cast<uint4*>(tmp + (STATS ? THREADS : 0));
  uint4* tail = heads + 2 * RG * (D / 8);
  int* ids_s = reinterpret_cast<int*>(heads + (PAIRS ? (2 * RG + 1) * (D / 8) : 0));  // [8]: 4 used, 16-byte pad
  float(*red)[2][RG_WARPS] = reinterpret_cast<float(*)[2][RG_WARPS]>(ids_s + 8);
  float2* red2 = reinterpret_cast<float2*>(red + RG);  // [RG][RG_WARPS]             (MODE 3)
  float* inv_s = reinterpret_cast<float*>(red2 + (PAIRS ? RG * RG_WARPS : 0));  // heads' [2][RG], tail's, pad
  float2* scal_s = reinterpret_cast<float2*>(inv_s + (PAIRS ? 2 * RG + 2 : 0));  // [RG] (q, adj)
  float* tail_inv = inv_s + 2 * RG;

  const int tid = threadIdx.x, g = tid / RT, lt = tid % RT;
  const int rank = block_rank();
  const int c = blockIdx.x / CS, NC = gridDim.x / CS;  // chunk ids and counts fit an int (asserted by the launch)
  int id0 = c, id1 = NC + c;  // this chunk's and the next one's
  uint4* my_ring = ring + g * S * (D / 8);
  for (int v = tid; v < D / 8; v += THREADS) w_s[v] = reinterpret_cast<const uint4*>(w)[v];

  // the row group's j-th row of chunk `id` (j < CR)
  auto row_of = [&](int id, int j) {
    return static_cast<long long>(id) * CHUNK + rank * C + (PAIRS ? g * CR + j : g + RG * j);
  };
  auto issue = [&](int id, int j, int slot) {
    if (id < n_chunks) {
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        cp_async16(my_ring + slot * (D / 8) + lt + RT * v,
                   reinterpret_cast<const uint4*>(x + row_of(id, j) * D) + lt + RT * v);
    }
    cp_async_commit();
  };
  // y of the row xr (this thread's vectors), HF's formula, its Σ x² reduced in the slots `slot`; returns its Σ y²
  // over this thread's values (unused, so compiled out, without the statistics)
  auto norm_row = [&](const uint4* xr, uint4* yv, float& ysq, float* slot) {
    float sq = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      float xf[8];
      unpack8(xr[lt + RT * v], xf);
#pragma unroll
      for (int e = 0; e < 8; ++e) sq += xf[e] * xf[e];
    }
    const float rstd = fast_rsqrt(group_sum<RG>(sq, slot, g) / D + eps);
    ysq = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      float xf[8], wf[8];
      unpack8(xr[lt + RT * v], xf);
      unpack8(w_s[lt + RT * v], wf);
      __nv_bfloat162* yp = reinterpret_cast<__nv_bfloat162*>(&yv[v]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        // HF: w * (x * rstd).to(bf16), rounded once more
        const float a = wf[2 * q] * __bfloat162float(__float2bfloat16(xf[2 * q] * rstd));
        const float b = wf[2 * q + 1] * __bfloat162float(__float2bfloat16(xf[2 * q + 1] * rstd));
        yp[q] = __floats2bfloat162_rn(a, b);
        const float2 r = __bfloat1622float2(yp[q]);
        ysq += r.x * r.x + r.y * r.y;
      }
    }
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(id0, s, s);
  __syncthreads();  // w_s

  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  uint4 y_prev[VPT];  // MODE 3: the previous row's y (packed) and 1 / ||y||
  float inv_prev = 0.f, q_acc = 0.f, adj_acc = 0.f;
  int n = 0;  // rows this row group has taken
  int ticket = 0;
  int id_done = 0;  // the chunk whose end's second half (finish) is pending, with J > 0

  // The second half of chunk k's end (chunk id `idk`): the cluster meets, the next chunk ids arrive, and the block
  // adds its slice of the chunk's sums. With J > 0 it runs J rows into the next chunk, so that the rings are
  // full and the other blocks have mostly arrived by then.
  auto finish = [&](int k, int idk) {
    cluster_wait();
    const int id2 = *shared_of(&ids_s[(k + 2) & 3], 0);
    if (STATS) {
      if (PAIRS) {
        const uint4* head0 = heads + (k & 1) * RG * (D / 8);
        if (g == 0 && rank > 0) {  // this block's first row with the previous block's last
          const float d =
              group_sum<RG>(dot_rows<VPT>(head0 + lt, RT, shared_of(tail, rank - 1) + lt, RT), red[g][1], g);
          if (lt == 0) scal_s[0].y += d * inv_s[(k & 1) * RG] * *shared_of(tail_inv, rank - 1);
        }
      }
      // thread t adds quad t % Q of this block's column slice over source block t / Q's row groups, in order
      const int src = tid / Q, q = tid % Q, col = rank * SLICE + 4 * q;
      const float* remote = shared_of(acc_s, src);
      float4 sum = *reinterpret_cast<const float4*>(remote + col);
#pragma unroll
      for (int gg = 1; gg < RG; ++gg) {
        const float4 p = *reinterpret_cast<const float4*>(remote + gg * D + col);
        sum.x += p.x;
        sum.y += p.y;
        sum.z += p.z;
        sum.w += p.w;
      }
      tmp[src * Q + q] = sum;
      __syncthreads();
      if (tid < Q) {
        float4 total = tmp[tid];
        for (int r = 1; r < CS; ++r) {
          const float4 p = tmp[r * Q + tid];
          total.x += p.x;
          total.y += p.y;
          total.z += p.z;
          total.w += p.w;
        }
        *reinterpret_cast<float4*>(part + static_cast<long long>(idk) * D + rank * SLICE + 4 * tid) = total;
      }
      if (PAIRS && tid == 0) {  // (q, adj) of this block: its row groups' in order, after the partial rows
        float2 t = scal_s[0];
        for (int gg = 1; gg < RG; ++gg) t = make_float2(t.x + scal_s[gg].x, t.y + scal_s[gg].y);
        float* scal = part + n_chunks * D + (static_cast<long long>(idk) * CS + rank) * 2;
        scal[0] = t.x;
        scal[1] = t.y;
      }
      cluster_arrive();  // this block's remote reads are done (waited on at the next chunk's end)
    }
    return id2;
  };

  int k = 0;
  for (; id0 < n_chunks; ++k) {
    if (MODE != 2 && rank == 0 && tid == 0) ticket = take_ticket(counter);  // used at the chunk's end
    bool has_prev = false;
    if (PAIRS && rank == 0 && g == 0 && id0 % seg_chunks != 0) {  // the previous chunk's last row, recomputed
      const uint4* xp = reinterpret_cast<const uint4*>(x + (static_cast<long long>(id0) * CHUNK - 1) * D);
      float ysq;
      norm_row(xp, y_prev, ysq, red[g][0]);
      inv_prev = fast_rsqrt(fmaxf(group_sum2<RG>(ysq, 0.f, red2 + g * RG_WARPS, g).x, 1e-24f));
      has_prev = true;
    }
    for (int j = 0; j < CR; ++j, ++n) {
      if (J > 0 && k > 0 && j == J) id1 = finish(k - 1, id_done);
      const int ahead = j + S - 1;
      if (ahead < CR) issue(id0, ahead, static_cast<int>((n + S - 1) % S));
      else issue(id1, ahead - CR, static_cast<int>((n + S - 1) % S));
      cp_async_wait<S - 1>();
      const uint4* xr = my_ring + (n % S) * (D / 8);
      uint4 yv[VPT];
      float ysq;
      // with the statistics the row's two reductions take slots 0 and 1 (or the pairs'); without, one a row: by row
      norm_row(xr, yv, ysq, red[g][STATS ? 0 : (n & 1)]);
#pragma unroll
      for (int v = 0; v < VPT; ++v) reinterpret_cast<uint4*>(y + row_of(id0, j) * D)[lt + RT * v] = yv[v];
      if (STATS) {
        float inv;
        if (PAIRS) {
          const float dot = has_prev ? dot_rows<VPT>(yv, 1, y_prev, 1) : 0.f;
          const float2 sums = group_sum2<RG>(ysq, dot, red2 + g * RG_WARPS, g);
          inv = fast_rsqrt(fmaxf(sums.x, 1e-24f));
          q_acc += sums.x * inv * inv;
          if (has_prev) adj_acc += sums.y * inv * inv_prev;
          if (j == 0) {  // the run's first y, for the pair with the previous run (chunk's end)
#pragma unroll
            for (int v = 0; v < VPT; ++v) heads[((k & 1) * RG + g) * (D / 8) + lt + RT * v] = yv[v];
            if (lt == 0) inv_s[(k & 1) * RG + g] = inv;
          }
#pragma unroll
          for (int v = 0; v < VPT; ++v) y_prev[v] = yv[v];
          inv_prev = inv;
          has_prev = true;
        } else {
          inv = fast_rsqrt(fmaxf(group_sum<RG>(ysq, red[g][1], g), 1e-24f));
        }
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          float yf[8];
          unpack8(yv[v], yf);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[8 * v + e] += yf[e] * inv;
        }
      }
    }
    // chunk k's end, first half: its sums into shared memory, then the cluster barrier's arrive
    if (STATS) {
      if (k > 0) cluster_wait();  // every block has read the previous chunk's sums (and tail)
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        float4* dst = reinterpret_cast<float4*>(acc_s + g * D + 8 * (lt + RT * v));
        dst[0] = make_float4(acc[8 * v], acc[8 * v + 1], acc[8 * v + 2], acc[8 * v + 3]);
        dst[1] = make_float4(acc[8 * v + 4], acc[8 * v + 5], acc[8 * v + 6], acc[8 * v + 7]);
      }
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = 0.f;
      if (PAIRS) {
        if (g == RG - 1) {  // the block's last y, for the next block's first row
#pragma unroll
          for (int v = 0; v < VPT; ++v) tail[lt + RT * v] = y_prev[v];
          if (lt == 0) *tail_inv = inv_prev;
        }
        __syncthreads();  // the heads
        if (g < RG - 1) {  // this run's last row with the next run's first
          const uint4* next = heads + ((k & 1) * RG + g + 1) * (D / 8);
          const float d = group_sum<RG>(dot_rows<VPT>(y_prev, 1, next + lt, RT), red[g][0], g);
          adj_acc += d * inv_prev * inv_s[(k & 1) * RG + g + 1];
        }
        // this row group's (q, adj): read by the finish (after a __syncthreads), rewritten only after wait#2
        if (lt == 0) scal_s[g] = make_float2(q_acc, adj_acc);
        q_acc = adj_acc = 0.f;
      }
    }
    if (MODE != 2) {
      if (rank == 0 && tid == 0) ids_s[(k + 2) & 3] = 2 * NC + ticket;
      cluster_arrive();
    }
    id_done = id0;
    id0 = id1;
    if (MODE == 2) id1 += NC;  // static chunks
    else if (J == 0) id1 = finish(k, id_done);
    // else: chunk k's finish, J rows into chunk k + 1 (or after the loop), brings id1
  }
  if (J > 0 && k > 0) finish(k - 1, id_done);  // the last chunk's combine
  // no block leaves while another may still read its shared memory (the sums, tail and rank 0's chunk ids)
  if (MODE == 1 && k > 0) cluster_arrive();
  if (MODE != 2 && k > 0) cluster_wait();
  cp_async_wait<0>();
}

#ifdef GAINRL_CUDA_EMULATOR
// `clusters` clusters run one after another: the first ones take every chunk the counter hands out. Returns 0, 1 for
// rows that are no whole number of chunks, 2 (the reason on stderr) where the emulator found a fault.
template <int CS, int C, int S, int MODE, int RG, int J = 0>
int emulate(const void* x, const void* w, void* y, float* part, int* counter, long long rows, long long seg_rows,
            int clusters) {
  constexpr int CHUNK = CS * C;
  if (rows % CHUNK || seg_rows <= 0 || seg_rows % CHUNK || clusters <= 0 || rows / CHUNK > (1LL << 30)) return 1;
  *counter = 0;
  try {
    gainrl_emu::launch_cluster(CS, shared_bytes<S, MODE, RG>(), walk_kernel<CS, C, S, MODE, RG, J>,
                               dim3(static_cast<unsigned>(clusters * CS)), dim3(THREADS),
                               static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
                               static_cast<__nv_bfloat16*>(y), part, counter, rows / CHUNK, seg_rows / CHUNK, 1e-6f);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cluster_walk_emulate: %s\n", e.what());
    return 2;
  }
  return 0;
}
#else
inline int g_last_clusters = 0;  // clusters the last persistent launch ran (cluster_walk_last_clusters)

template <int CS, int C, int S, int MODE, int RG, int J = 0>
cudaError_t launch(const void* x, const void* w, void* y, float* part, int* counter, long long rows,
                   long long seg_rows, cudaStream_t stream) {
  constexpr int CHUNK = CS * C;
  if (rows % CHUNK || seg_rows <= 0 || seg_rows % CHUNK || rows / CHUNK > (1LL << 30)) return cudaErrorInvalidValue;
  constexpr size_t shared = shared_bytes<S, MODE, RG>();
  auto kernel = walk_kernel<CS, C, S, MODE, RG, J>;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = shared;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  static int clusters = 0;  // resident clusters, found once, on the first (uncaptured) call
  if (clusters == 0) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err == cudaSuccess && CS > 8)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    cfg.gridDim = dim3(CS);
    err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (err != cudaSuccess) return err;
    if (clusters <= 0) return cudaErrorInvalidConfiguration;
  }
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * CS));
  g_last_clusters = clusters;
  if (MODE != 2) {
    const cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
                            static_cast<__nv_bfloat16*>(y), part, counter, rows / CHUNK, seg_rows / CHUNK, 1e-6f);
}
#endif  // GAINRL_CUDA_EMULATOR

}  // namespace persistent

}  // namespace cluster_walk

#ifdef GAINRL_CUDA_EMULATOR
// The persistent kernel in the emulator, clusters of 2 blocks (8 x 1024 fibers would be slow for a test), C = 8 rows
// a block: mode 0-3 as MODE, rg = 4 row groups with 3-row rings or 2 with 5-row rings (or with a combine deferred
// `defer` rows into the next chunk: 2 with 3-row rings), segments of seg_rows rows (MODE 3). Returns as emulate; -1
// for a combination not built.
extern "C" int cluster_walk_emulate(int mode, int rg, int defer, const void* x, const void* w, void* y, float* part,
                                    int* counter, long long rows, long long seg_rows, int clusters) {
  using namespace cluster_walk::persistent;
  switch (mode * 100 + rg * 10 + defer) {
    case 40: return emulate<2, 8, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 140: return emulate<2, 8, 3, 1, 4>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 240: return emulate<2, 8, 3, 2, 4>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 340: return emulate<2, 8, 3, 3, 4>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 20: return emulate<2, 8, 5, 0, 2>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 320: return emulate<2, 8, 5, 3, 2>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 21: return emulate<2, 8, 3, 0, 2, 1>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 22: return emulate<2, 8, 3, 0, 2, 2>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 121: return emulate<2, 8, 3, 1, 2, 1>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 321: return emulate<2, 8, 3, 3, 2, 1>(x, w, y, part, counter, rows, seg_rows, clusters);
    case 322: return emulate<2, 8, 3, 3, 2, 2>(x, w, y, part, counter, rows, seg_rows, clusters);
    default: return -1;
  }
}
#else
// How many clusters the last persistent variant launched (0 before any): cudaOccupancyMaxActiveClusters' count.
extern "C" int cluster_walk_last_clusters() { return cluster_walk::persistent::g_last_clusters; }

// The variants bench/cluster_walk.py times (VARIANTS there, in this order): returns a cudaError_t (0: launched),
// -1 for an unknown index.
extern "C" int cluster_walk_launch(int variant, const void* x, const void* w, void* y, float* part, int* counter,
                                   long long rows, long long seg_rows, float eps, void* stream) {
  using namespace cluster_walk;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (variant) {
    case 0: return launch<8, 8, 4, 2, 0>(x, w, y, part, rows, eps, s);   // cluster8_c8
    case 1: return launch<8, 4, 4, 2, 0>(x, w, y, part, rows, eps, s);   // cluster8_c4
    case 2: return launch<8, 16, 4, 2, 0>(x, w, y, part, rows, eps, s);  // cluster8_c16
    case 3: return launch<4, 8, 4, 2, 0>(x, w, y, part, rows, eps, s);   // cluster4_c8
    case 4: return launch<8, 8, 4, 1, 0>(x, w, y, part, rows, eps, s);   // cluster8_c8_512
    case 5: return launch<1, 8, 4, 2, 1>(x, w, y, part, rows, eps, s);   // partials_c8 (no cluster)
    case 6: return launch<1, 8, 4, 2, 2>(x, w, y, part, rows, eps, s);   // walk_c8 (no statistics)
    case 7: return launch<1, 1, 2, 2, 2>(x, w, y, part, rows, eps, s);   // walk_c1 (the bare order)
    case 8: return launch<8, 2, 2, 2, 0>(x, w, y, part, rows, eps, s);   // cluster8_c2
    // persistent clusters (eps fixed at 1e-6; segments of seg_rows rows for MODE 3): CS, C, S, MODE
    case 9: return persistent::launch<8, 16, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);    // pc8_c16
    case 10: return persistent::launch<8, 8, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);    // pc8_c8
    case 11: return persistent::launch<8, 32, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c32
    case 12: return persistent::launch<8, 16, 4, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_s4
    case 13: return persistent::launch<16, 16, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);  // pc16_c16
    case 14: return persistent::launch<16, 8, 3, 0, 4>(x, w, y, part, counter, rows, seg_rows, s);   // pc16_c8
    case 15: return persistent::launch<8, 16, 3, 1, 4>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_nostats
    case 16: return persistent::launch<8, 16, 3, 2, 4>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_walk
    // two row groups of 512 threads with 5-row rings (the pairs' registers do not fit four at 64 a thread)
    case 17: return persistent::launch<8, 16, 5, 3, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_full
    case 18: return persistent::launch<16, 8, 5, 3, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc16_c8_full
    case 19: return persistent::launch<8, 16, 5, 0, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_rg2
    case 20: return persistent::launch<8, 32, 5, 3, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c32_full
    case 21: return persistent::launch<8, 16, 4, 3, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_full_s4
    case 22: return persistent::launch<8, 16, 7, 3, 2>(x, w, y, part, counter, rows, seg_rows, s);   // pc8_c16_full_s7
    // the combine deferred J rows into the next chunk (CS, C, S, MODE, RG, J): pc8_c16_full_d2,
    // pc8_c16_full_s7_d1, pc8_c16_d1, pc8_c16_rg2_d2
    case 23: return persistent::launch<8, 16, 5, 3, 2, 2>(x, w, y, part, counter, rows, seg_rows, s);  // _full_d2
    case 24: return persistent::launch<8, 16, 7, 3, 2, 1>(x, w, y, part, counter, rows, seg_rows, s);  // _s7_d1
    case 25: return persistent::launch<8, 16, 3, 0, 4, 1>(x, w, y, part, counter, rows, seg_rows, s);  // pc8_c16_d1
    case 26: return persistent::launch<8, 16, 5, 0, 2, 2>(x, w, y, part, counter, rows, seg_rows, s);  // _rg2_d2
    default: return -1;
  }
}
#endif  // GAINRL_CUDA_EMULATOR
