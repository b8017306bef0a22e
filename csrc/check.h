// GAINRL_CHECK(cond, message): TORCH_CHECK whose message is built with std::string / std::to_string and handed to
// c10 as one C string, so nothing in this extension formats through an ostream.
//
// Why: on an H200 machine (torch 2.11+cu130, extension built by setup.py with that image's g++ and linked with
// Python's -Wl,-Bsymbolic-functions) a TORCH_CHECK message with a number in it crashed the process (SIGSEGV in
// std::basic_ostream::_M_insert<long>, bound to a copy inside _C.so: c10::str's stringstream formatting runs in
// our translation unit). With a single const char* argument c10 passes the text through unformatted.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#define GAINRL_CHECK(cond, message)                         \
  do {                                                      \
    if (!(cond)) {                                          \
      const std::string gainrl_check_message_ = (message);  \
      TORCH_CHECK(false, gainrl_check_message_.c_str());    \
    }                                                       \
  } while (0)
