"""``linear_token_logprobs``: log p(label) under ``softmax(hidden @ weight.T + bias)`` without ``[N, V]``
logits, and its composition ``sequence_logprobs``.

Contract: ``docs/design.md``, "Op contracts" (``linear_token_logprobs``). Layers: ``linear_token_logprobs``
(checks) -> ``linear_token_logprobs_op`` (custom op ``lpc::linear_token_logprobs``: label values, then the
backend's ``linear_token_logprobs_fwd``) -> autograd -> ``linear_token_logprobs_backward_op``. A frozen head takes
``linear_token_logprobs_frozen_head_op`` instead: the hidden gradient's factor computed in the forward.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_int, check_label_values, check_labels, check_same_device, check_tensor, readable_labels
from ..head_gemm import HeadGemms, autocast_off
from ..numerics import DEFAULT_CHUNK_SIZE, chunks
from ..shapes import linear_gradient_outputs, per_row_outputs


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, backend: str = "auto",
                          chunk_size: Optional[int] = None) -> Tensor:
    """Log-probability of each label under ``softmax(hidden @ weight.T + bias)``, without ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 (for LPC: final hidden states + z).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``. The kernels read contiguous rows: a strided
            weight (e.g. a transposed ``[H, V]`` matrix) is copied on every call, with a warning saying so.
        labels: ``[...]`` int64 (or int32) target ids, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index: label value whose row is skipped (log-prob 0, zero gradient).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        chunk_size: rows per recomputed ``[chunk, V]`` logits block for the chunked backends
            (reference, cpu, cuda); default ``DEFAULT_CHUNK_SIZE``. Peak extra memory ~ ``chunk * V``.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-probs; gradients flow to hidden, weight, bias.
        Frozen head (``hidden`` requires grad, ``weight`` and ``bias`` do not, e.g. LoRA): the forward also
        computes ``a = W[label] - softmax @ W`` ``[..., H]`` (hidden's dtype, one more GEMM) and the backward is
        ``grad_hidden = grad * a``: 2 GEMMs in all instead of 3, no second logits pass.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size)
    if not weight.is_contiguous():  # a full copy of the head (1 GiB at 128k x 4096 bf16): say so
        warnings.warn(f"linear_token_logprobs: weight {tuple(weight.shape)} with strides {weight.stride()} is not "
                      f"contiguous, so it is copied on every call ({weight.numel() * weight.element_size() / 2**20:.0f}"
                      " MiB); pass a contiguous weight (weight.contiguous() once, outside the step) to avoid it",
                      stacklevel=2)
    name = resolve_backend(backend, hidden.device)
    lead = labels.shape
    args = (hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
            bias.contiguous() if bias is not None else None, labels.reshape(-1).long().contiguous(), ignore_index,
            chunk_size, name)
    frozen_head = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                   and (bias is None or not bias.requires_grad))
    if frozen_head:
        logp, _, _ = linear_token_logprobs_frozen_head_op(*args)
    else:
        logp, _ = linear_token_logprobs_op(*args)
    return logp.view(lead)


def sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                      ignore_index: int = -100, backend: str = "auto",
                      chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Summed log-prob and token count of each sequence, through ``linear_token_logprobs``.

    Args:
        hidden: ``[B, T, H]`` final hidden states (already shifted: position t predicts ``labels[:, t]``).
        weight: ``[V, H]``; labels: ``[B, T]`` with ``ignore_index`` on prompt and padding positions.

    Returns:
        ``(sum [B]`` float32, ``count [B]`` int64 of scored tokens).
    """
    logp = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, backend=backend,
                                 chunk_size=chunk_size)
    return logp.sum(-1), (labels != ignore_index).sum(-1)


def check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size, *,
                                weight_name="weight", bias_name="bias", vocab="V") -> None:
    """The names are the caller's (the vocab-parallel op checks ``weight_shard`` [V_local, H])."""
    check_tensor("hidden", hidden)
    check_tensor(weight_name, weight, ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight_name}.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{weight_name} must have shape [{vocab}, H] with {vocab}, H > 0, got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
    if bias is not None:
        check_tensor(bias_name, bias, (weight.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape [{vocab}] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_labels(labels, hidden.shape[:-1], "hidden")
    if labels.numel() == 0:
        raise ValueError(f"hidden is empty (shape {tuple(hidden.shape)}): nothing to score")
    check_int("ignore_index", ignore_index)
    check_int("chunk_size", chunk_size, low=1)
    check_same_device({"hidden": hidden, weight_name: weight, bias_name: bias, "labels": labels})


@torch.library.custom_op("lpc::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             ignore_index: int, chunk_size: int, backend: str) -> tuple[Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, labels [N] -> (logp [N], lse [N]), fp32."""
    labels = check_label_values(labels, weight.shape[0], ignore_index)
    return backend_module(backend).linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index,
                                                             chunk_size)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_size, backend):
    return per_row_outputs(hidden)


@torch.library.custom_op("lpc::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                      labels: Tensor, lse: Tensor, ignore_index: int, chunk_size: int,
                                      need_hidden: bool, need_weight: bool, need_bias: bool,
                                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight, bias; a tensor of shape [0] stands for one not asked for."""
    labels = readable_labels(labels, weight.shape[0], ignore_index)
    grads = backend_module(backend).linear_token_logprobs_bwd(
        grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
        need_bias)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
      need_bias, backend):
    return linear_gradient_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)


@torch.library.custom_op("lpc::linear_token_logprobs_frozen_head", mutates_args=())
@autocast_off
def linear_token_logprobs_frozen_head_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                         ignore_index: int, chunk_size: int,
                                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, labels [N] -> (logp [N], lse [N], a [N, H]) with
    ``a = d logp / d hidden = W[label] - softmax @ W`` (hidden's dtype; 0 on ignored rows): per chunk of scored
    rows, the logits GEMM, the backend's ``token_logprobs_fwd``, its ``token_logprobs_bwd`` with unit gradient
    (in place: ``onehot - softmax``), and one GEMM with W."""
    labels = check_label_values(labels, weight.shape[0], ignore_index)
    be = backend_module(backend)
    logp, lse = per_row_outputs(hidden)
    logp.zero_(), lse.zero_()
    a = torch.zeros_like(hidden)
    rows = torch.nonzero(labels != ignore_index).squeeze(1)  # ignored rows never reach a GEMM
    gemm = HeadGemms(weight, bias)
    for s, e in chunks(rows.numel(), chunk_size):
        r = rows[s:e]
        x = gemm.logits(gemm.operand(hidden.index_select(0, r)))
        lp, ls = be.token_logprobs_fwd(x, labels[r], ignore_index)
        logp[r], lse[r] = lp, ls
        d = be.token_logprobs_bwd(torch.ones_like(lp), x, labels[r], ls, ignore_index, True)
        a[r] = gemm.hidden_grad(gemm.tile(d)).to(a.dtype)
    return logp, lse, a


@linear_token_logprobs_frozen_head_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_size, backend):
    return per_row_outputs(hidden) + (torch.empty_like(hidden),)


def _setup_frozen(ctx, inputs, output):
    _, lse, a = output
    ctx.save_for_backward(a)
    ctx.mark_non_differentiable(lse, a)


def _backward_frozen(ctx, grad_logp, grad_lse, grad_a):
    (a,) = ctx.saved_tensors
    return (grad_logp.to(a.dtype)[:, None] * a,) + (None,) * 6  # hidden's only


linear_token_logprobs_frozen_head_op.register_autograd(_backward_frozen, setup_context=_setup_frozen)


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, chunk_size, backend = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_h or need_w or need_b):
        return (None,) * 7
    gh, gw, gb = linear_token_logprobs_backward_op(
        grad_logp.contiguous(), hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_size,
        need_h, need_w, bool(need_b and bias is not None), ctx.backend)
    return (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None,
            None, None, None, None)


linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup)
