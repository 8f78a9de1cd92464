"""The ``triton`` backend: Triton kernels behind the eight functions of ``lpc_kernels.backend_interface``.

One file per op family:

* ``token_logprobs``: online log-sum-exp over materialised logits; backward ``softmax - onehot`` in fp32,
  optionally in place into the logits buffer.
* ``linear_token_logprobs``: Cut-Cross-Entropy-style fused LM head (``[N, V]`` logits never in global
  memory), ignored rows compacted away; backward ``split`` (default: deterministic, per V chunk a
  logits-gradient kernel and two gradient products) or ``atomic`` (``$LPC_TRITON_LINEAR_BWD``), with an
  opt-in gradient filter (``filter_eps``, keyword-only, off by default).
* ``gumbel_softmax``: Philox noise + softmax + ``z = w @ E`` in one launch; one-launch backward.
* ``preference_loss``: DPO / IPO / SimPO + KL(q || p), one forward and one backward launch.

Dtypes: fp32 / fp16 / bf16 inputs compute in fp32; fp64 inputs compute in fp64 inside the kernels
(fp64 ``tl.dot`` included), as the reference does. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1`` (set before this package is imported).
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
