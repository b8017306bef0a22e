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
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cg = cooperative_groups;

namespace cluster_walk {

constexpr int D = 4096;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

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

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
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
    const float rstd = rsqrtf(block_sum<WARPS>(sq, red[MODE == 2 ? (i & 1) : 0]) / D + eps);
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
      const float inv = rsqrtf(fmaxf(block_sum<WARPS>(ysq, red[1]), 1e-24f));
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

}  // namespace cluster_walk

// The variants bench/cluster_walk.py times (VARIANTS there, in this order): returns a cudaError_t (0: launched),
// -1 for an unknown index.
extern "C" int cluster_walk_launch(int variant, const void* x, const void* w, void* y, float* part, long long rows,
                                   float eps, void* stream) {
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
    default: return -1;
  }
}
