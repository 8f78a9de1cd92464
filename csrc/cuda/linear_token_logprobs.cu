// linear_token_logprobs forward and backward (lpc::linear_token_logprobs_fwd, _bwd) for CUDA tensors,
// without ever holding the [N, V] logits: cuBLAS GEMMs (through ATen) on bounded tiles plus fused
// epilogue kernels.
//
// Rows whose label is ignore_index are compacted away first (they never reach a GEMM); Nv rows remain.
//
// Forward: for chunks of `chunk_size` valid rows,
//   X = h_chunk @ W^T                      one GEMM into an fp32 [chunk, V] tile (fp16/bf16 inputs: fp32
//                                          accumulate and fp32 output, so the logits are not rounded)
//   lse, logp = LSE+gather epilogue         one kernel, one block per row (online log-sum-exp, + bias)
//
// Backward: the tile is recomputed and turned into D = g * (onehot(label) - softmax(X)) in place by one
// epilogue kernel (fp32 in the tile; a copy in the input dtype feeds the fp16/bf16 GEMMs). Two tilings,
// both with at most chunk_size * V tile elements:
//   rows (tile [chunk, V]):      grad_hidden[chunk] = D @ W (complete per chunk),
//                                grad_weight += D^T @ h_chunk (fp32 accumulator [V, H])
//   vocab (tile [Nv, Vc]):       grad_weight[Vc] = D^T @ h (complete per slice, rounded once),
//                                grad_hidden += D @ W[Vc] (fp32 accumulator [Nv, H])
// The tiling that completes the larger gradient is used (vocab when only the weight/bias gradients are
// wanted, rows when only the hidden gradient is), so the fp32 accumulator is the smaller of the two.
// grad_bias = column sums of D in fp32 (at::sum, deterministic).
//
// Argument checks: checks.cpp (host compiler), called first by each entry point.
#include "common.cuh"

#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace lpc_cuda {
namespace {

// ----------------------------------------------------------------------------------- epilogue: LSE
template <typename acc_t, typename bias_t, bool HAS_BIAS>
struct BiasLseVisitor {
  const bias_t* bias;
  MaxSum<acc_t> st;
  template <int CNT>
  __device__ __forceinline__ void visit(int64_t i0, const acc_t* vals) {
    acc_t x[CNT];
#pragma unroll
    for (int i = 0; i < CNT; ++i) x[i] = HAS_BIAS ? vals[i] + to_acc<acc_t>(bias[i0 + i]) : vals[i];
    ms_add(st, x);
  }
};

// X: [R, V] tile of logits (compute dtype) for the valid rows rows[0..R); writes logp/lse at rows[r].
template <typename acc_t, typename bias_t, bool HAS_BIAS, int BLOCK>
__global__ void __launch_bounds__(BLOCK) lse_gather_kernel(
    const acc_t* __restrict__ X, int64_t V, const bias_t* __restrict__ bias, const int64_t* __restrict__ rows,
    const int64_t* __restrict__ labels, acc_t* __restrict__ logp, acc_t* __restrict__ lse) {
  __shared__ MaxSum<acc_t> shm[BLOCK / 32];
  const int64_t r = blockIdx.x;
  const acc_t* x = X + r * V;
  BiasLseVisitor<acc_t, bias_t, HAS_BIAS> vis{bias, ms_init<acc_t>()};
  row_visit<BLOCK>(x, V, vis);
  const MaxSum<acc_t> tot = block_ms<BLOCK>(vis.st, shm);
  if (threadIdx.x == 0) {
    const int64_t row = rows[r];
    const int64_t label = labels[row];
    const acc_t l = tot.m + d_log(tot.s);
    acc_t xt = std::numeric_limits<acc_t>::quiet_NaN();  // out-of-range labels are rejected in Python
    if (label >= 0 && label < V) xt = HAS_BIAS ? x[label] + to_acc<acc_t>(bias[label]) : x[label];
    logp[row] = xt - l;
    lse[row] = l;
  }
}

// ---------------------------------------------------------------------------- epilogue: softmax grad
// X: [R, C] tile holding columns col0..col0+C of the logits of R valid rows (compact order). Overwrites
// it with D = g * (onehot(label) - exp(x + b - lse)) when WRITE_ACC, and writes D in low_t to `low`
// (the fp16/bf16 GEMM operand) when `low` is given.
template <typename acc_t, typename bias_t, typename low_t, bool HAS_BIAS, bool WRITE_ACC, bool WRITE_LOW>
struct SoftmaxGradVisitor {
  acc_t* x_row;
  low_t* low_row;
  const bias_t* bias;  // already offset by col0
  acc_t g, lse;
  int64_t label_col;  // label - col0 (may be outside [0, C))
  template <int CNT>
  __device__ __forceinline__ void visit(int64_t i0, const acc_t* vals) {
    acc_t d[CNT];
#pragma unroll
    for (int i = 0; i < CNT; ++i) {
      const acc_t x = HAS_BIAS ? vals[i] + to_acc<acc_t>(bias[i0 + i]) : vals[i];
      d[i] = d_exp(x - lse) * (-g);
      if (i0 + i == label_col) d[i] += g;
    }
    if (WRITE_ACC) {
      if (CNT == Vec16<acc_t>::kN) {
        Vec16<acc_t> o;
#pragma unroll
        for (int i = 0; i < CNT; ++i) o.v[i] = d[i];
        *reinterpret_cast<Vec16<acc_t>*>(x_row + i0) = o;
      } else {
#pragma unroll
        for (int i = 0; i < CNT; ++i) x_row[i0 + i] = d[i];
      }
    }
    if (WRITE_LOW) {
#pragma unroll
      for (int i = 0; i < CNT; ++i) low_row[i0 + i] = from_acc<low_t>(d[i]);
    }
  }
};

template <typename acc_t, typename bias_t, typename low_t, bool HAS_BIAS, bool WRITE_ACC, bool WRITE_LOW, int BLOCK>
__global__ void __launch_bounds__(BLOCK) softmax_grad_kernel(
    acc_t* X, int64_t C, int64_t col0, const bias_t* __restrict__ bias, const int64_t* __restrict__ labels_c,
    const acc_t* __restrict__ lse_c, const acc_t* __restrict__ grad_c, low_t* __restrict__ low) {
  const int64_t r = blockIdx.x;
  acc_t* x = X + r * C;
  SoftmaxGradVisitor<acc_t, bias_t, low_t, HAS_BIAS, WRITE_ACC, WRITE_LOW> vis{
      x, WRITE_LOW ? low + r * C : nullptr, HAS_BIAS ? bias + col0 : nullptr, grad_c[r], lse_c[r],
      labels_c[r] - col0};
  row_visit<BLOCK>(static_cast<const acc_t*>(x), C, vis);
}

// ------------------------------------------------------------------------------------- host helpers
struct Problem {
  Tensor hidden, weight, bias, labels;  // bias undefined when absent; labels int64
  int64_t n = 0, h = 0, v = 0;
  at::ScalarType dt, cdt;
  bool reduced = false;  // fp16/bf16 inputs: fp32 tiles, GEMM operands in the input dtype
};

Problem make_problem(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                     const Tensor& labels, int64_t chunk_size) {
  const Tensor b = bias.has_value() ? *bias : Tensor();
  checks::linear_token_logprobs(hidden, weight, b, labels, chunk_size);
  Problem p;
  p.bias = b;  // undefined when absent
  p.hidden = hidden;
  p.weight = weight;
  p.labels = labels_int64(labels);
  p.n = hidden.size(0);
  p.h = hidden.size(1);
  p.v = weight.size(0);
  p.dt = hidden.scalar_type();
  p.cdt = compute_dtype(hidden);
  p.reduced = is_reduced(p.dt);
  return p;
}

// Indices of the rows whose label is not ignore_index (int64 [Nv]); one device->host sync for Nv.
Tensor valid_rows(const Tensor& labels, int64_t ignore_index) {
  return at::nonzero(at::ne(labels, ignore_index)).view({-1});
}

// A contiguous [r, c] view over the front of a flat buffer (so a short last chunk stays contiguous).
Tensor tile_view(const Tensor& flat, int64_t r, int64_t c) { return flat.narrow(0, 0, r * c).view({r, c}); }

template <typename F>
void dispatch_bias(const Problem& p, F&& f) {
  // f(bias_t*, has_bias) with bias_t the input dtype; a null pointer of the input dtype without bias.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dt, "linear_token_logprobs_cuda", [&] {
    const scalar_t* b = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
    f(b);
  });
}

template <typename acc_t, typename bias_t, bool HAS_BIAS>
void launch_lse(const Tensor& X, const bias_t* bias, const Tensor& rows_chunk, const Tensor& labels, Tensor& logp,
                Tensor& lse) {
  const int64_t r = X.size(0), v = X.size(1);
  const dim3 grid(static_cast<unsigned>(r));
  const auto st = current_stream();
  const acc_t* x = X.data_ptr<acc_t>();
  const int64_t* rw = rows_chunk.data_ptr<int64_t>();
  const int64_t* lb = labels.data_ptr<int64_t>();
  switch (row_block_size(v * static_cast<int64_t>(sizeof(acc_t)))) {
    case 128:
      lse_gather_kernel<acc_t, bias_t, HAS_BIAS, 128>
          <<<grid, 128, 0, st>>>(x, v, bias, rw, lb, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
      break;
    case 256:
      lse_gather_kernel<acc_t, bias_t, HAS_BIAS, 256>
          <<<grid, 256, 0, st>>>(x, v, bias, rw, lb, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
      break;
    default:
      lse_gather_kernel<acc_t, bias_t, HAS_BIAS, 512>
          <<<grid, 512, 0, st>>>(x, v, bias, rw, lb, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, typename bias_t, typename low_t, bool HAS_BIAS, bool WRITE_ACC, bool WRITE_LOW>
void launch_softmax_grad_t(Tensor& X, int64_t col0, const bias_t* bias, const int64_t* labels_c, const acc_t* lse_c,
                           const acc_t* grad_c, low_t* low) {
  const int64_t r = X.size(0), c = X.size(1);
  const dim3 grid(static_cast<unsigned>(r));
  const auto st = current_stream();
  acc_t* x = X.data_ptr<acc_t>();
  switch (row_block_size(c * static_cast<int64_t>(sizeof(acc_t)))) {
    case 128:
      softmax_grad_kernel<acc_t, bias_t, low_t, HAS_BIAS, WRITE_ACC, WRITE_LOW, 128>
          <<<grid, 128, 0, st>>>(x, c, col0, bias, labels_c, lse_c, grad_c, low);
      break;
    case 256:
      softmax_grad_kernel<acc_t, bias_t, low_t, HAS_BIAS, WRITE_ACC, WRITE_LOW, 256>
          <<<grid, 256, 0, st>>>(x, c, col0, bias, labels_c, lse_c, grad_c, low);
      break;
    default:
      softmax_grad_kernel<acc_t, bias_t, low_t, HAS_BIAS, WRITE_ACC, WRITE_LOW, 512>
          <<<grid, 512, 0, st>>>(x, c, col0, bias, labels_c, lse_c, grad_c, low);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// D for a tile: in place in X (fp32/fp64) when write_acc, and into `low` (input dtype) when defined.
template <typename scalar_t>
void softmax_grad_tile(Tensor& X, int64_t col0, const scalar_t* bias, const Tensor& labels_c, const Tensor& lse_c,
                       const Tensor& grad_c, int64_t row0, bool write_acc, Tensor* low) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t* lb = labels_c.data_ptr<int64_t>() + row0;
  const acc_t* ls = lse_c.data_ptr<acc_t>() + row0;
  const acc_t* gr = grad_c.data_ptr<acc_t>() + row0;
  if (low != nullptr) {
    scalar_t* lp = low->data_ptr<scalar_t>();
    if (bias != nullptr) {
      if (write_acc) launch_softmax_grad_t<acc_t, scalar_t, scalar_t, true, true, true>(X, col0, bias, lb, ls, gr, lp);
      else launch_softmax_grad_t<acc_t, scalar_t, scalar_t, true, false, true>(X, col0, bias, lb, ls, gr, lp);
    } else {
      if (write_acc) launch_softmax_grad_t<acc_t, scalar_t, scalar_t, false, true, true>(X, col0, bias, lb, ls, gr, lp);
      else launch_softmax_grad_t<acc_t, scalar_t, scalar_t, false, false, true>(X, col0, bias, lb, ls, gr, lp);
    }
  } else {
    if (bias != nullptr) launch_softmax_grad_t<acc_t, scalar_t, scalar_t, true, true, false>(X, col0, bias, lb, ls, gr, nullptr);
    else launch_softmax_grad_t<acc_t, scalar_t, scalar_t, false, true, false>(X, col0, bias, lb, ls, gr, nullptr);
  }
}

// ------------------------------------------------------------------------------------------ forward
std::tuple<Tensor, Tensor> linear_token_logprobs_fwd_cuda(const Tensor& hidden, const Tensor& weight,
                                                          const std::optional<Tensor>& bias, const Tensor& labels,
                                                          int64_t ignore_index, int64_t chunk_size) {
  const Problem p = make_problem(hidden, weight, bias, labels, chunk_size);
  const c10::cuda::CUDAGuard guard(hidden.device());
  Tensor logp = at::zeros({p.n}, hidden.options().dtype(p.cdt));
  Tensor lse = at::zeros({p.n}, hidden.options().dtype(p.cdt));
  if (p.n == 0) return {logp, lse};
  const Tensor rows = valid_rows(p.labels, ignore_index);
  const int64_t nv = rows.size(0);
  if (nv == 0) return {logp, lse};
  const bool all_valid = nv == p.n;
  const int64_t chunk = std::min(chunk_size, nv);
  checks::fits_launch(chunk, "chunk_size");
  const Tensor flat = at::empty({chunk * p.v}, hidden.options().dtype(p.cdt));
  const Tensor wt = p.weight.t();
  dispatch_bias(p, [&](auto* b) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
    using acc_t = typename Acc<scalar_t>::type;
    for (int64_t s = 0; s < nv; s += chunk) {
      const int64_t r = std::min(chunk, nv - s);
      const Tensor rows_chunk = rows.narrow(0, s, r);
      const Tensor h = all_valid ? p.hidden.narrow(0, s, r) : p.hidden.index_select(0, rows_chunk);
      Tensor X = tile_view(flat, r, p.v);
      mm_into(X, h, wt);
      if (b != nullptr) launch_lse<acc_t, scalar_t, true>(X, b, rows_chunk, p.labels, logp, lse);
      else launch_lse<acc_t, scalar_t, false>(X, b, rows_chunk, p.labels, logp, lse);
    }
  });
  return {logp, lse};
}

// ----------------------------------------------------------------------------------------- backward
std::tuple<Tensor, Tensor, Tensor> linear_token_logprobs_bwd_cuda(
    const Tensor& grad_logp, const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& labels, const Tensor& lse, int64_t ignore_index, int64_t chunk_size, bool need_hidden,
    bool need_weight, bool need_bias) {
  const Problem p = make_problem(hidden, weight, bias, labels, chunk_size);
  checks::linear_token_logprobs_bwd(grad_logp, lse, hidden, need_bias, p.bias.defined());
  const c10::cuda::CUDAGuard guard(hidden.device());
  // a fresh [0] tensor per absent output: a shared one would alias two outputs (opcheck rejects it)
  const auto empty0 = [&] { return at::empty({0}, hidden.options()); };
  const auto f32 = hidden.options().dtype(p.cdt);  // compute dtype (fp32 / fp64)

  const Tensor rows = (need_hidden || need_weight || need_bias) && p.n > 0 ? valid_rows(p.labels, ignore_index)
                                                                           : at::empty({0}, p.labels.options());
  const int64_t nv = rows.size(0);
  const bool all_valid = nv == p.n;
  if (nv == 0) {
    return {need_hidden ? at::zeros_like(hidden) : empty0(), need_weight ? at::zeros_like(weight) : empty0(),
            need_bias ? at::zeros_like(p.bias) : empty0()};
  }
  // Compact per-row inputs (compute dtype).
  const Tensor g_c = (grad_logp.scalar_type() == p.cdt ? grad_logp : grad_logp.to(p.cdt)).index_select(0, rows);
  const Tensor lse_c = (lse.scalar_type() == p.cdt ? lse : lse.to(p.cdt)).index_select(0, rows);
  const Tensor lab_c = p.labels.index_select(0, rows);

  Tensor gh, gw, gb;
  Tensor scratch;
  // Vocab tiling unless the hidden gradient is wanted and is the smaller fp32 accumulator to avoid.
  const bool vocab_tiles = !need_hidden || (need_weight && nv <= p.v);

  dispatch_bias(p, [&](auto* b) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
    if (vocab_tiles) {
      // Tile [Nv, Vc] with Nv * Vc <= chunk_size * V; Vc a multiple of 128 (aligned GEMM operands).
      int64_t vc = std::max<int64_t>(1, (std::min(chunk_size, nv) * p.v) / nv);
      if (vc < p.v) vc = std::max<int64_t>(128, (vc / 128) * 128);
      vc = std::min(vc, p.v);
      checks::fits_launch(nv, "hidden (rows whose label is not ignore_index)");
      const Tensor h = all_valid ? p.hidden : p.hidden.index_select(0, rows);  // [Nv, H]
      const Tensor flat = at::empty({nv * vc}, f32);
      const Tensor flat_low = p.reduced ? at::empty({nv * vc}, hidden.options()) : Tensor();
      Tensor gh_acc;  // [Nv, H] in the compute dtype
      if (need_hidden) gh_acc = (all_valid && !p.reduced) ? at::empty_like(hidden) : at::empty({nv, p.h}, f32);
      if (need_weight) gw = at::empty_like(weight);
      Tensor gb_acc;
      if (need_bias) gb_acc = at::empty({p.v}, f32);
      for (int64_t v0 = 0; v0 < p.v; v0 += vc) {
        const int64_t c = std::min(vc, p.v - v0);
        const Tensor w = p.weight.narrow(0, v0, c);  // [c, H], contiguous
        Tensor X = tile_view(flat, nv, c);
        mm_into(X, h, w.t());
        Tensor low = p.reduced ? tile_view(flat_low, nv, c) : Tensor();
        softmax_grad_tile<scalar_t>(X, v0, b, lab_c, lse_c, g_c, 0, /*write_acc=*/!p.reduced || need_bias,
                                    p.reduced ? &low : nullptr);
        const Tensor& D = p.reduced ? low : X;
        if (need_weight) mm_into(gw.narrow(0, v0, c), D.t(), h);  // complete slice, rounded once
        if (need_bias) gb_acc.narrow(0, v0, c).copy_(X.sum(0));
        if (need_hidden) {
          if (v0 == 0) mm_into(gh_acc, D, w);
          else mm_accumulate(gh_acc, D, w, scratch);
        }
      }
      if (need_hidden) {
        if (all_valid) {
          gh = gh_acc.scalar_type() == p.dt ? gh_acc : gh_acc.to(p.dt);
        } else {
          gh = at::zeros_like(hidden);
          gh.index_copy_(0, rows, gh_acc.scalar_type() == p.dt ? gh_acc : gh_acc.to(p.dt));
        }
      }
      if (need_bias) gb = gb_acc.scalar_type() == p.dt ? gb_acc : gb_acc.to(p.dt);
    } else {
      // Tile [chunk, V] over the compacted rows.
      const int64_t chunk = std::min(chunk_size, nv);
      checks::fits_launch(chunk, "chunk_size");
      const Tensor flat = at::empty({chunk * p.v}, f32);
      const Tensor flat_low = p.reduced ? at::empty({chunk * p.v}, hidden.options()) : Tensor();
      Tensor gh_c;  // [Nv, H] in the input dtype, rows complete per chunk
      if (need_hidden) gh_c = all_valid ? at::empty_like(hidden) : at::empty({nv, p.h}, hidden.options());
      Tensor gw_acc;  // [V, H] in the compute dtype
      if (need_weight) gw_acc = p.reduced ? at::empty({p.v, p.h}, f32) : at::empty_like(weight);
      Tensor gb_acc;
      if (need_bias) gb_acc = at::zeros({p.v}, f32);
      for (int64_t s = 0; s < nv; s += chunk) {
        const int64_t r = std::min(chunk, nv - s);
        const Tensor h = all_valid ? p.hidden.narrow(0, s, r) : p.hidden.index_select(0, rows.narrow(0, s, r));
        Tensor X = tile_view(flat, r, p.v);
        mm_into(X, h, p.weight.t());
        Tensor low = p.reduced ? tile_view(flat_low, r, p.v) : Tensor();
        softmax_grad_tile<scalar_t>(X, 0, b, lab_c, lse_c, g_c, s, /*write_acc=*/!p.reduced || need_bias,
                                    p.reduced ? &low : nullptr);
        const Tensor& D = p.reduced ? low : X;
        if (need_hidden) mm_into(gh_c.narrow(0, s, r), D, p.weight);
        if (need_weight) {
          if (s == 0) mm_into(gw_acc, D.t(), h);
          else mm_accumulate(gw_acc, D.t(), h, scratch);
        }
        if (need_bias) gb_acc.add_(X.sum(0));
      }
      if (need_hidden) {
        if (all_valid) {
          gh = gh_c;
        } else {
          gh = at::zeros_like(hidden);
          gh.index_copy_(0, rows, gh_c);
        }
      }
      if (need_weight) gw = gw_acc.scalar_type() == p.dt ? gw_acc : gw_acc.to(p.dt);
      if (need_bias) gb = gb_acc.scalar_type() == p.dt ? gb_acc : gb_acc.to(p.dt);
    }
  });
  return {need_hidden ? gh : empty0(), need_weight ? gw : empty0(), need_bias ? gb : empty0()};
}

}  // namespace
}  // namespace lpc_cuda

TORCH_LIBRARY_IMPL(lpc, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &lpc_cuda::linear_token_logprobs_fwd_cuda);
  m.impl("linear_token_logprobs_bwd", &lpc_cuda::linear_token_logprobs_bwd_cuda);
}
