"""``preference_loss``: DPO / IPO / SimPO pair losses plus the LPC term ``kl_weight * KL(q || p)``.

Contract: ``docs/design.md``, "Op contracts" (``preference_loss``). Layers: ``preference_loss`` (checks) ->
``preference_loss_op`` (custom op ``lpc::preference_loss``: NaN and length checks, then the backend's
``preference_loss_fwd``) -> autograd -> ``preference_loss_backward_op`` (every float input's gradient in one
backend call). The named inputs, options and outputs: ``lpc_kernels.preference``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_same_device, check_tensor, raise_if_bad_values
from ..numerics import FLOAT_DTYPES, INDEX_DTYPES, compute_dtype
from ..preference import (DIFFERENTIABLE_INPUTS, PreferenceLossInputs, PreferenceLossOptions, PreferenceLossOutput,
                          pack_input_grads, unpack_input_grads)
from ..shapes import loss_outputs, preference_gradient_outputs


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None, *,
                    chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                    prior_logits: Optional[Tensor] = None, posterior_logits: Optional[Tensor] = None,
                    loss_type: str = "dpo", beta: float = 0.1, gamma: float = 0.0, label_smoothing: float = 0.0,
                    kl_weight: float = 0.0, ipo_average: bool = True, backend: str = "auto") -> PreferenceLossOutput:
    """Pairwise preference loss (DPO, IPO or SimPO) plus the LPC term ``kl_weight * KL(q || p)``.

    With margin ``h`` per pair (``lp`` = summed policy log-prob, ``ref`` = reference, ``|y|`` = length):

    * dpo:   ``h = beta * ((lp_w - ref_w) - (lp_l - ref_l))``, ``loss = -(1-eps) logsig(h) - eps logsig(-h)``
    * ipo:   ``h = (lp_w - ref_w)/|y_w| - (lp_l - ref_l)/|y_l|`` (lengths 1 if ``ipo_average=False``),
      ``loss = (h - 1/(2 beta))**2``
    * simpo: ``h = beta * (lp_w/|y_w| - lp_l/|y_l|) - gamma``, loss as dpo (reference-free)

    ``KL(q||p) = sum_k q_k (log q_k - log p_k)`` with ``q = softmax(posterior_logits)``,
    ``p = softmax(prior_logits)``. Rewards: ``beta * (lp - ref)`` (dpo), the same per token (ipo with
    ``ipo_average``), ``beta * lp / |y|`` (simpo). All outputs are differentiable.

    Args: logps ``[B]`` float; lengths ``[B]`` int or float > 0 (simpo, and ipo with ``ipo_average``);
    prior/posterior logits ``[B, K]`` (needed when ``kl_weight > 0``); ``eps = label_smoothing`` in
    ``[0, 0.5]`` (dpo, simpo); ``gamma`` for simpo only.
    """
    inputs = PreferenceLossInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  chosen_lengths, rejected_lengths, prior_logits, posterior_logits)
    options = PreferenceLossOptions(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average).checked()
    check_preference_loss(inputs, options)
    name = resolve_backend(backend, policy_chosen_logps.device)
    inputs = PreferenceLossInputs(*(t.contiguous() if t is not None else None for t in inputs))
    # eager: a plain autograd.Function around the same bodies (the custom op's Python autograd layer costs more
    # than this op's kernels); torch.compile sees the custom op
    op = preference_loss_op if torch.compiler.is_compiling() else _PreferenceLossFunction.apply
    return PreferenceLossOutput(*op(*op_args(inputs, options, name)))


def check_preference_loss(inputs: PreferenceLossInputs, options: PreferenceLossOptions) -> None:
    """The tensors of ``inputs`` and what ``options`` (already ``checked``) asks of them."""
    pc, rc, prior = inputs.policy_chosen_logps, inputs.ref_chosen_logps, inputs.prior_logits
    loss_type = options.loss_type
    check_tensor("policy_chosen_logps", pc, ndim=1)
    b = pc.shape[0]
    if b == 0:
        raise ValueError("policy_chosen_logps is empty: preference_loss needs at least one pair")
    for name in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        t = getattr(inputs, name)
        if t is not None:
            check_tensor(name, t, ndim=1)
            if t.shape[0] != b:
                raise ValueError(f"{name} must have shape [B] = [{b}] like policy_chosen_logps, got {tuple(t.shape)}")
    if inputs.policy_rejected_logps is None:
        raise TypeError("policy_rejected_logps is required")
    if (rc is None) != (inputs.ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    if loss_type in ("dpo", "ipo") and rc is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if loss_type == "simpo" and rc is not None:
        raise ValueError("loss_type='simpo' is reference-free: do not pass ref_chosen_logps/ref_rejected_logps")
    for name in ("chosen_lengths", "rejected_lengths"):
        t = getattr(inputs, name)
        if t is None:
            if options.needs_lengths:
                raise ValueError(f"{name} is required for loss_type={loss_type!r}"
                                 + (" with ipo_average=True" if loss_type == "ipo" else ""))
            continue
        check_tensor(name, t, FLOAT_DTYPES + INDEX_DTYPES, ndim=1)
        if t.shape[0] != b:
            raise ValueError(f"{name} must have shape [B] = [{b}], got {tuple(t.shape)}")
    post = inputs.posterior_logits
    if (prior is None) != (post is None):
        raise ValueError("prior_logits and posterior_logits must be given together")
    if prior is not None:
        check_tensor("prior_logits", prior, ndim=2)
        check_tensor("posterior_logits", post, ndim=2)
        if prior.shape != post.shape or prior.shape[0] != b or prior.shape[1] == 0:
            raise ValueError(f"prior_logits and posterior_logits must both have shape [B, K] with B = {b}, "
                             f"K > 0; got {tuple(prior.shape)} and {tuple(post.shape)}")
    if options.kl_weight > 0 and prior is None:
        raise ValueError(f"kl_weight={options.kl_weight} > 0 needs prior_logits and posterior_logits")
    check_same_device(inputs._asdict())


def op_args(inputs: PreferenceLossInputs, options: PreferenceLossOptions, backend: str) -> tuple:
    """The custom ops' arguments: the fields of ``inputs`` and of ``options`` as primitives, then the backend."""
    return (*inputs, *options, backend)


def split_op_args(args) -> tuple[PreferenceLossInputs, PreferenceLossOptions, str]:
    """``(inputs, options, backend)`` of the arguments ``op_args`` made."""
    n, m = len(PreferenceLossInputs._fields), len(PreferenceLossOptions._fields)
    return PreferenceLossInputs(*args[:n]), PreferenceLossOptions(*args[n:n + m]), args[n + m]


def preference_loss_forward(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                            ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor],
                            chosen_lengths: Optional[Tensor], rejected_lengths: Optional[Tensor],
                            prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor], loss_type: str,
                            beta: float, gamma: float, label_smoothing: float, kl_weight: float, ipo_average: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B pairs -> the fields of ``PreferenceLossOutput``, fp32 (fp64 for fp64 inputs). The body of the custom op
    ``lpc::preference_loss`` and of the eager path."""
    inputs = PreferenceLossInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  chosen_lengths, rejected_lengths, prior_logits, posterior_logits)
    raise_if_bad_values(inputs._asdict(), positive=("chosen_lengths", "rejected_lengths"))
    options = PreferenceLossOptions(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    return tuple(backend_module(backend).preference_loss_fwd(inputs, options))


preference_loss_op = torch.library.custom_op("lpc::preference_loss", mutates_args=())(preference_loss_forward)


@preference_loss_op.register_fake
def _(policy_chosen_logps, *rest):
    return loss_outputs(policy_chosen_logps)


def preference_loss_gradients(grad_loss: Tensor, grad_losses: Tensor, grad_chosen_rewards: Tensor,
                              grad_rejected_rewards: Tensor, grad_kl: Tensor, policy_chosen_logps: Tensor,
                              policy_rejected_logps: Tensor, ref_chosen_logps: Optional[Tensor],
                              ref_rejected_logps: Optional[Tensor], chosen_lengths: Optional[Tensor],
                              rejected_lengths: Optional[Tensor], prior_logits: Optional[Tensor],
                              posterior_logits: Optional[Tensor], loss_type: str, beta: float, gamma: float,
                              label_smoothing: float, kl_weight: float, ipo_average: bool,
                              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``preference.DIFFERENTIABLE_INPUTS`` (``pack_input_grads``: a ``[0]`` tensor for an absent
    input). The body of the custom op ``lpc::preference_loss_backward`` and of the eager path."""
    grad_outputs = PreferenceLossOutput(grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl)
    inputs = PreferenceLossInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  chosen_lengths, rejected_lengths, prior_logits, posterior_logits)
    options = PreferenceLossOptions(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    grads = backend_module(backend).preference_loss_bwd(grad_outputs, inputs, options)
    return pack_input_grads(grads, lambda: policy_chosen_logps.new_empty(0))


preference_loss_backward_op = torch.library.custom_op("lpc::preference_loss_backward",
                                                      mutates_args=())(preference_loss_gradients)


@preference_loss_backward_op.register_fake
def _(grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl, *args):
    inputs, _, _ = split_op_args(args)
    return preference_gradient_outputs(*(getattr(inputs, name) for name in DIFFERENTIABLE_INPUTS))


def _setup(ctx, inputs, output):
    tensors, options, backend = split_op_args(inputs)
    ctx.save_for_backward(*tensors)
    ctx.options, ctx.backend = options, backend


def _backward(ctx, *grad_outputs, backward_op=preference_loss_backward_op):
    inputs = PreferenceLossInputs(*ctx.saved_tensors)
    pc = inputs.policy_chosen_logps
    dt = compute_dtype(pc)
    b = pc.shape[0]

    def _grad(g, shape):
        return torch.zeros(shape, dtype=dt, device=pc.device) if g is None else g.to(dt).contiguous()

    grad_outputs = PreferenceLossOutput(*grad_outputs)
    incoming = PreferenceLossOutput(
        loss=_grad(grad_outputs.loss, ()), losses=_grad(grad_outputs.losses, b),
        chosen_rewards=_grad(grad_outputs.chosen_rewards, b), rejected_rewards=_grad(grad_outputs.rejected_rewards, b),
        kl=_grad(grad_outputs.kl, b))
    grads = unpack_input_grads(backward_op(*incoming, *op_args(inputs, ctx.options, ctx.backend)), inputs)
    needs = PreferenceLossInputs(*ctx.needs_input_grad[:len(PreferenceLossInputs._fields)])
    wanted = [g if need else None for g, need in zip(grads, needs)]
    return tuple(wanted) + (None,) * (len(PreferenceLossOptions._fields) + 1)  # no gradient for options, backend


preference_loss_op.register_autograd(_backward, setup_context=_setup)


class _PreferenceLossFunction(torch.autograd.Function):
    """The eager path: the custom op's bodies under a plain ``autograd.Function`` (same numerics)."""

    @staticmethod
    def forward(ctx, *args):
        out = preference_loss_forward(*args)
        _setup(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _backward(ctx, *grad_outputs, backward_op=preference_loss_gradients)
