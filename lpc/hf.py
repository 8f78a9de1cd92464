"""What ``lpc`` reads of an HF causal LM: its transformer body, LM head and decoder layers, the attention inputs of
each batch layout, the final hidden states of a batch and the positions that predict answer tokens; and the tiny
random-init Llama of CPU runs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from .data.batching import PROMPT


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
# what --batch-layout auto prefers: the fastest first (benches/bench_batch_layouts.py,
# benches/results/cpu/batch_layouts/report.md)
BATCH_LAYOUTS_BY_SPEED = ("shared-prompt", "packed", "padded")


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
    """The batch layouts ``model`` can run, fastest first: packed and shared-prompt rows need attention that takes a
    4D mask (eager, sdpa); flash attention takes packed rows through the position ids; anything else runs padded
    rows only."""
    impl = attention_implementation(model)
    if impl in ATTENTION_4D:
        return BATCH_LAYOUTS_BY_SPEED
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


# ------------------------------------------------------------------------------------------ the tiny Llama
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
