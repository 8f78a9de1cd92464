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
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .analysis import code_histogram, normalized_mutual_information, perplexity, plot_code_usage, save_figure
from .cli import HelpFormatter
from .data import PreferenceCollator, PreferenceDataset, batches, to_device
from .losses import LossConfig, preference_objective
from .model import LPCModel, code_perplexity, entropy_from_logits, reference_logps


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


# ------------------------------------------------------------------------------------------------ CLI
def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def plot_margins(margin: np.ndarray, path: Path) -> Optional[Path]:
    """Histogram of held-out reward margins (> 0: the pair is ranked correctly)."""
    Figure = _figure()
    if Figure is None:
        return None
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.hist(margin, bins=40, color="tab:blue")
    ax.axvline(0.0, color="black", lw=1)
    ax.set_xlabel("reward margin r(x, y_w) - r(x, y_l)")
    ax.set_ylabel("pairs")
    ax.set_title(f"held-out: {float((margin > 0).mean()):.3f} ranked correctly", fontsize=9)
    return save_figure(fig, path)


def plot_source_accuracy(by_source: dict, path: Path) -> Optional[Path]:
    """Bar chart of per-source held-out accuracy."""
    Figure = _figure()
    if Figure is None or not by_source:
        return None
    fig = Figure(figsize=(max(4, 0.8 * len(by_source) + 2), 3))
    ax = fig.subplots()
    ax.bar(list(by_source), list(by_source.values()), color="tab:green")
    ax.axhline(0.5, color="black", lw=1, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def plot_training_curves(metrics_path: Path, path: Path) -> Optional[Path]:
    """Loss and reward accuracy per step from ``metrics.jsonl``."""
    Figure = _figure()
    if Figure is None or not metrics_path.exists():
        return None
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(9, 3))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "rewards/accuracies")):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
    return save_figure(fig, path)


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
    from . import checkpoint as ckpt_lib
    from .config import TrainConfig
    from .reference import CACHE_FILE, CachedReference, LiveReference, _autocast, load_cache
    from .train import _autocast_dtype, _resolve_device, build_data, initial_reference, reference_fingerprint

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
    dev = _resolve_device(device)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    from .train import default_threads

    torch.set_num_threads(cfg.threads or default_threads(cfg))
    try:
        model = _load_model(model_dir, cfg, dev)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_set, eval_set, names, syn = build_data(cfg, tokenizer)
        collator = PreferenceCollator(tokenizer.pad_token_id)
        loss_cfg = cfg.loss_config()
        autocast_dtype = _autocast_dtype(cfg)
        ref = None
        if loss_cfg.needs_reference:
            cached = load_cache(run_dir / CACHE_FILE, reference_fingerprint(cfg, train_set, eval_set))
            if cached is not None:
                ref = CachedReference(cached["eval.chosen"], cached["eval.rejected"])
            if ref is None:
                ref = LiveReference(initial_reference(cfg).to(dev), backend=cfg.backend,
                                    autocast_dtype=autocast_dtype)
        with _autocast(dev, autocast_dtype):
            result, arrays = evaluate(model, ref, eval_set, collator, loss_cfg,
                                      batch_size=batch_size or cfg.eval_batch_size, source_names=names,
                                      return_arrays=True)
    finally:
        torch.set_num_threads(threads)
    if not result.get("num_pairs"):
        raise ValueError(f"{run}: the run has no held-out pairs (eval_size={cfg.eval_size})")
    if syn is not None:
        from . import synthetic

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
    from .io import write_json_atomic

    write_json_atomic(out / "evaluation.json", result)
    result["_output_dir"] = str(out)
    result["_skipped_plots"] = skipped
    return result


def _load_model(model_dir: Path, cfg, device: torch.device) -> LPCModel:
    """An ``LPCModel`` from ``final/`` or a checkpoint (a LoRA checkpoint: base model + adapter)."""
    if (model_dir / "adapter_config.json").is_file():
        from . import checkpoint as ckpt_lib
        from .train import apply_lora, build_policy

        model = LPCModel(apply_lora(build_policy(cfg)[0], cfg), cfg.lpc_config(), backend=cfg.backend)
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
