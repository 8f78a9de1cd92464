"""A training run's state (``Trainer``, built by ``lpc.train.setup``) and the components its loop delegates to, each
owning its cadence and files: ``MetricsLog`` (``metrics.jsonl``, trackers, progress bar, leak warning), ``Evaluator``
(``eval.jsonl``, the final ``eval.json``) and ``Checkpointer`` (``checkpoints/step-N``, ``final/``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .config import LossConfig, SyntheticConfig, TrainConfig
from .data import EpochSampler, PreferenceCollator, PreferenceDataset, synthetic
from .evaluate import evaluate_sharded
from .io import DirectoryLock, write_json_atomic
from .model import LPCModel
from .runtime import autocast
from .tracking import Trackers


@dataclass
class Trainer:
    """Everything a training run needs; built by ``lpc.train.setup``."""

    cfg: TrainConfig
    device: torch.device
    out_dir: Path
    model: LPCModel
    tokenizer: Any
    collator: PreferenceCollator
    train_set: PreferenceDataset
    eval_set: PreferenceDataset
    source_names: Optional[list]
    syn: Optional[SyntheticConfig]
    loss_cfg: LossConfig
    train_ref: Optional[Callable]
    eval_ref: Optional[Callable]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: EpochSampler
    gumbel_seed: int
    autocast_dtype: Optional[torch.dtype]
    step: int = 0  # next 0-based step to run
    resumed_from: Optional[Path] = None
    resume_state: Optional[dict] = None
    notes: list = field(default_factory=list)
    lock: Optional[DirectoryLock] = None  # rank 0's lock on out_dir
    trackers: Optional[Trackers] = None   # rank 0's --report-to trackers
    # data parallelism (lpc.distributed): this rank's place, and the module training forwards go through
    # (the DDP wrapper; under FSDP2 and without a strategy ``model`` itself)
    dist: dist_lib.DistContext = field(default_factory=dist_lib.DistContext)
    train_model: Optional[torch.nn.Module] = None
    # every parameter the optimizer updates (what gradient clipping covers): fixed once the optimizer is
    # built (loading its state on resume keeps the same parameter objects)
    params: list = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = dist_lib.flat_params(self.optimizer)

    def autocast(self):
        """The forward-pass autocast context (``--dtype bfloat16``), or a no-op."""
        return autocast(self.device, self.autocast_dtype)


def run_config(cfg: TrainConfig, out_dir: Path) -> dict:
    """What a run's ``train_config.json`` holds (also inside each checkpoint): its settings with the run directory."""
    return {**cfg.to_dict(), "output_dir": str(out_dir)}


# ------------------------------------------------------------------------------------------------ metrics
LEAK_WINDOW, LEAK_GAP = 50, 0.05
RECENT_STEPS = 20  # what the progress bar's loss and accuracy average over


def leak_warning(window: Sequence[dict]) -> Optional[str]:
    """The warning for a likely label leak, or ``None``: over the last ``LEAK_WINDOW`` steps, the batch's reward
    accuracy with z from the posterior's sample runs more than ``LEAK_GAP`` above the accuracy with z from the
    prior. Why these thresholds: ``docs/results.md``, "The leak and its controls: the evidence for the defaults".
    A posterior that legitimately knows more than the prior (say, the annotator) can trip it too: the warning
    says "likely" and names the held-out check."""
    if len(window) < LEAK_WINDOW or "lpc/prior_accuracy" not in window[-1]:
        return None
    post = sum(m["lpc/posterior_accuracy"] for m in window) / len(window)
    prior = sum(m["lpc/prior_accuracy"] for m in window) / len(window)
    if post - prior <= LEAK_GAP:
        return None
    return (f"lpc: likely label leak. Over the last {len(window)} steps the training pairs are ranked correctly "
            f"{post:.0%} of the time with z from the posterior but only {prior:.0%} with z from the prior (what "
            "evaluation uses): the posterior, which sees which answer was chosen, is passing that to the policy "
            "through z. Raise --kl-weight (1 is the ELBO), lower --codebook-scale, or use --prior-mix linear; "
            "lpc.evaluate's accuracy_posterior_swapped shows the effect on held-out pairs.")



class MetricsLog:
    """The per-step metrics: ``metrics.jsonl`` and the trackers (rank 0), the progress bar, and the one-time leak
    warning over the last ``LEAK_WINDOW`` steps. A context manager: leaving it closes the file and the bar."""

    def __init__(self, tr: Trainer):
        cfg, self.main = tr.cfg, tr.dist.is_main  # rank 0 prints and writes
        self.path, self.trackers = tr.out_dir / "metrics.jsonl", tr.trackers
        if tr.step == 0 and self.main:
            self.path.unlink(missing_ok=True)
        self.bar = tqdm(total=cfg.steps, initial=tr.step, desc=f"{'lpc-' if cfg.lpc else ''}{cfg.loss}",
                        disable=not (cfg.progress and self.main), dynamic_ncols=True, file=sys.stderr, unit="step")
        self.file = open(self.path, "a") if self.main else None
        self.recent: list[dict] = []
        self.leak_window: list[dict] = []
        self.warned = False

    def log(self, m: dict, step: int) -> None:
        """Record the metrics line ``m`` of optimizer step ``step`` (1-based)."""
        if self.main:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
            if self.trackers is not None:
                self.trackers.log(m, step)
        self.recent = (self.recent + [m])[-RECENT_STEPS:]
        self.leak_window = (self.leak_window + [m])[-LEAK_WINDOW:]
        warning = None if self.warned else leak_warning(self.leak_window)
        if warning is not None:
            self.write(warning)
        self.warned = self.warned or warning is not None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{sum(r['loss'] for r in self.recent) / len(self.recent):.4f}",
                             acc=f"{sum(r['rewards/accuracies'] for r in self.recent) / len(self.recent):.3f}",
                             tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)

    def write(self, message: str) -> None:
        """A line on stderr above the progress bar (rank 0)."""
        if self.main:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.bar.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict:
        """Means over the last 10% of steps (at least one) of the training metrics (read back from the file)."""
        lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        if not lines:
            return {}
        tail = lines[-max(1, len(lines) // 10):]
        keys = ["loss", "rewards/accuracies", "rewards/margins", "tokens_per_s", "lpc/kl", "lpc/code_perplexity"]
        return {"steps": lines[-1]["step"], **{k: sum(x[k] for x in tail) / len(tail) for k in keys if k in tail[0]}}


# --------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Held-out evaluation (z from the prior): every ``--eval-every`` steps into ``eval.jsonl``, and the final one,
    with the leak diagnostics, into ``eval.json``. Every rank evaluates its share of the pairs; rank 0 writes."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        self.log_path, self.path = tr.out_dir / "eval.jsonl", tr.out_dir / "eval.json"
        if tr.step == 0 and tr.dist.is_main:
            self.log_path.unlink(missing_ok=True)

    def evaluate(self, diagnostics: bool = False) -> dict:
        """Held-out metrics of the current model; ``diagnostics``: the leak diagnostics of ``lpc.evaluate.evaluate``
        too."""
        tr = self.tr
        if not len(tr.eval_set):
            return {"num_pairs": 0}
        with tr.autocast():  # data-parallel: each rank evaluates its share, the metrics are reduced over ranks
            return evaluate_sharded(tr.model, tr.eval_ref, tr.eval_set, tr.collator, tr.loss_cfg, tr.dist,
                                    batch_size=tr.cfg.eval_batch_size, source_names=tr.source_names,
                                    diagnostics=diagnostics)

    def maybe_evaluate(self, step: int, metrics: MetricsLog) -> None:
        """Evaluate after optimizer step ``step`` (1-based) when ``--eval-every`` says so (not at the last step: the
        final evaluation follows it)."""
        tr, cfg = self.tr, self.tr.cfg
        if not (cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps and len(tr.eval_set)):
            return
        ev = self.evaluate()  # every rank: the held-out pairs are split across them
        if tr.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, **ev}) + "\n")
            if tr.trackers is not None:
                tr.trackers.log(ev, step, prefix="eval/")
            metrics.write(f"step {step}: held-out accuracy {ev['accuracy']:.3f}")

    def final(self, train_wall_s: float) -> dict:
        """The final evaluation, with the leak diagnostics and, on synthetic data, the Bayes ceiling; written to
        ``eval.json``."""
        tr, cfg = self.tr, self.tr.cfg
        final_eval = self.evaluate(diagnostics=True)
        if tr.syn is not None and len(tr.eval_set):  # the ceiling: a predictor that knows the generator's sources
            final_eval["bayes_accuracy"] = synthetic.bayes_accuracy(tr.eval_set.rows, tr.syn)
        final_eval.update(step=cfg.steps, train_wall_s=train_wall_s)
        if tr.dist.is_main:
            write_json_atomic(self.path, final_eval)
            if tr.trackers is not None:
                tr.trackers.log(final_eval, cfg.steps, prefix="eval/")
        return final_eval


# -------------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Checkpoints every ``--save-every`` steps (``<run>/checkpoints/step-N``: ``lpc.checkpoint``) and the final model
    (``<run>/final``: an HF model directory, LoRA adapters merged, with the heads). Data-parallel: every rank calls;
    rank 0 writes the 1-process layout (FSDP2: the full states gathered to it first), so a checkpoint resumes at
    any world size. The ranks leave each save together."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        self.final_dir = tr.out_dir / "final"

    def maybe_save(self, step: int) -> None:
        """Save after optimizer step ``step`` (1-based) when ``--save-every`` says so."""
        every = self.tr.cfg.save_every
        if every > 0 and step % every == 0:
            self.save(step)

    def save(self, step: int) -> Optional[Path]:
        """Write ``<run>/checkpoints/step-<step>`` (``step`` = optimizer steps done); the path on rank 0."""
        tr, ctx = self.tr, self.tr.dist
        model_sd = optim_sd = None
        if ctx.strategy == "fsdp2":  # collectives: every rank
            model_sd = dist_lib.full_state_dict(tr.model, ctx)
            optim_sd = dist_lib.full_optimizer_state_dict(tr.optimizer, ctx)
        path = None
        if ctx.is_main:
            path = ckpt_lib.save_checkpoint(
                tr.out_dir, step, model=tr.model, tokenizer=tr.tokenizer, optimizer=tr.optimizer,
                scheduler=tr.scheduler, sampler_state=tr.sampler.state_dict(),
                extra_state={"gumbel_seed": tr.gumbel_seed}, config=run_config(tr.cfg, tr.out_dir),
                keep=tr.cfg.keep_checkpoints, model_state_dict=model_sd, optimizer_state_dict=optim_sd)
        dist_lib.barrier(ctx)
        return path

    def save_final(self) -> None:
        """Write ``<run>/final`` (with the tokenizer and ``train_config.json``); the job ends when it is written."""
        tr, ctx = self.tr, self.tr.dist
        extra = {"train_config.json": run_config(tr.cfg, tr.out_dir)}
        full_sd = dist_lib.full_state_dict(tr.model, ctx) if ctx.strategy == "fsdp2" else None  # every rank
        if ctx.is_main:
            if ckpt_lib.is_peft(tr.model.policy):  # final/ is a plain HF model: merge the adapters into the weights
                tr.model.policy = tr.model.policy.merge_and_unload()
            # full_sd: under FSDP2 the full weights gathered to this rank (None otherwise); the same files
            tr.model.save_pretrained(self.final_dir, tokenizer=tr.tokenizer, extra_files=extra, state_dict=full_sd)
        dist_lib.barrier(ctx)
