"""lpc-kernels: fused ops for Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993).

Every op is a differentiable ``torch.library`` custom op (namespace ``lpc``, ``torch.compile(fullgraph=True)``-safe)
with the backends ``reference``, ``cpu``, ``cuda``, ``triton``: ``token_logprobs``, ``linear_token_logprobs`` and
``sequence_logprobs`` (the LM head without ``[N, V]`` logits), ``gumbel_softmax_codes``, ``preference_loss``,
``linear_preference_loss`` (LM head + loss, gradients in the forward). ``vocab_parallel_linear_token_logprobs``
shards the LM head over a ``torch.distributed`` group (eager); ``lpc_kernels.integrations.trl`` runs TRL's fused
LM head on ours. Each op's contract is in ``ops/<op>.py``; the backends implement ``backend_interface.py``.
"""

from .backends import available_backends, resolve_backend
from .checks import raise_pending_errors
from .numerics import DEFAULT_CHUNK_SIZE
from .ops.gumbel_softmax_codes import gumbel_softmax_codes
from .ops.linear_preference_loss import LinearPreferenceLossOutput, linear_preference_loss
from .ops.linear_token_logprobs import linear_token_logprobs, sequence_logprobs
from .ops.preference_loss import preference_loss
from .ops.token_logprobs import token_logprobs
from .preference import PreferenceLossOutput
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
