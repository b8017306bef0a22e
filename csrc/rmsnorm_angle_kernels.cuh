// Hand-written CUDA forward of the fused RMSNorm + angle statistics: the rows kernel and its inline launcher.
// Header-light on purpose (CUDA headers only, no torch): tests/test_csrc_compile.py checks it with ptxas and the
// g++ CPU emulator of tests/cuda_emulator.py runs it (under GAINRL_CUDA_EMULATOR) without a GPU.
//
// What it computes, per work item (a chunk of rows of x [R, D], from the plan kernel of
// gainrl_kernels/rmsnorm_angle_forward_kernels.py; see csrc/rmsnorm_angle_launch.h), exactly the Triton
// _fwd_rows_kernel's outputs:
//   rstd_t = rsqrt(Σ x_t² / D + eps),  y_t = round(w · round(x_t · rstd_t))  (round: to x's dtype, HF LlamaRMSNorm)
// and, for a chunk inside a segment, of y as stored: Σ y_t / ‖y_t‖ (one fp32 partial row), Σ ‖y_t‖² / ‖y_t‖² and
// Σ (y_t · y_{t+1}) / (‖y_t‖ ‖y_{t+1}‖) over the pairs with t + 1 < pair_end (the chunk's last pair reads the row
// after it), with 1 / ‖y‖ = rsqrt(max(‖y‖², 1e-24)).
//
// Why a CUDA kernel beside the Triton one: an H100 profile of the Triton kernel at 64x4096x4096 bf16
// (bench/results/profile_fused_h100_register_cap.txt) spends a third of its stalls waiting on global loads and a
// third at block barriers, with 3 programs (12 warps) per SM. Here:
//   * rows arrive through a ring of `S` row buffers in shared memory filled by cp.async (16 bytes a copy), S - 1
//     rows ahead, so bytes in flight cost no registers; every thread copies and later reads only its own 16-byte
//     vectors, so the ring needs no barrier, only cp.async.wait_group;
//   * one block reduction per row (‖y_t‖², y_t · y_{t-1} and the next row's Σ x², warp shuffles then one
//     __syncthreads on a double-buffered per-warp slot): one barrier a row, where Triton's reduction takes two;
//   * the weight lives in shared memory (each thread its own columns): fp32, or packed in x's dtype when it has that
//     dtype, so that y = round(w * n) is one bf16x2 / half2 multiply per pair; y_{t-1} stays in registers packed
//     in x's dtype (y is stored rounded: nothing is lost), and row t-1's unit vector is added to the sum where
//     y_{t-1} is unpacked for the pair dot. At D = 4096 bf16, 32 values per thread: 126 registers, 4 blocks of 4
//     warps per SM, ~2000 warp instructions a row step (bench/cuda_rows_static.py);
//   * a chunk in no segment takes a second copy of the row loop without the statistics (y and rstd only).
// Thread i holds columns of vectors j * blockDim.x + i (coalesced), V = 16 / sizeof(T) values per vector, NV
// vectors. Deterministic: fixed summation orders, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_helpers.cuh"  // to_float, warp_sum, fast_rsqrt, div_rn, cp_async*
#include "rmsnorm_angle_launch.h"

namespace gainrl {
namespace rmsnorm_angle {

constexpr float kMinSquaredNorm = 1e-24f;  // (1e-12)², the F.normalize clamp on the squared norm

// ------------------------------------------------------------------------------------------------ device helpers

// Two values of T in one register (one for fp32: a float2): pack = round both to T in one instruction on sm_80+
// (F2FP), unpack = back to fp32 (one shift or mask per value). Values are handled in pairs so that a rounding costs
// half an instruction and no byte shuffling.
template <typename T>
struct Pair;
template <>
struct Pair<float> {
  using type = float2;
  static __device__ __forceinline__ float2 unpack(float2 p) { return p; }
  static __device__ __forceinline__ float2 pack(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ float2 mul(float2 a, float2 b) { return make_float2(a.x * b.x, a.y * b.y); }
};
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 unpack(__half2 p) { return __half22float2(p); }
  static __device__ __forceinline__ __half2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ __half2 mul(__half2 a, __half2 b) { return __hmul2(a, b); }
};
// bf16 pairs as raw bits: unpacking is a shift (low value) and a mask (high value), one instruction each, where
// __bfloat1622float2 extracts and shifts each half (and the compiler re-joins halves after every pack)
template <>
struct Pair<__nv_bfloat16> {
  using type = unsigned;
  static __device__ __forceinline__ float bits_to_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static __device__ __forceinline__ float2 unpack(unsigned p) {
    return make_float2(bits_to_float(p << 16), bits_to_float(p & 0xffff0000u));
  }
  static __device__ __forceinline__ unsigned pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // a in the low half, one F2FP on sm_80+
    unsigned u;
    std::memcpy(&u, &h, 4);
    return u;
  }
  // both products rounded once to bf16 (one bf16x2 FMA with -0 on sm_80+): the product of two bf16 values is exact
  // in fp32, so this is round(float(a) * float(b)), what PyTorch's bf16 multiply gives
  static __device__ __forceinline__ unsigned mul(unsigned a, unsigned b) {
    __nv_bfloat162 ha, hb;
    std::memcpy(&ha, &a, 4);
    std::memcpy(&hb, &b, 4);
    const __nv_bfloat162 r = __hmul2(ha, hb);
    unsigned u;
    std::memcpy(&u, &r, 4);
    return u;
  }
};

// HF LlamaRMSNorm's y = round(w · round(x · rstd)) for one pair of values x (fp32): with a weight of x's dtype,
// packed (rms_pair_native: one packed multiply, exact before its rounding since the product of two values of T is
// exact in fp32), or fp32.
template <typename T>
__device__ __forceinline__ typename Pair<T>::type rms_pair_native(float2 x, float rstd, typename Pair<T>::type w) {
  return Pair<T>::mul(w, Pair<T>::pack(x.x * rstd, x.y * rstd));
}
template <typename T>
__device__ __forceinline__ typename Pair<T>::type rms_pair(float2 x, float rstd, float wx, float wy) {
  const float2 n = Pair<T>::unpack(Pair<T>::pack(x.x * rstd, x.y * rstd));
  return Pair<T>::pack(wx * n.x, wy * n.y);
}

// 16 bytes of T as P = 16 / sizeof(T) / 2 pairs: one vector load / store / cp.async.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int P = 8 / sizeof(T);
  typename Pair<T>::type p[P];
};

__device__ __forceinline__ float load_weight(const void* w, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(w)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(w)[i]);
    default: return static_cast<const float*>(w)[i];
  }
}

// Block sums of (a, b, c), the same in every thread: warp shuffles, then one barrier on slot red[buf] (double
// buffered: slot buf is written again two calls later, after the next call's barrier, by which time every thread has
// read it). Warps are summed in a fixed order. ONLY_C: a and b are 0 in every thread (not shuffled).
template <bool ONLY_C = false>
__device__ __forceinline__ float4 block_sum3(float a, float b, float c, float4 (*red)[kMaxThreads / 32], int& buf) {
  if constexpr (!ONLY_C) {
    a = warp_sum(a);
    b = warp_sum(b);
  }
  c = warp_sum(c);
#ifdef GAINRL_STATIC_WARPS  // bench/cuda_rows_static.py only: the loop's code for one known block size
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = GAINRL_STATIC_WARPS;
#else
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#endif
  if (lane == 0) red[buf][warp] = make_float4(a, b, c, 0.f);
  __syncthreads();
  float4 s = red[buf][0];
  for (int w = 1; w < n_warps; ++w) {
    const float4 p = red[buf][w];
    s.x += p.x;
    s.y += p.y;
    s.z += p.z;
  }
  buf ^= 1;
  return s;
}

// ------------------------------------------------------------------------------------------------ spans: no work list

// The indices a SPANS block follows (a kernel parameter: read from the constant bank, no registers held).
// cu [B + 1]; off [B, K + 1], or null: one segment [0, len_b) per sequence (K = 1); tok [n_packed] int32 / int64
// (tok64), or null: packed token i is row i. With tok, sequence b occupies rows [tok[cu[b]], tok[cu[b]] + len_b)
// (a padded batch: consecutive rows, gaps between sequences).
struct SpanIndex {
  const int* cu;
  const int* off;
  const void* tok;
  int64_t n_packed;
  int B, K, chunk;
  bool tok64;

  __device__ int64_t token_row(int64_t i) const {
    i = i < 0 ? 0 : (i >= n_packed ? n_packed - 1 : i);
    return tok64 ? static_cast<const int64_t*>(tok)[i] : static_cast<const int*>(tok)[i];
  }
  // First row of sequence b (0 <= b < B; any row for an empty one).
  __device__ int64_t first(int b) const { return tok == nullptr ? cu[b] : (n_packed > 0 ? token_row(cu[b]) : 0); }
  // One past the last row of sequences 0..b (monotone in b for validated indices; empty sequences end where the
  // last non-empty one before them ends, 0 if none).
  __device__ int64_t end(int b) const {
    if (tok == nullptr) return cu[b + 1];
    const int64_t c = cu[b + 1];
    return c >= 1 && n_packed > 0 ? token_row(c - 1) + 1 : 0;
  }
};

// Where row t lies, for a block that walks the fixed rows [blockIdx.x * chunk, ...) whatever the sequences and
// segments (SPANS below): sequence b (the first that ends past t, B past the last), the segment slot
// seg = b * K + k of the rows [first_b + o_k, first_b + o_{k+1}) (-1: rows in no segment, before first_b included),
// and `next`, the first row after t where either may change. Offsets are clamped to [0, len_b] and a row's segment
// is #{j : o_j <= t - first_b} - 1, so that unvalidated indices never address past the slots (validated ones:
// monotone cu_seqlens and offsets, the plain definition). Every thread holds the same cursor (uniform loads, no
// barrier).
struct SpanCursor {
  int b = 0, seg = -1;
  int64_t next = 0;

  // Forward from b, which is at or before t's sequence (rows are visited in increasing order).
  __device__ void at(int64_t t, const SpanIndex& ix) {
    while (b < ix.B && ix.end(b) <= t) ++b;
    seg = -1;
    if (b >= ix.B) {
      next = INT64_MAX;
      return;
    }
    const int64_t start = ix.first(b), c0 = ix.cu[b], c1 = ix.cu[b + 1];
    const int64_t len = c1 > c0 ? c1 - c0 : 0, p = t - start;
    if (p < 0) {  // in the gap before sequence b
      next = start;
      return;
    }
    int64_t nb = len;  // > p for validated indices (the sequence ends past t)
    int count = 0;
    for (int j = 0; j <= ix.K; ++j) {
      int64_t o = ix.off != nullptr ? ix.off[int64_t(b) * (ix.K + 1) + j] : (j == 0 ? 0 : len);
      o = o < 0 ? 0 : (o > len ? len : o);
      if (o <= p) {
        ++count;
      } else if (o < nb) {
        nb = o;
      }
    }
    if (count >= 1 && count <= ix.K) seg = b * ix.K + count - 1;
    next = start + nb > t ? start + nb : t + 1;  // unvalidated indices: still one row at a time, forward
  }

  // The cursor of row t from scratch: b = the first sequence ending past t. Up to kCountedSequences sequences the
  // warp counts the ends <= t (each lane cdiv(B, 32) independent loads, then a warp sum: one round of latency);
  // past that a 4-way search (3 independent loads a round, log4(B + 1) rounds). Every warp of the block runs it
  // whole (uniform control flow).
  static constexpr int kCountedSequences = 1024;
  __device__ void find(int64_t t, const SpanIndex& ix) {
    if (ix.B <= kCountedSequences) {
      float n = 0.f;  // exact: at most 1024
      const int lane = threadIdx.x & 31;
#pragma unroll 4
      for (int b0 = 0; b0 < ix.B; b0 += 32) {
        const int bb = b0 + lane;
        if (bb < ix.B && ix.end(bb) <= t) n += 1.f;
      }
      b = static_cast<int>(warp_sum(n));  // monotone ends: the first b with end(b) > t
      at(t, ix);
      return;
    }
    int lo = -1, hi = ix.B;  // end(lo) <= t < end(hi), end(-1) = -inf and end(B) = +inf
    while (hi - lo > 1) {
      int piv[3];
      bool le[3];
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        const int p = lo + static_cast<int>(int64_t(hi - lo) * (q + 1) / 4);
        piv[q] = p <= lo ? lo + 1 : (p >= hi ? hi - 1 : p);
      }
#pragma unroll
      for (int q = 0; q < 3; ++q) le[q] = ix.end(piv[q]) <= t;
      int nlo = lo, nhi = hi;
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        if (le[q] && piv[q] > nlo) nlo = piv[q];
        if (!le[q] && piv[q] < nhi) nhi = piv[q];
      }
      lo = nlo;
      hi = nhi;
    }
    b = hi;
    at(t, ix);
  }
};

// ------------------------------------------------------------------------------------------------ the rows kernel

// Block size bound of an instantiation: carried 32-value blocks 256 threads (see CARRY below), others kMaxThreads.
// WIDE: 32-value blocks 256 too (D <= 8192 needs no more), for the SPANS form with a weight not of x's dtype, whose
// cursor does not fit the 128 registers of kMaxThreads (4-24 bytes spilled at sm_80 and sm_90a; with a weight of
// x's dtype it fits, so those keep 4 blocks of 4 warps per SM at D = 4096).
template <typename T, int NV, bool CARRY, bool WIDE = false>
constexpr int max_block_threads() {
  return (CARRY || WIDE) && NV * 16 / sizeof(T) >= 32 ? 256 : kMaxThreads;
}

// One block per work item. Dynamic shared memory: the ring [S][blockDim.x * NV] of 16-byte vectors, then the weight
// [blockDim.x * NV * V]: fp32, or with W_NATIVE (16-bit x and a weight of the same dtype) in x's dtype, and then
// y = round(w * n) is one packed multiply per pair of values instead of an unpack, a multiply and a pack per value.
// CARRY: row i + 1's fp32 values stay in registers from step i's sum of squares to step i + 1 (one ring read and
// unpack per value fewer, 32 more registers at 32 values per thread: those blocks are bounded at 256 threads, i.e.
// 32 values x 256 = 8192 columns, so that ptxas may take ~160 registers: 3 blocks of 4 warps per SM at D = 4096).
// Launch bounds (block size bound, 1 block per SM): ptxas may take 65536 / max_block_threads registers (126 at 32
// values without carry, bf16, sm_90a: 4 blocks of 4 warps per SM at D = 4096). Without the minimum of 1 ptxas
// keeps ~100 (5 blocks) there but spills elsewhere; that was no faster on an H200 (session 17, commit 2eddb47).
//
// SPANS: no work list. Block i walks rows [i * chunk, (i + 1) * chunk) (and the row after, for its pair) across
// sequences and segments, following them with a SpanCursor found while the ring's first rows are on their way. Its
// partials are per piece (the block's rows of one segment), at slot i + (segment slot b * K + k): unique, since a
// later segment's pieces lie in the same or later blocks, and a segment's pieces are consecutive slots (the reduce
// finds them from cu_seqlens and the offsets alone). Rows in no segment take the statistics' loop too; their sums
// form pieces of slot -1, never written.
template <typename T, int NV, int S, bool CARRY, bool W_NATIVE, bool SPANS = false>
__global__ void __launch_bounds__(max_block_threads<T, NV, CARRY, SPANS && !W_NATIVE>(), 1)
    rows_kernel(const T* __restrict__ x, int64_t stride_r, const void* __restrict__ weight, DType w_dtype,
                T* __restrict__ y, float* __restrict__ rstd_out, const int* __restrict__ item_row0,
                const int* __restrict__ item_nrows, const int* __restrict__ item_seg,
                const int* __restrict__ item_pair_end, float* __restrict__ part_sum, float* __restrict__ part_q,
                float* __restrict__ part_adj, int64_t R, int D, float eps, const SpanIndex ix) {
  constexpr int V = 16 / sizeof(T);
  using Vec = Vec16<T>;
  using PairT = Pair<T>;
  constexpr int P = Vec::P;  // pairs per vector
#ifdef GAINRL_CUDA_EMULATOR
  unsigned char* smem = gainrl_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  __shared__ float4 red[2][kMaxThreads / 32];

  const int item = blockIdx.x;
  int64_t row0, load_end;  // rows read: the chunk's, then the next one when the chunk's last pair counts
  int nrows;
  bool stats;
  if constexpr (SPANS) {
    row0 = int64_t(item) * ix.chunk;
    nrows = R - row0 < ix.chunk ? static_cast<int>(R - row0) : ix.chunk;
    stats = true;
    load_end = row0 + nrows + 1;  // whether the last pair counts is the cursor's to say
  } else {
    nrows = item_nrows[item];
    row0 = item_row0[item];
    stats = item_seg[item] >= 0;
    load_end = row0 + nrows;
    if (stats && load_end < static_cast<int64_t>(item_pair_end[item])) ++load_end;
  }
  if (nrows <= 0) return;  // spare work item (block-uniform)
  if (load_end > R) load_end = R;
  const int n = static_cast<int>(load_end - row0);

  const int tid = threadIdx.x, threads = blockDim.x;
  const int n_vec = D / V;
  static_assert(!W_NATIVE || sizeof(T) == 2, "a native weight is a 16-bit one");
  Vec* ring = reinterpret_cast<Vec*>(smem);
  unsigned char* w_base = smem + static_cast<size_t>(S) * threads * NV * sizeof(Vec);
  float* w_s = reinterpret_cast<float*>(w_base);  // fp32 weight
  Vec* w_v = reinterpret_cast<Vec*>(w_base);      // W_NATIVE: the weight's own 16-byte vectors

  // this thread's weight columns (read back only by this thread: no barrier). A weight of x's dtype is copied
  // while the ring's first rows are on their way (a chunk of a few rows would otherwise wait for it before its
  // first copy); an fp32 or converted one before them (after them it spilled at sm_80)
  const auto load_weight_columns = [&]() {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = j * threads + tid;
      if constexpr (W_NATIVE) {
        Vec wv;
#pragma unroll
        for (int e = 0; e < P; ++e) wv.p[e] = PairT::pack(0.f, 0.f);  // columns past D: 0, as x there
        if (vi < n_vec) wv = static_cast<const Vec*>(weight)[vi];
        w_v[vi] = wv;
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          w_s[vi * V + e] = vi < n_vec ? load_weight(weight, w_dtype, int64_t(vi) * V + e) : 0.f;
      }
    }
  };
  if constexpr (!W_NATIVE) load_weight_columns();

  // This thread's vectors in a ring slot: mine + slot * slot_stride + j * threads. Vectors past D are never
  // copied into: they are zeroed once here, so ring reads need no bounds check (each thread reads only its own).
  Vec* const mine = ring + tid;
  const int slot_stride = threads * NV;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (j * threads + tid >= n_vec) {
      Vec z;
#pragma unroll
      for (int e = 0; e < P; ++e) z.p[e] = PairT::pack(0.f, 0.f);
#pragma unroll
      for (int k = 0; k < S; ++k) mine[k * slot_stride + j * threads] = z;
    }
  }
  // issue(i, slot): copy this thread's vectors of row i (if i < n) into ring slot `slot` (= i % S) and commit one
  // group either way, so that group g always holds row g. x_next: row i's first element for this thread.
  const T* x_next = x + row0 * stride_r + int64_t(tid) * V;
  const auto issue = [&](int i, int slot) {
    if (i < n) {
      Vec* dst = mine + slot * slot_stride;
#pragma unroll
      for (int j = 0; j < NV; ++j)
        if (j * threads + tid < n_vec) cp_async16(dst + j * threads, x_next + int64_t(j) * threads * V);
      x_next += stride_r;
    }
    cp_async_commit();
  };
  // x of the row in ring slot `slot` as fp32 pairs (0 past D)
  const auto load_row = [&](int slot, float2 (&v)[NV][P]) {
    const Vec* src = mine + slot * slot_stride;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const Vec p = src[j * threads];
#pragma unroll
      for (int e = 0; e < P; ++e) v[j][e] = PairT::unpack(p.p[e]);
    }
  };
  const auto sum_squares = [&](const float2 (&v)[NV][P]) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int e = 0; e < P; ++e) s = fmaf(v[j][e].y, v[j][e].y, fmaf(v[j][e].x, v[j][e].x, s));
    return s;
  };

#pragma unroll
  for (int i = 0; i < S; ++i) issue(i, i);
  if constexpr (W_NATIVE) load_weight_columns();
  SpanCursor cur;
  // SPANS: the step at which the cursor moves next (an int compare a row, not an int64 one)
  [[maybe_unused]] int i_next = 0;
  const auto steps_to = [&](int64_t row) { return row - row0 < n ? static_cast<int>(row - row0) : n; };
  if constexpr (SPANS) {
    cur.find(row0, ix);  // its loads wait while the ring's first rows are on their way
    i_next = steps_to(cur.next);
  }

  int buf = 0;
  float2 xv[NV][P];

  // rstd of row 0; afterwards step i computes row i + 1's inside its one reduction
  cp_async_wait<S - 1>();
  load_row(0, xv);
  int slot = 0;  // ring slot of row i
  T* y_row = y + row0 * int64_t(D) + int64_t(tid) * V;
  float rstd = fast_rsqrt(div_rn(block_sum3<true>(0.f, 0.f, sum_squares(xv), red, buf).z, float(D)) + eps);

  // The row loop, compiled twice: with the statistics (a chunk inside a segment) and without them (a chunk in no
  // segment: y and rstd only, the bare RMSNorm's work, one value in the block reduction). The accumulators live in
  // the loop's scope, so the copy without statistics holds none of them.
  const auto walk = [&](auto with_stats) {
    constexpr bool ST = decltype(with_stats)::value;
    float2 acc[NV][P];  // Σ y_t / ‖y_t‖ over the chunk's rows, this thread's columns
    Vec y_prev[NV];     // y_{t-1} as stored
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int e = 0; e < P; ++e) {
        acc[j][e] = make_float2(0.f, 0.f);
        y_prev[j].p[e] = PairT::pack(0.f, 0.f);
      }
    float inv_prev = 0.f, q = 0.f, adj = 0.f;
    // SPANS: segment slots of row t - 1 and of the piece being summed (-1: none)
    [[maybe_unused]] int seg_prev = -1, piece = -1;
    [[maybe_unused]] const auto write_partial = [&](int64_t at) {
      float* out = part_sum + at * D;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int vi = j * threads + tid;
        if (vi < n_vec) {
#pragma unroll
          for (int e = 0; e < P; e += 2)
            *reinterpret_cast<float4*>(out + int64_t(vi) * V + 2 * e) =
                make_float4(acc[j][e].x, acc[j][e].y, acc[j][e + 1].x, acc[j][e + 1].y);
        }
      }
      if (tid == 0) {
        part_q[at] = q;
        part_adj[at] = adj;
      }
    };
    for (int i = 0; i < n; ++i) {
      const bool own = i < nrows;  // else the row after the chunk: its pair with the chunk's last row only
      const int slot_next = slot + 1 == S ? 0 : slot + 1;
      // SPANS: rows i - 1 and i in one sequence (or both in none). Rows in no segment need no masks: their sums go
      // to a piece of slot -1, dropped when the next piece starts; only a pair may straddle two pieces.
      [[maybe_unused]] bool same_seq = true;
      if constexpr (SPANS) {
        if (i >= i_next) {
          const int b_prev = cur.b;
          cur.at(row0 + i, ix);
          i_next = steps_to(cur.next);
          same_seq = cur.b == b_prev;
        }
      }
      if constexpr (!CARRY) load_row(slot, xv);  // else xv holds row i since the previous step's sum of squares
      Vec yv[NV];
      float nn = 0.f, dot = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int vi = j * threads + tid;
        [[maybe_unused]] const float4* wj = reinterpret_cast<const float4*>(w_s + vi * V);  // fp32 weight
        [[maybe_unused]] Vec wn;                                                              // W_NATIVE
        if constexpr (W_NATIVE) wn = w_v[vi];
#pragma unroll
        for (int e = 0; e < P; e += 2) {  // two pairs per float4 of fp32 weights
          if constexpr (W_NATIVE) {
#pragma unroll
            for (int k = 0; k < 2; ++k) yv[j].p[e + k] = rms_pair_native<T>(xv[j][e + k], rstd, wn.p[e + k]);
          } else {
            const float4 w4 = wj[e / 2];
            yv[j].p[e] = rms_pair<T>(xv[j][e], rstd, w4.x, w4.y);
            yv[j].p[e + 1] = rms_pair<T>(xv[j][e + 1], rstd, w4.z, w4.w);
          }
          if constexpr (ST) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const float2 f = PairT::unpack(yv[j].p[e + k]);
              const float2 g = PairT::unpack(y_prev[j].p[e + k]);
              nn = fmaf(f.y, f.y, fmaf(f.x, f.x, nn));
              dot = fmaf(f.y, g.y, fmaf(f.x, g.x, dot));
              // row i - 1's unit vector, added here where y_{i-1} is unpacked anyway (row i - 1 is always one of the
              // chunk's own rows; at i = 0 both factors are 0)
              acc[j][e + k] =
                  make_float2(fmaf(g.x, inv_prev, acc[j][e + k].x), fmaf(g.y, inv_prev, acc[j][e + k].y));
            }
          }
        }
      }
      if (own) {
#pragma unroll
        for (int j = 0; j < NV; ++j)
          if (j * threads + tid < n_vec) *reinterpret_cast<Vec*>(y_row + int64_t(j) * threads * V) = yv[j];
        if (tid == 0) rstd_out[row0 + i] = rstd;
      }
      if constexpr (SPANS && ST) {
        if (own && cur.seg != piece) {  // row i starts a piece: the last one's sums are complete (row i - 1 added)
          if (piece >= 0) write_partial(item + piece);
#pragma unroll
          for (int j = 0; j < NV; ++j)
#pragma unroll
            for (int e = 0; e < P; ++e) acc[j][e] = make_float2(0.f, 0.f);
          q = adj = 0.f;
          piece = cur.seg;
        }
      }
      y_row += D;
      // row i + 1 (committed groups: S + i; groups 0 .. i + 1 done leaves S - 2 pending)
      float ss = 0.f;
      cp_async_wait<S - 2>();
      if (i + 1 < n) {
        load_row(slot_next, xv);
        ss = sum_squares(xv);
      }
      const float4 s = block_sum3<!ST>(nn, dot, ss, red, buf);
      issue(i + S, slot);  // into row i's slot: every thread read its own vectors of row i before the barrier
      slot = slot_next;
      rstd = fast_rsqrt(div_rn(s.z, float(D)) + eps);
      if constexpr (ST) {
        const float inv = fast_rsqrt(fmaxf(s.x, kMinSquaredNorm));
        if constexpr (SPANS) {
          // a pair counts inside one sequence's segments [o_0, o_K); it goes to the piece being summed, which is
          // of the same sequence (row i's, or row i - 1's for the row after the chunk)
          if (own) q += s.x * inv * inv;
          if (seg_prev >= 0 && cur.seg >= 0 && same_seq) adj += s.y * inv_prev * inv;
          seg_prev = cur.seg;
        } else {
          if (own) q += s.x * inv * inv;
          adj += s.y * inv_prev * inv;
        }
#pragma unroll
        for (int j = 0; j < NV; ++j) y_prev[j] = yv[j];
        inv_prev = inv;
      }
    }
    if constexpr (ST) {  // the chunk's partials
      if (n == nrows) {  // the last row read is the chunk's own: its unit vector is still to add
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int e = 0; e < P; ++e) {
            const float2 g = PairT::unpack(y_prev[j].p[e]);
            acc[j][e] = make_float2(fmaf(g.x, inv_prev, acc[j][e].x), fmaf(g.y, inv_prev, acc[j][e].y));
          }
      }
      if constexpr (SPANS) {
        if (piece >= 0) write_partial(item + piece);
      } else {
        write_partial(item);
      }
    }
  };
  if constexpr (SPANS) {
    walk(std::true_type{});
  } else if (stats) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
  cp_async_wait<0>();  // no copy may outlive the block
}

// ------------------------------------------------------------------------------------------------ host launcher

constexpr int kMaxDevices = 64;  // devices whose shared-memory opt-in is remembered (others: set every launch)

template <typename T, int NV, int S, bool W_NATIVE>
inline size_t smem_bytes(unsigned threads) {
  return size_t(S) * threads * NV * 16 + size_t(threads) * NV * (W_NATIVE ? 16 : (16 / sizeof(T)) * sizeof(float));
}

template <typename T, int NV, int S, bool CARRY, bool W_NATIVE, bool SPANS>
inline cudaError_t launch_rows(const Args& a, DType w_dtype, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t n_vec = a.D / V;
  const int64_t need = (n_vec + NV - 1) / NV;
  const unsigned threads = static_cast<unsigned>(need <= 32 ? 32 : (need + 31) / 32 * 32);
  if (threads > unsigned(max_block_threads<T, NV, CARRY, SPANS && !W_NATIVE>())) return cudaErrorInvalidValue;
  const size_t smem = smem_bytes<T, NV, S, W_NATIVE>(threads);
  auto* kernel = &rows_kernel<T, NV, S, CARRY, W_NATIVE, SPANS>;
  const auto blocks = static_cast<unsigned>(SPANS ? span_blocks(a) : a.grid);
  const SpanIndex ix{a.cu_seqlens, a.seg_offsets, a.token_index, a.n_packed, static_cast<int>(a.B), a.K,
                     static_cast<int>(a.chunk), a.token_index_64};
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
  const int D = static_cast<int>(a.D);
#ifdef GAINRL_CUDA_EMULATOR
  (void)stream;
  gainrl_emu::launch_smem(smem, kernel, dim3(blocks), dim3(threads), x, a.stride_r, a.weight, w_dtype, y, a.rstd,
                          a.item_row0, a.item_nrows, a.item_seg, a.item_pair_end, a.part_sum, a.part_q, a.part_adj,
                          a.R, D, a.eps, ix);
  return cudaSuccess;
#else
  // Opt in to this much dynamic shared memory, once per device and size (then graph-capture safe), whatever the
  // size: the 48 KB a launch gets without it bound static and dynamic memory together, and the reduction slots are
  // static (ring and weight of exactly 48 KB, D = 8192 on 2 stages, failed without it).
  {
    static std::atomic<size_t> granted[kMaxDevices];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev >= kMaxDevices || granted[dev].load() < smem) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
      if (dev < kMaxDevices) granted[dev].store(smem);  // a race only repeats the call
    }
  }
  kernel<<<dim3(blocks), dim3(threads), smem, stream>>>(
      x, a.stride_r, a.weight, w_dtype, y, a.rstd, a.item_row0, a.item_nrows, a.item_seg, a.item_pair_end,
      a.part_sum, a.part_q, a.part_adj, a.R, D, a.eps, ix);
  return cudaGetLastError();
#endif
}

template <typename T, int NV, bool CARRY, bool W_NATIVE, bool SPANS>
inline cudaError_t dispatch_stages(const Args& a, DType w_dtype, cudaStream_t stream) {
  switch (a.stages) {
    case 2: return launch_rows<T, NV, 2, CARRY, W_NATIVE, SPANS>(a, w_dtype, stream);
    case 3: return launch_rows<T, NV, 3, CARRY, W_NATIVE, SPANS>(a, w_dtype, stream);
    default: return launch_rows<T, NV, 4, CARRY, W_NATIVE, SPANS>(a, w_dtype, stream);
  }
}

template <typename T, int NV, bool CARRY, bool SPANS>
inline cudaError_t dispatch_weight(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (w_dtype == x_dtype) return dispatch_stages<T, NV, CARRY, true, SPANS>(a, w_dtype, stream);
  }
  (void)x_dtype;
  return dispatch_stages<T, NV, CARRY, false, SPANS>(a, w_dtype, stream);
}

template <typename T, bool SPANS>
inline cudaError_t dispatch_values(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if constexpr (sizeof(T) == 2) {
    if (a.values_per_thread == 32) {
      return a.carry ? dispatch_weight<T, 32 / V, true, SPANS>(a, x_dtype, w_dtype, stream)
                     : dispatch_weight<T, 32 / V, false, SPANS>(a, x_dtype, w_dtype, stream);
    }
  }
  // 16 (16-bit) or 8 (fp32) values per thread: the row is carried in registers either way
  return dispatch_weight<T, sizeof(T) == 2 ? 16 / V : 2, true, SPANS>(a, x_dtype, w_dtype, stream);
}

// Enqueues the kernel (nothing when a.grid == 0); no synchronisation, no exceptions.
inline cudaError_t launch_rmsnorm_angle_rows(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) {
  if (!supported(a, x_dtype, w_dtype)) return cudaErrorInvalidValue;
  if (a.grid <= 0) return cudaSuccess;
  switch (x_dtype) {  // spans: 16-bit rows only (supported())
    case DType::kFloat16:
      return a.spans ? dispatch_values<__half, true>(a, x_dtype, w_dtype, stream)
                     : dispatch_values<__half, false>(a, x_dtype, w_dtype, stream);
    case DType::kBFloat16:
      return a.spans ? dispatch_values<__nv_bfloat16, true>(a, x_dtype, w_dtype, stream)
                     : dispatch_values<__nv_bfloat16, false>(a, x_dtype, w_dtype, stream);
    default: return dispatch_values<float, false>(a, x_dtype, w_dtype, stream);
  }
}

}  // namespace rmsnorm_angle
}  // namespace gainrl
