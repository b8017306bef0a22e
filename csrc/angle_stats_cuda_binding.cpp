// Torch binding of the CUDA torch.ops.gainrl.angle_stats_ext (schema defined in csrc/angle_stats_cpu.cpp):
//   angle_stats_ext(Tensor hidden, Tensor cu_seqlens, Tensor seg_offsets) -> (unit_sum, count, sq_norm, adjacent)
//   hidden [T, D] fp32/fp16/bf16 CUDA, any strides; cu_seqlens [B+1] int32; seg_offsets [B, K+1] int32
//   -> unit_sum [B, K, D] f32, count [B, K] i32, sq_norm [B, K] f32, adjacent [B] f32.
//
// Host code only, compiled by g++ (never nvcc), and only in the CUDA build: setup.py adds csrc/*_cuda*.cpp to the
// CUDAExtension alone (this file includes c10/cuda headers and cuda_runtime_api.h). It checks the arguments
// (TORCH_CHECK), allocates outputs and workspace with the caching allocator, sets the device (CUDAGuard), takes
// the current stream and calls gainrl::angle_stats::launch (csrc/angle_stats_launch.h), the plain, non-throwing
// launcher defined in the nvcc-compiled csrc/angle_stats_cuda.cu; its cudaError_t is turned into an exception here
// with C10_CUDA_CHECK. All exceptions are thrown from g++-compiled code (the flash-attention layout: a c10::Error
// thrown from nvcc-compiled host code crashed the process on a real GPU). No host synchronisation, so the op works
// under CUDA graph capture. The kernels and the work decomposition are described in csrc/angle_stats_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>

#include "angle_stats_launch.h"
#include "check.h"

namespace {

namespace as = gainrl::angle_stats;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> angle_stats_cuda(const at::Tensor& hidden_in,
                                                                             const at::Tensor& cu_seqlens_in,
                                                                             const at::Tensor& seg_offsets_in) {
  GAINRL_CHECK(hidden_in.dim() == 2, "hidden: expected [T, D], got " + std::to_string(hidden_in.dim()) + " dims");
  TORCH_CHECK(seg_offsets_in.dim() == 2 && seg_offsets_in.size(1) >= 1, "seg_offsets: expected [B, K+1]");
  TORCH_CHECK(cu_seqlens_in.dim() == 1 && cu_seqlens_in.size(0) == seg_offsets_in.size(0) + 1,
              "cu_seqlens: expected [B+1] with B = seg_offsets.size(0)");
  TORCH_CHECK(cu_seqlens_in.scalar_type() == at::kInt && seg_offsets_in.scalar_type() == at::kInt,
              "cu_seqlens, seg_offsets: expected int32");
  TORCH_CHECK(hidden_in.is_cuda() && cu_seqlens_in.device() == hidden_in.device() &&
                  seg_offsets_in.device() == hidden_in.device(),
              "hidden, cu_seqlens, seg_offsets: expected tensors on the same CUDA device");
  const as::DType dt = gainrl::dtype_of(hidden_in, "hidden");

  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const int64_t T = hidden_in.size(0), D = hidden_in.size(1);
  const int64_t B = seg_offsets_in.size(0), K = seg_offsets_in.size(1) - 1, BK = B * K;
  const auto f32 = hidden_in.options().dtype(at::kFloat);
  const auto i32 = hidden_in.options().dtype(at::kInt);
  at::Tensor unit_sum = at::empty({B, K, D}, f32);
  at::Tensor count = at::empty({B, K}, i32);
  at::Tensor sq_norm = at::empty({B, K}, f32);
  at::Tensor adjacent = K == 0 ? at::zeros({B}, f32) : at::empty({B}, f32);
  if (BK == 0) return {unit_sum, count, sq_norm, adjacent};

  const int64_t mc = as::max_chunks(T, BK);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(mc < kIntMax && T < kIntMax && D < kIntMax, "angle_stats (cuda): too many tokens or segments");

  at::Tensor hidden = hidden_in;
  as::Args a{};
  a.hidden = hidden.data_ptr();
  a.T = T;
  a.D = D;
  a.stride_t = hidden.stride(0);
  a.stride_d = hidden.stride(1);
  bool vec = as::vectorizable(a, dt);
  if (D > as::max_supported_dim(dt, vec) && !vec) {  // wide rows: the 16-byte path covers more columns
    // a fresh allocation: contiguous() would return a misaligned view (storage offset, [1, D] with any row stride)
    hidden = hidden_in.clone(at::MemoryFormat::Contiguous);
    a.hidden = hidden.data_ptr();
    a.stride_t = hidden.stride(0);
    a.stride_d = hidden.stride(1);
    vec = as::vectorizable(a, dt);
  }
  GAINRL_CHECK(D <= as::max_supported_dim(dt, vec),
               "angle_stats (cuda): D = " + std::to_string(D) + " exceeds the supported " +
                   std::to_string(as::max_supported_dim(dt, vec)) +
                   " for this dtype/layout; use backend='triton' or 'torch'");

  const at::Tensor cu = cu_seqlens_in.contiguous();
  const at::Tensor off = seg_offsets_in.contiguous();
  at::Tensor chunk_start = at::empty({BK + 1}, i32);
  at::Tensor part_sum = at::empty({mc * D}, f32);
  at::Tensor part_scalars = at::empty({2, mc}, f32);

  a.cu_seqlens = cu.data_ptr<int>();
  a.seg_offsets = off.data_ptr<int>();
  a.B = B;
  a.K = K;
  a.unit_sum = unit_sum.data_ptr<float>();
  a.count = count.data_ptr<int>();
  a.sq_norm = sq_norm.data_ptr<float>();
  a.adjacent = adjacent.data_ptr<float>();
  a.chunk_start = chunk_start.data_ptr<int>();
  a.part_sum = part_sum.data_ptr<float>();
  a.part_sq = part_scalars.data_ptr<float>();
  a.part_adj = a.part_sq + mc;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  C10_CUDA_CHECK(as::launch(a, dt, stream));  // nvcc side: never throws, returns cudaGetLastError()
  return {unit_sum, count, sq_norm, adjacent};
}

}  // namespace

TORCH_LIBRARY_IMPL(gainrl, CUDA, m) { m.impl("angle_stats_ext", &angle_stats_cuda); }
