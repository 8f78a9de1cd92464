"""Output shapes and dtypes of every op, for the fake (meta) implementations of both the Python custom ops
(``lpc_kernels._ops``) and the raw C++ kernels' schemas (``lpc_kernels._cpp``), so the two cannot drift.

Float outputs are in the compute dtype (``reference.compute_dtype``: fp64 for fp64 inputs, else fp32). An
output not asked for is a fresh ``[0]`` tensor each: one shared placeholder would alias two outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import compute_dtype


def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


def row_logprobs(x: Tensor) -> tuple[Tensor, Tensor]:
    """(logp [N], lse [N]) of token_logprobs (``x`` = logits) and linear_token_logprobs (``x`` = hidden)."""
    n, dt = x.shape[0], compute_dtype(x)
    return x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)


def linear_token_logprobs_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    """(grad_hidden, grad_weight, grad_bias), each like its input or ``[0]``."""
    return (torch.empty_like(hidden) if need_hidden else _absent(hidden),
            torch.empty_like(weight) if need_weight else _absent(hidden),
            torch.empty_like(bias) if need_bias else _absent(hidden))


def gumbel_softmax_outputs(logits, codebook, hard):
    """(weights [B, K], z [B, D] in the codebook dtype, soft [B, K] if hard else [0])."""
    b, k = logits.shape
    dt = compute_dtype(logits)
    return (logits.new_empty(b, k, dtype=dt), codebook.new_empty(b, codebook.shape[1]),
            logits.new_empty((b, k) if hard else (0,), dtype=dt))


def gumbel_softmax_grads(weights, codebook, need_logits, need_codebook):
    """(grad_logits like weights, grad_codebook like codebook), each or ``[0]``."""
    return (torch.empty_like(weights) if need_logits else _absent(weights),
            torch.empty_like(codebook) if need_codebook else _absent(weights))


def preference_loss_outputs(pc):
    """(loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B])."""
    b, dt = pc.shape[0], compute_dtype(pc)
    return (pc.new_empty((), dtype=dt),) + tuple(pc.new_empty(b, dtype=dt) for _ in range(4))


def preference_loss_grads(pc, pr, rc, rr, prior, post):
    """Gradients of (pc, pr, rc, rr, prior, post), each like its input or ``[0]`` for an absent input."""
    return tuple(torch.empty_like(t) if t is not None else _absent(pc) for t in (pc, pr, rc, rr, prior, post))
