// Philox4x32-10 counter-based random numbers, bit-exact with lpc_kernels/philox.py and Triton's tl.rand.
// Header-only and free of torch includes so that csrc/cpu/*.cpp and csrc/cuda/*.cu share one definition.
//
// The Gumbel noise of element (b, k) is a pure function of (seed, offset + b * K + k):
//   counter words (c & 0xffffffff, c >> 32, 0, 0), key (seed & 0xffffffff, seed >> 32),
//   ten Philox rounds, first output word x read as int32,
//   u = float(x < 0 ? ~x : x) * 4.6566127342e-10f, then
//   gumbel = -log(-log(clamp(u, 2^-32, 1 - 2^-24))) in float32.
// The integer part and the uniform are exact on every device. The two logs are exact only if they are
// the same log implementation as the reference's: torch's CPU log (MKL VML) and glibc's logf differ by
// one ulp on ~8% of inputs, so the CPU backend applies torch's own log to the uniforms from
// philox_uniform(); gumbel_from_uniform() below is the portable single-element form (CUDA: note that
// --use_fast_math turns logf into the less accurate __logf).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LPC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LPC_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define LPC_LOGF(x) logf(x)
#else
#include <cmath>
#define LPC_LOGF(x) std::log(x)
#endif

namespace lpc {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplier of words 0/1 (Salmon et al., SC'11)
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplier of words 2/3
constexpr uint32_t kKeyA = 0x9E3779B9u;    // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest scale with INT32_MAX * scale < 1 (Triton's)
constexpr float kGumbelUMin = 2.3283064365386963e-10f;  // 2^-32: keeps -log(u) finite at u = 0
constexpr float kGumbelUMax = 0.99999994039535522f;     // 1 - 2^-24: keeps -log(-log(u)) finite

LPC_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32-10 for counter (c & 0xffffffff, c >> 32, 0, 0) and the 64-bit seed.
LPC_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t hi_b = mulhi32(c2, kRoundB), lo_b = c2 * kRoundB;
    const uint32_t hi_a = mulhi32(c0, kRoundA), lo_a = c0 * kRoundA;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand's map of a 32-bit word to [0, 1): fold the int32 onto [0, 2^31) with ~x, scale in float32.
LPC_HOST_DEVICE float uint32_to_uniform(uint32_t x) {
  const int32_t s = static_cast<int32_t>(x);
  const int32_t folded = s < 0 ? ~s : s;
  return static_cast<float>(folded) * kUniformScale;
}

LPC_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t counter) {
  return uint32_to_uniform(philox_first_word(seed, counter));
}

LPC_HOST_DEVICE float clamp_uniform(float u) {
  return u < kGumbelUMin ? kGumbelUMin : (u > kGumbelUMax ? kGumbelUMax : u);
}

// -log(-log(clamp(u))) in float32 with the platform's logf (see the note at the top on exactness).
LPC_HOST_DEVICE float gumbel_from_uniform(float u) {
  return -LPC_LOGF(-LPC_LOGF(clamp_uniform(u)));
}

}  // namespace philox
}  // namespace lpc
