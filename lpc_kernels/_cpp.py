"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``lpc_kernels._C``.

The schemas are declared once in ``csrc/ops.cpp`` (``torch.ops.lpc.*_fwd`` / ``*_bwd``); the kernels
register per dispatch key (``csrc/cpu`` for CPU, ``csrc/cuda`` for CUDA), so one Python module serves
both backends and the dispatcher picks the kernel from the tensors' device. The functions below implement
``lpc_kernels.backend_interface``; the C++ ops return ``[0]``-shaped tensors for outputs the interface
returns as ``None`` (a schema cannot return None), mapped back here.

The fake (meta) implementations registered here let ``torch.compile`` and ``opcheck`` trace the raw
C++ ops without running them; they are the op contracts' own output shapes (``lpc_kernels.ops``), so the
custom ops and the raw kernels cannot drift apart.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from .ops import gumbel_softmax_codes, linear_token_logprobs, preference_loss, token_logprobs

_lpc = torch.ops.lpc


# ----------------------------------------------------------------------------------- token_logprobs
def token_logprobs_fwd(logits, labels, ignore_index):
    return _lpc.token_logprobs_fwd.default(logits, labels, ignore_index)


def token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, inplace):
    if inplace:
        _lpc.token_logprobs_bwd_.default(grad_logp, logits, labels, lse, ignore_index)
        return logits
    return _lpc.token_logprobs_bwd.default(grad_logp, logits, labels, lse, ignore_index)


# ---------------------------------------------------------------------------- linear_token_logprobs
def linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index, chunk_size):
    return _lpc.linear_token_logprobs_fwd.default(hidden, weight, bias, labels, ignore_index, chunk_size)


def linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size,
                              need_hidden, need_weight, need_bias, *, filter_eps=0.0):
    # filter_eps: ignored, the kernels compute the exact gradient
    gh, gw, gb = _lpc.linear_token_logprobs_bwd.default(grad_logp, hidden, weight, bias, labels, lse, ignore_index,
                                                        chunk_size, need_hidden, need_weight, need_bias)
    return gh if need_hidden else None, gw if need_weight else None, gb if need_bias else None


# ----------------------------------------------------------------------------- gumbel_softmax_codes
def gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset):
    weights, z, soft = _lpc.gumbel_softmax_fwd.default(logits, codebook, float(tau), hard, seed, offset)
    return weights, z, soft if hard else None


def gumbel_softmax_bwd(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook):
    soft = weights.new_empty(0) if soft is None else soft
    g_logits, g_codebook = _lpc.gumbel_softmax_bwd.default(grad_weights, grad_z, weights, soft, codebook, float(tau),
                                                           need_logits, need_codebook)
    return g_logits if need_logits else None, g_codebook if need_codebook else None


# ----------------------------------------------------------------------------------- preference_loss
def preference_loss_fwd(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing,
                        kl_weight, ipo_average):
    return _lpc.preference_loss_fwd.default(pc, pr, rc, rr, cl, rl, prior, post, loss_type, float(beta),
                                            float(gamma), float(label_smoothing), float(kl_weight), ipo_average)


def preference_loss_bwd(g_loss, g_losses, g_cr, g_rj, g_kl, pc, pr, rc, rr, cl, rl, prior, post, loss_type,
                        beta, gamma, label_smoothing, kl_weight, ipo_average):
    d_pc, d_pr, d_rc, d_rr, d_prior, d_post = _lpc.preference_loss_bwd.default(
        g_loss, g_losses, g_cr, g_rj, g_kl, pc, pr, rc, rr, cl, rl, prior, post, loss_type, float(beta),
        float(gamma), float(label_smoothing), float(kl_weight), ipo_average)
    return (d_pc, d_pr, d_rc if rc is not None else None, d_rr if rr is not None else None, None, None,
            d_prior if prior is not None else None, d_post if post is not None else None)


# ------------------------------------------------------------------------------- fake implementations
@torch.library.register_fake("lpc::token_logprobs_fwd")
def _(logits, labels, ignore_index):
    return token_logprobs.per_row_outputs(logits)


@torch.library.register_fake("lpc::token_logprobs_bwd")
def _(grad_logp, logits, labels, lse, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("lpc::token_logprobs_bwd_")
def _(grad_logp, logits, labels, lse, ignore_index):
    return None


@torch.library.register_fake("lpc::linear_token_logprobs_fwd")
def _(hidden, weight, bias, labels, ignore_index, chunk_size):
    return token_logprobs.per_row_outputs(hidden)


@torch.library.register_fake("lpc::linear_token_logprobs_bwd")
def _(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight, need_bias):
    return linear_token_logprobs.gradient_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)


@torch.library.register_fake("lpc::gumbel_softmax_fwd")
def _(logits, codebook, tau, hard, seed, offset):
    return gumbel_softmax_codes.sample_outputs(logits, codebook, hard)


@torch.library.register_fake("lpc::gumbel_softmax_bwd")
def _(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook):
    return gumbel_softmax_codes.gradient_outputs(weights, codebook, need_logits, need_codebook)


@torch.library.register_fake("lpc::preference_loss_fwd")
def _(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average):
    return preference_loss.loss_outputs(pc)


@torch.library.register_fake("lpc::preference_loss_bwd")
def _(g_loss, g_losses, g_cr, g_rr, g_kl, pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma,
      label_smoothing, kl_weight, ipo_average):
    return preference_loss.gradient_outputs(pc, pr, rc, rr, prior, post)
