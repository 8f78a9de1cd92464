"""End-to-end: one LPC-DPO training step of a Llama-shaped model built from a config (random weights).

A step is: policy forward over the ``[2B, T]`` chosen+rejected batch, reference forward (frozen copy, no
grad), loss, and (``bwd``) backward into every policy / head parameter. No optimizer step. The backbone
runs eagerly (SDPA attention) in every implementation, so differences come from the LM head, the log-probs,
the latent and the loss:

  ours_lpc    ``lpc.model.LPCModel`` (``z`` added before the head, log-probs by
              ``lpc_kernels.linear_token_logprobs`` on answer tokens only, Gumbel codes and the fused
              loss through ``lpc_kernels``, backend ``auto``) + ``lpc.losses.preference_objective``
  eager_lpc   the same LPC-DPO math the TRL way: full ``[2B, T, V]`` logits of ``lm_head(h + z)``,
              TRL's ``selective_log_softmax``, ``F.gumbel_softmax``, TRL's DPO loss + the KL term
  ours_dpo    plain DPO (no latent) through ``LPCModel(policy, None)`` and our ops
  eager_dpo   TRL ``DPOTrainer`` style plain DPO: ``model(...).logits`` + ``selective_log_softmax``
  liger_dpo   TRL's ``use_liger_loss`` path: backbone hidden states + ``LigerFusedLinearDPOLoss``
LPC settings: K = 32 codes, tau 1, soft samples, prior mix g = 0.5, kl_weight 0.05, beta 0.1.
The issue's targets compare ``ours_lpc`` with ``eager_lpc``. If ``lpc.model`` is not importable the
``ours_*`` rows use an inline equivalent built from the same ops (``extra_info["path"]`` says which).
"""

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C
from _common import Shape

OP = "train_step"
BETA, KL_WEIGHT, MIX, NUM_CODES = 0.1, 0.05, 0.5, 32


def CHECK_IMPL(impl):  # noqa: N802
    # plain DPO rows are compared with the eager DPO step (same weights); LPC rows draw different Gumbel
    # noise (Philox vs torch's generator), so they are checked for finiteness only
    return "eager_dpo" if impl.endswith("_dpo") else None


def _m(name, layers, hidden, inter, heads, kv, v, b, t, tied, dtype, rounds):
    dims = {"layers": layers, "hidden": hidden, "intermediate": inter, "heads": heads, "kv_heads": kv, "V": v,
            "B": b, "T": t, "N": 2 * b * t, "tied": tied}
    return Shape(f"{name}-B{b}-T{t}", dims, dtype, rounds, quick=True, tags=("target",))


SHAPES = C.shapes_for(
    cpu=[_m("llama-L2-H256-V32000", 2, 256, 1024, 4, 4, 32000, 2, 128, False, "float32", 3)],
    # Llama-3.2-1B layout: 1.24B parameters, tied embeddings, V = 128256
    gpu=[_m("llama1b-L16-H2048-V128256", 16, 2048, 8192, 32, 8, 128256, 8, 512, True, "bfloat16", 5)],
)
IMPLS = ["eager_lpc", "ours_lpc", "eager_dpo", "ours_dpo", "liger_dpo"]


# ------------------------------------------------------------------------------------------- inputs
def _batch(shape: Shape, g: torch.Generator) -> dict:
    """A right-padded preference batch in lpc.data's layout (shared prompt, answers of random length)."""
    b, t, v = shape.dims["B"], shape.dims["T"], shape.dims["V"]
    dev = C.DEVICE
    prompt = torch.randint(t // 8, t // 4 + 1, (b,), generator=g, device=dev)
    pos = torch.arange(t, device=dev)[None, :]
    out = {"prompt_lengths": prompt}
    prompt_ids = torch.randint(3, v, (b, t), generator=g, device=dev)
    for side in ("chosen", "rejected"):
        ans = torch.randint(t // 4, t - t // 4 + 1, (b,), generator=g, device=dev)
        end = prompt + ans
        ids = torch.where(pos < prompt[:, None], prompt_ids, torch.randint(3, v, (b, t), generator=g, device=dev))
        mask = (pos < end[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        labels = torch.where((pos >= prompt[:, None]) & mask.bool(), ids, torch.full_like(ids, -100))
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels,
                    f"{side}_lengths": ans})
    out["source"] = torch.full((b,), -1, device=dev, dtype=torch.long)
    return _padded_layout_keys(out)


def _padded_layout_keys(out: dict) -> dict:
    """The keys ``lpc.model`` reads (``lpc.data``'s padded layout: chosen rows, then rejected rows)."""
    ids, mask, labels = _pair(out)
    rows, t = ids.shape
    b = rows // 2
    keep = labels[:, 1:] != -100
    seq, col = keep.nonzero(as_tuple=True)
    row = torch.arange(rows, device=ids.device)
    last = mask.sum(1) - 1
    out.update(layout="padded", input_ids=ids, position_ids=torch.arange(t, device=ids.device).expand(rows, t),
               segment_ids=torch.where(mask.bool(), row[:, None], -1), branch_ids=torch.zeros_like(ids),
               score_index=seq * t + col, score_sequence=seq, score_target=labels[:, 1:][keep],
               score_lengths=keep.sum(1).tolist(),
               feature_index=torch.stack([row[:b] * t + out["prompt_lengths"] - 1, row[:b] * t + last[:b],
                                          row[b:] * t + last[b:]]),
               num_tokens=int(mask.sum()))
    return out


def _lpc_api():
    """(LPCModel, LPCConfig, reference_logps, LossConfig, preference_objective) or the import error."""
    try:
        from lpc.config import LPCConfig
        from lpc.losses import LossConfig, preference_objective
        from lpc.model import LPCModel
        from lpc.objective import reference_logps

        return (LPCModel, LPCConfig, reference_logps, LossConfig, preference_objective), None
    except Exception as exc:  # the trainer package is optional for the benchmark
        return None, f"{type(exc).__name__}: {exc}"


class _Heads(nn.Module):
    """Codebook + prior / posterior MLPs (LPCModel's layout), for the inline path and eager rows."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(k, d) * 0.02)
        self.prior = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, k))
        self.posterior = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, k))


def make_inputs(shape: Shape) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = shape.dims
    cfg = LlamaConfig(vocab_size=d["V"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                      num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      max_position_embeddings=max(2048, d["T"]), tie_word_embeddings=d["tied"], pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(C.DEVICE):
        policy = LlamaForCausalLM(cfg)
    policy.to(shape.torch_dtype)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    api, err = _lpc_api()
    if api is not None:
        LPCModel, LPCConfig = api[0], api[1]
        lpc_model = LPCModel(policy, LPCConfig(num_codes=NUM_CODES), backend="auto").to(C.DEVICE, shape.torch_dtype)
        dpo_model = LPCModel(policy, None, backend="auto")
        heads = lpc_model
    else:
        lpc_model = dpo_model = None
        heads = _Heads(d["hidden"], NUM_CODES).to(C.DEVICE, shape.torch_dtype)
    g = C.generator(0)
    return {"policy": policy, "reference": reference, "heads": heads, "lpc_model": lpc_model,
            "dpo_model": dpo_model, "api": api, "api_error": err, "batch": _batch(shape, g),
            "params": sum(p.numel() for p in policy.parameters())}


# --------------------------------------------------------------------------------------- eager (TRL)
def selective_log_softmax(logits, index):
    """TRL's ``trl.trainer.utils.selective_log_softmax`` (row loop to bound peak memory)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        return selected - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row = F.log_softmax(row_logits, dim=-1)
        out.append(row.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def _pair(batch):
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], dim=0)
                 for k in ("input_ids", "attention_mask", "labels"))


def _sequence_logps(logits, labels):
    """Summed answer log-probs: position t-1 predicts labels[:, t] (TRL's shift + loss mask)."""
    target = labels[:, 1:]
    mask = target != -100
    lp = selective_log_softmax(logits[:, :-1], target.clamp(min=0))
    return (lp * mask).sum(-1)


def _dpo(pc, pr, rc, rr):
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr)))


def _eager_reference(reference, ids, mask, labels):
    with torch.no_grad():
        return _sequence_logps(reference(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)


def eager_dpo_step(x):
    policy, reference, batch = x["policy"], x["reference"], x["batch"]
    ids, mask, labels = _pair(batch)
    logps = _sequence_logps(policy(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
    ref = _eager_reference(reference, ids, mask, labels)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    return _dpo(pc, pr, rc, rr).mean()


def _features(hidden, batch):
    b = batch["prompt_lengths"].shape[0]
    idx = torch.arange(b, device=hidden.device)
    h_x = hidden[idx, batch["prompt_lengths"] - 1]
    h_w = hidden[idx, batch["chosen_attention_mask"].sum(1) - 1]
    h_l = hidden[b + idx, batch["rejected_attention_mask"].sum(1) - 1]
    return h_x, h_w, h_l


def eager_lpc_step(x):
    policy, reference, heads, batch = x["policy"], x["reference"], x["heads"], x["batch"]
    ids, mask, labels = _pair(batch)
    hidden = policy.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    h_x, h_w, h_l = _features(hidden, batch)
    prior_logits = heads.prior(h_x)
    posterior_logits = heads.posterior(torch.cat([h_w, h_l], dim=-1))
    codebook = heads.codebook
    w = F.gumbel_softmax(posterior_logits.float(), tau=1.0, hard=False)
    z_post = w.to(codebook.dtype) @ codebook
    z_prior = torch.softmax(prior_logits.float(), dim=-1).to(codebook.dtype) @ codebook
    z = MIX * z_prior + (1 - MIX) * z_post
    logits = policy.lm_head(hidden + torch.cat([z, z]).to(hidden.dtype)[:, None, :])  # z at every position
    logps = _sequence_logps(logits, labels)
    ref = _eager_reference(reference, ids, mask, labels)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    log_q = torch.log_softmax(posterior_logits.float(), dim=-1)
    log_p = torch.log_softmax(prior_logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (_dpo(pc, pr, rc, rr) + KL_WEIGHT * kl).mean()


def liger_dpo_step(x, loss_fn):
    policy, reference, batch = x["policy"], x["reference"], x["batch"]
    ids, mask, labels = _pair(batch)
    hidden = policy.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return loss_fn(policy.lm_head.weight, hidden[:, :-1], labels[:, 1:], None, ref_hidden[:, :-1],
                   reference.lm_head.weight)[0]


# ------------------------------------------------------------------------------------------------ ours
def ours_step(x, lpc: bool):
    """Through lpc.model / lpc.losses (the trainer's own code path)."""
    _, _, reference_logps, LossConfig, preference_objective = x["api"]
    model = x["lpc_model"] if lpc else x["dpo_model"]
    batch = x["batch"]
    out = model(batch, mix=MIX, seed=1234, offset=0) if lpc else model(batch)
    rc, rr = reference_logps(x["reference"], batch, backend="auto")
    cfg = LossConfig(loss_type="dpo", beta=BETA, kl_weight=KL_WEIGHT if lpc else 0.0, backend="auto")
    return preference_objective(out, rc, rr, cfg).loss


def _inline_logps(model, hidden, labels, z, backend):
    import lpc_kernels as lk

    target = labels[:, 1:]
    keep = target != -100
    rows = keep.nonzero()[:, 0]
    h = hidden[:, :-1][keep]
    if z is not None:
        h = h + z.to(h.dtype)[rows]
    lp = lk.linear_token_logprobs(h, model.lm_head.weight, target[keep], backend=backend)
    return lp.new_zeros(hidden.shape[0]).index_add(0, rows, lp)


def ours_inline_step(x, lpc: bool):
    """The same step straight from lpc_kernels ops (used when lpc.model is not importable)."""
    import lpc_kernels as lk

    policy, reference, heads, batch = x["policy"], x["reference"], x["heads"], x["batch"]
    ids, mask, labels = _pair(batch)
    hidden = policy.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    z = prior_logits = posterior_logits = None
    if lpc:
        h_x, h_w, h_l = _features(hidden, batch)
        prior_logits = heads.prior(h_x)
        posterior_logits = heads.posterior(torch.cat([h_w, h_l], dim=-1))
        _, z_post = lk.gumbel_softmax_codes(posterior_logits, heads.codebook, tau=1.0, seed=1234, offset=0)
        z_prior = torch.softmax(prior_logits.float(), dim=-1).to(heads.codebook.dtype) @ heads.codebook
        z = torch.cat([MIX * z_prior + (1 - MIX) * z_post] * 2)
    logps = _inline_logps(policy, hidden, labels, z, "auto")
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        ref = _inline_logps(reference, ref_hidden, labels, None, "auto")
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    return lk.preference_loss(pc, pr, rc, rr, chosen_lengths=batch["chosen_lengths"],
                              rejected_lengths=batch["rejected_lengths"], prior_logits=prior_logits,
                              posterior_logits=posterior_logits, loss_type="dpo", beta=BETA,
                              kl_weight=KL_WEIGHT if lpc else 0.0).loss


# ----------------------------------------------------------------------------------------------- build
def build(impl: str, shape: Shape, x: dict) -> C.Case:
    policy = x["policy"]
    info = {"params": x["params"]}
    params = [p for p in policy.parameters() if p.requires_grad]
    lpc = impl.endswith("_lpc")
    if lpc:
        params += [p for n, p in x["heads"].named_parameters() if not n.startswith("policy.")]
    if impl == "eager_dpo":
        fwd = lambda: eager_dpo_step(x)  # noqa: E731
    elif impl == "eager_lpc":
        fwd = lambda: eager_lpc_step(x)  # noqa: E731
    elif impl == "liger_dpo":
        cl = C.require_module("liger_kernel.chunked_loss", "liger-kernel")
        loss_fn = cl.LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)
        fwd = lambda: liger_dpo_step(x, loss_fn)  # noqa: E731
        info["note"] = "Liger computes the head/loss gradients inside its forward call"
    elif impl in ("ours_lpc", "ours_dpo"):
        from lpc_kernels import resolve_backend

        info["backend"] = resolve_backend("auto", C.DEVICE)
        if x["api"] is not None:
            info["path"] = "lpc.model"
            fwd = lambda: ours_step(x, lpc)  # noqa: E731
        else:
            info["path"] = f"inline (lpc.model not importable: {x['api_error']})"
            fwd = lambda: ours_inline_step(x, lpc)  # noqa: E731
    else:
        raise ValueError(impl)
    head = policy.lm_head.weight
    last = policy.model.layers[-1].mlp.down_proj.weight
    return C.Case(forward=fwd, backward=C.backward_scalar, params=params, check_params=[head, last], info=info)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, IMPLS))
def test_train_step(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode)
