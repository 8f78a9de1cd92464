// fp32 row primitives (csrc/cpu/row_kernels.cpp), vectorized and dispatched on the CPU's ISA at load time.
#pragma once

#include <cstdint>

namespace lpc {
namespace cpu {

// max of x[0..n), -inf for n == 0; NaN entries are skipped here and propagate through sum_exp_f32.
float max_f32(const float* x, int64_t n);
// sum of exp(x[i] - shift), ~1 ulp exp, fp32 lanes.
float sum_exp_f32(const float* x, int64_t n, float shift);
// out[i] = scale * exp(x[i] - shift); out may alias x.
void scaled_exp_f32(const float* x, int64_t n, float shift, float scale, float* out);
// x[i] += b[i]
void add_f32(float* x, const float* b, int64_t n);

}  // namespace cpu
}  // namespace lpc
