// preference_loss on CPU: DPO / IPO / SimPO pair losses plus kl_weight * KL(q || p), forward and backward,
// each one fused pass over the B pairs (parallel over pairs). Same math as lpc_kernels/reference.py:
//
//   margin h = a_w * (pc - rc) - a_l * (pr - rr) (+ const), rewards = reward_scale * a * (policy - ref)
//     dpo:   a_w = a_l = beta,                      reward_scale 1
//     ipo:   a = 1/|y| (or 1 without ipo_average),  reward_scale beta, h = dw - dl
//     simpo: a = beta/|y|, ref = 0, h -= gamma,      reward_scale 1
//   pair loss: ipo (h - 1/(2 beta))^2; else -(1-eps) logsigmoid(h) - eps logsigmoid(-h)
//   KL(q||p) = sum_k q_k (log q_k - log p_k) from log-softmax of the logits (never log of a softmax)
//   losses = pair + kl_weight * kl, loss = mean(losses)
// Backward: with G = grad_loss / B + grad_losses and slope = d pair / d h,
//   d_pc = a_w (G slope + reward_scale grad_chosen_rewards), d_pr = a_l (reward_scale grad_rejected_rewards
//   - G slope), d_rc = -d_pc, d_rr = -d_pr, and with gk = G kl_weight + grad_kl:
//   d_post = gk q (log q - log p - kl), d_prior = gk (p - q).
#include "common.h"

#include <ATen/ops/empty.h>

#include <string>

namespace lpc {
namespace cpu {
namespace {

enum class LossType { kDpo, kIpo, kSimpo };

LossType parse_loss_type(c10::string_view s) {
  if (s == "dpo") return LossType::kDpo;
  if (s == "ipo") return LossType::kIpo;
  LPC_CHECK(s == "simpo", "loss_type must be one of 'dpo', 'ipo', 'simpo', got '", std::string(s), "'");
  return LossType::kSimpo;
}

struct Options {
  LossType type;
  double beta, gamma, eps, kl_weight;
  bool ipo_average;
};

// Inputs upcast to the compute dtype (B-sized copies at most); undefined where absent.
struct Inputs {
  int64_t b = 0, k = 0;
  at::ScalarType cdt;
  at::Tensor pc, pr, rc, rr, cl, rl, prior, post;
};

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor vec_input(const at::Tensor& t, const char* name, int64_t b, at::ScalarType cdt, bool allow_int) {
  check_tensor(t, name, 1);
  const auto dt = t.scalar_type();
  LPC_CHECK(is_float_dtype(dt) || (allow_int && (dt == at::kLong || dt == at::kInt)), name,
              allow_int ? " must be a float or int32/int64 tensor, got " : " must be a float tensor, got ", dt);
  check_size(t, name, 0, b, "B = policy_chosen_logps.size(0)");
  return dt == cdt ? t : t.to(cdt);
}

Inputs check_inputs(const at::Tensor& pc, const at::Tensor& pr, const c10::optional<at::Tensor>& rc,
                    const c10::optional<at::Tensor>& rr, const c10::optional<at::Tensor>& cl,
                    const c10::optional<at::Tensor>& rl, const c10::optional<at::Tensor>& prior,
                    const c10::optional<at::Tensor>& post, const Options& o) {
  Inputs in;
  check_float(pc, "pc", 1);
  in.b = pc.size(0);
  LPC_CHECK(in.b > 0, "pc must hold at least one pair, got shape ", pc.sizes());
  in.cdt = acc_dtype(pc.scalar_type());
  in.pc = vec_input(pc, "pc", in.b, in.cdt, false);
  in.pr = vec_input(pr, "pr", in.b, in.cdt, false);
  LPC_CHECK(present(rc) == present(rr), "rc and rr must be given together");
  if (present(rc)) {
    in.rc = vec_input(*rc, "rc", in.b, in.cdt, false);
    in.rr = vec_input(*rr, "rr", in.b, in.cdt, false);
  }
  LPC_CHECK(o.type == LossType::kSimpo || present(rc), "loss_type dpo/ipo needs rc and rr");
  LPC_CHECK(o.type != LossType::kSimpo || !present(rc), "loss_type simpo is reference-free: rc/rr must be None");
  const bool need_lengths = o.type == LossType::kSimpo || (o.type == LossType::kIpo && o.ipo_average);
  if (present(cl)) in.cl = vec_input(*cl, "cl", in.b, in.cdt, true);
  if (present(rl)) in.rl = vec_input(*rl, "rl", in.b, in.cdt, true);
  LPC_CHECK(!need_lengths || (in.cl.defined() && in.rl.defined()),
              "cl and rl (response lengths) are required for simpo and for ipo with ipo_average");
  LPC_CHECK(present(prior) == present(post), "prior and post must be given together");
  if (present(prior)) {
    check_float(*prior, "prior", 2);
    check_float(*post, "post", 2);
    check_size(*prior, "prior", 0, in.b, "B");
    LPC_CHECK(prior->sizes() == post->sizes(), "prior and post must have the same shape, got ", prior->sizes(),
                " and ", post->sizes());
    in.k = prior->size(1);
    LPC_CHECK(in.k > 0, "prior must have K > 0 columns, got shape ", prior->sizes());
    in.prior = prior->scalar_type() == in.cdt ? *prior : prior->to(in.cdt);
    in.post = post->scalar_type() == in.cdt ? *post : post->to(in.cdt);
  }
  LPC_CHECK(o.kl_weight == 0.0 || in.prior.defined(), "kl_weight > 0 needs prior and post");
  LPC_CHECK(std::isfinite(o.beta) && o.beta > 0, "beta must be finite and > 0, got ", o.beta);
  return in;
}

template <typename acc>
const acc* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

// Per-pair terms of the margin: h, the scales a_w, a_l, and the rewards.
template <typename acc>
struct Pair {
  acc h, a_w, a_l, chosen_reward, rejected_reward;
};

template <typename acc>
Pair<acc> pair_terms(const Options& o, acc pc, acc pr, const acc* rc, const acc* rr, const acc* cl, const acc* rl,
                     int64_t i) {
  const acc beta = static_cast<acc>(o.beta);
  Pair<acc> t;
  if (o.type == LossType::kSimpo) {
    t.a_w = beta / cl[i];
    t.a_l = beta / rl[i];
    t.chosen_reward = t.a_w * pc;
    t.rejected_reward = t.a_l * pr;
    t.h = t.chosen_reward - t.rejected_reward - static_cast<acc>(o.gamma);
  } else if (o.type == LossType::kIpo) {
    t.a_w = o.ipo_average ? acc(1) / cl[i] : acc(1);
    t.a_l = o.ipo_average ? acc(1) / rl[i] : acc(1);
    const acc dw = t.a_w * (pc - rc[i]), dl = t.a_l * (pr - rr[i]);
    t.h = dw - dl;
    t.chosen_reward = beta * dw;
    t.rejected_reward = beta * dl;
  } else {
    t.a_w = t.a_l = beta;
    const acc dw = beta * (pc - rc[i]), dl = beta * (pr - rr[i]);
    t.h = dw - dl;
    t.chosen_reward = dw;
    t.rejected_reward = dl;
  }
  return t;
}

template <typename acc>
acc log_sigmoid(acc x) {  // min(x, 0) - log1p(exp(-|x|)): no overflow for any x
  return std::min(x, acc(0)) - std::log1p(std::exp(-std::abs(x)));
}

template <typename acc>
acc sigmoid(acc x) {
  if (x >= 0) return acc(1) / (acc(1) + std::exp(-x));
  const acc e = std::exp(x);
  return e / (acc(1) + e);
}

// pair loss and its slope d loss / d h
template <typename acc>
void pair_loss(const Options& o, acc h, acc& loss, acc& slope) {
  if (o.type == LossType::kIpo) {
    const acc t = h - static_cast<acc>(1.0 / (2.0 * o.beta));
    loss = t * t;
    slope = acc(2) * t;
    return;
  }
  const acc keep = static_cast<acc>(1.0 - o.eps), eps = static_cast<acc>(o.eps);
  loss = -keep * log_sigmoid(h) - eps * log_sigmoid(-h);
  slope = -keep * sigmoid(-h) + eps * sigmoid(h);
}

// Row i of the KL term: log-sum-exps of prior (p) and posterior (q) logits, and KL(q || p).
template <typename acc>
struct KlRow {
  acc lse_p, lse_q, kl;
};

template <typename acc>
acc row_lse_small(const acc* x, int64_t k) {
  acc m = -std::numeric_limits<acc>::infinity();
  for (int64_t j = 0; j < k; ++j) m = x[j] > m ? x[j] : m;
  acc s = 0;
  for (int64_t j = 0; j < k; ++j) s += std::exp(x[j] - m);
  return m + std::log(s);
}

template <typename acc>
KlRow<acc> kl_row(const acc* prior, const acc* post, int64_t k) {
  KlRow<acc> r;
  r.lse_p = row_lse_small(prior, k);
  r.lse_q = row_lse_small(post, k);
  r.kl = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc lq = post[j] - r.lse_q, lp = prior[j] - r.lse_p;
    r.kl += std::exp(lq) * (lq - lp);
  }
  return r;
}

template <typename acc>
void fwd_kernel(const Inputs& in, const Options& o, acc* losses, acc* cr, acc* rj, acc* kl, acc* loss) {
  const acc *pc = ptr<acc>(in.pc), *pr = ptr<acc>(in.pr), *rc = ptr<acc>(in.rc), *rr = ptr<acc>(in.rr);
  const acc *cl = ptr<acc>(in.cl), *rl = ptr<acc>(in.rl), *prior = ptr<acc>(in.prior), *post = ptr<acc>(in.post);
  const acc klw = static_cast<acc>(o.kl_weight);
  at::parallel_for(0, in.b, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Pair<acc> t = pair_terms(o, pc[i], pr[i], rc, rr, cl, rl, i);
      acc pl, slope;
      pair_loss(o, t.h, pl, slope);
      kl[i] = prior != nullptr ? kl_row(prior + i * in.k, post + i * in.k, in.k).kl : acc(0);
      losses[i] = pl + klw * kl[i];
      cr[i] = t.chosen_reward;
      rj[i] = t.rejected_reward;
    }
  });
  double total = 0;  // B terms: the mean in double, then rounded once
  for (int64_t i = 0; i < in.b; ++i) total += losses[i];
  *loss = static_cast<acc>(total / static_cast<double>(in.b));
}

template <typename acc>
void bwd_kernel(const Inputs& in, const Options& o, acc grad_loss, const acc* grad_losses,
                const acc* grad_chosen_rewards, const acc* grad_rejected_rewards, const acc* grad_kl, acc* d_pc,
                acc* d_pr, acc* d_prior, acc* d_post) {
  const acc *pc = ptr<acc>(in.pc), *pr = ptr<acc>(in.pr), *rc = ptr<acc>(in.rc), *rr = ptr<acc>(in.rr);
  const acc *cl = ptr<acc>(in.cl), *rl = ptr<acc>(in.rl), *prior = ptr<acc>(in.prior), *post = ptr<acc>(in.post);
  const acc klw = static_cast<acc>(o.kl_weight);
  const acc reward_scale = o.type == LossType::kIpo ? static_cast<acc>(o.beta) : acc(1);
  const acc g_mean = grad_loss / static_cast<acc>(in.b);
  const int64_t k = in.k;
  at::parallel_for(0, in.b, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Pair<acc> t = pair_terms(o, pc[i], pr[i], rc, rr, cl, rl, i);
      acc pl, slope;
      pair_loss(o, t.h, pl, slope);
      const acc g_each = g_mean + grad_losses[i];
      const acc dh = g_each * slope;
      d_pc[i] = t.a_w * (dh + reward_scale * grad_chosen_rewards[i]);
      d_pr[i] = t.a_l * (reward_scale * grad_rejected_rewards[i] - dh);
      if (prior == nullptr) continue;
      const acc* xp = prior + i * k;
      const acc* xq = post + i * k;
      const KlRow<acc> r = kl_row(xp, xq, k);
      const acc gk = g_each * klw + grad_kl[i];
      for (int64_t j = 0; j < k; ++j) {
        const acc lq = xq[j] - r.lse_q, lp = xp[j] - r.lse_p;
        const acc q = std::exp(lq), p = std::exp(lp);
        d_post[i * k + j] = gk * q * (lq - lp - r.kl);
        d_prior[i * k + j] = gk * (p - q);
      }
    }
  });
}

Options make_options(c10::string_view loss_type, double beta, double gamma, double label_smoothing,
                     double kl_weight, bool ipo_average) {
  return {parse_loss_type(loss_type), beta, gamma, label_smoothing, kl_weight, ipo_average};
}

at::Tensor grad_vector(const at::Tensor& t, const char* name, int64_t b, at::ScalarType cdt) {
  check_float(t, name, 1);
  check_size(t, name, 0, b, "B");
  return t.scalar_type() == cdt ? t : t.to(cdt);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_fwd(
    const at::Tensor& pc, const at::Tensor& pr, const c10::optional<at::Tensor>& rc,
    const c10::optional<at::Tensor>& rr, const c10::optional<at::Tensor>& cl, const c10::optional<at::Tensor>& rl,
    const c10::optional<at::Tensor>& prior, const c10::optional<at::Tensor>& post, c10::string_view loss_type,
    double beta, double gamma, double label_smoothing, double kl_weight, bool ipo_average) {
  const Options o = make_options(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average);
  const Inputs in = check_inputs(pc, pr, rc, rr, cl, rl, prior, post, o);
  const auto opts = pc.options().dtype(in.cdt);
  at::Tensor loss = at::empty({}, opts), losses = at::empty({in.b}, opts), cr = at::empty({in.b}, opts),
             rj = at::empty({in.b}, opts), kl = at::empty({in.b}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.cdt, "preference_loss_fwd", [&] {
    fwd_kernel<scalar_t>(in, o, losses.mutable_data_ptr<scalar_t>(), cr.mutable_data_ptr<scalar_t>(),
                         rj.mutable_data_ptr<scalar_t>(), kl.mutable_data_ptr<scalar_t>(),
                         loss.mutable_data_ptr<scalar_t>());
  });
  return {loss, losses, cr, rj, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& grad_losses, const at::Tensor& grad_chosen_rewards,
    const at::Tensor& grad_rejected_rewards, const at::Tensor& grad_kl, const at::Tensor& pc, const at::Tensor& pr,
    const c10::optional<at::Tensor>& rc, const c10::optional<at::Tensor>& rr, const c10::optional<at::Tensor>& cl,
    const c10::optional<at::Tensor>& rl, const c10::optional<at::Tensor>& prior,
    const c10::optional<at::Tensor>& post, c10::string_view loss_type, double beta, double gamma,
    double label_smoothing, double kl_weight, bool ipo_average) {
  const Options o = make_options(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average);
  const Inputs in = check_inputs(pc, pr, rc, rr, cl, rl, prior, post, o);
  LPC_CHECK(grad_loss.numel() == 1 && grad_loss.dim() == 0, "grad_loss must be a 0-d tensor, got shape ",
            grad_loss.sizes());
  LPC_CHECK(is_float_dtype(grad_loss.scalar_type()), "grad_loss must be a float tensor, got ",
            grad_loss.scalar_type());
  const at::Tensor gl = grad_vector(grad_losses, "grad_losses", in.b, in.cdt);
  const at::Tensor gc = grad_vector(grad_chosen_rewards, "grad_chosen_rewards", in.b, in.cdt);
  const at::Tensor gr = grad_vector(grad_rejected_rewards, "grad_rejected_rewards", in.b, in.cdt);
  const at::Tensor gk = grad_vector(grad_kl, "grad_kl", in.b, in.cdt);
  const auto opts = pc.options().dtype(in.cdt);
  at::Tensor d_pc = at::empty({in.b}, opts), d_pr = at::empty({in.b}, opts);
  at::Tensor d_prior, d_post;
  if (in.prior.defined()) {
    d_prior = at::empty({in.b, in.k}, opts);
    d_post = at::empty({in.b, in.k}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(in.cdt, "preference_loss_bwd", [&] {
    bwd_kernel<scalar_t>(in, o, grad_loss.item().to<scalar_t>(), gl.const_data_ptr<scalar_t>(),
                         gc.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(),
                         d_pc.mutable_data_ptr<scalar_t>(), d_pr.mutable_data_ptr<scalar_t>(),
                         in.prior.defined() ? d_prior.mutable_data_ptr<scalar_t>() : nullptr,
                         in.post.defined() ? d_post.mutable_data_ptr<scalar_t>() : nullptr);
  });
  // gradients in their input's dtype; [0]-shaped where the input is absent
  auto none = [&] { return at::empty({0}, pc.options()); };  // a fresh one each: outputs may not alias
  auto as = [](const at::Tensor& g, at::ScalarType dt) { return g.scalar_type() == dt ? g : g.to(dt); };
  at::Tensor d_rc = in.rc.defined() ? as(d_pc.neg(), rc->scalar_type()) : none();
  at::Tensor d_rr = in.rr.defined() ? as(d_pr.neg(), rr->scalar_type()) : none();
  return {as(d_pc, pc.scalar_type()),
          as(d_pr, pr.scalar_type()),
          d_rc,
          d_rr,
          d_prior.defined() ? as(d_prior, prior->scalar_type()) : none(),
          d_post.defined() ? as(d_post, post->scalar_type()) : none()};
}

TORCH_LIBRARY_IMPL(lpc, CPU, m) {
  m.impl("preference_loss_fwd", &preference_loss_fwd);
  m.impl("preference_loss_bwd", &preference_loss_bwd);
}

}  // namespace cpu
}  // namespace lpc
