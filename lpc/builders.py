"""What a run is built from, given its ``TrainConfig``: data, policy, reference model, LoRA, optimizer and the
reference-cache fingerprint. ``lpc.train`` builds a run from these; ``lpc.evaluate``, ``lpc.generate`` and
``lpc.experiments`` rebuild a finished run's pieces with the same functions, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ConfigError, TrainConfig
from .data import (DataError, EpochSampler, PreferenceCollator, PreferenceDataset, UnknownTokenShare,
                   UserGroupedSampler, assign_source_ids, assign_user_ids, load_preference_rows, looks_local, synthetic)
from .data.tokenizer import DATASET_VOCAB_SIZE, load_dataset_tokenizer, load_synthetic_tokenizer, row_texts
from .hf import BATCH_LAYOUTS_BY_SPEED, build_tiny_llama, check_batch_layout, supported_batch_layouts
from .model import LPCModel
from .objective import make_reference
from .runtime import quiet_transformers


def check_paths(cfg: TrainConfig) -> None:
    """Fail fast, before any model is loaded, on model and dataset paths that cannot be what they should be.

    Raises:
        ConfigError: a local ``--model`` / ``--ref-model`` that is not an HF model directory.
        FileNotFoundError: a local ``--dataset`` / ``--eval-dataset`` file that does not exist.
    """
    for name in ("model", "ref_model"):
        spec = getattr(cfg, name)
        if spec is None:
            continue
        p = Path(spec).expanduser()
        if not (p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            continue  # a hub id
        if not p.is_dir():
            raise ConfigError(name, f"{spec!r} is not a directory (pass an HF model directory or a hub id)")
        if not (p / "config.json").is_file():
            raise ConfigError(name, f"{spec!r} has no config.json: not an HF model directory")
    for name in ("dataset", "eval_dataset"):
        spec = getattr(cfg, name)
        if spec is not None and looks_local(spec) and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: dataset file {spec!r} does not exist")


def build_data(cfg: TrainConfig, tokenizer):
    """``(train_set, eval_set, source_names, synthetic_config | None)``; held-out pairs are never trained on.

    ``train_set.load_stats`` holds the loaders' ``LoadStats`` (what was skipped) for file datasets. User ids
    (``--user-field``) become indices shared by both sets (``assign_user_ids``), named by ``user_names``.
    """
    syn = None
    stats = []
    if cfg.dataset is None:
        syn = cfg.synthetic_config()
        train_rows, eval_rows = synthetic.make_splits(syn)
        names = list(synthetic.source_names(syn))
    else:
        rows, st = load_preference_rows(cfg.dataset, split=cfg.dataset_split, strict=cfg.strict,
                                        user_field=cfg.user_field)
        stats.append(st)
        if cfg.eval_dataset is not None or cfg.eval_split is not None:
            eval_rows, st = load_preference_rows(cfg.eval_dataset or cfg.dataset,
                                                 split=cfg.eval_split or cfg.dataset_split, strict=cfg.strict,
                                                 user_field=cfg.user_field)
            stats.append(st)
            eval_rows = eval_rows[:cfg.eval_size]
            train_rows = rows
        else:
            eval_idx, train_idx = split_indices(len(rows), cfg.eval_size, cfg.seed)
            eval_rows = [rows[i] for i in eval_idx]
            train_rows = [rows[i] for i in train_idx]
        names = assign_source_ids(train_rows, eval_rows)
    user_names = assign_user_ids(train_rows, eval_rows)
    # a real chat model (--model with a chat template) sees prompts the way it was tuned on them
    chat = cfg.model is not None and bool(getattr(tokenizer, "chat_template", None)) and cfg.chat_template != "never"
    kw = dict(chat_template=chat, max_prompt_length=cfg.max_prompt_length,
              conversational_only=cfg.chat_template == "conversational", user_names=user_names)
    train_set = PreferenceDataset(train_rows, tokenizer, cfg.max_length, **kw)
    eval_set = PreferenceDataset(eval_rows, tokenizer, cfg.max_length, **kw)
    train_set.load_stats = stats
    return train_set, eval_set, names, syn


def build_sampler(cfg: TrainConfig, train_set: PreferenceDataset, world_size: int, notes: list) -> EpochSampler:
    """The training order: ``EpochSampler``, or with ``--pairs-per-user`` the ``UserGroupedSampler`` (whole users
    per process and micro-batch). Appends a note on the data's users to ``notes`` when it has any.

    Raises:
        ConfigError: ``--pairs-per-user`` that does not divide a process's micro-batch, or training pairs with too
            few users' pairs for one batch.
    """
    users = train_set.users
    if train_set.user_names:
        notes.append(f"data: {len(set(users) - {-1})} users (--user-field {cfg.user_field}) in the training pairs, "
                     f"{users.count(-1)} training pairs without one")
    if not cfg.pairs_per_user:
        return EpochSampler(len(train_set), cfg.batch_size, cfg.seed)
    m, per_pass = cfg.pairs_per_user, cfg.batch_size // (world_size * cfg.gradient_accumulation_steps)
    if per_pass % m:
        raise ConfigError("pairs_per_user", f"must divide the {per_pass} pairs of each process's micro-batch "
                                            f"(--batch-size {cfg.batch_size} / {world_size} processes / "
                                            f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps}), "
                                            f"got {m}: every process and micro-batch takes whole users")
    if all(u < 0 for u in users):
        raise ConfigError("pairs_per_user", f"the training pairs have no user ids (--user-field {cfg.user_field})")
    try:
        sampler = UserGroupedSampler(users, cfg.batch_size, m, cfg.seed)
    except ValueError as exc:
        raise ConfigError("pairs_per_user", str(exc)) from None
    short = sum(len(pairs) < m for pairs in sampler.pairs_by_user)
    notes.append(f"batches: {cfg.batch_size // m} groups of {m} pairs of one user (--pairs-per-user); "
                 f"{sampler.batches_per_epoch} batches per epoch"
                 + (f"; {short} users with fewer than {m} pairs are never drawn" if short else ""))
    return sampler


def split_indices(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(eval, train)`` row indices of a ``--dataset`` file without ``--eval-dataset``: a seeded permutation,
    ``min(eval_size, n // 2)`` rows held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(eval_size, n // 2)
    return perm[:n_eval], perm[n_eval:]


def weights_dtype(cfg: TrainConfig, *, frozen: bool = False) -> torch.dtype:
    """The dtype weights are stored in: float64 with ``--dtype float64``; with ``--dtype bfloat16`` bf16 for frozen
    weights (no fp32 master copy needed), fp32 for trained ones (autocast computes in bf16); fp32 otherwise."""
    if cfg.dtype == "float64":
        return torch.float64
    return torch.bfloat16 if cfg.dtype == "bfloat16" and frozen else torch.float32


def build_tokenizer(cfg: TrainConfig, model_spec: Optional[str] = None):
    """The tokenizer of ``--model`` (or ``model_spec``); without one the tiny model's, learnt locally and cached: on
    ``--dataset``'s text (the whole split, held-out rows included: no labels), else on the synthetic data's lexicon.
    (A ``--dataset`` is read here and again by ``build_data``; only the tiny model's tokenizer needs it here.)"""
    spec = model_spec or cfg.model
    if spec is not None:
        return load_tokenizer(spec)
    if cfg.dataset is None:
        return load_synthetic_tokenizer(cfg.cache_dir)
    rows, _ = load_preference_rows(cfg.dataset, split=cfg.dataset_split, strict=cfg.strict)
    return load_dataset_tokenizer(row_texts(rows), cfg.cache_dir)


def check_unknown_tokens(cfg: TrainConfig, tokenizer, train_set: PreferenceDataset,
                         eval_set: PreferenceDataset) -> dict[str, UnknownTokenShare]:
    """The unknown-token share of the training and held-out pairs (``{"training": ..., "held-out": ...}``).

    Raises:
        DataError: a share of prompt or answer tokens above ``--max-unknown-token-share``: the model would learn
            from ``<unk>`` in place of the words (naming the share, the threshold and the fixes).
    """
    unk_id = tokenizer.unk_token_id
    shares = {"training": train_set.unknown_token_share(unk_id), "held-out": eval_set.unknown_token_share(unk_id)}
    limit = cfg.max_unknown_token_share
    for name, share in shares.items():
        for part, value in share._asdict().items():
            if value > limit:
                if cfg.model is None:
                    fix = (f"the tiny model's tokenizer keeps the {DATASET_VOCAB_SIZE} most frequent words of "
                           "--dataset: pass a --model whose tokenizer covers the data")
                else:
                    fix = ("use a --model whose tokenizer covers the data, or leave out --model to train the tiny "
                           "model with a tokenizer learnt from --dataset")
                raise DataError(f"{value:.1%} of the {part} tokens of the {name} pairs are the tokenizer's unknown "
                                f"token {tokenizer.unk_token!r}, above --max-unknown-token-share {limit:g}: the model "
                                f"would learn from {tokenizer.unk_token!r} in place of the words. {fix}, or raise "
                                "--max-unknown-token-share (1 turns the check off)")
    return shares


def build_policy(cfg: TrainConfig, model_spec: Optional[str] = None, tokenizer=None):
    """``(policy, tokenizer)``: ``--model`` (or ``model_spec``) from disk/hub, else the tiny Llama built from
    ``cfg.seed`` for the tokenizer of ``build_tokenizer``, its weights in ``weights_dtype`` (frozen with LoRA).
    ``tokenizer``: that tokenizer, when the caller has it already."""
    dtype = weights_dtype(cfg, frozen=cfg.lora_r > 0)
    spec = model_spec or cfg.model
    tok = tokenizer if tokenizer is not None else build_tokenizer(cfg, model_spec)
    if spec is None:
        policy = build_tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, seed=cfg.seed).to(dtype)
    else:
        with quiet_transformers():
            policy = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    if cfg.disable_dropout:
        disable_dropout(policy)
    return policy, tok


def disable_dropout(model: torch.nn.Module) -> int:
    """Set ``p = 0`` on every ``nn.Dropout`` of ``model`` (what TRL's ``disable_dropout_in_model`` does) and the
    functional attention dropout HF attention modules keep as a float (``attention_dropout``, e.g. Llama, Qwen2);
    returns how many were switched off."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p, n = 0.0, n + 1
        elif isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout, n = 0.0, n + 1
    return n


def load_tokenizer(spec) -> object:
    """``AutoTokenizer`` of a model directory or hub id, with a pad token (padding positions are masked out,
    so the eos token serves when the tokenizer has none)."""
    tok = AutoTokenizer.from_pretrained(str(spec))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def enable_gradient_checkpointing(policy) -> None:
    """Recompute the policy's activations in backward (non-reentrant: works with frozen inputs)."""
    if not getattr(policy, "supports_gradient_checkpointing", False):
        raise ConfigError("gradient_checkpointing", f"{type(policy).__name__} does not support it")
    # transformers v5 renamed the method (the old name warns)
    if hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def build_collator(cfg: TrainConfig, tokenizer, *models) -> PreferenceCollator:
    """The collator of ``--batch-layout``; ``auto`` takes the fastest layout that every one of ``models`` (policy,
    reference) can run. Raises ``ConfigError`` when one of them cannot run the layout asked for."""
    layout = cfg.batch_layout
    models = [m for m in models if m is not None]
    if layout == "auto":
        layout = next(x for x in BATCH_LAYOUTS_BY_SPEED if all(x in supported_batch_layouts(m) for m in models))
    for model in models:
        try:
            check_batch_layout(model, layout)
        except ValueError as exc:
            raise ConfigError("batch_layout", str(exc)) from None
    return PreferenceCollator(tokenizer.pad_token_id, layout)


def build_lpc_model(cfg: TrainConfig, policy) -> LPCModel:
    """The ``LPCModel`` of a run around ``policy`` (with LoRA adapters when ``--lora-r``)."""
    if cfg.lora_r > 0:
        policy = apply_lora(policy, cfg)
    model = LPCModel(policy, cfg.lpc_config(), backend=cfg.backend)
    return model.to(torch.float64) if cfg.dtype == "float64" else model  # the codebook and heads too


def load_reference_model(cfg: TrainConfig) -> torch.nn.Module:
    """The ``--ref-model`` (frozen, eval mode; bf16 weights with ``--dtype bfloat16``)."""
    with quiet_transformers():
        return make_reference(AutoModelForCausalLM.from_pretrained(cfg.ref_model, dtype=weights_dtype(cfg, frozen=True)))


def initial_reference(cfg: TrainConfig, policy=None) -> torch.nn.Module:
    """A run's frozen DPO/IPO reference rebuilt after training (evaluation, the study): ``--ref-model``, else a
    copy of the initial policy (``policy``, default ``build_policy(cfg)``: seeded, so the trainer's; for LoRA
    runs the base model)."""
    if cfg.ref_model is not None:
        return load_reference_model(cfg)
    return make_reference(policy if policy is not None else build_policy(cfg)[0])


def reference_fingerprint(cfg: TrainConfig, train_set: PreferenceDataset, eval_set: PreferenceDataset) -> str:
    """Identifies what a reference-logp cache was computed from: the tokenised pairs and the reference."""
    if cfg.ref_model is not None:
        ref_id = f"model:{cfg.ref_model}"
    elif cfg.model is not None:
        ref_id = f"initial:{cfg.model}"
    else:  # the tiny model: its init depends on the seed and shape
        ref_id = f"tiny:{cfg.seed}:{cfg.hidden_size}:{cfg.num_layers}:{cfg.num_heads}"
    return hashlib.sha256(json.dumps([train_set.fingerprint(), eval_set.fingerprint(), ref_id, cfg.dtype,
                                      cfg.lora_r > 0]).encode()).hexdigest()


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


def build_optimizer(cfg: TrainConfig, model: LPCModel):
    """``(AdamW, LambdaLR)``: the policy's trainable parameters at ``--lr``, the codebook and heads at
    ``--head-lr``, the schedule of ``lr_factor``. Build it after FSDP2 sharding (it holds the parameters)."""
    policy_params = [p for p in model.policy.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("policy.")]
    groups = [{"params": policy_params, "lr": cfg.lr}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.lr_scheduler, cfg.min_lr_ratio))
    return optimizer, scheduler
