"""Triton ``linear_token_logprobs``: log p(label) straight from the LM head, Cut-Cross-Entropy style.

The op's two backend functions. With ``x = h @ W.T + b`` the op returns ``logp_i = x[i, label_i] - lse_i``
and never stores ``x`` in global memory (``docs/design.md``, "The fused LM head"); ignored rows are
compacted away on the host. Where the parts live:

* ``linear_token_logprobs_forward``: the forward kernels (``V`` split across programs, then combined);
* ``linear_token_logprobs_split_bwd``: backward ``split`` (default, deterministic), per ``V`` chunk the
  logits gradient ``D`` and two gradient products;
* ``linear_token_logprobs_atomic_bwd``: backward ``atomic``, one kernel scattering both products with
  fp32 atomics;
* ``linear_token_logprobs_tiles``: the logits and logits-gradient tiles the kernels share;
* ``linear_token_logprobs_configs``: block sizes (GPU autotune lists, keyed on ``V`` and ``H``, never on
  ``N``; interpreter configs).

``chunk_size`` (rows per materialised ``[chunk, V]`` block in the chunked backends) is accepted for the shared
signature and ignored: the split backward sizes its own ``V`` chunks.
"""

from __future__ import annotations

import os

import torch

from ._common import compute_dtype, device_guard
from .linear_token_logprobs_atomic_bwd import atomic_backward
from .linear_token_logprobs_forward import linear_token_logprobs_fwd
from .linear_token_logprobs_split_bwd import split_backward
from .linear_token_logprobs_tiles import valid_rows

__all__ = ["linear_token_logprobs_fwd", "linear_token_logprobs_bwd", "backward", "bwd_variant"]

BWD_VARIANTS = ("split", "atomic")
DEFAULT_BWD_VARIANT = "split"


def bwd_variant(variant: str | None = None) -> str:
    """The backward variant: ``variant`` if given, else ``$LPC_TRITON_LINEAR_BWD`` (read at every call),
    else :data:`DEFAULT_BWD_VARIANT`."""
    v = variant if variant is not None else (os.environ.get("LPC_TRITON_LINEAR_BWD", "").strip().lower()
                                            or DEFAULT_BWD_VARIANT)
    if v not in BWD_VARIANTS:
        raise ValueError(f"LPC_TRITON_LINEAR_BWD / variant must be one of {BWD_VARIANTS}, got {v!r}")
    return v


def linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size,
                              need_hidden, need_weight, need_bias):
    """Gradients for hidden, weight, bias (None where not needed), by the variant ``$LPC_TRITON_LINEAR_BWD``
    names (default ``split``)."""
    return backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
                    need_bias)


def backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
             need_bias, *, variant: str | None = None):
    """``linear_token_logprobs_bwd`` with the variant chosen by the caller (tests compare the two).

    ``variant``: ``"split"`` or ``"atomic"`` (default: ``$LPC_TRITON_LINEAR_BWD``, else ``"split"``).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden)
    variant_backward = split_backward if bwd_variant(variant) == "split" else atomic_backward
    need_hidden, need_weight = bool(need_hidden), bool(need_weight)
    need_bias = bool(need_bias and bias is not None)
    rows = valid_rows(labels, ignore_index)
    nv = rows.numel()
    dev = hidden.device
    if nv == 0 or not (need_hidden or need_weight or need_bias):  # nothing to compute: zeros
        return (torch.zeros(n, h, dtype=hidden.dtype, device=dev) if need_hidden else None,
                torch.zeros(v, h, dtype=weight.dtype, device=dev) if need_weight else None,
                torch.zeros(v, dtype=bias.dtype, device=dev) if need_bias else None)
    with device_guard(hidden):
        return variant_backward(grad_logp.contiguous().to(cdt), hidden, weight, bias, rows, labels, lse, need_hidden,
                                need_weight, need_bias)
