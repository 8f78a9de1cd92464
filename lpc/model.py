"""The LPC model: an HF causal LM with a codebook and prior/posterior heads, ``z`` added to the final hidden
states before the LM head (``docs/design.md``, "The method" and "The LPC model in code"). ``LPCModel`` owns the
latent's rules: the prior mix, the Gumbel counters, calibration, how a step's KL weight is applied, and saving."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoModelForCausalLM

import lpc_kernels as lk
from lpc_kernels.numerics import compute_dtype

from .config import LossConfig, LPCConfig
from .hf import final_hidden_states, lm_head_of, scored_positions, shard_units
from .io import atomic_directory, read_safetensors, verify_manifest, write_manifest
from .objective import Objective, fused_objective, scored_logps
from .runtime import quiet_transformers

HEADS_FILE = "lpc_heads.safetensors"
LPC_CONFIG_FILE = "lpc_config.json"


def prior_mix_weight(step: int, total_steps: int, mode: str = "linear") -> float:
    """``g`` in ``z = g * z_prior + (1 - g) * z_post``: ``step / (total_steps - 1)`` for ``"linear"``
    (0 at the first step, 1 at the last), 0 for ``"none"``."""
    if mode == "none":
        return 0.0
    if mode != "linear":
        raise ValueError(f"prior_mix must be 'linear' or 'none', got {mode!r}")
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def _compute(t: Tensor) -> Tensor:
    """``t`` in its compute dtype: float32 (float64 in a ``--dtype float64`` run) for the heads' softmaxes."""
    return t.to(compute_dtype(t))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class LatentDraw(NamedTuple):
    """How a training pass draws ``z`` (``LPCModel.step_draw``): the prior-mix weight ``g`` and the Gumbel seed and
    counters of its posterior (``offset``) and prior (``prior_offset``) noise."""

    mix: float
    seed: int
    offset: int
    prior_offset: Optional[int]  # None: the ``B*K`` counters after the posterior's (``latent``)


class StepKL(NamedTuple):
    """How a step applies its KL weight (``docs/design.md``, "The label leak and its controls"): the loss op weighs
    ``KL_i`` by ``op_weight``; with free bits the op gets 0 and ``add_free_bits`` adds
    ``weight * mean_i max(KL_i, free_bits)`` after it. Both are 0 without the latent."""

    weight: float
    free_bits: float

    @classmethod
    def of(cls, cfg: LossConfig, kl_weight: Optional[float] = None, *, latent: bool = True) -> "StepKL":
        """The rule for a step whose KL weight is ``kl_weight`` (default ``cfg.kl_weight``)."""
        if not latent:
            return cls(0.0, 0.0)
        return cls(cfg.kl_weight if kl_weight is None else kl_weight, cfg.free_bits)

    @property
    def op_weight(self) -> float:
        return 0.0 if self.free_bits > 0 else self.weight

    def add_free_bits(self, res):
        """``res`` (an ``lk`` loss output) with the free-bits term in ``loss`` and ``losses``."""
        if self.free_bits <= 0:
            return res
        kl_term = self.weight * res.kl.clamp_min(self.free_bits)
        # from res.loss, not losses.mean(): the fused op's per-pair losses are values without gradient
        return res._replace(loss=res.loss + kl_term.mean(), losses=res.losses + kl_term)


# ---------------------------------------------------------------------------------------- the model
@dataclass
class LPCOutput:
    """Per-pair outputs of one policy pass. Log-probs are summed over answer tokens (fp32)."""

    chosen_logps: Tensor              # [B]
    rejected_logps: Tensor            # [B]
    chosen_lengths: Tensor            # [B] int64
    rejected_lengths: Tensor          # [B] int64
    prior_logits: Optional[Tensor]    # [B, K] (None without LPC)
    posterior_logits: Optional[Tensor]  # [B, K]
    code_weights: Optional[Tensor]    # [B, K] the weights that formed z (Gumbel sample, prior probs or one-hot)
    z: Optional[Tensor]               # [B, D]
    num_tokens: int                   # real tokens of prompt+chosen and prompt+rejected (any layout)
    # LPC diagnostics (no gradient): the log-probs with z from the prior (the inference z) and, in training,
    # with z from the posterior's sample alone; mean z**2 per pair and the sum over the pair's scored positions
    # of mean h**2 (lpc/z_rms_ratio: docs/design.md, "Per-step metrics")
    prior_chosen_logps: Optional[Tensor] = None      # [B]
    prior_rejected_logps: Optional[Tensor] = None    # [B]
    posterior_chosen_logps: Optional[Tensor] = None  # [B]
    posterior_rejected_logps: Optional[Tensor] = None  # [B]
    z_sq: Optional[Tensor] = None                    # [B]
    hidden_sq: Optional[Tensor] = None               # [B]
    # evaluation with diagnostics: {name: (chosen [B], rejected [B])} for every z of ``LPCModel.diagnostic_zs``
    diagnostics: Optional[dict] = None
    # training with an ``Objective``: the loss computed in the forward (``lk.PreferenceLossOutput``; the log-probs
    # above are then values without gradient)
    objective: Optional[lk.PreferenceLossOutput] = None

    def detach(self) -> "LPCOutput":
        """The same outputs cut from the graph, without the loss (what the step metrics read after backward)."""
        return LPCOutput(*(v.detach() if isinstance(v, Tensor) else v
                           for v in (getattr(self, f.name) for f in dataclasses.fields(LPCOutput)
                                     if f.name != "objective")))


class LPCModel(nn.Module):
    """A causal LM policy with LPC's codebook ``E [K, D]`` and heads, or a plain policy when ``lpc`` is None.

    Args:
        policy: an ``AutoModelForCausalLM``-compatible model whose LM head is a plain ``nn.Linear``.
        lpc: the latent configuration, or ``None`` for plain DPO / IPO / SimPO.
        backend: ``lpc_kernels`` backend for the log-prob and Gumbel ops.
    """

    def __init__(self, policy: nn.Module, lpc: Optional[LPCConfig] = None, *, backend: str = "auto"):
        super().__init__()
        self.policy = policy
        self.lpc = lpc
        self.backend = backend
        lm_head_of(policy)  # fail early on unsupported heads
        if lpc is not None:
            d = policy.config.hidden_size
            width = lpc.head_hidden or d
            # in units of hidden_rms: z = (w @ E) * hidden_rms (calibrate sets it from the model's hidden states)
            self.codebook = nn.Parameter(torch.randn(lpc.num_codes, d) * lpc.codebook_scale)
            self.prior = _mlp(d, width, lpc.num_codes)
            self.posterior = _mlp(2 * d, width, lpc.num_codes)
            self.register_buffer("hidden_rms", torch.ones(()))

    @property
    def hidden_size(self) -> int:
        return self.policy.config.hidden_size

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards before this root (``lpc.distributed.fsdp2_shard``)."""
        return shard_units(self.policy)

    def head_state_dict(self) -> dict[str, Tensor]:
        """Codebook and head parameters (what ``lpc_heads.safetensors`` stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("policy.")}

    # ------------------------------------------------------------------------------------ latents
    def features(self, hidden: Tensor, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(h_x, h_w, h_l)``, each ``[B, D]``, from the ``[R * L, D]`` hidden states of one pass: the last prompt
        token and the last token (eos) of each answer, wherever the batch layout put them (``head_features``)."""
        return self.head_features(*hidden[batch["feature_index"]])

    def head_features(self, h_x: Tensor, h_w: Tensor, h_l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The features as the heads take them: detached with ``detach_features``, in the codebook's dtype."""
        if self.lpc.detach_features:
            h_x, h_w, h_l = h_x.detach(), h_w.detach(), h_l.detach()
        dt = self.codebook.dtype
        return h_x.to(dt), h_w.to(dt), h_l.to(dt)

    def code_logits(self, h_x: Tensor, h_w: Tensor, h_l: Tensor) -> tuple[Tensor, Tensor]:
        """``(prior_logits, posterior_logits)`` ``[B, K]`` of the heads' features (``head_features``)."""
        return self.prior(h_x), self.posterior(torch.cat([h_w, h_l], dim=-1))

    def embed(self, weights: Tensor) -> Tensor:
        """``[B, K]`` code weights -> ``z = (weights @ E) * hidden_rms`` ``[B, D]``."""
        return (weights.to(self.codebook.dtype) @ self.codebook) * self.hidden_rms

    def code_z(self, codes: Tensor) -> Tensor:
        """``z = E[code] * hidden_rms`` for each code id of ``codes``."""
        return self.codebook[codes] * self.hidden_rms

    @torch.no_grad()
    def calibrate(self, batch: dict) -> float:
        """Set ``hidden_rms`` to the RMS of the policy's final hidden states at the scored positions of ``batch``
        (called once before training): the codebook's ``codebook_scale`` is then relative to this model's hidden
        states, whatever its hidden size or final norm. Returns the value."""
        return self.calibrate_on(scored_positions(final_hidden_states(self.policy, batch), batch).hidden)

    @torch.no_grad()
    def calibrate_on(self, scored_hidden: Tensor) -> float:
        """``calibrate`` from final hidden states already gathered at the scored positions (any shape)."""
        self.hidden_rms.fill_(_compute(scored_hidden).pow(2).mean().sqrt())
        return float(self.hidden_rms)

    def prior_z(self, prior_logits: Tensor, mode: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """Inference latent: ``(weights [B, K], z [B, D])`` from the prior, ``"expected"`` or ``"argmax"``."""
        mode = mode or self.lpc.inference
        if mode == "argmax":
            w = F.one_hot(prior_logits.argmax(-1), self.lpc.num_codes).to(self.codebook.dtype)
        else:
            w = torch.softmax(_compute(prior_logits), dim=-1).to(self.codebook.dtype)
        return w, self.embed(w)

    def latent(self, prior_logits: Tensor, posterior_logits: Tensor, *, mix: float, seed: int,
               offset: int, prior_offset: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training latent ``z = g * z_prior + (1 - g) * z_post``; returns ``(posterior weights, z, z_post)``.

        The posterior sample of row ``b`` uses Gumbel counters ``offset + b*K .. offset + b*K + K``; a
        Gumbel prior sample (``prior_sample="gumbel"``) uses ``prior_offset + b*K + k`` (default
        ``offset + B*K``, the next ``B*K`` counters), so the two noises are independent.
        ``gumbel_offsets`` gives offsets that make each example's noise independent of the batch split.
        """
        cfg = self.lpc
        w, z_post = lk.gumbel_softmax_codes(posterior_logits, self.codebook, tau=cfg.tau, hard=cfg.hard, seed=seed,
                                            offset=offset, backend=self.backend)
        z_post = z_post * self.hidden_rms
        z = z_post
        if mix > 0.0:
            if cfg.prior_sample == "gumbel":
                _, z_prior = lk.gumbel_softmax_codes(prior_logits, self.codebook, tau=cfg.tau, hard=cfg.hard,
                                                     seed=seed, offset=(offset + prior_logits.numel()
                                                                        if prior_offset is None else prior_offset),
                                                     backend=self.backend)
                z_prior = z_prior * self.hidden_rms
            else:
                z_prior = self.prior_z(prior_logits, "expected")[1]
            z = mix * z_prior + (1.0 - mix) * z_post
        return w, z, z_post

    def gumbel_numel(self, batch_size: int) -> int:
        """Gumbel counters one training step consumes (advance ``offset`` by this between steps)."""
        return 0 if self.lpc is None else 2 * batch_size * self.lpc.num_codes

    def gumbel_offsets(self, step: int, global_batch: int, first_index: int) -> tuple[int, int]:
        """``(offset, prior_offset)`` for a micro-batch whose first example is ``first_index`` in the
        global batch of ``global_batch`` examples at optimizer step ``step``.

        Step ``s`` owns counters ``[s * 2GK, (s + 1) * 2GK)``: the posterior noise of example ``i`` is
        ``s*2GK + i*K + k`` and its prior noise ``s*2GK + G*K + i*K + k``. Every example's noise is thus a
        pure function of ``(seed, step, i)``, whatever the micro-batching, data-parallel split or resume
        point. For one micro-batch holding the whole batch this is the plain layout of ``latent``
        (``offset = s * gumbel_numel(G)``, prior noise in the next ``G*K`` counters).
        """
        if self.lpc is None:
            return 0, 0
        k = self.lpc.num_codes
        base = step * 2 * global_batch * k
        return base + first_index * k, base + global_batch * k + first_index * k

    def mix_at(self, step: int, total_steps: int) -> float:
        """The prior-mix weight ``g`` of 0-based ``step`` of ``total_steps`` (``prior_mix_weight``; 0 without LPC)."""
        return 0.0 if self.lpc is None else prior_mix_weight(step, total_steps, self.lpc.prior_mix)

    def step_draw(self, step: int, total_steps: int, *, seed: int, global_batch: int,
                  first_index: int) -> LatentDraw:
        """How a training pass at ``step`` draws ``z`` for the examples of a global batch of ``global_batch`` from
        ``first_index`` on: ``mix_at`` and ``gumbel_offsets``."""
        return LatentDraw(self.mix_at(step, total_steps), seed,
                          *self.gumbel_offsets(step, global_batch, first_index))

    def step_z(self, prior_logits: Tensor, posterior_logits: Tensor,
               draw: Optional[LatentDraw]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(code weights, z, z_post)`` of a pass: the training latent of ``draw`` (``latent``), or without one the
        inference latent (``prior_z``; ``z_post`` None)."""
        if draw is None:
            return (*self.prior_z(prior_logits), None)
        return self.latent(prior_logits, posterior_logits, mix=draw.mix, seed=draw.seed, offset=draw.offset,
                           prior_offset=draw.prior_offset)

    def step_kl(self, cfg: LossConfig, kl_weight: Optional[float] = None) -> StepKL:
        """How the loss applies a step's KL weight (default ``cfg.kl_weight``) and ``cfg.free_bits`` (``StepKL``)."""
        return StepKL.of(cfg, kl_weight, latent=self.lpc is not None)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, *, mix: float = 0.0, seed: int = 0, offset: int = 0,
                prior_offset: Optional[int] = None, use_prior: bool = False, diagnostics: bool = False,
                objective: Optional[Objective] = None) -> LPCOutput:
        """One policy pass over a collated batch (see ``lpc.data``).

        Args:
            mix / seed / offset / prior_offset: how training draws ``z`` (a ``LatentDraw``: ``step_draw``).
            use_prior: inference mode: ``z`` from the prior (``lpc.inference``), no sampling.
            diagnostics: with ``use_prior``, also the log-probs under every z of ``diagnostic_zs`` (one more
                LM-head pass each, no gradient; the backbone runs once). In training (LPC), the log-probs with
                z from the prior and, when ``mix > 0``, from the posterior's sample alone (the leak diagnostics
                of the step metrics; up to two more LM-head passes, no gradient).
            objective: compute the training loss here with ``lk.linear_preference_loss`` (``out.objective``)
                instead of differentiable log-probs for ``lpc.losses.preference_objective``.

        The codebook and heads always run in fp32 (autocast off): they are tiny, and the KL term and the
        Gumbel sample are sensitive to bf16 rounding of the code logits.
        """
        hidden = final_hidden_states(self.policy, batch)
        weight, bias = lm_head_of(self.policy)
        pos = scored_positions(hidden, batch)

        def logps(z: Optional[Tensor]) -> tuple[Tensor, Tensor]:
            return scored_logps(pos, weight, bias, None if z is None else torch.cat([z, z]),
                                backend=self.backend).chunk(2)

        def training_logps(z, prior_logits=None, posterior_logits=None):
            """``(chosen, rejected, loss)``: through the fused loss with an ``objective`` (loss None otherwise)."""
            if objective is None:
                return (*logps(z), None)
            res = fused_objective(pos, batch, weight, bias, z, prior_logits, posterior_logits, objective,
                                  kl_weight=self.step_kl(objective.cfg, objective.kl_weight).op_weight,
                                  backend=self.backend)
            return res.chosen_logps, res.rejected_logps, lk.PreferenceLossOutput(*res[:5])

        if self.lpc is None:
            chosen, rejected, loss = training_logps(None)
            return LPCOutput(chosen, rejected, batch["chosen_lengths"], batch["rejected_lengths"], None, None, None,
                             None, batch["num_tokens"], objective=loss)
        with torch.autocast(hidden.device.type, enabled=False):
            h_x, h_w, h_l = self.features(hidden, batch)
            prior_logits, posterior_logits = self.code_logits(h_x, h_w, h_l)
            w, z, z_post = self.step_z(prior_logits, posterior_logits,
                                       None if use_prior else LatentDraw(mix, seed, offset, prior_offset))
        chosen, rejected, loss = training_logps(z, prior_logits, posterior_logits)
        out = LPCOutput(chosen, rejected, batch["chosen_lengths"], batch["rejected_lengths"], prior_logits,
                        posterior_logits, w, z, batch["num_tokens"], objective=loss)
        with torch.no_grad():
            sq = _compute(pos.hidden.detach()).pow(2).mean(-1)
            out.hidden_sq = sum(sq.new_zeros(pos.num_sequences).index_add(0, pos.sequences, sq).chunk(2))
            out.z_sq = _compute(z.detach()).pow(2).mean(-1)
            if use_prior:
                out.prior_chosen_logps, out.prior_rejected_logps = chosen.detach(), rejected.detach()
                if diagnostics:
                    out.diagnostics = {name: (chosen.detach(), rejected.detach()) if name == "prior" else logps(zd)
                                       for name, zd in self.diagnostic_zs(posterior_logits, h_w, h_l, z).items()}
            elif diagnostics:
                out.prior_chosen_logps, out.prior_rejected_logps = logps(self.prior_z(prior_logits)[1])
                out.posterior_chosen_logps, out.posterior_rejected_logps = (
                    (chosen.detach(), rejected.detach()) if mix == 0.0 else logps(z_post))
        return out

    def diagnostic_zs(self, posterior_logits: Tensor, h_w: Tensor, h_l: Tensor,
                      z_prior: Tensor) -> dict[str, Tensor]:
        """The latents evaluation compares (each ``[B, D]``): ``prior`` (the inference z), ``posterior`` (the
        expected embedding of ``posterior_logits``, the posterior on the pair as labelled), ``posterior_swapped``
        (of the posterior fed ``[h_l ; h_w]``: the pair with its label flipped), ``zero``, and ``code_k = E[k]``
        for every code."""
        with torch.autocast(z_prior.device.type, enabled=False):
            post = torch.softmax(_compute(posterior_logits), dim=-1)
            swapped = torch.softmax(_compute(self.posterior(torch.cat([h_l, h_w], dim=-1))), dim=-1)
            zs = {"prior": z_prior, "posterior": self.embed(post), "posterior_swapped": self.embed(swapped),
                  "zero": torch.zeros_like(z_prior)}
            codes = torch.arange(self.lpc.num_codes, device=z_prior.device)
            for k, zk in zip(codes.tolist(), self.code_z(codes)):
                zs[f"code_{k}"] = zk.expand_as(z_prior)
        return zs

    # ------------------------------------------------------------------------------------ saving
    def write_files(self, directory: os.PathLike, tokenizer=None, extra_files: Optional[dict] = None, *,
                    state_dict: Optional[dict] = None) -> None:
        """Write the policy (HF layout, safetensors; a ``peft`` policy writes its adapter files),
        ``lpc_heads.safetensors`` and ``lpc_config.json``, the tokenizer and ``extra_files`` (name ->
        JSON-able object) into the existing ``directory``. Not atomic: see ``save_pretrained``.

        ``state_dict``: write these weights instead of the module's own: the full state dict of an
        FSDP2-sharded model gathered to rank 0 (``lpc.distributed.full_state_dict``; keys ``policy.*`` and the
        heads'), whose own parameters are shards. The files are the same either way."""
        directory = Path(directory)
        policy_kwargs, heads = {}, self.head_state_dict()
        if state_dict is not None:
            policy_kwargs["state_dict"] = {k[len("policy."):]: v for k, v in state_dict.items()
                                           if k.startswith("policy.")}
            heads = {k: v for k, v in state_dict.items() if not k.startswith("policy.")}
        with quiet_transformers():
            self.policy.save_pretrained(directory, safe_serialization=True, **policy_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        self.write_lpc_files(directory, heads)
        for name, obj in (extra_files or {}).items():
            with open(directory / name, "w") as f:
                json.dump(obj, f, indent=2)

    def write_lpc_files(self, directory: os.PathLike, heads: Optional[dict] = None) -> None:
        """``lpc_config.json`` and (with the latent) ``lpc_heads.safetensors`` of ``heads`` (default: this model's
        ``head_state_dict``) into ``directory``, beside a policy written by its own ``save_pretrained``."""
        directory = Path(directory)
        meta = {"lpc": self.lpc.to_dict() if self.lpc is not None else None}
        with open(directory / LPC_CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=2)
        if self.lpc is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in (heads or self.head_state_dict()).items()}
            save_file(tensors, str(directory / HEADS_FILE), metadata={"lpc_config": json.dumps(meta["lpc"])})

    def save_pretrained(self, path: os.PathLike, tokenizer=None, extra_files: Optional[dict] = None, *,
                        state_dict: Optional[dict] = None) -> Path:
        """Write ``path/`` atomically: the policy (HF layout, safetensors), ``lpc_heads.safetensors`` and
        ``lpc_config.json`` beside it, the tokenizer, and ``extra_files`` (name -> JSON-able object).

        Everything goes into a temp directory next to ``path`` which then replaces ``path`` by rename,
        so a crash never leaves a half-written checkpoint under the final name; ``manifest.json`` (every file's
        size and SHA-256) is written last and ``from_pretrained`` verifies it.
        """
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.write_files(tmp, tokenizer, extra_files, state_dict=state_dict)
            write_manifest(tmp)
        return path

    def load_heads(self, directory: os.PathLike) -> None:
        """Load the codebook and heads from ``directory/lpc_heads.safetensors`` (the policy is untouched).

        Raises ``ValueError`` (``"<file>: missing [...], unexpected [...]"``) when the file does not hold
        exactly this model's non-policy tensors."""
        file = Path(directory) / HEADS_FILE
        missing, unexpected = self.load_state_dict(read_safetensors(file), strict=False)
        # heads written before hidden_rms existed: their codebook is in absolute units (hidden_rms = 1)
        missing = [k for k in missing if not k.startswith("policy.") and k != "hidden_rms"]
        if missing or unexpected:
            raise ValueError(f"{file}: missing {missing}, unexpected {unexpected}")

    @classmethod
    def from_pretrained(cls, path: os.PathLike, *, backend: str = "auto", verified: bool = False,
                        **model_kwargs) -> "LPCModel":
        """Load what ``save_pretrained`` wrote (``model_kwargs`` go to ``AutoModelForCausalLM``); raises
        ``lpc.io.IntegrityError`` naming the file when a file fails the directory's manifest (unless ``verified``:
        the caller checked it)."""
        path = Path(path)
        if not verified:
            verify_manifest(path)
        with quiet_transformers():
            policy = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        with open(path / LPC_CONFIG_FILE) as f:
            meta = json.load(f)
        lpc = LPCConfig.from_dict(meta["lpc"]) if meta.get("lpc") else None
        model = cls(policy, lpc, backend=backend)
        if policy.dtype == torch.float64:  # a --dtype float64 run: its codebook and heads are float64 too
            model.to(torch.float64)
        if lpc is not None:
            model.load_heads(path)
        return model
