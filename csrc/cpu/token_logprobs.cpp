// token_logprobs on CPU: log p(label) of each row of logits [N, V], and its gradient.
//
// Forward, per row, one pass over memory: for each L1-sized block, its max, then the sum of
// exp(x - running max) with the running sum rescaled when the max grows (online log-sum-exp);
// logp = x[label] - lse. Backward: d = g * (onehot(label) - exp(x - lse)), computed as -g * p for the
// block and + g on the label element in fp32 before the single rounding to the logits' dtype
// (cancellation-free true-class gradient in bf16/fp16). Ignored rows get logp = lse = 0 and a zero
// gradient row. Parallel over rows; reduced-precision rows are upcast block by block.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <memory>

namespace lpc {
namespace cpu {
namespace {

template <typename scalar_t>
void fwd_kernel(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index, at::Tensor& logp,
                at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  constexpr bool kUpcast = !std::is_same<scalar_t, acc>::value;
  const int64_t n = logits.size(0), v = logits.size(1);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  acc* out_logp = logp.mutable_data_ptr<acc>();
  acc* out_lse = lse.mutable_data_ptr<acc>();
  at::parallel_for(0, n, row_grain(v), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc[]> buf(kUpcast ? new acc[kBlock] : nullptr);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = labels[i];
      if (y == ignore_index) {
        out_logp[i] = out_lse[i] = acc(0);
        continue;
      }
      const scalar_t* row = x + i * v;
      OnlineLse<acc> state;
      for (int64_t off = 0; off < v; off += kBlock) {
        const int64_t len = std::min(kBlock, v - off);
        const acc* blk;
        if constexpr (kUpcast) {
          upcast(row + off, len, buf.get());
          blk = buf.get();
        } else {
          blk = reinterpret_cast<const acc*>(row + off);
        }
        state.add_block(blk, len);
      }
      const acc row_lse = state.lse();
      out_lse[i] = row_lse;
      out_logp[i] = static_cast<acc>(row[y]) - row_lse;
    }
  });
}

// out may be logits itself (in-place backward): each block is read before it is written.
template <typename scalar_t>
void bwd_kernel(const acc_t<scalar_t>* grad, const scalar_t* x, const int64_t* labels,
                const acc_t<scalar_t>* lse, int64_t ignore_index, int64_t n, int64_t v, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  constexpr bool kUpcast = !std::is_same<scalar_t, acc>::value;
  at::parallel_for(0, n, row_grain(v), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc[]> buf(kUpcast ? new acc[kBlock] : nullptr);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* orow = out + i * v;
      const int64_t y = labels[i];
      if (y == ignore_index) {
        std::fill(orow, orow + v, scalar_t(0));
        continue;
      }
      const scalar_t* row = x + i * v;
      const acc g = grad[i], l = lse[i];
      for (int64_t off = 0; off < v; off += kBlock) {
        const int64_t len = std::min(kBlock, v - off);
        acc* blk;
        if constexpr (kUpcast) {
          upcast(row + off, len, buf.get());
          blk = buf.get();
          row_scaled_exp(blk, len, l, -g, blk);  // -g * softmax, in place in the L1 block
        } else {
          blk = reinterpret_cast<acc*>(orow + off);
          row_scaled_exp(reinterpret_cast<const acc*>(row + off), len, l, -g, blk);
        }
        if (y >= off && y < off + len) blk[y - off] += g;
        if constexpr (kUpcast) downcast(blk, len, orow + off);
      }
    }
  });
}

void check_bwd_args(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  check_float(logits, "logits", 2);
  LPC_CHECK(logits.size(1) > 0, "logits must have V > 0 columns, got shape ", logits.sizes());
  check_labels(labels, logits.size(0), logits.size(1), ignore_index);
}

void run_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
             const at::Tensor& lse, int64_t ignore_index, const at::Tensor& out) {
  const int64_t n = logits.size(0), v = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor g = row_vector(grad_logp, "grad_logp", n, acc);
  const at::Tensor l = row_vector(lse, "lse", n, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd", [&] {
    bwd_kernel<scalar_t>(g.const_data_ptr<acc_t<scalar_t>>(), logits.const_data_ptr<scalar_t>(),
                         labels.const_data_ptr<int64_t>(), l.const_data_ptr<acc_t<scalar_t>>(), ignore_index,
                         n, v, out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                      int64_t ignore_index) {
  check_float(logits, "logits", 2);
  LPC_CHECK(logits.size(1) > 0, "logits must have V > 0 columns, got shape ", logits.sizes());
  check_labels(labels, logits.size(0), logits.size(1), ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor logp = at::empty({logits.size(0)}, opts);
  at::Tensor lse = at::empty({logits.size(0)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd", [&] {
    fwd_kernel<scalar_t>(logits, labels.const_data_ptr<int64_t>(), ignore_index, logp, lse);
  });
  return {logp, lse};
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                              const at::Tensor& lse, int64_t ignore_index) {
  check_bwd_args(logits, labels, ignore_index);
  at::Tensor out = at::empty_like(logits);
  run_bwd(grad_logp, logits, labels, lse, ignore_index, out);
  return out;
}

void token_logprobs_bwd_(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                         const at::Tensor& lse, int64_t ignore_index) {
  check_bwd_args(logits, labels, ignore_index);
  run_bwd(grad_logp, logits, labels, lse, ignore_index, logits);
}

TORCH_LIBRARY_IMPL(lpc, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_);
}

}  // namespace cpu
}  // namespace lpc
