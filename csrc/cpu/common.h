// Shared pieces of the CPU kernels: argument checks that name the argument, the accumulation type, and
// row helpers that run the fp32 primitives of row_kernels.h (or plain double loops for float64 inputs).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../format.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "row_kernels.h"

namespace lpc {
namespace cpu {

// Accumulate in fp32, or fp64 for fp64 inputs (so that float64 gradcheck sees fp64 math).
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// device, rank and layout: what the Python checks cannot see when an op is called directly.
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  LPC_CHECK(t.defined(), name, " must be a defined tensor");
  LPC_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  LPC_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  LPC_CHECK(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), ")");
}

inline void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  check_tensor(t, name, dim);
  LPC_CHECK(is_float_dtype(t.scalar_type()), name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size, const char* what) {
  LPC_CHECK(t.size(dim) == size, name, ".size(", dim, ") must be ", size, " (", what, "), got shape ",
              t.sizes());
}

// labels: 1-D int64 of length n, each in [0, vocab) or equal to ignore_index. Returns the valid count.
// A bad label would index out of bounds in the kernels, so it is checked here too, not only in Python.
inline int64_t check_labels(const at::Tensor& labels, int64_t n, int64_t vocab, int64_t ignore_index) {
  check_tensor(labels, "labels", 1);
  LPC_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  check_size(labels, "labels", 0, n, "one label per row");
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = lab[i];
    if (y == ignore_index) continue;
    LPC_CHECK(y >= 0 && y < vocab, "labels must be in [0, ", vocab, ") or equal ignore_index=", ignore_index,
                ", got ", y, " at row ", i);
    ++valid;
  }
  return valid;
}

// A [n] vector of per-row values (grad_logp, lse) in the accumulation dtype, contiguous.
inline at::Tensor row_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType acc) {
  check_float(t, name, 1);
  check_size(t, name, 0, n, "one value per row");
  return t.scalar_type() == acc ? t : t.to(acc);
}

// ------------------------------------------------------------------------------------ row helpers
constexpr int64_t kBlock = 2048;  // elements per row block: 8 KiB of fp32, stays in L1 between passes

inline float row_max(const float* x, int64_t n) { return max_f32(x, n); }
inline float row_sum_exp(const float* x, int64_t n, float shift) { return sum_exp_f32(x, n, shift); }
inline void row_scaled_exp(const float* x, int64_t n, float shift, float scale, float* out) {
  scaled_exp_f32(x, n, shift, scale, out);
}
inline void row_add(float* x, const float* b, int64_t n) { add_f32(x, b, n); }

inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline double row_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}
inline void row_scaled_exp(const double* x, int64_t n, double shift, double scale, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = scale * std::exp(x[i] - shift);
}
inline void row_add(double* x, const double* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += b[i];
}

// Online log-sum-exp over row blocks: state (m, s) with s = sum exp(x - shift(m)). A block's max is
// taken first (one pass over L1), then its exps: one exp per element, one rescale per block.
template <typename acc>
struct OnlineLse {
  acc m = -std::numeric_limits<acc>::infinity();
  acc s = 0;

  // shift used for exp: the running max, or 0 when it is +-inf (all -inf so far, or an inf logit),
  // so that -inf rows give lse = -inf and +inf logits give lse = +inf as torch.logsumexp does.
  acc shift() const { return std::isfinite(m) ? m : acc(0); }

  void add_block(const acc* x, int64_t n) {
    const acc bm = row_max(x, n);
    if (bm > m) {
      const acc old_shift = shift();
      m = bm;
      if (s != acc(0)) s *= std::exp(old_shift - shift());
    }
    s += row_sum_exp(x, n, shift());
  }

  acc lse() const { return std::log(s) + shift(); }
};

// Copies n elements of a reduced-precision row into an acc buffer (exact upcast).
template <typename scalar_t, typename acc>
inline void upcast(const scalar_t* x, int64_t n, acc* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc>(x[i]);
}

template <typename scalar_t, typename acc>
inline void downcast(const acc* x, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(x[i]);
}

// Rows per parallel task: enough work per task to amortize scheduling (~32k elements).
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

}  // namespace cpu
}  // namespace lpc
