"""The outputs' shapes and dtypes of the custom ops (``lpc_kernels.ops``) and of the compiled kernels
(``lpc_kernels._cpp``), for their fake (meta) implementations: both register these, so they cannot drift apart.
A fresh ``[0]`` tensor stands for an output not asked for (outputs may not alias)."""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import compute_dtype


def per_row_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(logp [N], lse [N])`` for rows ``x [N, *]`` (logits, or the hidden states of the linear op)."""
    n, dt = x.shape[0], compute_dtype(x)
    return x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)


def linear_gradient_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias):
    """``(grad_hidden, grad_weight, grad_bias)``, each like its input or a fresh ``[0]`` tensor."""
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def sample_outputs(logits, codebook, hard):
    """``(weights [B, K], z [B, D]`` in the codebook dtype, ``soft [B, K]`` if hard else ``[0])``."""
    b, k = logits.shape
    dt = compute_dtype(logits)
    return (logits.new_empty(b, k, dtype=dt), codebook.new_empty(b, codebook.shape[1]),
            logits.new_empty((b, k) if hard else (0,), dtype=dt))


def gumbel_gradient_outputs(weights, codebook, need_logits, need_codebook):
    """``(grad_logits like weights, grad_codebook like codebook)``, each or a fresh ``[0]`` tensor."""
    return (torch.empty_like(weights) if need_logits else weights.new_empty(0),
            torch.empty_like(codebook) if need_codebook else weights.new_empty(0))


def loss_outputs(policy_chosen_logps):
    """``(loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B])``."""
    b, dt = policy_chosen_logps.shape[0], compute_dtype(policy_chosen_logps)
    return (policy_chosen_logps.new_empty((), dtype=dt),) + tuple(
        policy_chosen_logps.new_empty(b, dtype=dt) for _ in range(4))


def preference_gradient_outputs(*differentiable_inputs):
    """The gradients of ``preference.DIFFERENTIABLE_INPUTS`` (given in that order), each like its input or a fresh
    ``[0]`` tensor."""
    first = differentiable_inputs[0]
    return tuple(torch.empty_like(t) if t is not None else first.new_empty(0) for t in differentiable_inputs)
