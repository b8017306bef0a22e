// Device side of the CUDA rows kernel of the fused RMSNorm + angle forward (torch.ops.gainrl.rmsnorm_angle_rows_ext):
// instantiates every kernel variant (csrc/rmsnorm_angle_kernels.cuh) and defines the one exported, non-throwing host
// entry point declared in csrc/rmsnorm_angle_launch.h. Argument checks and the op registration live in the
// g++-compiled csrc/rmsnorm_angle_cuda_binding.cpp (see csrc/angle_stats_cuda.cu for why).
#include "rmsnorm_angle_kernels.cuh"

cudaError_t gainrl::rmsnorm_angle::launch(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) noexcept {
  return launch_rmsnorm_angle_rows(a, x_dtype, w_dtype, stream);
}
