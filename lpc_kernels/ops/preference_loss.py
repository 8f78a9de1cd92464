"""``preference_loss``: DPO / IPO / SimPO pair losses plus the LPC term ``kl_weight * KL(q || p)``.

Contract: ``docs/design.md`` section 2 (preference_loss); the method: section 1. Layers:
``preference_loss`` (checks) -> ``preference_loss_op`` (custom op ``lpc::preference_loss``: NaN and length
checks, then the backend's ``preference_loss_fwd``) -> autograd -> ``preference_loss_backward_op`` (every
float input's gradient in one backend call).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_bool, check_float, check_same_device, check_tensor, raise_if_bad_values
from ..numerics import FLOAT_DTYPES, INDEX_DTYPES, compute_dtype

LOSS_TYPES = ("dpo", "ipo", "simpo")
INPUT_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
               "chosen_lengths", "rejected_lengths", "prior_logits", "posterior_logits")


class PreferenceLossOutput(NamedTuple):
    """``loss`` scalar = mean of ``losses [B]`` (pair loss + kl_weight * kl); rewards and ``kl`` are ``[B]``."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


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
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
            rejected_lengths, prior_logits, posterior_logits)
    options = (loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    check_preference_loss(*args, *options)
    name = resolve_backend(backend, policy_chosen_logps.device)
    args = tuple(t.contiguous() if t is not None else None for t in args)
    options = (loss_type, float(beta), float(gamma), float(label_smoothing), float(kl_weight), ipo_average, name)
    # eager: a plain autograd.Function around the same bodies (the custom op's Python autograd layer costs more
    # than this op's kernels); torch.compile sees the custom op
    op = preference_loss_op if torch.compiler.is_compiling() else _PreferenceLossFunction.apply
    return PreferenceLossOutput(*op(*args, *options))


def check_preference_loss(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing,
                          kl_weight, ipo_average) -> None:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    check_tensor("policy_chosen_logps", pc, ndim=1)
    b = pc.shape[0]
    if b == 0:
        raise ValueError("policy_chosen_logps is empty: preference_loss needs at least one pair")
    named = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc,
             "ref_rejected_logps": rr}
    for name, t in named.items():
        if t is not None:
            check_tensor(name, t, ndim=1)
            if t.shape[0] != b:
                raise ValueError(f"{name} must have shape [B] = [{b}] like policy_chosen_logps, got {tuple(t.shape)}")
    if pr is None:
        raise TypeError("policy_rejected_logps is required")
    if (rc is None) != (rr is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    if loss_type in ("dpo", "ipo") and rc is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if loss_type == "simpo" and rc is not None:
        raise ValueError("loss_type='simpo' is reference-free: do not pass ref_chosen_logps/ref_rejected_logps")
    need_lengths = loss_type == "simpo" or (loss_type == "ipo" and ipo_average)
    for name, t in (("chosen_lengths", cl), ("rejected_lengths", rl)):
        if t is None:
            if need_lengths:
                raise ValueError(f"{name} is required for loss_type={loss_type!r}"
                                 + (" with ipo_average=True" if loss_type == "ipo" else ""))
            continue
        check_tensor(name, t, FLOAT_DTYPES + INDEX_DTYPES, ndim=1)
        if t.shape[0] != b:
            raise ValueError(f"{name} must have shape [B] = [{b}], got {tuple(t.shape)}")
        named[name] = t
    if (prior is None) != (post is None):
        raise ValueError("prior_logits and posterior_logits must be given together")
    if prior is not None:
        check_tensor("prior_logits", prior, ndim=2)
        check_tensor("posterior_logits", post, ndim=2)
        if prior.shape != post.shape or prior.shape[0] != b or prior.shape[1] == 0:
            raise ValueError(f"prior_logits and posterior_logits must both have shape [B, K] with B = {b}, "
                             f"K > 0; got {tuple(prior.shape)} and {tuple(post.shape)}")
        named["prior_logits"], named["posterior_logits"] = prior, post
    check_float("beta", beta, positive=True)
    check_float("gamma", gamma)
    if loss_type != "simpo" and gamma != 0.0:
        raise ValueError(f"gamma (the SimPO margin) must be 0 for loss_type={loss_type!r}, got {gamma}")
    check_float("label_smoothing", label_smoothing, low=0.0, high=0.5)
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing must be 0 for loss_type='ipo', got {label_smoothing}")
    check_float("kl_weight", kl_weight, low=0.0)
    if kl_weight > 0 and prior is None:
        raise ValueError(f"kl_weight={kl_weight} > 0 needs prior_logits and posterior_logits")
    check_bool("ipo_average", ipo_average)
    check_same_device(named)


def loss_outputs(pc):
    """Fake ``(loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B])``."""
    b, dt = pc.shape[0], compute_dtype(pc)
    return (pc.new_empty((), dtype=dt),) + tuple(pc.new_empty(b, dtype=dt) for _ in range(4))


def gradient_outputs(pc, pr, rc, rr, prior, post):
    """Fake gradients of ``(pc, pr, rc, rr, prior, post)``, each like its input or a fresh ``[0]`` tensor."""
    return tuple(torch.empty_like(t) if t is not None else pc.new_empty(0) for t in (pc, pr, rc, rr, prior, post))


def preference_loss_forward(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                            ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor],
                            chosen_lengths: Optional[Tensor], rejected_lengths: Optional[Tensor],
                            prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor], loss_type: str,
                            beta: float, gamma: float, label_smoothing: float, kl_weight: float, ipo_average: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B pairs -> (loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B]), fp32. The body of the
    custom op ``lpc::preference_loss`` and of the eager path."""
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
            rejected_lengths, prior_logits, posterior_logits)
    raise_if_bad_values(dict(zip(INPUT_NAMES, args)), positive=("chosen_lengths", "rejected_lengths"))
    return backend_module(backend).preference_loss_fwd(*args, loss_type, beta, gamma, label_smoothing,
                                                       kl_weight, ipo_average)


preference_loss_op = torch.library.custom_op("lpc::preference_loss", mutates_args=())(preference_loss_forward)


@preference_loss_op.register_fake
def _(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average,
      backend):
    return loss_outputs(pc)


def preference_loss_gradients(grad_loss: Tensor, grad_losses: Tensor, grad_chosen_rewards: Tensor,
                              grad_rejected_rewards: Tensor, grad_kl: Tensor, policy_chosen_logps: Tensor,
                              policy_rejected_logps: Tensor, ref_chosen_logps: Optional[Tensor],
                              ref_rejected_logps: Optional[Tensor], chosen_lengths: Optional[Tensor],
                              rejected_lengths: Optional[Tensor], prior_logits: Optional[Tensor],
                              posterior_logits: Optional[Tensor], loss_type: str, beta: float, gamma: float,
                              label_smoothing: float, kl_weight: float, ipo_average: bool,
                              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (pc, pr, rc, rr, prior, post); a [0]-shaped tensor stands for an absent input. The body of
    the custom op ``lpc::preference_loss_backward`` and of the eager path."""
    grads = backend_module(backend).preference_loss_bwd(
        grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl, policy_chosen_logps,
        policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
        prior_logits, posterior_logits, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    g = [grads[i] for i in (0, 1, 2, 3, 6, 7)]
    return tuple(t if t is not None else policy_chosen_logps.new_empty(0) for t in g)


preference_loss_backward_op = torch.library.custom_op("lpc::preference_loss_backward",
                                                      mutates_args=())(preference_loss_gradients)


@preference_loss_backward_op.register_fake
def _(g_loss, g_losses, g_cr, g_rj, g_kl, pc, pr, rc, rr, cl, rl, prior, post, *rest):
    return gradient_outputs(pc, pr, rc, rr, prior, post)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.options = inputs[8:]


def _backward(ctx, g_loss, g_losses, g_cr, g_rj, g_kl, backward_op=preference_loss_backward_op):
    saved = ctx.saved_tensors
    pc = saved[0]
    dt = compute_dtype(pc)
    b = pc.shape[0]

    def _grad(g, shape):
        return torch.zeros(shape, dtype=dt, device=pc.device) if g is None else g.to(dt).contiguous()

    grads = backward_op(_grad(g_loss, ()), _grad(g_losses, b), _grad(g_cr, b), _grad(g_rj, b), _grad(g_kl, b),
                        *saved, *ctx.options)
    d_pc, d_pr, d_rc, d_rr, d_prior, d_post = grads
    need = ctx.needs_input_grad
    out = [d_pc, d_pr, d_rc, d_rr, None, None, d_prior, d_post]
    return tuple(o if o is not None and need[i] and saved[i] is not None else None for i, o in enumerate(out)) \
        + (None,) * 7


preference_loss_op.register_autograd(_backward, setup_context=_setup)


class _PreferenceLossFunction(torch.autograd.Function):
    """The eager path: the custom op's bodies under a plain ``autograd.Function`` (same numerics)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = preference_loss_forward(*inputs)
        _setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, backward_op=preference_loss_gradients)
