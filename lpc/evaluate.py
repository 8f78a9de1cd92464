"""Held-out evaluation: preference accuracy with ``z`` from the prior (the posterior needs the label), reward margins
(those of ``lk.preference_loss``), per-source accuracy, code usage and the latent's diagnostics, and the latents
themselves (``collect_latents``). ``python -m lpc.evaluate --run <dir>`` evaluates a finished or checkpointed run
into ``<run>/evaluation/`` (``evaluation.json`` and, with matplotlib, PNG plots)."""

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

import lpc_kernels as lk

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .analysis import code_histogram, normalized_mutual_information, perplexity
from .builders import (build_collator, build_data, build_lpc_model, build_policy, initial_reference, load_tokenizer,
                       weights_dtype)
from .cli import HelpFormatter
from .config import LossConfig, TrainConfig
from .data import IndexView, PreferenceCollator, PreferenceDataset, batches, synthetic, to_device
from .io import write_json_atomic
from .losses import code_perplexity, entropy_from_logits, preference_objective, reward_margins
from .model import LPCModel
from .objective import reference_logps
from .plots import plot_code_usage, plot_margins, plot_source_accuracy, plot_training_curves
from .reference import LiveReference, cached_eval_reference
from .runtime import autocast, autocast_dtype, log, resolve_device, threads_for


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


def evaluate(model: LPCModel, ref_model: Union[nn.Module, Callable, None], dataset: PreferenceDataset,
             collator: PreferenceCollator, loss_cfg: LossConfig, *, batch_size: int = 128,
             source_names: Optional[Sequence[str]] = None, return_arrays: bool = False, diagnostics: bool = False):
    """Held-out metrics of ``model`` on ``dataset`` (z from the prior).

    Args:
        ref_model: the frozen reference model, or a scorer ``batch -> (chosen [B], rejected [B])``
            (``lpc.reference``); ``None`` for SimPO.
        return_arrays: also return the per-pair numpy arrays the metrics are computed from (``pair_arrays``).
        diagnostics: with LPC, also score every pair with z from the posterior, from the posterior fed the pair
            swapped, with z = 0 and with z = E[k] for every code (``LPCModel.diagnostic_zs``; one LM-head pass
            each, the backbone runs once).

    Returns:
        A JSON-able dict (``summarize``): ``accuracy``, ``reward_margin``, ``loss`` (incl. the KL term),
        ``num_pairs``, ``accuracy_by_source`` (when sources are known) and, with LPC, ``prior_entropy``,
        ``prior_code_perplexity``, ``code_source_nmi`` (NMI between the argmax prior code and the source) and
        ``z_rms_ratio``; with ``diagnostics`` ``accuracy_posterior``, ``accuracy_posterior_swapped``,
        ``accuracy_zero_z`` and ``accuracy_by_code`` (K values); with ``return_arrays`` ``(dict, arrays)``.
    """
    arrays = pair_arrays(model, ref_model, dataset, collator, loss_cfg, batch_size=batch_size,
                         diagnostics=diagnostics)
    if not arrays:
        return ({"num_pairs": 0}, {}) if return_arrays else {"num_pairs": 0}
    result = summarize(arrays, source_names)
    return (result, arrays) if return_arrays else result


@torch.no_grad()
def pair_arrays(model: LPCModel, ref_model: Union[nn.Module, Callable, None], dataset: PreferenceDataset,
                collator: PreferenceCollator, loss_cfg: Optional[LossConfig], *, batch_size: int = 128,
                diagnostics: bool = False, latents: bool = False) -> dict[str, np.ndarray]:
    """One inference pass (z from the prior) over ``dataset``, per pair, as numpy arrays (``{}`` for no pairs);
    the model is in eval mode for the pass and restored after.

    Always ``source``; with ``loss_cfg`` ``margin`` (``r_w - r_l``) and ``loss``; with LPC ``prior_code``,
    ``posterior_code``, ``prior_entropy``, ``prior_probs`` ``[N, K]`` and what ``z_rms_ratio`` needs (``z_sq``,
    ``hidden_sq``, ``scored``); with ``diagnostics`` the margins under the other latents (``margin_<name>``,
    ``margin_by_code`` ``[N, K]``); with ``diagnostics`` or ``latents`` the latents ``z_prior`` and ``z_posterior``
    (expected embedding) ``[N, D]``; with ``latents`` ``posterior_probs`` ``[N, K]``.
    """
    if loss_cfg is not None and loss_cfg.needs_reference and ref_model is None:
        raise ValueError(f"loss_type={loss_cfg.loss_type!r} needs the reference model")
    if isinstance(ref_model, nn.Module):
        module = ref_model
        ref_model = lambda batch: reference_logps(module, batch, backend=model.backend)  # noqa: E731
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}

    def add(key, t):
        parts.setdefault(key, []).append(t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu())

    try:
        device = next(model.parameters()).device
        for batch in batches(dataset, batch_size, collator):
            batch = to_device(batch, device)
            out = model(batch, use_prior=True, diagnostics=diagnostics)
            ref = ref_model(batch) if loss_cfg is not None and loss_cfg.needs_reference else (None, None)
            if loss_cfg is not None:
                res = preference_objective(out, ref[0], ref[1], loss_cfg)
                add("margin", res.chosen_rewards - res.rejected_rewards)
                add("loss", res.losses)
            add("source", batch["source"])
            if out.prior_logits is not None:
                add("prior_code", out.prior_logits.argmax(-1))
                add("posterior_code", out.posterior_logits.argmax(-1))
                add("prior_entropy", entropy_from_logits(out.prior_logits))
                add("prior_probs", torch.softmax(out.prior_logits.float(), -1))
                add("z_sq", out.z_sq)
                add("hidden_sq", out.hidden_sq)
                add("scored", out.chosen_lengths + out.rejected_lengths)
                if latents:
                    add("posterior_probs", torch.softmax(out.posterior_logits.float(), -1))
                if diagnostics or latents:  # the latents themselves, for projections
                    add("z_prior", out.z)
                    add("z_posterior", model.embed(torch.softmax(out.posterior_logits.float(), -1)))
            for name, (chosen, rejected) in (out.diagnostics or {}).items():
                if name != "prior":
                    add(f"margin_{name}", reward_margins(chosen, rejected, ref[0], ref[1], out, loss_cfg))
    finally:
        model.train(was_training)
    if not parts:
        return {}
    lk.raise_pending_errors()  # the values are on the host now: report what the ops found on the device
    arrays = {k: torch.cat(v).numpy() for k, v in parts.items()}
    codes = sorted((k for k in arrays if k.startswith("margin_code_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if codes:  # one [N, K] matrix: the margin of every pair under every code
        arrays["margin_by_code"] = np.stack([arrays.pop(k) for k in codes], axis=1)
    return arrays


LATENT_ARRAYS = ("prior_probs", "posterior_probs", "z_prior", "z_posterior", "prior_code", "posterior_code", "source")


def collect_latents(model: LPCModel, dataset: PreferenceDataset, collator: PreferenceCollator,
                    batch_size: int = 128) -> dict[str, np.ndarray]:
    """The latents of an LPC ``model`` on ``dataset``, per pair (``pair_arrays``' ``LATENT_ARRAYS``): prior and
    posterior probabilities ``[N, K]``, ``z_prior`` (the inference latent) and ``z_posterior`` (the posterior's
    expected embedding: training draws a Gumbel sample around it) ``[N, D]``, the argmax codes and the source
    ``[N]``. Empty arrays for an empty dataset.

    Raises:
        ValueError: the model has no latent (``model.lpc is None``) or ``batch_size`` < 1.
    """
    if getattr(model, "lpc", None) is None:
        raise ValueError("collect_latents needs an LPC model (model.lpc is None: a plain DPO/IPO/SimPO policy)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    arrays = pair_arrays(model, None, dataset, collator, None, batch_size=batch_size, latents=True)
    if not arrays:
        k, d = model.lpc.num_codes, model.hidden_size
        return {"prior_probs": np.zeros((0, k), np.float32), "posterior_probs": np.zeros((0, k), np.float32),
                "z_prior": np.zeros((0, d), np.float32), "z_posterior": np.zeros((0, d), np.float32),
                "prior_code": np.zeros(0, np.int64), "posterior_code": np.zeros(0, np.int64),
                "source": np.zeros(0, np.int64)}
    return {k: arrays[k] for k in LATENT_ARRAYS}


def summarize(arrays: dict, source_names: Optional[Sequence[str]] = None) -> dict:
    """The evaluation metrics of the per-pair arrays of ``evaluate(..., return_arrays=True)`` (of one process, or
    gathered from every rank by ``reduce_eval_results``)."""
    margin = torch.from_numpy(arrays["margin"]).double()
    correct = (margin > 0).double()
    src = torch.from_numpy(arrays["source"])
    result = {"num_pairs": int(margin.numel()), "accuracy": float(correct.mean()),
              "reward_margin": float(margin.mean()), "loss": float(arrays["loss"].mean(dtype=np.float64))}
    if bool((src >= 0).any()):
        result["accuracy_by_source"] = accuracy_by_source(correct, src, source_names)
    if "prior_code" in arrays:
        probs = torch.from_numpy(arrays["prior_probs"]).float()
        result["prior_entropy"] = float(arrays["prior_entropy"].mean(dtype=np.float64))
        result["prior_code_perplexity"] = float(code_perplexity(torch.log(probs.clamp_min(1e-30))))
        if bool((src >= 0).all()):
            result["code_source_nmi"] = _nmi(arrays["prior_code"], arrays["source"])
        result["z_rms_ratio"] = float(np.sqrt((arrays["scored"] * arrays["z_sq"]).sum(dtype=np.float64)
                                              / arrays["hidden_sq"].sum(dtype=np.float64)))
    for key, name in (("margin_posterior", "accuracy_posterior"),
                      ("margin_posterior_swapped", "accuracy_posterior_swapped"), ("margin_zero", "accuracy_zero_z")):
        if key in arrays:
            result[name] = float((arrays[key] > 0).mean())
    if "margin_by_code" in arrays:
        result["accuracy_by_code"] = (arrays["margin_by_code"] > 0).mean(axis=0).tolist()
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"evaluation metric {k} is {v}")
    return result


# ----------------------------------------------------------------------------------- data-parallel
def reduce_eval_results(arrays: dict, ctx: dist_lib.DistContext, source_names: Optional[Sequence[str]] = None) -> dict:
    """The rank-local per-pair arrays of ``evaluate(..., return_arrays=True)`` gathered from every rank (in rank
    order) and summarised: what one process evaluating all the pairs returns (equal up to float rounding)."""
    gathered = [a for a in dist_lib.gather_objects(arrays, ctx) if a]
    if not gathered:
        return {"num_pairs": 0}
    return summarize({k: np.concatenate([a[k] for a in gathered]) for k in gathered[0]}, source_names)


def evaluate_sharded(model: nn.Module, ref: Any, dataset, collator, loss_cfg, ctx: dist_lib.DistContext,
                     *, batch_size: int, source_names: Optional[Sequence[str]] = None,
                     diagnostics: bool = False) -> dict:
    """Held-out evaluation split across ranks: each rank runs ``evaluate`` on its contiguous share of
    ``dataset`` (``split_evenly``) and the results are combined on every rank (``reduce_eval_results``).
    Under FSDP2 every forward is collective, so a rank with fewer batches runs dummy batches (one pair each,
    results discarded) until all ranks have run the same number."""
    kw = dict(source_names=source_names, diagnostics=diagnostics)
    if not ctx.distributed or ctx.world_size == 1:
        return evaluate(model, ref, dataset, collator, loss_cfg, batch_size=batch_size, **kw)
    share = IndexView(dataset, dist_lib.split_evenly(len(dataset), ctx.rank, ctx.world_size))
    arrays = {}
    if len(share):
        _, arrays = evaluate(model, ref, share, collator, loss_cfg, batch_size=batch_size, return_arrays=True, **kw)
    if ctx.strategy == "fsdp2" and len(dataset):
        # every rank knows every share's size, so no collective here: one would interleave with the
        # forwards' all-gathers of a rank that is still evaluating
        mine = math.ceil(len(share) / batch_size)
        most = max(math.ceil(len(dist_lib.split_evenly(len(dataset), r, ctx.world_size)) / batch_size)
                   for r in range(ctx.world_size))
        if most > mine:
            evaluate(model, ref, IndexView(dataset, [0] * (most - mine)), collator, loss_cfg, batch_size=1, **kw)
    return reduce_eval_results(arrays, ctx, source_names)


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
    verified = checkpoint != "final"  # a checkpoint's manifest is checked here, final/'s when it is loaded
    if checkpoint == "final":
        model_dir = run_dir / "final"
    elif checkpoint == "latest":  # the newest checkpoint that passes its manifest
        model_dir, skipped = ckpt_lib.newest_intact_checkpoint(run_dir)
        for note in skipped:
            log(note)
        if model_dir is None:
            raise FileNotFoundError(f"--checkpoint latest: {run_dir} has no checkpoints")
    else:
        model_dir = Path(checkpoint)
        verified = (model_dir / ckpt_lib.STATE_FILE).is_file()
        if verified:
            ckpt_lib.verify_checkpoint(model_dir)
    if not (model_dir / "lpc_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved LPC model (no lpc_config.json); finished runs have "
                                "final/, use --checkpoint latest for an unfinished one")
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    with threads_for(cfg):
        model = _load_model(model_dir, cfg, dev, verified=verified)
        tokenizer = load_tokenizer(model_dir)
        train_set, eval_set, names, syn = build_data(cfg, tokenizer)
        collator = build_collator(cfg, tokenizer, model.policy)
        loss_cfg = cfg.loss_config()
        ref = None
        if loss_cfg.needs_reference:
            ref = cached_eval_reference(cfg, run_dir, train_set, eval_set) or LiveReference(
                initial_reference(cfg).to(dev), backend=cfg.backend, autocast_dtype=autocast_dtype(cfg))
        with autocast(dev, autocast_dtype(cfg)):
            result, arrays = evaluate(model, ref, eval_set, collator, loss_cfg,
                                      batch_size=batch_size or cfg.eval_batch_size, source_names=names,
                                      return_arrays=True, diagnostics=True)
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


def _load_model(model_dir: Path, cfg: TrainConfig, device: torch.device, *, verified: bool) -> LPCModel:
    """An ``LPCModel`` from ``final/`` or a checkpoint (a LoRA checkpoint: base model + adapter); ``verified``: its
    manifest was checked already."""
    if (model_dir / "adapter_config.json").is_file():
        model = build_lpc_model(cfg, build_policy(cfg)[0])
        ckpt_lib.load_model_state(model_dir, model)  # the adapter, then the codebook and heads
        return model.to(device).eval()
    model = LPCModel.from_pretrained(model_dir, backend=cfg.backend, verified=verified, dtype=weights_dtype(cfg))
    return model.to(device).eval()


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
