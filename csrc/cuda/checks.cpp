// Host-side argument checks of the CUDA ops (declared in checks.h). Compiled by the host C++ compiler,
// never by nvcc: this is where every error message that formats a value (a shape, a dtype, a device, a
// number) is built, so no nvcc-compiled code streams a value into TORCH_CHECK (see checks.h for why).
//
// The messages are those the .cu files raised before they moved here; each names the argument.
#include "checks.h"

#include "../format.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>

namespace lpc_cuda {
namespace checks {

using at::Tensor;

namespace {

constexpr int64_t kMaxLaunch = int64_t(1) << 31;

void dim_is(const Tensor& t, int64_t dim, const char* name) {
  LPC_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

void contiguous(const Tensor& t, const char* name) {
  LPC_CHECK(t.is_contiguous(), name, " must be contiguous (the Python wrappers call .contiguous())");
}

void same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  LPC_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// A [B] vector of preference_loss (absent: nothing to check).
void pref_vec(const Tensor& t, const char* name, const Tensor& pc, bool allow_int) {
  if (!t.defined()) return;
  input(t, name, 1, pc, "pc");
  LPC_CHECK(t.size(0) == pc.size(0), name, " must have shape [B] = [", pc.size(0), "], got ", t.sizes());
  if (allow_int) {
    LPC_CHECK(t.is_floating_point() || t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                " must be a float or int32/int64 tensor, got ", t.scalar_type());
  } else {
    floating(t, name);
  }
}

int parse_loss_type(std::string_view v) {
  if (v == "dpo") return kDpo;
  if (v == "ipo") return kIpo;
  if (v == "simpo") return kSimpo;
  LPC_CHECK(false, "loss_type must be one of ['dpo', 'ipo', 'simpo'], got '", std::string(v), "'");
  return kDpo;
}

}  // namespace

// ------------------------------------------------------------------------------------- primitives
void cuda_tensor(const Tensor& t, const char* name) {
  LPC_CHECK(t.defined(), name, " must be a defined tensor");
  LPC_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
}

void input(const Tensor& t, const char* name, int64_t dim, const Tensor& ref, const char* ref_name) {
  cuda_tensor(t, name);
  dim_is(t, dim, name);
  contiguous(t, name);
  same_device(t, ref, name, ref_name);
}

void floating(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  LPC_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

void label_dtype(const Tensor& labels) {
  LPC_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "labels must be int64 or int32, got ", labels.scalar_type());
}

int vec_code(const Tensor& t, const char* name) {
  LPC_CHECK(t.defined(), name, " must be a defined tensor");
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kLong: return kI64;
    case at::kInt: return kI32;
    default: LPC_CHECK(false, name, " has an unsupported dtype ", t.scalar_type());
  }
  return kAbsent;
}

void fits_launch(int64_t count, const char* what) {
  LPC_CHECK(count < kMaxLaunch, what, " is too large for one launch (", count, " blocks or rows, limit ",
              kMaxLaunch - 1, ")");
}

// ------------------------------------------------------------------------------- token_logprobs
void token_logprobs_fwd(const Tensor& logits, const Tensor& labels) {
  input(logits, "logits", 2, logits, "logits");
  floating(logits, "logits");
  input(labels, "labels", 1, logits, "logits");
  label_dtype(labels);
  LPC_CHECK(labels.size(0) == logits.size(0), "labels must have shape [N] = [", logits.size(0), "], got ",
              labels.sizes());
  LPC_CHECK(logits.size(1) > 0, "logits must have V > 0 columns, got shape ", logits.sizes());
  fits_launch(logits.size(0), "logits (rows)");
}

void token_logprobs_bwd(const Tensor& grad_logp, const Tensor& logits, const Tensor& labels, const Tensor& lse) {
  input(logits, "logits", 2, logits, "logits");
  floating(logits, "logits");
  const int64_t n = logits.size(0);
  input(labels, "labels", 1, logits, "logits");
  label_dtype(labels);
  input(grad_logp, "grad_logp", 1, logits, "logits");
  input(lse, "lse", 1, logits, "logits");
  LPC_CHECK(labels.size(0) == n, "labels must have shape [N] = [", n, "], got ", labels.sizes());
  LPC_CHECK(grad_logp.size(0) == n, "grad_logp must have shape [N] = [", n, "], got ", grad_logp.sizes());
  LPC_CHECK(lse.size(0) == n, "lse must have shape [N] = [", n, "], got ", lse.sizes());
  floating(grad_logp, "grad_logp");
  floating(lse, "lse");
  fits_launch(n, "logits (rows)");
}

// ------------------------------------------------------------------------ linear_token_logprobs
void linear_token_logprobs(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& labels,
                           int64_t chunk_size) {
  input(hidden, "hidden", 2, hidden, "hidden");
  floating(hidden, "hidden");
  input(weight, "weight", 2, hidden, "hidden");
  LPC_CHECK(weight.scalar_type() == hidden.scalar_type(), "hidden (", hidden.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must have the same dtype");
  LPC_CHECK(weight.size(1) == hidden.size(1), "weight must have shape [V, H] with H = hidden.shape[1] = ",
              hidden.size(1), ", got ", weight.sizes());
  LPC_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "weight must have shape [V, H] with V, H > 0, got ",
              weight.sizes());
  input(labels, "labels", 1, hidden, "hidden");
  label_dtype(labels);
  LPC_CHECK(labels.size(0) == hidden.size(0), "labels must have shape [N] = [", hidden.size(0), "], got ",
              labels.sizes());
  LPC_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  if (bias.defined()) {
    input(bias, "bias", 1, hidden, "hidden");
    LPC_CHECK(bias.scalar_type() == weight.scalar_type(), "bias must have the dtype of weight (",
                weight.scalar_type(), "), got ", bias.scalar_type());
    LPC_CHECK(bias.size(0) == weight.size(0), "bias must have shape [V] = [", weight.size(0), "], got ",
                bias.sizes());
  }
  // The launch sizes depend on the valid rows (known after a device sync): the .cu checks them with
  // fits_launch once it has them.
}

void linear_token_logprobs_bwd(const Tensor& grad_logp, const Tensor& lse, const Tensor& hidden, bool need_bias,
                               bool has_bias) {
  const int64_t n = hidden.size(0);
  input(grad_logp, "grad_logp", 1, hidden, "hidden");
  input(lse, "lse", 1, hidden, "hidden");
  floating(grad_logp, "grad_logp");
  floating(lse, "lse");
  LPC_CHECK(grad_logp.size(0) == n, "grad_logp must have shape [N] = [", n, "], got ", grad_logp.sizes());
  LPC_CHECK(lse.size(0) == n, "lse must have shape [N] = [", n, "], got ", lse.sizes());
  LPC_CHECK(!need_bias || has_bias, "need_bias is true but bias is None");
}

// ------------------------------------------------------------------------- gumbel_softmax_codes
void gumbel_softmax_fwd(const Tensor& logits, const Tensor& codebook, double tau, int64_t seed, int64_t offset,
                        int64_t rows_per_block) {
  input(logits, "logits", 2, logits, "logits");
  floating(logits, "logits");
  input(codebook, "codebook", 2, logits, "logits");
  floating(codebook, "codebook");
  const int64_t B = logits.size(0), K = logits.size(1);
  LPC_CHECK(K > 0 && codebook.size(0) == K, "codebook must have shape [K, D] with K = logits.shape[1] = ", K,
              " > 0, got ", codebook.sizes());
  LPC_CHECK(tau > 0, "tau must be > 0, got ", tau);
  LPC_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  LPC_CHECK(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - B * K,
              "offset must be >= 0 with offset + B*K < 2**63, got offset=", offset, " and B*K=", B * K);
  fits_launch((B + rows_per_block - 1) / rows_per_block, "logits (rows)");
}

bool gumbel_softmax_bwd(const Tensor& grad_weights, const Tensor& grad_z, const Tensor& weights, const Tensor& soft,
                        const Tensor& codebook, double tau, int64_t rows_per_block) {
  input(weights, "weights", 2, weights, "weights");
  LPC_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble,
              "weights must be float32 or float64 (the forward's output), got ", weights.scalar_type());
  const int64_t B = weights.size(0), K = weights.size(1);
  input(codebook, "codebook", 2, weights, "weights");
  floating(codebook, "codebook");
  LPC_CHECK(codebook.size(0) == K, "codebook must have shape [K, D] with K = ", K, ", got ", codebook.sizes());
  const int64_t D = codebook.size(1);
  input(grad_weights, "grad_weights", 2, weights, "weights");
  floating(grad_weights, "grad_weights");
  LPC_CHECK(grad_weights.sizes() == weights.sizes(), "grad_weights must have shape ", weights.sizes(), ", got ",
              grad_weights.sizes());
  input(grad_z, "grad_z", 2, weights, "weights");
  floating(grad_z, "grad_z");
  LPC_CHECK(grad_z.size(0) == B && grad_z.size(1) == D, "grad_z must have shape [", B, ", ", D, "], got ",
              grad_z.sizes());
  cuda_tensor(soft, "soft");
  const bool has_soft = soft.numel() > 0;
  if (has_soft) {
    input(soft, "soft", 2, weights, "weights");
    LPC_CHECK(soft.sizes() == weights.sizes() && soft.scalar_type() == weights.scalar_type(),
                "soft must be [0]-shaped or match weights (", weights.sizes(), ", ", weights.scalar_type(),
                "), got ", soft.sizes(), ", ", soft.scalar_type());
  }
  LPC_CHECK(tau > 0, "tau must be > 0, got ", tau);
  fits_launch((B + rows_per_block - 1) / rows_per_block, "weights (rows)");
  return has_soft;
}

// ------------------------------------------------------------------------------ preference_loss
PrefShape preference_loss(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, const Tensor& cl,
                          const Tensor& rl, const Tensor& prior, const Tensor& post, std::string_view loss_type,
                          bool ipo_average, double beta, double label_smoothing, double kl_weight,
                          int64_t pairs_per_block) {
  input(pc, "pc", 1, pc, "pc");
  floating(pc, "pc");
  LPC_CHECK(pr.defined(), "pr must be a defined tensor");
  pref_vec(pr, "pr", pc, false);
  pref_vec(rc, "rc", pc, false);
  pref_vec(rr, "rr", pc, false);
  pref_vec(cl, "cl", pc, true);
  pref_vec(rl, "rl", pc, true);
  PrefShape s;
  s.loss_type = parse_loss_type(loss_type);
  s.B = pc.size(0);
  if (s.loss_type != kSimpo) {
    LPC_CHECK(rc.defined() && rr.defined(), "loss_type dpo/ipo needs rc and rr (reference log-probs)");
  }
  const bool need_lengths = s.loss_type == kSimpo || (s.loss_type == kIpo && ipo_average);
  if (need_lengths) LPC_CHECK(cl.defined() && rl.defined(), "this loss_type needs cl and rl (lengths)");
  LPC_CHECK(prior.defined() == post.defined(), "prior and post must be given together");
  if (prior.defined()) {
    input(prior, "prior", 2, pc, "pc");
    input(post, "post", 2, pc, "pc");
    floating(prior, "prior");
    floating(post, "post");
    LPC_CHECK(prior.sizes() == post.sizes() && prior.size(0) == s.B && prior.size(1) > 0,
                "prior and post must both have shape [B, K] with B = ", s.B, ", K > 0; got ", prior.sizes(),
                " and ", post.sizes());
    s.K = prior.size(1);
  }
  LPC_CHECK(beta > 0, "beta must be > 0, got ", beta);
  LPC_CHECK(label_smoothing >= 0 && label_smoothing <= 0.5, "label_smoothing must be in [0, 0.5], got ",
              label_smoothing);
  LPC_CHECK(kl_weight >= 0, "kl_weight must be >= 0, got ", kl_weight);
  LPC_CHECK(kl_weight == 0 || prior.defined(), "kl_weight=", kl_weight, " > 0 needs prior and post");
  LPC_CHECK(s.B > 0, "preference_loss needs at least one pair (pc is empty)");
  fits_launch((s.B + pairs_per_block - 1) / pairs_per_block, "pc (pairs)");
  return s;
}

void preference_loss_grads(const Tensor& grad_loss, const Tensor& grad_losses, const Tensor& grad_chosen_rewards,
                           const Tensor& grad_rejected_rewards, const Tensor& grad_kl, const Tensor& pc) {
  cuda_tensor(grad_loss, "grad_loss");
  same_device(grad_loss, pc, "grad_loss", "pc");
  LPC_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  floating(grad_loss, "grad_loss");
  const int64_t B = pc.size(0);
  const char* names[4] = {"grad_losses", "grad_chosen_rewards", "grad_rejected_rewards", "grad_kl"};
  const Tensor* gs[4] = {&grad_losses, &grad_chosen_rewards, &grad_rejected_rewards, &grad_kl};
  for (int j = 0; j < 4; ++j) {
    input(*gs[j], names[j], 1, pc, "pc");
    floating(*gs[j], names[j]);
    LPC_CHECK(gs[j]->size(0) == B, names[j], " must have shape [B] = [", B, "], got ", gs[j]->sizes());
  }
}

}  // namespace checks
}  // namespace lpc_cuda
