"""``python -m lpc.experiments paper``: the paper's claims (``docs/design.md`` section 1), tested in miniature.

Gong et al. (ICML 2025) claim that LPC improves DPO, SimPO and IPO; that it is robust to flipped labels
(50% of pairs flipped, ``[FLIP]`` appended to their prompts); and that its latent codes separate the
preference sources. This study trains, for several seeds, on the synthetic multi-source data of
``lpc.data.synthetic`` (known ground truth: four sources, conflicting weights on observable answer attributes):

* methods: DPO / SimPO / IPO, each plain and with LPC, with source hints in half of the prompts
  (``hint_prob=0.5``, the trainer's default) and without (``hint_prob=0``: only the topic hints at the source);
* label noise (DPO vs LPC-DPO, hints on): the paper's protocol, 50% of training pairs flipped with the
  ``[flip]`` marker, and unmarked flips at 10%, 20% and 40% (the 0% point is the clean run above);
* codebook size K in {1, 8, 32, 128} (LPC-DPO; K = 1 is a constant learned offset: the plain baseline
  with the same parameters) and KL weight in {0.01, 0.05, 0.1} (K = 32 and 0.05 are the defaults, shared
  with the method runs).

Every run goes through ``lpc.train.train(TrainConfig(...))`` (``threads=1``, ``progress=False``), then is
reloaded from its checkpoint for one inference pass over the held-out pairs (``lpc.analysis.collect_pairs``):
accuracy and reward margin per source, the argmax posterior / prior codes (NMI with the source, usage
histogram, perplexity) and the latents for the 2-D projections. Each run writes ``runs/<run>/result.json``
(temp file + rename) when it finishes; a restarted study skips runs whose result exists, so a killed study
continues where it stopped. ``report.md`` and the plots are rebuilt from the result files at the end (or
with ``python -m lpc.experiments report DIR``).

Sizing of the full run (measured on this 2-core machine, idle, ``threads=1``): the default training
(800 steps of 32 pairs, 16384 synthetic pairs, 512 held-out) took 56 s, i.e. ~65 ms per DPO step (two
backbone passes: policy and reference) plus ~2 s of data generation and tokenisation; SimPO has no
reference pass (~45 ms per step). The grid has 25 distinct runs per seed (12 method runs, 8 noise runs,
3 more K values, 2 more KL weights; 4 of the 25 are SimPO). At 600 steps (the running training accuracy
of the default run plateaus by step ~600), 16384 training pairs and 1024 held-out pairs, a DPO/IPO run is
~39 s of steps + ~2 s data + ~4 s evaluation, saving, reloading and the analysis pass = ~45 s, a SimPO run
~33 s: per seed 21 x 45 + 4 x 33 = ~1080 s of one core. 3 seeds = ~3240 core-s, over 2 workers = ~27 min,
plus ~1 min of worker start-up and ~1 min for the report (6 t-SNE projections of <= 800 points): about
29 minutes on 2 idle cores, ~32 with the slowdown of two processes sharing the caches, under the 35-minute
target. ``--quick`` (tiny model, 30 steps, 256 pairs, 2 seeds) produces every artifact in about a minute.

``--model`` / ``--dataset`` run the same grid on a real model and preference data: the dataset is copied
into the study directory with string sources (UltraFeedback's ``source`` column) mapped to integers, the
no-hint runs are dropped (hints are a property of the synthetic generator), and label noise is injected
into the training part of the copy with ``lpc.analysis.flip_pairs`` (marker ``[FLIP]``, as in the paper).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import analysis, plots
from .builders import build_data, build_policy, initial_reference, split_indices
from .cli import HelpFormatter
from .config import TrainConfig
from .data import PreferenceCollator, assign_source_ids, load_jsonl, load_preference_rows
from .io import atomic_file, write_json_atomic, write_text_atomic
from .model import LPCModel
from .runtime import quiet_transformers
from .train import train

LOSSES = ("dpo", "simpo", "ipo")
METHOD_LABEL = {"dpo": "DPO", "simpo": "SimPO", "ipo": "IPO"}
NOISE_UNMARKED = (0.1, 0.2, 0.4)
NOISE_MARKED = 0.5
K_SWEEP = (1, 8, 32, 128)
KL_SWEEP = (0.01, 0.05, 0.1)
HINT_ON, HINT_OFF = 0.5, 0.0
REAL_FLIP_MARKER = "[FLIP]"  # the paper's marker, for real tokenizers (the synthetic one knows "[flip]")
PROJECTION_POINTS = 800  # t-SNE cost grows ~N^2 at this size: a subsample keeps the report under a minute

# the sections of report.md, in order (tests check that each is present)
SECTIONS = ("## Setup", "## Accuracy by method", "## Accuracy and margin by source", "## Label noise",
            "## Latent codes", "## Codebook size sweep", "## KL weight sweep", "## Runs")

FULL = dict(steps=600, batch_size=32, num_train=16384, eval_size=1024, warmup_steps=30)
QUICK = dict(steps=30, batch_size=16, num_train=256, eval_size=96, warmup_steps=5, hidden_size=32,
             num_layers=1, num_heads=2)
FULL_SEEDS, QUICK_SEEDS = 3, 2


# ---------------------------------------------------------------------------------------------- the grid
def _fmt_float(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def conditions(real_data: bool = False) -> dict[str, dict]:
    """Every named condition of the study -> its ``TrainConfig`` overrides (plus ``_flip*`` keys for
    label noise on a real dataset, which the runner turns into a prepared copy of the data).

    Several names share a configuration (e.g. ``dpo-lpc-hint``, ``dpo-lpc-k32``, ``dpo-lpc-kl0p05`` and
    ``dpo-lpc-flip0``); ``plan`` runs each distinct configuration once.
    """
    hint = {} if real_data else {"hint_prob": HINT_ON}
    out: dict[str, dict] = {}
    for loss in LOSSES:
        for lpc in (False, True):
            tag = f"{loss}-{'lpc' if lpc else 'plain'}"
            out[f"{tag}-hint"] = {"loss": loss, "lpc": lpc, **hint}
            if not real_data:
                out[f"{tag}-nohint"] = {"loss": loss, "lpc": lpc, "hint_prob": HINT_OFF}
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
        out[f"dpo-lpc-kl{_fmt_float(w)}"] = {"loss": "dpo", "lpc": True, **hint, "kl_weight": w}
    return out


def _canonical(overrides: dict, defaults: dict) -> str:
    """A key equal for overrides that configure the same run (values equal to the base are dropped)."""
    eff = {k: v for k, v in overrides.items() if defaults.get(k, object()) != v}
    if not eff.get("lpc", defaults.get("lpc", True)):  # LPC-only fields do not change a plain run
        for k in ("num_codes", "kl_weight"):
            eff.pop(k, None)
    if not eff.get("flip_fraction", defaults.get("flip_fraction", 0.0)):
        eff.pop("flip_marker", None)  # the marker means nothing without flips
    return json.dumps(eff, sort_keys=True)


def plan(seeds: Sequence[int], base: dict, real_data: bool = False) -> tuple[list[dict], dict[str, str]]:
    """``(runs, alias)``: the distinct runs (``{"name", "seed", "overrides"}``; ``name-s<seed>`` is the run
    directory) and ``alias[condition] = name`` of the run that computes it."""
    defaults = {**TrainConfig().to_dict(), **base}
    first: dict[str, str] = {}
    alias: dict[str, str] = {}
    for cond, ov in conditions(real_data).items():
        key = _canonical(ov, defaults)
        first.setdefault(key, cond)
        alias[cond] = first[key]
    conds = conditions(real_data)
    names = list(dict.fromkeys(alias.values()))
    runs = [{"name": n, "seed": s, "overrides": conds[n]} for s in seeds for n in names]
    return runs, alias


def run_dir(out_dir: Path, run: dict) -> Path:
    return out_dir / "runs" / f"{run['name']}-s{run['seed']}"


# ------------------------------------------------------------------------------------------- one run
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


def _noisy_real_dataset(clean: Path, out_dir: Path, fraction: float, marked: bool, eval_size: int,
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


def run_one(run: dict, out_dir: str, base: dict) -> dict:
    """Train one run, analyse its held-out pairs and write ``result.json``; returns the result.

    Runs in a worker process: everything it needs comes in as plain data, everything it produces goes to
    disk (``result.json`` last, so its presence means the run is complete).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    rdir = run_dir(out, run)
    base = dict(base)
    real_names = base.pop("_source_names", None)  # not a TrainConfig field
    ov = dict(run["overrides"])
    if "_flip_fraction" in ov:  # label noise on a real dataset: train on a flipped copy
        frac, marked = ov.pop("_flip_fraction"), ov.pop("_flip_marker")
        ov["dataset"] = str(_noisy_real_dataset(Path(base["dataset"]), out, frac, marked,
                                                base.get("eval_size", TrainConfig().eval_size), run["seed"]))
    cfg = TrainConfig(**{**base, **ov, "seed": run["seed"], "output_dir": str(rdir / "train"), "threads": 1,
                         "progress": False})
    summary = train(cfg)

    # reload the checkpoint (what a user of the study would load) and rebuild what evaluation needs
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = LPCModel.from_pretrained(summary["checkpoint"], backend=cfg.backend)
    loss_cfg = cfg.loss_config()
    policy, tokenizer = build_policy(cfg)  # the initial policy, seeded: identical to the trainer's reference
    ref_model = initial_reference(cfg, policy) if loss_cfg.needs_reference else None
    del policy
    eval_cfg = dataclasses.replace(cfg, num_train=0)  # held-out pairs do not depend on num_train
    _, eval_set, source_names, _ = build_data(eval_cfg, tokenizer)
    if cfg.dataset is not None:
        source_names = real_names or source_names
        clean = load_jsonl(base["dataset"])
        eval_idx, _ = split_indices(len(clean), cfg.eval_size, cfg.seed)
        expect = [(clean[i]["prompt"], clean[i]["chosen"]) for i in eval_idx]
        if [(r["prompt"], r["chosen"]) for r in eval_set.rows] != expect:
            raise RuntimeError("lpc.builders.build_data no longer splits --dataset files as split_indices assumes: "
                               "held-out rows could carry injected label noise")
    collator = PreferenceCollator(tokenizer.pad_token_id)
    pairs = analysis.collect_pairs(model, eval_set, collator, cfg.eval_batch_size, ref_model=ref_model,
                                   loss_cfg=loss_cfg)

    ev = summary["eval"]
    src, correct, margin = pairs["source"], pairs["correct"], pairs["margin"]
    result = {
        "name": run["name"], "seed": run["seed"], "overrides": run["overrides"], "config": cfg.to_dict(),
        "wall_s": None, "train_wall_s": summary["wall_s"], "num_pairs": int(src.size),
        "accuracy": float(correct.mean()), "reward_margin": float(margin.mean()),
        "trainer_accuracy": ev.get("accuracy"), "bayes_accuracy": ev.get("bayes_accuracy"),
        "by_source": {},
    }
    # the trainer's own evaluation must agree with this pass (same model, same z from the prior)
    result["accuracy_mismatch"] = abs(result["accuracy"] - ev["accuracy"]) if "accuracy" in ev else None
    for s in sorted(set(src.tolist()) - {-1}):
        sel = src == s
        name = source_names[s] if source_names is not None and s < len(source_names) else str(s)
        result["by_source"][name] = {"accuracy": float(correct[sel].mean()), "margin": float(margin[sel].mean()),
                                     "n": int(sel.sum())}
    if model.lpc is not None:
        k = model.lpc.num_codes
        codes = {}
        for side in ("posterior", "prior"):
            hist = analysis.code_histogram(pairs[f"{side}_code"], k)
            codes[f"{side}_hist"] = hist.tolist()
            codes[f"{side}_perplexity"] = analysis.perplexity(hist / hist.sum()) if hist.sum() else None
            codes[f"{side}_nmi"] = (analysis.normalized_mutual_information(pairs[f"{side}_code"], src)
                                    if src.size and (src >= 0).all() else None)
        codes["num_codes"] = k
        result["codes"] = codes
        _save_npz_atomic(rdir / "latents.npz", z_prior=pairs["z_prior"].astype(np.float16),
                         z_posterior=pairs["z_posterior"].astype(np.float16), source=src,
                         prior_code=pairs["prior_code"], posterior_code=pairs["posterior_code"])
    result["source_names"] = list(source_names) if source_names is not None else None
    result["wall_s"] = time.perf_counter() - t0
    write_json_atomic(rdir / "result.json", result)
    return result


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_safely(run: dict, out_dir: str, base: dict) -> dict:
    """``run_one`` with the error turned into data (a traceback string), so one failure does not stop the
    others and the parent can report it. No per-run "Loading weights" / "Writing model shards" bars: one
    progress line per run is the study's log."""
    try:
        with quiet_transformers():
            return {"ok": True, "result": run_one(run, out_dir, base)}
    except Exception:  # noqa: BLE001 - reported to the parent with its traceback
        return {"ok": False, "error": traceback.format_exc()}


# ---------------------------------------------------------------------------------------------- study
def _fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(out_dir: Path, *, seeds: int, jobs: int, quick: bool, model: Optional[str] = None,
              dataset: Optional[str] = None, steps: Optional[int] = None, command: Optional[str] = None,
              log=None) -> dict:
    """Run (or resume) the whole grid in ``out_dir`` with ``jobs`` worker processes, then write the report.

    ``command`` is recorded in the report; ``log`` (default: print, flushed) gets one line per finished run.
    Returns ``{"runs", "done", "failed", "report", "wall_s", "alias"}``. Raises ``ValueError`` for bad arguments and
    when ``out_dir`` holds a study with a different configuration (resuming it would mix two studies).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if dataset is not None and not Path(dataset).is_file():
        raise ValueError(f"dataset must be an existing JSONL file, got {dataset!r}")
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = dict(QUICK if quick else FULL)
    if steps is not None:
        base["steps"] = steps
    if model is not None:
        base["model"] = model
    real = dataset is not None
    study = {"quick": quick, "seeds": list(range(seeds)), "base": dict(base), "dataset": dataset,
             "command": command}
    study_path = out_dir / "study.json"
    if study_path.exists():
        old = json.loads(study_path.read_text())
        if old.get("base") != study["base"] or old.get("dataset") != dataset or old.get("quick") != quick:
            raise ValueError(f"--output-dir {out_dir} holds a study with another configuration "
                             f"({old.get('base')}, dataset={old.get('dataset')}); use another --output-dir")
        study["seeds"] = sorted(set(old.get("seeds", [])) | set(study["seeds"]))
        study["command"] = study["command"] or old.get("command")
    if real:
        clean, names = prepare_real_dataset(dataset, out_dir)
        base["dataset"], base["_source_names"] = str(clean), names
    write_json_atomic(study_path, study)

    runs, alias = plan(study["seeds"], {k: v for k, v in base.items() if not k.startswith("_")}, real)
    train_base = {k: v for k, v in base.items() if not k.startswith("_")}
    todo = [r for r in runs if not (run_dir(out_dir, r) / "result.json").exists()]
    log(f"study {out_dir}: {len(runs)} runs ({len(study['seeds'])} seeds), {len(runs) - len(todo)} already done, "
        f"{len(todo)} to run on {jobs} worker process(es)")
    failed: list[str] = []
    durations: list[float] = []
    done = 0

    def finished(run, res):
        nonlocal done
        done += 1
        rid = f"{run['name']}-s{run['seed']}"
        if res["ok"]:
            r = res["result"]
            durations.append(r["wall_s"])
            left = len(todo) - done
            eta = (sum(durations) / len(durations)) * left / min(jobs, max(left, 1)) if left else 0.0
            log(f"[{done}/{len(todo)}] {rid}: accuracy {r['accuracy']:.3f} in {r['wall_s']:.0f}s; elapsed "
                f"{_fmt_duration(time.perf_counter() - t0)}, ETA {_fmt_duration(eta)}")
        else:
            failed.append(rid)
            log(f"[{done}/{len(todo)}] {rid}: FAILED\n{res['error']}")

    if jobs == 1 or len(todo) <= 1:
        for run in todo:
            finished(run, _run_safely(run, str(out_dir), payload_for(train_base, base)))
    else:
        # spawn (not fork): a forked child would inherit the parent's torch thread pools; one thread per
        # worker, since two single-threaded runs use 2 cores far better than one run with 2 threads
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                                 initializer=_init_worker) as ex:
            pending = {ex.submit(_run_safely, r, str(out_dir), payload_for(train_base, base)): r for r in todo}
            while pending:
                fin, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in fin:
                    finished(pending.pop(fut), fut.result())
    report = write_report(out_dir)
    wall = time.perf_counter() - t0
    log(f"report: {report} (study wall time {_fmt_duration(wall)})"
        + (f"; {len(failed)} run(s) failed: {', '.join(failed)}" if failed else ""))
    return {"runs": len(runs), "done": len(runs) - len(failed), "failed": failed, "report": str(report),
            "wall_s": wall, "alias": alias}


def payload_for(train_base: dict, base: dict) -> dict:
    """What a worker needs: the TrainConfig base plus the real dataset's source names (not a TrainConfig
    field, so ``run_one`` reads and drops it)."""
    return {**train_base, **({"_source_names": base["_source_names"]} if "_source_names" in base else {})}


# --------------------------------------------------------------------------------------------- report
def _load_results(out_dir: Path) -> list[dict]:
    results = []
    for path in sorted((out_dir / "runs").glob("*/result.json")):
        results.append(json.loads(path.read_text()))
    return results


def _ms(values: Sequence[Optional[float]], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    m, s = analysis.mean_std(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


class _Results:
    """Results indexed by condition name (through the plan's aliases) and seed."""

    def __init__(self, results: list[dict], alias: dict[str, str]):
        self.alias = alias
        self.by = {(r["name"], r["seed"]): r for r in results}
        self.seeds = sorted({r["seed"] for r in results})

    def runs(self, cond: str) -> list[dict]:
        name = self.alias.get(cond, cond)
        return [self.by[(name, s)] for s in self.seeds if (name, s) in self.by]

    def values(self, cond: str, fn) -> list[float]:
        out = []
        for r in self.runs(cond):
            try:
                v = fn(r)
            except (KeyError, TypeError):
                v = None
            if v is not None:
                out.append(float(v))
        return out

    def paired_delta(self, a: str, b: str, fn) -> list[float]:
        """``fn(a) - fn(b)`` per seed where both ran (paired over seeds: same data, same init)."""
        na, nb = self.alias.get(a, a), self.alias.get(b, b)
        out = []
        for s in self.seeds:
            if (na, s) in self.by and (nb, s) in self.by:
                out.append(float(fn(self.by[(na, s)])) - float(fn(self.by[(nb, s)])))
        return out


def _acc(r):
    return r["accuracy"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _mean_std_lists(res: _Results, conds: Sequence[str], fn) -> tuple[list[float], list[float]]:
    ms = [analysis.mean_std(res.values(c, fn)) for c in conds]
    return [m for m, _ in ms], [0.0 if math.isnan(s) else s for _, s in ms]


def write_report(out_dir: os.PathLike) -> Path:
    """Rebuild ``report.md`` and the plots in ``out_dir`` from the result files there; returns the path."""
    out_dir = Path(out_dir)
    study = json.loads((out_dir / "study.json").read_text())
    real = study.get("dataset") is not None
    base = study["base"]
    _, alias = plan(study["seeds"], base, real)
    results = _load_results(out_dir)
    res = _Results(results, alias)
    names = next((r["source_names"] for r in results if r.get("source_names")), None) or []
    plot_dir = out_dir / "plots"
    L: list[str] = ["# LPC in miniature: the paper's claims on data with known ground truth", ""]

    # ------------------------------------------------------------------ setup
    # one value per seed: the held-out split depends on the seed and hint_prob only
    bayes = res.values("dpo-plain-hint", lambda r: r.get("bayes_accuracy"))
    wall = sum(r.get("wall_s") or 0.0 for r in results)
    L += ["## Setup", "",
          f"- command: `{study.get('command') or 'python -m lpc.experiments paper'}`",
          f"- data: {'`' + study['dataset'] + '`' if real else 'synthetic (lpc.data.synthetic: 4 sources, 6 attributes)'}"
          f"; model: {'`' + base['model'] + '`' if base.get('model') else 'tiny random-init Llama'}",
          f"- per run: {base['steps']} steps x {base['batch_size']} pairs, {base['num_train']} training pairs"
          f"{' (synthetic)' if not real else ''}, {base['eval_size']} held-out pairs; other settings are "
          "`TrainConfig` defaults (beta 0.1, K 32, KL weight 0.05, SimPO gamma 0.5, lr 3e-3)",
          f"- seeds: {res.seeds} ({len(results)} runs finished; sum of run wall times {_fmt_duration(wall)})",
          "- mean ± std over seeds (sample std); Δ = LPC − plain, paired per seed (same data and init)",
          "- accuracy: held-out pairs whose implicit-reward margin is > 0, z from the prior (LPC)",
          ]
    if bayes:
        L.append(f"- Bayes-optimal accuracy (knows the generator, hint_prob {HINT_ON}): {_ms(bayes)}")
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
                delta = _ms(res.paired_delta(f"{loss}-lpc-{mode}", f"{loss}-plain-{mode}", _acc)) if lpc else ""
                row += [_ms(res.values(cond, _acc)), _ms(res.values(cond, lambda r: r["reward_margin"])), delta]
            rows.append(row)
    L += _table(header, rows)
    groups = [("LPC-" if lpc else "") + METHOD_LABEL[loss] for loss in LOSSES for lpc in (False, True)]
    for mode, label in hint_modes:
        series[label] = _mean_std_lists(res, [f"{loss}-{'lpc' if lpc else 'plain'}-{mode}" for loss in LOSSES
                                              for lpc in (False, True)], _acc)
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
                    row.append(f"{_ms(res.values(cond, lambda r, n=n: r['by_source'][n]['accuracy']))} / "
                               f"{_ms(res.values(cond, lambda r, n=n: r['by_source'][n]['margin']))}")
                rows.append(row)
                if loss == "dpo":
                    src_series[label] = _mean_std_lists_src(res, cond, names)
        L += _table(["method"] + list(names), rows)
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
        rows.append([label, _ms(res.values(a, _acc)), _ms(res.values(b, _acc)),
                     _ms(res.paired_delta(b, a, _acc))])
    L += _table(["training labels", "DPO", "LPC-DPO", "Δ (LPC − DPO)"], rows)
    xs = [0] + [int(f * 100) for f in NOISE_UNMARKED] + [int(NOISE_MARKED * 100)]
    nan = float("nan")
    line_series = {}
    for lpc in (False, True):
        tag = f"dpo-{'lpc' if lpc else 'plain'}"
        label = "LPC-DPO" if lpc else "DPO"
        m, s = _mean_std_lists(res, [f"{tag}-{suf}" for _, suf in noise], _acc)
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
        rows.append([label] + [_ms(res.values(cond, code_stat(f"{side}_nmi"))) for side in ("posterior", "prior")]
                    + [_ms(res.values(cond, code_stat(f"{side}_perplexity")), 2) for side in ("posterior", "prior")])
    L += _table(["run", "NMI posterior code", "NMI prior code", "perplexity posterior", "perplexity prior"], rows)
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

    # ------------------------------------------------------------------ K sweep
    L += ["## Codebook size sweep", "", "LPC-DPO, hints on; K = 1 is a single learned offset (the plain "
          "baseline with LPC's parameters).", ""]
    rows = []
    for k in K_SWEEP:
        cond = f"dpo-lpc-k{k}"
        rows.append([str(k), _ms(res.values(cond, _acc)), _ms(res.paired_delta(cond, "dpo-plain-hint", _acc)),
                     _ms(res.values(cond, lambda r: r["codes"]["posterior_nmi"])),
                     _ms(res.values(cond, lambda r: r["codes"]["posterior_perplexity"]), 2)])
    L += _table(["K", "accuracy", "Δ vs DPO", "NMI posterior", "perplexity posterior"], rows)
    conds = [f"dpo-lpc-k{k}" for k in K_SWEEP]
    plots.plot_lines(list(range(len(K_SWEEP))), {
        "accuracy": _mean_std_lists(res, conds, _acc),
        "NMI posterior code": _mean_std_lists(res, conds, lambda r: r["codes"]["posterior_nmi"]),
        "NMI prior code": _mean_std_lists(res, conds, lambda r: r["codes"]["prior_nmi"])},
        plot_dir / "k_sweep.png", xlabel="codebook size K", ylabel="value", title="LPC-DPO: codebook size",
        xticklabels=[str(k) for k in K_SWEEP])
    L += ["![K sweep](plots/k_sweep.png)", ""]

    # ------------------------------------------------------------------ KL sweep
    L += ["## KL weight sweep", "", "LPC-DPO, hints on, K = 32.", ""]
    rows = []
    for w in KL_SWEEP:
        cond = f"dpo-lpc-kl{_fmt_float(w)}"
        rows.append([f"{w:g}", _ms(res.values(cond, _acc)), _ms(res.paired_delta(cond, "dpo-plain-hint", _acc)),
                     _ms(res.values(cond, lambda r: r["codes"]["posterior_nmi"])),
                     _ms(res.values(cond, lambda r: r["codes"]["prior_nmi"]))])
    L += _table(["KL weight", "accuracy", "Δ vs DPO", "NMI posterior", "NMI prior"], rows)
    conds = [f"dpo-lpc-kl{_fmt_float(w)}" for w in KL_SWEEP]
    plots.plot_lines(list(KL_SWEEP), {
        "accuracy": _mean_std_lists(res, conds, _acc),
        "NMI posterior code": _mean_std_lists(res, conds, lambda r: r["codes"]["posterior_nmi"]),
        "NMI prior code": _mean_std_lists(res, conds, lambda r: r["codes"]["prior_nmi"])},
        plot_dir / "kl_sweep.png", xlabel="KL weight", ylabel="value", title="LPC-DPO: KL weight", logx=True,
        xticklabels=[f"{w:g}" for w in KL_SWEEP])
    L += ["![KL sweep](plots/kl_sweep.png)", ""]

    # ------------------------------------------------------------------ runs
    L += ["## Runs", "", "One row per distinct run configuration (conditions that share a configuration "
          "share its runs).", ""]
    rows = []
    names_in_order = list(dict.fromkeys(alias.values()))
    for name in names_in_order:
        rs = [r for r in results if r["name"] == name]
        shared = sorted(c for c, a in alias.items() if a == name and c != name)
        rows.append([name, ", ".join(shared) or "", f"{len(rs)}/{len(res.seeds) or len(study['seeds'])}",
                     _ms([r["wall_s"] for r in rs], 0) + " s" if rs else "n/a"])
    L += _table(["run", "also answers", "seeds done", "wall time per run"], rows)

    return write_text_atomic(out_dir / "report.md", "\n".join(L))


def _mean_std_lists_src(res: _Results, cond: str, names: Sequence[str]) -> tuple[list[float], list[float]]:
    ms = [analysis.mean_std(res.values(cond, lambda r, n=n: r["by_source"][n]["accuracy"])) for n in names]
    return [m for m, _ in ms], [0.0 if math.isnan(s) else s for _, s in ms]


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lpc.experiments",
                                description="Studies that test the LPC paper's claims (see the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("paper", help="run (or resume) the study, then write report.md and plots",
                       formatter_class=HelpFormatter)
    a.add_argument("--quick", action="store_true", help="tiny smoke study (every artifact, about a minute)")
    a.add_argument("--seeds", type=int, default=None,
                   help=f"seeds 0..N-1 (default: {FULL_SEEDS}, {QUICK_SEEDS} with --quick)")
    a.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one thread each)")
    a.add_argument("--output-dir", default=None,
                   help="study directory; rerunning with the same one resumes (default: runs/paper or "
                        "runs/paper-quick)")
    a.add_argument("--model", default=None, help="local HF causal-LM directory (default: tiny random-init Llama)")
    a.add_argument("--dataset", default=None,
                   help="preference JSONL (prompt/chosen/rejected, optional source) (default: synthetic)")
    a.add_argument("--steps", type=int, default=None, help="training steps per run (default: 600, 30 with --quick)")
    r = sub.add_parser("report", help="rebuild report.md and plots of a study directory from its results")
    r.add_argument("output_dir")
    r.add_argument("--publish", default=None,
                   help="also copy report.md and plots/ into this directory (e.g. docs/results)")
    return p


def publish(out_dir: os.PathLike, dest: os.PathLike) -> Path:
    """Copy ``report.md`` and ``plots/*.png`` of a study into ``dest`` (each file by temp copy + rename),
    so the docs can link the plots of a run directory that git ignores. Returns ``dest``."""
    out_dir, dest = Path(out_dir), Path(dest)
    files = [out_dir / "report.md"] + sorted((out_dir / "plots").glob("*.png"))
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ValueError(f"output_dir {out_dir} has no report to publish (missing {missing[0]})")
    for f in files:
        target = dest / ("report.md" if f.name == "report.md" else f"plots/{f.name}")
        with atomic_file(target) as tmp:
            shutil.copyfile(f, tmp)
    return dest


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        if not (Path(args.output_dir) / "study.json").exists():
            raise SystemExit(f"{args.output_dir} is not a study directory (no study.json)")
        path = write_report(args.output_dir)
        print(f"report: {path}")
        if args.publish:
            print(f"published: {publish(args.output_dir, args.publish)}")
        return {"report": str(path)}
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else FULL_SEEDS)
    out = args.output_dir or ("runs/paper-quick" if args.quick else "runs/paper")
    command = "python -m lpc.experiments " + " ".join(
        list(argv) if argv is not None else sys.argv[1:])
    summary = run_study(Path(out), seeds=seeds, jobs=args.jobs, quick=args.quick, model=args.model,
                        dataset=args.dataset, steps=args.steps, command=command)
    if summary["failed"]:
        raise SystemExit(f"{len(summary['failed'])} run(s) failed: {', '.join(summary['failed'])}; rerun the "
                         "same command to retry them")
    return summary


if __name__ == "__main__":
    main()
