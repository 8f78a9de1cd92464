"""LPC inside TRL: ``LPCDPOConfig`` and ``LPCDPOTrainer``. TRL keeps the data handling, accelerate, checkpointing and
logging; the LM head, pair loss and KL term run in ``lk.linear_preference_loss`` and the latent follows ``LPCModel``'s
rules, as in ``lpc.train``. A TRL DPO script switches by changing the two classes (``examples/trl_lpc_dpo.py``); the
heads are saved beside the model (``LPCModel.from_pretrained`` loads the output directory)."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

import lpc_kernels as lk

from ..config import DEFAULT_KL_WEIGHT, ConfigError, LossConfig, LPCConfig, TrainConfig, check_field
from ..hf import decoder_of, lm_head_of
from ..losses import code_perplexity, entropy_from_logits
from ..model import LatentDraw, LPCModel
from ..objective import head_inputs

try:
    from accelerate.utils import is_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # the optional dependency: say which extra brings it
    raise ImportError(f"lpc.integrations.trl needs TRL 1.16 (pip install 'lpc-kernels[trl]'): {exc}") from None

TRL_LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo"}  # TRL's names -> lk.linear_preference_loss's
# the LPC settings of LPCDPOConfig as lpc.config declares them (default, type, help, check): every LPCConfig field,
# and lpc.train's --kl-weight (named lpc_kl_weight here) and --free-bits
LPC_SETTINGS = {**{f.name: f for f in dataclasses.fields(LPCConfig)},
                "lpc_kl_weight": next(f for f in dataclasses.fields(TrainConfig) if f.name == "kl_weight"),
                "free_bits": next(f for f in dataclasses.fields(TrainConfig) if f.name == "free_bits")}


def _with_lpc_settings(cls):
    """Declare the ``LPC_SETTINGS`` on ``cls`` before ``@dataclass`` makes them fields (help only in the metadata:
    TRL's argument parser passes it on to argparse)."""
    hints = typing.get_type_hints(TrainConfig)
    for name, f in LPC_SETTINGS.items():
        cls.__annotations__[name] = hints[f.name]
        setattr(cls, name, field(default=f.default, metadata={"help": f.metadata["help"]}))
    return cls


@dataclass
@_with_lpc_settings
class LPCDPOConfig(DPOConfig):
    """``DPOConfig`` plus the LPC settings with the meaning and defaults of ``python -m lpc.train``'s flags
    (``LPC_SETTINGS``), ``lpc`` and ``lpc_seed``."""

    lpc: bool = field(default=True, metadata={"help": "train with the latent (False: DPO / IPO on the fused op)"})
    lpc_seed: int = field(default=0, metadata={"help": "seed of the Gumbel noise"})

    def __post_init__(self):
        super().__post_init__()
        losses = list(self.loss_type) if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]
        if len(losses) != 1 or losses[0] not in TRL_LOSS_TYPES:
            raise ValueError(f"LPCDPOConfig.loss_type must be one of {list(TRL_LOSS_TYPES)}, got {self.loss_type!r}")
        for name in ("ld_alpha",):
            if getattr(self, name, None) is not None:
                raise ValueError(f"LPCDPOConfig does not support {name} (got {getattr(self, name)!r})")
        if getattr(self, "use_weighting", False):
            raise ValueError("LPCDPOConfig does not support use_weighting=True (WPO)")
        if getattr(self, "f_divergence_type", "reverse_kl") not in ("reverse_kl", "FDivergenceType.REVERSE_KL"):
            raise ValueError(f"LPCDPOConfig supports f_divergence_type='reverse_kl' only, got "
                             f"{self.f_divergence_type!r}")
        try:
            for name, f in LPC_SETTINGS.items():
                check_field(f, getattr(self, name), name)
        except ConfigError as exc:
            raise ValueError(f"LPCDPOConfig: {exc}") from None
        self.lpc_loss = TRL_LOSS_TYPES[losses[0]]
        if self.lpc_kl_weight is None:
            self.lpc_kl_weight = DEFAULT_KL_WEIGHT[self.lpc_loss]

    def lpc_config(self) -> Optional[LPCConfig]:
        """The ``LPCConfig`` of these settings, or ``None`` with ``lpc=False``."""
        if not self.lpc:
            return None
        return LPCConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LPCConfig)})

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` of the preference objective (TRL's length-averaged IPO)."""
        return LossConfig(loss_type=self.lpc_loss, beta=self.beta, kl_weight=self.lpc_kl_weight,
                          free_bits=self.free_bits)


def completion_labels(inputs: dict) -> torch.Tensor:
    """``[2B, L-1]`` targets of TRL's rows, aligned with the hidden states ``[:, :-1]`` that predict them: the next
    token on completion positions, -100 elsewhere."""
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]


def completion_features(hidden: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(h_x, h_w, h_l)`` ``[B, D]`` from TRL's ``[2B, L]`` rows (``[prompt | completion | pad]``, chosen rows
    first): the last prompt token of each chosen row and the last token of each completion."""
    b2, length = completion_mask.shape
    b = b2 // 2
    first = completion_mask.int().argmax(1)
    last = length - 1 - completion_mask.int().flip(1).argmax(1)
    rows = torch.arange(b2, device=hidden.device)
    h_x = hidden[rows[:b], (first[:b] - 1).clamp_min(0)]
    h_end = hidden[rows, last]
    return h_x, h_end[:b], h_end[b:]


class _ZeroHeadGradients(TrainerCallback):
    """The Trainer zeroes the model's gradients after each optimizer step; the heads are not in the model."""

    def __init__(self, params):
        self.params = params

    def on_step_end(self, args, state, control, **kwargs):
        for p in self.params:
            p.grad = None


class LPCDPOTrainer(DPOTrainer):
    """``DPOTrainer`` training LPC-DPO / LPC-IPO (or, with ``lpc=False``, DPO / IPO) through
    ``lk.linear_preference_loss``. Features come from TRL's ``[prompt | completion | pad]`` rows
    (``completion_features``). The codebook and heads are extra optimizer parameters (the policy stays a plain TRL
    model), outside ``max_grad_norm``'s clip (TRL clips the model's). Metrics: TRL's ``rewards/*``, ``logps/*``,
    ``num_tokens`` plus ``lpc/*``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LPCDPOConfig):
            raise TypeError(f"LPCDPOTrainer needs args=LPCDPOConfig(...), got {type(self.args).__name__}")
        policy = self.accelerator.unwrap_model(self.model)
        self.lpc_model = LPCModel(policy, self.args.lpc_config())
        self.lpc_model.to(self.accelerator.device)
        self.loss_cfg = self.args.loss_config()
        self._calibrated = not self.args.lpc
        self._noise_step, self._noise_calls = -1, 0  # which micro-batch of its step a call is (_latent_draw)
        self.add_callback(_ZeroHeadGradients(self.lpc_parameters()))

    def lpc_parameters(self) -> list:
        return [p for n, p in self.lpc_model.named_parameters() if not n.startswith("policy.")]

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.lpc_parameters() and not any(g.get("lpc") for g in optimizer.param_groups):
            optimizer.add_param_group({"params": self.lpc_parameters(), "weight_decay": 0.0, "lpc": True})
        return optimizer

    def _compute_loss(self, model, inputs, return_outputs):
        # accelerate applies mixed precision by wrapping the model's forward; the backbone and the head are called
        # here directly, so under the same autocast (compute_ref_log_probs, and TRL's own loss, score that way)
        with self.accelerator.autocast():
            return self._lpc_loss(model, inputs, return_outputs)

    def _lpc_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels = completion_labels(inputs)
        hidden = self._final_hidden_states(model, inputs)
        if self.precompute_ref_logps:
            ref = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
        lpc_model = self.lpc_model
        z = prior_logits = posterior_logits = None
        if lpc_model.lpc is not None:
            if not self._calibrated:  # on the first batch, as lpc.train
                lpc_model.calibrate_on(hidden[:, :-1][labels != -100])
                self._calibrated = True
            with torch.autocast(hidden.device.type, enabled=False):
                features = lpc_model.head_features(*completion_features(hidden, inputs["completion_mask"]))
                prior_logits, posterior_logits = lpc_model.code_logits(*features)
                # held-out: z from the prior, as lpc.evaluate
                _, z, _ = lpc_model.step_z(prior_logits, posterior_logits,
                                           self._latent_draw() if mode == "train" else None)
        h, weight, bias = head_inputs(hidden[:, :-1], *lm_head_of(self.accelerator.unwrap_model(model)))
        kl = lpc_model.step_kl(self.loss_cfg)
        res = kl.add_free_bits(lk.linear_preference_loss(
            h, weight, labels, bias=bias, z=z, ref_chosen_logps=ref[0].float(), ref_rejected_logps=ref[1].float(),
            prior_logits=prior_logits, posterior_logits=posterior_logits, kl_weight=kl.op_weight,
            **self.loss_cfg.op_options()))
        self._log_metrics(mode, inputs, res, prior_logits, posterior_logits)
        return (res.loss, res) if return_outputs else res.loss

    def _latent_draw(self) -> LatentDraw:
        """This training call's ``LPCModel.step_draw``: micro-batch ``c`` of its step on process ``p`` of ``P`` holds
        examples ``(c * P + p) * B ..`` of the step's ``B * accumulation * P``, so a resumed run draws the noise the
        uninterrupted one would."""
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._noise_calls = step, 0
        micro_batch, self._noise_calls = self._noise_calls, self._noise_calls + 1
        per_device, processes = self.args.per_device_train_batch_size, self.accelerator.num_processes
        return self.lpc_model.step_draw(
            step, self.state.max_steps, seed=self.args.lpc_seed,
            global_batch=per_device * self.args.gradient_accumulation_steps * processes,
            first_index=(micro_batch * processes + self.accelerator.process_index) * per_device)

    def _final_hidden_states(self, model, inputs) -> torch.Tensor:
        """``[2B, L, D]`` after the final norm (the backbone without the LM head)."""
        decoder = decoder_of(self.accelerator.unwrap_model(model))
        return decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       use_cache=False).last_hidden_state

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference pass (also the one ``precompute_ref_log_probs`` runs), scored with
        ``lk.linear_token_logprobs`` like the policy: at the first step a policy equal to its reference then gets
        margins of exactly 0 (TRL's chunked function differs from the exact log-softmax by ~1e-4 relative on long
        answers, which would otherwise show as a margin)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            # the policy's scoring (head_inputs: the autocast dtype), so a policy equal to its reference matches it
            h, weight, bias = head_inputs(self._final_hidden_states(model, inputs)[:, :-1],
                                          *lm_head_of(self.accelerator.unwrap_model(model)))
            logps = lk.linear_token_logprobs(h, weight, completion_labels(inputs), bias=bias)
        return logps.sum(-1).chunk(2, dim=0)

    @torch.no_grad()
    def _log_metrics(self, mode, inputs, res, prior_logits, posterior_logits) -> None:
        gather = self.accelerator.gather
        m = self._metrics[mode]
        cr, rj = res.chosen_rewards.detach(), res.rejected_rewards.detach()
        m["rewards/chosen"].append(gather(cr).mean().item())
        m["rewards/rejected"].append(gather(rj).mean().item())
        m["rewards/accuracies"].append(gather((cr > rj).float()).mean().item())
        m["rewards/margins"].append(gather(cr - rj).mean().item())
        m["logps/chosen"].append(gather(res.chosen_logps).mean().item())
        m["logps/rejected"].append(gather(res.rejected_logps).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        m["num_tokens"] = [self._total_train_tokens]
        if prior_logits is not None:
            m["lpc/kl"].append(gather(res.kl.detach()).mean().item())
            m["lpc/prior_entropy"].append(gather(entropy_from_logits(prior_logits)).mean().item())
            m["lpc/posterior_entropy"].append(gather(entropy_from_logits(posterior_logits)).mean().item())
            m["lpc/code_perplexity"].append(code_perplexity(gather(posterior_logits)).item())
        lk.raise_pending_errors()

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.lpc_model.write_lpc_files(Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.lpc_model.lpc is not None:
            self.lpc_model.load_heads(resume_from_checkpoint)
            self._calibrated = True
