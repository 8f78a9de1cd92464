"""The LPC objective through ``lk.preference_loss`` and the per-step metrics (TRL names): ``docs/design.md``, "KL and
the objective" and "Per-step metrics"."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

import lpc_kernels as lk
from lpc_kernels.numerics import compute_dtype

from .config import LossConfig
from .model import LPCOutput, StepKL


def preference_objective(out: LPCOutput, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                         cfg: LossConfig, *, kl_weight: Optional[float] = None) -> lk.PreferenceLossOutput:
    """The loss for one batch (``out.objective`` when the forward computed it); ``ref_*`` are ``[B]`` reference
    log-probs (None for SimPO). ``kl_weight``: this step's KL weight (default ``cfg.kl_weight``; the trainer
    passes the warm-up's). With ``cfg.free_bits`` the KL term is ``kl_weight * mean_i max(KL_i, free_bits)``,
    which is flat (no gradient) below the threshold."""
    lpc = out.prior_logits is not None
    kl = StepKL.of(cfg, kl_weight, latent=lpc)
    res = out.objective  # computed in the forward (``lpc.objective.Objective``) with the same op weight
    if res is None:
        res = margins_and_loss(out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected, out, cfg,
                               out.prior_logits if lpc else None, out.posterior_logits if lpc else None,
                               kl.op_weight)
    return kl.add_free_bits(res)


def margins_and_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                     out: LPCOutput, cfg: LossConfig, prior_logits: Optional[Tensor] = None,
                     posterior_logits: Optional[Tensor] = None, kl_weight: float = 0.0) -> lk.PreferenceLossOutput:
    """``lk.preference_loss`` of the policy log-probs ``chosen`` / ``rejected`` ``[B]`` with the lengths of ``out``
    and the options of ``cfg`` (the same rewards whatever z produced the log-probs)."""
    return lk.preference_loss(
        chosen, rejected, ref_chosen if cfg.needs_reference else None, ref_rejected if cfg.needs_reference else None,
        chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, prior_logits=prior_logits,
        posterior_logits=posterior_logits, kl_weight=kl_weight, backend=cfg.backend, **cfg.op_options())


@torch.no_grad()
def reward_margins(chosen: Tensor, rejected: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                   out: LPCOutput, cfg: LossConfig) -> Tensor:
    """``[B]`` implicit-reward margins ``r(x, y_w) - r(x, y_l)`` of policy log-probs ``chosen`` / ``rejected``
    (> 0: the pair is ranked correctly)."""
    res = margins_and_loss(chosen, rejected, ref_chosen, ref_rejected, out, cfg)
    return res.chosen_rewards - res.rejected_rewards


@torch.no_grad()
def leak_margins(out: LPCOutput, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                 cfg: LossConfig) -> SimpleNamespace:
    """The step's leak diagnostics, per pair: reward margins with z from the prior (``prior_margins``) and from
    the posterior's sample alone (``posterior_margins``); ``None`` fields without LPC."""
    if out.prior_chosen_logps is None:
        return SimpleNamespace(prior_margins=None, posterior_margins=None)
    return SimpleNamespace(
        prior_margins=reward_margins(out.prior_chosen_logps, out.prior_rejected_logps, ref_chosen, ref_rejected,
                                     out, cfg),
        posterior_margins=reward_margins(out.posterior_chosen_logps, out.posterior_rejected_logps, ref_chosen,
                                         ref_rejected, out, cfg))


@torch.no_grad()
def step_metrics(out: LPCOutput, loss: lk.PreferenceLossOutput) -> dict[str, float]:
    """Batch-mean metrics with TRL's names plus ``lpc/*`` (only when the model has the latent); the list is in
    ``docs/design.md``, "Per-step metrics".

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
            "lpc/z_rms_ratio": z_rms_ratio(out),
        })
        if getattr(loss, "prior_margins", None) is not None:
            m["lpc/prior_accuracy"] = (loss.prior_margins > 0).float().mean()
            m["lpc/posterior_accuracy"] = (loss.posterior_margins > 0).float().mean()
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in m.values()))
    values = torch.stack([v.detach().reshape(()).to(dtype) for v in m.values()]).tolist()
    return dict(zip(m, values))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``[B, K] -> [B]`` entropy in nats, from log-softmax (never log of a softmax)."""
    lp = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def code_perplexity(logits: Tensor) -> Tensor:
    """``exp(H(mean_b softmax(logits_b)))``: how many codes the batch uses (1..K)."""
    p = torch.softmax(logits.to(compute_dtype(logits)), dim=-1).mean(0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def z_rms_ratio(out: LPCOutput) -> Tensor:
    """RMS of ``z`` over the RMS of the final hidden states, both over the batch's scored positions (each pair's
    ``z`` is added at its chosen and rejected answers' positions)."""
    n = (out.chosen_lengths + out.rejected_lengths).float()
    return torch.sqrt((n * out.z_sq).sum() / out.hidden_sq.sum())


def merge_micro_batches(outs: list[LPCOutput], results: list):
    """One ``(LPCOutput, loss-like)`` of an accumulated step's detached micro-batch outputs: per-pair values
    concatenated, the loss averaged over pairs, token counts summed; what ``step_metrics`` reads.
    ``results`` hold the fields of ``lk.PreferenceLossOutput`` as ``SimpleNamespace``s (which
    ``lpc.distributed.gather_fields`` combines over ranks)."""
    if len(outs) == 1:
        return outs[0], results[0]

    def cat(name, items):
        vals = [getattr(x, name) for x in items]
        return None if vals[0] is None else torch.cat(vals)

    out = LPCOutput(**{f.name: cat(f.name, outs) for f in dataclasses.fields(LPCOutput) if f.name != "num_tokens"},
                    num_tokens=sum(o.num_tokens for o in outs))
    sizes = [o.chosen_logps.shape[0] for o in outs]
    loss = (sum(r.loss for r in results) / len(results) if len(set(sizes)) == 1
            else sum(r.loss * n for r, n in zip(results, sizes)) / sum(sizes))  # passes of a token budget
    res = SimpleNamespace(**{name: cat(name, results) for name in vars(results[0]) if name != "loss"}, loss=loss)
    return out, res
