"""LPC inside TRL: ``LPCDPOConfig`` and ``LPCDPOTrainer`` (TRL's data handling, accelerate, checkpointing and
logging; the LM head, pair loss and KL term through ``lk.linear_preference_loss``).

A TRL script switches by changing the two classes (``examples/trl_lpc_dpo.py``)::

    from lpc.integrations.trl import LPCDPOConfig, LPCDPOTrainer

    args = LPCDPOConfig(output_dir="out", beta=0.1, num_codes=32, kl_weight=1.0)
    trainer = LPCDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

The latent follows ``lpc.model`` (``docs/design.md`` sections 1 and 7): features at the last prompt token and the
last token of each completion of TRL's ``[prompt | completion | pad]`` rows, a Gumbel-softmax posterior sample
mixed toward the prior, ``z`` added to the final hidden states of both completions. The codebook and heads are
extra optimizer parameters (the policy stays a plain TRL model) and are saved beside the model
(``lpc_heads.safetensors``, ``lpc_config.json``), so ``LPCModel.from_pretrained`` and ``lpc.generate --checkpoint``
load the output directory (``lpc.evaluate`` reads ``lpc.train`` run directories only). The heads are not in
``max_grad_norm``'s clip (TRL clips the model's parameters). ``lpc=False`` is TRL's DPO (``loss_type`` ``sigmoid``
or ``ipo``) on the fused op.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

import lpc_kernels as lk

from ..config import LPCConfig
from ..model import (LPCModel, code_perplexity, decoder_of, entropy_from_logits, head_inputs, lm_head_of,
                     prior_mix_weight)

try:
    from accelerate.utils import is_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # the optional dependency: say which extra brings it
    raise ImportError(f"lpc.integrations.trl needs TRL 1.16 (pip install 'lpc-kernels[trl]'): {exc}") from None

LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo"}  # TRL's names -> lk.linear_preference_loss's


@dataclass
class LPCDPOConfig(DPOConfig):
    """``DPOConfig`` plus the LPC settings (the same meaning as ``python -m lpc.train``'s flags)."""

    lpc: bool = field(default=True, metadata={"help": "train with the latent (False: DPO / IPO on the fused op)"})
    num_codes: int = field(default=32, metadata={"help": "codebook size K"})
    lpc_kl_weight: Optional[float] = field(default=None, metadata={
        "help": "weight of KL(posterior || prior) (default 1 for sigmoid, 10 for ipo, as lpc.train)"})
    tau: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature"})
    hard: bool = field(default=False, metadata={"help": "one-hot (straight-through) Gumbel samples"})
    prior_mix: str = field(default="linear", metadata={"help": "z = g z_prior + (1-g) z_post, g: linear | none"})
    codebook_scale: float = field(default=1.0, metadata={"help": "codebook init std in units of RMS(hidden)"})
    free_bits: float = field(default=0.0, metadata={"help": "per-pair KL below this many nats is not penalised"})
    lpc_seed: int = field(default=0, metadata={"help": "seed of the Gumbel noise"})

    def __post_init__(self):
        super().__post_init__()
        losses = list(self.loss_type) if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]
        if len(losses) != 1 or losses[0] not in LOSS_TYPES:
            raise ValueError(f"LPCDPOConfig.loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        for name in ("ld_alpha",):
            if getattr(self, name, None) is not None:
                raise ValueError(f"LPCDPOConfig does not support {name} (got {getattr(self, name)!r})")
        if getattr(self, "use_weighting", False):
            raise ValueError("LPCDPOConfig does not support use_weighting=True (WPO)")
        if getattr(self, "f_divergence_type", "reverse_kl") not in ("reverse_kl", "FDivergenceType.REVERSE_KL"):
            raise ValueError(f"LPCDPOConfig supports f_divergence_type='reverse_kl' only, got "
                             f"{self.f_divergence_type!r}")
        if self.num_codes < 1 or self.tau <= 0 or self.free_bits < 0:
            raise ValueError(f"LPCDPOConfig: num_codes >= 1, tau > 0 and free_bits >= 0 required, got "
                             f"{self.num_codes}, {self.tau}, {self.free_bits}")
        self.lpc_loss = LOSS_TYPES[losses[0]]
        if self.lpc_kl_weight is None:
            self.lpc_kl_weight = 10.0 if self.lpc_loss == "ipo" else 1.0

    def lpc_config(self) -> Optional[LPCConfig]:
        if not self.lpc:
            return None
        return LPCConfig(num_codes=self.num_codes, codebook_scale=self.codebook_scale, tau=self.tau, hard=self.hard,
                         prior_mix=self.prior_mix)


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
    ``lk.linear_preference_loss``. Metrics: TRL's ``rewards/*``, ``logps/*``, ``num_tokens`` plus ``lpc/*``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LPCDPOConfig):
            raise TypeError(f"LPCDPOTrainer needs args=LPCDPOConfig(...), got {type(self.args).__name__}")
        policy = self.accelerator.unwrap_model(self.model)
        self.lpc_model = LPCModel(policy, self.args.lpc_config())
        self.lpc_model.to(self.accelerator.device)
        self._calibrated = not self.args.lpc
        self._noise_step, self._noise_calls = -1, 0  # Gumbel counters: a function of (step, micro-batch)
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
        cfg = self.args
        completion_mask = inputs["completion_mask"]
        labels = completion_labels(inputs)
        hidden = self._final_hidden_states(model, inputs)
        b = hidden.shape[0] // 2
        if self.precompute_ref_logps:
            ref = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
        lpc = self.lpc_model.lpc is not None
        z = prior_logits = posterior_logits = None
        if lpc:
            if not self._calibrated:
                with torch.no_grad():
                    scored = hidden[:, :-1][labels != -100]
                    self.lpc_model.hidden_rms.fill_(scored.float().pow(2).mean().sqrt())
                self._calibrated = True
            with torch.autocast(hidden.device.type, enabled=False):
                feats = [f.float() for f in completion_features(hidden, completion_mask)]
                if self.lpc_model.lpc.detach_features:
                    feats = [f.detach() for f in feats]
                prior_logits = self.lpc_model.prior(feats[0])
                posterior_logits = self.lpc_model.posterior(torch.cat(feats[1:], dim=-1))
                if mode == "train":
                    mix = prior_mix_weight(self.state.global_step, max(self.state.max_steps, 1), cfg.prior_mix)
                    _, z, _ = self.lpc_model.latent(prior_logits, posterior_logits, mix=mix, seed=cfg.lpc_seed,
                                                    offset=self._gumbel_offset(b))
                else:  # held-out: z from the prior, as lpc.evaluate
                    z = self.lpc_model.prior_z(prior_logits)[1]
        h, weight, bias = head_inputs(hidden[:, :-1], *lm_head_of(self.accelerator.unwrap_model(model)))
        kl_weight = cfg.lpc_kl_weight if lpc and cfg.free_bits == 0 else 0.0
        res = lk.linear_preference_loss(
            h, weight, labels, bias=bias, z=z, ref_chosen_logps=ref[0].float(), ref_rejected_logps=ref[1].float(),
            prior_logits=prior_logits,
            posterior_logits=posterior_logits, loss_type=cfg.lpc_loss, beta=cfg.beta,
            kl_weight=kl_weight, ipo_average=True)
        loss = res.loss
        if lpc and cfg.free_bits > 0:
            loss = loss + cfg.lpc_kl_weight * res.kl.clamp_min(cfg.free_bits).mean()
        self._log_metrics(mode, inputs, res, prior_logits, posterior_logits)
        return (loss, res) if return_outputs else loss

    def _gumbel_offset(self, b: int) -> int:
        """Counter offset of this micro-batch's noise: ``(step * accumulation + micro-batch) * 2BK`` with ``B`` the
        per-device batch, so a resumed run draws the noise the uninterrupted one would."""
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._noise_calls = step, 0
        index = step * self.args.gradient_accumulation_steps + self._noise_calls
        self._noise_calls += 1
        per_call = self.lpc_model.gumbel_numel(self.args.per_device_train_batch_size)
        return (index * self.accelerator.num_processes + self.accelerator.process_index) * per_call

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
