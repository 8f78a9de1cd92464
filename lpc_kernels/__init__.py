"""lpc-kernels: fused ops for Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993).

Public API (every op is a ``torch.library`` custom op in the ``lpc`` namespace, differentiable,
``torch.compile(fullgraph=True)``-safe, with backends ``reference``, ``cpu``, ``cuda``, ``triton``)::

    token_logprobs(logits, labels)                   # log p(label) from logits [..., V]
    linear_token_logprobs(hidden, weight, labels)    # same from the LM head, no [N, V] logits held
    sequence_logprobs(hidden, weight, labels)        # per-sequence sums and token counts
    gumbel_softmax_codes(logits, codebook)           # Gumbel-softmax code weights and z = w @ E
    preference_loss(pc, pr, rc, rr, ...)             # DPO / IPO / SimPO + KL(q || p)
    linear_preference_loss(hidden, weight, labels, ...)  # LM head + preference_loss, gradients in the forward
    available_backends(), resolve_backend(backend, device)
    raise_pending_errors()                           # value errors found on a GPU since the last call

Vocab-parallel (tensor-parallel LM head; ``torch.distributed``, eager, not a custom op; see docs/distributed.md)::

    vocab_parallel_linear_token_logprobs(hidden, weight_shard, labels, vocab_start=...)

Inside TRL's trainers: ``lpc_kernels.integrations.trl.patch_fused_lm_head()`` (TRL's fused LM head on our op).

Where things are: each op's contract in ``lpc_kernels/ops/<op>.py``, backend choice in ``backends.py``, the
functions every backend implements in ``backend_interface.py``, the backends in ``reference.py``,
``_cpp.py`` (+ ``csrc/``) and ``triton/``; the design in ``docs/design.md``.
"""

from .backends import available_backends, resolve_backend
from .checks import raise_pending_errors
from .numerics import DEFAULT_CHUNK_SIZE
from .ops.gumbel_softmax_codes import gumbel_softmax_codes
from .ops.linear_preference_loss import LinearPreferenceLossOutput, linear_preference_loss
from .ops.linear_token_logprobs import linear_token_logprobs, sequence_logprobs
from .ops.preference_loss import PreferenceLossOutput, preference_loss
from .ops.token_logprobs import token_logprobs
from .vocab_parallel import vocab_parallel_linear_token_logprobs

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "vocab_parallel_linear_token_logprobs",
    "gumbel_softmax_codes",
    "preference_loss",
    "linear_preference_loss",
    "LinearPreferenceLossOutput",
    "PreferenceLossOutput",
    "sequence_logprobs",
    "available_backends",
    "raise_pending_errors",
    "resolve_backend",
    "DEFAULT_CHUNK_SIZE",
]
__version__ = "0.1.0"
