"""A CPU emulation of the CUDA execution model, enough to run the kernels of csrc/*_kernels.cuh under g++ (tests
without a GPU): each CUDA thread of a block is a fiber, blocks run one after another, __syncthreads and warp
shuffles are barriers between the fibers. It checks a kernel's work decomposition, indexing and reductions; it
cannot see GPU-only problems (alignment faults, races the barriers hide, memory ordering, fast-math).
``launch_cluster`` runs the blocks of each thread-block cluster together (clusters one after another), with named
barriers (``named_sync``), the split cluster barrier (``cluster_arrive`` / ``cluster_wait``) and other blocks' dynamic
shared memory (``map_shared_rank``); such kernels keep their shared state in dynamic shared memory (function-static
``__shared__`` would be one copy for the whole cluster). ``cp_async16`` / ``cp_async_commit`` / ``cp_async_wait``
emulate cp.async per fiber (lazily by default, at once with ``g_cp_async_eager``).

    lib = build(tmp_dir, BODY)   # BODY: C++ after the prelude: #include "xyz_kernels.cuh" + extern "C" wrappers

The kernel headers see GAINRL_CUDA_EMULATOR defined and launch through gainrl_emu::launch / launch_smem.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"

PRELUDE = r"""
// CPU emulation of just what the csrc/*_kernels.cuh headers use: threadIdx/blockIdx/blockDim, __shared__ (function
// statics: blocks run one after another), dynamic shared memory (gainrl_emu::dynamic_smem(), sized by launch_smem,
// filled with 0xFF bytes, a NaN pattern, before every block), __syncthreads, __shfl_xor_sync / __shfl_up_sync on
// full warps.
// Each CUDA thread of a block is a fiber (entered once with setcontext, then switched with _setjmp/_longjmp, which
// make no system calls); a round-robin scheduler runs each fiber up to its next barrier.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

namespace gainrl_emu {
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};
inline dim3 g_grid, g_dim;
inline uint3 t_thread, t_block;  // the running fiber's indices
inline unsigned t_fiber = 0, t_rank = 0;  // its fiber (block rank * threads + thread) and block rank in the cluster
inline unsigned g_cluster = 1;             // blocks run together (launch_cluster's cluster size; launch: 1)
inline jmp_buf g_sched;
struct Resume {
  jmp_buf buf;
};
inline std::vector<Resume> g_resume;
inline std::vector<char> g_started;
inline ucontext_t g_template;
inline std::vector<ucontext_t> g_fiber;
inline std::vector<std::vector<char>> g_stack;
inline std::vector<char> g_done;
inline std::vector<Barrier> g_block_bar;  // per block of the cluster
inline std::vector<Barrier> g_warp_bar;   // per warp of the cluster
inline std::vector<Barrier> g_named_bar;  // 16 per block (bar.sync id, count)
inline Barrier g_cluster_bar;
inline std::vector<unsigned> g_cluster_gen;  // per fiber: the cluster barrier's generation at its last arrive
inline std::vector<char> g_cluster_arrived;  // per fiber: arrived and not yet waited
inline std::vector<unsigned> g_block_done;   // per block of the cluster: fibers finished
inline std::vector<uint64_t> g_xchg;
inline std::function<void()> g_body;
inline uint64_t g_progress = 0;
inline size_t g_smem_bytes = 0;
inline std::vector<std::vector<unsigned char>> g_smem;  // per block of the cluster
inline size_t g_last_smem_bytes = 0;  // the last launch_smem's dynamic shared memory and block size (for tests)
inline unsigned g_last_threads = 0;

inline unsigned char* dynamic_smem() { return g_smem[t_rank].data(); }

inline const char* g_fail = nullptr;  // set by fail(): the scheduler throws it from the launching thread

// Ends the running fiber with an error (a throw inside a fiber could not unwind to the launch).
[[noreturn]] inline void fail(const char* what) {
  g_fail = what;
  _longjmp(g_sched, 1);
}

inline void yield() {
  if (_setjmp(g_resume[t_fiber].buf) == 0) _longjmp(g_sched, 1);
}

// Arrives at b; returns the generation to wait on (the barrier opens when `expected` fibers have arrived).
inline unsigned arrive(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++g_progress;
  }
  return gen;
}

inline void wait(const Barrier& b, unsigned gen) {
  while (b.generation == gen) yield();
}

inline void arrive_and_wait(Barrier& b) { wait(b, arrive(b)); }

inline void syncthreads() { arrive_and_wait(g_block_bar[t_rank]); }

// bar.sync id, count: `count` threads of this block meet at barrier `id` (1-15; 0 is __syncthreads').
inline void named_sync(unsigned id, unsigned count) {
  if (id == 0 || id >= 16 || count % 32) fail("bad named barrier");
  Barrier& b = g_named_bar[t_rank * 16 + id];
  if (b.arrived == 0) b.expected = count;
  else if (b.expected != count) fail("named barrier: different thread counts");
  arrive_and_wait(b);
}

// barrier.cluster.arrive / .wait: every thread of the cluster arrives; a wait returns once all have arrived since
// this thread's last arrive. Arrives and waits must alternate, and a thread ends only after its last arrive's wait
// (so that no block leaves while another may read its shared memory): otherwise the launch throws.
inline void cluster_arrive() {
  if (g_cluster_arrived[t_fiber]) fail("cluster barrier: two arrives without a wait");
  g_cluster_arrived[t_fiber] = 1;
  g_cluster_gen[t_fiber] = arrive(g_cluster_bar);
}
inline void cluster_wait() {
  if (!g_cluster_arrived[t_fiber]) fail("cluster barrier: a wait without an arrive");
  g_cluster_arrived[t_fiber] = 0;
  wait(g_cluster_bar, g_cluster_gen[t_fiber]);
}

// The address of `p` (in this block's dynamic shared memory) in block `rank`'s, which must not have begun to exit.
template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  const auto off = reinterpret_cast<unsigned char*>(p) - g_smem[t_rank].data();
  if (off < 0 || static_cast<size_t>(off) >= g_smem[t_rank].size() || rank >= g_cluster)
    fail("map_shared_rank: not in dynamic shared memory, or no such block");
  if (g_block_done[rank]) fail("map_shared_rank: a block that has begun to exit");
  return reinterpret_cast<T*>(g_smem[rank].data() + off);
}

// cp.async: each fiber queues its 16-byte copies by commit group and performs them when a wait covers their group
// (lazy, the default: a read of a ring slot before its wait sees the old bytes) or at once (g_cp_async_eager: a
// copy into a slot a thread still reads shows). Queues are per fiber and reset by every launch.
struct AsyncCopy {
  unsigned group;
  void* dst;
  unsigned char bytes[16];
};
inline bool g_cp_async_eager = false;
inline std::vector<std::vector<AsyncCopy>> g_copies;  // per fiber
inline std::vector<unsigned> g_groups;               // committed groups per fiber

inline void cp_async16(void* dst, const void* src) {
  if (g_cp_async_eager) {
    std::memcpy(dst, src, 16);
    return;
  }
  AsyncCopy c{g_groups[t_fiber], dst, {}};
  std::memcpy(c.bytes, src, 16);
  g_copies[t_fiber].push_back(c);
}

inline void cp_async_commit() { ++g_groups[t_fiber]; }

// Performs this fiber's copies of all but the newest `pending` committed groups.
inline void cp_async_wait(unsigned pending) {
  auto& q = g_copies[t_fiber];
  const unsigned committed = g_groups[t_fiber];
  std::vector<AsyncCopy> keep;
  for (const AsyncCopy& c : q) {
    if (c.group + pending < committed) std::memcpy(c.dst, c.bytes, 16); else keep.push_back(c);
  }
  q.swap(keep);
}

template <typename V>
V shfl(V v, bool up, int arg) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  const unsigned tid = t_fiber, lane = tid & 31, warp = tid >> 5;  // blocks hold whole warps: warps of the cluster
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  g_xchg[tid] = bits;
  arrive_and_wait(g_warp_bar[warp]);
  const int src = up ? (int(lane) >= arg ? int(lane) - arg : int(lane)) : int(lane ^ unsigned(arg));
  const uint64_t got = g_xchg[warp * 32 + src];
  arrive_and_wait(g_warp_bar[warp]);
  V r;
  std::memcpy(&r, &got, sizeof(V));
  return r;
}

inline void fiber_main() {
  g_body();
  if (g_cluster_arrived[t_fiber]) fail("cluster barrier: a thread ends after an arrive, unwaited");
  g_done[t_fiber] = 1;
  ++g_block_done[t_rank];
  _longjmp(g_sched, 1);
}

// Runs the grid's blocks `cluster` at a time (consecutive blockIdx.x, as a cluster's), one fiber per thread.
template <typename... P, typename... A>
void launch_impl(unsigned cluster, void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  const unsigned n = block.x, f = cluster * n;
  if (block.y != 1 || block.z != 1 || n == 0 || n % 32 || n > 1024) throw std::runtime_error("bad block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("bad grid");
  if (cluster == 0 || grid.x % cluster) throw std::runtime_error("bad cluster");
  g_grid = grid;
  g_dim = block;
  g_cluster = cluster;
  g_body = [=] { kernel(args...); };
  getcontext(&g_template);
  g_fiber.assign(f, g_template);
  g_resume.resize(f);
  g_stack.resize(f);
  for (auto& st : g_stack) st.resize(64 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster) {
        g_block_bar.assign(cluster, Barrier{n, 0, 0});
        g_warp_bar.assign(f / 32, Barrier{32, 0, 0});
        g_named_bar.assign(cluster * 16, Barrier{0, 0, 0});
        g_cluster_bar = Barrier{f, 0, 0};
        g_cluster_gen.assign(f, 0);
        g_cluster_arrived.assign(f, 0);
        g_block_done.assign(cluster, 0);
        g_xchg.assign(f, 0);
        g_copies.assign(f, {});
        g_groups.assign(f, 0);
        g_done.assign(f, 0);
        g_started.assign(f, 0);
        g_smem.assign(cluster, std::vector<unsigned char>(g_smem_bytes, 0xFF));
        for (unsigned t = 0; t < f; ++t) {
          g_fiber[t] = g_template;
          g_fiber[t].uc_stack.ss_sp = g_stack[t].data();
          g_fiber[t].uc_stack.ss_size = g_stack[t].size();
          g_fiber[t].uc_link = nullptr;
          makecontext(&g_fiber[t], fiber_main, 0);
        }
        for (unsigned left = f; left > 0;) {
          const uint64_t before = g_progress;
          for (unsigned t = 0; t < f; ++t) {
            if (g_done[t]) continue;
            t_fiber = t;
            t_rank = t / n;
            t_thread = make_uint3(t % n, 0, 0);
            t_block = make_uint3(bx0 + t_rank, by, bz);
            if (_setjmp(g_sched) == 0) {  // back here when fiber t waits at a barrier or finishes
              if (g_started[t]) _longjmp(g_resume[t].buf, 1);
              g_started[t] = 1;
              setcontext(&g_fiber[t]);
            }
            if (g_fail) {
              const char* what = g_fail;
              g_fail = nullptr;
              g_cluster = 1;
              t_fiber = t_rank = 0;
              throw std::runtime_error(what);
            }
            if (g_done[t]) --left, ++g_progress;
          }
          // A full pass in which no barrier opened and no thread finished: threads wait at different barriers.
          if (left > 0 && g_progress == before) throw std::runtime_error("deadlock: divergent barriers");
        }
      }
  g_cluster = 1;
  t_fiber = t_rank = 0;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  launch_impl(1, kernel, grid, block, args...);
}

template <typename... P, typename... A>
void launch_smem(size_t smem_bytes, void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  g_smem_bytes = g_last_smem_bytes = smem_bytes;
  g_last_threads = block.x;
  launch(kernel, grid, block, args...);
  g_smem_bytes = 0;
}

template <typename... P, typename... A>
void launch_cluster(unsigned cluster, size_t smem_bytes, void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  g_smem_bytes = g_last_smem_bytes = smem_bytes;
  g_last_threads = block.x;
  launch_impl(cluster, kernel, grid, block, args...);
  g_smem_bytes = 0;
}
}  // namespace gainrl_emu

#define threadIdx (::gainrl_emu::t_thread)
#define blockIdx (::gainrl_emu::t_block)
#define blockDim (::gainrl_emu::g_dim)
#define gridDim (::gainrl_emu::g_grid)
#define __syncthreads() ::gainrl_emu::syncthreads()
#define __shfl_xor_sync(mask, v, off) ::gainrl_emu::shfl((v), false, (off))
#define __shfl_up_sync(mask, v, off) ::gainrl_emu::shfl((v), true, (off))
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
using std::max;
using std::min;

#define GAINRL_CUDA_EMULATOR 1
"""


def cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return Path("/usr/include") if Path("/usr/include/cuda_fp16.h").is_file() else None


def build(tmp: Path, body: str) -> ctypes.CDLL:
    """Compile PRELUDE + ``body`` into a shared library in ``tmp`` and load it (skips the test without g++ or the
    CUDA headers)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    inc = cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("the CUDA emulator needs g++ and the CUDA headers (cuda_fp16.h)")
    (tmp / "emu.cpp").write_text(PRELUDE + body)
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{CSRC}", f"-I{inc}",
           str(tmp / "emu.cpp"), "-o", str(tmp / "emu.so")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-4000:]}"
    return ctypes.CDLL(str(tmp / "emu.so"))
