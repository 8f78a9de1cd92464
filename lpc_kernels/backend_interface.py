"""The backend interface: the eight functions every backend module implements, with these exact signatures.

Implemented by ``lpc_kernels.reference`` (the oracle), ``lpc_kernels._cpp`` (the ``cpu`` and ``cuda``
kernels of ``lpc_kernels._C``) and ``lpc_kernels.triton``; ``tests/ops/test_backends.py`` checks that each
exposes every function below with the same parameters. The op contracts in ``lpc_kernels.ops`` check the
arguments once and call these: inputs arrive checked, 2-D / 1-D and contiguous.

Dtypes (``docs/design.md`` section 3): log-probs, LSE, code weights, rewards and KL are float32 (float64
for float64 inputs: ``numerics.compute_dtype``); ``z`` has the codebook's dtype; gradients have their
input's dtype, except ``gumbel_softmax_bwd``'s ``grad_logits`` (compute dtype; the op casts it). Ignored rows (``labels == ignore_index``) get ``logp = 0``, ``lse = 0`` and zero gradient.
An output that is not asked for (or belongs to an absent input) is ``None``.

The bodies below only say what a backend returns; they are never called.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

Grad = Optional[Tensor]


def token_logprobs_fwd(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``logits [N, V]``, ``labels [N]`` -> ``(logp [N], lse [N])``."""
    raise NotImplementedError


def token_logprobs_bwd(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                       inplace: bool) -> Tensor:
    """``grad_logits [N, V]`` in the logits' dtype; with ``inplace`` written into ``logits`` and returned."""
    raise NotImplementedError


def linear_token_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                              ignore_index: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``labels [N]`` -> ``(logp [N], lse [N])``,
    never holding ``[N, V]`` logits (``chunk_size``: rows per ``[chunk, V]`` block where a backend chunks)."""
    raise NotImplementedError


def linear_token_logprobs_bwd(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                              labels: Tensor, lse: Tensor, ignore_index: int, chunk_size: int, need_hidden: bool,
                              need_weight: bool, need_bias: bool, *,
                              filter_eps: float = 0.0) -> tuple[Grad, Grad, Grad]:
    """``(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)``.

    ``filter_eps > 0`` allows a backend to skip logits tiles whose softmax entries are all below it and that
    hold no label (error bound: ``docs/design.md`` section 2); a backend that does not filter is exact.
    """
    raise NotImplementedError


def gumbel_softmax_fwd(logits: Tensor, codebook: Tensor, tau: float, hard: bool, seed: int,
                       offset: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``logits [B, K]``, ``codebook [K, D]`` -> ``(weights [B, K], z [B, D], soft [B, K] | None)``;
    ``soft`` (the sample before the argmax) only when ``hard``: otherwise it equals ``weights``."""
    raise NotImplementedError


def gumbel_softmax_bwd(grad_weights: Tensor, grad_z: Tensor, weights: Tensor, soft: Optional[Tensor],
                       codebook: Tensor, tau: float, need_logits: bool,
                       need_codebook: bool) -> tuple[Grad, Grad]:
    """``(grad_logits [B, K] | None, grad_codebook [K, D] | None)``, straight-through when ``soft`` is given."""
    raise NotImplementedError


def preference_loss_fwd(pc: Tensor, pr: Tensor, rc: Optional[Tensor], rr: Optional[Tensor], cl: Optional[Tensor],
                        rl: Optional[Tensor], prior: Optional[Tensor], post: Optional[Tensor], loss_type: str,
                        beta: float, gamma: float, label_smoothing: float, kl_weight: float,
                        ipo_average: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Policy / reference log-probs ``[B]``, lengths ``[B]``, prior / posterior logits ``[B, K]`` ->
    ``(loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B])``."""
    raise NotImplementedError


def preference_loss_bwd(g_loss: Tensor, g_losses: Tensor, g_cr: Tensor, g_rj: Tensor, g_kl: Tensor, pc: Tensor,
                        pr: Tensor, rc: Optional[Tensor], rr: Optional[Tensor], cl: Optional[Tensor],
                        rl: Optional[Tensor], prior: Optional[Tensor], post: Optional[Tensor], loss_type: str,
                        beta: float, gamma: float, label_smoothing: float, kl_weight: float,
                        ipo_average: bool) -> tuple[Grad, Grad, Grad, Grad, Grad, Grad, Grad, Grad]:
    """The gradients of the eight tensor inputs ``(pc, pr, rc, rr, cl, rl, prior, post)`` of the forward;
    ``None`` for the lengths and for absent inputs."""
    raise NotImplementedError


FUNCTIONS = ("token_logprobs_fwd", "token_logprobs_bwd", "linear_token_logprobs_fwd", "linear_token_logprobs_bwd",
             "gumbel_softmax_fwd", "gumbel_softmax_bwd", "preference_loss_fwd", "preference_loss_bwd")
