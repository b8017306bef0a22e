// Device side of the CUDA torch.ops.gainrl.angle_stats_ext: the only nvcc-compiled translation unit. It includes
// the kernels (csrc/angle_stats_kernels.cuh), so all kernel variants are instantiated here, and defines the one
// exported host entry point declared in csrc/angle_stats_launch.h:
//   cudaError_t gainrl::angle_stats::launch(const Args&, DType, cudaStream_t) noexcept
// which enqueues the three kernels on the given stream and returns cudaGetLastError(): no host synchronisation
// (CUDA graph capture safe) and no exceptions.
//
// Deliberately no torch / ATen / c10 headers and nothing that can throw (no TORCH_CHECK, no C10_CUDA_CHECK, no
// at:: allocation): a c10::Error thrown from nvcc-compiled host code crashed the process on a real GPU. Argument
// checks, output / workspace allocation, CUDAGuard, the current stream, C10_CUDA_CHECK of the returned error and
// the TORCH_LIBRARY_IMPL(gainrl, CUDA) registration live in the g++-compiled csrc/angle_stats_cuda_binding.cpp
// (the flash-attention layout). tests/test_csrc_compile.py enforces the "no throwing code" rule.
#include "angle_stats_kernels.cuh"

// Qualified definition: it must match the declaration in angle_stats_launch.h exactly (a drifted signature is a
// compile error here, not an undefined symbol when the extension is loaded).
cudaError_t gainrl::angle_stats::launch(const Args& a, DType dt, cudaStream_t stream) noexcept {
  return launch_angle_stats(a, dt, stream);
}
