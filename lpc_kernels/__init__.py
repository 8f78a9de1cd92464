"""lpc-kernels: fused ops for Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993).

Public API (every op is a ``torch.library`` custom op in the ``lpc`` namespace, differentiable,
``torch.compile(fullgraph=True)``-safe, with backends ``reference``, ``cpu``, ``cuda``, ``triton``)::

    token_logprobs(logits, labels)                   # log p(label) from logits [..., V]
    linear_token_logprobs(hidden, weight, labels)    # same from the LM head, no [N, V] logits held
    gumbel_softmax_codes(logits, codebook)           # Gumbel-softmax code weights and z = w @ E
    preference_loss(pc, pr, rc, rr, ...)             # DPO / IPO / SimPO + KL(q || p)
    sequence_logprobs(hidden, weight, labels)        # per-sequence sums and token counts
    available_backends()

Vocab-parallel (tensor-parallel LM head; ``torch.distributed``, eager, not a custom op; see docs/distributed.md)::

    vocab_parallel_linear_token_logprobs(hidden, weight_shard, labels, vocab_start=...)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from . import _ops
from ._ops import available_backends, resolve_backend
from .distributed import vocab_parallel_linear_token_logprobs
from .reference import DEFAULT_CHUNK_SIZE

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "vocab_parallel_linear_token_logprobs",
    "gumbel_softmax_codes",
    "preference_loss",
    "PreferenceLossOutput",
    "sequence_logprobs",
    "available_backends",
    "resolve_backend",
]
__version__ = "0.1.0"


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
    _ops.check_token_logprobs(logits, labels, ignore_index)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    name = resolve_backend(backend, logits.device)
    lead = labels.shape
    logp, _ = _ops.token_logprobs_op(logits.reshape(-1, logits.shape[-1]).contiguous(),
                                     labels.reshape(-1).long().contiguous(), ignore_index, inplace_backward,
                                     name)
    return logp.view(lead)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, backend: str = "auto", chunk_size: Optional[int] = None,
                          filter_eps: float = 0.0) -> Tensor:
    """Log-probability of each label under ``softmax(hidden @ weight.T + bias)``, without ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 (for LPC: final hidden states + z).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[...]`` int64 (or int32) target ids, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index: label value whose row is skipped (log-prob 0, zero gradient).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        chunk_size: rows per recomputed ``[chunk, V]`` logits block for the chunked backends
            (reference, cpu, cuda); default ``DEFAULT_CHUNK_SIZE``. Peak extra memory ~ ``chunk * V``.
        filter_eps: opt-in gradient filter (triton backend): skip logits tiles holding no label whose
            softmax entries are all below it; each skipped gradient entry is off by at most
            ``|grad_logp| * filter_eps``. 0 (default) is exact; other backends always compute exactly.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-probs; gradients flow to hidden, weight, bias.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    _ops.check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size, filter_eps)
    name = resolve_backend(backend, hidden.device)
    lead = labels.shape
    logp, _ = _ops.linear_token_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        bias.contiguous() if bias is not None else None, labels.reshape(-1).long().contiguous(), ignore_index,
        chunk_size, name, float(filter_eps))
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


def gumbel_softmax_codes(logits: Tensor, codebook: Tensor, *, tau: float = 1.0, hard: bool = False, seed: int = 0,
                         offset: int = 0, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Gumbel-softmax sample over K codes and the latent ``z = weights @ codebook``.

    The noise for element ``(b, k)`` is ``-log(-log(u))`` with ``u = tl.rand(seed, offset + b*K + k)``
    (Philox4x32-10), identical on every backend. With ``hard=True`` the weights are one-hot (first
    maximum) and gradients are straight-through the soft sample.

    Args:
        logits: ``[B, K]`` float. codebook: ``[K, D]`` float. tau: temperature > 0.
        seed: int in ``[0, 2**63)``. offset: int >= 0, counter of the first element.

    Returns:
        ``(weights [B, K]`` float32 (float64 for float64 logits), ``z [B, D]`` in the codebook's dtype).
    """
    _ops.check_gumbel_softmax_codes(logits, codebook, tau, hard, seed, offset)
    name = resolve_backend(backend, logits.device)
    weights, z, _ = _ops.gumbel_softmax_codes_op(logits.contiguous(), codebook.contiguous(), float(tau), hard,
                                                 seed, offset, name)
    return weights, z


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
    _ops.check_preference_loss(*args, *options)
    name = resolve_backend(backend, policy_chosen_logps.device)
    args = tuple(t.contiguous() if t is not None else None for t in args)
    out = _ops.preference_loss_op(*args, loss_type, float(beta), float(gamma), float(label_smoothing),
                                  float(kl_weight), ipo_average, name)
    return PreferenceLossOutput(*out)
