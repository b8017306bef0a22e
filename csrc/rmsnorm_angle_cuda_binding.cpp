// Torch binding of the CUDA rows kernel of the fused RMSNorm + angle forward (csrc/rmsnorm_angle_kernels.cuh):
//   rmsnorm_angle_rows_ext(x, weight, y!, rstd!, item_row0, item_nrows, item_seg, item_pair_end, part_sum!, part_q!,
//                          part_adj!, eps, values_per_thread, stages, carry) -> ()
// fills the outputs the Triton _fwd_rows_kernel of gainrl_kernels/rmsnorm_angle.py fills, for the work list of its
// plan kernel (that module allocates everything and reduces the partials). x [R, D] fp32 / fp16 / bf16 CUDA with
// unit column stride and 16-byte aligned rows, D a multiple of 16 bytes and at most 8192 (fp32: 4096); weight [D]
// contiguous.
//
// g++ only, CUDA build only (setup.py: *_cuda*.cpp). Every check and exception lives here; the nvcc-compiled
// csrc/rmsnorm_angle_cuda.cu only returns a cudaError_t (see csrc/angle_stats_cuda_binding.cpp for why). No host
// synchronisation: the op is CUDA-graph safe.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "check.h"
#include "rmsnorm_angle_launch.h"

namespace {

namespace ra = gainrl::rmsnorm_angle;

// `t` on x's device, contiguous with `numel` elements and, where `dtype` is given, of that dtype.
void check_on(const at::Tensor& t, const at::Tensor& x, const char* name, std::optional<at::ScalarType> dtype,
              int64_t numel) {
  GAINRL_CHECK(t.device() == x.device(), std::string(name) + ": expected a tensor on x's device");
  GAINRL_CHECK(!dtype || t.scalar_type() == *dtype, std::string(name) + ": expected dtype " +
                                                        c10::toString(dtype.value_or(t.scalar_type())) + ", got " +
                                                        c10::toString(t.scalar_type()));
  GAINRL_CHECK(t.is_contiguous() && t.numel() == numel,
               std::string(name) + ": expected a contiguous tensor of " + std::to_string(numel) + " elements, got " +
                   std::to_string(t.numel()));
}

void rmsnorm_angle_rows_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& rstd,
                             const at::Tensor& item_row0, const at::Tensor& item_nrows, const at::Tensor& item_seg,
                             const at::Tensor& item_pair_end, at::Tensor& part_sum, at::Tensor& part_q,
                             at::Tensor& part_adj, double eps, int64_t values_per_thread, int64_t stages,
                             bool carry) {
  GAINRL_CHECK(x.is_cuda() && x.dim() == 2, "x: expected a 2-D [R, D] CUDA tensor, got " + std::to_string(x.dim()) +
                                                " dims on " + x.device().str());
  GAINRL_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x: expected unit column stride");
  const int64_t R = x.size(0), D = x.size(1), grid = item_row0.numel();
  const ra::DType xt = gainrl::dtype_of(x, "x");
  const ra::DType wt = gainrl::dtype_of(weight, "weight");
  check_on(weight, x, "weight", std::nullopt, D);  // any of the three dtypes: dtype_of above
  check_on(y, x, "y", x.scalar_type(), R * D);
  check_on(rstd, x, "rstd", at::kFloat, R);
  check_on(item_row0, x, "item_row0", at::kInt, grid);
  check_on(item_nrows, x, "item_nrows", at::kInt, grid);
  check_on(item_seg, x, "item_seg", at::kInt, grid);
  check_on(item_pair_end, x, "item_pair_end", at::kInt, grid);
  check_on(part_sum, x, "part_sum", at::kFloat, grid * D);
  check_on(part_q, x, "part_q", at::kFloat, grid);
  check_on(part_adj, x, "part_adj", at::kFloat, grid);
  GAINRL_CHECK(grid < (int64_t(1) << 31), "item_row0: more than 2^31 work items");

  ra::Args a{};
  a.x = x.data_ptr();
  a.stride_r = x.stride(0);
  a.weight = weight.data_ptr();
  a.y = y.data_ptr();
  a.rstd = rstd.data_ptr<float>();
  a.item_row0 = item_row0.data_ptr<int>();
  a.item_nrows = item_nrows.data_ptr<int>();
  a.item_seg = item_seg.data_ptr<int>();
  a.item_pair_end = item_pair_end.data_ptr<int>();
  a.grid = grid;
  a.part_sum = part_sum.data_ptr<float>();
  a.part_q = part_q.data_ptr<float>();
  a.part_adj = part_adj.data_ptr<float>();
  a.R = R;
  a.D = D;
  a.eps = static_cast<float>(eps);
  a.values_per_thread = static_cast<int>(values_per_thread);
  a.stages = static_cast<int>(stages);
  a.carry = carry;
  GAINRL_CHECK(ra::supported(a, xt, wt),
               "rmsnorm_angle_rows_ext: unsupported rows (D = " + std::to_string(D) +
                   ": needs D a multiple of 16 bytes, D <= " +
                   std::to_string(ra::max_dim(xt, static_cast<int>(values_per_thread))) +
                   ", 16-byte aligned x, y and weight, values_per_thread 16 or 32, stages 2 to 4)");
  if (grid == 0 || R == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(ra::launch(a, xt, wt, stream));  // nvcc side: never throws
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gainrl, m) {
  m.def(
      "rmsnorm_angle_rows_ext(Tensor x, Tensor weight, Tensor(a!) y, Tensor(b!) rstd, Tensor item_row0, "
      "Tensor item_nrows, Tensor item_seg, Tensor item_pair_end, Tensor(c!) part_sum, Tensor(d!) part_q, "
      "Tensor(e!) part_adj, float eps, int values_per_thread, int stages, bool carry) -> ()");
}

TORCH_LIBRARY_IMPL(gainrl, CUDA, m) { m.impl("rmsnorm_angle_rows_ext", &rmsnorm_angle_rows_cuda); }
