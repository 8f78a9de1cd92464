// Schemas of the compiled kernels, declared once. Implementations register per dispatch key:
// csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA. lpc_kernels/_cpp.py calls them for the "cpu" and "cuda"
// backends and registers their fake impls; the public, differentiable ops (lpc::token_logprobs, ...) live in
// lpc_kernels/ops/. Argument contract: lpc_kernels/backend_interface.py. preference_loss's tensors, in the
// order of lpc_kernels.preference.PreferenceLossInputs: pc, pr = policy chosen / rejected log-probs, rc, rr =
// reference ones, cl, rl = chosen / rejected lengths, prior, post = code logits; grad_* = gradients of the
// forward's outputs (loss, losses, chosen_rewards, rejected_rewards, kl).
#include <Python.h>
#include <torch/library.h>

// Importing lpc_kernels._C loads this library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lpc, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index)"
        " -> Tensor");
  m.def("token_logprobs_bwd_(Tensor grad_logp, Tensor(a!) logits, Tensor labels, Tensor lse,"
        " int ignore_index) -> ()");
  m.def("linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels,"
        " int ignore_index, int chunk_size) -> (Tensor, Tensor)");
  m.def("linear_token_logprobs_bwd(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias,"
        " Tensor labels, Tensor lse, int ignore_index, int chunk_size, bool need_hidden, bool need_weight,"
        " bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("gumbel_softmax_fwd(Tensor logits, Tensor codebook, float tau, bool hard, int seed, int offset)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gumbel_softmax_bwd(Tensor grad_weights, Tensor grad_z, Tensor weights, Tensor soft,"
        " Tensor codebook, float tau, bool need_logits, bool need_codebook) -> (Tensor, Tensor)");
  m.def("preference_loss_fwd(Tensor pc, Tensor pr, Tensor? rc, Tensor? rr, Tensor? cl, Tensor? rl,"
        " Tensor? prior, Tensor? post, str loss_type, float beta, float gamma, float label_smoothing,"
        " float kl_weight, bool ipo_average) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("preference_loss_bwd(Tensor grad_loss, Tensor grad_losses, Tensor grad_chosen_rewards,"
        " Tensor grad_rejected_rewards, Tensor grad_kl, Tensor pc, Tensor pr, Tensor? rc, Tensor? rr, Tensor? cl,"
        " Tensor? rl, Tensor? prior, Tensor? post,"
        " str loss_type, float beta, float gamma, float label_smoothing, float kl_weight, bool ipo_average)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
