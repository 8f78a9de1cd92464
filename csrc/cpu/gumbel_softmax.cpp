// gumbel_softmax_codes on CPU: w = softmax((logits + G) / tau) (one-hot of its first argmax when hard),
// z = w @ codebook, and the straight-through backward.
//
// Noise: element (b, k) draws Philox4x32-10 at counter offset + b*K + k (csrc/philox.h, the same function
// as lpc_kernels/philox.py); the uniforms go through torch's own log kernel, twice, so the float32 noise
// is bit-identical to the reference backend's on CPU (glibc logf differs from it by an ulp on ~8% of
// inputs, which would flip hard samples at near-ties and break exact cross-backend comparisons).
// The softmax, argmax and backward are fused row kernels in the compute dtype (fp32, fp64 for fp64).
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "../philox.h"

namespace lpc {
namespace cpu {
namespace {

// float32 Gumbel noise [b, k] for counters offset + j, j = 0 .. b*k - 1.
at::Tensor gumbel_noise(int64_t b, int64_t k, int64_t seed, int64_t offset, const at::TensorOptions& opts) {
  at::Tensor u = at::empty({b, k}, opts.dtype(at::kFloat));
  float* pu = u.mutable_data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  at::parallel_for(0, b * k, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) pu[j] = philox::philox_uniform(s, o + static_cast<uint64_t>(j));
  });
  // -log(-log(clamp(u))) with torch's log: see the file comment.
  return u.clamp_(philox::kGumbelUMin, philox::kGumbelUMax).log_().neg_().log_().neg_();
}

template <typename scalar_t>
void sample_kernel(const scalar_t* logits, const float* noise, int64_t b, int64_t k, double tau, bool hard,
                   acc_t<scalar_t>* soft, acc_t<scalar_t>* weights, int64_t* argmax) {
  using acc = acc_t<scalar_t>;
  const acc t = static_cast<acc>(tau);
  at::parallel_for(0, b, row_grain(4 * k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = logits + i * k;
      const float* g = noise + i * k;
      acc* p = soft + i * k;
      acc m = -std::numeric_limits<acc>::infinity();
      for (int64_t j = 0; j < k; ++j) {
        p[j] = (static_cast<acc>(x[j]) + static_cast<acc>(g[j])) / t;
        m = p[j] > m ? p[j] : m;
      }
      acc s = 0;
      for (int64_t j = 0; j < k; ++j) s += (p[j] = std::exp(p[j] - m));
      int64_t best = 0;
      for (int64_t j = 0; j < k; ++j) {
        p[j] /= s;
        if (p[j] > p[best]) best = j;  // first maximum of the soft sample, as torch.argmax
      }
      if (hard) {
        acc* w = weights + i * k;
        std::fill(w, w + k, acc(0));
        w[best] = acc(1);
        argmax[i] = best;
      }
    }
  });
}

// grad_logits = soft * (g - <g, soft>) / tau with g = grad_weights + grad_z @ codebook^T (precomputed).
template <typename acc>
void softmax_bwd_kernel(const acc* g, const acc* soft, int64_t b, int64_t k, double tau, acc* out) {
  const acc t = static_cast<acc>(tau);
  at::parallel_for(0, b, row_grain(4 * k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc* gi = g + i * k;
      const acc* si = soft + i * k;
      acc dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += gi[j] * si[j];
      for (int64_t j = 0; j < k; ++j) out[i * k + j] = si[j] * (gi[j] - dot) / t;
    }
  });
}

void check_tau(double tau) {
  LPC_CHECK(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_softmax_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& codebook, double tau,
                                                                  bool hard, int64_t seed, int64_t offset) {
  check_float(logits, "logits", 2);
  check_float(codebook, "codebook", 2);
  const int64_t b = logits.size(0), k = logits.size(1);
  LPC_CHECK(b > 0 && k > 0, "logits must have shape [B, K] with B, K > 0, got ", logits.sizes());
  check_size(codebook, "codebook", 0, k, "K = logits.size(1)");
  check_tau(tau);
  LPC_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  LPC_CHECK(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - b * k,
              "offset must be >= 0 with offset + B*K < 2**63, got offset=", offset);
  const at::ScalarType cdt = acc_dtype(logits.scalar_type());
  const at::Tensor noise = gumbel_noise(b, k, seed, offset, logits.options());
  at::Tensor soft = at::empty({b, k}, logits.options().dtype(cdt));
  at::Tensor weights = hard ? at::empty({b, k}, soft.options()) : soft;
  at::Tensor argmax = hard ? at::empty({b}, logits.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_fwd", [&] {
    using acc = acc_t<scalar_t>;
    sample_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), noise.const_data_ptr<float>(), b, k, tau, hard,
                            soft.mutable_data_ptr<acc>(), weights.mutable_data_ptr<acc>(),
                            hard ? argmax.mutable_data_ptr<int64_t>() : nullptr);
  });
  // z = w @ E: for one-hot weights that is a row gather (exact, no GEMM).
  at::Tensor z = hard ? codebook.index_select(0, argmax)
                      : at::mm(soft, codebook.scalar_type() == cdt ? codebook : codebook.to(cdt));
  if (z.scalar_type() != codebook.scalar_type()) z = z.to(codebook.scalar_type());
  return {weights, z, hard ? soft : at::empty({0}, soft.options())};
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_bwd(const at::Tensor& grad_weights, const at::Tensor& grad_z,
                                                      const at::Tensor& weights, const at::Tensor& soft,
                                                      const at::Tensor& codebook, double tau, bool need_logits,
                                                      bool need_codebook) {
  check_float(weights, "weights", 2);
  const at::ScalarType cdt = weights.scalar_type();
  LPC_CHECK(cdt == at::kFloat || cdt == at::kDouble, "weights must be float32 or float64, got ", cdt);
  const int64_t b = weights.size(0), k = weights.size(1);
  check_float(codebook, "codebook", 2);
  check_size(codebook, "codebook", 0, k, "K = weights.size(1)");
  const int64_t d = codebook.size(1);
  check_float(grad_weights, "grad_weights", 2);
  check_size(grad_weights, "grad_weights", 0, b, "B");
  check_size(grad_weights, "grad_weights", 1, k, "K");
  check_float(grad_z, "grad_z", 2);
  check_size(grad_z, "grad_z", 0, b, "B");
  check_size(grad_z, "grad_z", 1, d, "D = codebook.size(1)");
  LPC_CHECK(soft.numel() == 0 || soft.sizes() == weights.sizes(), "soft must have shape [0] (soft samples) or ",
              weights.sizes(), " like weights, got ", soft.sizes());
  if (soft.numel() != 0) {
    check_float(soft, "soft", 2);
    LPC_CHECK(soft.scalar_type() == cdt, "soft must have weights' dtype ", cdt, ", got ", soft.scalar_type());
  }
  check_tau(tau);
  const at::Tensor s = soft.numel() != 0 ? soft : weights;
  const at::Tensor gz = grad_z.scalar_type() == cdt ? grad_z : grad_z.to(cdt);
  // [0]-shaped stand-ins for gradients not asked for: one each, since outputs may not alias
  at::Tensor g_logits = at::empty({0}, s.options()), g_codebook = at::empty({0}, s.options());
  if (need_logits) {
    const at::Tensor e = codebook.scalar_type() == cdt ? codebook : codebook.to(cdt);
    const at::Tensor gw = grad_weights.scalar_type() == cdt ? grad_weights : grad_weights.to(cdt);
    const at::Tensor g = gw.addmm(gz, e.t());  // straight-through: the soft sample carries the gradient
    g_logits = at::empty({b, k}, s.options());
    AT_DISPATCH_FLOATING_TYPES(cdt, "gumbel_softmax_bwd", [&] {
      softmax_bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), b, k, tau,
                                   g_logits.mutable_data_ptr<scalar_t>());
    });
  }
  if (need_codebook) {
    g_codebook = at::mm(weights.t(), gz);
    if (g_codebook.scalar_type() != codebook.scalar_type()) g_codebook = g_codebook.to(codebook.scalar_type());
  }
  return {g_logits, g_codebook};
}

TORCH_LIBRARY_IMPL(lpc, CPU, m) {
  m.impl("gumbel_softmax_fwd", &gumbel_softmax_fwd);
  m.impl("gumbel_softmax_bwd", &gumbel_softmax_bwd);
}

}  // namespace cpu
}  // namespace lpc
