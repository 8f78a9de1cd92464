// linear_token_logprobs on CPU: log p(label) under softmax(hidden @ weight.T + bias) without [N, V] logits.
//
// Rows whose label is ignore_index are compacted away first. The valid rows go through in chunks of
// chunk_size: one GEMM (at::mm_out, MKL/oneDNN) writes the chunk's logits into a reused [chunk, V]
// buffer in the compute dtype, so the extra memory is chunk_size * V elements whatever N is. A fused,
// row-parallel epilogue then makes one pass over each row (bias add, online log-sum-exp, target gather).
// Backward recomputes the chunk's logits, turns the buffer in place into
// d = g * (onehot(label) - softmax) in one pass, and feeds it to three GEMMs:
// grad_hidden rows = d @ W, grad_weight += d^T @ h (addmm_, no temporary), grad_bias += column sums.
// bf16/fp16 inputs: the weight is upcast to fp32 once per call and hidden chunk by chunk (exact), so the
// math is the reference's fp32 math; gradients are accumulated in fp32 and rounded once at the end.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace lpc {
namespace cpu {
namespace {

struct Args {
  int64_t n, h, v;
  at::ScalarType cdt;
};

Args check_args(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                int64_t chunk_size) {
  check_float(hidden, "hidden", 2);
  check_float(weight, "weight", 2);
  LPC_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden (", hidden.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must have the same dtype");
  LPC_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "weight must have shape [V, H] with V, H > 0, got ",
              weight.sizes());
  check_size(hidden, "hidden", 1, weight.size(1), "H = weight.size(1)");
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias", 1);
    LPC_CHECK(bias->scalar_type() == weight.scalar_type(), "bias must have weight's dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
    check_size(*bias, "bias", 0, weight.size(0), "V = weight.size(0)");
  }
  LPC_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  return {hidden.size(0), hidden.size(1), weight.size(0), acc_dtype(hidden.scalar_type())};
}

// Indices of the rows to score, in order.
at::Tensor valid_rows(const at::Tensor& labels, int64_t count, int64_t ignore_index) {
  at::Tensor rows = at::empty({count}, labels.options());
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  int64_t* out = rows.mutable_data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < labels.size(0); ++i)
    if (lab[i] != ignore_index) out[j++] = i;
  return rows;
}

// One chunk of the compacted rows: [s, s + c) of `rows`. When those rows are consecutive in hidden
// (always, without ignored rows) the chunk is a view and its results go straight to their rows.
struct Chunk {
  int64_t s, c;
  bool consecutive;
  int64_t first;
  at::Tensor index;  // rows[s : s + c]

  Chunk(const at::Tensor& rows, int64_t s_, int64_t c_) : s(s_), c(c_) {
    const int64_t* r = rows.const_data_ptr<int64_t>() + s;
    first = r[0];
    consecutive = r[c - 1] - r[0] == c - 1;  // strictly increasing, so this means r = first..first+c-1
    index = rows.narrow(0, s, c);
  }

  at::Tensor gather(const at::Tensor& t, at::ScalarType cdt) const {
    at::Tensor part = consecutive ? t.narrow(0, first, c) : t.index_select(0, index);
    return part.scalar_type() == cdt ? part : part.to(cdt);
  }
};

// Forward epilogue on one chunk of logits x [c, V] (compute dtype): bias add, LSE, target gather.
template <typename acc>
void fwd_epilogue(acc* x, int64_t c, int64_t v, const acc* bias, const int64_t* rows, const int64_t* labels,
                  acc* logp, acc* lse) {
  at::parallel_for(0, c, row_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc* xr = x + r * v;
      OnlineLse<acc> state;
      for (int64_t off = 0; off < v; off += kBlock) {
        const int64_t len = std::min(kBlock, v - off);
        if (bias != nullptr) row_add(xr + off, bias + off, len);
        state.add_block(xr + off, len);
      }
      const int64_t i = rows[r];
      const acc l = state.lse();
      lse[i] = l;
      logp[i] = xr[labels[i]] - l;
    }
  });
}

// Backward epilogue: x [c, V] becomes d = g * (onehot(label) - exp(x + bias - lse)) in place.
template <typename acc>
void bwd_epilogue(acc* x, int64_t c, int64_t v, const acc* bias, const int64_t* rows, const int64_t* labels,
                  const acc* grad, const acc* lse) {
  at::parallel_for(0, c, row_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc* xr = x + r * v;
      const int64_t i = rows[r];
      const acc g = grad[i], l = lse[i];
      for (int64_t off = 0; off < v; off += kBlock) {
        const int64_t len = std::min(kBlock, v - off);
        if (bias != nullptr) row_add(xr + off, bias + off, len);
        row_scaled_exp(xr + off, len, l, -g, xr + off);
      }
      xr[labels[i]] += g;  // the true-class term in the compute dtype, after its -g * p
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& labels, int64_t ignore_index,
                                                             int64_t chunk_size) {
  const Args a = check_args(hidden, weight, bias, chunk_size);
  const int64_t count = check_labels(labels, a.n, a.v, ignore_index);
  const auto opts = hidden.options().dtype(a.cdt);
  at::Tensor logp = at::zeros({a.n}, opts), lse = at::zeros({a.n}, opts);
  if (count == 0) return {logp, lse};
  const bool has_bias = bias.has_value() && bias->defined();
  // upcast once per call; Tensor::to returns the tensor itself when the dtype already matches
  const at::Tensor w = weight.to(a.cdt);
  const at::Tensor b = has_bias ? bias->to(a.cdt) : at::Tensor();
  const at::Tensor rows = valid_rows(labels, count, ignore_index);
  const int64_t chunk = std::min(chunk_size, count);
  at::Tensor buf = at::empty({chunk, a.v}, opts);
  for (int64_t s = 0; s < count; s += chunk) {
    const Chunk ck(rows, s, std::min(chunk, count - s));
    at::Tensor x = buf.narrow(0, 0, ck.c);
    at::mm_out(x, ck.gather(hidden, a.cdt), w.t());
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "linear_token_logprobs_fwd", [&] {
      fwd_epilogue<scalar_t>(x.mutable_data_ptr<scalar_t>(), ck.c, a.v,
                             has_bias ? b.const_data_ptr<scalar_t>() : nullptr, ck.index.const_data_ptr<int64_t>(),
                             labels.const_data_ptr<int64_t>(), logp.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<scalar_t>());
    });
  }
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias) {
  const Args a = check_args(hidden, weight, bias, chunk_size);
  const int64_t count = check_labels(labels, a.n, a.v, ignore_index);
  const bool has_bias = bias.has_value() && bias->defined();
  LPC_CHECK(!need_bias || has_bias, "need_bias=True needs bias, got None");
  const at::Tensor g = row_vector(grad_logp, "grad_logp", a.n, a.cdt);
  const at::Tensor l = row_vector(lse, "lse", a.n, a.cdt);
  const auto opts = hidden.options().dtype(a.cdt);
  // [0]-shaped stand-ins for gradients not asked for: a fresh one each, since outputs may not alias
  auto none = [&] { return at::empty({0}, hidden.options()); };

  // grad_hidden in hidden's dtype: every valid row is written once, ignored rows stay zero.
  at::Tensor gh = need_hidden ? (count == a.n ? at::empty_like(hidden) : at::zeros_like(hidden)) : none();
  at::Tensor gw = need_weight ? at::zeros({a.v, a.h}, opts) : none();  // accumulators in the compute dtype
  at::Tensor gb = need_bias ? at::zeros({a.v}, opts) : none();
  if (count > 0 && (need_hidden || need_weight || need_bias)) {
    const at::Tensor w = weight.to(a.cdt);
    const at::Tensor b = has_bias ? bias->to(a.cdt) : at::Tensor();
    const at::Tensor rows = valid_rows(labels, count, ignore_index);
    const int64_t chunk = std::min(chunk_size, count);
    at::Tensor buf = at::empty({chunk, a.v}, opts);
    for (int64_t s = 0; s < count; s += chunk) {
      const Chunk ck(rows, s, std::min(chunk, count - s));
      const at::Tensor h = ck.gather(hidden, a.cdt);
      at::Tensor d = buf.narrow(0, 0, ck.c);
      at::mm_out(d, h, w.t());
      AT_DISPATCH_FLOATING_TYPES(a.cdt, "linear_token_logprobs_bwd", [&] {
        bwd_epilogue<scalar_t>(d.mutable_data_ptr<scalar_t>(), ck.c, a.v,
                               has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                               ck.index.const_data_ptr<int64_t>(), labels.const_data_ptr<int64_t>(),
                               g.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>());
      });
      if (need_hidden) {
        if (ck.consecutive && gh.scalar_type() == a.cdt) {
          at::Tensor dst = gh.narrow(0, ck.first, ck.c);
          at::mm_out(dst, d, w);
        } else if (ck.consecutive) {
          gh.narrow(0, ck.first, ck.c).copy_(at::mm(d, w));
        } else {
          gh.index_copy_(0, ck.index, at::mm(d, w).to(gh.scalar_type()));
        }
      }
      if (need_weight) gw.addmm_(d.t(), h);
      if (need_bias) gb.add_(at::sum(d, at::IntArrayRef{0}));
    }
  }
  if (need_weight && gw.scalar_type() != weight.scalar_type()) gw = gw.to(weight.scalar_type());
  if (need_bias && gb.scalar_type() != bias->scalar_type()) gb = gb.to(bias->scalar_type());
  return {gh, gw, gb};
}

TORCH_LIBRARY_IMPL(lpc, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd);
}

}  // namespace cpu
}  // namespace lpc
