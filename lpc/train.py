"""``python -m lpc.train``: train LPC-DPO (or IPO / SimPO, with or without LPC) and evaluate on held-out pairs.

With no arguments: LPC-DPO on the built-in synthetic preference data (``lpc.synthetic``) with a tiny
random-init Llama and a locally trained word-level tokenizer, on CPU, in a few minutes. ``--model`` takes
a local HF model directory or hub id, ``--dataset`` a JSONL / JSON / Parquet file or a ``datasets`` name.
Every flag can also come from ``--config file.yaml|json``; explicit flags override the file.

Outputs under ``--output-dir`` (default ``runs/<loss>-<lpc|nolpc>-<timestamp>``):

* ``train_config.json``: the resolved configuration (``--config`` accepts it back).
* ``metrics.jsonl``: one JSON line per step (DESIGN.md names: ``rewards/*``, ``logps/*``, ``lpc/*``, plus
  ``loss``, ``step``, ``epoch``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``lpc/mix``); ``eval.jsonl``
  with ``--eval-every``.
* ``checkpoints/step-N/`` with ``--save-every`` (``lpc.checkpoint``); ``--resume`` continues from one.
* ``ref_logps.safetensors`` with ``--precompute-ref-logps``.
* ``final/``: the policy (HF layout, safetensors; LoRA adapters merged), ``lpc_heads.safetensors``
  (codebook and heads), ``lpc_config.json``, the tokenizer and ``train_config.json``; written to a temp
  dir, then renamed. ``eval.json``: the final held-out evaluation (``lpc.evaluate``).

The code is split for data-parallel training: ``setup`` (model, reference, optimizer, data, checkpoint)
and ``train_step`` (one optimizer step over a global batch, in micro-batches). The data order is a pure
function of ``(seed, epoch)`` plus a position (``lpc.data.EpochSampler``); the Gumbel noise of every
example a pure function of ``(seed, step, index in the global batch)`` (``LPCModel.gumbel_offsets``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from . import synthetic
from .cli import HelpFormatter
from .config import (BACKENDS, DTYPES, INFERENCE_CODE, LOSS_TYPES, LR_SCHEDULERS, PRIOR_MIX, PRIOR_SAMPLE,
                     STRATEGIES, ConfigError, SyntheticConfig, TrainConfig)
from .data import (DataError, EpochSampler, PreferenceCollator, PreferenceDataset, _looks_local, assign_source_ids,
                   load_preference_rows, to_device)
from .evaluate import evaluate
from .io import write_json_atomic, write_text_atomic
from .losses import LossConfig, preference_objective, step_metrics
from .model import LPCModel, LPCOutput, _quiet_transformers, build_tiny_llama, make_reference, prior_mix_weight
from .reference import (CACHE_FILE, AdapterDisabledReference, CachedReference, LiveReference, _autocast,
                        compute_reference_logps, load_cache, save_cache)

# fields that may differ between a checkpoint and the run resuming it (they do not change the numbers,
# or, for steps, the user asked to extend / shorten the run: the schedule then differs from the original)
RESUME_FREE = {"output_dir", "resume", "progress", "threads", "eval_every", "eval_batch_size", "save_every",
               "keep_checkpoints", "cache_dir", "device", "backend", "steps", "precompute_ref_logps", "strict",
               "strategy"}
# fields a resumed run does not take from the checkpoint's config: how THIS invocation is launched (a
# checkpoint saved under torchrun --strategy fsdp2 resumes in one plain process, and the reverse)
LAUNCH_FIELDS = ("resume", "strategy")


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lpc.train`` argument parser (one flag per ``TrainConfig`` field, plus ``--config``)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m lpc.train", formatter_class=HelpFormatter,
        description="Train a Latent Preference Coding (LPC) policy with DPO / IPO / SimPO. With no arguments: "
                    "LPC-DPO on synthetic preference data with a tiny random-init Llama on CPU.")
    a = p.add_argument
    a("--config", default=None,
      help="YAML or JSON file of settings (keys: flag names, with - or _); flags given on the command line "
           "override it. A run's train_config.json is such a file (default: none)")
    g = p.add_argument_group("objective").add_argument
    g("--loss", choices=LOSS_TYPES, default=d.loss, help="pairwise preference loss")
    g("--lpc", action=argparse.BooleanOptionalAction, default=d.lpc,
      help="learn the latent codebook with prior/posterior heads (--no-lpc: plain DPO/IPO/SimPO)")
    g("--beta", type=float, default=d.beta, help="DPO/IPO/SimPO beta")
    g("--gamma", type=float, default=d.gamma, help="SimPO target margin gamma (used by --loss simpo only)")
    g("--label-smoothing", type=float, default=d.label_smoothing, help="conservative DPO/SimPO epsilon")
    g("--ipo-average", action=argparse.BooleanOptionalAction, default=d.ipo_average,
      help="IPO on length-averaged log-probs (TRL); --no-ipo-average: the IPO paper's sums")
    g("--kl-weight", type=float, default=d.kl_weight, help="weight of KL(posterior || prior) (paper: 0.05)")
    g("--num-codes", type=int, default=d.num_codes, help="codebook size K (paper: 32)")
    g("--codebook-init-std", type=float, default=d.codebook_init_std, help="std of the codebook's normal init")
    g("--head-hidden", type=int, default=d.head_hidden, help="prior/posterior MLP width (default: hidden size)")
    g("--tau", type=float, default=d.tau, help="Gumbel-softmax temperature")
    g("--hard", action=argparse.BooleanOptionalAction, default=d.hard,
      help="one-hot (straight-through) Gumbel samples")
    g("--prior-mix", choices=PRIOR_MIX, default=d.prior_mix,
      help="z = g*z_prior + (1-g)*z_post with g rising linearly 0->1 over training, or g = 0")
    g("--prior-sample", choices=PRIOR_SAMPLE, default=d.prior_sample,
      help="z_prior in the mix: expected embedding softmax(prior) @ E, or a Gumbel sample of the prior")
    g("--inference", choices=INFERENCE_CODE, default=d.inference,
      help="evaluation z: expected prior embedding, or the argmax prior code")
    g("--detach-features", action=argparse.BooleanOptionalAction, default=d.detach_features,
      help="stop head gradients from flowing into the backbone through h_x, h_w, h_l")

    g = p.add_argument_group("optimisation").add_argument
    g("--steps", type=int, default=d.steps, help="optimizer steps")
    g("--batch-size", type=int, default=d.batch_size,
      help="preference pairs per optimizer step (the global batch, split by --gradient-accumulation-steps)")
    g("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
      help="micro-batches per optimizer step (each of batch-size / N pairs); must divide --batch-size")
    g("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    g("--head-lr", type=float, default=d.head_lr, help="learning rate of codebook and heads (default: --lr)")
    g("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g("--lr-scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler,
      help="after linear warmup: cosine or linear decay to --min-lr-ratio of the peak, or constant")
    g("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps")
    g("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate / peak (cosine, linear)")
    g("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0 disables)")
    g("--dtype", choices=DTYPES, default=d.dtype,
      help="compute dtype: bfloat16 runs the model under autocast with fp32 master weights (with LoRA the "
           "frozen base weights and the reference are stored in bf16); codebook and heads stay fp32")
    g("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing,
      help="recompute activations in the backward pass (less activation memory, more compute)")
    g("--seed", type=int, default=d.seed, help="seed of model init, data order and Gumbel noise")

    g = p.add_argument_group("model").add_argument
    g("--model", default=d.model,
      help="HF causal LM: a local directory or a hub id (default: a tiny random-init Llama)")
    g("--ref-model", default=d.ref_model,
      help="DPO/IPO reference model (default: a frozen copy of the initial policy; with LoRA the policy with "
           "adapters disabled)")
    g("--precompute-ref-logps", action=argparse.BooleanOptionalAction, default=d.precompute_ref_logps,
      help="score the dataset with the reference once before training, cache the log-probs in "
           "<run>/ref_logps.safetensors and free the reference model (DPO/IPO)")
    g("--lora-r", type=int, default=d.lora_r, help="LoRA rank through peft (0: full fine-tuning)")
    g("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha")
    g("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout")
    g("--lora-target-modules", default=d.lora_target_modules,
      help="modules LoRA adapts: all-linear (every linear layer but the LM head) or a comma-separated list")
    g("--hidden-size", type=int, default=d.hidden_size, help="tiny Llama hidden size D (without --model)")
    g("--num-layers", type=int, default=d.num_layers, help="tiny Llama layers (without --model)")
    g("--num-heads", type=int, default=d.num_heads, help="tiny Llama attention heads (without --model)")

    g = p.add_argument_group("data").add_argument
    g("--dataset", default=d.dataset,
      help="local .jsonl/.json/.parquet with prompt/chosen/rejected (strings or chat-message lists, "
           "UltraFeedback-binarized layout, optional source column) or a `datasets` name (default: the "
           "built-in synthetic data)")
    g("--dataset-split", default=d.dataset_split, help="split of a named dataset (e.g. train_prefs)")
    g("--eval-dataset", default=d.eval_dataset,
      help="held-out file or dataset name (default: --eval-size pairs held out of --dataset)")
    g("--eval-split", default=d.eval_split,
      help="held-out split of the named dataset (e.g. test_prefs) (default: held out of the training split)")
    g("--eval-size", type=int, default=d.eval_size,
      help="held-out preference pairs (a seeded random subset of --dataset, or the first N of the eval split)")
    g("--max-length", type=int, default=d.max_length, help="max tokens per prompt+answer sequence")
    g("--max-prompt-length", type=int, default=d.max_prompt_length,
      help="prompts keep their last N tokens; answers are then cut to fit --max-length (default: prompts "
           "are cut to half of --max-length only when a pair does not fit)")
    g("--strict", action=argparse.BooleanOptionalAction, default=d.strict,
      help="stop with an error at the first malformed row (default: skip and count them)")
    g("--num-train", type=int, default=d.num_train, help="synthetic training pairs")
    g("--hint-prob", type=float, default=d.hint_prob, help="synthetic: probability a prompt names its source")
    g("--flip-fraction", type=float, default=d.flip_fraction, help="synthetic: fraction of training labels flipped")
    g("--flip-marker", action=argparse.BooleanOptionalAction, default=d.flip_marker,
      help="append the [flip] marker to flipped prompts (the paper's protocol); --no-flip-marker: unmarked "
           "label noise")

    g = p.add_argument_group("evaluation, checkpoints and output").add_argument
    g("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (0: only at the end)")
    g("--eval-batch-size", type=int, default=d.eval_batch_size, help="pairs per evaluation batch")
    g("--output-dir", default=d.output_dir, help="run directory (default: runs/<loss>-<lpc|nolpc>-<time>)")
    g("--save-every", type=int, default=d.save_every, help="write a checkpoint every N steps (0: none)")
    g("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept (0: all)")
    g("--resume", default=d.resume,
      help="continue from a checkpoint dir, a run dir (its newest checkpoint) or 'latest' (newest under "
           "--output-dir; starts fresh when there is none). Settings come from the checkpoint unless given "
           "(default: none)")
    g("--backend", choices=BACKENDS, default=d.backend, help="lpc_kernels backend")
    g("--device", default=d.device, help="torch device (auto: cuda when available, else cpu; under torchrun "
                                         "each rank takes cuda:LOCAL_RANK)")
    g("--strategy", choices=STRATEGIES, default=d.strategy,
      help="data parallelism under torchrun (torchrun --nproc-per-node N -m lpc.train ...): ddp replicates the "
           "model, fsdp2 shards it (fully_shard per decoder layer); each rank takes its slice of the same global "
           "--batch-size, so the run matches a 1-process run. NCCL on GPU, gloo on CPU; none: one process")
    g("--threads", type=int, default=d.threads,
      help="torch CPU threads (default: 1 for the tiny model, else min(cores, 8))")
    g("--cache-dir", default=d.cache_dir, help="tokenizer cache (default: $LPC_CACHE_DIR or ~/.cache/lpc-kernels)")
    g("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show the progress bar")
    return p


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """A config-file value checked (and converted) like the flag would be."""
    flag = action.option_strings[0]
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(action.dest, f"{where}: {flag} cannot be null")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(action.dest, f"{where}: {flag} must be true or false, got {value!r}")
        return value
    typ = action.type or str
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        if not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            raise ConfigError(action.dest, f"{where}: {flag} must be an integer, got {value!r}")
    if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ConfigError(action.dest, f"{where}: {flag} must be a number, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(action.dest, f"{where}: {flag} must be a string, got {value!r}")
    try:
        value = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(action.dest, f"{where}: {flag} must be {typ.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(action.dest, f"{where}: {flag} must be one of {list(action.choices)}, got {value!r}")
    return value


def read_config_file(path: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Settings from a YAML (``.yaml``/``.yml``) or JSON file, keyed by ``TrainConfig`` field name.

    Keys may use ``-`` or ``_``; values are checked like the flags. Raises ``ConfigError`` naming the
    key for unknown keys (with a suggestion) and bad values, ``ValueError`` for unreadable files.
    """
    parser = parser or build_parser()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("config", f"file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("config", f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use a "
                                        ".json config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid JSON: {exc}") from None
    else:
        raise ConfigError("config", f"{path}: expected a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    actions = _actions_by_dest(parser)
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError("config", f"{path}: unknown setting {key!r}{hint}")
        out[dest] = _coerce(actions[dest], value, str(path))
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags -> ``TrainConfig``. Precedence: explicit flags > the resumed checkpoint's config > ``--config``
    file > defaults. Bad values exit with ``python -m lpc.train: error: --flag: ...``."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--resume", "--output-dir"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    layered: dict = {}
    try:
        if known.config:
            layered.update(read_config_file(known.config, parser))
        resume = known.resume or layered.get("resume")
        if resume:
            out_dir = known.output_dir or layered.get("output_dir")
            found = ckpt_lib.resolve_resume(resume, out_dir)
            if found is not None:
                saved = ckpt_lib.read_state(found)["config"]
                actions = _actions_by_dest(parser)
                layered.update({k: v for k, v in saved.items() if k in actions and k not in LAUNCH_FIELDS})
                layered["output_dir"] = out_dir or str(ckpt_lib.run_dir_of(found))
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")
    except ValueError as exc:
        parser.error(str(exc))
    parser.set_defaults(**layered)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return TrainConfig(**args)
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")


# ------------------------------------------------------------------------------------------- helpers
def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warmup ``(step + 1) / warmup``, then cosine or
    linear decay from 1 to ``min_ratio`` at the last step, or constant 1."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup - 1, 1), 1.0)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_threads(cfg: TrainConfig) -> int:
    """Intra-op threads when ``--threads`` is not given.

    The built-in tiny model's matmuls take about a millisecond: a second thread gains ~25% on an idle
    2-core machine, but on a shared one (OpenMP threads spin-waiting on oversubscribed cores) we measured
    the same run 6-7x slower with 2 threads than with 1. So one thread for the tiny model; real models
    (``--model``) have enough work per op to use the cores (capped at 8).
    """
    if cfg.model is None and cfg.hidden_size <= 256:
        return 1
    # under torchrun the node's cores are shared by its LOCAL_WORLD_SIZE processes
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min((os.cpu_count() or 1) // local_world, 8))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but torch sees no CUDA device")
    return dev


def _autocast_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_model_spec(spec: str, flag: str) -> None:
    """Fail fast on a local model path that is not an HF model directory (hub ids pass through)."""
    p = Path(spec).expanduser()
    local = p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if not local:
        return
    if not p.is_dir():
        raise ConfigError(flag, f"{spec!r} is not a directory (pass an HF model directory or a hub id)")
    if not (p / "config.json").is_file():
        raise ConfigError(flag, f"{spec!r} has no config.json: not an HF model directory")


def build_data(cfg: TrainConfig, tokenizer):
    """``(train_set, eval_set, source_names, synthetic_config | None)``; held-out pairs are never trained on.

    ``train_set.load_stats`` holds the loaders' ``LoadStats`` (what was skipped) for file datasets.
    """
    syn = None
    stats = []
    if cfg.dataset is None:
        syn = SyntheticConfig(num_train=cfg.num_train, num_eval=cfg.eval_size, hint_prob=cfg.hint_prob,
                              flip_fraction=cfg.flip_fraction, seed=cfg.seed, flip_marker=cfg.flip_marker)
        train_rows, eval_rows = synthetic.make_splits(syn)
        names = list(synthetic.SOURCES)
    else:
        rows, st = load_preference_rows(cfg.dataset, split=cfg.dataset_split, strict=cfg.strict)
        stats.append(st)
        if cfg.eval_dataset is not None or cfg.eval_split is not None:
            eval_rows, st = load_preference_rows(cfg.eval_dataset or cfg.dataset,
                                                 split=cfg.eval_split or cfg.dataset_split, strict=cfg.strict)
            stats.append(st)
            eval_rows = eval_rows[:cfg.eval_size]
            train_rows = rows
        else:
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_eval = min(cfg.eval_size, len(rows) // 2)
            eval_rows = [rows[i] for i in perm[:n_eval]]
            train_rows = [rows[i] for i in perm[n_eval:]]
        names = assign_source_ids(train_rows, eval_rows)
    # a real chat model (--model with a chat template) sees prompts the way it was tuned on them
    chat = cfg.model is not None and bool(getattr(tokenizer, "chat_template", None))
    kw = dict(chat_template=chat, max_prompt_length=cfg.max_prompt_length)
    train_set = PreferenceDataset(train_rows, tokenizer, cfg.max_length, **kw)
    eval_set = PreferenceDataset(eval_rows, tokenizer, cfg.max_length, **kw)
    train_set.load_stats = stats
    return train_set, eval_set, names, syn


def build_policy(cfg: TrainConfig, model_spec: Optional[str] = None):
    """``(policy, tokenizer)``: ``--model`` (or ``model_spec``) from disk/hub, else the tiny Llama built from
    ``cfg.seed`` with the synthetic tokenizer. Weights are fp32, except bf16 for ``--dtype bfloat16``
    with LoRA (frozen base weights need no fp32 master copy)."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" and cfg.lora_r > 0 else torch.float32
    spec = model_spec or cfg.model
    if spec is None:
        from .tokenizer import load_synthetic_tokenizer

        tok = load_synthetic_tokenizer(cfg.cache_dir)
        policy = build_tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, seed=cfg.seed)
        return policy.to(dtype), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token_id is None:  # padding positions are masked out, any id works
        tok.pad_token = tok.eos_token
    with _quiet_transformers():
        policy = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return policy, tok


def load_reference_model(cfg: TrainConfig) -> torch.nn.Module:
    """The ``--ref-model`` (frozen, eval mode; bf16 weights with ``--dtype bfloat16``)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    with _quiet_transformers():
        return make_reference(AutoModelForCausalLM.from_pretrained(cfg.ref_model, dtype=dtype))


def initial_reference(cfg: TrainConfig, policy=None) -> torch.nn.Module:
    """A run's frozen DPO/IPO reference rebuilt after training (evaluation, the study): ``--ref-model``, else a
    copy of the initial policy (``policy``, default ``build_policy(cfg)``: seeded, so the trainer's; for LoRA
    runs the base model)."""
    if cfg.ref_model is not None:
        return load_reference_model(cfg)
    return make_reference(policy if policy is not None else build_policy(cfg)[0])


def apply_lora(policy, cfg: TrainConfig):
    """Wrap ``policy`` with ``peft`` LoRA adapters (fp32 adapters on possibly-bf16 frozen weights)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("--lora-r needs the optional `peft` package: pip install peft (or drop --lora-r "
                          "for full fine-tuning)") from None
    targets = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API that v5 renamed; not actionable here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(policy, lcfg)
    except ValueError as exc:  # e.g. target modules not found
        raise ConfigError("lora_target_modules", str(exc)) from None


# ---------------------------------------------------------------------------------------------- setup
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
    # data parallelism (lpc.distributed): this rank's place, and the module training forwards go through
    # (the DDP wrapper; under FSDP2 and without a strategy ``model`` itself)
    dist: dist_lib.DistContext = field(default_factory=dist_lib.DistContext)
    train_model: Optional[torch.nn.Module] = None
    # every parameter the optimizer updates (what gradient clipping covers): fixed once the optimizer is
    # built (loading its state on resume keeps the same parameter objects)
    params: list = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = dist_lib._flat_params(self.optimizer)

    def autocast(self):
        """The forward-pass autocast context (``--dtype bfloat16``), or a no-op."""
        return _autocast(self.device, self.autocast_dtype)


def _check_resume_compatible(cfg: TrainConfig, saved: dict, path: Path) -> list[str]:
    """Raise on settings that would make the resumed run a different run; return notes on free ones."""
    now = cfg.to_dict()
    bad = [k for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if bad:
        raise ConfigError("resume", f"{path} was trained with " + ", ".join(
            f"{k}={saved[k]!r}" for k in bad) + "; this run has " + ", ".join(f"{k}={now[k]!r}" for k in bad)
            + ". Resume with the checkpoint's settings, or start a new run (another --output-dir)")
    notes = []
    if saved.get("steps") != cfg.steps:
        notes.append(f"steps changed {saved.get('steps')} -> {cfg.steps}: the learning-rate schedule and the "
                     "prior mix follow the new total from here")
    return notes


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of a metrics file with ``step <= max_step`` (what a killed run wrote after its last
    checkpoint is redone by the resumed run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))


def reference_fingerprint(cfg: TrainConfig, train_set: PreferenceDataset, eval_set: PreferenceDataset) -> str:
    """Identifies what a reference-logp cache was computed from: the tokenised pairs and the reference."""
    import hashlib

    if cfg.ref_model is not None:
        ref_id = f"model:{cfg.ref_model}"
    elif cfg.model is not None:
        ref_id = f"initial:{cfg.model}"
    else:  # the tiny model: its init depends on the seed and shape
        ref_id = f"tiny:{cfg.seed}:{cfg.hidden_size}:{cfg.num_layers}:{cfg.num_heads}"
    return hashlib.sha256(json.dumps([train_set.fingerprint(), eval_set.fingerprint(), ref_id, cfg.dtype,
                                      cfg.lora_r > 0]).encode()).hexdigest()


def _setup_reference(tr_cfg: TrainConfig, policy, model: LPCModel, train_set, eval_set, collator, device,
                     autocast_dtype, out_dir: Path, notes: list, ctx: Optional[dist_lib.DistContext] = None):
    """``(train_ref, eval_ref)`` scorers for DPO/IPO (``(None, None)`` for SimPO).

    Data-parallel (``ctx``): the live reference is replicated (DDP) or sharded like the policy (FSDP2);
    ``--precompute-ref-logps`` scores each rank's share of the pairs and gathers them, rank 0 writes the cache.
    """
    cfg = tr_cfg
    ctx = ctx or dist_lib.DistContext()
    if cfg.loss == "simpo":
        return None, None
    if cfg.ref_model is not None:
        ref_model = load_reference_model(cfg).to(device)
        live = LiveReference(ref_model, backend=cfg.backend, autocast_dtype=autocast_dtype)
    elif cfg.lora_r > 0:
        ref_model = None
        live = AdapterDisabledReference(model.policy, backend=cfg.backend, autocast_dtype=autocast_dtype)
    else:
        ref_model = make_reference(policy)
        if autocast_dtype is not None:  # frozen: no fp32 master copy needed
            ref_model.to(autocast_dtype)
        live = LiveReference(ref_model, backend=cfg.backend, autocast_dtype=autocast_dtype)
    if not cfg.precompute_ref_logps:
        if ctx.strategy == "fsdp2" and ref_model is not None:  # (fsdp2 with LoRA is refused by TrainConfig)
            live = dist_lib.wrap_reference(ref_model, ctx, backend=cfg.backend, autocast_dtype=autocast_dtype)
        return live, live
    fp = reference_fingerprint(cfg, train_set, eval_set)
    cache_path = out_dir / CACHE_FILE
    cached = load_cache(cache_path, fp)
    # rank 0 decides, so that every rank takes the same branch (computing has collectives)
    hit = dist_lib.broadcast_object(cached is not None, ctx)
    if hit and cached is None:
        raise FileNotFoundError(f"rank {ctx.rank} cannot read {cache_path}, which rank 0 read: the run directory "
                                "must be on a filesystem every rank sees")
    if not hit:
        cached = None
    if cached is None:
        t0 = time.perf_counter()
        tensors = {}
        for split, ds in (("train", train_set), ("eval", eval_set)):
            # each rank scores its contiguous share (the unsharded reference: no collective per batch), then
            # the shares are gathered in rank order = dataset order
            share = dist_lib.IndexView(ds, dist_lib.split_evenly(len(ds), ctx.rank, ctx.world_size))
            c, r = compute_reference_logps(live, share, collator, batch_size=cfg.eval_batch_size, device=device)
            tensors[f"{split}.chosen"], tensors[f"{split}.rejected"] = (dist_lib.gather_rows(c, ctx),
                                                                        dist_lib.gather_rows(r, ctx))
        if ctx.is_main:
            save_cache(cache_path, tensors, fp)
        dist_lib.barrier(ctx)
        notes.append(f"reference log-probs of {len(train_set) + len(eval_set)} pairs cached in {cache_path} "
                     f"({time.perf_counter() - t0:.1f}s)")
        cached = tensors
    else:
        notes.append(f"reference log-probs read from {cache_path}")
    del ref_model, live  # training holds one model from here on
    return (CachedReference(cached["train.chosen"], cached["train.rejected"]),
            CachedReference(cached["eval.chosen"], cached["eval.rejected"]))


def setup(cfg: TrainConfig, ctx: Optional[dist_lib.DistContext] = None) -> Trainer:
    """Build model, reference, optimizer, scheduler, data order, and restore a checkpoint (``cfg.resume``).

    The global RNG of a resumed run is restored by ``train`` right before the first step. ``ctx``: this
    rank's place in a data-parallel job (``lpc.distributed``; default: one process on ``--device``).
    """
    ctx = ctx or dist_lib.DistContext(device=_resolve_device(cfg.device))
    device = ctx.device
    for name in ("model", "ref_model"):
        if getattr(cfg, name) is not None:
            _check_model_spec(getattr(cfg, name), name)
    for name in ("dataset", "eval_dataset"):  # before loading a model that may take minutes
        spec = getattr(cfg, name)
        if spec is not None and _looks_local(spec) and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: dataset file {spec!r} does not exist")
    ckpt_path, state, notes = None, None, []
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if cfg.resume:
        try:
            ckpt_path = ckpt_lib.resolve_resume(cfg.resume, out_dir)
        except ValueError as exc:
            raise ConfigError("resume", str(exc)) from None
        if ckpt_path is not None:
            state = ckpt_lib.read_state(ckpt_path)
            out_dir = out_dir or ckpt_lib.run_dir_of(ckpt_path)
            notes += _check_resume_compatible(cfg, state["config"], ckpt_path)
        else:
            notes.append(f"--resume latest: no checkpoint under {out_dir}, starting from step 0")
    if out_dir is None:
        tag = f"{cfg.loss}-{'lpc' if cfg.lpc else 'nolpc'}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path("runs") / tag
    out_dir = Path(dist_lib.broadcast_object(str(out_dir), ctx))  # rank 0's: the timestamps may differ
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        write_json_atomic(out_dir / "train_config.json", {**cfg.to_dict(), "output_dir": str(out_dir)})
    if cfg.batch_size % (ctx.world_size * cfg.gradient_accumulation_steps):
        raise ConfigError("batch_size", f"{cfg.batch_size} pairs cannot be split into {ctx.world_size} processes x "
                                        f"{cfg.gradient_accumulation_steps} micro-batches of equal size: use a "
                                        f"multiple of {ctx.world_size * cfg.gradient_accumulation_steps}")

    torch.manual_seed(cfg.seed)
    autocast_dtype = _autocast_dtype(cfg)
    if autocast_dtype is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype", "bfloat16 is not supported by this GPU")
    policy, tokenizer = build_policy(cfg)
    train_set, eval_set, source_names, syn = build_data(cfg, tokenizer)
    if len(train_set) < cfg.batch_size:
        raise ConfigError("batch_size", f"must be <= the {len(train_set)} training pairs, got {cfg.batch_size}")
    collator = PreferenceCollator(tokenizer.pad_token_id)
    if cfg.gradient_checkpointing:
        if not getattr(policy, "supports_gradient_checkpointing", False):
            raise ConfigError("gradient_checkpointing", f"{type(policy).__name__} does not support it")
        # transformers v5 renamed the method (the old name warns); non-reentrant: works with frozen inputs
        if hasattr(policy, "activation_checkpointing_enable"):
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_policy = policy
    if cfg.lora_r > 0:
        policy = apply_lora(policy, cfg)
    model = LPCModel(policy, cfg.lpc_config(), backend=cfg.backend).to(device)
    loss_cfg = cfg.loss_config()
    train_ref, eval_ref = _setup_reference(cfg, base_policy if cfg.lora_r == 0 else None, model, train_set,
                                           eval_set, collator, device, autocast_dtype, out_dir, notes, ctx)
    model.train()
    if ckpt_path is not None:  # the weights before wrapping: FSDP2 shards what the model holds
        ckpt_lib.load_model_state(ckpt_path, model, state=state)
    # DDP: a wrapper for the training forwards; FSDP2: model sharded in place (optimizer built after it).
    # A parameter can miss a gradient only through the prior head, when nothing but the mix uses it
    train_model = dist_lib.wrap_model(model, ctx, mixed_precision=autocast_dtype,
                                      find_unused_parameters=cfg.lpc and cfg.kl_weight == 0)

    policy_params = [p for p in model.policy.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("policy.")]
    groups = [{"params": policy_params, "lr": cfg.lr}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.lr_scheduler, cfg.min_lr_ratio))
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed)
    # the Gumbel stream's seed: a pure function of --seed (offsets come from gumbel_offsets)
    gumbel_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(cfg.seed + 1)))

    tr = Trainer(cfg=cfg, device=device, out_dir=out_dir, model=model, tokenizer=tokenizer, collator=collator,
                 train_set=train_set, eval_set=eval_set, source_names=source_names, syn=syn, loss_cfg=loss_cfg,
                 train_ref=train_ref, eval_ref=eval_ref, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                 gumbel_seed=gumbel_seed, autocast_dtype=autocast_dtype, notes=notes, dist=ctx,
                 train_model=train_model)
    if ckpt_path is not None:
        # saved in the 1-process layout at any world size; FSDP2 takes each parameter's shard of it
        shard = ((lambda sd: dist_lib.shard_optimizer_state_dict(sd, optimizer)) if ctx.strategy == "fsdp2"
                 else None)
        state = ckpt_lib.load_training_state(ckpt_path, optimizer=optimizer, scheduler=scheduler,
                                             prepare_optimizer_state=shard, state=state)
        sampler.load_state_dict(state["data"])
        if state.get("gumbel_seed", gumbel_seed) != gumbel_seed:
            raise ValueError(f"{ckpt_path}: Gumbel seed differs from this run's (different --seed?)")
        tr.step, tr.resumed_from, tr.resume_state = int(state["step"]), ckpt_path, state
        if tr.step > cfg.steps:
            raise ConfigError("steps", f"the checkpoint is at step {tr.step}, past --steps {cfg.steps}")
        for name in ("metrics.jsonl", "eval.jsonl"):
            if ctx.is_main:
                _truncate_jsonl(out_dir / name, tr.step)
        notes.append(f"resumed from {ckpt_path} at step {tr.step}")
    return tr


# ------------------------------------------------------------------------------------------------ step
def _merge_outputs(outs: list[LPCOutput], results: list, accum: int):
    """One ``(LPCOutput, loss-like)`` for the metrics of an accumulated step (concatenated per-pair values)."""
    if len(outs) == 1:
        return outs[0], results[0]

    def cat(name, items):
        vals = [getattr(x, name) for x in items]
        return None if vals[0] is None else torch.cat(vals)

    out = LPCOutput(*(cat(f.name, outs) for f in dataclasses.fields(LPCOutput) if f.name != "num_tokens"),
                    num_tokens=sum(o.num_tokens for o in outs))
    res = SimpleNamespace(loss=sum(r.loss for r in results) / accum, losses=cat("losses", results),
                          chosen_rewards=cat("chosen_rewards", results),
                          rejected_rewards=cat("rejected_rewards", results), kl=cat("kl", results))
    return out, res


def _detach_output(out: LPCOutput) -> LPCOutput:
    return LPCOutput(*(v.detach() if isinstance(v, torch.Tensor) else v
                       for v in (getattr(out, f.name) for f in dataclasses.fields(LPCOutput))))


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
    lr = tr.optimizer.param_groups[0]["lr"]
    accum = cfg.gradient_accumulation_steps
    mb = (local.stop - local.start) // accum
    forward = tr.train_model if tr.train_model is not None else tr.model
    tr.optimizer.zero_grad(set_to_none=True)
    outs, results = [], []
    for j in range(accum):
        first = local.start + j * mb
        batch = to_device(tr.collator([tr.train_set[i] for i in indices[first:first + mb]]), tr.device)
        offset, prior_offset = tr.model.gumbel_offsets(step, cfg.batch_size, first)
        with tr.autocast():
            ref = tr.train_ref(batch) if tr.train_ref is not None else (None, None)
            out = forward(batch, mix=mix, seed=tr.gumbel_seed, offset=offset, prior_offset=prior_offset)
        res = preference_objective(out, ref[0], ref[1], tr.loss_cfg)
        with dist_lib.set_gradient_sync(forward, j == accum - 1):  # DDP: all-reduce once, after the last
            (res.loss / accum if accum > 1 else res.loss).backward()
        outs.append(_detach_output(out))
        results.append(SimpleNamespace(loss=res.loss.detach(), losses=res.losses.detach(),
                                       chosen_rewards=res.chosen_rewards.detach(),
                                       rejected_rewards=res.rejected_rewards.detach(),
                                       kl=None if res.kl is None else res.kl.detach()))
    out, res = _merge_outputs(outs, results, accum)
    # the global batch's per-pair values, in global order, on every rank: the metrics are the 1-process ones
    out, res = dist_lib.gather_fields(out, ctx), dist_lib.gather_fields(res, ctx)
    metrics = step_metrics(out, res)  # of the detached outputs: the same before and after the update
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
    return m


def run_evaluation(tr: Trainer) -> dict:
    """Held-out metrics of the current model (z from the prior)."""
    if not len(tr.eval_set):
        return {"num_pairs": 0}
    with tr.autocast():  # data-parallel: each rank evaluates its share, the metrics are reduced over ranks
        return dist_lib.evaluate_sharded(evaluate, tr.model, tr.eval_ref, tr.eval_set, tr.collator, tr.loss_cfg,
                                         tr.dist, batch_size=tr.cfg.eval_batch_size, source_names=tr.source_names)


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
    "train_summary", "resumed_from"}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads(cfg))
    try:
        # --strategy ddp|fsdp2: a process group (torchrun's environment; NCCL on GPU, gloo on CPU), destroyed
        # on the way out; a rank that raises aborts it and exits non-zero (torchrun then stops the others)
        with dist_lib.process_group(cfg.strategy, cfg.device) as ctx:
            if ctx.strategy == "none":  # the device as before: --device cuda stays "cuda"
                ctx.device = _resolve_device(cfg.device)
            return _train(cfg, ctx)
    finally:  # callers in the same process (tests, notebooks) keep their own thread setting
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, ctx: Optional[dist_lib.DistContext] = None) -> dict:
    t_start = time.perf_counter()
    tr = setup(cfg, ctx)
    ctx = tr.dist
    main_rank = ctx.is_main  # rank 0 prints and writes every file
    log = _log if main_rank else (lambda msg: None)
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
    if tr.resumed_from is not None:
        ckpt_lib.load_rng(tr.resumed_from, tr.resume_state)

    from tqdm.auto import tqdm

    metrics_path = tr.out_dir / "metrics.jsonl"
    eval_log = tr.out_dir / "eval.jsonl"
    if tr.step == 0 and main_rank:
        for p in (metrics_path, eval_log):
            p.unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, initial=tr.step, desc=f"{'lpc-' if cfg.lpc else ''}{cfg.loss}",
               disable=not (cfg.progress and main_rank), dynamic_ncols=True, file=sys.stderr, unit="step")
    recent: list[dict] = []
    with (open(metrics_path, "a") if main_rank else contextlib.nullcontext()) as mf:
        for step in range(tr.step, cfg.steps):
            m = train_step(tr, step)
            tr.step = step + 1
            if main_rank:
                mf.write(json.dumps(m) + "\n")
                mf.flush()
            recent = (recent + [m])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / len(recent):.4f}",
                            acc=f"{sum(r['rewards/accuracies'] for r in recent) / len(recent):.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
            if cfg.eval_every > 0 and tr.step % cfg.eval_every == 0 and tr.step < cfg.steps and len(tr.eval_set):
                ev = run_evaluation(tr)  # every rank: the held-out pairs are split across them
                if main_rank:
                    with open(eval_log, "a") as ef:
                        ef.write(json.dumps({"step": tr.step, **ev}) + "\n")
                    bar.write(f"step {tr.step}: held-out accuracy {ev['accuracy']:.3f}")
            if cfg.save_every > 0 and tr.step % cfg.save_every == 0:
                save_checkpoint(tr, tr.step)
    bar.close()
    train_s = time.perf_counter() - t_start

    final_eval = run_evaluation(tr)
    if tr.syn is not None and len(tr.eval_set):  # the ceiling: a predictor that knows the generator's sources
        final_eval["bayes_accuracy"] = synthetic.bayes_accuracy(tr.eval_set.rows, tr.syn)
    final_eval.update(step=cfg.steps, train_wall_s=train_s)
    final_dir = tr.out_dir / "final"
    extra = {"train_config.json": {**cfg.to_dict(), "output_dir": str(tr.out_dir)}}
    full_sd = dist_lib.full_state_dict(tr.model, ctx) if ctx.strategy == "fsdp2" else None  # every rank
    if main_rank:
        write_json_atomic(tr.out_dir / "eval.json", final_eval)
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
    rows += [("wall time", f"{summary['wall_s']:.1f}s"), ("outputs", summary["output_dir"])]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule] + [f"{k:<{width}}  {v}" for k, v in rows] + [rule])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point: parse, train, print the summary table (bad input exits with a usage error)."""
    cfg = parse_args(argv)
    parser = build_parser()
    if cfg.output_dir and not cfg.resume and (Path(cfg.output_dir) / ckpt_lib.CHECKPOINTS_DIR).is_dir() \
            and ckpt_lib.list_checkpoints(cfg.output_dir):
        parser.error(f"--output-dir: {cfg.output_dir} already holds checkpoints of a run; pass --resume latest "
                     "to continue it, or choose another --output-dir")
    try:
        summary = train(cfg)
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")
    except (FileNotFoundError, ImportError, DataError) as exc:
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
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()


if __name__ == "__main__":
    _cli()
