// Device helpers shared by the hand-written kernels (csrc/*_kernels.cuh): CUDA headers only, so that the g++ CPU
// emulator of tests/cuda_emulator.py compiles them too (it defines __shfl_xor_sync before including a kernel header).
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

// Relaxed fp32 atomic additions whose results are unused (reductions, RED): one value, and four consecutive ones at a
// 16-byte aligned address (one vector reduction on sm_90, four scalar ones before). In the emulator threads are
// fibers that switch only at barriers and shuffles, so plain additions are atomic there.
__device__ __forceinline__ void red_add(float* p, float v) {
#ifdef GAINRL_CUDA_EMULATOR
  *p += v;
#else
  atomicAdd(p, v);
#endif
}

__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(GAINRL_CUDA_EMULATOR)
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
#else
  red_add(p, v.x);
  red_add(p + 1, v.y);
  red_add(p + 2, v.z);
  red_add(p + 3, v.w);
#endif
}

}  // namespace gainrl
