"""Configuration dataclasses for the LPC model, the synthetic data and the training loop.

Defaults marked (paper) come from Gong et al. (ICML 2025, arXiv 2505.04993); the rest are our choices
(see ``../shared/DESIGN.md`` section 1), each exposed as a field so ablations need no code change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

PRIOR_MIX = ("linear", "none")
PRIOR_SAMPLE = ("expected", "gumbel")
INFERENCE_CODE = ("expected", "argmax")
LOSS_TYPES = ("dpo", "ipo", "simpo")


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
    """Everything ``python -m lpc.train`` takes; the CLI flags map one-to-one onto these fields."""

    loss: str = "dpo"
    lpc: bool = True
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 30
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
    eval_size: int = 512
    eval_every: int = 0
    eval_batch_size: int = 128
    model: Optional[str] = None
    dataset: Optional[str] = None
    max_length: int = 512
    # tiny-model shape (only used without --model)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # synthetic data (only used without --dataset)
    num_train: int = 16384
    hint_prob: float = 0.5
    flip_fraction: float = 0.0
    threads: Optional[int] = None
    cache_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {list(LOSS_TYPES)}, got {self.loss!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size}")

    def lpc_config(self) -> Optional[LPCConfig]:
        if not self.lpc:
            return None
        return LPCConfig(num_codes=self.num_codes, codebook_init_std=self.codebook_init_std,
                         head_hidden=self.head_hidden, tau=self.tau, hard=self.hard, prior_mix=self.prior_mix,
                         prior_sample=self.prior_sample, inference=self.inference,
                         detach_features=self.detach_features)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
