"""What the studies share: the ``Study`` each one defines, the ``RunContext`` its analysis reads, and the report
helpers (results by condition and seed, means with spreads, paired differences with Student-t intervals)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import analysis
from ..config import TrainConfig

# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (beyond: Cornish-Fisher, error < 1e-4)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Study:
    """One study: its grid of named conditions (``TrainConfig`` overrides), its bases, what it records per run
    beyond the common result (``analyse``) and its report.

    ``conditions(real_data) -> {condition: overrides}``; ``analyse(RunContext) -> dict`` (merged into
    ``result.json``); ``write_report(out_dir, study_json, results, alias) -> Path``; ``prepare(base, out_dir)``
    readies a real dataset (studies that take ``--dataset``); ``run_overrides(overrides, base, out_dir, seed)``
    turns study-only keys (``_*``) into ``TrainConfig`` fields.
    """

    name: str
    full: dict
    quick: dict
    full_seeds: int
    quick_seeds: int
    conditions: Callable[[bool], dict]
    analyse: Callable[["RunContext"], dict]
    write_report: Callable[[Path, dict, list, dict], Path]
    real_data: bool = False
    prepare: Optional[Callable[[dict, Path], dict]] = None
    run_overrides: Optional[Callable[[dict, dict, Path, int], dict]] = None


@dataclass
class RunContext:
    """One finished run, reloaded from its checkpoint: what a study's ``analyse`` reads."""

    cfg: TrainConfig
    summary: dict            # what lpc.train.train returned
    model: Any               # the reloaded LPCModel
    result: dict             # lpc.evaluate.evaluate(..., diagnostics=True) on the held-out pairs
    arrays: dict             # its per-pair arrays
    run_dir: Path
    eval_set: Any
    collator: Any
    ref_model: Any
    source_names: Optional[Sequence[str]]
    base: dict               # the study's base settings (with ``_*`` keys)


def run_dir(out_dir: Path, run: dict) -> Path:
    return Path(out_dir) / "runs" / f"{run['name']}-s{run['seed']}"


def load_results(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "runs").glob("*/result.json"))]


def fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_float(x: float) -> str:
    """``0.05`` -> ``0p05``: a float in a run name."""
    return f"{x:g}".replace(".", "p")


def _finite(values: Sequence[Optional[float]]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def ms(values: Sequence[Optional[float]], digits: int = 3) -> str:
    """``mean ± sample std`` of the finite values, ``n/a`` when there are none."""
    vals = _finite(values)
    if not vals:
        return "n/a"
    m, s = analysis.mean_std(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[Optional[float]]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its two-sided 95% Student-t interval
    (``mean ± t975(n - 1) * std / sqrt(n)``; honest for the 5-10 seeds of a study, where a bootstrap of the
    seeds is too narrow). One value gives a zero-width interval; none gives NaNs."""
    vals = np.asarray(_finite(values), dtype=np.float64)
    if vals.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(vals.mean())
    if vals.size == 1:
        return mean, mean, mean
    half = t975(vals.size - 1) * float(vals.std(ddof=1)) / math.sqrt(vals.size)
    return mean, mean - half, mean + half


def bootstrap_ci(values: Sequence[Optional[float]], *, resamples: int = 10000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its 95% percentile-bootstrap interval
    (``resamples`` resamples of the values with replacement). Narrower than ``mean_ci`` at a few values: reported
    next to it for the primary endpoint only. One value gives a zero-width interval; none gives NaNs."""
    vals = np.asarray(_finite(values), dtype=np.float64)
    if vals.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = vals[np.random.default_rng(seed).integers(0, vals.size, size=(resamples, vals.size))].mean(axis=1)
    return float(vals.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def ci(values: Sequence[Optional[float]], digits: int = 3) -> str:
    """``mean [low, high]`` (95% Student-t interval of the mean) of paired differences, ``n/a`` for none."""
    vals = _finite(values)
    if not vals:
        return "n/a"
    m, lo, hi = mean_ci(vals)
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


class Results:
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

    def paired_delta(self, a: str, b: str, fn, fn_b=None) -> list[float]:
        """``fn(a) - fn_b(b)`` (``fn_b`` default ``fn``) per seed where both ran (paired over seeds: same data,
        same init)."""
        fn_b = fn_b or fn
        na, nb = self.alias.get(a, a), self.alias.get(b, b)
        out = []
        for s in self.seeds:
            if (na, s) in self.by and (nb, s) in self.by:
                try:
                    out.append(float(fn(self.by[(na, s)])) - float(fn_b(self.by[(nb, s)])))
                except (KeyError, TypeError):
                    continue
        return out

    def mean_std_lists(self, conds: Sequence[str], fn) -> tuple[list[float], list[float]]:
        """Means and sample stds over seeds of ``fn`` for each condition (std 0 where undefined), for plots."""
        pairs = [analysis.mean_std(self.values(c, fn)) for c in conds]
        return [m for m, _ in pairs], [0.0 if math.isnan(s) else s for _, s in pairs]


def accuracy(r: dict) -> float:
    return r["accuracy"]


def runs_table(results: list[dict], alias: dict, seeds_done: Sequence[int], seeds_planned: Sequence[int]) -> list[str]:
    """The report's closing table: one row per distinct run configuration."""
    rows = []
    for name in dict.fromkeys(alias.values()):
        rs = [r for r in results if r["name"] == name]
        shared = sorted(c for c, a in alias.items() if a == name and c != name)
        rows.append([name, ", ".join(shared) or "", f"{len(rs)}/{len(seeds_done) or len(seeds_planned)}",
                     ms([r["wall_s"] for r in rs], 0) + " s" if rs else "n/a"])
    return ["## Runs", "", "One row per distinct run configuration (conditions that share a configuration "
            "share its runs).", ""] + table(["run", "also answers", "seeds done", "wall time per run"], rows)
