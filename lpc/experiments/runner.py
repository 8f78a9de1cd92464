"""Running a study: plan its distinct runs, train and analyse each in worker processes (resumable: a run is done
when its ``result.json`` exists), write the report; the ``python -m lpc.experiments`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..builders import build_collator, build_data, build_policy, initial_reference
from ..cli import HelpFormatter
from ..config import TrainConfig
from ..evaluate import evaluate
from ..io import atomic_file, write_json_atomic
from ..model import LPCModel
from ..runtime import quiet_transformers
from ..train import train
from .annotators import ANNOTATORS_STUDY
from .common import RunContext, Study, fmt_duration, load_results, run_dir
from .paper import PAPER_STUDY

STUDIES: dict[str, Study] = {s.name: s for s in (PAPER_STUDY, ANNOTATORS_STUDY)}
TRAIN_TAIL = 0.1  # the fraction of the last training steps whose metrics a result keeps (means)


def _canonical(overrides: dict, defaults: dict) -> str:
    """A key equal for overrides that configure the same run (values equal to the base are dropped)."""
    eff = {k: v for k, v in overrides.items() if defaults.get(k, object()) != v}
    if not eff.get("lpc", defaults.get("lpc", True)):  # LPC-only fields do not change a plain run
        for k in ("num_codes", "kl_weight", "codebook_scale", "free_bits", "kl_warmup_steps"):
            eff.pop(k, None)
    if not eff.get("flip_fraction", defaults.get("flip_fraction", 0.0)):
        eff.pop("flip_marker", None)  # the marker means nothing without flips
    return json.dumps(eff, sort_keys=True)


def plan(seeds: Sequence[int], base: dict, real_data: bool = False,
         study: str = "paper") -> tuple[list[dict], dict[str, str]]:
    """``(runs, alias)``: the distinct runs of ``study`` (``{"name", "seed", "overrides"}``; ``name-s<seed>`` is
    the run directory) and ``alias[condition] = name`` of the run that computes it."""
    defaults = {**TrainConfig().to_dict(), **base}
    conds = STUDIES[study].conditions(real_data)
    first: dict[str, str] = {}
    alias: dict[str, str] = {}
    for cond, ov in conds.items():
        key = _canonical(ov, defaults)
        first.setdefault(key, cond)
        alias[cond] = first[key]
    names = list(dict.fromkeys(alias.values()))
    runs = [{"name": n, "seed": s, "overrides": conds[n]} for s in seeds for n in names]
    return runs, alias


# ------------------------------------------------------------------------------------------- one run
def _train_tail(metrics_path: Path) -> dict:
    """Means of every metric over the last ``TRAIN_TAIL`` of the training steps (at least one)."""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tail = lines[-max(1, int(len(lines) * TRAIN_TAIL)):]
    return {k: sum(x[k] for x in tail) / len(tail) for k in tail[0] if k not in ("step", "epoch")}


def run_one(run: dict, out_dir: str, base: dict, study_name: str) -> dict:
    """Train one run, reload its checkpoint, evaluate its held-out pairs (with the leak diagnostics), let the
    study analyse them, and write ``result.json``; returns the result.

    Runs in a worker process: everything it needs comes in as plain data, everything it produces goes to
    disk (``result.json`` last, so its presence means the run is complete).
    """
    study = STUDIES[study_name]
    t0 = time.perf_counter()
    out = Path(out_dir)
    rdir = run_dir(out, run)
    ov = dict(run["overrides"])
    if study.run_overrides is not None:
        ov = study.run_overrides(ov, base, out, run["seed"])
    train_base = {k: v for k, v in base.items() if not k.startswith("_")}
    cfg = TrainConfig(**{**train_base, **ov, "seed": run["seed"], "output_dir": str(rdir / "train"), "threads": 1,
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
    _, eval_set, source_names, syn = build_data(eval_cfg, tokenizer)
    collator = build_collator(cfg, tokenizer, model.policy)
    ev, arrays = evaluate(model, ref_model, eval_set, collator, loss_cfg, batch_size=cfg.eval_batch_size,
                          source_names=source_names, return_arrays=True, diagnostics=True)
    trainer_ev = summary["eval"]
    result = {
        "name": run["name"], "seed": run["seed"], "overrides": run["overrides"], "config": cfg.to_dict(),
        "wall_s": None, "train_wall_s": summary["wall_s"], "num_pairs": ev["num_pairs"],
        "accuracy": ev["accuracy"], "reward_margin": ev["reward_margin"],
        "trainer_accuracy": trainer_ev.get("accuracy"), "bayes_accuracy": trainer_ev.get("bayes_accuracy"),
        "train": _train_tail(rdir / "train" / "metrics.jsonl"),
        "diagnostics": {k: ev[k] for k in ("accuracy_posterior", "accuracy_posterior_swapped", "accuracy_zero_z",
                                           "accuracy_by_code", "z_rms_ratio") if k in ev},
    }
    # the trainer's own evaluation must agree with this pass (same model, same z from the prior)
    result["accuracy_mismatch"] = (abs(result["accuracy"] - trainer_ev["accuracy"]) if "accuracy" in trainer_ev
                                   else None)
    ctx = RunContext(cfg=cfg, summary=summary, model=model, result=ev, arrays=arrays, run_dir=rdir, eval_set=eval_set,
                     collator=collator, ref_model=ref_model, source_names=source_names, base=base)
    result.update(study.analyse(ctx))
    result["source_names"] = list(source_names) if source_names is not None else None
    result["wall_s"] = time.perf_counter() - t0
    write_json_atomic(rdir / "result.json", result)
    return result


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_safely(run: dict, out_dir: str, base: dict, study_name: str) -> dict:
    """``run_one`` with the error turned into data (a traceback string), so one failure does not stop the
    others and the parent can report it. No per-run "Loading weights" / "Writing model shards" bars: one
    progress line per run is the study's log."""
    try:
        with quiet_transformers():
            return {"ok": True, "result": run_one(run, out_dir, base, study_name)}
    except Exception:  # noqa: BLE001 - reported to the parent with its traceback
        return {"ok": False, "error": traceback.format_exc()}


# ---------------------------------------------------------------------------------------------- study
def run_study(out_dir: Path, *, seeds: int, jobs: int, quick: bool, model: Optional[str] = None,
              dataset: Optional[str] = None, steps: Optional[int] = None, command: Optional[str] = None,
              log=None, study: str = "paper") -> dict:
    """Run (or resume) the whole grid of ``study`` in ``out_dir`` with ``jobs`` worker processes, then write the
    report.

    ``command`` is recorded in the report; ``log`` (default: print, flushed) gets one line per finished run.
    Returns ``{"runs", "done", "failed", "report", "wall_s", "alias"}``. Raises ``ValueError`` for bad arguments and
    when ``out_dir`` holds a study with a different configuration (resuming it would mix two studies).
    """
    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}, got {study!r}")
    spec = STUDIES[study]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if dataset is not None and not spec.real_data:
        raise ValueError(f"the {study} study runs on its synthetic data only: drop dataset")
    if dataset is not None and not Path(dataset).is_file():
        raise ValueError(f"dataset must be an existing JSONL file, got {dataset!r}")
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = dict(spec.quick if quick else spec.full)
    if steps is not None:
        base["steps"] = steps
    if model is not None:
        base["model"] = model
    real = dataset is not None
    record = {"study": study, "quick": quick, "seeds": list(range(seeds)), "base": dict(base), "dataset": dataset,
              "command": command}
    study_path = out_dir / "study.json"
    if study_path.exists():
        old = json.loads(study_path.read_text())
        if (old.get("study", "paper") != study or old.get("base") != record["base"] or old.get("dataset") != dataset
                or old.get("quick") != quick):
            raise ValueError(f"--output-dir {out_dir} holds a study with another configuration "
                             f"({old.get('study', 'paper')}: {old.get('base')}, dataset={old.get('dataset')}); use "
                             "another --output-dir")
        record["seeds"] = sorted(set(old.get("seeds", [])) | set(record["seeds"]))
        record["command"] = record["command"] or old.get("command")
    if real:
        base.update(spec.prepare({**base, "dataset": dataset}, out_dir))
    write_json_atomic(study_path, record)

    runs, alias = plan(record["seeds"], {k: v for k, v in base.items() if not k.startswith("_")}, real, study)
    todo = [r for r in runs if not (run_dir(out_dir, r) / "result.json").exists()]
    log(f"study {out_dir}: {len(runs)} runs ({len(record['seeds'])} seeds), {len(runs) - len(todo)} already done, "
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
                f"{fmt_duration(time.perf_counter() - t0)}, ETA {fmt_duration(eta)}")
        else:
            failed.append(rid)
            log(f"[{done}/{len(todo)}] {rid}: FAILED\n{res['error']}")

    if jobs == 1 or len(todo) <= 1:
        for run in todo:
            finished(run, _run_safely(run, str(out_dir), base, study))
    else:
        # spawn (not fork): a forked child would inherit the parent's torch thread pools; one thread per
        # worker, since two single-threaded runs use 2 cores far better than one run with 2 threads
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                                 initializer=_init_worker) as ex:
            pending = {ex.submit(_run_safely, r, str(out_dir), base, study): r for r in todo}
            while pending:
                fin, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in fin:
                    finished(pending.pop(fut), fut.result())
    report = write_report(out_dir)
    wall = time.perf_counter() - t0
    log(f"report: {report} (study wall time {fmt_duration(wall)})"
        + (f"; {len(failed)} run(s) failed: {', '.join(failed)}" if failed else ""))
    return {"runs": len(runs), "done": len(runs) - len(failed), "failed": failed, "report": str(report),
            "wall_s": wall, "alias": alias}


def write_report(out_dir: os.PathLike) -> Path:
    """Rebuild ``report.md`` and the plots in ``out_dir`` from the result files there; returns the path."""
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "study.json").read_text())
    name = record.get("study", "paper")  # study directories written before there were two studies
    _, alias = plan(record["seeds"], record["base"], record.get("dataset") is not None, name)
    return STUDIES[name].write_report(out_dir, record, load_results(out_dir), alias)


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


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lpc.experiments",
                                description="Studies of LPC on data with known ground truth (see lpc.experiments).")
    sub = p.add_subparsers(dest="command", required=True)
    for spec, text in ((PAPER_STUDY, "the paper's claims: DPO / SimPO / IPO with and without LPC, label noise, "
                                     "K and KL sweeps, on the four-source data"),
                       (ANNOTATORS_STUDY, "what the latent buys: prompt-only and few-shot accuracy, leak controls "
                                          "and random-label controls on the six-annotator data")):
        a = sub.add_parser(spec.name, help=f"run (or resume) {text}; then write report.md and plots",
                           formatter_class=HelpFormatter)
        a.add_argument("--quick", action="store_true", help="tiny smoke study (every artifact, a few minutes)")
        a.add_argument("--seeds", type=int, default=None,
                       help=f"seeds 0..N-1 (default: {spec.full_seeds}, {spec.quick_seeds} with --quick)")
        a.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one thread each)")
        a.add_argument("--output-dir", default=None,
                       help=f"study directory; rerunning with the same one resumes (default: runs/{spec.name} or "
                            f"runs/{spec.name}-quick)")
        a.add_argument("--steps", type=int, default=None,
                       help=f"training steps per run (default: {spec.full['steps']}, {spec.quick['steps']} with "
                            "--quick)")
        if spec.real_data:
            a.add_argument("--model", default=None,
                           help="local HF causal-LM directory (default: tiny random-init Llama)")
            a.add_argument("--dataset", default=None,
                           help="preference JSONL (prompt/chosen/rejected, optional source) (default: synthetic)")
    r = sub.add_parser("report", help="rebuild report.md and plots of a study directory from its results")
    r.add_argument("output_dir")
    r.add_argument("--publish", default=None,
                   help="also copy report.md and plots/ into this directory (e.g. docs/results/paper)")
    return p


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
    spec = STUDIES[args.command]
    seeds = args.seeds if args.seeds is not None else (spec.quick_seeds if args.quick else spec.full_seeds)
    out = args.output_dir or (f"runs/{spec.name}-quick" if args.quick else f"runs/{spec.name}")
    command = "python -m lpc.experiments " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    summary = run_study(Path(out), seeds=seeds, jobs=args.jobs, quick=args.quick,
                        model=getattr(args, "model", None), dataset=getattr(args, "dataset", None), steps=args.steps,
                        command=command, study=spec.name)
    if summary["failed"]:
        raise SystemExit(f"{len(summary['failed'])} run(s) failed: {', '.join(summary['failed'])}; rerun the "
                         "same command to retry them")
    return summary
