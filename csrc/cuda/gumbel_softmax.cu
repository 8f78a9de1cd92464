// gumbel_softmax_codes forward and backward (lpc::gumbel_softmax_fwd, _bwd) for CUDA tensors.
//
// Forward, one launch: a block takes 8 rows (one warp per row).
//   1. noise(b, k) = -log(-log(clamp(u))) with u = Philox4x32-10(seed, offset + b*K + k) (csrc/philox.h,
//      the function of lpc_kernels/philox.py); y = (logits + noise) / tau, kept in the output buffer;
//   2. warp max, warp sum of exp(y - max), soft = exp(y - max) / sum; for hard samples the first argmax
//      of soft (as torch.argmax) becomes a one-hot row, soft is kept for the straight-through backward;
//   3. z = weights @ codebook for the block's rows: threads over D, weights staged through shared
//      memory in K-tiles, fp32 accumulation (hard: z is the chosen codebook row, copied exactly).
// The logs use libdevice's precise logf (__nv_logf), the one torch's CUDA log kernel calls: nvcc's
// --use_fast_math would otherwise turn logf into the approximate __logf, and the noise would no longer
// be bit-identical to lpc_kernels.philox.gumbel_noise evaluated by torch on the GPU.
//
// Backward: G = grad_z @ codebook^T by cuBLAS (fp16/bf16: fp32 accumulate and output), then one kernel,
// a warp per row: g = grad_weights + G, grad_logits = soft * (g - <g, soft>) / tau;
// grad_codebook = weights^T @ grad_z in the compute dtype, cast to the codebook dtype.
//
// Argument checks: checks.cpp (host compiler), called first by each entry point.
#include "common.cuh"

#include "../philox.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

extern "C" __device__ float __nv_logf(float);  // libdevice, precise (max 1 ulp), as torch.log on CUDA

namespace lpc_cuda {
namespace {

constexpr int kRows = 8;      // rows per block, one warp each
constexpr int kThreads = 32 * kRows;
constexpr int kKTile = 64;    // K-tile of weights staged in shared memory for z

__device__ __forceinline__ float gumbel_noise(uint64_t seed, uint64_t counter) {
  const float u = lpc::philox::clamp_uniform(lpc::philox::philox_uniform(seed, counter));
  return -__nv_logf(-__nv_logf(u));
}

template <typename in_t, typename acc_t, typename cb_t>
__global__ void __launch_bounds__(kThreads) gumbel_fwd_kernel(
    const in_t* __restrict__ logits, const cb_t* __restrict__ codebook, int64_t B, int64_t K, int64_t D, acc_t tau,
    bool hard, uint64_t seed, uint64_t offset, acc_t* __restrict__ weights, acc_t* __restrict__ soft,
    cb_t* __restrict__ z) {
  __shared__ int64_t s_idx[kRows];
  __shared__ acc_t s_w[kRows][kKTile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t b = b0 + warp;
  if (b < B) {
    const in_t* x = logits + b * K;
    acc_t* srow = (hard ? soft : weights) + b * K;  // holds y, then the soft sample
    const uint64_t base = offset + static_cast<uint64_t>(b) * static_cast<uint64_t>(K);
    acc_t m = neg_inf<acc_t>();
    for (int64_t k = lane; k < K; k += 32) {
      const acc_t noise = static_cast<acc_t>(gumbel_noise(seed, base + static_cast<uint64_t>(k)));
      const acc_t y = d_div(to_acc<acc_t>(x[k]) + noise, tau);
      srow[k] = y;
      m = y > m ? y : m;
    }
    m = warp_max(m);
    acc_t s = 0;
    for (int64_t k = lane; k < K; k += 32) s += d_exp(srow[k] - m);  // own writes: no sync needed
    s = warp_sum(s);
    acc_t best = acc_t(-1);
    int64_t best_k = K;
    for (int64_t k = lane; k < K; k += 32) {
      const acc_t p = d_div(d_exp(srow[k] - m), s);
      srow[k] = p;
      if (p > best) {  // increasing k per lane: the first maximum of this lane
        best = p;
        best_k = k;
      }
    }
    if (hard) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const acc_t ob = __shfl_xor_sync(kFullMask, best, o);
        const int64_t ok = __shfl_xor_sync(kFullMask, best_k, o);
        if (ob > best || (ob == best && ok < best_k)) {
          best = ob;
          best_k = ok;
        }
      }
      acc_t* wrow = weights + b * K;
      for (int64_t k = lane; k < K; k += 32) wrow[k] = k == best_k ? acc_t(1) : acc_t(0);
      if (lane == 0) s_idx[warp] = best_k;
    }
  }
  __syncthreads();  // the weights of the block's rows (global writes) are now visible to all its threads

  const int64_t nrows = B - b0 < kRows ? B - b0 : kRows;
  if (hard) {  // one-hot @ codebook: the chosen row, exactly
    for (int64_t i = threadIdx.x; i < nrows * D; i += kThreads) {
      const int64_t r = i / D, d = i - r * D;
      z[(b0 + r) * D + d] = codebook[s_idx[r] * D + d];
    }
    return;
  }
  for (int64_t d0 = 0; d0 < D; d0 += kThreads) {
    const int64_t d = d0 + threadIdx.x;
    acc_t acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kKTile) {
      const int64_t kt = K - k0 < kKTile ? K - k0 : kKTile;
      __syncthreads();  // the previous tile is consumed
      for (int i = threadIdx.x; i < kRows * kKTile; i += kThreads) {
        const int r = i / kKTile, kk = i % kKTile;
        s_w[r][kk] = (r < nrows && kk < kt) ? weights[(b0 + r) * K + k0 + kk] : acc_t(0);
      }
      __syncthreads();
      if (d < D) {
        for (int kk = 0; kk < kt; ++kk) {
          const acc_t e = to_acc<acc_t>(codebook[(k0 + kk) * D + d]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] += s_w[r][kk] * e;
        }
      }
    }
    if (d < D) {
      for (int r = 0; r < nrows; ++r) z[(b0 + r) * D + d] = from_acc<cb_t>(acc[r]);
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gumbel_bwd_kernel(const acc_t* __restrict__ grad_weights,
                                                             const acc_t* __restrict__ gz_e,
                                                             const acc_t* __restrict__ soft, int64_t B, int64_t K,
                                                             acc_t tau, acc_t* __restrict__ out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRows + warp;
  if (b >= B) return;
  const acc_t* gw = grad_weights + b * K;
  const acc_t* ge = gz_e + b * K;
  const acc_t* s = soft + b * K;
  acc_t dot = 0;
  for (int64_t k = lane; k < K; k += 32) dot += (gw[k] + ge[k]) * s[k];
  dot = warp_sum(dot);
  for (int64_t k = lane; k < K; k += 32) out[b * K + k] = d_div(s[k] * ((gw[k] + ge[k]) - dot), tau);
}

std::tuple<Tensor, Tensor, Tensor> gumbel_softmax_fwd_cuda(const Tensor& logits, const Tensor& codebook, double tau,
                                                           bool hard, int64_t seed, int64_t offset) {
  checks::gumbel_softmax_fwd(logits, codebook, tau, seed, offset, kRows);
  const int64_t B = logits.size(0), K = logits.size(1), D = codebook.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto cdt = compute_dtype(logits);
  Tensor weights = at::empty({B, K}, logits.options().dtype(cdt));
  Tensor soft = hard ? at::empty({B, K}, logits.options().dtype(cdt)) : at::empty({0}, logits.options().dtype(cdt));
  Tensor z = at::empty({B, D}, codebook.options());
  if (B == 0) return {weights, z, soft};
  const dim3 grid(static_cast<unsigned>(ceil_div(B, kRows)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_softmax_fwd_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = typename Acc<in_t>::type;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "gumbel_softmax_fwd_cuda", [&] {
      using cb_t = scalar_t;
      gumbel_fwd_kernel<in_t, acc_t, cb_t><<<grid, kThreads, 0, current_stream()>>>(
          logits.data_ptr<in_t>(), codebook.data_ptr<cb_t>(), B, K, D, static_cast<acc_t>(tau), hard,
          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), weights.data_ptr<acc_t>(),
          hard ? soft.data_ptr<acc_t>() : nullptr, z.data_ptr<cb_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {weights, z, soft};
}

std::tuple<Tensor, Tensor> gumbel_softmax_bwd_cuda(const Tensor& grad_weights, const Tensor& grad_z,
                                                   const Tensor& weights, const Tensor& soft_in,
                                                   const Tensor& codebook, double tau, bool need_logits,
                                                   bool need_codebook) {
  const bool has_soft = checks::gumbel_softmax_bwd(grad_weights, grad_z, weights, soft_in, codebook, tau, kRows);
  const int64_t B = weights.size(0), K = weights.size(1);
  const c10::cuda::CUDAGuard guard(weights.device());
  const Tensor& soft = has_soft ? soft_in : weights;
  const auto cdt = weights.scalar_type();
  // a fresh [0] tensor per absent output: a shared one would alias two outputs (opcheck rejects it)
  Tensor g_logits = at::empty({0}, soft.options()), g_codebook = at::empty({0}, soft.options());
  if (need_logits) {
    g_logits = at::empty({B, K}, weights.options());
    if (B > 0) {
      Tensor gz_e;  // grad_z @ codebook^T in the compute dtype
      if (cdt == at::kFloat && is_reduced(grad_z.scalar_type()) && grad_z.scalar_type() == codebook.scalar_type()) {
        gz_e = at::mm(grad_z, codebook.t(), at::kFloat);  // exact products, fp32 accumulation
      } else {
        gz_e = at::mm(grad_z.to(cdt), codebook.to(cdt).t());
      }
      const Tensor gw = grad_weights.scalar_type() == cdt ? grad_weights : grad_weights.to(cdt);
      AT_DISPATCH_FLOATING_TYPES(cdt, "gumbel_softmax_bwd_cuda", [&] {
        gumbel_bwd_kernel<scalar_t><<<dim3(static_cast<unsigned>(ceil_div(B, kRows))), kThreads, 0,
                                      current_stream()>>>(gw.data_ptr<scalar_t>(), gz_e.data_ptr<scalar_t>(),
                                                          soft.data_ptr<scalar_t>(), B, K,
                                                          static_cast<scalar_t>(tau), g_logits.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  if (need_codebook) {
    const Tensor g = at::mm(weights.t(), grad_z.to(cdt));  // [K, D] in the compute dtype
    g_codebook = g.scalar_type() == codebook.scalar_type() ? g : g.to(codebook.scalar_type());
  }
  return {g_logits, g_codebook};
}

}  // namespace
}  // namespace lpc_cuda

TORCH_LIBRARY_IMPL(lpc, CUDA, m) {
  m.impl("gumbel_softmax_fwd", &lpc_cuda::gumbel_softmax_fwd_cuda);
  m.impl("gumbel_softmax_bwd", &lpc_cuda::gumbel_softmax_bwd_cuda);
}
