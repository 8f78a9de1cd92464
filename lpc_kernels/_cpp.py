"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``lpc_kernels._C`` behind
``lpc_kernels.backend_interface``.

The schemas are declared once in ``csrc/ops.cpp``; the kernels register per dispatch key (``csrc/cpu``,
``csrc/cuda``), so one module serves both backends. A schema takes primitives and cannot return None: the
functions here unpack the named options into it and map its ``[0]``-shaped placeholders back to None. The fake
implementations (``lpc_kernels.shapes``) let ``torch.compile`` and ``opcheck`` trace the raw kernels.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from .preference import PreferenceLossOutput, unpack_input_grads
from .shapes import (gumbel_gradient_outputs, linear_gradient_outputs, loss_outputs, per_row_outputs,
                     preference_gradient_outputs, sample_outputs)

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
                              need_hidden, need_weight, need_bias):
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
def _schema_options(options):
    """The options as the schemas take them (after the eight input tensors)."""
    return (options.loss_type, float(options.beta), float(options.gamma), float(options.label_smoothing),
            float(options.kl_weight), options.ipo_average)


def preference_loss_fwd(inputs, options):
    return PreferenceLossOutput(*_lpc.preference_loss_fwd.default(*inputs, *_schema_options(options)))


def preference_loss_bwd(grad_outputs, inputs, options):
    grads = _lpc.preference_loss_bwd.default(*grad_outputs, *inputs, *_schema_options(options))
    return unpack_input_grads(grads, inputs)


# ------------------------------------------------------------------------------- fake implementations
@torch.library.register_fake("lpc::token_logprobs_fwd")
def _(logits, labels, ignore_index):
    return per_row_outputs(logits)


@torch.library.register_fake("lpc::token_logprobs_bwd")
def _(grad_logp, logits, labels, lse, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("lpc::token_logprobs_bwd_")
def _(grad_logp, logits, labels, lse, ignore_index):
    return None


@torch.library.register_fake("lpc::linear_token_logprobs_fwd")
def _(hidden, weight, bias, labels, ignore_index, chunk_size):
    return per_row_outputs(hidden)


@torch.library.register_fake("lpc::linear_token_logprobs_bwd")
def _(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight, need_bias):
    return linear_gradient_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)


@torch.library.register_fake("lpc::gumbel_softmax_fwd")
def _(logits, codebook, tau, hard, seed, offset):
    return sample_outputs(logits, codebook, hard)


@torch.library.register_fake("lpc::gumbel_softmax_bwd")
def _(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook):
    return gumbel_gradient_outputs(weights, codebook, need_logits, need_codebook)


@torch.library.register_fake("lpc::preference_loss_fwd")
def _(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average):
    return loss_outputs(pc)


@torch.library.register_fake("lpc::preference_loss_bwd")
def _(grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl, pc, pr, rc, rr, cl, rl, prior,
      post, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average):
    return preference_gradient_outputs(pc, pr, rc, rr, prior, post)
