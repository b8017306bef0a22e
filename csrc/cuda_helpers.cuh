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

}  // namespace gainrl
