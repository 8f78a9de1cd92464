// Host-side argument checks of the CUDA ops, declared for csrc/cuda/*.cu and defined in checks.cpp.
//
// Why a separate, g++-compiled file: keeping all message formatting out of nvcc's host pass, in code the
// host compiler alone builds, and formatting it without std::ostream (LPC_CHECK, csrc/format.h: the GPU
// machines' builds segfaulted inside std::ostream::_M_insert<long> when a message streamed a number). The
// .cu files pass only Tensors, int64s, doubles, bools and const char* across and format nothing.
//
// Every message names the argument (tests/backends/test_cuda_kernels.py matches on the name) and what was
// expected.
// This header is plain C++: no CUDA types, so both compilers read the same declarations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string_view>

namespace lpc_cuda {

// Element types of the type-erased [B] vectors of preference_loss (common.cuh: AnyVec).
enum VecCode : int { kAbsent = 0, kF32 = 1, kF64 = 2, kF16 = 3, kBF16 = 4, kI64 = 5, kI32 = 6 };

// preference_loss loss types, as the kernels number them.
enum LossType : int { kDpo = 0, kIpo = 1, kSimpo = 2 };

namespace checks {

// ------------------------------------------------------------------------------------- primitives
// `t` is defined and on a CUDA device.
void cuda_tensor(const at::Tensor& t, const char* name);
// CUDA, `dim`-D, contiguous, and on the device of `ref` (named `ref_name`).
void input(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref, const char* ref_name);
// float32, float64, float16 or bfloat16.
void floating(const at::Tensor& t, const char* name);
// labels: int64 or int32.
void label_dtype(const at::Tensor& labels);
// The VecCode of a defined tensor of a supported dtype; raises naming `name` otherwise.
int vec_code(const at::Tensor& t, const char* name);
// `count` grid blocks (or GEMM rows) fit one launch (< 2^31); `what` names the argument that sets it.
void fits_launch(int64_t count, const char* what);

// ------------------------------------------------------------------------------------------- ops
void token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels);
void token_logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                        const at::Tensor& lse);

// `bias` undefined when absent.
void linear_token_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& labels, int64_t chunk_size);
// The backward's extra arguments; `n` = hidden.size(0).
void linear_token_logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& lse, const at::Tensor& hidden,
                               bool need_bias, bool has_bias);

// `rows_per_block`: rows of logits one block handles (the launch-size check).
void gumbel_softmax_fwd(const at::Tensor& logits, const at::Tensor& codebook, double tau, int64_t seed,
                        int64_t offset, int64_t rows_per_block);
// Returns whether `soft` holds the soft sample (hard forward) rather than being the [0] placeholder.
bool gumbel_softmax_bwd(const at::Tensor& grad_weights, const at::Tensor& grad_z, const at::Tensor& weights,
                        const at::Tensor& soft, const at::Tensor& codebook, double tau, int64_t rows_per_block);

// The shape preference_loss runs with, after its checks.
struct PrefShape {
  int loss_type = kDpo;
  int64_t B = 0;
  int64_t K = 0;  // 0 without prior/posterior logits
};
// Optional tensors are passed undefined when absent. `pairs_per_block`: the launch-size check.
PrefShape preference_loss(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
                          const at::Tensor& cl, const at::Tensor& rl, const at::Tensor& prior,
                          const at::Tensor& post, std::string_view loss_type, bool ipo_average, double beta,
                          double label_smoothing, double kl_weight, int64_t pairs_per_block);
// The backward's incoming gradients of the forward's outputs (grad_loss scalar; the others [B]).
void preference_loss_grads(const at::Tensor& grad_loss, const at::Tensor& grad_losses,
                           const at::Tensor& grad_chosen_rewards, const at::Tensor& grad_rejected_rewards,
                           const at::Tensor& grad_kl, const at::Tensor& pc);

}  // namespace checks
}  // namespace lpc_cuda
