// Host-side interface of the hand-written CUDA forward of the fused RMSNorm + angle statistics (the rows kernel of
// csrc/rmsnorm_angle_kernels.cuh): plain C++, no CUDA device syntax, no torch, so that both compilers include it:
//   * g++:  csrc/rmsnorm_angle_cuda_binding.cpp (argument checks, stream, registration of the torch op);
//   * nvcc: csrc/rmsnorm_angle_kernels.cuh and csrc/rmsnorm_angle_cuda.cu (defines launch() below).
// Nothing declared here throws (see csrc/angle_stats_launch.h for why the split).
//
// The kernel replaces the Triton _fwd_rows_kernel of gainrl_kernels/rmsnorm_angle_forward_kernels.py for a work
// list built by that module's plan kernel: one block per work item (a chunk of consecutive rows, inside one segment
// or outside all), the same outputs (y, rstd, one fp32 partial row + two scalars per segment chunk), reduced by the
// same Triton reduce kernel. Its spans form (Args::spans) needs no work list: block i takes rows
// [i chunk, (i + 1) chunk) and follows cu_seqlens and seg_offsets itself; that module's _reduce_spans_kernel sums
// its per-piece partials.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace gainrl {
namespace rmsnorm_angle {

using ::gainrl::DType;  // csrc/dtype.h
using ::gainrl::element_size;

constexpr int kMaxDim = 8192;     // widest row (elements) the kernel holds: every thread keeps its columns
constexpr int kMaxThreads = 512;  // block size bound (kMaxDim / 16 values per thread)

struct Args {
  const void* x;       // [R, D] element type x_dtype, unit column stride, 16-byte aligned rows
  int64_t stride_r;    // row stride of x in elements
  const void* weight;  // [D] element type w_dtype, contiguous
  void* y;             // [R, D] contiguous, x_dtype
  float* rstd;         // [R]
  // work list [grid] int32 (_plan_kernel, gainrl_kernels/rmsnorm_angle_forward_kernels.py): first row, rows (0:
  // spare item), segment slot (-1: rows in no segment, no statistics), pairs (t, t+1) counted while t + 1 < pair_end
  const int* item_row0;
  const int* item_nrows;
  const int* item_seg;
  const int* item_pair_end;
  int64_t grid;
  // per item with statistics: part_sum [grid, D] f32, part_q [grid], part_adj [grid]
  float* part_sum;
  float* part_q;
  float* part_adj;
  int64_t R, D;
  float eps;
  int values_per_thread;  // 16 or 32 (columns each thread holds in 16-bit rows; fp32 rows: 8)
  int stages;             // rows in the shared-memory ring: 2, 3 or 4 (stages - 1 rows loaded ahead)
  bool carry;             // 32 values per thread: keep the next row's fp32 values in registers (at most 8192 columns)
  // spans: no work list (item_* unused). Block i takes rows [i * chunk, (i + 1) * chunk) and finds their sequences
  // and segments in cu_seqlens [B + 1], seg_offsets [B, K + 1] (null: K = 1, the whole sequence) and token_index
  // [n_packed] int32 or int64 (null: packed token i is row i; else sequence b's rows start at
  // token_index[cu_seqlens[b]]); its partials go to slots i + b * K + k, so `grid` is the slot count
  // cdiv(R, chunk) + B * K. 16-bit rows only.
  bool spans = false;
  const int* cu_seqlens = nullptr;
  const int* seg_offsets = nullptr;
  const void* token_index = nullptr;
  bool token_index_64 = false;
  int64_t n_packed = 0;
  int64_t B = 0;
  int K = 1;
  int64_t chunk = 1;
};

// Blocks of a spans launch: cdiv(R, chunk).
inline int64_t span_blocks(const Args& a) { return a.chunk > 0 ? (a.R + a.chunk - 1) / a.chunk : 0; }

// Columns each thread holds: fp32 rows always 8 (more spill), 16-bit rows values_per_thread.
inline int values_per_thread(DType x_dtype, int requested) { return x_dtype == DType::kFloat32 ? 8 : requested; }

// Widest row: kMaxThreads threads of values_per_thread columns, at most kMaxDim (fp32: 4096).
inline int64_t max_dim(DType x_dtype, int requested) {
  const int64_t d = int64_t(kMaxThreads) * values_per_thread(x_dtype, requested);
  return d < kMaxDim ? d : kMaxDim;
}

// A spans launch: 16-bit rows, cu_seqlens given, B >= 1, 1 <= K < 2^31 / B, 1 <= chunk < 2^31, and the slots
// cdiv(R, chunk) + B * K in `grid`.
inline bool spans_supported(const Args& a, DType x_dtype) {
  return x_dtype != DType::kFloat32 && a.cu_seqlens != nullptr && a.B >= 1 && a.K >= 1 &&
         a.B * int64_t(a.K) < (int64_t(1) << 31) && a.chunk >= 1 && a.chunk < (int64_t(1) << 31) &&
         (a.seg_offsets != nullptr || a.K == 1) && a.grid == span_blocks(a) + a.B * a.K;
}

// Whether the kernel takes these rows: unit column stride is the caller's; D a multiple of the 16-byte vector,
// 16-byte aligned x / y rows and weight, D <= max_dim, a known tuning.
inline bool supported(const Args& a, DType x_dtype, DType w_dtype) {
  const int vec = 16 / element_size(x_dtype);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.D > 0 && a.D <= max_dim(x_dtype, a.values_per_thread) && a.D % vec == 0 &&
         (a.stride_r * element_size(x_dtype)) % 16 == 0 &&
         aligned(a.x) && aligned(a.y) && aligned(a.weight) && (a.D * element_size(w_dtype)) % 16 == 0 &&
         (a.values_per_thread == 16 || a.values_per_thread == 32) && a.stages >= 2 && a.stages <= 4 &&
         (!a.spans || spans_supported(a, x_dtype));
}

// Enqueues the rows kernel on `stream` and returns cudaGetLastError() (cudaErrorInvalidValue, launching nothing,
// when !supported). Never throws, never synchronises (CUDA-graph safe). Defined in csrc/rmsnorm_angle_cuda.cu.
cudaError_t launch(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) noexcept;

}  // namespace rmsnorm_angle
}  // namespace gainrl
