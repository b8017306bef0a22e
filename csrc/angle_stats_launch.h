// Host-side interface of the hand-written CUDA angle_stats kernels: plain C++ (no CUDA device syntax, no torch), so
// both compilers can include it:
//   * g++:  csrc/angle_stats_cuda_binding.cpp (the torch binding: checks, allocation, stream, registration);
//   * nvcc: csrc/angle_stats_kernels.cuh (device code + the inline launcher) and csrc/angle_stats_cuda.cu (defines
//           launch() below).
// Only needs cuda_runtime_api.h (cudaStream_t, cudaError_t) from the CUDA toolkit.
//
// Why the split: a C++ exception (TORCH_CHECK -> c10::Error) thrown from host code compiled by nvcc crashed the
// process on a real GPU (torch 2.11 + CUDA 13). Like flash-attention, every throwing line lives in the
// g++-compiled binding; the .cu only returns a cudaError_t. Nothing declared here throws.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace gainrl {
namespace angle_stats {

constexpr int kChunkRows = 64;    // rows per chunk (work item of chunk_kernel)
constexpr int kMaxThreads = 512;  // chunk_kernel block size limit; launch bounds (512, 2) for NT <= 2 cap the
                                  // registers at 64 (two blocks per SM), (512, 1) for NT >= 4 at 128

using ::gainrl::DType;  // csrc/dtype.h
using ::gainrl::element_size;

// Upper bound on the number of chunks: Σ_s cdiv(n_s, C) <= Σ_s (n_s / C + 1) <= T / C + B*K.
inline int64_t max_chunks(int64_t T, int64_t BK) { return (T + kChunkRows - 1) / kChunkRows + BK; }

struct Args {
  const void* hidden;  // [T, D] element type `dtype`
  int64_t T, D, stride_t, stride_d;
  const int* cu_seqlens;   // [B+1] device
  const int* seg_offsets;  // [B, K+1] device, contiguous
  int64_t B, K;
  // outputs (device): unit_sum [B*K*D], count [B*K], sq_norm [B*K], adjacent [B]
  float* unit_sum;
  int* count;
  float* sq_norm;
  float* adjacent;
  // workspace (device): chunk_start [B*K+1], part_sum [max_chunks*D], part_sq / part_adj [max_chunks]
  int* chunk_start;
  float* part_sum;
  float* part_sq;
  float* part_adj;
};

// The fast path needs unit column stride, 16-byte aligned rows and D a multiple of the vector width.
inline bool vectorizable(const Args& a, DType dt) {
  const int es = element_size(dt), vec = 16 / es;
  return (a.stride_d == 1 || a.D <= 1) && a.D % vec == 0 && reinterpret_cast<uintptr_t>(a.hidden) % 16 == 0 &&
         (a.stride_t * es) % 16 == 0;
}

// Loads per thread per row: vectorized NT in {1, 2, 4} (and 8 for fp32), strided 16.
inline int max_supported_dim(DType dt, bool vectorized) {
  if (!vectorized) return kMaxThreads * 16;
  return dt == DType::kFloat32 ? kMaxThreads * 8 * 4 : kMaxThreads * 4 * 8;
}

// Enqueues the three kernels on `stream` and returns cudaGetLastError() (cudaErrorInvalidValue, launching nothing,
// when D exceeds max_supported_dim). Never throws, never synchronises. Defined in csrc/angle_stats_cuda.cu (a thin
// wrapper around the inline launch_angle_stats of csrc/angle_stats_kernels.cuh). Preconditions, checked by the
// caller: outputs and workspace sized as in Args, `adjacent` zero-filled when K == 0 (then nothing is launched),
// T and max_chunks(T, B*K) < 2^31, all pointers on the current device of `stream`.
cudaError_t launch(const Args& a, DType dt, cudaStream_t stream) noexcept;

}  // namespace angle_stats
}  // namespace gainrl
