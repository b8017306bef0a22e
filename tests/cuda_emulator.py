"""A CPU emulation of the CUDA execution model, enough to run the kernels of csrc/*_kernels.cuh under g++ (tests
without a GPU): each CUDA thread of a block is a fiber, blocks run one after another, __syncthreads and warp
shuffles are barriers between the fibers. It checks a kernel's work decomposition, indexing and reductions; it
cannot see GPU-only problems (alignment faults, races the barriers hide, memory ordering, fast-math).

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
inline Barrier g_block_bar;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<uint64_t> g_xchg;
inline std::function<void()> g_body;
inline uint64_t g_progress = 0;
inline size_t g_smem_bytes = 0;
inline std::vector<unsigned char> g_smem;
inline size_t g_last_smem_bytes = 0;  // the last launch_smem's dynamic shared memory and block size (for tests)
inline unsigned g_last_threads = 0;

inline unsigned char* dynamic_smem() { return g_smem.data(); }

inline void yield() {
  if (_setjmp(g_resume[t_thread.x].buf) == 0) _longjmp(g_sched, 1);
}

inline void arrive_and_wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++g_progress;
    return;
  }
  while (b.generation == gen) yield();
}

inline void syncthreads() { arrive_and_wait(g_block_bar); }

template <typename V>
V shfl(V v, bool up, int arg) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  const unsigned tid = t_thread.x, lane = tid & 31, warp = tid >> 5;
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
  g_done[t_thread.x] = 1;
  _longjmp(g_sched, 1);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  const unsigned n = block.x;
  if (block.y != 1 || block.z != 1 || n == 0 || n % 32 || n > 1024) throw std::runtime_error("bad block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("bad grid");
  g_grid = grid;
  g_dim = block;
  g_body = [=] { kernel(args...); };
  getcontext(&g_template);
  g_fiber.assign(n, g_template);
  g_resume.resize(n);
  g_stack.resize(n);
  for (auto& st : g_stack) st.resize(64 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        t_block = make_uint3(bx, by, bz);
        g_block_bar = Barrier{n, 0, 0};
        g_warp_bar.assign(n / 32, Barrier{32, 0, 0});
        g_xchg.assign(n, 0);
        g_done.assign(n, 0);
        g_started.assign(n, 0);
        g_smem.assign(g_smem_bytes, 0xFF);
        for (unsigned t = 0; t < n; ++t) {
          g_fiber[t] = g_template;
          g_fiber[t].uc_stack.ss_sp = g_stack[t].data();
          g_fiber[t].uc_stack.ss_size = g_stack[t].size();
          g_fiber[t].uc_link = nullptr;
          makecontext(&g_fiber[t], fiber_main, 0);
        }
        for (unsigned left = n; left > 0;) {
          const uint64_t before = g_progress;
          for (unsigned t = 0; t < n; ++t) {
            if (g_done[t]) continue;
            t_thread = make_uint3(t, 0, 0);
            if (_setjmp(g_sched) == 0) {  // back here when fiber t waits at a barrier or finishes
              if (g_started[t]) _longjmp(g_resume[t].buf, 1);
              g_started[t] = 1;
              setcontext(&g_fiber[t]);
            }
            if (g_done[t]) --left, ++g_progress;
          }
          // A full pass in which no barrier opened and no thread finished: threads wait at different barriers.
          if (left > 0 && g_progress == before) throw std::runtime_error("deadlock: divergent barriers");
        }
      }
}

template <typename... P, typename... A>
void launch_smem(size_t smem_bytes, void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  g_smem_bytes = g_last_smem_bytes = smem_bytes;
  g_last_threads = block.x;
  launch(kernel, grid, block, args...);
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
