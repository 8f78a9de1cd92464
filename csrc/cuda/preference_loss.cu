// preference_loss forward and backward (lpc::preference_loss_fwd, _bwd) for CUDA tensors, one kernel launch
// each.
//
// A warp per pair, 8 pairs per block. Per pair (compute dtype acc_t: fp32, fp64 for fp64 policy logps):
//   margin h and reward scales a_w, a_l (lpc_kernels.reference._pair_terms):
//     dpo:   h = beta (pc - rc) - beta (pr - rr)                    a = beta
//     ipo:   h = a_w (pc - rc) - a_l (pr - rr), a = 1/len or 1      rewards beta * a * (policy - ref)
//     simpo: h = a_w pc - a_l pr - gamma, a = beta / len            rewards a * policy
//   pair loss: -(1-eps) logsigmoid(h) - eps logsigmoid(-h) (dpo, simpo), (h - 1/(2 beta))^2 (ipo);
//   KL(q || p) over K codes from log-softmax of the logits: the warp's lanes stride over K, an online
//   log-sum-exp gives both normalisers in one pass, a second pass sums q (log q - log p).
// The scalar loss is the mean of losses[B], reduced deterministically inside the same launch: each block
// writes the sum of its pairs (fixed order) to a partials buffer, and the last block to finish (atomic
// ticket) sums the partials in a fixed tree order. The result does not depend on block scheduling.
//
// Backward, per pair: g_each = grad_loss / B + grad_losses; dh = g_each * slope(h); with rs = beta for ipo
// (else 1), d pc = a_w (dh + rs grad_chosen_rewards), d pr = a_l (rs grad_rejected_rewards - dh), d rc = -d pc,
// d rr = -d pr; with gk = g_each kl_weight + grad_kl: d post = gk q (log q - log p - KL), d prior = gk (p - q).
// The [B] inputs may have any float dtype (lengths: any int or float dtype) and gradients are written in
// each input's dtype, through type codes (AnyVec), so mixed dtypes cost no extra launches.
//
// Argument checks: checks.cpp (host compiler), called first by each entry point.
#include "common.cuh"

#include <torch/library.h>

#include <optional>
#include <string_view>

namespace lpc_cuda {
namespace {

constexpr int kPairs = 8;  // pairs per block, one warp each
constexpr int kThreads = 32 * kPairs;

// LossType (kDpo, kIpo, kSimpo): checks.h, which parses loss_type.

template <typename acc_t>
struct PrefParams {
  AnyVec pc, pr, rc, rr, cl, rl;
  int loss_type;
  bool ipo_average;
  acc_t beta, gamma, eps, kl_weight;
  int64_t B, K;  // K = 0 without prior/posterior logits
};

template <typename acc_t>
struct PairTerms {
  acc_t h, a_w, a_l, cr, rj;
};

template <typename acc_t>
__device__ __forceinline__ PairTerms<acc_t> pair_terms(const PrefParams<acc_t>& p, int64_t i) {
  const acc_t pc = any_load<acc_t>(p.pc, i), pr = any_load<acc_t>(p.pr, i);
  PairTerms<acc_t> t;
  if (p.loss_type == kSimpo) {
    t.a_w = d_div(p.beta, any_load<acc_t>(p.cl, i));
    t.a_l = d_div(p.beta, any_load<acc_t>(p.rl, i));
    t.cr = t.a_w * pc;
    t.rj = t.a_l * pr;
    t.h = t.cr - t.rj - p.gamma;
    return t;
  }
  const acc_t rc = any_load<acc_t>(p.rc, i), rr = any_load<acc_t>(p.rr, i);
  if (p.loss_type == kIpo) {
    t.a_w = p.ipo_average ? d_div(acc_t(1), any_load<acc_t>(p.cl, i)) : acc_t(1);
    t.a_l = p.ipo_average ? d_div(acc_t(1), any_load<acc_t>(p.rl, i)) : acc_t(1);
    const acc_t dw = t.a_w * (pc - rc), dl = t.a_l * (pr - rr);
    t.h = dw - dl;
    t.cr = p.beta * dw;
    t.rj = p.beta * dl;
    return t;
  }
  t.a_w = t.a_l = p.beta;
  t.cr = p.beta * (pc - rc);
  t.rj = p.beta * (pr - rr);
  t.h = t.cr - t.rj;
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t log_sigmoid(acc_t x) {  // min(x, 0) - log1p(exp(-|x|))
  const acc_t ax = x < acc_t(0) ? -x : x;
  return (x < acc_t(0) ? x : acc_t(0)) - d_log1p(d_exp(-ax));
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  if (x >= acc_t(0)) return d_div(acc_t(1), acc_t(1) + d_exp(-x));
  const acc_t e = d_exp(x);
  return d_div(e, acc_t(1) + e);
}

// (loss, d loss / d h) of one pair.
template <typename acc_t>
__device__ __forceinline__ void pair_loss(const PrefParams<acc_t>& p, acc_t h, acc_t& loss, acc_t& slope) {
  if (p.loss_type == kIpo) {
    const acc_t t = h - d_div(acc_t(1), acc_t(2) * p.beta);
    loss = t * t;
    slope = acc_t(2) * t;
    return;
  }
  const acc_t eps = p.eps;
  loss = -(acc_t(1) - eps) * log_sigmoid(h) - eps * log_sigmoid(-h);
  slope = -(acc_t(1) - eps) * sigmoid(-h) + eps * sigmoid(h);
}

// Log-normalisers of softmax(post) and softmax(prior) over the row (warp-wide), and KL(q || p).
template <typename acc_t, typename lt_t>
struct KlRow {
  acc_t lse_q, lse_p, kl;
};

template <typename acc_t, typename lt_t>
__device__ __forceinline__ KlRow<acc_t, lt_t> kl_row(const lt_t* prior, const lt_t* post, int64_t K, int lane) {
  MaxSum<acc_t> q = ms_init<acc_t>(), pp = ms_init<acc_t>();
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t xq[1] = {to_acc<acc_t>(post[k])};
    const acc_t xp[1] = {to_acc<acc_t>(prior[k])};
    ms_add(q, xq);
    ms_add(pp, xp);
  }
  q = warp_ms(q);
  pp = warp_ms(pp);
  KlRow<acc_t, lt_t> r;
  r.lse_q = q.m + d_log(q.s);
  r.lse_p = pp.m + d_log(pp.s);
  acc_t kl = 0;
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t lq = to_acc<acc_t>(post[k]) - r.lse_q;
    const acc_t lp = to_acc<acc_t>(prior[k]) - r.lse_p;
    kl += d_exp(lq) * (lq - lp);
  }
  r.kl = warp_sum(kl);
  return r;
}

// Deterministic mean of the per-block partial sums, by the last block to finish (all threads of that
// block call this; `partials` were written by thread 0 of each block before its ticket).
template <typename acc_t>
__device__ void finish_mean(const acc_t* partials, unsigned* ticket, int64_t B, acc_t* out) {
  __shared__ bool s_last;
  __shared__ acc_t s_red[kThreads];
  if (threadIdx.x == 0) {
    __threadfence();  // this block's partial is visible before its ticket
    const unsigned done = atomicAdd(ticket, 1u);
    s_last = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  acc_t acc = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kThreads) {
    acc += *reinterpret_cast<const volatile acc_t*>(partials + i);  // bypass L1: other blocks wrote these
  }
  s_red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s_red[threadIdx.x] += s_red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = d_div(s_red[0], static_cast<acc_t>(B));
    *ticket = 0u;  // tidy (the buffer is not reused)
  }
}

template <typename acc_t, typename lt_t>
__global__ void __launch_bounds__(kThreads) preference_fwd_kernel(PrefParams<acc_t> p, const lt_t* __restrict__ prior,
                                                                  const lt_t* __restrict__ post, acc_t* loss,
                                                                  acc_t* __restrict__ losses, acc_t* __restrict__ cr,
                                                                  acc_t* __restrict__ rj, acc_t* __restrict__ kl_out,
                                                                  acc_t* partials, unsigned* ticket) {
  __shared__ acc_t s_pair[kPairs];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairs + warp;
  acc_t li = 0;
  if (i < p.B) {
    acc_t kl = 0;
    if (p.K > 0) kl = kl_row<acc_t, lt_t>(prior + i * p.K, post + i * p.K, p.K, lane).kl;
    const PairTerms<acc_t> t = pair_terms(p, i);
    acc_t pl, slope;
    pair_loss(p, t.h, pl, slope);
    li = pl + p.kl_weight * kl;
    if (lane == 0) {
      losses[i] = li;
      cr[i] = t.cr;
      rj[i] = t.rj;
      kl_out[i] = kl;
    }
  }
  if (lane == 0) s_pair[warp] = li;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
#pragma unroll
    for (int w = 0; w < kPairs; ++w) s += s_pair[w];
    partials[blockIdx.x] = s;
  }
  finish_mean(partials, ticket, p.B, loss);
}

template <typename acc_t>
struct PrefGrads {
  AnyVec d_pc, d_pr, d_rc, d_rr;  // written in each input's dtype (absent: skipped)
};

template <typename acc_t, typename lt_t>
__global__ void __launch_bounds__(kThreads) preference_bwd_kernel(
    PrefParams<acc_t> p, PrefGrads<acc_t> g, const acc_t* __restrict__ grad_loss,
    const acc_t* __restrict__ grad_losses, const acc_t* __restrict__ grad_chosen_rewards,
    const acc_t* __restrict__ grad_rejected_rewards, const acc_t* __restrict__ grad_kl,
    const lt_t* __restrict__ prior, const lt_t* __restrict__ post, lt_t* __restrict__ d_prior,
    lt_t* __restrict__ d_post) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairs + warp;
  if (i >= p.B) return;
  const acc_t g_each = d_div(grad_loss[0], static_cast<acc_t>(p.B)) + grad_losses[i];
  if (lane == 0) {
    const PairTerms<acc_t> t = pair_terms(p, i);
    acc_t pl, slope;
    pair_loss(p, t.h, pl, slope);
    const acc_t dh = g_each * slope;
    const acc_t rs = p.loss_type == kIpo ? p.beta : acc_t(1);
    const acc_t d_pc = t.a_w * (dh + rs * grad_chosen_rewards[i]);
    const acc_t d_pr = t.a_l * (rs * grad_rejected_rewards[i] - dh);
    any_store(g.d_pc, i, d_pc);
    any_store(g.d_pr, i, d_pr);
    any_store(g.d_rc, i, -d_pc);
    any_store(g.d_rr, i, -d_pr);
  }
  if (p.K > 0) {
    const lt_t* pr_row = prior + i * p.K;
    const lt_t* po_row = post + i * p.K;
    const KlRow<acc_t, lt_t> r = kl_row<acc_t, lt_t>(pr_row, po_row, p.K, lane);
    const acc_t gk = g_each * p.kl_weight + grad_kl[i];
    for (int64_t k = lane; k < p.K; k += 32) {
      const acc_t lq = to_acc<acc_t>(po_row[k]) - r.lse_q;
      const acc_t lp = to_acc<acc_t>(pr_row[k]) - r.lse_p;
      const acc_t q = d_exp(lq), pk = d_exp(lp);
      d_post[i * p.K + k] = from_acc<lt_t>(gk * q * ((lq - lp) - r.kl));
      d_prior[i * p.K + k] = from_acc<lt_t>(gk * (pk - q));
    }
  }
}

// ------------------------------------------------------------------------------------------- host
Tensor opt(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

struct Inputs {
  Tensor pc, pr, rc, rr, cl, rl, prior, post;
  int loss_type = kDpo;
  int64_t B = 0, K = 0;
  at::ScalarType cdt;
};

Inputs make_inputs(const Tensor& pc, const Tensor& pr, const std::optional<Tensor>& rc,
                   const std::optional<Tensor>& rr, const std::optional<Tensor>& cl,
                   const std::optional<Tensor>& rl, const std::optional<Tensor>& prior,
                   const std::optional<Tensor>& post, c10::string_view loss_type, bool ipo_average, double beta,
                   double label_smoothing, double kl_weight) {
  Inputs in;
  in.pc = pc;
  in.pr = pr;
  in.rc = opt(rc);
  in.rr = opt(rr);
  in.cl = opt(cl);
  in.rl = opt(rl);
  in.prior = opt(prior);
  in.post = opt(post);
  const std::string_view lt(loss_type.data(), loss_type.size());
  const checks::PrefShape shape = checks::preference_loss(in.pc, in.pr, in.rc, in.rr, in.cl, in.rl, in.prior, in.post,
                                                          lt, ipo_average, beta, label_smoothing, kl_weight, kPairs);
  in.loss_type = shape.loss_type;
  in.B = shape.B;
  in.K = shape.K;
  in.cdt = compute_dtype(pc);
  return in;
}

template <typename acc_t>
PrefParams<acc_t> make_params(const Inputs& in, bool ipo_average, double beta, double gamma, double eps,
                              double kl_weight) {
  PrefParams<acc_t> p;
  p.pc = any_vec(in.pc, "pc");
  p.pr = any_vec(in.pr, "pr");
  p.rc = any_vec(in.rc, "rc");
  p.rr = any_vec(in.rr, "rr");
  p.cl = any_vec(in.cl, "cl");
  p.rl = any_vec(in.rl, "rl");
  p.loss_type = in.loss_type;
  p.ipo_average = ipo_average;
  p.beta = static_cast<acc_t>(beta);
  p.gamma = static_cast<acc_t>(gamma);
  p.eps = static_cast<acc_t>(eps);
  p.kl_weight = static_cast<acc_t>(kl_weight);
  p.B = in.B;
  p.K = in.K;
  return p;
}

// prior/post share one dtype in the kernel: the common one, else both in the compute dtype (the
// reference upcasts/downcasts both to it before any math, so this changes no value).
std::pair<Tensor, Tensor> logits_pair(const Inputs& in) {
  if (!in.prior.defined()) return {Tensor(), Tensor()};
  if (in.prior.scalar_type() == in.post.scalar_type()) return {in.prior, in.post};
  return {in.prior.to(in.cdt), in.post.to(in.cdt)};
}

template <typename F>
void dispatch_logits(const Tensor& prior, at::ScalarType cdt, F&& f) {
  const at::ScalarType lt = prior.defined() ? prior.scalar_type() : cdt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lt, "preference_loss_cuda", [&] {
    f(static_cast<scalar_t*>(nullptr));
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> preference_loss_fwd_cuda(
    const Tensor& pc, const Tensor& pr, const std::optional<Tensor>& rc, const std::optional<Tensor>& rr,
    const std::optional<Tensor>& cl, const std::optional<Tensor>& rl, const std::optional<Tensor>& prior,
    const std::optional<Tensor>& post, c10::string_view loss_type, double beta, double gamma,
    double label_smoothing, double kl_weight, bool ipo_average) {
  const Inputs in = make_inputs(pc, pr, rc, rr, cl, rl, prior, post, loss_type, ipo_average, beta,
                                label_smoothing, kl_weight);
  const c10::cuda::CUDAGuard guard(pc.device());
  const auto opts = pc.options().dtype(in.cdt);
  Tensor loss = at::empty({}, opts);
  Tensor losses = at::empty({in.B}, opts), cr = at::empty({in.B}, opts), rj = at::empty({in.B}, opts),
         kl = at::empty({in.B}, opts);
  const std::pair<Tensor, Tensor> logit_pair = logits_pair(in);
  const Tensor& lp = logit_pair.first;
  const Tensor& lq = logit_pair.second;
  const int64_t blocks = ceil_div(in.B, kPairs);
  Tensor partials = at::empty({blocks}, opts);
  Tensor ticket = at::empty({1}, pc.options().dtype(at::kInt));
  const auto stream = current_stream();
  C10_CUDA_CHECK(cudaMemsetAsync(ticket.data_ptr(), 0, sizeof(unsigned), stream));
  AT_DISPATCH_FLOATING_TYPES(in.cdt, "preference_loss_fwd_cuda", [&] {
    using acc_t = scalar_t;
    const PrefParams<acc_t> p = make_params<acc_t>(in, ipo_average, beta, gamma, label_smoothing, kl_weight);
    dispatch_logits(lp, in.cdt, [&](auto* tag) {
      using lt_t = std::remove_pointer_t<decltype(tag)>;
      preference_fwd_kernel<acc_t, lt_t><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(
          p, lp.defined() ? lp.data_ptr<lt_t>() : nullptr, lq.defined() ? lq.data_ptr<lt_t>() : nullptr,
          loss.data_ptr<acc_t>(), losses.data_ptr<acc_t>(), cr.data_ptr<acc_t>(), rj.data_ptr<acc_t>(),
          kl.data_ptr<acc_t>(), partials.data_ptr<acc_t>(), reinterpret_cast<unsigned*>(ticket.data_ptr<int>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, losses, cr, rj, kl};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> preference_loss_bwd_cuda(
    const Tensor& grad_loss, const Tensor& grad_losses, const Tensor& grad_chosen_rewards,
    const Tensor& grad_rejected_rewards, const Tensor& grad_kl, const Tensor& pc, const Tensor& pr,
    const std::optional<Tensor>& rc, const std::optional<Tensor>& rr, const std::optional<Tensor>& cl,
    const std::optional<Tensor>& rl, const std::optional<Tensor>& prior, const std::optional<Tensor>& post,
    c10::string_view loss_type, double beta, double gamma, double label_smoothing, double kl_weight,
    bool ipo_average) {
  const Inputs in = make_inputs(pc, pr, rc, rr, cl, rl, prior, post, loss_type, ipo_average, beta,
                                label_smoothing, kl_weight);
  const c10::cuda::CUDAGuard guard(pc.device());
  checks::preference_loss_grads(grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl, pc);
  auto as_cdt = [&](const Tensor& t) { return t.scalar_type() == in.cdt ? t.contiguous() : t.to(in.cdt).contiguous(); };
  const Tensor gl = as_cdt(grad_loss), gls = as_cdt(grad_losses), gcr = as_cdt(grad_chosen_rewards),
               grj = as_cdt(grad_rejected_rewards), gkl = as_cdt(grad_kl);
  // a fresh [0] tensor per absent output: a shared one would alias two outputs (opcheck rejects it)
  const auto none = [&] { return at::empty({0}, pc.options()); };
  Tensor d_pc = at::empty_like(pc), d_pr = at::empty_like(in.pr);
  Tensor d_rc = in.rc.defined() ? at::empty_like(in.rc) : none();
  Tensor d_rr = in.rr.defined() ? at::empty_like(in.rr) : none();
  const std::pair<Tensor, Tensor> logit_pair = logits_pair(in);
  const Tensor& lp = logit_pair.first;
  const Tensor& lq = logit_pair.second;
  Tensor d_lp = lp.defined() ? at::empty_like(lp) : Tensor();
  Tensor d_lq = lq.defined() ? at::empty_like(lq) : Tensor();
  const int64_t blocks = ceil_div(in.B, kPairs);
  AT_DISPATCH_FLOATING_TYPES(in.cdt, "preference_loss_bwd_cuda", [&] {
    using acc_t = scalar_t;
    const PrefParams<acc_t> p = make_params<acc_t>(in, ipo_average, beta, gamma, label_smoothing, kl_weight);
    PrefGrads<acc_t> g;
    g.d_pc = any_vec(d_pc, "pc");
    g.d_pr = any_vec(d_pr, "pr");
    g.d_rc = in.rc.defined() ? any_vec(d_rc, "rc") : AnyVec();
    g.d_rr = in.rr.defined() ? any_vec(d_rr, "rr") : AnyVec();
    dispatch_logits(lp, in.cdt, [&](auto* tag) {
      using lt_t = std::remove_pointer_t<decltype(tag)>;
      preference_bwd_kernel<acc_t, lt_t><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, current_stream()>>>(
          p, g, gl.data_ptr<acc_t>(), gls.data_ptr<acc_t>(), gcr.data_ptr<acc_t>(), grj.data_ptr<acc_t>(),
          gkl.data_ptr<acc_t>(), lp.defined() ? lp.data_ptr<lt_t>() : nullptr,
          lq.defined() ? lq.data_ptr<lt_t>() : nullptr, d_lp.defined() ? d_lp.data_ptr<lt_t>() : nullptr,
          d_lq.defined() ? d_lq.data_ptr<lt_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Gradients of prior/post in their own dtypes (differs from the kernel's only for mixed dtypes).
  Tensor d_prior = none(), d_post = none();
  if (lp.defined()) {
    d_prior = d_lp.scalar_type() == in.prior.scalar_type() ? d_lp : d_lp.to(in.prior.scalar_type());
    d_post = d_lq.scalar_type() == in.post.scalar_type() ? d_lq : d_lq.to(in.post.scalar_type());
  }
  return {d_pc, d_pr, d_rc, d_rr, d_prior, d_post};
}

}  // namespace
}  // namespace lpc_cuda

TORCH_LIBRARY_IMPL(lpc, CUDA, m) {
  m.impl("preference_loss_fwd", &lpc_cuda::preference_loss_fwd_cuda);
  m.impl("preference_loss_bwd", &lpc_cuda::preference_loss_bwd_cuda);
}
