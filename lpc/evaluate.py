"""Held-out evaluation: preference accuracy with ``z`` from the prior, reward margins, per-source accuracy,
and code usage. ``python -m lpc.evaluate --run <dir>`` evaluates a finished (or checkpointed) run.

Accuracy is the fraction of held-out pairs whose implicit-reward margin ``r(x, y_w, z) - r(x, y_l, z)``
is > 0, with ``z`` from the prior ``p(z | x)`` (the posterior needs the labelled pair, so it is not
available at test time). Rewards are those of ``lk.preference_loss``: ``beta * (log pi - log pi_ref)``
for DPO, the same per token for IPO, ``beta * log pi / |y|`` for SimPO.

The CLI writes ``<run>/evaluation/evaluation.json`` and PNG plots (``code_usage.png``: prior and
posterior argmax-code histograms; ``reward_margins.png``; ``accuracy_by_source.png``;
``training_curves.png`` from ``metrics.jsonl``). Plots need matplotlib (an optional extra); without it
the JSON is still written and the CLI says which plots were skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .analysis import code_histogram, normalized_mutual_information, perplexity
from .builders import build_data, build_lpc_model, build_policy, initial_reference, load_tokenizer
from .cli import HelpFormatter
from .config import TrainConfig
from .data import IndexView, PreferenceCollator, PreferenceDataset, batches, synthetic, to_device
from .io import write_json_atomic
from .losses import LossConfig, preference_objective
from .model import LPCModel, code_perplexity, entropy_from_logits, reference_logps
from .plots import plot_code_usage, plot_margins, plot_source_accuracy, plot_training_curves
from .reference import LiveReference, cached_eval_reference
from .runtime import autocast, autocast_dtype, resolve_device, threads_for


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    return normalized_mutual_information(a, b) if a.size else 0.0


def accuracy_by_source(correct: torch.Tensor, source: torch.Tensor,
                       source_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Mean of ``correct [P]`` (0/1 per pair) per source id in ``source [P]`` (-1: unknown, skipped),
    keyed by ``source_names[id]`` when given, else by the id."""
    by_source = {}
    for s in sorted(set(source.tolist()) - {-1}):
        name = source_names[s] if source_names is not None and s < len(source_names) else str(s)
        by_source[name] = float(correct[source == s].float().mean())
    return by_source


@torch.no_grad()
def evaluate(model: LPCModel, ref_model: Union[nn.Module, Callable, None], dataset: PreferenceDataset,
             collator: PreferenceCollator, loss_cfg: LossConfig, *, batch_size: int = 128,
             source_names: Optional[Sequence[str]] = None, return_arrays: bool = False):
    """Held-out metrics of ``model`` on ``dataset`` (z from the prior).

    Args:
        ref_model: the frozen reference model, or a scorer ``batch -> (chosen [B], rejected [B])``
            (``lpc.reference``); ``None`` for SimPO.
        return_arrays: also return per-pair numpy arrays (``margin``, ``correct``, ``source``, and with LPC
            ``prior_code``, ``posterior_code``, ``prior_probs`` ``[N, K]``).

    Returns:
        A JSON-able dict: ``accuracy``, ``reward_margin``, ``loss`` (incl. the KL term), ``num_pairs``,
        ``accuracy_by_source`` (when sources are known) and, with LPC, ``prior_entropy``,
        ``prior_code_perplexity`` and ``code_source_nmi`` (NMI between the argmax prior code and the
        source); with ``return_arrays`` the tuple ``(dict, arrays)``.
    """
    if loss_cfg.needs_reference and ref_model is None:
        raise ValueError(f"loss_type={loss_cfg.loss_type!r} needs the reference model")
    if isinstance(ref_model, nn.Module):
        module = ref_model
        ref_model = lambda batch: reference_logps(module, batch, backend=model.backend)  # noqa: E731
    was_training = model.training
    model.eval()
    margins, losses, sources, codes, post_codes, prior_logits = [], [], [], [], [], []
    try:
        device = next(model.parameters()).device
        for batch in batches(dataset, batch_size, collator):
            batch = to_device(batch, device)
            out = model(batch, use_prior=True)
            ref = ref_model(batch) if loss_cfg.needs_reference else (None, None)
            res = preference_objective(out, ref[0], ref[1], loss_cfg)
            margins.append((res.chosen_rewards - res.rejected_rewards).float().cpu())
            losses.append(res.losses.float().cpu())
            sources.append(batch["source"].cpu())
            if out.prior_logits is not None:
                prior_logits.append(out.prior_logits.float().cpu())
                codes.append(out.prior_logits.argmax(-1).cpu())
                post_codes.append(out.posterior_logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    if not margins:
        return ({"num_pairs": 0}, {}) if return_arrays else {"num_pairs": 0}
    margin = torch.cat(margins).float()
    correct = (margin > 0).float()
    src = torch.cat(sources)
    result = {"num_pairs": int(margin.numel()), "accuracy": float(correct.mean()),
              "reward_margin": float(margin.mean()), "loss": float(torch.cat(losses).mean())}
    if bool((src >= 0).any()):
        result["accuracy_by_source"] = accuracy_by_source(correct, src, source_names)
    arrays = {"margin": margin.numpy(), "correct": correct.numpy().astype(bool), "source": src.numpy()}
    if prior_logits:
        logits = torch.cat(prior_logits)
        result["prior_entropy"] = float(entropy_from_logits(logits).mean())
        result["prior_code_perplexity"] = float(code_perplexity(logits))
        arrays.update(prior_code=torch.cat(codes).numpy(), posterior_code=torch.cat(post_codes).numpy(),
                      prior_probs=torch.softmax(logits, -1).numpy())
        if bool((src >= 0).all()):
            result["code_source_nmi"] = _nmi(arrays["prior_code"], src.numpy())
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"evaluation metric {k} is {v}")
    return (result, arrays) if return_arrays else result


# ----------------------------------------------------------------------------------- data-parallel
def reduce_eval_results(local: dict, arrays: dict, ctx: dist_lib.DistContext,
                        source_names: Optional[Sequence[str]] = None) -> dict:
    """Combine the rank-local results of ``evaluate(..., return_arrays=True)`` into what one
    process evaluating all the pairs returns (the same keys, equal values up to float rounding).

    Means of per-pair quantities (``loss``, ``prior_entropy``) are weighted by each rank's pair count;
    ``accuracy``, ``reward_margin``, ``accuracy_by_source`` and ``code_source_nmi`` are recomputed from
    the gathered per-pair arrays; ``prior_code_perplexity`` (usage of the mean prior distribution) from
    the gathered prior probabilities. Any other float metric is combined as a weighted mean.
    """
    gathered = dist_lib.gather_objects((local, arrays), ctx)
    counts = [int(r.get("num_pairs", 0)) for r, _ in gathered]
    total = sum(counts)
    if total == 0:
        return {"num_pairs": 0}
    parts = [(r, a) for (r, a), n in zip(gathered, counts) if n > 0]
    cat = {k: np.concatenate([a[k] for _, a in parts]) for k in parts[0][1]}
    margin = torch.from_numpy(cat["margin"]).float()
    correct = (margin > 0).float()
    src = torch.from_numpy(cat["source"])
    result: dict = {"num_pairs": total, "accuracy": float(correct.mean()), "reward_margin": float(margin.mean())}
    float_keys = [k for k, v in parts[0][0].items() if isinstance(v, float) and k not in result]
    for key in float_keys:
        if key == "prior_code_perplexity" and "prior_probs" in cat:
            probs = torch.from_numpy(cat["prior_probs"]).float()
            result[key] = float(code_perplexity(torch.log(probs.clamp_min(1e-30))))
        elif key == "code_source_nmi" and "prior_code" in cat:
            result[key] = normalized_mutual_information(cat["prior_code"], cat["source"]) if len(src) else 0.0
        else:  # a mean over pairs: weight each rank's mean by its pair count
            result[key] = sum(r[key] * int(r["num_pairs"]) for r, _ in parts) / total
    if bool((src >= 0).any()):
        result["accuracy_by_source"] = accuracy_by_source(correct, src, source_names)
    # keep evaluate()'s key order (what eval.json readers see)
    order = list(parts[0][0])
    return {k: result[k] for k in order if k in result} | {k: v for k, v in result.items() if k not in order}


def evaluate_sharded(model: nn.Module, ref: Any, dataset, collator, loss_cfg, ctx: dist_lib.DistContext,
                     *, batch_size: int, source_names: Optional[Sequence[str]] = None) -> dict:
    """Held-out evaluation split across ranks: each rank runs ``evaluate`` on its contiguous share of
    ``dataset`` (``split_evenly``) and the results are combined on every rank (``reduce_eval_results``). Under FSDP2 every forward is collective, so a rank with fewer batches runs
    dummy batches (one pair each, results discarded) until all ranks have run the same number."""
    if not ctx.distributed or ctx.world_size == 1:
        return evaluate(model, ref, dataset, collator, loss_cfg, batch_size=batch_size, source_names=source_names)
    share = IndexView(dataset, dist_lib.split_evenly(len(dataset), ctx.rank, ctx.world_size))
    local, arrays = ({"num_pairs": 0}, {})
    if len(share):
        local, arrays = evaluate(model, ref, share, collator, loss_cfg, batch_size=batch_size,
                                 source_names=source_names, return_arrays=True)
    if ctx.strategy == "fsdp2" and len(dataset):
        # every rank knows every share's size, so no collective here: one would interleave with the
        # forwards' all-gathers of a rank that is still evaluating
        mine = math.ceil(len(share) / batch_size)
        most = max(math.ceil(len(dist_lib.split_evenly(len(dataset), r, ctx.world_size)) / batch_size)
                   for r in range(ctx.world_size))
        if most > mine:
            evaluate(model, ref, IndexView(dataset, [0] * (most - mine)), collator, loss_cfg, batch_size=1,
                     source_names=source_names)
    return reduce_eval_results(local, arrays, ctx, source_names)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lpc.evaluate`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m lpc.evaluate", formatter_class=HelpFormatter,
                                description="Evaluate a trained LPC run on its held-out pairs: accuracy, reward "
                                            "margins, per-source accuracy, code usage; JSON + PNG plots.")
    p.add_argument("--run", required=True, help="run directory written by python -m lpc.train")
    p.add_argument("--checkpoint", default="final",
                   help="what to evaluate: 'final', 'latest' (newest checkpoint) or a checkpoint directory")
    p.add_argument("--output", default=None, help="output directory (default: <run>/evaluation)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default: the run's)")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    return p


def evaluate_run(run: str, *, checkpoint: str = "final", output: Optional[str] = None,
                 batch_size: Optional[int] = None, device: str = "auto", plots: bool = True) -> dict:
    """Evaluate a run directory on the held-out split its config describes; returns the evaluation dict.

    The held-out pairs are rebuilt exactly as training split them (same config, same seed). The DPO/IPO
    reference comes from the run's reference cache when it has one, else it is rebuilt (``--ref-model``,
    or the initial policy: ``--model`` or the tiny model from ``--seed``).
    """
    run_dir = Path(run)
    cfg_path = run_dir / "train_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--run {run}: no train_config.json (is it a run directory of lpc.train?)")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()), ignore_unknown=True)
    if checkpoint == "final":
        model_dir = run_dir / "final"
    elif checkpoint == "latest":
        model_dir = ckpt_lib.latest_checkpoint(run_dir)
        if model_dir is None:
            raise FileNotFoundError(f"--checkpoint latest: {run_dir} has no checkpoints")
    else:
        model_dir = Path(checkpoint)
    if not (model_dir / "lpc_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved LPC model (no lpc_config.json); finished runs have "
                                "final/, use --checkpoint latest for an unfinished one")
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    with threads_for(cfg):
        model = _load_model(model_dir, cfg, dev)
        tokenizer = load_tokenizer(model_dir)
        train_set, eval_set, names, syn = build_data(cfg, tokenizer)
        collator = PreferenceCollator(tokenizer.pad_token_id)
        loss_cfg = cfg.loss_config()
        ref = None
        if loss_cfg.needs_reference:
            ref = cached_eval_reference(cfg, run_dir, train_set, eval_set) or LiveReference(
                initial_reference(cfg).to(dev), backend=cfg.backend, autocast_dtype=autocast_dtype(cfg))
        with autocast(dev, autocast_dtype(cfg)):
            result, arrays = evaluate(model, ref, eval_set, collator, loss_cfg,
                                      batch_size=batch_size or cfg.eval_batch_size, source_names=names,
                                      return_arrays=True)
    if not result.get("num_pairs"):
        raise ValueError(f"{run}: the run has no held-out pairs (eval_size={cfg.eval_size})")
    if syn is not None:
        result["bayes_accuracy"] = synthetic.bayes_accuracy(eval_set.rows, syn)
    m = arrays["margin"]
    result["reward_margin_quantiles"] = {q: float(np.quantile(m, float(q))) for q in ("0.1", "0.5", "0.9")}
    if names is not None and (arrays["source"] >= 0).any():
        result["num_pairs_by_source"] = {names[s]: int((arrays["source"] == s).sum())
                                         for s in sorted(set(arrays["source"].tolist()) - {-1})}
    hists = {}
    if "prior_code" in arrays:
        k = model.lpc.num_codes
        for side in ("prior", "posterior"):
            h = code_histogram(arrays[f"{side}_code"], k)
            hists[f"{side} (argmax code)"] = h
            result[f"{side}_code_histogram"] = h.tolist()
            result[f"{side}_code_usage_perplexity"] = perplexity(h / h.sum())
        result["prior_posterior_code_agreement"] = float((arrays["prior_code"] == arrays["posterior_code"]).mean())
        if (arrays["source"] >= 0).all():
            result["posterior_code_source_nmi"] = _nmi(arrays["posterior_code"], arrays["source"])
    result.update(checkpoint=str(model_dir), run=str(run_dir))

    out = Path(output) if output else run_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    if plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # matplotlib missing: reported below instead
            jobs = [("code_usage.png", (lambda p: plot_code_usage(hists, p)) if hists else None),
                    ("reward_margins.png", lambda p: plot_margins(m, p)),
                    ("accuracy_by_source.png", (lambda p: plot_source_accuracy(result["accuracy_by_source"], p))
                     if "accuracy_by_source" in result else None),
                    ("training_curves.png", lambda p: plot_training_curves(run_dir / "metrics.jsonl", p))]
            for name, fn in jobs:
                if fn is None:
                    continue
                (written if fn(out / name) is not None else skipped).append(name)
    result["plots"] = written
    write_json_atomic(out / "evaluation.json", result)
    result["_output_dir"] = str(out)
    result["_skipped_plots"] = skipped
    return result


def _load_model(model_dir: Path, cfg: TrainConfig, device: torch.device) -> LPCModel:
    """An ``LPCModel`` from ``final/`` or a checkpoint (a LoRA checkpoint: base model + adapter)."""
    if (model_dir / "adapter_config.json").is_file():
        model = build_lpc_model(cfg, build_policy(cfg)[0])
        ckpt_lib.load_model_state(model_dir, model)  # the adapter, then the codebook and heads
        return model.to(device).eval()
    return LPCModel.from_pretrained(model_dir, backend=cfg.backend).to(device).eval()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: must be >= 1, got {args.batch_size}")
    try:
        res = evaluate_run(args.run, checkpoint=args.checkpoint, output=args.output, batch_size=args.batch_size,
                           device=args.device, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(f"held-out preference accuracy: {res['accuracy']:.3f} on {res['num_pairs']} pairs; mean reward margin "
          f"{res['reward_margin']:.4f}")
    for name, acc in res.get("accuracy_by_source", {}).items():
        print(f"  {name}: {acc:.3f}")
    if "prior_code_usage_perplexity" in res:
        print(f"code usage perplexity: prior {res['prior_code_usage_perplexity']:.2f}, posterior "
              f"{res['posterior_code_usage_perplexity']:.2f}; prior/posterior agreement "
              f"{res['prior_posterior_code_agreement']:.3f}")
    print(f"wrote {res['_output_dir']}/evaluation.json" + (f" and {', '.join(res['plots'])}" if res["plots"] else ""))
    if res["_skipped_plots"]:
        print(f"plots skipped (matplotlib not installed: pip install matplotlib): {', '.join(res['_skipped_plots'])}",
              file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
