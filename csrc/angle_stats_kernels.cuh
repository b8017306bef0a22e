// Hand-written CUDA angle_stats kernels (DESIGN.md §1, §3): the device code and the inline host launcher
// launch_angle_stats. Header-light on purpose: only CUDA headers, no torch, so the device code compiles (and is
// checked for register spills by tests/test_csrc_compile.py) anywhere nvcc is. What lives where:
//   csrc/angle_stats_launch.h          plain host interface (DType, Args, sizing helpers, launch() declaration);
//                                      included here and by the g++-compiled binding;
//   csrc/angle_stats_kernels.cuh       (this file) kernels + launch_angle_stats; nvcc only (and the g++ CPU
//                                      emulator of tests/test_cuda_backend.py, under GAINRL_CUDA_EMULATOR);
//   csrc/angle_stats_cuda.cu           nvcc: instantiates everything, defines the exported launch(); never throws;
//   csrc/angle_stats_cuda_binding.cpp  g++: the torch binding (argument checks, allocation, CUDAGuard, stream,
//                                      C10_CUDA_CHECK, TORCH_LIBRARY_IMPL(gainrl, CUDA)).
// Nothing in this file throws: errors are returned as cudaError_t.
//
// Op: hidden [T, D] (fp32 / fp16 / bf16, any strides), cu_seqlens [B+1] int32, seg_offsets [B, K+1] int32 (relative
// to each sequence start)  ->  unit_sum [B, K, D] f32 = Σ_{t∈(b,k)} u_t,  count [B, K] i32,  sq_norm [B, K] f32 =
// Σ ‖u_t‖²,  adjacent [B] f32 = Σ u_t·u_{t+1} over consecutive tokens inside [o_0, o_K) (pairs across segment
// borders count), with u_t = h_t / max(‖h_t‖₂, 1e-12). float32 accumulation, deterministic (fixed summation order,
// no atomics), no host synchronisation.
//
// Decomposition, three launches on one stream:
//   1. plan_kernel (one block): count[s] = o_{k+1} - o_k for every segment s = b*K + k, and the exclusive scan
//      chunk_start[s] = Σ_{s'<s} cdiv(count[s'], kChunkRows); chunk_start[B*K] = number of chunks. A chunk is up to
//      kChunkRows consecutive rows of ONE segment, so #chunks <= cdiv(T, kChunkRows) + B*K (the host sizes the grid
//      and the workspace with that bound; surplus blocks exit at once).
//   2. chunk_kernel (one block per chunk): the block spans a whole row: thread i owns NT column groups of VEC
//      columns (16-byte vectors in the fast path), so a row is read from global memory exactly once, coalesced.
//      Rows are processed G at a time: every thread loads its slice of G rows into registers, takes partial sums of
//      squares, warp-shuffle reduces them, and one __syncthreads + a fixed-order sum over the warps gives every
//      thread the G row norms (inv_t = 1 / max(norm, eps)). Each thread then adds h_t * inv_t to its float
//      accumulators and (h_{t-1}·h_t over its columns) * inv_t * inv_{t-1} to its adjacent partial, keeping row
//      t-1 in registers. The pair that enters the chunk from the row before it (previous chunk or previous segment
//      of the same sequence, when inside [o_0, o_K)) is handled by reading that one row first as a
//      "previous-only" row. Output: part_sum[chunk, D], part_sq[chunk], part_adj[chunk] (f32 workspace).
//   3. reduce_kernel (grid B*K x cdiv(D, 256)): sums each segment's chunk partials in chunk order -> unit_sum,
//      sq_norm; adjacent[b] sums part_adj over all chunks of sequence b in order.
// Traffic: each hidden row is read once (plus one row per chunk for the boundary pair); the partials add
// 4*D bytes per chunk, i.e. ~1/32 (bf16) of the input. Supported D: up to 16384 on the 16-byte path (D % 8 == 0
// for fp16/bf16, % 4 for fp32, 16-byte aligned rows), up to 8192 on the generic strided path.
//
// NaN handling: the norm clamp is written `norm < eps ? eps : norm`, so a NaN norm stays NaN (fmaxf would drop it)
// and the whole row's u becomes NaN, as with F.normalize. Offsets are clamped into range like the CPU kernel does,
// so bad (unvalidated) offsets cannot cause out-of-bounds reads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_helpers.cuh"     // to_float, warp_sum
#include "angle_stats_launch.h"  // kChunkRows, kMaxThreads, DType, Args, max_chunks, vectorizable, ...

namespace gainrl {
namespace angle_stats {

constexpr int kPlanThreads = 1024;  // plan_kernel block size
constexpr int kReduceThreads = 256;
constexpr float kEps = 1e-12f;

// ------------------------------------------------------------------------------------------------ device helpers

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __float2half_rn(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

// N consecutive elements; alignas makes the N*sizeof(T) == 16 case a single 128-bit load.
template <typename T, int N>
struct alignas(sizeof(T) * N) RawVec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void set_zero(RawVec<T, N>& x) {
#pragma unroll
  for (int e = 0; e < N; ++e) x.v[e] = zero_value<T>();
}

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Absolute token range of segment s = b*K + k, clamped into the sequence (the CPU kernel's clamping rules), plus
// the start of the sequence's covered span [o_0, o_K).
struct SegmentRange {
  int64_t lo, hi, cover_lo;
};

__device__ __forceinline__ SegmentRange segment_range(const int* __restrict__ cu_seqlens,
                                                      const int* __restrict__ seg_offsets, int64_t T, int K,
                                                      int64_t s) {
  const int64_t b = s / K, k = s - b * K;
  const int64_t s_lo = min(max(static_cast<int64_t>(cu_seqlens[b]), int64_t(0)), T);
  const int64_t s_hi = min(max(static_cast<int64_t>(cu_seqlens[b + 1]), s_lo), T);
  const int len = static_cast<int>(s_hi - s_lo);
  const int* o = seg_offsets + b * (K + 1);
  SegmentRange r;
  r.lo = s_lo + clamp_int(o[k], 0, len);
  r.hi = max(r.lo, s_lo + clamp_int(o[k + 1], 0, len));
  r.cover_lo = s_lo + clamp_int(o[0], 0, len);
  return r;
}

// ------------------------------------------------------------------------------------------------ 1. plan

// One block: count[s] and chunk_start[0..BK] (exclusive scan of per-segment chunk counts), clamped to max_chunks.
// The scan runs in 64 bits: unvalidated, overlapping segments can sum past 2^31 chunks (valid ones stay within
// max_chunks); clamped, chunk_start stays non-decreasing within [0, max_chunks] and both readers stay in bounds.
__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const int* __restrict__ cu_seqlens, const int* __restrict__ seg_offsets, int64_t T, int K, int BK,
                int max_chunks, int* __restrict__ count, int* __restrict__ chunk_start) {
  __shared__ long long warp_total[kPlanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  long long carry = 0;
  for (int base = 0; base < BK; base += blockDim.x) {
    const int s = base + threadIdx.x;
    long long n_chunks = 0;
    if (s < BK) {
      const SegmentRange r = segment_range(cu_seqlens, seg_offsets, T, K, s);
      const int n = static_cast<int>(r.hi - r.lo);
      count[s] = n;
      n_chunks = (n + kChunkRows - 1) / kChunkRows;
    }
    long long x = n_chunks;  // inclusive warp scan
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, x, off);
      if (lane >= off) x += y;
    }
    if (lane == 31) warp_total[warp] = x;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warp totals
      long long w = lane < n_warps ? warp_total[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const long long y = __shfl_up_sync(0xffffffffu, w, off);
        if (lane >= off) w += y;
      }
      if (lane < n_warps) warp_total[lane] = w;
    }
    __syncthreads();
    if (s < BK) {
      const long long start = carry + (warp > 0 ? warp_total[warp - 1] : 0) + x - n_chunks;
      chunk_start[s] = static_cast<int>(min(start, static_cast<long long>(max_chunks)));
    }
    carry += warp_total[n_warps - 1];
    __syncthreads();  // warp_total is rewritten by the next tile
  }
  if (threadIdx.x == 0) chunk_start[BK] = static_cast<int>(min(carry, static_cast<long long>(max_chunks)));
}

// ------------------------------------------------------------------------------------------------ 2. chunks

// VEC columns per load (16 bytes when kVectorized, else 1 element with an arbitrary column stride), NT loads per
// thread per row (so a block of blockDim.x threads covers blockDim.x * NT * VEC >= D columns), G rows per
// norm reduction round.
template <typename T, bool kVectorized>
struct ChunkTraits {
  static constexpr int VEC = kVectorized ? int(16 / sizeof(T)) : 1;
};

template <typename T, int NT, int G, bool kVectorized>
__global__ void __launch_bounds__(kMaxThreads, NT <= 2 ? 2 : 1)
    chunk_kernel(const T* __restrict__ hidden, int64_t T_rows, int D, int64_t stride_t, int64_t stride_d,
                 const int* __restrict__ cu_seqlens, const int* __restrict__ seg_offsets, int K, int BK,
                 const int* __restrict__ chunk_start, int max_chunks, float* __restrict__ part_sum,
                 float* __restrict__ part_sq, float* __restrict__ part_adj) {
  constexpr int VEC = ChunkTraits<T, kVectorized>::VEC;
  __shared__ float red[2][kMaxThreads / 32][G];  // double-buffered per-warp partial sums of squares
  __shared__ float red_adj[kMaxThreads / 32];

  const int chunk = blockIdx.x;
  const int n_chunks = min(chunk_start[BK], max_chunks);
  if (chunk >= n_chunks) return;  // block-uniform

  // Segment of this chunk: the last s with chunk_start[s] <= chunk (skips empty segments).
  int lo = 0, hi = BK;  // invariant: chunk_start[lo] <= chunk < chunk_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (chunk_start[mid] <= chunk) lo = mid; else hi = mid;
  }
  const int seg = lo;
  const SegmentRange r = segment_range(cu_seqlens, seg_offsets, T_rows, K, seg);
  const int64_t row_begin = r.lo + static_cast<int64_t>(chunk - chunk_start[seg]) * kChunkRows;
  const int64_t row_end = min(row_begin + kChunkRows, r.hi);
  // Virtual row 0 is the row before the chunk when the pair (row_begin - 1, row_begin) lies inside [o_0, o_K):
  // it only feeds the adjacent term. Rows v >= has_prev are the chunk's own rows.
  const int has_prev = row_begin > r.cover_lo ? 1 : 0;
  const int64_t first = row_begin - has_prev;
  const int n_virtual = static_cast<int>(row_end - first);  // <= kChunkRows + 1

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int n_vec = D / VEC;  // D % VEC == 0 in the vectorized path; VEC == 1 otherwise

  float acc[NT][VEC];            // Σ u over the chunk's rows, this thread's columns
  RawVec<T, VEC> prev_x[NT];     // raw slice of the last row of the previous round (kept packed: fewer registers)
  float prev_inv = 0.f;          // and its 1 / max(norm, eps)
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    set_zero(prev_x[j]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = 0.f;
  }
  float adj = 0.f;  // Σ u_{t-1}·u_t over this thread's columns
  float sq = 0.f;   // Σ ‖u_t‖² (block-uniform)
  int buf = 0;

  for (int g0 = 0; g0 < n_virtual; g0 += G) {
    RawVec<T, VEC> x[G][NT];
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const bool row_ok = g0 + i < n_virtual;
      const T* row = hidden + (first + g0 + i) * stride_t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int vi = j * blockDim.x + threadIdx.x;
        if (row_ok && vi < n_vec) {
          if constexpr (kVectorized) {
            x[i][j] = *reinterpret_cast<const RawVec<T, VEC>*>(row + static_cast<int64_t>(vi) * VEC);
          } else {
            x[i][j].v[0] = row[static_cast<int64_t>(vi) * stride_d];
          }
        } else {
          set_zero(x[i][j]);
        }
      }
    }
    float ss[G];
#pragma unroll
    for (int i = 0; i < G; ++i) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float f = to_float(x[i][j].v[e]);
          s = fmaf(f, f, s);
        }
      }
      ss[i] = warp_sum(s);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < G; ++i) red[buf][warp][i] = ss[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < G; ++i) {
      float s = 0.f;
      for (int w = 0; w < n_warps; ++w) s += red[buf][w][i];  // same order in every thread: uniform result
      ss[i] = s;
    }
    buf ^= 1;  // the next round writes the other buffer; this one is rewritten only after the next barrier

#pragma unroll
    for (int i = 0; i < G; ++i) {
      const int v = g0 + i;
      if (v >= n_virtual) break;  // block-uniform
      const float norm = sqrtf(ss[i]);
      const float inv = 1.f / (norm < kEps ? kEps : norm);  // NaN norm -> NaN inv (keeps NaN rows NaN)
      if (v >= has_prev) {  // one of the chunk's own rows (block-uniform)
        sq += ss[i] * inv * inv;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] = fmaf(to_float(x[i][j].v[e]), inv, acc[j][e]);
        }
      }
      if (v > 0) {  // pair (virtual row v-1, v); the previous row is x[i-1], or prev_x across rounds
        const RawVec<T, VEC>* p = i > 0 ? x[i - 1] : prev_x;  // i is a compile-time constant (unrolled)
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot = fmaf(to_float(p[j].v[e]), to_float(x[i][j].v[e]), dot);
        }
        adj = fmaf(dot * inv, prev_inv, adj);
      }
      prev_inv = inv;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) prev_x[j] = x[G - 1][j];  // only read if another round follows (then full)
  }

  // Block sum of the adjacent partials, fixed order.
  adj = warp_sum(adj);
  if (lane == 0) red_adj[warp] = adj;
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f;
    for (int w = 0; w < n_warps; ++w) a += red_adj[w];
    part_adj[chunk] = a;
    part_sq[chunk] = sq;
  }
  float* out = part_sum + static_cast<int64_t>(chunk) * D;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int vi = j * blockDim.x + threadIdx.x;
    if (vi < n_vec) {
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
          *reinterpret_cast<float4*>(out + static_cast<int64_t>(vi) * VEC + e) =
              make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[static_cast<int64_t>(vi) * VEC + e] = acc[j][e];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ 3. reduce

// grid (B*K, cdiv(D, kReduceThreads)): unit_sum[s, d] = Σ_c part_sum[c, d] over the chunks of s, in chunk order.
__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const int* __restrict__ chunk_start, int K, int D, int max_chunks,
                  const float* __restrict__ part_sum, const float* __restrict__ part_sq,
                  const float* __restrict__ part_adj, float* __restrict__ unit_sum, float* __restrict__ sq_norm,
                  float* __restrict__ adjacent) {
  const int s = blockIdx.x;
  const int c0 = min(chunk_start[s], max_chunks), c1 = min(chunk_start[s + 1], max_chunks);
  const int d = blockIdx.y * blockDim.x + threadIdx.x;
  if (d < D) {
    float a = 0.f;
    for (int c = c0; c < c1; ++c) a += part_sum[static_cast<int64_t>(c) * D + d];
    unit_sum[static_cast<int64_t>(s) * D + d] = a;
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    float q = 0.f;
    for (int c = c0; c < c1; ++c) q += part_sq[c];
    sq_norm[s] = q;
    if (s % K == 0) {  // first segment of sequence b: adjacent over all of b's chunks
      const int e1 = min(chunk_start[s + K], max_chunks);
      float a = 0.f;
      for (int c = c0; c < e1; ++c) a += part_adj[c];
      adjacent[s / K] = a;
    }
  }
}

// ------------------------------------------------------------------------------------------------ host launcher

// DType, Args, max_chunks, element_size, vectorizable and max_supported_dim: csrc/angle_stats_launch.h.

inline unsigned round_up_warp(int64_t n) { return static_cast<unsigned>(n <= 32 ? 32 : (n + 31) / 32 * 32); }

// Every launch goes through here. The CPU emulator in tests/test_cuda_backend.py (which runs this very header under
// g++ to check the kernels' logic without a GPU) defines GAINRL_CUDA_EMULATOR and provides gainrl_emu::launch.
template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A... args) {
#ifdef GAINRL_CUDA_EMULATOR
  (void)stream;
  gainrl_emu::launch(kernel, grid, block, static_cast<P>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(static_cast<P>(args)...);
#endif
}

template <typename T, int NT, int G, bool kVec>
inline void launch_chunks(const Args& a, int grid, cudaStream_t stream) {
  constexpr int VEC = ChunkTraits<T, kVec>::VEC;
  const int64_t n_vec = a.D / VEC;
  const unsigned threads = round_up_warp((n_vec + NT - 1) / NT);
  launch_kernel(&chunk_kernel<T, NT, G, kVec>, dim3(grid), dim3(threads), stream, static_cast<const T*>(a.hidden),
                a.T, a.D, a.stride_t, a.stride_d, a.cu_seqlens, a.seg_offsets, a.K, a.B * a.K, a.chunk_start, grid,
                a.part_sum, a.part_sq, a.part_adj);
}

// NT: the fewest loads per row that keep the block at <= kMaxThreads threads; G: rows per norm round, as large
// as the register budget allows without spills (tests/test_csrc_compile.py checks ptxas' report).
template <typename T>
inline void dispatch_chunks(const Args& a, bool vectorized, int grid, cudaStream_t stream) {
  if (!vectorized) {
    launch_chunks<T, 16, 2, false>(a, grid, stream);
    return;
  }
  constexpr int VEC = 16 / sizeof(T);
  const int64_t n_vec = a.D / VEC;
  if (n_vec <= kMaxThreads) {
    launch_chunks<T, 1, 4, true>(a, grid, stream);
  } else if (n_vec <= 2 * kMaxThreads) {
    // bf16 -> f32 conversions are kept unpacked by the compiler: G = 2 would spill under the 64-register bound.
    constexpr int G = std::is_same<T, __nv_bfloat16>::value ? 1 : 2;
    launch_chunks<T, 2, G, true>(a, grid, stream);
  } else if (sizeof(T) == 2 || n_vec <= 4 * kMaxThreads) {
    launch_chunks<T, 4, 1, true>(a, grid, stream);
  } else {
    if constexpr (sizeof(T) == 4) launch_chunks<T, 8, 1, true>(a, grid, stream);
  }
}

// Enqueues the three kernels on `stream` (no synchronisation, no exceptions). Outputs and workspace as in Args; the
// caller zero-fills `adjacent` when K == 0 (B*K == 0: nothing is launched) and keeps T, max_chunks < 2^31.
// The extension calls it through the exported gainrl::angle_stats::launch (csrc/angle_stats_cuda.cu); the CPU
// emulator calls it directly.
inline cudaError_t launch_angle_stats(const Args& a, DType dt, cudaStream_t stream) {
  const int64_t BK = a.B * a.K;
  if (BK == 0) return cudaSuccess;
  const bool vec = vectorizable(a, dt);
  if (a.D > max_supported_dim(dt, vec)) return cudaErrorInvalidValue;
  const int grid = static_cast<int>(max_chunks(a.T, BK));
  launch_kernel(&plan_kernel, dim3(1), dim3(kPlanThreads), stream, a.cu_seqlens, a.seg_offsets, a.T, a.K, BK, grid,
                a.count, a.chunk_start);
  switch (dt) {
    case DType::kFloat32: dispatch_chunks<float>(a, vec, grid, stream); break;
    case DType::kFloat16: dispatch_chunks<__half>(a, vec, grid, stream); break;
    case DType::kBFloat16: dispatch_chunks<__nv_bfloat16>(a, vec, grid, stream); break;
  }
  const int64_t col_blocks = a.D > 0 ? (a.D + kReduceThreads - 1) / kReduceThreads : 1;
  launch_kernel(&reduce_kernel, dim3(static_cast<unsigned>(BK), static_cast<unsigned>(col_blocks)),
                dim3(kReduceThreads), stream, a.chunk_start, a.K, a.D, grid, a.part_sum, a.part_sq, a.part_adj,
                a.unit_sum, a.sq_norm, a.adjacent);
#ifdef GAINRL_CUDA_EMULATOR
  return cudaSuccess;
#else
  return cudaGetLastError();
#endif
}

}  // namespace angle_stats
}  // namespace gainrl
