"""The LPC objective through ``lk.preference_loss``, and the per-step metrics (TRL names).

``L = mean_i pair_loss_i(z_i) + kl_weight * mean_i KL(q_i || p_i)`` (``docs/design.md`` section 1): the pair loss
is DPO, IPO or SimPO on the summed answer log-probs; the KL term is computed by the op from the prior and
posterior logits (log-softmax inside). Without LPC the logits are not passed and the loss is plain
DPO / IPO / SimPO.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

import lpc_kernels as lk

from .config import LossConfig
from .model import LPCOutput, code_perplexity, entropy_from_logits


def preference_objective(out: LPCOutput, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                         cfg: LossConfig) -> lk.PreferenceLossOutput:
    """The loss for one batch; ``ref_*`` are ``[B]`` reference log-probs (None for SimPO)."""
    lpc = out.prior_logits is not None
    return lk.preference_loss(
        out.chosen_logps, out.rejected_logps, ref_chosen if cfg.needs_reference else None,
        ref_rejected if cfg.needs_reference else None, chosen_lengths=out.chosen_lengths,
        rejected_lengths=out.rejected_lengths, prior_logits=out.prior_logits if lpc else None,
        posterior_logits=out.posterior_logits if lpc else None, loss_type=cfg.loss_type, beta=cfg.beta,
        gamma=cfg.gamma if cfg.loss_type == "simpo" else 0.0,
        label_smoothing=cfg.label_smoothing if cfg.loss_type != "ipo" else 0.0,
        kl_weight=cfg.kl_weight if lpc else 0.0, ipo_average=cfg.ipo_average, backend=cfg.backend)


@torch.no_grad()
def step_metrics(out: LPCOutput, loss: lk.PreferenceLossOutput) -> dict[str, float]:
    """Batch-mean metrics with TRL's names plus ``lpc/*`` (only when the model has the latent); the list is in
    ``docs/design.md`` section 7.

    The scalars are read to the host together (one device sync), in a dtype that holds each of them
    exactly, so every value is the one ``float()`` of its own tensor gives.
    """
    cr, rj = loss.chosen_rewards.float(), loss.rejected_rewards.float()
    m = {
        "loss": loss.loss,
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).float().mean(),
        "rewards/margins": (cr - rj).mean(),
        "logps/chosen": out.chosen_logps.mean(),
        "logps/rejected": out.rejected_logps.mean(),
    }
    if out.prior_logits is not None:
        m.update({
            "lpc/kl": loss.kl.mean(),
            "lpc/prior_entropy": entropy_from_logits(out.prior_logits).mean(),
            "lpc/posterior_entropy": entropy_from_logits(out.posterior_logits).mean(),
            "lpc/code_perplexity": code_perplexity(out.posterior_logits),
        })
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in m.values()))
    values = torch.stack([v.detach().reshape(()).to(dtype) for v in m.values()]).tolist()
    return dict(zip(m, values))


def merge_micro_batches(outs: list[LPCOutput], results: list):
    """One ``(LPCOutput, loss-like)`` of an accumulated step's detached micro-batch outputs: per-pair values
    concatenated, the loss averaged (equal micro-batches), token counts summed; what ``step_metrics`` reads.
    ``results`` hold the fields of ``lk.PreferenceLossOutput`` as ``SimpleNamespace``s (which
    ``lpc.distributed.gather_fields`` combines over ranks)."""
    if len(outs) == 1:
        return outs[0], results[0]

    def cat(name, items):
        vals = [getattr(x, name) for x in items]
        return None if vals[0] is None else torch.cat(vals)

    out = LPCOutput(*(cat(f.name, outs) for f in dataclasses.fields(LPCOutput) if f.name != "num_tokens"),
                    num_tokens=sum(o.num_tokens for o in outs))
    res = SimpleNamespace(loss=sum(r.loss for r in results) / len(results), losses=cat("losses", results),
                          chosen_rewards=cat("chosen_rewards", results),
                          rejected_rewards=cat("rejected_rewards", results), kl=cat("kl", results))
    return out, res
