"""The backend interface: the eight functions every backend module implements, with these exact signatures.

Implemented by ``lpc_kernels.reference`` (the oracle), ``lpc_kernels._cpp`` (``cpu`` and ``cuda``) and
``lpc_kernels.triton``; ``tests/ops/test_api.py`` checks that each has every function with these parameters. The
op layer (``lpc_kernels.ops``) checks the arguments and calls these: inputs arrive 2-D / 1-D and contiguous.
Log-probs, LSE, code weights, rewards and KL come in the compute dtype (``numerics.compute_dtype``), ``z`` in the
codebook's, gradients in their input's (``gumbel_softmax_bwd``'s ``grad_logits``: compute dtype). Ignored rows
get ``logp = lse = 0`` and no gradient; an output not asked for (or of an absent input) is ``None``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .preference import PreferenceLossInputs, PreferenceLossOptions, PreferenceLossOutput

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
                              need_weight: bool, need_bias: bool) -> tuple[Grad, Grad, Grad]:
    """``(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)``."""
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


def preference_loss_fwd(inputs: PreferenceLossInputs, options: PreferenceLossOptions) -> PreferenceLossOutput:
    """Policy / reference log-probs ``[B]``, lengths ``[B]``, prior / posterior logits ``[B, K]`` ->
    ``loss []``, ``losses``, ``chosen_rewards``, ``rejected_rewards``, ``kl`` ``[B]``."""
    raise NotImplementedError


def preference_loss_bwd(grad_outputs: PreferenceLossOutput, inputs: PreferenceLossInputs,
                        options: PreferenceLossOptions) -> PreferenceLossInputs:
    """The gradient of each input, given the gradient of each output (all five given, zeros where unused);
    ``None`` for the lengths and for absent inputs."""
    raise NotImplementedError


FUNCTIONS = ("token_logprobs_fwd", "token_logprobs_bwd", "linear_token_logprobs_fwd", "linear_token_logprobs_bwd",
             "gumbel_softmax_fwd", "gumbel_softmax_bwd", "preference_loss_fwd", "preference_loss_bwd")
