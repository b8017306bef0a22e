// Thread-block-cluster primitives (sm_90+) of the cluster walk prototype (bench/cluster_walk.cu): the split cluster
// barrier, this block's rank, another block's shared memory, a named barrier over part of a block, an atomic ticket. Under
// GAINRL_CUDA_EMULATOR they are tests/cuda_emulator.py's; device code before sm_90 gets none (its kernels compile
// their cluster code out).
#pragma once

#include <cuda_runtime.h>

#ifndef GAINRL_CUDA_EMULATOR
#include <cooperative_groups.h>
#endif

#if defined(GAINRL_CUDA_EMULATOR) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define GAINRL_HAS_CLUSTERS 1
#endif

namespace gainrl {
namespace cluster_sync {

// cluster_arrive / cluster_wait: the two halves of the cluster barrier (release / acquire); block_rank: this block's
// rank in its cluster; shared_of(p, rank): the same shared-memory address in block `rank`; group_barrier<COUNT>(g):
// bar.sync 1 + g over COUNT threads (0 is __syncthreads'); take_ticket: atomicAdd(counter, 1).
#ifdef GAINRL_CUDA_EMULATOR
inline void cluster_arrive() { gainrl_emu::cluster_arrive(); }
inline void cluster_wait() { gainrl_emu::cluster_wait(); }
inline int block_rank() { return static_cast<int>(gainrl_emu::t_rank); }
template <typename T>
T* shared_of(T* p, int rank) { return gainrl_emu::map_shared_rank(p, static_cast<unsigned>(rank)); }
template <int COUNT>
void group_barrier(int g) { gainrl_emu::named_sync(1 + g, COUNT); }
inline int take_ticket(int* counter) { return (*counter)++; }
#elif defined(GAINRL_HAS_CLUSTERS)
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ int block_rank() {
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
}
template <typename T>
__device__ __forceinline__ T* shared_of(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
template <int COUNT>
__device__ __forceinline__ void group_barrier(int g) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(1 + g), "n"(COUNT) : "memory");
}
__device__ __forceinline__ int take_ticket(int* counter) { return atomicAdd(counter, 1); }
#endif

}  // namespace cluster_sync
}  // namespace gainrl
