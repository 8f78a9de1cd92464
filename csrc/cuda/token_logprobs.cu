// token_logprobs forward and backward (lpc::token_logprobs_fwd, _bwd, _bwd_) for CUDA tensors.
//
// Forward, one block per row of logits [N, V]:
//   1. each thread streams its share of the row in 16-byte vectors and keeps an online log-sum-exp
//      state (m = running max, s = sum exp(x - m)); a group of values costs one rescale at most;
//   2. the states merge across the warp with shuffles, then across warps through shared memory;
//   3. lse = m + log(s); logp = x[label] - lse (fp32 accumulation; fp64 for fp64 logits).
// Ignored rows (label == ignore_index) get logp = lse = 0 and never read the row.
//
// Backward, one block per row: d x_v = g * (onehot(label)_v - exp(x_v - lse)), computed in fp32 from
// the saved lse and written once in the logits dtype (optionally over the logits buffer itself: each
// element is read before the same thread overwrites it). Ignored rows get an exact zero gradient.
//
// Argument checks: checks.cpp (host compiler), called first by each entry point.
#include "common.cuh"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace lpc_cuda {
namespace {

// ------------------------------------------------------------------------------------------ forward
template <typename scalar_t, typename acc_t>
struct LseVisitor {
  MaxSum<acc_t> st;
  template <int CNT>
  __device__ __forceinline__ void visit(int64_t, const scalar_t* vals) {
    acc_t x[CNT];
#pragma unroll
    for (int i = 0; i < CNT; ++i) x[i] = to_acc<acc_t>(vals[i]);
    ms_add(st, x);
  }
};

template <typename scalar_t, typename acc_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK) token_logprobs_fwd_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels, int64_t V, int64_t ignore_index,
    acc_t* __restrict__ logp, acc_t* __restrict__ lse) {
  __shared__ MaxSum<acc_t> shm[BLOCK / 32];
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      logp[row] = acc_t(0);
      lse[row] = acc_t(0);
    }
    return;
  }
  const scalar_t* x = logits + row * V;  // int64 offset: N * V may exceed 2^31
  LseVisitor<scalar_t, acc_t> vis{ms_init<acc_t>()};
  row_visit<BLOCK>(x, V, vis);
  const MaxSum<acc_t> tot = block_ms<BLOCK>(vis.st, shm);
  if (threadIdx.x == 0) {
    const acc_t l = tot.m + d_log(tot.s);
    // Out-of-range labels are rejected in Python; never read outside the row here.
    const acc_t xt = (label >= 0 && label < V) ? to_acc<acc_t>(x[label])
                                                 : std::numeric_limits<acc_t>::quiet_NaN();
    logp[row] = xt - l;
    lse[row] = l;
  }
}

template <typename scalar_t, typename acc_t, int BLOCK>
void launch_fwd(const Tensor& logits, const Tensor& labels, int64_t ignore_index, Tensor& logp, Tensor& lse) {
  const int64_t n = logits.size(0), v = logits.size(1);
  token_logprobs_fwd_kernel<scalar_t, acc_t, BLOCK><<<static_cast<unsigned>(n), BLOCK, 0, current_stream()>>>(
      logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), v, ignore_index, logp.data_ptr<acc_t>(),
      lse.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> token_logprobs_fwd_cuda(const Tensor& logits, const Tensor& labels_in,
                                                   int64_t ignore_index) {
  checks::token_logprobs_fwd(logits, labels_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor labels = labels_int64(labels_in);
  const auto cdt = compute_dtype(logits);
  const int64_t n = logits.size(0);
  Tensor logp = at::empty({n}, logits.options().dtype(cdt));
  Tensor lse = at::empty({n}, logits.options().dtype(cdt));
  if (n == 0) return {logp, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    switch (row_block_size(logits.size(1) * static_cast<int64_t>(sizeof(scalar_t)))) {
      case 128: launch_fwd<scalar_t, acc_t, 128>(logits, labels, ignore_index, logp, lse); break;
      case 256: launch_fwd<scalar_t, acc_t, 256>(logits, labels, ignore_index, logp, lse); break;
      default: launch_fwd<scalar_t, acc_t, 512>(logits, labels, ignore_index, logp, lse); break;
    }
  });
  return {logp, lse};
}

// ----------------------------------------------------------------------------------------- backward
template <typename scalar_t, typename acc_t>
struct GradVisitor {
  scalar_t* out;  // the output row (may alias the input row)
  acc_t g, lse;
  int64_t label;
  template <int CNT>
  __device__ __forceinline__ void visit(int64_t i0, const scalar_t* vals) {
    if (CNT == Vec16<scalar_t>::kN) {
      Vec16<scalar_t> o;
#pragma unroll
      for (int i = 0; i < CNT; ++i) o.v[i] = from_acc<scalar_t>(grad(i0 + i, vals[i]));
      *reinterpret_cast<Vec16<scalar_t>*>(out + i0) = o;
    } else {
#pragma unroll
      for (int i = 0; i < CNT; ++i) out[i0 + i] = from_acc<scalar_t>(grad(i0 + i, vals[i]));
    }
  }
  __device__ __forceinline__ acc_t grad(int64_t col, scalar_t v) const {
    acc_t d = d_exp(to_acc<acc_t>(v) - lse) * (-g);
    if (col == label) d += g;
    return d;
  }
};

template <typename scalar_t, int BLOCK>
__device__ __forceinline__ void zero_row(scalar_t* out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) out[i] = scalar_t(0);
}

// VEC: in and out rows share their 16-byte misalignment (always when in-place), so vector stores line
// up with the vector loads; otherwise the scalar path.
template <typename scalar_t, typename acc_t, int BLOCK, bool VEC>
__global__ void __launch_bounds__(BLOCK) token_logprobs_bwd_kernel(
    const acc_t* __restrict__ grad_logp, const scalar_t* logits, const int64_t* __restrict__ labels,
    const acc_t* __restrict__ lse, int64_t V, int64_t ignore_index, scalar_t* out) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  scalar_t* o = out + row * V;
  if (label == ignore_index) {
    zero_row<scalar_t, BLOCK>(o, V);
    return;
  }
  GradVisitor<scalar_t, acc_t> vis{o, grad_logp[row], lse[row], label};
  if (VEC) {
    row_visit<BLOCK>(logits + row * V, V, vis);
  } else {
    row_visit_scalar<BLOCK>(logits + row * V, V, vis);
  }
}

template <typename scalar_t, typename acc_t, int BLOCK>
void launch_bwd(const Tensor& grad, const Tensor& logits, const Tensor& labels, const Tensor& lse,
                int64_t ignore_index, Tensor& out) {
  const int64_t n = logits.size(0), v = logits.size(1);
  const bool vec = (reinterpret_cast<uintptr_t>(logits.data_ptr()) & 15u) ==
                   (reinterpret_cast<uintptr_t>(out.data_ptr()) & 15u);
  const dim3 grid(static_cast<unsigned>(n));
  if (vec) {
    token_logprobs_bwd_kernel<scalar_t, acc_t, BLOCK, true><<<grid, BLOCK, 0, current_stream()>>>(
        grad.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), v,
        ignore_index, out.data_ptr<scalar_t>());
  } else {
    token_logprobs_bwd_kernel<scalar_t, acc_t, BLOCK, false><<<grid, BLOCK, 0, current_stream()>>>(
        grad.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), v,
        ignore_index, out.data_ptr<scalar_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The arguments are checked (checks::token_logprobs_bwd) by the two callers, before `out` exists.
void token_logprobs_bwd_into(const Tensor& grad_logp, const Tensor& logits, const Tensor& labels_in,
                             const Tensor& lse_in, int64_t ignore_index, Tensor& out) {
  const int64_t n = logits.size(0);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (n == 0) return;
  const auto cdt = compute_dtype(logits);
  const Tensor labels = labels_int64(labels_in);
  const Tensor grad = grad_logp.scalar_type() == cdt ? grad_logp : grad_logp.to(cdt);
  const Tensor lse = lse_in.scalar_type() == cdt ? lse_in : lse_in.to(cdt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    switch (row_block_size(logits.size(1) * static_cast<int64_t>(sizeof(scalar_t)))) {
      case 128: launch_bwd<scalar_t, acc_t, 128>(grad, logits, labels, lse, ignore_index, out); break;
      case 256: launch_bwd<scalar_t, acc_t, 256>(grad, logits, labels, lse, ignore_index, out); break;
      default: launch_bwd<scalar_t, acc_t, 512>(grad, logits, labels, lse, ignore_index, out); break;
    }
  });
}

Tensor token_logprobs_bwd_cuda(const Tensor& grad_logp, const Tensor& logits, const Tensor& labels,
                               const Tensor& lse, int64_t ignore_index) {
  checks::token_logprobs_bwd(grad_logp, logits, labels, lse);
  Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  token_logprobs_bwd_into(grad_logp, logits, labels, lse, ignore_index, out);
  return out;
}

void token_logprobs_bwd_inplace_cuda(const Tensor& grad_logp, const Tensor& logits, const Tensor& labels,
                                     const Tensor& lse, int64_t ignore_index) {
  checks::token_logprobs_bwd(grad_logp, logits, labels, lse);
  Tensor out = logits;  // same storage: the gradient overwrites the logits
  token_logprobs_bwd_into(grad_logp, logits, labels, lse, ignore_index, out);
}

}  // namespace
}  // namespace lpc_cuda

TORCH_LIBRARY_IMPL(lpc, CUDA, m) {
  m.impl("token_logprobs_fwd", &lpc_cuda::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &lpc_cuda::token_logprobs_bwd_cuda);
  m.impl("token_logprobs_bwd_", &lpc_cuda::token_logprobs_bwd_inplace_cuda);
}
