// Element types of the hand-written kernels, shared by every launcher interface (csrc/*_launch.h) and binding: plain
// C++, no CUDA, no torch. The numeric values are part of the emulator tests' ctypes calls (tests/*cuda*.py).
#pragma once

namespace gainrl {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int element_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

}  // namespace gainrl
