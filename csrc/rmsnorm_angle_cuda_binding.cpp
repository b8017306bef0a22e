// Torch binding of the CUDA rows kernel of the fused RMSNorm + angle forward (csrc/rmsnorm_angle_kernels.cuh):
//   rmsnorm_angle_rows_ext(x, weight, y!, rstd!, item_row0, item_nrows, item_seg, item_pair_end, part_sum!, part_q!,
//                          part_adj!, eps, values_per_thread, stages, carry) -> ()
// fills the outputs the Triton _fwd_rows_kernel of gainrl_kernels/rmsnorm_angle_forward_kernels.py fills, for the
// work list of that module's plan kernel (gainrl_kernels/rmsnorm_angle.py allocates everything and reduces the
// partials);
//   rmsnorm_angle_spans_ext(x, weight, y!, rstd!, cu_seqlens, seg_offsets?, token_index?, part_sum!, part_q!,
//                           part_adj!, chunk, eps, values_per_thread, stages, carry) -> ()
// the same without a work list (16-bit rows): block i takes rows [i chunk, (i + 1) chunk) and finds their sequences
// and segments itself; partials at slots i + b K + k, cdiv(R, chunk) + B K of them (see Args::spans).
// x [R, D] fp32 / fp16 / bf16 CUDA with unit column stride and 16-byte aligned rows, D a multiple of 16 bytes and
// at most 8192 (fp32: 4096); weight [D] contiguous.
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

// Checks what both ops share (x, weight, y, rstd and the partials of `grid` slots) and fills those fields of `a`.
void check_rows(ra::Args& a, const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& rstd,
                at::Tensor& part_sum, at::Tensor& part_q, at::Tensor& part_adj, int64_t grid, double eps,
                int64_t values_per_thread, int64_t stages, bool carry) {
  GAINRL_CHECK(x.is_cuda() && x.dim() == 2, "x: expected a 2-D [R, D] CUDA tensor, got " + std::to_string(x.dim()) +
                                                " dims on " + x.device().str());
  GAINRL_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x: expected unit column stride");
  const int64_t R = x.size(0), D = x.size(1);
  check_on(weight, x, "weight", std::nullopt, D);  // any of the three dtypes: launch_checked's dtype_of
  check_on(y, x, "y", x.scalar_type(), R * D);
  check_on(rstd, x, "rstd", at::kFloat, R);
  check_on(part_sum, x, "part_sum", at::kFloat, grid * D);
  check_on(part_q, x, "part_q", at::kFloat, grid);
  check_on(part_adj, x, "part_adj", at::kFloat, grid);
  a.x = x.data_ptr();
  a.stride_r = x.stride(0);
  a.weight = weight.data_ptr();
  a.y = y.data_ptr();
  a.rstd = rstd.data_ptr<float>();
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
}

// Refuses x and weight dtypes other than fp32 / fp16 / bf16 and what the launcher would (message naming `op`), then
// enqueues the kernel on x's current stream.
void launch_checked(const ra::Args& a, const at::Tensor& x, const at::Tensor& weight, const char* op,
                    const std::string& spans_needs) {
  const ra::DType xt = gainrl::dtype_of(x, "x"), wt = gainrl::dtype_of(weight, "weight");
  GAINRL_CHECK(ra::supported(a, xt, wt),
               std::string(op) + ": unsupported rows (D = " + std::to_string(a.D) +
                   ": needs D a multiple of 16 bytes, D <= " + std::to_string(ra::max_dim(xt, a.values_per_thread)) +
                   ", 16-byte aligned x, y and weight, values_per_thread 16 or 32, stages 2 to 4" + spans_needs + ")");
  if (a.grid == 0 || a.R == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(ra::launch(a, xt, wt, stream));  // nvcc side: never throws
}

void rmsnorm_angle_rows_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& rstd,
                             const at::Tensor& item_row0, const at::Tensor& item_nrows, const at::Tensor& item_seg,
                             const at::Tensor& item_pair_end, at::Tensor& part_sum, at::Tensor& part_q,
                             at::Tensor& part_adj, double eps, int64_t values_per_thread, int64_t stages,
                             bool carry) {
  const int64_t grid = item_row0.numel();
  ra::Args a{};
  check_rows(a, x, weight, y, rstd, part_sum, part_q, part_adj, grid, eps, values_per_thread, stages, carry);
  check_on(item_row0, x, "item_row0", at::kInt, grid);
  check_on(item_nrows, x, "item_nrows", at::kInt, grid);
  check_on(item_seg, x, "item_seg", at::kInt, grid);
  check_on(item_pair_end, x, "item_pair_end", at::kInt, grid);
  GAINRL_CHECK(grid < (int64_t(1) << 31), "item_row0: more than 2^31 work items");
  a.item_row0 = item_row0.data_ptr<int>();
  a.item_nrows = item_nrows.data_ptr<int>();
  a.item_seg = item_seg.data_ptr<int>();
  a.item_pair_end = item_pair_end.data_ptr<int>();
  launch_checked(a, x, weight, "rmsnorm_angle_rows_ext", "");
}

void rmsnorm_angle_spans_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& rstd,
                              const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& seg_offsets,
                              const std::optional<at::Tensor>& token_index, at::Tensor& part_sum,
                              at::Tensor& part_q, at::Tensor& part_adj, int64_t chunk,
                              double eps, int64_t values_per_thread, int64_t stages, bool carry) {
  GAINRL_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2,
               "cu_seqlens: expected a 1-D [B + 1] tensor with B >= 1, got " + std::to_string(cu_seqlens.numel()) +
                   " elements");
  const int64_t B = cu_seqlens.numel() - 1;
  const int64_t K = seg_offsets ? seg_offsets->size(-1) - 1 : 1;
  GAINRL_CHECK(!seg_offsets || (seg_offsets->dim() == 2 && seg_offsets->size(0) == B && K >= 1),
               "seg_offsets: expected a [B, K + 1] tensor with B = " + std::to_string(B) + " and K >= 1");
  GAINRL_CHECK(chunk >= 1, "chunk: expected at least 1 row, got " + std::to_string(chunk));
  const int64_t blocks = (x.size(0) + chunk - 1) / chunk;
  ra::Args a{};
  check_rows(a, x, weight, y, rstd, part_sum, part_q, part_adj, blocks + B * K, eps, values_per_thread, stages,
             carry);
  check_on(cu_seqlens, x, "cu_seqlens", at::kInt, B + 1);
  if (seg_offsets) check_on(*seg_offsets, x, "seg_offsets", at::kInt, B * (K + 1));
  if (token_index) {
    const bool i64 = token_index->scalar_type() == at::kLong;
    check_on(*token_index, x, "token_index", i64 ? at::kLong : at::kInt, token_index->numel());
    a.token_index = token_index->data_ptr();
    a.token_index_64 = i64;
    a.n_packed = token_index->numel();
  }
  a.spans = true;
  a.cu_seqlens = cu_seqlens.data_ptr<int>();
  a.seg_offsets = seg_offsets ? seg_offsets->data_ptr<int>() : nullptr;
  a.B = B;
  a.K = static_cast<int>(K < (int64_t(1) << 30) ? K : 0);  // refused by supported() below
  a.chunk = chunk;
  launch_checked(a, x, weight, "rmsnorm_angle_spans_ext",
                 ", 16-bit x, B K < 2^31 and chunk < 2^31 for spans");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gainrl, m) {
  m.def(
      "rmsnorm_angle_rows_ext(Tensor x, Tensor weight, Tensor(a!) y, Tensor(b!) rstd, Tensor item_row0, "
      "Tensor item_nrows, Tensor item_seg, Tensor item_pair_end, Tensor(c!) part_sum, Tensor(d!) part_q, "
      "Tensor(e!) part_adj, float eps, int values_per_thread, int stages, bool carry) -> ()");
  m.def(
      "rmsnorm_angle_spans_ext(Tensor x, Tensor weight, Tensor(a!) y, Tensor(b!) rstd, Tensor cu_seqlens, "
      "Tensor? seg_offsets, Tensor? token_index, Tensor(c!) part_sum, Tensor(d!) part_q, Tensor(e!) part_adj, "
      "int chunk, float eps, "
      "int values_per_thread, int stages, bool carry) -> ()");
}

TORCH_LIBRARY_IMPL(gainrl, CUDA, m) {
  m.impl("rmsnorm_angle_rows_ext", &rmsnorm_angle_rows_cuda);
  m.impl("rmsnorm_angle_spans_ext", &rmsnorm_angle_spans_cuda);
}
