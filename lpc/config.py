"""Configuration dataclasses for the LPC model, the synthetic data and the training loop.

Defaults marked (paper) come from Gong et al. (ICML 2025, arXiv 2505.04993); the rest are our choices
(see ``../shared/DESIGN.md`` section 1), each exposed as a field so ablations need no code change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

PRIOR_MIX = ("linear", "none")
PRIOR_SAMPLE = ("expected", "gumbel")
INFERENCE_CODE = ("expected", "argmax")
LOSS_TYPES = ("dpo", "ipo", "simpo")
DTYPES = ("float32", "bfloat16")
LR_SCHEDULERS = ("cosine", "linear", "constant")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
STRATEGIES = ("none", "ddp", "fsdp2")  # data parallelism under torchrun (lpc.distributed)


class ConfigError(ValueError):
    """A bad configuration value; ``field`` names the ``TrainConfig`` field (the CLI flag is ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


@dataclass
class LPCConfig:
    """The latent part of LPC: codebook, prior and posterior heads, and how ``z`` is drawn.

    Attributes:
        num_codes: K, codebook size (paper: 32; accuracy peaked at K = 32-64).
        head_hidden: width of the hidden layer of the prior and posterior MLPs; ``None`` = hidden size D
            (the paper does not publish its widths).
        codebook_init_std: std of the normal init of the codebook. ``z`` is added to final hidden states
            that leave an RMSNorm with unit scale, so a small init starts the policy close to the
            unconditioned one while still giving the heads a gradient through ``E``.
        tau: Gumbel-softmax temperature (ours: 1.0). hard: one-hot samples with straight-through grads.
        prior_mix: ``"linear"`` moves ``z`` from posterior-based (g=0) to prior-based (g=1) linearly
            over training (paper); ``"none"`` always uses the posterior sample (g=0).
        prior_sample: how ``z_prior`` is formed inside the mix. ``"expected"`` (default) uses the expected
            embedding ``softmax(prior_logits) @ E``: it is exactly what inference uses, so at the end of
            training (g=1) the policy is trained on the same ``z`` it is evaluated with. ``"gumbel"`` draws
            a Gumbel-softmax sample of the prior logits with noise independent of the posterior's.
        inference: ``"expected"`` (default) ``z = softmax(prior_logits) @ E``; ``"argmax"`` the most
            probable code ``E[argmax prior_logits]``.
        detach_features: stop gradients from the heads into the backbone through ``h_x, h_w, h_l``.
    """

    num_codes: int = 32
    head_hidden: Optional[int] = None
    codebook_init_std: float = 0.02
    tau: float = 1.0
    hard: bool = False
    prior_mix: str = "linear"
    prior_sample: str = "expected"
    inference: str = "expected"
    detach_features: bool = False

    def __post_init__(self) -> None:
        if self.num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {self.num_codes}")
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(f"head_hidden must be >= 1 or None, got {self.head_hidden}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        for name, allowed in (("prior_mix", PRIOR_MIX), ("prior_sample", PRIOR_SAMPLE),
                              ("inference", INFERENCE_CODE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LossConfig:
    """``loss_type`` dpo | ipo | simpo; ``gamma`` is used by SimPO only (the op requires 0 otherwise)."""

    loss_type: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    kl_weight: float = 0.05
    ipo_average: bool = True
    backend: str = "auto"

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


@dataclass
class SyntheticConfig:
    """The built-in synthetic preference data (see ``lpc.synthetic``).

    Attributes:
        num_train / num_eval: pairs in the training and held-out splits (independent random streams).
        hint_prob: probability that a prompt names its source (``"user_2 asks : ..."``); the rest say
            ``"someone asks"``, so the source must then be guessed from the prompt topic alone.
        topic_bias: probability that a prompt's topic is drawn from its source's favourite topics rather
            than uniformly: a second, weaker hint of the source inside the prompt.
        label_mode: ``"deterministic"`` (the answer with the higher utility wins) or ``"bradley_terry"``
            (winner sampled with ``P = sigmoid((u_a - u_b) / bt_temperature)``).
        min_gap: pairs whose utilities differ by less are resampled (no ties, no near-coin-flips).
        flip_fraction: fraction of *training* pairs whose labels are swapped, with ``" [flip]"`` appended
            to their prompts (the paper's label-noise experiment). The held-out split is never flipped.
        flip_marker: append the ``[flip]`` marker to flipped prompts (the paper's protocol); ``False``:
            unmarked label noise.
    """

    num_train: int = 16384
    num_eval: int = 512
    hint_prob: float = 0.5
    topic_bias: float = 0.5
    label_mode: str = "deterministic"
    bt_temperature: float = 0.5
    min_gap: float = 0.5
    flip_fraction: float = 0.0
    seed: int = 0
    flip_marker: bool = True

    def __post_init__(self) -> None:
        if self.label_mode not in ("deterministic", "bradley_terry"):
            raise ValueError(f"label_mode must be 'deterministic' or 'bradley_terry', got {self.label_mode!r}")
        for name in ("hint_prob", "topic_bias", "flip_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError("num_train and num_eval must be >= 0")


@dataclass
class TrainConfig:
    """Everything ``python -m lpc.train`` takes; the CLI flags map one-to-one onto these fields
    (``batch_size`` <-> ``--batch-size``). ``python -m lpc.train --help`` documents each with its default.

    Batch semantics: ``batch_size`` pairs per optimizer step (the global batch), split into
    ``gradient_accumulation_steps`` equal micro-batches; so the loss, the schedule and the Gumbel noise of
    each example do not depend on how the batch is split.
    """

    loss: str = "dpo"
    lpc: bool = True
    steps: int = 800
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    lr: float = 3e-3
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_codes: int = 32
    codebook_init_std: float = 0.02
    head_hidden: Optional[int] = None
    kl_weight: float = 0.05
    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    ipo_average: bool = True
    tau: float = 1.0
    hard: bool = False
    prior_mix: str = "linear"
    prior_sample: str = "expected"
    inference: str = "expected"
    detach_features: bool = False
    seed: int = 0
    output_dir: Optional[str] = None
    backend: str = "auto"
    device: str = "auto"
    strategy: str = "none"
    eval_size: int = 512
    eval_every: int = 0
    eval_batch_size: int = 128
    # model
    model: Optional[str] = None
    ref_model: Optional[str] = None
    precompute_ref_logps: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    # data
    dataset: Optional[str] = None
    dataset_split: str = "train"
    eval_dataset: Optional[str] = None
    eval_split: Optional[str] = None
    max_length: int = 512
    max_prompt_length: Optional[int] = None
    strict: bool = False
    # checkpoints
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    # tiny-model shape (only used without --model)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # synthetic data (only used without --dataset)
    num_train: int = 16384
    hint_prob: float = 0.5
    flip_fraction: float = 0.0
    flip_marker: bool = True
    threads: Optional[int] = None
    cache_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, what: str) -> None:
            if not cond:
                raise ConfigError(field, f"must be {what}, got {getattr(self, field)!r}")

        def num(field: str) -> bool:
            v = getattr(self, field)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, allowed in (("loss", LOSS_TYPES), ("prior_mix", PRIOR_MIX), ("prior_sample", PRIOR_SAMPLE),
                              ("inference", INFERENCE_CODE), ("dtype", DTYPES), ("lr_scheduler", LR_SCHEDULERS),
                              ("backend", BACKENDS), ("strategy", STRATEGIES)):
            need(getattr(self, name) in allowed, name, f"one of {list(allowed)}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "num_codes", "eval_batch_size",
                     "hidden_size", "num_layers", "num_heads"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                 and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_size", "eval_every", "save_every", "keep_checkpoints", "num_train",
                     "lora_r", "seed"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                 and getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("lr", "beta", "tau", "lora_alpha"):
            need(num(name) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("weight_decay", "max_grad_norm", "kl_weight", "gamma", "codebook_init_std"):
            need(num(name) and getattr(self, name) >= 0, name, "a number >= 0")
        for name in ("min_lr_ratio", "hint_prob", "flip_fraction"):
            need(num(name) and 0.0 <= getattr(self, name) <= 1.0, name, "a number in [0, 1]")
        need(num("label_smoothing") and 0.0 <= self.label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)")
        need(num("lora_dropout") and 0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)")
        need(self.head_lr is None or (num("head_lr") and self.head_lr > 0), "head_lr", "None or a number > 0")
        need(self.head_hidden is None or (isinstance(self.head_hidden, int) and self.head_hidden >= 1),
             "head_hidden", "None or an integer >= 1")
        need(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1), "threads",
             "None or an integer >= 1")
        need(isinstance(self.max_length, int) and self.max_length >= 2, "max_length", "an integer >= 2")
        if self.max_prompt_length is not None:
            need(isinstance(self.max_prompt_length, int) and 1 <= self.max_prompt_length < self.max_length,
                 "max_prompt_length", f"None or an integer in [1, max_length={self.max_length})")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ConfigError("gradient_accumulation_steps", f"must divide batch_size={self.batch_size} (the "
                              f"pairs per optimizer step) into equal micro-batches, got "
                              f"{self.gradient_accumulation_steps}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.device != "auto":
            try:
                torch_device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError("device", f"must be 'auto' or a torch device such as cpu, cuda, cuda:1; "
                                            f"got {self.device!r} ({exc})") from None
        if self.strategy == "fsdp2" and self.lora_r:
            # the LoRA reference is the policy with its adapters switched off, called outside the sharded
            # model's forward (so FSDP2 would not gather its LM head); and LoRA's trainable state is small
            raise ConfigError("strategy", "fsdp2 with LoRA (--lora-r) is not supported: use --strategy ddp, which "
                                          "replicates the frozen base once and all-reduces only the adapters")
        if self.lora_r and not self.lora_target_modules:
            raise ConfigError("lora_target_modules", "must name the modules LoRA adapts (e.g. all-linear)")
        for name in ("model", "ref_model", "dataset", "eval_dataset", "output_dir", "resume", "cache_dir"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and value != ""), name, "None or a non-empty string")

    def lpc_config(self) -> Optional[LPCConfig]:
        """The ``LPCConfig`` these flags describe, or ``None`` with ``lpc=False``."""
        if not self.lpc:
            return None
        return LPCConfig(num_codes=self.num_codes, codebook_init_std=self.codebook_init_std,
                         head_hidden=self.head_hidden, tau=self.tau, hard=self.hard, prior_mix=self.prior_mix,
                         prior_sample=self.prior_sample, inference=self.inference,
                         detach_features=self.detach_features)

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` of the preference objective these flags describe."""
        return LossConfig(loss_type=self.loss, beta=self.beta, gamma=self.gamma,
                          label_smoothing=self.label_smoothing, kl_weight=self.kl_weight,
                          ipo_average=self.ipo_average, backend=self.backend)

    def to_dict(self) -> dict:
        """All fields as a JSON-able dict (``TrainConfig(**d)`` rebuilds the config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, ignore_unknown: bool = False) -> "TrainConfig":
        """``TrainConfig(**d)``; unknown keys raise ``ConfigError`` unless ``ignore_unknown`` (configs
        saved by a newer version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and not ignore_unknown:
            raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(names))})")
        return cls(**{k: v for k, v in d.items() if k in names})


def torch_device(name: str):
    """``torch.device(name)`` (imported lazily so this module stays importable without torch)."""
    import torch

    return torch.device(name)
