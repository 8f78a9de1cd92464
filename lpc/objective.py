"""The LM head and the loss on the scored positions: summed answer log-probs with ``z`` added
(``lk.linear_token_logprobs``), the training objective in one op (``lk.linear_preference_loss``), and the frozen
reference's log-probs."""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

import lpc_kernels as lk

from .config import LossConfig
from .hf import ScoredPositions, final_hidden_states, lm_head_of, scored_positions


def scored_logps(pos: ScoredPositions, weight: Tensor, bias: Optional[Tensor] = None, z: Optional[Tensor] = None,
                 *, backend: str = "auto") -> Tensor:
    """``[S]`` summed answer log-probs of the scored positions ``pos`` through ``lk.linear_token_logprobs``, with
    ``z [S, D]`` (one latent per sequence) added to every scored position of its sequence; float32 (float64
    for float64 inputs)."""
    h = pos.hidden
    if z is not None:
        h = h + z.to(h.dtype)[pos.sequences]
    h, weight, bias = head_inputs(h, weight, bias)
    logp = lk.linear_token_logprobs(h, weight, pos.targets, bias=bias, backend=backend)
    return logp.new_zeros(pos.num_sequences).index_add(0, pos.sequences, logp)


def head_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The LM-head ops need one dtype: under autocast (--dtype bfloat16) the autocast dtype (fp32 master weights
    are cast per step, as autocast does for nn.Linear); otherwise the head's dtype."""
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


class Objective(NamedTuple):
    """What ``LPCModel.forward`` needs to compute the training loss itself, through ``lk.linear_preference_loss``
    (the LM head, pair loss and KL in one op, inside the forward so FSDP2 still holds the unsharded head):
    reference log-probs ``[B]`` (None for SimPO), the loss settings and this step's KL weight
    (``LPCModel.step_kl`` says how the op applies it)."""

    ref_chosen: Optional[Tensor]
    ref_rejected: Optional[Tensor]
    cfg: LossConfig
    kl_weight: float


def fused_objective(pos: ScoredPositions, batch: dict, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor],
                    prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor], obj: Objective, *,
                    kl_weight: float, backend: str) -> lk.LinearPreferenceLossOutput:
    """``lk.linear_preference_loss`` on the batch's scored positions (packed layout: they are sorted by sequence,
    ``batch["score_lengths"]`` counts them), ``z [B, D]`` added to both answers of each pair; ``kl_weight``: the
    op's (``StepKL.op_weight``)."""
    cfg = obj.cfg
    h, weight, bias = head_inputs(pos.hidden, weight, bias)
    return lk.linear_preference_loss(
        h, weight, pos.targets, bias=bias, z=z, ref_chosen_logps=obj.ref_chosen if cfg.needs_reference else None,
        ref_rejected_logps=obj.ref_rejected if cfg.needs_reference else None,
        prior_logits=prior_logits, posterior_logits=posterior_logits, kl_weight=kl_weight,
        backend=backend, sequence_ids=pos.sequences, sequence_lengths=batch["score_lengths"], **cfg.op_options())


def response_logps(hidden: Tensor, batch: dict, weight: Tensor, bias: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Summed answer log-probs per sequence (``scored_logps`` of ``scored_positions(hidden, batch)``).

    Args:
        hidden: ``[R * L, D]`` final hidden states of the batch's rows (``final_hidden_states``).
        batch: a collated batch (any layout; ``lpc.data``).
        weight / bias: LM head ``[V, D]`` / ``[V]``. z: ``[2B, D]`` latent added to every scored position of each
            sequence (chosen sequences first).

    Returns:
        ``[2B]`` float32 (float64 for float64 inputs) sums of ``log pi(y_t | ...)`` over answer tokens, chosen
        sequences first.
    """
    return scored_logps(scored_positions(hidden, batch), weight, bias, z, backend=backend)


@torch.no_grad()
def reference_logps(ref_model: nn.Module, batch: dict, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(chosen [B], rejected [B])`` summed log-probs of the frozen, unconditioned reference model."""
    weight, bias = lm_head_of(ref_model)
    logps = response_logps(final_hidden_states(ref_model, batch), batch, weight, bias, backend=backend)
    return logps.chunk(2)


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen deep copy of ``policy`` in eval mode (the DPO reference ``pi_ref``)."""
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref

