"""``token_logprobs``: log p(label) under ``softmax(logits)``, with an optional in-place backward.

Contract: ``docs/design.md``, "Op contracts" (``token_logprobs``). Layers: ``token_logprobs`` (checks) ->
``token_logprobs_op`` (custom op ``lpc::token_logprobs``: label values, then the backend's
``token_logprobs_fwd``) -> autograd -> ``token_logprobs_backward_op`` or, with ``inplace_backward``, the
mutating ``token_logprobs_backward_inplace_op``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import (check_bool, check_int, check_label_values, check_labels, check_same_device, check_tensor,
                      readable_labels)
from ..shapes import per_row_outputs


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, backend: str = "auto",
                   inplace_backward: bool = False) -> Tensor:
    """Log-probability of each label under ``softmax(logits)``.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        labels: ``[...]`` int64 (or int32), in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: label value whose position gets log-prob 0 and no gradient.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        inplace_backward: let the backward pass overwrite ``logits`` with its gradient, so the step holds
            one ``[N, V]`` buffer instead of two. Only when nothing else reads ``logits`` after backward.

    Returns:
        ``[...]`` float32 (float64 for float64 logits) log-probs, 0 where ignored.
    """
    check_token_logprobs(logits, labels, ignore_index)
    check_bool("inplace_backward", inplace_backward)
    name = resolve_backend(backend, logits.device)
    lead = labels.shape
    logp, _ = token_logprobs_op(logits.reshape(-1, logits.shape[-1]).contiguous(),
                                labels.reshape(-1).long().contiguous(), ignore_index, inplace_backward, name)
    return logp.view(lead)


def check_token_logprobs(logits, labels, ignore_index) -> None:
    check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], "logits")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}): nothing to score")
    check_int("ignore_index", ignore_index)
    check_same_device({"logits": logits, "labels": labels})


@torch.library.custom_op("lpc::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ignore_index: int, inplace_backward: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """logits [N, V], labels [N] -> (logp [N], lse [N]) in fp32 (fp64 for fp64 logits)."""
    labels = check_label_values(labels, logits.shape[1], ignore_index)
    return backend_module(backend).token_logprobs_fwd(logits, labels, ignore_index)


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, inplace_backward, backend):
    return per_row_outputs(logits)


@torch.library.custom_op("lpc::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                               ignore_index: int, backend: str) -> Tensor:
    labels = readable_labels(labels, logits.shape[1], ignore_index)
    return backend_module(backend).token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, False)


@token_logprobs_backward_op.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("lpc::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                                       ignore_index: int, backend: str) -> None:
    """Writes d logp / d logits into ``logits`` (its forward values are dead after this)."""
    labels = readable_labels(labels, logits.shape[1], ignore_index)
    backend_module(backend).token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, True)


@token_logprobs_backward_inplace_op.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, backend):
    return None


def _setup(ctx, inputs, output):
    logits, labels, ignore_index, inplace_backward, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.inplace, ctx.backend = ignore_index, inplace_backward, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_logp, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    grad_logp = grad_logp.contiguous()
    if ctx.inplace:
        token_logprobs_backward_inplace_op(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.backend)
        grad = logits
    else:
        grad = token_logprobs_backward_op(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.backend)
    return grad, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup)
