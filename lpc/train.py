"""``python -m lpc.train``: train LPC-DPO (or IPO / SimPO, with or without LPC) and evaluate on held-out pairs.

With no arguments: LPC-DPO on the built-in synthetic preference data (``lpc.synthetic``) with a tiny
random-init Llama and a locally trained word-level tokenizer, on CPU, in a few minutes. ``--model`` takes
a local HF model directory and ``--dataset`` a JSONL file of ``prompt``/``chosen``/``rejected`` rows.

Outputs under ``--output-dir`` (default ``runs/<loss>-<lpc|nolpc>-<timestamp>``):

* ``metrics.jsonl``: one JSON line per step (DESIGN.md names: ``rewards/*``, ``logps/*``, ``lpc/*``, plus
  ``loss``, ``step``, ``lr``, ``tokens_per_s``, ``lpc/mix``); ``eval.jsonl`` with ``--eval-every``.
* ``final/``: the policy (HF layout, safetensors), ``lpc_heads.safetensors`` (codebook and heads),
  ``lpc_config.json``, the tokenizer and ``train_config.json``; written to a temp dir, then renamed.
* ``eval.json``: the final held-out evaluation (``lpc.evaluate``), also written by temp file + rename.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import synthetic
from .config import INFERENCE_CODE, LOSS_TYPES, PRIOR_MIX, PRIOR_SAMPLE, SyntheticConfig, TrainConfig
from .data import PreferenceCollator, PreferenceDataset, batches, load_jsonl, to_device
from .evaluate import evaluate
from .losses import LossConfig, preference_objective, step_metrics
from .model import LPCModel, build_tiny_llama, make_reference, prior_mix_weight, reference_logps


# ------------------------------------------------------------------------------------------------ CLI
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m lpc.train", formatter_class=_HelpFormatter,
        description="Train a Latent Preference Coding (LPC) policy with DPO / IPO / SimPO. With no arguments: "
                    "LPC-DPO on synthetic preference data with a tiny random-init Llama on CPU.")
    a = p.add_argument
    a("--loss", choices=LOSS_TYPES, default=d.loss, help="pairwise preference loss")
    a("--lpc", action=argparse.BooleanOptionalAction, default=d.lpc,
      help="learn the latent codebook with prior/posterior heads (--no-lpc: plain DPO/IPO/SimPO)")
    a("--steps", type=int, default=d.steps, help="optimizer steps")
    a("--batch-size", type=int, default=d.batch_size, help="preference pairs per step")
    a("--lr", type=float, default=d.lr, help="peak AdamW learning rate (linear warmup, cosine decay to 10%%)")
    a("--head-lr", type=float, default=d.head_lr, help="learning rate of codebook and heads (default: --lr)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0 disables)")
    a("--num-codes", type=int, default=d.num_codes, help="codebook size K (paper: 32)")
    a("--codebook-init-std", type=float, default=d.codebook_init_std, help="std of the codebook's normal init")
    a("--head-hidden", type=int, default=d.head_hidden, help="prior/posterior MLP width (default: hidden size)")
    a("--kl-weight", type=float, default=d.kl_weight, help="weight of KL(posterior || prior) (paper: 0.05)")
    a("--beta", type=float, default=d.beta, help="DPO/IPO/SimPO beta")
    a("--gamma", type=float, default=d.gamma, help="SimPO target margin gamma (used by --loss simpo only)")
    a("--label-smoothing", type=float, default=d.label_smoothing, help="conservative DPO/SimPO epsilon")
    a("--ipo-average", action=argparse.BooleanOptionalAction, default=d.ipo_average,
      help="IPO on length-averaged log-probs (TRL); --no-ipo-average: the IPO paper's sums")
    a("--tau", type=float, default=d.tau, help="Gumbel-softmax temperature")
    a("--hard", action=argparse.BooleanOptionalAction, default=d.hard,
      help="one-hot (straight-through) Gumbel samples")
    a("--prior-mix", choices=PRIOR_MIX, default=d.prior_mix,
      help="z = g*z_prior + (1-g)*z_post with g rising linearly 0->1 over training, or g = 0")
    a("--prior-sample", choices=PRIOR_SAMPLE, default=d.prior_sample,
      help="z_prior in the mix: expected embedding softmax(prior) @ E, or a Gumbel sample of the prior")
    a("--inference", choices=INFERENCE_CODE, default=d.inference,
      help="evaluation z: expected prior embedding, or the argmax prior code")
    a("--detach-features", action=argparse.BooleanOptionalAction, default=d.detach_features,
      help="stop head gradients from flowing into the backbone through h_x, h_w, h_l")
    a("--seed", type=int, default=d.seed, help="seed of model init, data, shuffling and Gumbel noise")
    a("--output-dir", default=d.output_dir, help="output directory (default: runs/<loss>-<lpc|nolpc>-<time>)")
    a("--backend", default=d.backend, help="lpc_kernels backend: auto, reference, cpu, cuda, triton")
    a("--device", default=d.device, help="torch device (auto: cuda when available, else cpu)")
    a("--eval-size", type=int, default=d.eval_size, help="held-out preference pairs")
    a("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (0: only at the end)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size, help="pairs per evaluation batch")
    a("--model", default=d.model, help="local HF causal-LM directory (default: a tiny random-init Llama)")
    a("--dataset", default=d.dataset,
      help="JSONL with prompt/chosen/rejected (strings or chat-message lists) (default: the built-in "
           "synthetic data)")
    a("--max-length", type=int, default=d.max_length, help="max tokens per prompt+answer sequence")
    a("--hidden-size", type=int, default=d.hidden_size, help="tiny Llama hidden size D")
    a("--num-layers", type=int, default=d.num_layers, help="tiny Llama layers")
    a("--num-heads", type=int, default=d.num_heads, help="tiny Llama attention heads")
    a("--num-train", type=int, default=d.num_train, help="synthetic training pairs")
    a("--hint-prob", type=float, default=d.hint_prob, help="synthetic: probability a prompt names its source")
    a("--flip-fraction", type=float, default=d.flip_fraction,
      help="synthetic: fraction of training labels flipped (with a [flip] marker in the prompt)")
    a("--threads", type=int, default=d.threads,
      help="torch CPU threads (default: 1 for the tiny model, else min(cores, 8))")
    a("--cache-dir", default=d.cache_dir, help="tokenizer cache (default: $LPC_CACHE_DIR or ~/.cache/lpc-kernels)")
    a("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show the progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# ------------------------------------------------------------------------------------------- helpers
def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup - 1, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def default_threads(cfg: TrainConfig) -> int:
    """Intra-op threads when ``--threads`` is not given.

    The built-in tiny model's matmuls take about a millisecond: a second thread gains ~25% on an idle
    2-core machine, but on a shared one (OpenMP threads spin-waiting on oversubscribed cores) we measured
    the same run 6-7x slower with 2 threads than with 1. So one thread for the tiny model; real models
    (``--model``) have enough work per op to use the cores (capped at 8).
    """
    if cfg.model is None and cfg.hidden_size <= 256:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_data(cfg: TrainConfig, tokenizer):
    """``(train_set, eval_set, source_names, synthetic_config | None)``; held-out pairs are never trained on."""
    syn = None
    if cfg.dataset is None:
        syn = SyntheticConfig(num_train=cfg.num_train, num_eval=cfg.eval_size, hint_prob=cfg.hint_prob,
                              flip_fraction=cfg.flip_fraction, seed=cfg.seed)
        train_rows, eval_rows = synthetic.make_splits(syn)
        names = list(synthetic.SOURCES)
    else:
        rows = load_jsonl(cfg.dataset)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = min(cfg.eval_size, len(rows) // 2)
        eval_rows = [rows[i] for i in perm[:n_eval]]
        train_rows = [rows[i] for i in perm[n_eval:]]
        names = None
    # a real chat model (--model with a chat template) sees prompts the way it was tuned on them
    chat = cfg.model is not None and bool(getattr(tokenizer, "chat_template", None))
    return (PreferenceDataset(train_rows, tokenizer, cfg.max_length, chat_template=chat),
            PreferenceDataset(eval_rows, tokenizer, cfg.max_length, chat_template=chat), names, syn)


def build_policy(cfg: TrainConfig):
    """``(policy, tokenizer)``: ``--model`` from disk, else the tiny Llama with the synthetic tokenizer."""
    if cfg.model is None:
        from .tokenizer import load_synthetic_tokenizer

        tok = load_synthetic_tokenizer(cfg.cache_dir)
        policy = build_tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, seed=cfg.seed)
        return policy, tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.pad_token_id is None:  # padding positions are masked out, any id works
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    return policy, tok


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Run training and the final evaluation; returns ``{"output_dir", "eval", "wall_s", ...}``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads(cfg))
    try:
        return _train(cfg)
    finally:  # callers in the same process (tests, notebooks) keep their own thread setting
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = _resolve_device(cfg.device)
    tag = f"{cfg.loss}-{'lpc' if cfg.lpc else 'nolpc'}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(cfg.output_dir or Path("runs") / tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out_dir / "train_config.json", cfg.to_dict())

    policy, tokenizer = build_policy(cfg)
    train_set, eval_set, source_names, syn = build_data(cfg, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    model = LPCModel(policy, cfg.lpc_config(), backend=cfg.backend).to(device)
    loss_cfg = LossConfig(loss_type=cfg.loss, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
                          kl_weight=cfg.kl_weight, ipo_average=cfg.ipo_average, backend=cfg.backend)
    ref_model = make_reference(model.policy) if loss_cfg.needs_reference else None
    model.train()

    head_params = [p for n, p in model.named_parameters() if not n.startswith("policy.")]
    groups = [{"params": list(model.policy.parameters()), "lr": cfg.lr}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_lr or cfg.lr})
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optim.param_groups]

    # the trainer's generators: one for data order, one for Gumbel noise. Each step passes (seed, offset)
    # with offset advanced by the counters the previous step used, so no two steps share noise.
    data_gen = torch.Generator().manual_seed(cfg.seed)
    gumbel_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(cfg.seed + 1)))
    gumbel_offset = 0
    train_iter = batches(train_set, min(cfg.batch_size, len(train_set)), collator, generator=data_gen)

    from tqdm.auto import tqdm

    metrics_path = out_dir / "metrics.jsonl"
    eval_log = out_dir / "eval.jsonl"
    bar = tqdm(range(cfg.steps), desc=f"{'lpc-' if cfg.lpc else ''}{cfg.loss}", disable=not cfg.progress,
               dynamic_ncols=True, file=sys.stderr)
    recent_acc: list[float] = []
    with open(metrics_path, "w") as mf:
        for step in bar:
            t0 = time.perf_counter()
            factor = _lr_factor(step, cfg.warmup_steps, cfg.steps)
            for g, lr in zip(optim.param_groups, base_lrs):
                g["lr"] = lr * factor
            batch = to_device(next(train_iter), device)
            mix = prior_mix_weight(step, cfg.steps, cfg.prior_mix) if cfg.lpc else 0.0
            ref = reference_logps(ref_model, batch, backend=cfg.backend) if ref_model is not None else (None, None)
            out = model(batch, mix=mix, seed=gumbel_seed, offset=gumbel_offset)
            gumbel_offset += model.gumbel_numel(batch["prompt_lengths"].shape[0])
            res = preference_objective(out, ref[0], ref[1], loss_cfg)
            optim.zero_grad(set_to_none=True)
            res.loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optim.step()
            dt = time.perf_counter() - t0
            m = {"step": step + 1, **step_metrics(out, res), "lr": optim.param_groups[0]["lr"],
                 "tokens_per_s": out.num_tokens / dt}
            if cfg.lpc:
                m["lpc/mix"] = mix
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"loss is {m['loss']} at step {step + 1}")
            mf.write(json.dumps(m) + "\n")
            mf.flush()
            recent_acc = (recent_acc + [m["rewards/accuracies"]])[-20:]
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{sum(recent_acc) / len(recent_acc):.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
            if cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0 and (step + 1) < cfg.steps \
                    and len(eval_set):
                ev = evaluate(model, ref_model, eval_set, collator, loss_cfg, batch_size=cfg.eval_batch_size,
                              source_names=source_names)
                with open(eval_log, "a") as ef:
                    ef.write(json.dumps({"step": step + 1, **ev}) + "\n")
                bar.write(f"step {step + 1}: held-out accuracy {ev['accuracy']:.3f}")
    bar.close()
    train_s = time.perf_counter() - t_start

    final_eval = evaluate(model, ref_model, eval_set, collator, loss_cfg, batch_size=cfg.eval_batch_size,
                          source_names=source_names) if len(eval_set) else {"num_pairs": 0}
    if syn is not None and len(eval_set):  # the ceiling: a predictor that knows the generator's sources
        final_eval["bayes_accuracy"] = synthetic.bayes_accuracy(eval_set.rows, syn)
    final_eval.update(step=cfg.steps, train_wall_s=train_s)
    _write_json_atomic(out_dir / "eval.json", final_eval)
    ckpt = model.save_pretrained(out_dir / "final", tokenizer=tokenizer,
                                 extra_files={"train_config.json": cfg.to_dict()})
    wall = time.perf_counter() - t_start
    summary = {"output_dir": str(out_dir), "checkpoint": str(ckpt), "metrics": str(metrics_path),
               "eval_json": str(out_dir / "eval.json"), "eval": final_eval, "wall_s": wall}
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_args(argv)
    summary = train(cfg)
    ev = summary["eval"]
    if ev.get("num_pairs"):
        print(f"held-out preference accuracy: {ev['accuracy']:.3f} on {ev['num_pairs']} pairs "
              f"({cfg.loss}{' + LPC, z from the prior' if cfg.lpc else ''})"
              + (f"; Bayes-optimal {ev['bayes_accuracy']:.3f}, chance 0.5" if "bayes_accuracy" in ev else ""))
        if "accuracy_by_source" in ev:
            print("  by source: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["accuracy_by_source"].items()))
        if "code_source_nmi" in ev:
            print(f"  code/source NMI: {ev['code_source_nmi']:.3f}")
    heads = " + lpc_heads.safetensors" if cfg.lpc else ""
    print(f"outputs: {summary['output_dir']} (metrics.jsonl, eval.json, final/: model{heads}); "
          f"wall time {summary['wall_s']:.1f}s")
    return summary


if __name__ == "__main__":
    main()
