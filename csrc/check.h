// GAINRL_CHECK(cond, message): TORCH_CHECK whose message is built with std::string / std::to_string and handed to
// c10 as one C string, so nothing in this extension formats through an ostream.
//
// Why: on an H200 machine (torch 2.11+cu130, extension built by setup.py with that image's g++ and linked with
// Python's -Wl,-Bsymbolic-functions) a TORCH_CHECK message with a number in it crashed the process (SIGSEGV in
// std::basic_ostream::_M_insert<long>, bound to a copy inside _C.so: c10::str's stringstream formatting runs in
// our translation unit). With a single const char* argument c10 passes the text through unformatted.
//
// gainrl::dtype_of(tensor, name): the kernels' element type (csrc/dtype.h) of a tensor, or that error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "dtype.h"

#define GAINRL_CHECK(cond, message)                         \
  do {                                                      \
    if (!(cond)) {                                          \
      const std::string gainrl_check_message_ = (message);  \
      TORCH_CHECK(false, gainrl_check_message_.c_str());    \
    }                                                       \
  } while (0)

namespace gainrl {

// The kernels' element type of tensor `t` (argument `name` in the message when it is none of fp32 / fp16 / bf16).
inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      GAINRL_CHECK(false, std::string(name) + ": expected float32, float16 or bfloat16, got " +
                              c10::toString(t.scalar_type()));
  }
  return DType::kFloat32;  // not reached
}

}  // namespace gainrl
