"""Held-out evaluation: preference accuracy with ``z`` from the prior, plus how the codes track sources.

Accuracy is the fraction of held-out pairs whose implicit-reward margin ``r(x, y_w, z) - r(x, y_l, z)``
is > 0, with ``z`` from the prior ``p(z | x)`` (the posterior needs the labelled pair, so it is not
available at test time). Rewards are those of ``lk.preference_loss``: ``beta * (log pi - log pi_ref)``
for DPO, the same per token for IPO, ``beta * log pi / |y|`` for SimPO.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import PreferenceCollator, PreferenceDataset, batches, to_device
from .losses import LossConfig, preference_objective
from .model import LPCModel, code_perplexity, entropy_from_logits, reference_logps


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """NMI (arithmetic-mean normalisation) between two integer labelings of the same items, in [0, 1]."""
    if a.size == 0:
        return 0.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha = float(-(pa * np.log(pa)).sum())
    hb = float(-(pb * np.log(pb)).sum())
    denom = 0.5 * (ha + hb)
    return mi / denom if denom > 0 else 0.0


@torch.no_grad()
def evaluate(model: LPCModel, ref_model: Optional[nn.Module], dataset: PreferenceDataset,
             collator: PreferenceCollator, loss_cfg: LossConfig, *, batch_size: int = 128,
             source_names: Optional[Sequence[str]] = None) -> dict:
    """Held-out metrics of ``model`` on ``dataset`` (z from the prior).

    Returns a JSON-able dict: ``accuracy``, ``reward_margin``, ``loss`` (incl. the KL term), ``num_pairs``,
    ``accuracy_by_source`` (when sources are known) and, with LPC, ``prior_entropy``,
    ``prior_code_perplexity`` and ``code_source_nmi`` (NMI between the argmax prior code and the source).
    """
    if loss_cfg.needs_reference and ref_model is None:
        raise ValueError(f"loss_type={loss_cfg.loss_type!r} needs the reference model")
    was_training = model.training
    model.eval()
    margins, losses, sources, codes, prior_logits = [], [], [], [], []
    try:
        device = next(model.parameters()).device
        for batch in batches(dataset, batch_size, collator):
            batch = to_device(batch, device)
            out = model(batch, use_prior=True)
            ref = reference_logps(ref_model, batch, backend=model.backend) if loss_cfg.needs_reference \
                else (None, None)
            res = preference_objective(out, ref[0], ref[1], loss_cfg)
            margins.append((res.chosen_rewards - res.rejected_rewards).cpu())
            losses.append(res.losses.cpu())
            sources.append(batch["source"].cpu())
            if out.prior_logits is not None:
                prior_logits.append(out.prior_logits.cpu())
                codes.append(out.prior_logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    if not margins:
        return {"num_pairs": 0}
    margin = torch.cat(margins).float()
    correct = (margin > 0).float()
    src = torch.cat(sources)
    result = {"num_pairs": int(margin.numel()), "accuracy": float(correct.mean()),
              "reward_margin": float(margin.mean()), "loss": float(torch.cat(losses).mean())}
    if bool((src >= 0).any()):
        by_source = {}
        for s in sorted(set(src.tolist()) - {-1}):
            name = source_names[s] if source_names is not None and s < len(source_names) else str(s)
            by_source[name] = float(correct[src == s].mean())
        result["accuracy_by_source"] = by_source
    if prior_logits:
        logits = torch.cat(prior_logits)
        result["prior_entropy"] = float(entropy_from_logits(logits).mean())
        result["prior_code_perplexity"] = float(code_perplexity(logits))
        if bool((src >= 0).all()):
            result["code_source_nmi"] = normalized_mutual_information(torch.cat(codes).numpy(), src.numpy())
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"evaluation metric {k} is {v}")
    return result
