// Device side of the CUDA forwards of the fused RMSNorm + angle statistics (torch.ops.gainrl.rmsnorm_angle_rows_ext
// and rmsnorm_angle_cluster_ext): instantiates every kernel variant (csrc/rmsnorm_angle_kernels.cuh, the rows
// kernel; csrc/rmsnorm_angle_cluster.cuh, the cluster kernel) and defines the exported, non-throwing host entry points
// declared in csrc/rmsnorm_angle_launch.h. Argument checks and the op registration live in the g++-compiled
// csrc/rmsnorm_angle_cuda_binding.cpp (see csrc/angle_stats_cuda.cu for why).
#include "rmsnorm_angle_cluster.cuh"
#include "rmsnorm_angle_kernels.cuh"

cudaError_t gainrl::rmsnorm_angle::launch(const Args& a, DType x_dtype, DType w_dtype, cudaStream_t stream) noexcept {
  return launch_rmsnorm_angle_rows(a, x_dtype, w_dtype, stream);
}

cudaError_t gainrl::rmsnorm_angle::launch_cluster(const Args& a, DType x_dtype, DType w_dtype,
                                                  cudaStream_t stream) noexcept {
  return cluster::launch_rmsnorm_angle_cluster(a, x_dtype, w_dtype, stream);
}
