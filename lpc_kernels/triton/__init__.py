"""The ``triton`` backend: Triton kernels behind the eight functions of ``lpc_kernels.backend_interface``, one
entry module per op family (``token_logprobs``, ``linear_token_logprobs`` with its ``linear_token_logprobs_*``
kernel files, ``gumbel_softmax``, ``preference_loss``; shared helpers in ``_common``). fp32 / fp16 / bf16 inputs
compute in fp32, fp64 inputs in fp64. CPU tensors run only under ``TRITON_INTERPRET=1`` (set before import).
Design: ``docs/design.md``, "Triton kernels".
"""

from .gumbel_softmax import gumbel_softmax_bwd, gumbel_softmax_fwd
from .linear_token_logprobs import linear_token_logprobs_bwd, linear_token_logprobs_fwd
from .preference_loss import preference_loss_bwd, preference_loss_fwd
from .token_logprobs import token_logprobs_bwd, token_logprobs_fwd

__all__ = [
    "token_logprobs_fwd",
    "token_logprobs_bwd",
    "linear_token_logprobs_fwd",
    "linear_token_logprobs_bwd",
    "gumbel_softmax_fwd",
    "gumbel_softmax_bwd",
    "preference_loss_fwd",
    "preference_loss_bwd",
]
