"""The LM-head GEMMs of the ops that hold one chunk of logits (``linear_preference_loss``, the frozen-head path of
``linear_token_logprobs``): logits in the compute dtype; bf16 / fp16 on CUDA fp32-output GEMMs with the gradient
tile rounded once to the input dtype (as the cuda backend), on CPU the weight upcast once and all in fp32 (as the
cpu backend).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .numerics import compute_dtype


class HeadGemms:
    """The GEMMs of one call on ``weight [V, H]`` (and ``bias [V]``)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.cdt = compute_dtype(weight)
        self.dtype = weight.dtype
        # 16-bit operands feed cuBLAS directly; anywhere else they are upcast (exact) once per call
        self.low_precision = weight.dtype != self.cdt and weight.is_cuda
        self.weight = weight if self.low_precision else weight.to(self.cdt)
        self.bias = bias.to(self.cdt) if bias is not None else None

    def operand(self, h: Tensor) -> Tensor:
        """``h`` in the dtype the GEMMs take."""
        return h if self.low_precision else h.to(self.cdt)

    def logits(self, h: Tensor) -> Tensor:
        """``[c, V]`` logits (+ bias) of ``h [c, H]`` (already ``operand``), in the compute dtype."""
        x = (torch.mm(h, self.weight.t(), out_dtype=self.cdt) if self.low_precision else h @ self.weight.t())
        return x.add_(self.bias) if self.bias is not None else x

    def tile(self, d: Tensor) -> Tensor:
        """The gradient tile ``d [c, V]`` (compute dtype) as the gradient GEMMs take it."""
        return d.to(self.dtype) if self.low_precision else d

    def hidden_grad(self, d: Tensor) -> Tensor:
        """``d @ W`` ``[c, H]`` in the compute dtype, ``d`` from ``tile``."""
        return torch.mm(d, self.weight, out_dtype=self.cdt) if self.low_precision else d @ self.weight

    def add_weight_grad(self, acc: Tensor, d: Tensor, h: Tensor) -> None:
        """``acc [V, H] += d^T @ h`` in the compute dtype (``d`` from ``tile``, ``h`` from ``operand``)."""
        if self.low_precision:
            acc += torch.mm(d.t(), h, out_dtype=self.cdt)
        else:
            acc.addmm_(d.t(), h)


def autocast_off(op_body):
    """Runs a custom op's body (first argument a tensor) with autocast off: autocast reaches custom-op bodies and
    would turn their fp32 GEMMs into 16-bit ones. ``functools.wraps`` keeps the annotated signature the schema is
    inferred from."""
    @functools.wraps(op_body)
    def body(first, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return op_body(first, *args, **kwargs)

    return body
