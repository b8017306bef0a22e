// Device helpers shared by the hand-written kernels (csrc/*_kernels.cuh and the bench/cluster_walk.cu prototype):
// CUDA headers only, so that the g++ CPU emulator of tests/cuda_emulator.py compiles them too (it defines
// __shfl_xor_sync and the gainrl_emu cp.async before including a kernel header).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace gainrl {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the 32 lanes of a warp, the same value in every lane (xor butterfly: each level adds the same two
// partials in either order).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float fast_rsqrt(float v) {
#ifdef GAINRL_CUDA_EMULATOR
  return 1.f / sqrtf(v);
#else
  return rsqrtf(v);  // the hardware's approximate rsqrt, as torch.rsqrt on CUDA and the Triton kernel
#endif
}

__device__ __forceinline__ float div_rn(float a, float b) {
#ifdef GAINRL_CUDA_EMULATOR
  return a / b;
#else
  return __fdiv_rn(a, b);  // IEEE division even under --use_fast_math (the mean of rstd, as in the Triton kernel)
#endif
}

// Before sm_80 (no cp.async: a build whose TORCH_CUDA_ARCH_LIST includes older GPUs) the copies are plain 16-byte
// loads and stores, done at once; the commits and waits are then no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GAINRL_SYNC_COPIES 1
#endif

// 16-byte asynchronous copy global -> shared (sm_80+), grouped by commit and waited for by count.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(GAINRL_SYNC_COPIES)
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#elif defined(GAINRL_CUDA_EMULATOR)
  gainrl_emu::cp_async16(smem_dst, gmem_src);  // tests/cuda_emulator.py: lazy (by its wait) or eager
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(GAINRL_SYNC_COPIES)
#elif defined(GAINRL_CUDA_EMULATOR)
  gainrl_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(GAINRL_SYNC_COPIES)
#elif defined(GAINRL_CUDA_EMULATOR)
  gainrl_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace gainrl
