"""``python -m lpc.experiments paper``: the paper's claims tested in miniature: that LPC improves DPO, SimPO and IPO,
that it is robust to flipped labels, and that its codes separate the preference sources; on the four-source
synthetic data, or with ``--model`` / ``--dataset`` on a real model and data. Arms: ``conditions``; setup and
results: ``docs/results.md``, "Study B: the paper's claims, rerun"."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import analysis, plots
from ..builders import split_indices
from ..data import assign_source_ids, load_jsonl, load_preference_rows
from ..io import atomic_file, write_text_atomic
from .common import (Results, RunContext, Study, accuracy, ci, fmt_duration, fmt_float, ms, run_dir, runs_table,
                     table)

LOSSES = ("dpo", "simpo", "ipo")
METHOD_LABEL = {"dpo": "DPO", "simpo": "SimPO", "ipo": "IPO"}
NOISE_UNMARKED = (0.1, 0.2, 0.4)
NOISE_MARKED = 0.5
K_SWEEP = (1, 8, 32, 128)
KL_SWEEP = (0.01, 0.05, 0.1, 1.0)
SIMPO_SCALE = {"beta": 2.0, "gamma": 1.0}  # the SimPO paper's range: beta 2-2.5, gamma / beta about 0.5
HINT_ON, HINT_OFF = 0.5, 0.0
REAL_FLIP_MARKER = "[FLIP]"  # the paper's marker, for real tokenizers (the synthetic one knows "[flip]")
PROJECTION_POINTS = 800  # t-SNE cost grows ~N^2 at this size: a subsample keeps the report under a minute

# the sections of report.md, in order (tests check that each is present)
SECTIONS = ("## Setup", "## Accuracy by method", "## Accuracy and margin by source", "## Label noise",
            "## Latent codes", "## Latent diagnostics", "## Codebook size sweep", "## KL weight sweep", "## Runs")

FULL = dict(steps=600, batch_size=32, num_train=16384, eval_size=1024, warmup_steps=30)
QUICK = dict(steps=30, batch_size=16, num_train=256, eval_size=96, warmup_steps=5, hidden_size=32,
             num_layers=1, num_heads=2)
FULL_SEEDS, QUICK_SEEDS = 10, 2


# ---------------------------------------------------------------------------------------------- the grid
def conditions(real_data: bool = False) -> dict[str, dict]:
    """Every named condition of the study -> its ``TrainConfig`` overrides (plus ``_flip*`` keys for
    label noise on a real dataset, which the runner turns into a prepared copy of the data).

    Methods: DPO / SimPO / IPO, each plain and with LPC, with source hints in half of the prompts and without (only
    the topic hints at the source); SimPO at its paper's scale (``SIMPO_SCALE``). Label noise (DPO vs LPC-DPO,
    hints on): the paper's protocol, ``NOISE_MARKED`` of the training pairs flipped with the marker, and unmarked
    flips at ``NOISE_UNMARKED``. Sweeps of LPC-DPO: codebook size ``K_SWEEP`` (K = 1 is a constant learned offset)
    and KL weight ``KL_SWEEP`` (the paper's search and 1, the ELBO). On a real dataset (``real_data``) the no-hint
    runs are dropped (hints are a property of the synthetic generator) and label noise is injected into the training
    part of a copy of the data (``noisy_real_dataset``, marker ``[FLIP]`` as in the paper).

    Several names share a configuration (e.g. ``dpo-lpc-hint``, ``dpo-lpc-k32``, ``dpo-lpc-kl1`` and
    ``dpo-lpc-flip0``); ``runner.plan`` runs each distinct configuration once.
    """
    hint = {} if real_data else {"hint_prob": HINT_ON}
    out: dict[str, dict] = {}
    for loss in LOSSES:
        for lpc in (False, True):
            tag = f"{loss}-{'lpc' if lpc else 'plain'}"
            scale = SIMPO_SCALE if loss == "simpo" else {}
            out[f"{tag}-hint"] = {"loss": loss, "lpc": lpc, **hint, **scale}
            if not real_data:
                out[f"{tag}-nohint"] = {"loss": loss, "lpc": lpc, "hint_prob": HINT_OFF, **scale}
    for lpc in (False, True):
        tag = f"dpo-{'lpc' if lpc else 'plain'}"
        out[f"{tag}-flip0"] = {"loss": "dpo", "lpc": lpc, **hint}
        for frac, marked in [(f, False) for f in NOISE_UNMARKED] + [(NOISE_MARKED, True)]:
            name = f"{tag}-flip{int(round(frac * 100))}{'-marked' if marked else ''}"
            if real_data:
                out[name] = {"loss": "dpo", "lpc": lpc, "_flip_fraction": frac, "_flip_marker": marked}
            else:
                out[name] = {"loss": "dpo", "lpc": lpc, **hint, "flip_fraction": frac, "flip_marker": marked}
    for k in K_SWEEP:
        out[f"dpo-lpc-k{k}"] = {"loss": "dpo", "lpc": True, **hint, "num_codes": k}
    for w in KL_SWEEP:
        out[f"dpo-lpc-kl{fmt_float(w)}"] = {"loss": "dpo", "lpc": True, **hint, "kl_weight": w}
    return out


def _save_npz_atomic(path: Path, **arrays) -> None:
    with atomic_file(path, suffix=".npz") as tmp:  # the suffix keeps numpy from appending its own
        np.savez_compressed(tmp, **arrays)


def prepare_real_dataset(path: os.PathLike, out_dir: Path) -> tuple[Path, list[str]]:
    """Copy a preference dataset file into ``out_dir/data/clean.jsonl`` with string prompts/answers and integer
    sources; returns ``(copy, source_names)``. Rows are read by ``data.load_preference_rows`` (strict: a
    malformed row raises, naming its line) and numbered by ``data.assign_source_ids`` (string sources in
    sorted order, integer sources kept, missing ones -1)."""
    rows = load_preference_rows(path, strict=True)[0]
    names = assign_source_ids(rows) or []
    out = out_dir / "data" / "clean.jsonl"
    _write_rows_atomic(out, rows)
    return out, names


def _write_rows_atomic(path: Path, rows: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected", "source")}) + "\n"
                                    for row in rows))


def noisy_real_dataset(clean: Path, out_dir: Path, fraction: float, marked: bool, eval_size: int,
                        seed: int) -> Path:
    """A copy of ``clean`` with ``fraction`` of its *training* rows flipped (held-out rows untouched)."""
    rows = load_jsonl(clean)
    _, train_idx = split_indices(len(rows), eval_size, seed)
    flipped = analysis.flip_pairs([rows[i] for i in train_idx], fraction,
                                  marker=REAL_FLIP_MARKER if marked else None, seed=seed)
    for i, row in zip(train_idx, flipped):
        rows[i] = row
    path = out_dir / "data" / f"flip{int(round(fraction * 100))}{'-marked' if marked else ''}-s{seed}.jsonl"
    _write_rows_atomic(path, rows)
    return path


def prepare(base: dict, out_dir: Path) -> dict:
    """A real dataset: its copy with integer sources (``prepare_real_dataset``), and the source names."""
    clean, names = prepare_real_dataset(base["dataset"], out_dir)
    return {"dataset": str(clean), "_source_names": names}


def run_overrides(overrides: dict, base: dict, out_dir: Path, seed: int) -> dict:
    """Label noise on a real dataset (``_flip_*`` keys): train on a flipped copy (``noisy_real_dataset``)."""
    ov = dict(overrides)
    if "_flip_fraction" in ov:
        frac, marked = ov.pop("_flip_fraction"), ov.pop("_flip_marker")
        ov["dataset"] = str(noisy_real_dataset(Path(base["dataset"]), out_dir, frac, marked,
                                               base.get("eval_size", FULL["eval_size"]), seed))
    return ov


def analyse(ctx: RunContext) -> dict:
    """Per source accuracy and margin, the argmax codes' usage and NMI with the source, and the latents of the
    held-out pairs (``latents.npz``, for the projections). A real dataset's copy is checked to be split as the
    trainer splits it (the injected label noise must spare the held-out rows)."""
    arrays, names = ctx.arrays, ctx.base.get("_source_names") or ctx.source_names
    if ctx.cfg.dataset is not None:
        clean = load_jsonl(ctx.base["dataset"])
        eval_idx, _ = split_indices(len(clean), ctx.cfg.eval_size, ctx.cfg.seed)
        expect = [(clean[i]["prompt"], clean[i]["chosen"]) for i in eval_idx]
        if [(r["prompt"], r["chosen"]) for r in ctx.eval_set.rows] != expect:
            raise RuntimeError("lpc.builders.build_data no longer splits --dataset files as split_indices assumes: "
                               "held-out rows could carry injected label noise")
    src, margin = arrays["source"], arrays["margin"]
    correct = margin > 0
    out: dict = {"by_source": {}}
    for s in sorted(set(src.tolist()) - {-1}):
        sel = src == s
        name = names[s] if names is not None and s < len(names) else str(s)
        out["by_source"][name] = {"accuracy": float(correct[sel].mean()), "margin": float(margin[sel].mean()),
                                  "n": int(sel.sum())}
    if ctx.model.lpc is not None:
        k = ctx.model.lpc.num_codes
        codes = {"num_codes": k}
        for side in ("posterior", "prior"):
            hist = analysis.code_histogram(arrays[f"{side}_code"], k)
            codes[f"{side}_hist"] = hist.tolist()
            codes[f"{side}_perplexity"] = analysis.perplexity(hist / hist.sum()) if hist.sum() else None
            codes[f"{side}_nmi"] = (analysis.normalized_mutual_information(arrays[f"{side}_code"], src)
                                    if src.size and (src >= 0).all() else None)
        out["codes"] = codes
        _save_npz_atomic(ctx.run_dir / "latents.npz", z_prior=arrays["z_prior"].astype(np.float16),
                         z_posterior=arrays["z_posterior"].astype(np.float16), source=src,
                         prior_code=arrays["prior_code"], posterior_code=arrays["posterior_code"])
    if names is not None:
        out["source_names"] = list(names)
    return out


def write_report(out_dir: Path, study: dict, results: list, alias: dict) -> Path:
    """Rebuild ``report.md`` and the plots in ``out_dir`` from its results; returns the path."""
    out_dir = Path(out_dir)
    real = study.get("dataset") is not None
    base = study["base"]
    res = Results(results, alias)
    names = next((r["source_names"] for r in results if r.get("source_names")), None) or []
    plot_dir = out_dir / "plots"
    L: list[str] = ["# LPC in miniature: the paper's claims on data with known ground truth", ""]

    # ------------------------------------------------------------------ setup
    # one value per seed: the held-out split depends on the seed and hint_prob only
    bayes = res.values("dpo-plain-hint", lambda r: r.get("bayes_accuracy"))
    wall = sum(r.get("wall_s") or 0.0 for r in results)
    L += ["## Setup", "",
          f"- command: `{study.get('command') or 'python -m lpc.experiments paper'}`",
          "- data: " + (f"`{study['dataset']}`" if real else "synthetic (lpc.data.synthetic: 4 sources, 6 attributes)")
          + f"; model: {'`' + base['model'] + '`' if base.get('model') else 'tiny random-init Llama'}",
          f"- per run: {base['steps']} steps x {base['batch_size']} pairs, {base['num_train']} training pairs"
          f"{' (synthetic)' if not real else ''}, {base['eval_size']} held-out pairs; other settings are "
          "`TrainConfig` defaults (DPO/IPO beta 0.1; SimPO beta 2, gamma 1; K 32, codebook scale 1, lr 3e-3; KL "
          "weight " + ", ".join(f"{METHOD_LABEL[loss]} {kl:g}" for loss in LOSSES
                                for kl in sorted(set(res.values(f"{loss}-lpc-hint",
                                                                lambda r: r["config"]["kl_weight"])))) + ")",
          f"- seeds: {res.seeds} ({len(results)} runs finished; sum of run wall times {fmt_duration(wall)})",
          "- mean ± std over seeds (sample std); Δ = LPC − plain, paired per seed (same data and init), as mean "
          "[Student-t 95% interval]",
          "- accuracy: held-out pairs whose implicit-reward margin is > 0, z from the prior (LPC)",
          ]
    if bayes:
        L.append(f"- Bayes-optimal accuracy (knows the generator, hint_prob {HINT_ON}): {ms(bayes)}")
    L.append("")
    # less than half a pair of disagreement is float rounding in the mean, more is a real difference
    mism = [r["accuracy_mismatch"] * r["num_pairs"] for r in results if r.get("accuracy_mismatch") is not None]
    if mism and max(mism) > 0.5:
        L += [f"Warning: the trainer's evaluation and the reloaded checkpoint disagree on accuracy by up to "
              f"{max(mism):.0f} held-out pair(s) (a changed reference model or data split?).", ""]

    # ------------------------------------------------------------------ methods
    hint_modes = [("hint", f"hints (hint_prob {HINT_ON})")] + ([] if real else [("nohint", "no hints (hint_prob 0)")])
    L += ["## Accuracy by method", "",
          "Held-out preference accuracy and reward margin; Δ accuracy = LPC − plain.", ""]
    header = ["method"]
    for _, label in hint_modes:
        header += [f"accuracy, {label}", f"margin, {label}", f"Δ accuracy, {label}"]
    rows = []
    series = {}
    for loss in LOSSES:
        for lpc in (False, True):
            tag = f"{loss}-{'lpc' if lpc else 'plain'}"
            row = [("LPC-" if lpc else "") + METHOD_LABEL[loss]]
            for mode, _ in hint_modes:
                cond = f"{tag}-{mode}"
                delta = ci(res.paired_delta(f"{loss}-lpc-{mode}", f"{loss}-plain-{mode}", accuracy)) if lpc else ""
                row += [ms(res.values(cond, accuracy)), ms(res.values(cond, lambda r: r["reward_margin"])), delta]
            rows.append(row)
    L += table(header, rows)
    groups = [("LPC-" if lpc else "") + METHOD_LABEL[loss] for loss in LOSSES for lpc in (False, True)]
    for mode, label in hint_modes:
        series[label] = res.mean_std_lists([f"{loss}-{'lpc' if lpc else 'plain'}-{mode}" for loss in LOSSES
                                              for lpc in (False, True)], accuracy)
    hl = {"Bayes-optimal": float(np.mean(bayes))} if bayes else None
    plots.plot_bars(groups, series, plot_dir / "accuracy_by_method.png", ylabel="held-out accuracy",
                       title="Accuracy by method (mean ± std over seeds)", ylim=(0.4, 1.0), hlines=hl)
    L += ["![accuracy by method](plots/accuracy_by_method.png)", ""]

    # ------------------------------------------------------------------ per source
    L += ["## Accuracy and margin by source", ""]
    if names:
        L += ["Hints on. Each cell: accuracy / reward margin on the held-out pairs of that source.", ""]
        rows = []
        src_series = {}
        for loss in LOSSES:
            for lpc in (False, True):
                cond = f"{loss}-{'lpc' if lpc else 'plain'}-hint"
                label = ("LPC-" if lpc else "") + METHOD_LABEL[loss]
                row = [label]
                for n in names:
                    row.append(f"{ms(res.values(cond, lambda r, n=n: r['by_source'][n]['accuracy']))} / "
                               f"{ms(res.values(cond, lambda r, n=n: r['by_source'][n]['margin']))}")
                rows.append(row)
                if loss == "dpo":
                    src_series[label] = _mean_std_lists_src(res, cond, names)
        L += table(["method"] + list(names), rows)
        plots.plot_bars(list(names), src_series, plot_dir / "accuracy_by_source.png", ylabel="held-out accuracy",
                           title="DPO vs LPC-DPO by source (hints on)", ylim=(0.4, 1.0))
        L += ["![accuracy by source](plots/accuracy_by_source.png)", ""]
    else:
        L += ["The dataset has no source labels: per-source metrics skipped.", ""]

    # ------------------------------------------------------------------ label noise
    L += ["## Label noise", "",
          "DPO vs LPC-DPO trained on flipped training labels, evaluated on clean held-out pairs. Unmarked: "
          "the flip is invisible; marked (the paper's protocol): flipped prompts end with "
          f"`{'[FLIP]' if real else '[flip]'}`.", ""]
    noise = [("0%", "flip0")] + [(f"{int(f * 100)}% unmarked", f"flip{int(f * 100)}") for f in NOISE_UNMARKED]
    noise.append((f"{int(NOISE_MARKED * 100)}% marked", f"flip{int(NOISE_MARKED * 100)}-marked"))
    rows = []
    for label, suffix in noise:
        a, b = f"dpo-plain-{suffix}", f"dpo-lpc-{suffix}"
        if not res.runs(a) and not res.runs(b):
            rows.append([label, "not run", "not run", ""])
            continue
        rows.append([label, ms(res.values(a, accuracy)), ms(res.values(b, accuracy)),
                     ci(res.paired_delta(b, a, accuracy))])
    L += table(["training labels", "DPO", "LPC-DPO", "Δ (LPC − DPO)"], rows)
    xs = [0] + [int(f * 100) for f in NOISE_UNMARKED] + [int(NOISE_MARKED * 100)]
    nan = float("nan")
    line_series = {}
    for lpc in (False, True):
        tag = f"dpo-{'lpc' if lpc else 'plain'}"
        label = "LPC-DPO" if lpc else "DPO"
        m, s = res.mean_std_lists([f"{tag}-{suf}" for _, suf in noise], accuracy)
        line_series[f"{label}, unmarked"] = (m[:-1] + [nan], s[:-1] + [0.0])
        line_series[f"{label}, {int(NOISE_MARKED * 100)}% marked"] = ([nan] * (len(xs) - 1) + [m[-1]],
                                                                      [0.0] * (len(xs) - 1) + [s[-1]])
    plots.plot_lines(xs, line_series, plot_dir / "label_noise.png", xlabel="flipped training pairs (%)",
                        ylabel="clean held-out accuracy", title="Label noise")
    L += ["![label noise](plots/label_noise.png)", ""]

    # ------------------------------------------------------------------ codes
    L += ["## Latent codes", "",
          "NMI between the argmax code and the true source of each held-out pair (arithmetic-mean "
          "normalisation; 0 = independent, 1 = the codes name the sources); code-usage perplexity = exp of "
          "the entropy of the argmax-code histogram (1 = one code for everything, K = all codes equally).", ""]
    rows = []
    lpc_conds = [(f"{loss}-lpc-{mode}", f"LPC-{METHOD_LABEL[loss]}, {label}") for mode, label in hint_modes
                 for loss in LOSSES]
    pct = int(NOISE_MARKED * 100)
    lpc_conds += [(f"dpo-lpc-flip{pct}-marked", f"LPC-DPO, {pct}% marked flips")]

    def code_stat(key):
        return lambda r: r["codes"][key]

    for cond, label in lpc_conds:
        rows.append([label] + [ms(res.values(cond, code_stat(f"{side}_nmi"))) for side in ("posterior", "prior")]
                    + [ms(res.values(cond, code_stat(f"{side}_perplexity")), 2) for side in ("posterior", "prior")])
    L += table(["run", "NMI posterior code", "NMI prior code", "perplexity posterior", "perplexity prior"], rows)
    first = res.seeds[0] if res.seeds else 0
    hists = {}
    for loss in LOSSES:
        rs = [r for r in res.runs(f"{loss}-lpc-hint") if r["seed"] == first]
        if rs and "codes" in rs[0]:
            hists[f"LPC-{METHOD_LABEL[loss]} posterior (seed {first})"] = np.array(rs[0]["codes"]["posterior_hist"])
            hists[f"LPC-{METHOD_LABEL[loss]} prior (seed {first})"] = np.array(rs[0]["codes"]["prior_hist"])
    if hists:
        plots.plot_code_usage(hists, plot_dir / "code_usage.png")
        L += ["![code usage](plots/code_usage.png)", ""]
    method_used = None
    for loss in LOSSES:
        rs = [r for r in res.runs(f"{loss}-lpc-hint") if r["seed"] == first]
        if not rs:
            continue
        lat_path = run_dir(out_dir, {"name": rs[0]["name"], "seed": first}) / "latents.npz"
        if not lat_path.exists():
            continue
        lat = np.load(lat_path)
        n = lat["source"].shape[0]
        pick = np.sort(np.random.default_rng(0).permutation(n)[:PROJECTION_POINTS])
        panels = {}
        for side in ("posterior", "prior"):
            z = lat[f"z_{side}"][pick].astype(np.float64)
            if z.shape[0] < 2:
                continue
            xy, method_used = analysis.project_2d(z, seed=0)
            panels[f"z from the {side} (NMI {rs[0]['codes'][f'{side}_nmi'] or 0:.2f})"] = xy
        if panels:
            fname = f"projection_{loss}.png"
            plots.plot_projection(panels, lat["source"][pick], plot_dir / fname, label_names=names,
                                     title=f"LPC-{METHOD_LABEL[loss]} latents of held-out pairs, coloured by "
                                           f"source ({method_used}, seed {first})")
            L += [f"![{loss} latents](plots/{fname})", ""]
    if method_used:
        L += [f"Projection method: {'t-SNE (scikit-learn)' if method_used == 'tsne' else 'PCA'} of at most "
              f"{PROJECTION_POINTS} held-out pairs; posterior latent = expected embedding of the posterior, "
              "prior latent = the inference z.", ""]

    # ------------------------------------------------------------------ diagnostics
    L += ["## Latent diagnostics", "",
          "Does z move the policy, and does it carry the label? Held-out accuracy with z from the prior (what "
          "evaluation uses), from the posterior (expected embedding, the labelled pair), from the posterior fed "
          "the pair swapped, and with z = 0; the spread of the accuracy over the K single codes (z = E[k]); "
          "RMS(z) / RMS(hidden states) at the scored positions; and, over the last 10% of training, the batch "
          "accuracy with z from the posterior's sample and from the prior. A posterior accuracy above the Bayes "
          "ceiling, or a swapped accuracy far below 0.5, means the posterior passes the label through z.", ""]
    rows = []
    # the LPC runs of the codes table, then the KL sweep
    diag_conds = lpc_conds[:-1] + [(f"dpo-lpc-kl{fmt_float(w)}", f"LPC-DPO, KL weight {w:g}")
                                   for w in KL_SWEEP if w != 1.0] + lpc_conds[-1:]

    def diag(key):
        return lambda r: r["diagnostics"][key]

    def code_spread(r):
        codes = r["diagnostics"]["accuracy_by_code"]
        return max(codes) - min(codes)

    for cond, label in diag_conds:
        rows.append([label] + [ms(res.values(cond, f)) for f in (
            accuracy, diag("accuracy_posterior"), diag("accuracy_posterior_swapped"), diag("accuracy_zero_z"),
            code_spread, diag("z_rms_ratio"), lambda r: r["train"]["lpc/posterior_accuracy"],
            lambda r: r["train"]["lpc/prior_accuracy"])])
    L += table(["run", "prior z", "posterior z", "posterior z, swapped", "z = 0", "single-code spread (max − min)",
                "RMS z / RMS h", "train: posterior z", "train: prior z"], rows)

    # ------------------------------------------------------------------ K sweep
    L += ["## Codebook size sweep", "", "LPC-DPO, hints on; K = 1 is a single learned offset (the plain "
          "baseline with LPC's parameters).", ""]
    rows = []
    for k in K_SWEEP:
        cond = f"dpo-lpc-k{k}"
        rows.append([str(k), ms(res.values(cond, accuracy)), ci(res.paired_delta(cond, "dpo-plain-hint", accuracy)),
                     ms(res.values(cond, lambda r: r["codes"]["posterior_nmi"])),
                     ms(res.values(cond, lambda r: r["codes"]["posterior_perplexity"]), 2)])
    L += table(["K", "accuracy", "Δ vs DPO", "NMI posterior", "perplexity posterior"], rows)
    conds = [f"dpo-lpc-k{k}" for k in K_SWEEP]
    plots.plot_lines(list(range(len(K_SWEEP))), {
        "accuracy": res.mean_std_lists(conds, accuracy),
        "NMI posterior code": res.mean_std_lists(conds, lambda r: r["codes"]["posterior_nmi"]),
        "NMI prior code": res.mean_std_lists(conds, lambda r: r["codes"]["prior_nmi"])},
        plot_dir / "k_sweep.png", xlabel="codebook size K", ylabel="value", title="LPC-DPO: codebook size",
        xticklabels=[str(k) for k in K_SWEEP])
    L += ["![K sweep](plots/k_sweep.png)", ""]

    # ------------------------------------------------------------------ KL sweep
    L += ["## KL weight sweep", "", "LPC-DPO, hints on, K = 32.", ""]
    rows = []
    for w in KL_SWEEP:
        cond = f"dpo-lpc-kl{fmt_float(w)}"
        rows.append([f"{w:g}", ms(res.values(cond, accuracy)), ci(res.paired_delta(cond, "dpo-plain-hint", accuracy)),
                     ms(res.values(cond, lambda r: r["codes"]["posterior_nmi"])),
                     ms(res.values(cond, lambda r: r["codes"]["prior_nmi"]))])
    L += table(["KL weight", "accuracy", "Δ vs DPO", "NMI posterior", "NMI prior"], rows)
    conds = [f"dpo-lpc-kl{fmt_float(w)}" for w in KL_SWEEP]
    plots.plot_lines(list(KL_SWEEP), {
        "accuracy": res.mean_std_lists(conds, accuracy),
        "NMI posterior code": res.mean_std_lists(conds, lambda r: r["codes"]["posterior_nmi"]),
        "NMI prior code": res.mean_std_lists(conds, lambda r: r["codes"]["prior_nmi"])},
        plot_dir / "kl_sweep.png", xlabel="KL weight", ylabel="value", title="LPC-DPO: KL weight", logx=True,
        xticklabels=[f"{w:g}" for w in KL_SWEEP])
    L += ["![KL sweep](plots/kl_sweep.png)", ""]

    L += runs_table(results, alias, res.seeds, study["seeds"])
    return write_text_atomic(out_dir / "report.md", "\n".join(L))


def _mean_std_lists_src(res: Results, cond: str, names: Sequence[str]) -> tuple[list[float], list[float]]:
    pairs = [analysis.mean_std(res.values(cond, lambda r, n=n: r["by_source"][n]["accuracy"])) for n in names]
    return [m for m, _ in pairs], [0.0 if math.isnan(s) else s for _, s in pairs]




PAPER_STUDY = Study(name="paper", full=FULL, quick=QUICK, full_seeds=FULL_SEEDS, quick_seeds=QUICK_SEEDS,
                    conditions=conditions, analyse=analyse, write_report=write_report, real_data=True, prepare=prepare,
                    run_overrides=run_overrides)
