// LPC_CHECK: TORCH_CHECK with a message this library formats itself, without std::ostream.
//
// Why: on the GPU machines the extension is built by a GCC whose libstdc++ headers instantiate
// `std::ostream::_M_insert<long>` (and <double>) inside our .so, and the link uses -Bsymbolic-functions, so
// our copy (from the newer headers) runs against the older libstdc++ that the process has loaded: streaming
// any number into an ostringstream (which c10::str / TORCH_CHECK do for multi-part messages) segfaulted
// instead of raising (seen on an H200 with torch 2.11, cuda-gdb backtrace in _M_insert<long>). Here
// numbers go through std::to_string / snprintf and the parts are joined into one std::string, which
// TORCH_CHECK passes through unchanged (c10::str of a single std::string does not touch a stream).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace lpc {
namespace fmt {

inline std::string part(const char* s) { return s; }
inline std::string part(std::string_view s) { return std::string(s); }
inline std::string part(const std::string& s) { return s; }
inline std::string part(bool v) { return v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline std::string part(T v) {
  return std::to_string(v);
}
inline std::string part(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string part(float v) { return part(static_cast<double>(v)); }
inline std::string part(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}
inline std::string part(c10::ScalarType t) { return c10::toString(t); }
inline std::string part(const c10::Device& d) { return d.str(); }

}  // namespace fmt

// The parts of an error message joined into one string (no std::ostream; see above).
template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  ((out += fmt::part(args)), ...);
  return out;
}

}  // namespace lpc

// TORCH_CHECK(cond, parts...) with the message built by lpc::msg; the parts are only evaluated on failure.
#define LPC_CHECK(cond, ...) TORCH_CHECK(cond, ::lpc::msg(__VA_ARGS__))
