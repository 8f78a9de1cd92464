// fp32 row primitives shared by the CPU kernels: max, sum of exp, scaled exp, bias add.
//
// Why not at::vec: in an out-of-tree extension at::vec::Vectorized<float> is the generic (scalar-mapped)
// class unless the file is compiled with -mavx2/-mavx512f and CPU_CAPABILITY_* defines, which would tie
// the .so to the build machine's ISA. Instead these loops are plain C++ that GCC vectorizes
// (`omp simd` makes the reductions legal without -ffast-math) and `target_clones` compiles each one for
// AVX-512, AVX2+FMA and baseline x86-64, picked at load time (ifunc). No torch headers: builds in ~1 s.
#include "row_kernels.h"

#include <cstring>
#include <limits>

// The x86-64-v3/v4 clones are picked by CPU features (so on AMD too), not by CPU model as arch=<cpu> is.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 12
#define LPC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define LPC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LPC_CLONES
#endif

namespace lpc {
namespace cpu {
namespace {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x) in float32 to ~1 ulp (Cephes expf): exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2,
// exp(r) by a degree-6 polynomial. Branch-free so that loops calling it vectorize. Below ln(2^-126) it
// returns 0 (softmax terms that small vanish next to the max term's 1), NaN stays NaN, +inf gives +inf.
inline float exp_f32(float x) {
  constexpr float kLo = -87.33654475f;  // ln(2^-126): smallest normal result
  constexpr float kHi = 88.0f;          // keeps n <= 127
  constexpr float kRound = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float t = xc * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const int32_t ni = float_to_bits(t) - float_to_bits(kRound);
  float r = xc - n * 0.693359375f;  // ln 2 split in two so that n * ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const float res = y * bits_to_float((ni + 127) << 23);
  return x < kLo ? 0.0f : (x > kHi ? std::numeric_limits<float>::infinity() : res);
}

}  // namespace

LPC_CLONES float max_f32(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

LPC_CLONES float sum_exp_f32(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_f32(x[i] - shift);
  return s;
}

LPC_CLONES void scaled_exp_f32(const float* x, int64_t n, float shift, float scale, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = scale * exp_f32(x[i] - shift);
}

LPC_CLONES void add_f32(float* x, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += b[i];
}

}  // namespace cpu
}  // namespace lpc
