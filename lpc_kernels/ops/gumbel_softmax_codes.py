"""``gumbel_softmax_codes``: a Gumbel-softmax sample over K codes and the latent ``z = weights @ codebook``.

Contract: ``docs/design.md``, "Op contracts" (``gumbel_softmax_codes``); the noise: "Random numbers". Layers:
``gumbel_softmax_codes`` (checks) -> ``gumbel_softmax_codes_op`` (custom op ``lpc::gumbel_softmax_codes``:
NaN check, then the backend's ``gumbel_softmax_fwd``) -> autograd -> ``gumbel_softmax_codes_backward_op``
(straight-through the soft sample when ``hard``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_bool, check_float, check_int, check_same_device, check_tensor, raise_if_bad_values
from ..shapes import gumbel_gradient_outputs, sample_outputs


def gumbel_softmax_codes(logits: Tensor, codebook: Tensor, *, tau: float = 1.0, hard: bool = False, seed: int = 0,
                         offset: int = 0, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Gumbel-softmax sample over K codes and the latent ``z = weights @ codebook``.

    The noise for element ``(b, k)`` is ``-log(-log(u))``, ``u`` the Philox4x32-10 uniform of counter
    ``offset + b*K + k`` under ``seed`` (what Triton's ``tl.rand`` computes), clamped to ``[2**-32, 1 - 2**-24]``;
    every backend draws the same uniforms (``docs/design.md``, "Random numbers"). With ``hard=True`` the weights are
    one-hot (first maximum) and gradients are straight-through the soft sample.

    Args:
        logits: ``[B, K]`` float. codebook: ``[K, D]`` float. tau: temperature > 0.
        seed: int in ``[0, 2**63)``. offset: int >= 0, counter of the first element.

    Returns:
        ``(weights [B, K]`` float32 (float64 for float64 logits), ``z [B, D]`` in the codebook's dtype).
    """
    check_gumbel_softmax_codes(logits, codebook, tau, hard, seed, offset)
    name = resolve_backend(backend, logits.device)
    weights, z, _ = gumbel_softmax_codes_op(logits.contiguous(), codebook.contiguous(), float(tau), hard, seed,
                                            offset, name)
    return weights, z


def check_gumbel_softmax_codes(logits, codebook, tau, hard, seed, offset) -> None:
    check_tensor("logits", logits, ndim=2)
    check_tensor("codebook", codebook, ndim=2)
    if logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [B, K] with B > 0, got {tuple(logits.shape)}")
    if logits.shape[1] != codebook.shape[0] or codebook.shape[0] == 0:
        raise ValueError(f"codebook must have shape [K, D] with K = logits.shape[1] = {logits.shape[1]} > 0, "
                         f"got {tuple(codebook.shape)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook must have shape [K, D] with D > 0, got {tuple(codebook.shape)}")
    check_float("tau", tau, positive=True)
    check_bool("hard", hard)
    check_int("seed", seed, low=0)
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    check_int("offset", offset, low=0)
    if offset + logits.numel() >= 2**63:
        raise ValueError(f"offset + B*K must be < 2**63, got offset={offset}")
    check_same_device({"logits": logits, "codebook": codebook})


@torch.library.custom_op("lpc::gumbel_softmax_codes", mutates_args=())
def gumbel_softmax_codes_op(logits: Tensor, codebook: Tensor, tau: float, hard: bool, seed: int, offset: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, K], codebook [K, D] -> (weights [B, K] fp32, z [B, D] codebook dtype, soft [B, K] fp32).

    ``soft`` (the pre-argmax sample, needed by the straight-through backward) is ``[0]``-shaped unless
    ``hard``: for soft samples it equals ``weights``.
    """
    raise_if_bad_values({"logits": logits})
    weights, z, soft = backend_module(backend).gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset)
    return weights, z, soft if soft is not None else weights.new_empty(0)


@gumbel_softmax_codes_op.register_fake
def _(logits, codebook, tau, hard, seed, offset, backend):
    return sample_outputs(logits, codebook, hard)


@torch.library.custom_op("lpc::gumbel_softmax_codes_backward", mutates_args=())
def gumbel_softmax_codes_backward_op(grad_weights: Tensor, grad_z: Tensor, weights: Tensor, soft: Tensor,
                                     codebook: Tensor, tau: float, need_logits: bool, need_codebook: bool,
                                     backend: str) -> tuple[Tensor, Tensor]:
    """``soft`` is the forward's third output: ``[0]``-shaped for soft samples (then ``weights`` is used)."""
    g_logits, g_codebook = backend_module(backend).gumbel_softmax_bwd(
        grad_weights, grad_z, weights, soft if soft.numel() else None, codebook, tau, need_logits, need_codebook)
    return (g_logits if g_logits is not None else soft.new_empty(0),
            g_codebook if g_codebook is not None else soft.new_empty(0))


@gumbel_softmax_codes_backward_op.register_fake
def _(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook, backend):
    return gumbel_gradient_outputs(weights, codebook, need_logits, need_codebook)


def _setup(ctx, inputs, output):
    logits, codebook, tau, hard, seed, offset, backend = inputs
    weights, _, soft = output
    ctx.save_for_backward(weights, soft, codebook)
    ctx.tau, ctx.backend, ctx.logits_dtype = tau, backend, logits.dtype
    ctx.mark_non_differentiable(soft)


def _backward(ctx, grad_weights, grad_z, grad_soft):
    weights, soft, codebook = ctx.saved_tensors
    need_logits, need_codebook = ctx.needs_input_grad[:2]
    if not (need_logits or need_codebook):
        return None, None, None, None, None, None, None
    grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights.contiguous()
    grad_z = torch.zeros(weights.shape[0], codebook.shape[1], dtype=codebook.dtype, device=codebook.device) \
        if grad_z is None else grad_z.contiguous()
    g_logits, g_codebook = gumbel_softmax_codes_backward_op(
        grad_weights, grad_z, weights, soft, codebook, ctx.tau, need_logits, need_codebook, ctx.backend)
    return (g_logits.to(ctx.logits_dtype) if need_logits else None, g_codebook if need_codebook else None,
            None, None, None, None, None)


gumbel_softmax_codes_op.register_autograd(_backward, setup_context=_setup)
