"""The LPC model: any HF causal LM plus a codebook and prior/posterior heads, ``z`` added before the LM head.

``docs/design.md`` section 1 (the method) in code; section 7 walks through this file:

* One backbone pass per batch. The chosen and rejected sequences of ``B`` pairs run as one ``[R, L]`` pass
  in the batch's layout (``lpc.data``: padded, packed, or one shared prompt per pair) through the model's
  transformer body (``get_decoder()``, i.e. without the LM head), giving final hidden states ``H [R * L, D]``
  (after the final norm). The backbone never sees ``z``, so the same ``H`` gives the features and the states
  the log-probs need; the batch's ``score_index`` and ``feature_index`` say where they are in any layout.
* Features: ``h_x`` at the last prompt token (with a causal model this equals a prompt-only pass), ``h_w`` and
  ``h_l`` at the last token (the eos) of the chosen and the rejected answer.
* Prior ``softmax(MLP_prior(h_x))`` and posterior ``softmax(MLP_post([h_w ; h_l]))`` over ``K`` codes.
* Training: ``w, z_post = gumbel_softmax_codes(posterior_logits, E, seed, offset)``;
  ``z = g * z_prior + (1 - g) * z_post`` with ``g`` from ``prior_mix_weight``. Inference: ``z`` from the
  prior (expected embedding by default, or the argmax code).
* Conditioning: ``log pi(y_t | x, y_<t, z) = linear_token_logprobs(H[t-1] + z, W_head, y_t)``, only at the
  positions that predict answer tokens (adding ``z`` to the others would not change any log-prob), so the
  ``[N, V]`` logits are never materialised.

The reference model is a frozen copy of the initial policy, scored the same way without ``z``.
"""

from __future__ import annotations

import copy
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
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lpc_kernels as lk

from .config import LossConfig, LPCConfig
from .data.batching import PROMPT
from .io import atomic_directory, read_safetensors, verify_manifest, write_manifest
from .runtime import quiet_transformers

HEADS_FILE = "lpc_heads.safetensors"
LPC_CONFIG_FILE = "lpc_config.json"


# ------------------------------------------------------------------------------------ policy helpers
def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of an HF causal LM (everything before the LM head)."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ValueError(f"cannot find the transformer body of {type(model).__name__} "
                         "(neither get_decoder() nor base_model_prefix)")
    return body


def lm_head_of(model: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight [V, D], bias [V] | None)`` of the LM head; refuses heads that are not a plain linear map."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the LM head must be an nn.Linear, got {type(head).__name__}")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):  # logits != hidden @ W.T for these models
        value = getattr(cfg, attr, None)
        if value not in (None, 1.0):
            raise ValueError(f"models with {attr}={value} are not supported: the fused log-prob op computes "
                             "plain hidden @ W.T + b")
    return head.weight, head.bias


def decoder_layers(policy: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM: the modules whose class is in ``_no_split_modules``
    (how HF / accelerate name them, e.g. ``LlamaDecoderLayer``), else the body's ``layers`` list."""
    names: set[str] = set()
    for m in policy.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    found = [m for m in policy.modules() if type(m).__name__ in names]
    if found:
        return found
    layers = getattr(decoder_of(policy), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(policy).__name__} to shard with FSDP2 (no "
                     "_no_split_modules and no .layers list)")


def shard_units(policy: nn.Module) -> list[nn.Module]:
    """What FSDP2 shards of a policy before its root, innermost first: every decoder layer, then the transformer
    body (embeddings, final norm), unless the input embeddings are tied to the LM head (whose weight the root's
    forward reads, so it must stay in the root's unit)."""
    inp = policy.get_input_embeddings() if hasattr(policy, "get_input_embeddings") else None
    out = policy.get_output_embeddings() if hasattr(policy, "get_output_embeddings") else None
    tied = inp is not None and out is not None and inp.weight is out.weight
    return decoder_layers(policy) + ([] if tied else [decoder_of(policy)])


# attention implementations that take the 4D masks of the packed and shared-prompt layouts
ATTENTION_4D = ("eager", "sdpa")


def layout_mask(segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """``[R, L]`` unit and branch ids (``lpc.data`` batch keys) -> ``[R, 1, L, L]`` bool, True where query ``i``
    may attend to key ``j``: ``j <= i`` in the same unit, and ``j`` in the prompt or in ``i``'s own branch (the
    rejected answer never sees the chosen one). Padding queries attend to themselves only (no empty rows)."""
    length = segment_ids.shape[1]
    idx = torch.arange(length, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_unit = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] >= 0)
    branch = (branch_ids[:, None, :] == PROMPT) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    allowed = (causal & same_unit & branch) | (idx[None, :] == idx[:, None])
    return allowed[:, None]


def attention_implementation(model: nn.Module) -> str:
    """The HF attention implementation of ``model`` (``config._attn_implementation``; eager when unset)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def supported_batch_layouts(model: nn.Module) -> tuple[str, ...]:
    """The batch layouts ``model`` can run, fastest first (``benches/bench_batch_layouts.py``): packed and
    shared-prompt rows need attention that takes a 4D mask (eager, sdpa); flash attention takes packed rows
    through the position ids; anything else runs padded rows only."""
    impl = attention_implementation(model)
    if impl in ATTENTION_4D:
        return ("shared-prompt", "packed", "padded")
    return ("packed", "padded") if impl.startswith("flash") else ("padded",)


def check_batch_layout(model: nn.Module, layout: str) -> None:
    """Raise ``ValueError`` naming the layout and the attention implementation when ``model`` cannot run
    ``layout`` (``supported_batch_layouts``)."""
    if layout in supported_batch_layouts(model):
        return
    impl = attention_implementation(model)
    raise ValueError(f"batch layout {layout!r} needs attention that takes a 4D mask ({', '.join(ATTENTION_4D)}"
                     f"{'; or flash attention through position ids' if layout == 'packed' else ''}), but "
                     f"{type(model).__name__} uses attn_implementation={impl!r}: use --batch-layout "
                     f"{supported_batch_layouts(model)[0]} or load the model with attn_implementation='sdpa'")


def attention_inputs(model: nn.Module, batch: dict) -> dict:
    """The attention arguments of ``batch``'s layout for ``model``: a 2D padding mask (``padded``), a 4D mask
    with per-sequence position ids (``packed``, ``shared-prompt``; eager and sdpa attention), or position ids
    alone (``packed`` with flash attention: HF's varlen path). ``check_batch_layout`` says which models can."""
    layout = batch["layout"]
    if layout == "padded":
        return {"attention_mask": (batch["segment_ids"] >= 0).long()}
    check_batch_layout(model, layout)
    impl = attention_implementation(model)
    if impl not in ATTENTION_4D:
        return {"position_ids": batch["position_ids"]}
    allowed = layout_mask(batch["segment_ids"], batch["branch_ids"])
    if impl == "eager":  # eager attention adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)
    return {"attention_mask": allowed, "position_ids": batch["position_ids"]}


def final_hidden_states(model: nn.Module, batch: dict) -> Tensor:
    """``[R * L, D]`` final-layer hidden states (after the final norm, no LM head) of the batch's ``[R, L]`` rows,
    flattened so that ``score_index`` and ``feature_index`` address them."""
    out = decoder_of(model)(input_ids=batch["input_ids"], use_cache=False, **attention_inputs(model, batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.reshape(-1, hidden.shape[-1])


class ScoredPositions(NamedTuple):
    """The positions of ``S`` sequences that predict answer tokens, compacted (prompt and padding never reach
    the log-prob op): ``hidden [N, D]``, the sequence of each ``sequences [N]``, the token it predicts
    ``targets [N]``."""

    hidden: Tensor
    sequences: Tensor
    targets: Tensor
    num_sequences: int


def scored_positions(hidden: Tensor, batch: dict) -> ScoredPositions:
    """``hidden [R * L, D]`` (``final_hidden_states``) -> the ``ScoredPositions`` of the batch's ``2B``
    sequences (pair ``b``'s chosen answer is sequence ``b``, its rejected answer ``B + b``)."""
    return ScoredPositions(hidden[batch["score_index"]], batch["score_sequence"], batch["score_target"],
                           2 * batch["prompt_lengths"].shape[0])


def scored_logps(pos: ScoredPositions, weight: Tensor, bias: Optional[Tensor] = None, z: Optional[Tensor] = None,
                 *, backend: str = "auto") -> Tensor:
    """``[S]`` summed answer log-probs of the scored positions ``pos`` through ``lk.linear_token_logprobs``, with
    ``z [S, D]`` (one latent per sequence) added to every scored position of its sequence; float32 (float64
    for float64 inputs)."""
    h = pos.hidden
    if z is not None:
        h = h + z.to(h.dtype)[pos.sequences]
    h, weight, bias = head_inputs(h, weight, bias)
    logp = lk.linear_token_logprobs(h, weight, pos.targets, bias=bias, backend=backend)
    return logp.new_zeros(pos.num_sequences).index_add(0, pos.sequences, logp)


def head_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The LM-head ops need one dtype: under autocast (--dtype bfloat16) the autocast dtype (fp32 master weights
    are cast per step, as autocast does for nn.Linear); otherwise the head's dtype."""
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


class Objective(NamedTuple):
    """What ``LPCModel.forward`` needs to compute the training loss itself, through ``lk.linear_preference_loss``
    (the LM head, pair loss and KL in one op, inside the forward so FSDP2 still holds the unsharded head):
    reference log-probs ``[B]`` (None for SimPO), the loss settings and this step's KL weight (``op_kl_weight``)."""

    ref_chosen: Optional[Tensor]
    ref_rejected: Optional[Tensor]
    cfg: LossConfig
    kl_weight: float


def op_kl_weight(cfg: LossConfig, kl_weight: Optional[float], lpc: bool) -> float:
    """The KL weight the loss op applies: this step's weight (default ``cfg.kl_weight``), 0 without the latent,
    and 0 with free bits (``lpc.losses.preference_objective`` adds the clamped KL term itself)."""
    if not lpc or cfg.free_bits > 0:
        return 0.0
    return cfg.kl_weight if kl_weight is None else kl_weight


def fused_objective(pos: ScoredPositions, batch: dict, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor],
                    prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor], obj: Objective,
                    backend: str) -> lk.LinearPreferenceLossOutput:
    """``lk.linear_preference_loss`` on the batch's scored positions (packed layout: they are sorted by sequence,
    ``batch["score_lengths"]`` counts them), ``z [B, D]`` added to both answers of each pair."""
    cfg = obj.cfg
    h, weight, bias = head_inputs(pos.hidden, weight, bias)
    lpc = prior_logits is not None
    return lk.linear_preference_loss(
        h, weight, pos.targets, bias=bias, z=z, ref_chosen_logps=obj.ref_chosen if cfg.needs_reference else None,
        ref_rejected_logps=obj.ref_rejected if cfg.needs_reference else None,
        prior_logits=prior_logits, posterior_logits=posterior_logits, kl_weight=op_kl_weight(cfg, obj.kl_weight, lpc),
        backend=backend, sequence_ids=pos.sequences, sequence_lengths=batch["score_lengths"],
        filter_eps=cfg.filter_eps, **cfg.op_options())


def response_logps(hidden: Tensor, batch: dict, weight: Tensor, bias: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Summed answer log-probs per sequence (``scored_logps`` of ``scored_positions(hidden, batch)``).

    Args:
        hidden: ``[R * L, D]`` final hidden states of the batch's rows (``final_hidden_states``).
        batch: a collated batch (any layout; ``lpc.data``).
        weight / bias: LM head ``[V, D]`` / ``[V]``. z: ``[2B, D]`` latent added to every scored position of each
            sequence (chosen sequences first).

    Returns:
        ``[2B]`` float32 (float64 for float64 inputs) sums of ``log pi(y_t | ...)`` over answer tokens, chosen
        sequences first.
    """
    return scored_logps(scored_positions(hidden, batch), weight, bias, z, backend=backend)


@torch.no_grad()
def reference_logps(ref_model: nn.Module, batch: dict, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(chosen [B], rejected [B])`` summed log-probs of the frozen, unconditioned reference model."""
    weight, bias = lm_head_of(ref_model)
    logps = response_logps(final_hidden_states(ref_model, batch), batch, weight, bias, backend=backend)
    return logps.chunk(2)


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen deep copy of ``policy`` in eval mode (the DPO reference ``pi_ref``)."""
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


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


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``[B, K] -> [B]`` entropy in nats, from log-softmax (never log of a softmax)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def code_perplexity(logits: Tensor) -> Tensor:
    """``exp(H(mean_b softmax(logits_b)))``: how many codes the batch uses (1..K)."""
    p = torch.softmax(logits.float(), dim=-1).mean(0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


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
    # of mean h**2 (lpc/z_rms_ratio: docs/design.md section 7)
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
        token and the last token (eos) of each answer, wherever the batch layout put them."""
        h_x, h_w, h_l = hidden[batch["feature_index"]]
        if self.lpc.detach_features:
            h_x, h_w, h_l = h_x.detach(), h_w.detach(), h_l.detach()
        dt = self.codebook.dtype
        return h_x.to(dt), h_w.to(dt), h_l.to(dt)

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
        pos = scored_positions(final_hidden_states(self.policy, batch), batch)
        self.hidden_rms.fill_(pos.hidden.float().pow(2).mean().sqrt())
        return float(self.hidden_rms)

    def prior_z(self, prior_logits: Tensor, mode: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """Inference latent: ``(weights [B, K], z [B, D])`` from the prior, ``"expected"`` or ``"argmax"``."""
        mode = mode or self.lpc.inference
        if mode == "argmax":
            w = F.one_hot(prior_logits.argmax(-1), self.lpc.num_codes).to(self.codebook.dtype)
        else:
            w = torch.softmax(prior_logits.float(), dim=-1).to(self.codebook.dtype)
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

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, *, mix: float = 0.0, seed: int = 0, offset: int = 0,
                prior_offset: Optional[int] = None, use_prior: bool = False, diagnostics: bool = False,
                objective: Optional[Objective] = None) -> LPCOutput:
        """One policy pass over a collated batch (see ``lpc.data``).

        Args:
            mix: prior-mix weight ``g`` in [0, 1] (training). seed / offset / prior_offset: Gumbel noise
                counters (see ``latent`` and ``gumbel_offsets``).
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
            res = fused_objective(pos, batch, weight, bias, z, prior_logits, posterior_logits, objective, self.backend)
            return res.chosen_logps, res.rejected_logps, lk.PreferenceLossOutput(*res[:5])

        if self.lpc is None:
            chosen, rejected, loss = training_logps(None)
            return LPCOutput(chosen, rejected, batch["chosen_lengths"], batch["rejected_lengths"], None, None, None,
                             None, batch["num_tokens"], objective=loss)
        with torch.autocast(hidden.device.type, enabled=False):
            h_x, h_w, h_l = self.features(hidden, batch)
            prior_logits = self.prior(h_x)
            posterior_logits = self.posterior(torch.cat([h_w, h_l], dim=-1))
            if use_prior:
                w, z = self.prior_z(prior_logits)
                z_post = None
            else:
                w, z, z_post = self.latent(prior_logits, posterior_logits, mix=mix, seed=seed, offset=offset,
                                           prior_offset=prior_offset)
        chosen, rejected, loss = training_logps(z, prior_logits, posterior_logits)
        out = LPCOutput(chosen, rejected, batch["chosen_lengths"], batch["rejected_lengths"], prior_logits,
                        posterior_logits, w, z, batch["num_tokens"], objective=loss)
        with torch.no_grad():
            sq = pos.hidden.detach().float().pow(2).mean(-1)
            out.hidden_sq = sum(sq.new_zeros(pos.num_sequences).index_add(0, pos.sequences, sq).chunk(2))
            out.z_sq = z.detach().float().pow(2).mean(-1)
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
            post = torch.softmax(posterior_logits.float(), dim=-1)
            swapped = torch.softmax(self.posterior(torch.cat([h_l, h_w], dim=-1)).float(), dim=-1)
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
    def from_pretrained(cls, path: os.PathLike, *, backend: str = "auto", **model_kwargs) -> "LPCModel":
        """Load what ``save_pretrained`` wrote (``model_kwargs`` go to ``AutoModelForCausalLM``); raises
        ``lpc.io.IntegrityError`` naming the file when a file fails the directory's manifest."""
        path = Path(path)
        verify_manifest(path)
        with quiet_transformers():
            policy = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        with open(path / LPC_CONFIG_FILE) as f:
            meta = json.load(f)
        lpc = LPCConfig.from_dict(meta["lpc"]) if meta.get("lpc") else None
        model = cls(policy, lpc, backend=backend)
        if lpc is not None:
            model.load_heads(path)
        return model


# ------------------------------------------------------------------------------------ the tiny model
def build_tiny_llama(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: Optional[int] = None, max_positions: int = 128, seed: int = 0):
    """A random-init ``LlamaForCausalLM`` sized for CPU smoke runs, initialised from ``seed``."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                      intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)
