"""Configuration dataclasses: the LPC latent, the preference loss, the synthetic data, and the training run.

Every ``TrainConfig`` setting is written once, as a field with its default and, in the field's metadata,
its help text, its ``--help`` group, its allowed values and its rule on resume (``setting``). The command
line (``lpc.cli``) is generated from these fields, so a new field is a new flag, a config-file key and a
``train_config.json`` entry at once. Where the defaults come from: ``docs/design.md``, "Defaults".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lpc_kernels.backends import BACKENDS as KERNEL_BACKENDS
from lpc_kernels.preference import LOSS_TYPES

PRIOR_MIX = ("linear", "none")
PRIOR_SAMPLE = ("expected", "gumbel")
INFERENCE_CODE = ("expected", "argmax")
DTYPES = ("float32", "bfloat16", "float64")
LR_SCHEDULERS = ("cosine", "linear", "constant")
BACKENDS = ("auto",) + KERNEL_BACKENDS
STRATEGIES = ("none", "ddp", "fsdp2")  # data parallelism under torchrun (lpc.distributed)
SYNTHETIC_PRESETS = ("sources", "annotators")
BATCH_LAYOUTS = ("padded", "packed", "shared-prompt")  # lpc.data.batching
REPORT_TO = ("none", "tensorboard", "wandb")  # lpc.tracking
# KL weight by loss when --kl-weight is not given. DPO's and SimPO's losses are the label's negative
# log-likelihood, so 1 is the ELBO. IPO's (margin - 1/(2 beta))^2 is far larger than DPO's at a zero margin, and
# at 1 its posterior passed the label through z (docs/results.md, "KL weight for IPO").
DEFAULT_KL_WEIGHT = {"dpo": 1.0, "simpo": 1.0, "ipo": 10.0}

# the --help groups of the training flags, in order
GROUPS = ("objective", "latent (with --lpc)", "optimisation", "model", "data", "evaluation, checkpoints and output")
# what a resumed run may change (RESUME_FREE: the numbers do not depend on it, or, for steps, the user asks to
# extend or shorten the run) and what it never takes from the checkpoint (LAUNCH: how this invocation is started)
RESUME_SAME, RESUME_FREE, RESUME_LAUNCH = "same", "free", "launch"
# settings earlier versions wrote into train_config.json, with the value at which they did nothing: a config file
# holding that value still loads (the key is dropped), another value is refused (drop_removed_settings)
REMOVED_SETTINGS = {"filter_eps": 0.0}


class ConfigError(ValueError):
    """A bad configuration value; ``field`` names the ``TrainConfig`` field (the CLI flag is ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def drop_removed_settings(settings: dict, where: str) -> dict:
    """``settings`` (keys with ``-`` or ``_``) without the ``REMOVED_SETTINGS`` at their no-op value; ``ConfigError``
    naming one set to anything else (what it asked for no longer exists)."""
    out = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in REMOVED_SETTINGS:
            out[key] = value
        elif value != REMOVED_SETTINGS[name]:
            raise ConfigError(name, f"{where}: {key}={value!r}: this setting was removed; only "
                                    f"{REMOVED_SETTINGS[name]!r}, which did nothing, is still accepted")
    return out


# ---------------------------------------------------------------------------------------- value checks
# A check is (predicate, what): ConfigError(field, f"must be {what}, got {value!r}") when the predicate fails.
Check = tuple[Callable[[Any], bool], str]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(low: int) -> Check:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def number_above(low: float) -> Check:
    return (lambda v: _is_number(v) and v > low), f"a number > {low:g}"


def number_at_least(low: float) -> Check:
    return (lambda v: _is_number(v) and v >= low), f"a number >= {low:g}"


def in_unit_interval() -> Check:
    return (lambda v: _is_number(v) and 0.0 <= v <= 1.0), "a number in [0, 1]"


def in_half_open(low: float, high: float) -> Check:
    return (lambda v: _is_number(v) and low <= v < high), f"in [{low:g}, {high:g})"


def optional(check: Check) -> Check:
    pred, what = check
    return (lambda v: v is None or pred(v)), f"None or {what}"


NON_EMPTY_STRING: Check = optional(((lambda v: isinstance(v, str) and v != ""), "a non-empty string"))


def setting(default, help: str, *, group: str, choices: Optional[tuple] = None, check: Optional[Check] = None,
            resume: str = RESUME_SAME):
    """A config field: ``default`` and what the command line needs to know about it (see the module doc)."""
    if choices is not None:
        check = ((lambda v: v in choices), f"one of {list(choices)}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                                        "check": check, "resume": resume})


def check_field(f: dataclasses.Field, value: Any, name: Optional[str] = None) -> None:
    """``ConfigError`` naming the field (or ``name``) when ``value`` fails the field's own check (``setting``)."""
    check = f.metadata.get("check")
    if check is not None and not check[0](value):
        raise ConfigError(name or f.name, f"must be {check[1]}, got {value!r}")


def check_fields(obj) -> None:
    """Run every field's own check (``setting(check=...)``), in declaration order."""
    for f in dataclasses.fields(obj):
        check_field(f, getattr(obj, f.name))


# --------------------------------------------------------------------------------------------- configs
LATENT = GROUPS[1]


@dataclass
class LPCConfig:
    """The latent part of LPC: codebook, prior and posterior heads, and how ``z`` is drawn.

    Attributes (each field's help says the rest):
        codebook_scale: ``z = (w @ E) * hidden_rms``, ``hidden_rms`` the RMS of the model's final hidden states
            at scored positions, measured once before training (``LPCModel.calibrate``); so the codebook is in
            units of the hidden states of the model at hand, and ``E``'s init std is ``codebook_scale``. The
            choice and the sensitivity of the margins to it: ``docs/results.md``.
        prior_sample: ``"expected"`` uses the expected embedding ``softmax(prior_logits) @ E``: exactly what
            inference uses, so at the end of training (g=1) the policy is trained on the ``z`` it is evaluated
            with. ``"gumbel"`` draws a sample of the prior with noise independent of the posterior's.
    """

    num_codes: int = setting(32, "codebook size K (paper: 32)", group=LATENT, check=int_at_least(1))
    codebook_scale: float = setting(1.0, "std of the codebook's normal init, in units of the RMS of the "
                                                    "model's final hidden states (z = (w @ E) * hidden_rms)",
                                    group=LATENT, check=number_at_least(0))
    head_hidden: Optional[int] = setting(None, "prior/posterior MLP width (default: hidden size)", group=LATENT,
                                         check=optional(int_at_least(1)))
    tau: float = setting(1.0, "Gumbel-softmax temperature", group=LATENT, check=number_above(0))
    hard: bool = setting(False, "one-hot (straight-through) Gumbel samples", group=LATENT)
    prior_mix: str = setting("linear", "z = g*z_prior + (1-g)*z_post with g rising linearly 0->1 over training, "
                                       "or g = 0", group=LATENT, choices=PRIOR_MIX)
    prior_sample: str = setting("expected", "z_prior in the mix: expected embedding softmax(prior) @ E, or a Gumbel "
                                            "sample of the prior", group=LATENT, choices=PRIOR_SAMPLE)
    inference: str = setting("expected", "evaluation z: expected prior embedding, or the argmax prior code",
                             group=LATENT, choices=INFERENCE_CODE)
    detach_features: bool = setting(False, "stop head gradients from flowing into the backbone through h_x, h_w, "
                                           "h_l", group=LATENT)

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LPCConfig)}

    @classmethod
    def from_dict(cls, d: dict) -> "LPCConfig":
        """An ``lpc_config.json`` (``to_dict``), also one written by an older version: ``codebook_init_std`` (the
        absolute init std of a model without ``hidden_rms``) reads as ``codebook_scale``, unknown keys are
        dropped."""
        d = dict(d)
        if "codebook_init_std" in d:
            d.setdefault("codebook_scale", d.pop("codebook_init_std"))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LossConfig:
    """``loss_type`` dpo | ipo | simpo; ``gamma`` is used by SimPO only (the op requires 0 otherwise)."""

    loss_type: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    kl_weight: float = 1.0
    ipo_average: bool = True
    backend: str = "auto"
    free_bits: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def op_options(self) -> dict:
        """The pair-loss options of ``lk.preference_loss`` / ``lk.linear_preference_loss``: ``gamma`` only for
        SimPO, ``label_smoothing`` 0 for IPO (the ops require both)."""
        return dict(loss_type=self.loss_type, beta=self.beta, gamma=self.gamma if self.loss_type == "simpo" else 0.0,
                    label_smoothing=self.label_smoothing if self.loss_type != "ipo" else 0.0,
                    ipo_average=self.ipo_average)


@dataclass
class SyntheticConfig:
    """The built-in synthetic preference data (see ``lpc.data.synthetic``).

    Attributes:
        preset: ``"sources"`` (four sources; prompts hint at theirs by name and topic; the label options
            below) or ``"annotators"`` (six annotators whose preferences are sparse mixtures of conflicting
            answer factors; uniform topics; Bradley-Terry labels at ``bt_temperature``; ``topic_bias``,
            ``label_mode`` and ``min_gap`` do not apply).
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
        num_unseen_users / unseen_user_pairs: ``annotators`` preset: users never seen in training, each a new
            mixture of the annotators' weights, with ``unseen_user_pairs`` held-out pairs each, appended to the
            held-out split (``lpc.data.synthetic.generate_unseen_user_pairs``).
    """

    preset: str = "sources"
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
    num_unseen_users: int = 0
    unseen_user_pairs: int = 64

    def __post_init__(self) -> None:
        if self.preset not in SYNTHETIC_PRESETS:
            raise ValueError(f"preset must be one of {list(SYNTHETIC_PRESETS)}, got {self.preset!r}")
        if self.num_unseen_users < 0 or self.unseen_user_pairs < 1:
            raise ValueError(f"num_unseen_users must be >= 0 and unseen_user_pairs >= 1, got "
                             f"{self.num_unseen_users} and {self.unseen_user_pairs}")
        if self.num_unseen_users and self.preset != "annotators":
            raise ValueError(f"num_unseen_users needs the annotators preset, got preset={self.preset!r}")
        if self.label_mode not in ("deterministic", "bradley_terry"):
            raise ValueError(f"label_mode must be 'deterministic' or 'bradley_terry', got {self.label_mode!r}")
        for name in ("hint_prob", "topic_bias", "flip_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError("num_train and num_eval must be >= 0")


OBJECTIVE, OPTIM, MODEL, DATA, OUTPUT = GROUPS[0], GROUPS[2], GROUPS[3], GROUPS[4], GROUPS[5]


@dataclass
class TrainConfig(LPCConfig):
    """Everything ``python -m lpc.train`` takes: the LPC latent settings (inherited from ``LPCConfig``) and the
    run's; one CLI flag per field (``batch_size`` <-> ``--batch-size``), generated by ``lpc.cli``.

    Batch semantics: ``batch_size`` pairs per optimizer step (the global batch), split into
    ``gradient_accumulation_steps`` equal micro-batches; so the loss, the schedule and the Gumbel noise of
    each example do not depend on how the batch is split.
    """

    # objective
    loss: str = setting("dpo", "pairwise preference loss (sigmoid: TRL's name for dpo)", group=OBJECTIVE,
                        choices=LOSS_TYPES + ("sigmoid",))
    lpc: bool = setting(True, "learn the latent codebook with prior/posterior heads (--no-lpc: plain "
                              "DPO/IPO/SimPO)", group=OBJECTIVE)
    beta: float = setting(0.1, "DPO/IPO/SimPO beta", group=OBJECTIVE, check=number_above(0))
    gamma: float = setting(0.5, "SimPO target margin gamma (used by --loss simpo only)", group=OBJECTIVE,
                           check=number_at_least(0))
    label_smoothing: float = setting(0.0, "conservative DPO/SimPO epsilon", group=OBJECTIVE,
                                     check=in_half_open(0, 0.5))
    ipo_average: bool = setting(True, "IPO on length-averaged log-probs (TRL); --no-ipo-average: the IPO paper's "
                                      "sums", group=OBJECTIVE)
    kl_weight: Optional[float] = setting(None, "weight of KL(posterior || prior) (default: 1 for dpo and simpo, the "
                                               "ELBO; 10 for ipo, whose squared loss pays more for the label). Lower, "
                                               "the posterior is paid to leak the label into z (paper: 0.05)",
                                         group=OBJECTIVE, check=optional(number_at_least(0)))
    kl_warmup_steps: int = setting(0, "raise the KL weight linearly from 0 to --kl-weight over the first N steps "
                                      "(0: constant)", group=OBJECTIVE, check=int_at_least(0))
    free_bits: float = setting(0.0, "per-pair KL below this many nats is not penalised (free bits; 0: off)",
                               group=OBJECTIVE, check=number_at_least(0))
    fused_loss: bool = setting(True, "compute the LM head, pair loss and KL in one op with its gradients in the "
                                     "forward (lk.linear_preference_loss: 3 GEMMs instead of 4); "
                                     "--no-fused-loss: the composition of linear_token_logprobs and "
                                     "preference_loss (same values to rounding)", group=OBJECTIVE,
                               resume=RESUME_FREE)
    latent_diagnostics: bool = setting(True, "also score each training batch with z from the prior and from the "
                                             "posterior's sample alone (no gradient, up to 2 more LM-head passes): "
                                             "lpc/prior_accuracy, lpc/posterior_accuracy and the label-leak warning",
                                       group=LATENT, resume=RESUME_FREE)
    # optimisation
    steps: int = setting(800, "optimizer steps", group=OPTIM, check=int_at_least(1), resume=RESUME_FREE)
    batch_size: int = setting(32, "preference pairs per optimizer step (the global batch, split by "
                                  "--gradient-accumulation-steps)", group=OPTIM, check=int_at_least(1))
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (each of batch-size / N pairs); "
                                                  "must divide --batch-size", group=OPTIM, check=int_at_least(1))
    lr: float = setting(3e-3, "peak AdamW learning rate", group=OPTIM, check=number_above(0))
    head_lr: Optional[float] = setting(None, "learning rate of codebook and heads (default: --lr)", group=OPTIM,
                                       check=optional(number_above(0)))
    weight_decay: float = setting(0.0, "AdamW weight decay", group=OPTIM, check=number_at_least(0))
    lr_scheduler: str = setting("cosine", "after linear warmup: cosine or linear decay to --min-lr-ratio of the "
                                          "peak, or constant", group=OPTIM, choices=LR_SCHEDULERS)
    warmup_steps: int = setting(30, "linear learning-rate warmup steps", group=OPTIM, check=int_at_least(0))
    min_lr_ratio: float = setting(0.1, "final learning rate / peak (cosine, linear)", group=OPTIM,
                                  check=in_unit_interval())
    max_grad_norm: float = setting(1.0, "gradient clipping (0 disables)", group=OPTIM, check=number_at_least(0))
    dtype: str = setting("float32", "compute dtype: bfloat16 runs the model under autocast with fp32 master weights "
                                    "(with LoRA the frozen base weights and the reference are stored in bf16); "
                                    "codebook and heads stay fp32. float64 runs everything in float64 (reference "
                                    "runs: comparisons across processes and layouts)", group=OPTIM, choices=DTYPES)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less activation "
                                                  "memory, more compute)", group=OPTIM)
    seed: int = setting(0, "seed of model init, data order and Gumbel noise", group=OPTIM, check=int_at_least(0))
    deterministic: bool = setting(False, "bitwise reproducible on one device: deterministic PyTorch algorithms (no "
                                         "atomics in gathers and scatters), cuBLAS's fixed workspace, the Triton "
                                         "LM head's split backward (can be slower on GPU)",
                                  group=OPTIM, resume=RESUME_FREE)
    # model
    model: Optional[str] = setting(None, "HF causal LM: a local directory or a hub id (default: a tiny random-init "
                                         "Llama)", group=MODEL, check=NON_EMPTY_STRING)
    ref_model: Optional[str] = setting(None, "DPO/IPO reference model (default: a frozen copy of the initial "
                                             "policy; with LoRA the policy with adapters disabled)", group=MODEL,
                                       check=NON_EMPTY_STRING)
    precompute_ref_logps: bool = setting(False, "score the dataset with the reference once before training, cache "
                                                "the log-probs in <run>/ref_logps.safetensors and free the reference "
                                                "model (DPO/IPO)", group=MODEL, resume=RESUME_FREE)
    lora_r: int = setting(0, "LoRA rank through peft (0: full fine-tuning)", group=MODEL, check=int_at_least(0))
    lora_alpha: float = setting(16.0, "LoRA alpha", group=MODEL, check=number_above(0))
    lora_dropout: float = setting(0.0, "LoRA dropout", group=MODEL, check=in_half_open(0, 1))
    disable_dropout: bool = setting(True, "set every dropout probability of the policy (and so of its copy, the "
                                          "reference) to 0, as TRL does by default; --no-disable-dropout keeps the "
                                          "model's (LoRA dropout is --lora-dropout)", group=MODEL)
    lora_target_modules: str = setting("all-linear", "modules LoRA adapts: all-linear (every linear layer but the "
                                                     "LM head) or a comma-separated list", group=MODEL)
    hidden_size: int = setting(64, "tiny Llama hidden size D (without --model)", group=MODEL, check=int_at_least(1))
    num_layers: int = setting(2, "tiny Llama layers (without --model)", group=MODEL, check=int_at_least(1))
    num_heads: int = setting(4, "tiny Llama attention heads (without --model)", group=MODEL, check=int_at_least(1))
    # data
    dataset: Optional[str] = setting(None, "local .jsonl/.json/.parquet with prompt/chosen/rejected (strings or "
                                           "chat-message lists, UltraFeedback-binarized layout, optional source "
                                           "column) or a `datasets` name (default: the built-in synthetic data)",
                                     group=DATA, check=NON_EMPTY_STRING)
    dataset_split: str = setting("train", "split of a named dataset (e.g. train_prefs)", group=DATA)
    eval_dataset: Optional[str] = setting(None, "held-out file or dataset name (default: --eval-size pairs held out "
                                                "of --dataset)", group=DATA, check=NON_EMPTY_STRING)
    eval_split: Optional[str] = setting(None, "held-out split of the named dataset (e.g. test_prefs) (default: held "
                                              "out of the training split)", group=DATA)
    eval_size: int = setting(512, "held-out preference pairs (a seeded random subset of --dataset, or the first N "
                                  "of the eval split)", group=DATA, check=int_at_least(0))
    max_length: int = setting(512, "max tokens per prompt+answer sequence", group=DATA, check=int_at_least(2))
    max_prompt_length: Optional[int] = setting(None, "prompts keep their last N tokens; answers are then cut to fit "
                                                     "--max-length (default: prompts are cut to half of --max-length "
                                                     "only when a pair does not fit)", group=DATA)
    batch_layout: str = setting("auto", "how a batch's sequences fill the backbone's rows: padded (one row per "
                                        "sequence), packed (sequences concatenated without padding, each attending "
                                        "to itself) or shared-prompt (one row [prompt | chosen | rejected] per pair, "
                                        "the prompt encoded once); the same log-probs in all three. auto: the "
                                        "fastest the model's attention takes (shared-prompt for eager and sdpa, "
                                        "packed for flash attention, else padded)", group=DATA,
                                choices=("auto",) + BATCH_LAYOUTS, resume=RESUME_FREE)
    max_tokens_per_batch: Optional[int] = setting(None, "run each micro-batch in backbone passes of at most N "
                                                        "positions (rows x row length, padding included), for an "
                                                        "even cost per pass; the loss is unchanged (default: one "
                                                        "pass per micro-batch)", group=DATA,
                                                  check=optional(int_at_least(1)), resume=RESUME_FREE)
    chat_template: str = setting("always", "with --model whose tokenizer has a chat template: always render the "
                                           "prompts with it, conversational (only rows given as message lists, as "
                                           "TRL does; string rows are tokenized as written) or never", group=DATA,
                                 choices=("always", "conversational", "never"))
    strict: bool = setting(False, "stop with an error at the first malformed row (default: skip and count them)",
                           group=DATA, resume=RESUME_FREE)
    user_field: str = setting("user", "the --dataset column holding each row's user id (a string or int; a row "
                                      "without one, or with an empty one, has no user)", group=DATA,
                              check=((lambda v: isinstance(v, str) and v != ""), "a non-empty string"))
    pairs_per_user: int = setting(0, "fill each batch with groups of N pairs of one user (batch-size / N groups; "
                                     "every process and micro-batch gets whole groups; pairs without a user are not "
                                     "trained on). 0: pairs in random order", group=DATA, check=int_at_least(0))
    max_unknown_token_share: float = setting(0.05, "stop before training when more than this share of the prompt or "
                                                   "answer tokens (training or held-out pairs) are the tokenizer's "
                                                   "unknown token (1: never)", group=DATA, check=in_unit_interval(),
                                             resume=RESUME_FREE)
    synthetic: str = setting("sources", "built-in data (without --dataset): sources (four sources, prompts hint at "
                                        "theirs) or annotators (six annotators, nothing about them in the prompt, "
                                        "Bradley-Terry labels)", group=DATA, choices=SYNTHETIC_PRESETS)
    num_train: int = setting(16384, "synthetic training pairs", group=DATA, check=int_at_least(0))
    hint_prob: Optional[float] = setting(None, "synthetic: probability a prompt names its source or annotator "
                                                "(default: 0.5 with --synthetic sources, 0 with annotators)",
                                         group=DATA, check=optional(in_unit_interval()))
    flip_fraction: float = setting(0.0, "synthetic: fraction of training labels flipped", group=DATA,
                                   check=in_unit_interval())
    flip_marker: bool = setting(True, "append the [flip] marker to flipped prompts (the paper's protocol); "
                                      "--no-flip-marker: unmarked label noise", group=DATA)
    unseen_users: int = setting(0, "synthetic annotators: N more users never seen in training (new mixtures of the "
                                   "annotators' weights, user ids unseen-0 ...), 64 held-out pairs each, added to "
                                   "the held-out pairs", group=DATA, check=int_at_least(0))
    # evaluation, checkpoints and output
    eval_every: int = setting(0, "evaluate every N steps (0: only at the end)", group=OUTPUT, check=int_at_least(0),
                              resume=RESUME_FREE)
    eval_batch_size: int = setting(128, "pairs per evaluation batch", group=OUTPUT, check=int_at_least(1),
                                   resume=RESUME_FREE)
    output_dir: Optional[str] = setting(None, "run directory (default: runs/<loss>-<lpc|nolpc>-<time>)",
                                        group=OUTPUT, check=NON_EMPTY_STRING, resume=RESUME_FREE)
    save_every: int = setting(0, "write a checkpoint every N steps (0: none)", group=OUTPUT, check=int_at_least(0),
                              resume=RESUME_FREE)
    keep_checkpoints: int = setting(2, "newest checkpoints kept (0: all)", group=OUTPUT, check=int_at_least(0),
                                    resume=RESUME_FREE)
    resume: Optional[str] = setting(None, "continue from a checkpoint dir, a run dir (its newest checkpoint) or "
                                          "'latest' (newest under --output-dir; starts fresh when there is none). "
                                          "Settings come from the checkpoint unless given (default: none)",
                                    group=OUTPUT, check=NON_EMPTY_STRING, resume=RESUME_LAUNCH)
    backend: str = setting("auto", "lpc_kernels backend", group=OUTPUT, choices=BACKENDS, resume=RESUME_FREE)
    device: str = setting("auto", "torch device (auto: cuda when available, else cpu; under torchrun each rank "
                                  "takes cuda:LOCAL_RANK)", group=OUTPUT, resume=RESUME_FREE)
    strategy: str = setting("none", "data parallelism under torchrun (torchrun --nproc-per-node N -m lpc.train ...): "
                                    "ddp replicates the model, fsdp2 shards it (fully_shard per decoder layer); each "
                                    "rank takes its slice of the same global --batch-size, so the run matches a "
                                    "1-process run. NCCL on GPU, gloo on CPU; none: one process", group=OUTPUT,
                            choices=STRATEGIES, resume=RESUME_LAUNCH)
    threads: Optional[int] = setting(None, "torch CPU threads (default: 1 for the tiny model, else min(cores, 8))",
                                     group=OUTPUT, check=optional(int_at_least(1)), resume=RESUME_FREE)
    cache_dir: Optional[str] = setting(None, "tokenizer cache (default: $LPC_CACHE_DIR or ~/.cache/lpc-kernels)",
                                       group=OUTPUT, check=NON_EMPTY_STRING, resume=RESUME_FREE)
    progress: bool = setting(True, "show the progress bar", group=OUTPUT, resume=RESUME_FREE)
    report_to: str = setting("none", "experiment trackers, comma-separated: none, tensorboard (event files in "
                                     "<run>/tensorboard; pip install tensorboard), wandb (offline unless "
                                     "WANDB_MODE=online; pip install wandb); the metric names of metrics.jsonl",
                             group=OUTPUT, check=(lambda v: isinstance(v, str) and bool(v.strip()) and all(
                                 n.strip() in REPORT_TO for n in v.split(",") if n.strip()),
                                 f"a comma-separated list of {', '.join(REPORT_TO)}"), resume=RESUME_FREE)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.loss == "sigmoid":  # TRL's loss_type name for DPO
            self.loss = "dpo"
        if self.kl_weight is None:
            self.kl_weight = DEFAULT_KL_WEIGHT[self.loss]
        if self.max_prompt_length is not None and not (
                _is_int(self.max_prompt_length) and 1 <= self.max_prompt_length < self.max_length):
            raise ConfigError("max_prompt_length", f"must be None or an integer in [1, max_length={self.max_length}), "
                                                   f"got {self.max_prompt_length!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ConfigError("gradient_accumulation_steps", f"must divide batch_size={self.batch_size} (the "
                              f"pairs per optimizer step) into equal micro-batches, got "
                              f"{self.gradient_accumulation_steps}")
        micro_batch = self.batch_size // self.gradient_accumulation_steps
        if self.pairs_per_user and micro_batch % self.pairs_per_user:
            raise ConfigError("pairs_per_user", f"must divide the {micro_batch} pairs of a micro-batch (--batch-size "
                                                f"{self.batch_size} / --gradient-accumulation-steps "
                                                f"{self.gradient_accumulation_steps}) into whole users, got "
                                                f"{self.pairs_per_user}")
        if self.unseen_users and (self.dataset is not None or self.synthetic != "annotators"):
            raise ConfigError("unseen_users", "needs the built-in --synthetic annotators data (no --dataset)")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 2 * self.max_length:
            raise ConfigError("max_tokens_per_batch", f"must be at least 2 * max_length = {2 * self.max_length} "
                                                      f"so that any pair fits in one pass, got "
                                                      f"{self.max_tokens_per_batch}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.device != "auto":
            try:
                torch.device(self.device)
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

    def lpc_config(self) -> Optional[LPCConfig]:
        """The ``LPCConfig`` these settings describe, or ``None`` with ``lpc=False``."""
        if not self.lpc:
            return None
        return LPCConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LPCConfig)})

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` of the preference objective these settings describe."""
        return LossConfig(loss_type=self.loss, beta=self.beta, gamma=self.gamma,
                          label_smoothing=self.label_smoothing, kl_weight=self.kl_weight,
                          ipo_average=self.ipo_average, backend=self.backend, free_bits=self.free_bits)

    def synthetic_config(self) -> SyntheticConfig:
        """The ``SyntheticConfig`` of the built-in data these settings describe (without ``--dataset``)."""
        hint = self.hint_prob if self.hint_prob is not None else (0.5 if self.synthetic == "sources" else 0.0)
        return SyntheticConfig(preset=self.synthetic, num_train=self.num_train, num_eval=self.eval_size,
                               hint_prob=hint, flip_fraction=self.flip_fraction, seed=self.seed,
                               flip_marker=self.flip_marker, num_unseen_users=self.unseen_users,
                               label_mode="bradley_terry" if self.synthetic == "annotators" else "deterministic")

    def kl_weight_at(self, step: int) -> float:
        """The KL weight of 0-based ``step``: ``kl_weight``, raised linearly from 0 over ``kl_warmup_steps``."""
        if self.kl_warmup_steps <= 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (step + 1) / self.kl_warmup_steps)

    def to_dict(self) -> dict:
        """All fields as a JSON-able dict (``TrainConfig(**d)`` rebuilds the config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, ignore_unknown: bool = False) -> "TrainConfig":
        """``TrainConfig(**d)``; unknown keys raise ``ConfigError`` unless ``ignore_unknown`` (configs
        saved by a newer version), and so do ``REMOVED_SETTINGS`` at any value but their no-op one."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not ignore_unknown:
            d = drop_removed_settings(d, "config")
            unknown = sorted(set(d) - names)
            if unknown:
                raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(names))})")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def fields_with(cls, resume: str) -> set[str]:
        """The names of the fields whose rule on resume is ``resume`` (``RESUME_FREE``, ``RESUME_LAUNCH``)."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resume") == resume}
