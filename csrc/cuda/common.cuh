// Shared pieces of the CUDA kernels (csrc/cuda/*.cu): dtype helpers, vectorised row
// traversal, online log-sum-exp, warp/block reductions, and cuBLAS matmuls through ATen.
//
// Lean headers only (no torch/extension.h, no ATen/cuda/CUDAContext.h: the toolkit on the build machines
// lacks cusparse.h, which that header pulls in).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "checks.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

namespace lpc_cuda {

using at::Tensor;

// ---------------------------------------------------------------------------------- host helpers
// The argument checks live in checks.cpp (compiled by the host compiler, see checks.h); nothing here
// formats an error message.

// Labels as contiguous int64 (int32 is widened; a no-op for int64).
inline Tensor labels_int64(const Tensor& labels) {
  checks::label_dtype(labels);
  return labels.scalar_type() == at::kLong ? labels.contiguous() : labels.to(at::kLong).contiguous();
}

// Compute dtype of the contract: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType compute_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ device: dtype math
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// nvcc builds with --use_fast_math: expf/logf map to the MUFU approximations (relative error ~2^-21),
// which is far inside the contract's 1e-5 tolerance; float64 keeps the precise libm functions.
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }
// IEEE round-to-nearest division (--use_fast_math would otherwise approximate float division).
__device__ __forceinline__ float d_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double d_div(double a, double b) { return a / b; }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float to_acc<float, float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_acc<float, double>(double v) {
  return static_cast<float>(v);
}

template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half, double>(double v) {
  return c10::Half(static_cast<float>(v));
}
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16, double>(double v) {
  return c10::BFloat16(static_cast<float>(v));
}

// ---------------------------------------------------------------- type-erased [B] vectors (any dtype)
// preference_loss takes [B] inputs of any float (and, for lengths, integer) dtype and returns gradients
// in each input's dtype; a code per vector lets one kernel launch read and write them all.
// (VecCode: checks.h.)
struct AnyVec {
  void* ptr = nullptr;
  int code = kAbsent;
};

inline AnyVec any_vec(const Tensor& t, const char* name) {
  AnyVec v;
  if (!t.defined()) return v;
  v.code = checks::vec_code(t, name);  // raises (from checks.cpp) for an unsupported dtype
  v.ptr = t.data_ptr();
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t any_load(const AnyVec& v, int64_t i) {
  switch (v.code) {
    case kF32: return static_cast<acc_t>(static_cast<const float*>(v.ptr)[i]);
    case kF64: return static_cast<acc_t>(static_cast<const double*>(v.ptr)[i]);
    case kF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(v.ptr)[i]));
    case kBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(v.ptr)[i]));
    case kI64: return static_cast<acc_t>(static_cast<const int64_t*>(v.ptr)[i]);
    case kI32: return static_cast<acc_t>(static_cast<const int32_t*>(v.ptr)[i]);
    default: return acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ void any_store(const AnyVec& v, int64_t i, acc_t x) {
  switch (v.code) {
    case kF32: static_cast<float*>(v.ptr)[i] = static_cast<float>(x); break;
    case kF64: static_cast<double*>(v.ptr)[i] = static_cast<double>(x); break;
    case kF16: static_cast<c10::Half*>(v.ptr)[i] = c10::Half(static_cast<float>(x)); break;
    case kBF16: static_cast<c10::BFloat16*>(v.ptr)[i] = c10::BFloat16(static_cast<float>(x)); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------- warp / block reduce
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    acc_t other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Online log-sum-exp state: the running maximum ``m`` and ``s = sum exp(x - m)``.
// -inf entries contribute nothing; a NaN entry makes ``s`` NaN (as torch.logsumexp does).
template <typename acc_t>
struct MaxSum {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> ms_init() {
  return {neg_inf<acc_t>(), acc_t(0)};
}

// Merge a group of n values: one rescale at most, then one exp per value.
template <typename acc_t, int N>
__device__ __forceinline__ void ms_add(MaxSum<acc_t>& st, const acc_t (&x)[N]) {
  acc_t vm = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vm = x[i] > vm ? x[i] : vm;
  if (vm > st.m) {
    st.s = st.s * d_exp(st.m - vm);  // exp(-inf) = 0 on the first group
    st.m = vm;
  }
  if (st.m == neg_inf<acc_t>()) {  // every value so far is -inf (or NaN): nothing to add
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (x[i] != x[i]) st.s = x[i];
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) st.s += d_exp(x[i] - st.m);
}

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> ms_merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) return {m, a.s + b.s};
  return {m, a.s * d_exp(a.m - m) + b.s * d_exp(b.m - m)};
}

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> warp_ms(MaxSum<acc_t> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum<acc_t> other{__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
    v = ms_merge(v, other);
  }
  return v;
}

// Block-wide merge; every thread gets the result. ``shm`` holds BLOCK/32 entries.
template <int BLOCK, typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> block_ms(MaxSum<acc_t> v, MaxSum<acc_t>* shm) {
  constexpr int kWarps = BLOCK / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_ms(v);
  if (kWarps == 1) return v;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  MaxSum<acc_t> r = lane < kWarps ? shm[lane] : ms_init<acc_t>();
  r = warp_ms(r);
  __syncthreads();  // shm may be reused by the caller
  return r;
}

// ------------------------------------------------------------------------- vectorised row traversal
// Visits row[0..n) in groups: an unaligned head and tail element by element, the aligned middle in
// 16-byte vectors (8 bf16/fp16, 4 fp32, 2 fp64), calling ``f.template visit<CNT>(i0, vals)`` with the
// CNT values of elements i0..i0+CNT. Thread t of a BLOCK-thread group handles vectors t, t+BLOCK, ...
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <int BLOCK, typename T, typename F>
__device__ __forceinline__ void row_visit(const T* row, int64_t n, F& f) {
  constexpr int VEC = Vec16<T>::kN;
  const int tid = threadIdx.x;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(row) & 15u;
  int64_t head = mis ? static_cast<int64_t>((16u - mis) / sizeof(T)) : 0;
  if (head > n) head = n;
  if (tid < head) {
    T one[1] = {row[tid]};
    f.template visit<1>(tid, one);
  }
  const int64_t nvec = (n - head) / VEC;
  const Vec16<T>* vp = reinterpret_cast<const Vec16<T>*>(row + head);
  constexpr int UNROLL = 4;  // several 16-byte loads in flight per thread
  int64_t j = tid;
  for (; j + (UNROLL - 1) * BLOCK < nvec; j += UNROLL * BLOCK) {
    Vec16<T> buf[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) buf[u] = vp[j + u * BLOCK];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) f.template visit<VEC>(head + (j + u * BLOCK) * VEC, buf[u].v);
  }
  for (; j < nvec; j += BLOCK) {
    Vec16<T> one = vp[j];
    f.template visit<VEC>(head + j * VEC, one.v);
  }
  for (int64_t i = head + nvec * VEC + tid; i < n; i += BLOCK) {
    T one[1] = {row[i]};
    f.template visit<1>(i, one);
  }
}

// Scalar traversal (any alignment): f.template visit<1>(i, &row[i]).
template <int BLOCK, typename T, typename F>
__device__ __forceinline__ void row_visit_scalar(const T* row, int64_t n, F& f) {
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) {
    T one[1] = {row[i]};
    f.template visit<1>(i, one);
  }
}

// Threads per row-block for a row of ``bytes`` bytes: enough 16-byte vectors per thread to hide latency.
inline int row_block_size(int64_t bytes) {
  if (bytes <= 4096) return 128;
  if (bytes <= 32768) return 256;
  return 512;
}

// ------------------------------------------------------------------------------ matmuls via cuBLAS
// out = a @ b. fp16/bf16 inputs may write a float32 ``out`` (cuBLAS accumulates in fp32 and rounds once,
// so the result equals fp32 math on the exactly upcast inputs up to summation order).
inline void mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// acc += a @ b with ``acc`` in the compute dtype (float32 for fp16/bf16 inputs). ``scratch`` (allocated
// here on first use) is needed only where this torch's addmm.dtype_out rejects a float32 ``self`` with
// fp16/bf16 matrices (older releases): then a float32 product is added separately.
inline void mm_accumulate(Tensor& acc, const Tensor& a, const Tensor& b, Tensor& scratch) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b);
    return;
  }
  static std::atomic<int> addmm_dtype_ok{-1};  // -1 unknown, 1 works, 0 rejected by this torch
  if (addmm_dtype_ok.load() != 0) {
    try {
      at::addmm_out(acc, acc, a, b, acc.scalar_type(), /*beta=*/1, /*alpha=*/1);
      addmm_dtype_ok.store(1);
      return;
    } catch (const c10::Error&) {
      if (addmm_dtype_ok.load() == 1) throw;  // it worked before: a real error
      addmm_dtype_ok.store(0);
    }
  }
  if (!scratch.defined() || scratch.sizes() != acc.sizes()) scratch = at::empty(acc.sizes(), acc.options());
  at::mm_out(scratch, a, b, acc.scalar_type());
  acc.add_(scratch);
}

}  // namespace lpc_cuda
