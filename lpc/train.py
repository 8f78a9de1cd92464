"""``python -m lpc.train``: train LPC-DPO (or IPO / SimPO, with or without LPC) and evaluate on held-out pairs.

With no arguments: LPC-DPO on the built-in synthetic preference data (``lpc.data.synthetic``) with a tiny
random-init Llama and a locally trained word-level tokenizer, on CPU, in a few minutes. ``--model`` takes
a local HF model directory or hub id, ``--dataset`` a JSONL / JSON / Parquet file or a ``datasets`` name.
Every flag can also come from ``--config file.yaml|json``; explicit flags override the file (``lpc.cli``).

Outputs under ``--output-dir`` (default ``runs/<loss>-<lpc|nolpc>-<timestamp>``):

* ``train_config.json``: the resolved configuration (``--config`` accepts it back).
* ``metrics.jsonl``: one JSON line per step (``rewards/*``, ``logps/*``, ``lpc/*``, plus ``loss``, ``step``,
  ``epoch``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``lpc/mix``: ``docs/design.md`` section 7);
  ``eval.jsonl`` with ``--eval-every``.
* ``checkpoints/step-N/`` with ``--save-every`` (``lpc.checkpoint``); ``--resume`` continues from one.
* ``ref_logps.safetensors`` with ``--precompute-ref-logps``.
* ``final/``: the policy (HF layout, safetensors; LoRA adapters merged), ``lpc_heads.safetensors``
  (codebook and heads), ``lpc_config.json``, the tokenizer and ``train_config.json``; written to a temp
  dir, then renamed. ``eval.json``: the final held-out evaluation (``lpc.evaluate``).

This module is the loop only: ``setup`` builds a ``Trainer`` from the components (``lpc.builders``,
``lpc.reference``, ``lpc.checkpoint``, ``lpc.distributed``), ``train_step`` runs one optimizer step over a
global batch in micro-batches, ``train`` runs the steps with evaluation and checkpoints, ``main`` is the CLI.
The data order is a pure function of ``(seed, epoch)`` plus a position (``lpc.data.EpochSampler``); the Gumbel
noise of every example a pure function of ``(seed, step, index in the global batch)``
(``LPCModel.gumbel_offsets``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm.auto import tqdm

import lpc_kernels as lk

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .builders import (build_collator, build_data, build_lpc_model, build_optimizer, build_policy, check_paths,
                       enable_gradient_checkpointing)
from .cli import build_parser, parse_args
from .config import ConfigError, LossConfig, SyntheticConfig, TrainConfig
from .data import DataError, EpochSampler, PreferenceCollator, PreferenceDataset, synthetic, to_device
from .evaluate import evaluate_sharded
from .io import DirectoryInUse, DirectoryLock, IntegrityError, write_json_atomic
from .losses import leak_margins, merge_micro_batches, preference_objective, step_metrics
from .model import LPCModel, Objective, prior_mix_weight
from .reference import build_reference_scorers
from .runtime import autocast, autocast_dtype, determinism, log, resolve_device, threads_for
from .tracking import Trackers, check_trackers, trackers_of


@dataclass
class Trainer:
    """Everything a training step needs; built by ``setup``."""

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


# ---------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, ctx: Optional[dist_lib.DistContext] = None) -> Trainer:
    """Build model, reference, optimizer, scheduler, data order, and restore a checkpoint (``cfg.resume``).

    The global RNG of a resumed run is restored by ``train`` right before the first step. ``ctx``: this
    rank's place in a data-parallel job (``lpc.distributed``; default: one process on ``--device``).
    """
    ctx = ctx or dist_lib.DistContext(device=resolve_device(cfg.device))
    check_paths(cfg)  # before loading a model that may take minutes
    check_trackers(cfg.report_to)
    ckpt_path, state, out_dir, notes = ckpt_lib.find_resume(cfg)
    if out_dir is None:
        out_dir = Path("runs") / f"{cfg.loss}-{'lpc' if cfg.lpc else 'nolpc'}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(dist_lib.broadcast_object(str(out_dir), ctx))  # rank 0's: the timestamps may differ
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if ctx.is_main:  # one run per directory, for the run's lifetime (released by _run, or by the kernel at exit)
        try:
            lock = DirectoryLock(out_dir).acquire()
        except DirectoryInUse as exc:
            raise ConfigError("output_dir", str(exc)) from None
        if lock.previous:
            notes.append(f"took over the lock of a run that ended without releasing it (pid "
                         f"{lock.previous.get('pid')} on {lock.previous.get('host')})")
    try:
        return _setup_locked(cfg, ctx, ckpt_path, state, out_dir, notes, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup_locked(cfg: TrainConfig, ctx: dist_lib.DistContext, ckpt_path: Optional[Path], state: Optional[dict],
                  out_dir: Path, notes: list, lock: Optional[DirectoryLock]) -> Trainer:
    device = ctx.device
    if ctx.is_main:
        write_json_atomic(out_dir / "train_config.json", {**cfg.to_dict(), "output_dir": str(out_dir)})
    if cfg.batch_size % (ctx.world_size * cfg.gradient_accumulation_steps):
        raise ConfigError("batch_size", f"{cfg.batch_size} pairs cannot be split into {ctx.world_size} processes x "
                                        f"{cfg.gradient_accumulation_steps} micro-batches of equal size: use a "
                                        f"multiple of {ctx.world_size * cfg.gradient_accumulation_steps}")

    torch.manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg)
    if amp_dtype is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype", "bfloat16 is not supported by this GPU")
    policy, tokenizer = build_policy(cfg)
    train_set, eval_set, source_names, syn = build_data(cfg, tokenizer)
    if len(train_set) < cfg.batch_size:
        raise ConfigError("batch_size", f"must be <= the {len(train_set)} training pairs, got {cfg.batch_size}")
    collator = build_collator(cfg, tokenizer, policy)
    notes.append(f"batch layout: {collator.layout}" + (" (auto)" if cfg.batch_layout == "auto" else ""))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    model = build_lpc_model(cfg, policy).to(device)
    if cfg.lpc and ckpt_path is None:  # a resumed run takes hidden_rms from its checkpoint
        calib = to_device(collator([train_set[i] for i in range(cfg.batch_size)]), device)
        with autocast(device, amp_dtype):
            rms = model.calibrate(calib)
        notes.append(f"lpc: final hidden states have RMS {rms:.4g} at scored positions; z = (w @ E) * {rms:.4g}, "
                     f"E initialised with std {cfg.codebook_scale} (--codebook-scale)")
    train_ref, eval_ref = build_reference_scorers(cfg, policy if cfg.lora_r == 0 else None, model, train_set,
                                                  eval_set, collator, device, amp_dtype, out_dir, notes, ctx)
    model.train()
    if ckpt_path is not None:  # the weights before wrapping: FSDP2 shards what the model holds
        ckpt_lib.load_model_state(ckpt_path, model, state=state)
    # DDP: a wrapper for the training forwards; FSDP2: model sharded in place (optimizer built after it).
    # A parameter can miss a gradient only through the prior head, when nothing but the mix uses it
    train_model = dist_lib.wrap_model(model, ctx, mixed_precision=amp_dtype,
                                      find_unused_parameters=cfg.lpc and cfg.kl_weight == 0)
    optimizer, scheduler = build_optimizer(cfg, model)
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed)
    # the Gumbel stream's seed: a pure function of --seed (offsets come from gumbel_offsets)
    gumbel_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(cfg.seed + 1)))

    tr = Trainer(cfg=cfg, device=device, out_dir=out_dir, model=model, tokenizer=tokenizer, collator=collator,
                 train_set=train_set, eval_set=eval_set, source_names=source_names, syn=syn,
                 loss_cfg=cfg.loss_config(), train_ref=train_ref, eval_ref=eval_ref, optimizer=optimizer,
                 scheduler=scheduler, sampler=sampler, gumbel_seed=gumbel_seed, autocast_dtype=amp_dtype,
                 notes=notes, dist=ctx, train_model=train_model, lock=lock)
    if ckpt_path is not None:
        _restore(tr, ckpt_path, state)
    return tr


def _restore(tr: Trainer, ckpt_path: Path, state: dict) -> None:
    """Optimizer, scheduler, data position and step of a checkpoint (the model weights are loaded before wrapping)."""
    cfg, ctx = tr.cfg, tr.dist
    # saved in the 1-process layout at any world size; FSDP2 takes each parameter's shard of it
    shard = ((lambda sd: dist_lib.shard_optimizer_state_dict(sd, tr.optimizer)) if ctx.strategy == "fsdp2"
             else None)
    state = ckpt_lib.load_training_state(ckpt_path, optimizer=tr.optimizer, scheduler=tr.scheduler,
                                         prepare_optimizer_state=shard, state=state)
    tr.sampler.load_state_dict(state["data"])
    if state.get("gumbel_seed", tr.gumbel_seed) != tr.gumbel_seed:
        raise ValueError(f"{ckpt_path}: Gumbel seed differs from this run's (different --seed?)")
    tr.step, tr.resumed_from, tr.resume_state = int(state["step"]), ckpt_path, state
    if tr.step > cfg.steps:
        raise ConfigError("steps", f"the checkpoint is at step {tr.step}, past --steps {cfg.steps}")
    if ctx.is_main:
        for name in ("metrics.jsonl", "eval.jsonl"):
            ckpt_lib.truncate_jsonl(tr.out_dir / name, tr.step)
    tr.notes.append(f"resumed from {ckpt_path} at step {tr.step}")


# ------------------------------------------------------------------------------------------------ step
def train_step(tr: Trainer, step: int) -> dict:
    """One optimizer step (0-based ``step``) over the next global batch; returns its metrics line.

    The batch is cut into ``gradient_accumulation_steps`` micro-batches; each backpropagates
    ``loss / accum`` (equal micro-batch sizes make the sum the global-batch mean). Gradients are clipped
    to ``max_grad_norm`` (the pre-clip norm is logged as ``grad_norm``). Data-parallel (``tr.dist``): each
    rank runs its contiguous slice of the same global batch, and the metrics are computed on the global
    batch gathered from all ranks, so they are the 1-process run's.
    """
    cfg, ctx = tr.cfg, tr.dist
    t0 = time.perf_counter()
    indices = tr.sampler.next_indices()  # the global batch: the same on every rank
    # data-parallel: this rank's contiguous slice; examples keep their global index for the Gumbel noise
    local = dist_lib.rank_slice(len(indices), ctx.rank, ctx.world_size)
    mix = prior_mix_weight(step, cfg.steps, cfg.prior_mix) if cfg.lpc else 0.0
    kl_weight = cfg.kl_weight_at(step)
    lr = tr.optimizer.param_groups[0]["lr"]
    accum = cfg.gradient_accumulation_steps
    mb = (local.stop - local.start) // accum
    forward = tr.train_model if tr.train_model is not None else tr.model
    tr.optimizer.zero_grad(set_to_none=True)
    outs, results = [], []
    passes = [p for j in range(accum) for p in backbone_passes(tr, indices, j, mb)]
    for i_pass, (first, group) in enumerate(passes):
        batch = to_device(tr.collator([tr.train_set[i] for i in group]), tr.device)
        offset, prior_offset = tr.model.gumbel_offsets(step, cfg.batch_size, first)
        with tr.autocast():
            ref = tr.train_ref(batch) if tr.train_ref is not None else (None, None)
            objective = Objective(ref[0], ref[1], tr.loss_cfg, kl_weight) if cfg.fused_loss else None
            out = forward(batch, mix=mix, seed=tr.gumbel_seed, offset=offset, prior_offset=prior_offset,
                          diagnostics=cfg.latent_diagnostics, objective=objective)
        res = preference_objective(out, ref[0], ref[1], tr.loss_cfg, kl_weight=kl_weight)
        # each pass weighs by its share of this rank's pairs: the gradient is the one of the whole local batch
        loss = res.loss if len(passes) == 1 else (
            res.loss / accum if len(group) == mb else res.loss * (len(group) / (mb * accum)))
        with dist_lib.set_gradient_sync(forward, i_pass == len(passes) - 1):  # DDP: all-reduce once, after the last
            loss.backward()
        outs.append(out.detach())
        results.append(SimpleNamespace(**{k: t.detach() for k, t in res._asdict().items()},
                                       **vars(leak_margins(out, ref[0], ref[1], tr.loss_cfg))))
    out, res = merge_micro_batches(outs, results)
    # the global batch's per-pair values, in global order, on every rank: the metrics are the 1-process ones
    out, res = dist_lib.gather_fields(out, ctx), dist_lib.gather_fields(res, ctx)
    metrics = step_metrics(out, res)  # of the detached outputs: the same before and after the update
    lk.raise_pending_errors()  # the metrics read the device: report a bad value an op found there
    loss_value = metrics["loss"]
    if not math.isfinite(loss_value):  # before the update: the last checkpoint stays a good one
        raise FloatingPointError(f"loss is {loss_value} at step {step + 1}; lower --lr or check the data")
    grad_norm = dist_lib.clip_grad_norm(tr.params, cfg.max_grad_norm)  # global over FSDP2 shards
    tr.optimizer.step()
    tr.scheduler.step()
    dt = time.perf_counter() - t0
    m = {"step": step + 1, "epoch": tr.sampler.epoch_float, **metrics, "lr": lr,
         "grad_norm": float(grad_norm), "tokens_per_s": out.num_tokens / dt}
    if cfg.lpc:
        m["lpc/mix"] = mix
        m["lpc/kl_weight"] = kl_weight
    return m


LEAK_WINDOW, LEAK_GAP = 50, 0.05


def backbone_passes(tr: Trainer, indices: Sequence[int], j: int, mb: int) -> list[tuple[int, list[int]]]:
    """The backbone passes of this rank's micro-batch ``j`` (``mb`` pairs) of the global batch ``indices``:
    ``(global position of the first pair, dataset indices)`` each. One pass, unless ``--max-tokens-per-batch``
    cuts the micro-batch (``PreferenceCollator.split``); then every rank runs as many passes as the rank that
    needs the most (FSDP2 gathers the weights in every forward), splitting its largest passes in halves."""
    ctx, budget = tr.dist, tr.cfg.max_tokens_per_batch

    def micro_batch(rank: int) -> tuple[int, list[int], list[int]]:
        first = dist_lib.rank_slice(len(indices), rank, ctx.world_size).start + j * mb
        group = list(indices[first:first + mb])
        sizes = [len(g) for g in tr.collator.split([tr.train_set[i] for i in group], budget)]
        return first, group, sizes

    first, group, sizes = micro_batch(ctx.rank)
    if budget is not None and ctx.world_size > 1:
        target = max(len(micro_batch(r)[2]) for r in range(ctx.world_size))
        while len(sizes) < target:  # target <= mb, so a pass of >= 2 pairs is left to split
            k = max(range(len(sizes)), key=sizes.__getitem__)
            sizes[k:k + 1] = [sizes[k] - sizes[k] // 2, sizes[k] // 2]
    passes, start = [], 0
    for n in sizes:
        passes.append((first + start, group[start:start + n]))
        start += n
    return passes


def leak_warning(window: Sequence[dict]) -> Optional[str]:
    """The warning for a likely label leak, or ``None``: over the last ``LEAK_WINDOW`` steps, the batch's reward
    accuracy with z from the posterior's sample runs more than ``LEAK_GAP`` above the accuracy with z from the
    prior. In the 400 LPC runs of our two studies, no run without a held-out leak came closer than 0.044 (largest
    gap over any 50-step window; 0.027 at KL weight 1), and every leak crossed 0.05 by step 132 (docs/results.md).
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


def run_evaluation(tr: Trainer, diagnostics: bool = False) -> dict:
    """Held-out metrics of the current model (z from the prior); ``diagnostics``: the leak diagnostics of
    ``lpc.evaluate.evaluate`` too (the final evaluation)."""
    if not len(tr.eval_set):
        return {"num_pairs": 0}
    with tr.autocast():  # data-parallel: each rank evaluates its share, the metrics are reduced over ranks
        return evaluate_sharded(tr.model, tr.eval_ref, tr.eval_set, tr.collator, tr.loss_cfg, tr.dist,
                                batch_size=tr.cfg.eval_batch_size, source_names=tr.source_names,
                                diagnostics=diagnostics)


def save_checkpoint(tr: Trainer, step: int) -> Optional[Path]:
    """Write ``<run>/checkpoints/step-<step>`` (``step`` = optimizer steps done); the path on rank 0.

    Data-parallel: every rank calls it; rank 0 writes the 1-process layout (FSDP2: full states gathered to
    rank 0 first), so the checkpoint resumes at any world size. The ranks leave together.
    """
    ctx = tr.dist
    model_sd = optim_sd = None
    if ctx.strategy == "fsdp2":  # collectives: every rank
        model_sd = dist_lib.full_state_dict(tr.model, ctx)
        optim_sd = dist_lib.full_optimizer_state_dict(tr.optimizer, ctx)
    path = None
    if ctx.is_main:
        path = ckpt_lib.save_checkpoint(
            tr.out_dir, step, model=tr.model, tokenizer=tr.tokenizer, optimizer=tr.optimizer,
            scheduler=tr.scheduler, sampler_state=tr.sampler.state_dict(), extra_state={"gumbel_seed": tr.gumbel_seed},
            config={**tr.cfg.to_dict(), "output_dir": str(tr.out_dir)}, keep=tr.cfg.keep_checkpoints,
            model_state_dict=model_sd, optimizer_state_dict=optim_sd)
    dist_lib.barrier(ctx)
    return path


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Run training and the final evaluation.

    Returns ``{"output_dir", "checkpoint" (final/), "metrics", "eval_json", "eval", "wall_s",
    "train_summary", "resumed_from", "rank"}``.
    """
    # --strategy ddp|fsdp2: a process group (torchrun's environment; NCCL on GPU, gloo on CPU), destroyed on the
    # way out; a rank that raises aborts it and exits non-zero (torchrun then stops the others)
    with determinism(cfg.deterministic), threads_for(cfg), dist_lib.process_group(cfg.strategy, cfg.device) as ctx:
        return _run(cfg, ctx)


def _run(cfg: TrainConfig, ctx: dist_lib.DistContext) -> dict:
    t_start = time.perf_counter()
    tr = setup(cfg, ctx)
    try:
        if ctx.is_main and trackers_of(cfg.report_to):
            tr.trackers = Trackers(cfg.report_to, tr.out_dir, cfg.to_dict(), resumed=tr.resumed_from is not None)
        return _train_and_evaluate(tr, t_start)
    finally:
        if tr.trackers is not None:
            tr.trackers.close()
        if tr.lock is not None:
            tr.lock.release()


def _train_and_evaluate(tr: Trainer, t_start: float) -> dict:
    cfg, ctx = tr.cfg, tr.dist
    main_rank = ctx.is_main  # rank 0 prints and writes every file
    say = log if main_rank else (lambda msg: None)
    for st in getattr(tr.train_set, "load_stats", []):
        say(st.summary())
    if tr.train_set.num_truncated or tr.eval_set.num_truncated:
        say(f"data: {tr.train_set.num_truncated} training and {tr.eval_set.num_truncated} held-out pairs "
            f"truncated to --max-length {cfg.max_length}"
            + (f" / --max-prompt-length {cfg.max_prompt_length}" if cfg.max_prompt_length else ""))
    if ctx.strategy != "none":
        say(f"{ctx.strategy}: {ctx.world_size} process(es), {ctx.backend} on {ctx.device.type}; "
            f"{cfg.batch_size // ctx.world_size} of the {cfg.batch_size} pairs of each step per rank")
    for note in tr.notes:
        say(note)
    if tr.resumed_from is not None:
        ckpt_lib.load_rng(tr.resumed_from, tr.resume_state)

    metrics_path = tr.out_dir / "metrics.jsonl"
    eval_log = tr.out_dir / "eval.jsonl"
    if tr.step == 0 and main_rank:
        for p in (metrics_path, eval_log):
            p.unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, initial=tr.step, desc=f"{'lpc-' if cfg.lpc else ''}{cfg.loss}",
               disable=not (cfg.progress and main_rank), dynamic_ncols=True, file=sys.stderr, unit="step")
    recent: list[dict] = []
    leak_window: list[dict] = []
    warned = False
    with (open(metrics_path, "a") if main_rank else contextlib.nullcontext()) as mf:
        for step in range(tr.step, cfg.steps):
            m = train_step(tr, step)
            tr.step = step + 1
            if main_rank:
                mf.write(json.dumps(m) + "\n")
                mf.flush()
                if tr.trackers is not None:
                    tr.trackers.log(m, tr.step)
            recent = (recent + [m])[-20:]
            leak_window = (leak_window + [m])[-LEAK_WINDOW:]
            warning = None if warned else leak_warning(leak_window)
            if warning is not None and main_rank:
                bar.write(warning, file=sys.stderr)
            warned = warned or warning is not None
            bar.update(1)
            bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / len(recent):.4f}",
                            acc=f"{sum(r['rewards/accuracies'] for r in recent) / len(recent):.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
            if cfg.eval_every > 0 and tr.step % cfg.eval_every == 0 and tr.step < cfg.steps and len(tr.eval_set):
                ev = run_evaluation(tr)  # every rank: the held-out pairs are split across them
                if main_rank:
                    with open(eval_log, "a") as ef:
                        ef.write(json.dumps({"step": tr.step, **ev}) + "\n")
                    if tr.trackers is not None:
                        tr.trackers.log(ev, tr.step, prefix="eval/")
                    bar.write(f"step {tr.step}: held-out accuracy {ev['accuracy']:.3f}")
            if cfg.save_every > 0 and tr.step % cfg.save_every == 0:
                save_checkpoint(tr, tr.step)
    bar.close()
    train_s = time.perf_counter() - t_start

    final_eval = run_evaluation(tr, diagnostics=True)
    if tr.syn is not None and len(tr.eval_set):  # the ceiling: a predictor that knows the generator's sources
        final_eval["bayes_accuracy"] = synthetic.bayes_accuracy(tr.eval_set.rows, tr.syn)
    final_eval.update(step=cfg.steps, train_wall_s=train_s)
    final_dir = tr.out_dir / "final"
    extra = {"train_config.json": {**cfg.to_dict(), "output_dir": str(tr.out_dir)}}
    full_sd = dist_lib.full_state_dict(tr.model, ctx) if ctx.strategy == "fsdp2" else None  # every rank
    if main_rank:
        write_json_atomic(tr.out_dir / "eval.json", final_eval)
        if tr.trackers is not None:
            tr.trackers.log(final_eval, cfg.steps, prefix="eval/")
        if ckpt_lib.is_peft(tr.model.policy):  # final/ is a plain HF model: merge the adapters into the weights
            tr.model.policy = tr.model.policy.merge_and_unload()
        # full_sd: under FSDP2 the full weights gathered to this rank (None otherwise); the same files
        tr.model.save_pretrained(final_dir, tokenizer=tr.tokenizer, extra_files=extra, state_dict=full_sd)
    dist_lib.barrier(ctx)  # the job ends when rank 0's files are written
    wall = time.perf_counter() - t_start
    return {"output_dir": str(tr.out_dir), "checkpoint": str(final_dir), "metrics": str(metrics_path),
            "eval_json": str(tr.out_dir / "eval.json"), "eval": final_eval, "wall_s": wall,
            "train_summary": _train_summary(metrics_path) if main_rank else {},
            "resumed_from": str(tr.resumed_from or "") or None, "rank": ctx.rank}


def _train_summary(metrics_path: Path) -> dict:
    """Means over the last 10% of steps (at least one) of the training metrics."""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not lines:
        return {}
    tail = lines[-max(1, len(lines) // 10):]
    keys = ["loss", "rewards/accuracies", "rewards/margins", "tokens_per_s", "lpc/kl", "lpc/code_perplexity"]
    return {"steps": lines[-1]["step"], **{k: sum(x[k] for x in tail) / len(tail) for k in keys if k in tail[0]}}


def format_summary(cfg: TrainConfig, summary: dict) -> str:
    """The final table ``main`` prints."""
    ev, ts = summary["eval"], summary.get("train_summary", {})
    rows = [("objective", f"{cfg.loss}{' + LPC' if cfg.lpc else ''}"),
            ("steps", f"{ts.get('steps', cfg.steps)} x {cfg.batch_size} pairs"),
            ("train loss (last 10%)", f"{ts['loss']:.4f}" if "loss" in ts else "-"),
            ("train reward accuracy", f"{ts['rewards/accuracies']:.3f}" if "rewards/accuracies" in ts else "-"),
            ("tokens/s", f"{ts['tokens_per_s']:.0f}" if "tokens_per_s" in ts else "-")]
    if ev.get("num_pairs"):
        rows.append(("held-out accuracy", f"{ev['accuracy']:.3f} on {ev['num_pairs']} pairs"
                     + (" (z from the prior)" if cfg.lpc else "")))
        rows.append(("held-out reward margin", f"{ev['reward_margin']:.4f}"))
        if "bayes_accuracy" in ev:
            rows.append(("Bayes-optimal / chance", f"{ev['bayes_accuracy']:.3f} / 0.500"))
        for name, acc in ev.get("accuracy_by_source", {}).items():
            rows.append((f"  source {name}", f"{acc:.3f}"))
        if "prior_code_perplexity" in ev:
            rows.append(("prior code perplexity", f"{ev['prior_code_perplexity']:.2f} of K={cfg.num_codes}"))
        if "code_source_nmi" in ev:
            rows.append(("code/source NMI", f"{ev['code_source_nmi']:.3f}"))
        if "accuracy_posterior" in ev:  # the leak diagnostics: all alike when z carries no label
            rows.append(("accuracy, z from",
                         f"posterior {ev['accuracy_posterior']:.3f}, swapped posterior "
                         f"{ev['accuracy_posterior_swapped']:.3f}, zero {ev['accuracy_zero_z']:.3f}"))
            by_code = ev["accuracy_by_code"]
            rows.append(("single codes z = E[k]", f"accuracy {min(by_code):.3f} to {max(by_code):.3f}"))
        if "z_rms_ratio" in ev:
            rows.append(("RMS z / RMS hidden", f"{ev['z_rms_ratio']:.3f}"))
    rows += [("wall time", f"{summary['wall_s']:.1f}s"), ("outputs", summary["output_dir"])]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule] + [f"{k:<{width}}  {v}" for k, v in rows] + [rule])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point: parse, train, print the summary table (bad input exits with a usage error)."""
    cfg = parse_args(argv)
    parser = build_parser()
    if cfg.output_dir and not cfg.resume and ckpt_lib.list_checkpoints(cfg.output_dir):
        parser.error(f"--output-dir: {cfg.output_dir} already holds checkpoints of a run; pass --resume latest "
                     "to continue it, or choose another --output-dir")
    try:
        summary = train(cfg)
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")
    except (FileNotFoundError, ImportError, DataError, IntegrityError) as exc:  # IntegrityError: checkpoints
        parser.error(str(exc))
    if summary.get("rank", 0) != 0:  # under torchrun rank 0 prints the results
        return summary
    ev = summary["eval"]
    if ev.get("num_pairs"):  # the first version's one-line result, kept for scripts that grep it
        print(f"held-out preference accuracy: {ev['accuracy']:.3f} on {ev['num_pairs']} pairs "
              f"({cfg.loss}{' + LPC, z from the prior' if cfg.lpc else ''})")
    print(format_summary(cfg, summary))
    heads = " + lpc_heads.safetensors" if cfg.lpc else ""
    print(f"outputs: {summary['output_dir']} (metrics.jsonl, eval.json, final/: model{heads}); "
          f"evaluate: python -m lpc.evaluate --run {summary['output_dir']}")
    return summary


def _cli() -> None:
    """``python -m lpc.train``. Under torchrun, ``record`` writes a failing rank's traceback to the error file
    torchrun reads, so its summary names the rank and the error that stopped the job first."""
    if dist_lib.launched_by_torchrun():
        record(main)()
    else:
        main()


if __name__ == "__main__":
    _cli()
