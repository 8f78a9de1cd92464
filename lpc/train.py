"""``python -m lpc.train``: train LPC-DPO (or IPO / SimPO, with or without LPC) and evaluate on held-out pairs.

``setup`` builds a run (``lpc.builders``, ``lpc.reference``, ``lpc.checkpoint``, ``lpc.distributed``) into a
``Trainer``; ``train_step`` runs one optimizer step over a global batch in micro-batches; the loop hands metrics,
evaluation and checkpoints to the components of ``lpc.train_components``; ``main`` is the CLI. What a run writes
under ``--output-dir``: README.md, "Training".
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import lpc_kernels as lk

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .builders import (build_collator, build_data, build_lpc_model, build_optimizer, build_policy, build_sampler,
                       build_tokenizer, check_paths, check_unknown_tokens, enable_gradient_checkpointing)
from .cli import build_parser, parse_command_line
from .config import ConfigError, TrainConfig
from .data import DataError, to_device
from .io import DirectoryInUse, DirectoryLock, IntegrityError, write_json_atomic
from .losses import leak_margins, merge_micro_batches, preference_objective, step_metrics
from .objective import Objective
from .reference import build_reference_scorers
from .runtime import autocast, autocast_dtype, determinism, log, resolve_device, threads_for
from .tracking import Trackers, check_trackers, trackers_of
from .train_components import Checkpointer, Evaluator, MetricsLog, Trainer, run_config


# ---------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, ctx: Optional[dist_lib.DistContext] = None,
          resume: Optional[ckpt_lib.ResumePoint] = None) -> Trainer:
    """Build model, reference, optimizer, scheduler, data order, and restore a checkpoint (``cfg.resume``).

    The global RNG of a resumed run is restored by ``train`` right before the first step. ``ctx``: this
    rank's place in a data-parallel job (``lpc.distributed``; default: one process on ``--device``). ``resume``:
    ``cfg.resume`` already resolved and verified (``lpc.cli.parse_command_line``).
    """
    ctx = ctx or dist_lib.DistContext(device=resolve_device(cfg.device))
    check_paths(cfg)  # before loading a model that may take minutes
    check_trackers(cfg.report_to)
    ckpt_path, state, out_dir, notes = ckpt_lib.find_resume(cfg, resume)
    # the tokenizer and the data before anything is written: data the tokenizer cannot read stops the run here
    tokenizer = build_tokenizer(cfg)
    data = build_data(cfg, tokenizer)
    shares = check_unknown_tokens(cfg, tokenizer, data[0], data[1])
    # (the synthetic data's own tokenizer covers it by construction: nothing to report)
    if tokenizer.unk_token is not None and (cfg.dataset is not None or cfg.model is not None):
        notes.append(f"data: unknown token {tokenizer.unk_token!r}: " + "; ".join(
            f"{share.prompt:.1%} of prompt and {share.answer:.1%} of answer tokens ({name} pairs)"
            for name, share in shares.items()) + f" (--max-unknown-token-share {cfg.max_unknown_token_share:g})")
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
        return _setup_locked(cfg, ctx, ckpt_path, state, out_dir, notes, lock, tokenizer, data)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup_locked(cfg: TrainConfig, ctx: dist_lib.DistContext, ckpt_path: Optional[Path], state: Optional[dict],
                  out_dir: Path, notes: list, lock: Optional[DirectoryLock], tokenizer, data: tuple) -> Trainer:
    device = ctx.device
    if ctx.is_main:
        write_json_atomic(out_dir / "train_config.json", run_config(cfg, out_dir))
    if cfg.batch_size % (ctx.world_size * cfg.gradient_accumulation_steps):
        raise ConfigError("batch_size", f"{cfg.batch_size} pairs cannot be split into {ctx.world_size} processes x "
                                        f"{cfg.gradient_accumulation_steps} micro-batches of equal size: use a "
                                        f"multiple of {ctx.world_size * cfg.gradient_accumulation_steps}")

    torch.manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg)
    if amp_dtype is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype", "bfloat16 is not supported by this GPU")
    policy, tokenizer = build_policy(cfg, tokenizer=tokenizer)
    train_set, eval_set, source_names, syn = data
    if len(train_set) < cfg.batch_size:
        raise ConfigError("batch_size", f"must be <= the {len(train_set)} training pairs, got {cfg.batch_size}")
    sampler = build_sampler(cfg, train_set, ctx.world_size, notes)
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
    mix = tr.model.mix_at(step, cfg.steps)
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
        draw = tr.model.step_draw(step, cfg.steps, seed=tr.gumbel_seed, global_batch=cfg.batch_size,
                                  first_index=first)
        with tr.autocast():
            ref = tr.train_ref(batch) if tr.train_ref is not None else (None, None)
            objective = Objective(ref[0], ref[1], tr.loss_cfg, kl_weight) if cfg.fused_loss else None
            out = forward(batch, **draw._asdict(), diagnostics=cfg.latent_diagnostics, objective=objective)
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


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, resume: Optional[ckpt_lib.ResumePoint] = None) -> dict:
    """Run training and the final evaluation (``resume``: ``cfg.resume`` already resolved, see ``setup``).

    Returns ``{"output_dir", "checkpoint" (final/), "metrics", "eval_json", "eval", "wall_s",
    "train_summary", "resumed_from", "rank"}``.
    """
    # --strategy ddp|fsdp2: a process group (torchrun's environment; NCCL on GPU, gloo on CPU), destroyed on the
    # way out; a rank that raises aborts it and exits non-zero (torchrun then stops the others)
    with determinism(cfg.deterministic), threads_for(cfg), dist_lib.process_group(cfg.strategy, cfg.device) as ctx:
        return _run(cfg, ctx, resume)


def _run(cfg: TrainConfig, ctx: dist_lib.DistContext, resume: Optional[ckpt_lib.ResumePoint]) -> dict:
    t_start = time.perf_counter()
    tr = setup(cfg, ctx, resume)
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
    _announce(tr)
    if tr.resumed_from is not None:
        ckpt_lib.load_rng(tr.resumed_from, tr.resume_state)
    evaluator, checkpointer = Evaluator(tr), Checkpointer(tr)
    with MetricsLog(tr) as metrics:
        for step in range(tr.step, tr.cfg.steps):
            m = train_step(tr, step)
            tr.step = step + 1
            metrics.log(m, tr.step)
            evaluator.maybe_evaluate(tr.step, metrics)
            checkpointer.maybe_save(tr.step)
    final_eval = evaluator.final(train_wall_s=time.perf_counter() - t_start)
    checkpointer.save_final()
    return {"output_dir": str(tr.out_dir), "checkpoint": str(checkpointer.final_dir), "metrics": str(metrics.path),
            "eval_json": str(evaluator.path), "eval": final_eval, "wall_s": time.perf_counter() - t_start,
            "train_summary": metrics.summary() if tr.dist.is_main else {},
            "resumed_from": str(tr.resumed_from or "") or None, "rank": tr.dist.rank}


def _announce(tr: Trainer) -> None:
    """Rank 0 prints what the run is about to do: data loading and truncation, the process layout, the notes."""
    if not tr.dist.is_main:
        return
    cfg, ctx = tr.cfg, tr.dist
    for st in getattr(tr.train_set, "load_stats", []):
        log(st.summary())
    if tr.train_set.num_truncated or tr.eval_set.num_truncated:
        log(f"data: {tr.train_set.num_truncated} training and {tr.eval_set.num_truncated} held-out pairs "
            f"truncated to --max-length {cfg.max_length}"
            + (f" / --max-prompt-length {cfg.max_prompt_length}" if cfg.max_prompt_length else ""))
    if ctx.strategy != "none":
        log(f"{ctx.strategy}: {ctx.world_size} process(es), {ctx.backend} on {ctx.device.type}; "
            f"{cfg.batch_size // ctx.world_size} of the {cfg.batch_size} pairs of each step per rank")
    for note in tr.notes:
        log(note)


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
    cfg, resume = parse_command_line(argv)
    parser = build_parser()
    if cfg.output_dir and not cfg.resume and ckpt_lib.list_checkpoints(cfg.output_dir):
        parser.error(f"--output-dir: {cfg.output_dir} already holds checkpoints of a run; pass --resume latest "
                     "to continue it, or choose another --output-dir")
    try:
        summary = train(cfg, resume)
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
