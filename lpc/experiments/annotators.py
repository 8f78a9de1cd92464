"""``python -m lpc.experiments annotators``: what the latent buys on data where it is the point: six annotators with
conflicting tastes and nothing about them in the prompt (``lpc.data.synthetic``'s ``annotators`` preset). A per-pair
latent cannot know the annotator from the prompt; its codes can stand for annotators' preferences, so that a few
labelled pairs of an annotator pick the code that scores their other pairs best. Arms: ``conditions``; metrics:
``analyse``; setup and results: ``docs/results.md``, "Study A: six annotators, nothing about them in the prompt"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import analysis, plots
from ..config import LPCConfig, SyntheticConfig
from ..data import batches, synthetic, to_device
from ..evaluate import evaluate
from ..io import write_text_atomic
from ..model import LPCModel
from .common import Results, RunContext, Study, accuracy, bootstrap_ci, ci, fmt_duration, ms, runs_table, table

SHOTS = (1, 4, 16)
FEW_SHOT_DRAWS = 20
RANDOM_CODEBOOK = dict(num_codes=32, codebook_scale=1.0)  # the plain arms' few-shot control: LPC's defaults
FLIP = {"flip_fraction": 0.5, "flip_marker": False}
# the primary endpoint, named before the full run: the few-shot gain acc(16) - acc(0) of LPC-DPO (K = 32, defaults)
# minus DPO's (with the random codebook), paired per seed: mean, Student-t 95% interval and percentile bootstrap
PRIMARY = ("lpc-k32", "dpo")

FULL = dict(synthetic="annotators", steps=300, batch_size=32, num_train=8192, eval_size=4096, warmup_steps=30)
QUICK = dict(synthetic="annotators", steps=30, batch_size=16, num_train=256, eval_size=192, warmup_steps=5,
             hidden_size=32, num_layers=1, num_heads=2, eval_batch_size=96)
FULL_SEEDS, QUICK_SEEDS = 10, 2

SECTIONS = ("## Setup", "## Primary endpoint", "## Prompt-only and few-shot accuracy", "## Leak diagnostics",
            "## Random-label control", "## Codes and annotators", "## Runs")


def conditions(real_data: bool = False) -> dict[str, dict]:
    """Every arm of the study -> its ``TrainConfig`` overrides (the base sets ``synthetic="annotators"``)."""
    if real_data:
        raise ValueError("the annotators study runs on its synthetic data only")
    return {
        "dpo": {"lpc": False},
        "dpo-annotator-in-prompt": {"lpc": False, "hint_prob": 1.0},
        "lpc-k1": {"num_codes": 1},
        "lpc-k8": {"num_codes": 8},
        "lpc-k32": {},
        "lpc-kl0p05": {"kl_weight": 0.05},
        "lpc-free-bits": {"free_bits": 0.35},
        "lpc-kl-warmup": {"kl_warmup_steps": FULL["steps"] // 2},
        "lpc-no-prior-mix": {"prior_mix": "none"},
        "lpc-scale0p3": {"codebook_scale": 0.3},
        "lpc-scale3": {"codebook_scale": 3.0},
        "random-labels-dpo": {"lpc": False, **FLIP},
        "random-labels-lpc": dict(FLIP),
        "random-labels-lpc-kl0p05": {"kl_weight": 0.05, **FLIP},
    }


LABELS = {"dpo": "DPO", "dpo-annotator-in-prompt": "DPO, annotator in the prompt (upper bound)",
          "lpc-k1": "LPC-DPO, K = 1", "lpc-k8": "LPC-DPO, K = 8", "lpc-k32": "LPC-DPO, K = 32 (defaults)",
          "lpc-kl0p05": "LPC-DPO, KL weight 0.05 (paper)", "lpc-free-bits": "LPC-DPO, free bits 0.35 nats",
          "lpc-kl-warmup": "LPC-DPO, KL warm-up over half the steps",
          "lpc-no-prior-mix": "LPC-DPO, no prior mix (z from the posterior throughout)",
          "lpc-scale0p3": "LPC-DPO, codebook scale 0.3",
          "lpc-scale3": "LPC-DPO, codebook scale 3", "random-labels-dpo": "DPO, random labels",
          "random-labels-lpc": "LPC-DPO, random labels", "random-labels-lpc-kl0p05": "LPC-DPO KL 0.05, random labels"}
MAIN_ARMS = ("dpo", "dpo-annotator-in-prompt", "lpc-k1", "lpc-k8", "lpc-k32", "lpc-kl0p05", "lpc-free-bits",
             "lpc-kl-warmup", "lpc-no-prior-mix", "lpc-scale0p3", "lpc-scale3")
LPC_ARMS = tuple(a for a in MAIN_ARMS if a.startswith("lpc"))


# --------------------------------------------------------------------------------------------- one run
@torch.no_grad()
def _random_codebook_margins(ctx: RunContext) -> np.ndarray:
    """``[N, K]`` margins of a plain policy's held-out pairs with z = E[k] for a random codebook of LPC's default
    size and scale (seeded, calibrated on the first held-out batch like LPC's on its first training batch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.cfg.seed + 1)
        wrapped = LPCModel(ctx.model.policy, LPCConfig(**RANDOM_CODEBOOK), backend=ctx.cfg.backend)
    device = next(ctx.model.parameters()).device
    wrapped.to(device).eval()
    wrapped.calibrate(to_device(next(batches(ctx.eval_set, ctx.cfg.eval_batch_size, ctx.collator)), device))
    _, arrays = evaluate(wrapped, ctx.ref_model, ctx.eval_set, ctx.collator, ctx.cfg.loss_config(),
                         batch_size=ctx.cfg.eval_batch_size, return_arrays=True, diagnostics=True)
    return arrays["margin_by_code"]


def analyse(ctx: RunContext) -> dict:
    """The study's metrics of one run's held-out pairs:

    * prompt-only accuracy ``acc(0)``: z from the prior, against the exact prompt-only ceiling;
    * few-shot accuracy ``acc(n)``, n in ``SHOTS``: an annotator's code is the one under which n of their labelled
      pairs are most likely (``analysis.few_shot_accuracy``), and their other pairs are scored with it. A plain
      DPO policy has no codes: it uses a random codebook of LPC's default size and scale (calibrated like LPC's),
      so that picking the best of K codes on a few pairs is credited to both arms alike;
    * the code x annotator accuracy matrix, NMI and ARI between the posterior's argmax code and the annotator,
      per-annotator accuracy.
    """
    arrays = ctx.arrays
    src = arrays["source"]
    lpc = ctx.model.lpc is not None
    by_code = arrays["margin_by_code"] if lpc else _random_codebook_margins(ctx)
    log_prior = None
    if lpc:  # the prior's mean code distribution over the held-out prompts (uniform when it knows nothing)
        log_prior = np.log(np.clip(arrays["prior_probs"].mean(0), 1e-30, None))
    few = {str(n): analysis.few_shot_accuracy(by_code, src, n, draws=FEW_SHOT_DRAWS, seed=ctx.cfg.seed,
                                              log_prior=log_prior) for n in SHOTS}
    few["0"] = ctx.result["accuracy"]
    annotators = sorted(set(src.tolist()) - {-1})
    matrix = [[float((by_code[src == a, k] > 0).mean()) for a in annotators] for k in range(by_code.shape[1])]
    out = {"few_shot": few, "code_annotator_accuracy": matrix, "codes_from": "lpc" if lpc else "random codebook",
           "accuracy_by_annotator": {str(a): float((arrays["margin"][src == a] > 0).mean()) for a in annotators}}
    if lpc:
        out["nmi_posterior"] = analysis.normalized_mutual_information(arrays["posterior_code"], src)
        out["ari_posterior"] = analysis.adjusted_rand_index(arrays["posterior_code"], src)
        out["nmi_prior"] = analysis.normalized_mutual_information(arrays["prior_code"], src)
    return out


# ---------------------------------------------------------------------------------------------- report
def _few(n):
    return lambda r: r["few_shot"][str(n)]


def _gain(r):
    return r["few_shot"]["16"] - r["few_shot"]["0"]


def _diag(key):
    return lambda r: r["diagnostics"][key]


def _train(key):
    return lambda r: r["train"][key]


def _spread(r):
    codes = r["code_annotator_accuracy"]
    return float(np.mean([max(col) - min(col) for col in zip(*codes)]))


def write_report(out_dir: Path, study: dict, results: list, alias: dict) -> Path:
    """Rebuild ``report.md`` and the plots in ``out_dir`` from its results; returns the path."""
    out_dir = Path(out_dir)
    base = study["base"]
    res = Results(results, alias)
    plot_dir = out_dir / "plots"
    data_cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry")
    ceilings, log_liks = synthetic.annotator_ceilings(data_cfg), synthetic.annotator_log_likelihoods(data_cfg)
    wall = sum(r.get("wall_s") or 0.0 for r in results)
    lpc_arm, dpo_arm = PRIMARY
    L = ["# What the latent buys: six annotators, nothing about them in the prompt", "",
         "## Setup", "",
         f"- command: `{study.get('command') or 'python -m lpc.experiments annotators'}`",
         "- data: `--synthetic annotators` (lpc.data.synthetic): six annotators, two conflicting answer factors "
         "each plus a shared dislike of typos; uniform topics; Bradley-Terry labels (temperature 0.5)",
         f"- per run: {base['steps']} steps x {base['batch_size']} pairs, {base['num_train']} training pairs, "
         f"{base['eval_size']} held-out pairs; model: tiny random-init Llama; other settings are `TrainConfig` "
         "defaults (beta 0.1, K 32, KL weight 1, codebook scale 1, prior mix linear)",
         f"- seeds: {res.seeds} ({len(results)} runs finished; sum of run wall times {fmt_duration(wall)})",
         "- mean ± std over seeds; differences paired per seed, as mean [Student-t 95% interval]",
         f"- exact ceilings: knowing the annotator {ceilings['with_annotator']:.3f} (per annotator "
         + ", ".join(f"{k} {v:.3f}" for k, v in ceilings["per_annotator"].items())
         + f"); not knowing them (prompt-only) {ceilings['prompt_only']:.3f}",
         "- exact expected log-likelihood of a label, nats per pair: annotator known {with_annotator:.3f}; the true "
         "mixture, annotator unknown, {mixture:.3f}; the best single linear reward {best_linear:.3f} "
         "(`synthetic.annotator_log_likelihoods`). The mixture is the best any model of a pair alone can do, so "
         "a latent inferred from one pair adds nothing a shared reward could not learn (beyond a linear one, "
         "{gap:.3f} nats); what tells annotators apart lives in several pairs of the same annotator"
         .format(gap=log_liks["mixture"] - log_liks["best_linear"], **log_liks),
         f"- few-shot: {FEW_SHOT_DRAWS} draws of n support pairs per annotator, the rest scored with the code "
         "that makes the support labels most likely; plain DPO arms use a random codebook (K 32, scale 1) for "
         "this, so that picking the best of K codes on a few pairs is not credited to LPC alone", ""]

    # ------------------------------------------------------------------ primary endpoint
    gains = res.paired_delta(lpc_arm, dpo_arm, _gain)
    L += ["## Primary endpoint", "",
          f"Named before the full run: the few-shot gain acc(16) − acc(0) of {LABELS[lpc_arm]} minus that of "
          f"{LABELS[dpo_arm]} (random codebook), paired per seed.", "",
          f"**{ci(gains)}** (Student-t 95% interval) over {len(gains)} seeds; percentile-bootstrap 95% interval "
          "[{1:+.3f}, {2:+.3f}]".format(*bootstrap_ci(gains)) + f" (LPC-DPO gain {ms(res.values(lpc_arm, _gain))}, "
          f"DPO gain {ms(res.values(dpo_arm, _gain))}).", ""]

    # ------------------------------------------------------------------ accuracy
    L += ["## Prompt-only and few-shot accuracy", "",
          "acc(0): z from the prior (for DPO its plain accuracy); acc(n): the code picked from n labelled pairs of "
          "the annotator. Δ acc(0) and Δ acc(16) against DPO, paired per seed.", ""]
    rows = []
    for arm in MAIN_ARMS:
        rows.append([LABELS[arm]] + [ms(res.values(arm, _few(n))) for n in (0, *SHOTS)]
                    + [ci(res.paired_delta(arm, "dpo", _few(0))) if arm != "dpo" else "",
                       ci(res.paired_delta(arm, "dpo", _few(16))) if arm != "dpo" else ""])
    L += table(["arm", "acc(0)", "acc(1)", "acc(4)", "acc(16)", "Δ acc(0) vs DPO", "Δ acc(16) vs DPO"], rows)
    shots = [0, *SHOTS]
    series = {}
    for arm in ("dpo", "lpc-k32", "lpc-kl0p05", "lpc-k8", "dpo-annotator-in-prompt"):
        means, stds = zip(*(analysis.mean_std(res.values(arm, _few(n))) for n in shots))
        series[LABELS[arm]] = ([float(m) for m in means], [0.0 if np.isnan(s) else float(s) for s in stds])
    plots.plot_lines(list(range(len(shots))), series, plot_dir / "few_shot.png", xlabel="labelled pairs of the "
                     "annotator (n)", ylabel="held-out accuracy", title="Few-shot accuracy (mean ± std over seeds)",
                     xticklabels=[str(n) for n in shots], hlines={"prompt-only ceiling": ceilings["prompt_only"],
                                                                  "annotator known": ceilings["with_annotator"]})
    L += ["![few-shot accuracy](plots/few_shot.png)", ""]

    # ------------------------------------------------------------------ leak
    L += ["## Leak diagnostics", "",
          "Held-out accuracy with z from the prior, the posterior (the labelled pair), the posterior fed the pair "
          "swapped, and z = 0; RMS(z) / RMS(h) at the scored positions (z from the prior); over the last 10% of "
          "training, the batch accuracy with the posterior's sample and with the prior's z, and the KL. A "
          f"posterior accuracy above the annotator-known ceiling ({ceilings['with_annotator']:.3f}) or a swapped "
          "accuracy far below 0.5 means z carries the label.", ""]
    rows = []
    for arm in LPC_ARMS:
        rows.append([LABELS[arm]] + [ms(res.values(arm, f)) for f in (
            accuracy, _diag("accuracy_posterior"), _diag("accuracy_posterior_swapped"), _diag("accuracy_zero_z"),
            _diag("z_rms_ratio"), _train("lpc/posterior_accuracy"), _train("lpc/prior_accuracy"),
            _train("lpc/kl"))])
    L += table(["arm", "prior z", "posterior z", "posterior z, swapped", "z = 0", "RMS z / RMS h",
                "train: posterior z", "train: prior z", "train: KL"], rows)

    # ------------------------------------------------------------------ random labels
    L += ["## Random-label control", "",
          "Half of the training labels flipped at random, without a marker: there is nothing to learn, so any "
          "training accuracy above 0.5 is fitted noise, and a held-out posterior accuracy above 0.5 is the label "
          "read off the pair.", ""]
    rows = []
    for arm in ("random-labels-dpo", "random-labels-lpc", "random-labels-lpc-kl0p05"):
        lpc = arm != "random-labels-dpo"
        rows.append([LABELS[arm], ms(res.values(arm, _train("rewards/accuracies"))),
                     ms(res.values(arm, _train("lpc/prior_accuracy"))) if lpc else "",
                     ms(res.values(arm, accuracy)),
                     ms(res.values(arm, _diag("accuracy_posterior"))) if lpc else "",
                     ms(res.values(arm, _diag("accuracy_posterior_swapped"))) if lpc else ""])
    L += table(["arm", "train accuracy (training z)", "train accuracy, prior z", "held-out, prior z",
                "held-out, posterior z", "held-out, swapped"], rows)

    # ------------------------------------------------------------------ codes
    L += ["## Codes and annotators", "",
          "NMI and ARI between the posterior's argmax code and the annotator (0: unrelated); the spread of the "
          "single codes' accuracy within an annotator (max − min over codes, mean over annotators): how much the "
          "codes move the margins.", ""]
    rows = []
    for arm in LPC_ARMS + ("dpo",):
        rows.append([LABELS[arm], ms(res.values(arm, lambda r: r.get("nmi_posterior"))),
                     ms(res.values(arm, lambda r: r.get("ari_posterior"))),
                     ms(res.values(arm, lambda r: r.get("nmi_prior"))), ms(res.values(arm, _spread)),
                     ms(res.values(arm, lambda r: max(r["diagnostics"]["accuracy_by_code"])
                                    - min(r["diagnostics"]["accuracy_by_code"]) if r["diagnostics"] else None))])
    L += table(["arm", "NMI posterior code", "ARI posterior code", "NMI prior code",
                "code spread within an annotator", "code spread, all pairs"], rows)
    first = res.runs(lpc_arm)
    if first:
        r = first[0]
        names = r.get("source_names") or [str(i) for i in range(len(r["code_annotator_accuracy"][0]))]
        plots.plot_heatmap(np.array(r["code_annotator_accuracy"]), plot_dir / "code_annotator_accuracy.png",
                           xlabels=list(names), ylabel="code", title=f"{LABELS[lpc_arm]}: held-out accuracy of each "
                           f"code on each annotator's pairs (seed {r['seed']})")
        L += ["![code x annotator accuracy](plots/code_annotator_accuracy.png)", ""]

    L += runs_table(results, alias, res.seeds, study["seeds"])
    return write_text_atomic(out_dir / "report.md", "\n".join(L))


ANNOTATORS_STUDY = Study(name="annotators", full=FULL, quick=QUICK, full_seeds=FULL_SEEDS, quick_seeds=QUICK_SEEDS,
                         conditions=conditions, analyse=analyse, write_report=write_report)
