"""``linear_preference_loss``: LM head + DPO / IPO / SimPO + the LPC KL term in one op whose forward pass also
computes the gradients.

Contract: ``docs/design.md`` section 2 (linear_preference_loss). The pair loss is separable, so the op walks over
chunks of complete pairs: for each chunk one GEMM gives its ``[c, V]`` logits (``z`` added to the chunk's hidden
states on the way), the backend's ``token_logprobs_fwd`` their log-probs, the backend's ``preference_loss_bwd`` the
pairs' ``d loss / d logp``, the backend's ``token_logprobs_bwd`` turns the logits in place into
``d = g * (onehot - softmax)``, and two GEMMs give the chunk's hidden and weight gradients: 3 GEMMs in all where
the composition ``linear_token_logprobs`` + ``preference_loss`` does 4, one chunk of logits held at a time. The
backward only scales the saved gradients by the incoming ``d loss`` (and ``d kl`` for the code logits): the op is
not twice differentiable. Layers: ``linear_preference_loss`` (checks, the two input layouts) ->
``linear_preference_loss_op`` (custom op ``lpc::linear_preference_loss``) -> autograd (scales).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_label_values, check_sequence_ids, check_tensor, raise_if_bad_values
from ..head_gemm import HeadGemms, autocast_off
from ..numerics import DEFAULT_CHUNK_SIZE, INDEX_DTYPES, compute_dtype
from ..vocab_filter import softmax_grad
from .linear_token_logprobs import check_linear_token_logprobs
from .preference_loss import check_preference_loss, loss_outputs


class LinearPreferenceLossOutput(NamedTuple):
    """The fields of ``PreferenceLossOutput`` plus the summed policy log-probs ``[B]`` of each answer (with ``z``).

    ``loss`` is differentiable (to hidden, weight, bias, z, the reference log-probs and the code logits), ``kl``
    to the code logits; the other fields are values only."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


def linear_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                           z: Optional[Tensor] = None, ref_chosen_logps: Optional[Tensor] = None,
                           ref_rejected_logps: Optional[Tensor] = None, prior_logits: Optional[Tensor] = None,
                           posterior_logits: Optional[Tensor] = None, loss_type: str = "dpo", beta: float = 0.1,
                           gamma: float = 0.0, label_smoothing: float = 0.0, kl_weight: float = 0.0,
                           ipo_average: bool = True, ignore_index: int = -100, chunk_size: Optional[int] = None,
                           backend: str = "auto", sequence_ids: Optional[Tensor] = None,
                           sequence_lengths: Optional[list] = None,
                           filter_eps: float = 0.0) -> LinearPreferenceLossOutput:
    """``preference_loss`` of the answers' summed log-probs under ``softmax((hidden + z) @ weight.T + bias)``.

    Two layouts of the scored positions:

    * padded (TRL / Liger): ``hidden [2B, T, H]``, ``labels [2B, T]``; rows ``0..B-1`` are the chosen answers,
      ``B..2B-1`` the rejected ones; position ``t`` is scored against ``labels[:, t]`` (``ignore_index``: not
      scored; ignored positions still go through the GEMMs).
    * packed: ``hidden [N, H]``, ``labels [N]``, ``sequence_ids [N]`` int64 (pair ``b``'s chosen answer is
      ``b``, its rejected answer ``B + b``), positions sorted by sequence, and ``sequence_lengths``: the ``2B``
      position counts as Python ints (they place the pair chunks without reading the device).

    Args:
        weight / bias: LM head ``[V, H]`` / ``[V]``, hidden's dtype (float32 / bfloat16 / float16 / float64).
        z: ``[B, H]`` any float dtype, added (in hidden's dtype) to every position of pair ``b``'s two answers.
        ref_chosen_logps / ref_rejected_logps, prior_logits / posterior_logits, loss_type, beta, gamma,
            label_smoothing, kl_weight, ipo_average: as ``preference_loss``; the lengths of IPO / SimPO are the
            scored positions of each answer.
        chunk_size: positions per chunk of complete pairs (a pair longer than that is a chunk by itself); the
            op holds one ``[chunk, V]`` logits block in the compute dtype. Default ``DEFAULT_CHUNK_SIZE``.
        filter_eps: opt-in gradient filter, every backend: per chunk, vocabulary columns that are no label of the
            chunk, below it on every row and together at most it of any row's softmax mass are left out of the
            gradient GEMMs (``lpc_kernels/vocab_filter.py``). 0 (default) is exact; above 0, one host sync per
            chunk. The values (loss, log-probs) are never filtered.

    Returns:
        ``LinearPreferenceLossOutput``, float32 (float64 for float64 inputs). The gradients are computed during
        this call (a ``[V, H]`` float32 weight gradient is held until backward; a frozen head skips it and its
        GEMM), only for the inputs that require grad, and none under ``torch.no_grad()``.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size, filter_eps)
    b, flat_hidden, flat_labels, seq_ids, lengths, positions = _layout(hidden, labels, sequence_ids,
                                                                       sequence_lengths, ignore_index)
    if z is not None:
        check_tensor("z", z, ndim=2)
        if tuple(z.shape) != (b, weight.shape[1]):
            raise ValueError(f"z must have shape [B, H] = [{b}, {weight.shape[1]}], got {tuple(z.shape)}")
    pc = flat_hidden.new_empty(b, dtype=compute_dtype(flat_hidden))  # stands for the policy log-probs
    n = flat_labels.new_ones(b) if loss_type in ("ipo", "simpo") else None
    check_preference_loss(pc, pc, ref_chosen_logps, ref_rejected_logps, n, n, prior_logits, posterior_logits,
                          loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    if z is not None and z.device != flat_hidden.device:
        raise ValueError(f"z is on {z.device} but hidden is on {flat_hidden.device}; all tensors must be on one device")
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad
             for t in (hidden, weight, bias, z, ref_chosen_logps, prior_logits, posterior_logits)]
    needs[4] = needs[4] or (grad and ref_rejected_logps is not None and ref_rejected_logps.requires_grad)
    needs[5] = needs[6] = needs[5] or needs[6]
    opt = [t.contiguous() if t is not None else None
           for t in (bias, z, ref_chosen_logps, ref_rejected_logps, prior_logits, posterior_logits)]
    out = linear_preference_loss_op(
        flat_hidden.contiguous(), weight.contiguous(), opt[0], flat_labels.long().contiguous(), seq_ids, lengths,
        positions, *opt[1:], loss_type, float(beta), float(gamma), float(label_smoothing), float(kl_weight),
        ipo_average, ignore_index, chunk_size, needs[:5] + needs[6:], resolve_backend(backend, flat_hidden.device),
        float(filter_eps))
    return LinearPreferenceLossOutput(*out[:7])


def _layout(hidden, labels, sequence_ids, sequence_lengths, ignore_index):
    """``(B, hidden [M, H], labels [N], sequence_ids [N], lengths list[2B], positions [N] | None)`` of either input
    layout: the scored positions are rows ``positions`` of ``hidden`` (``None``: all rows, in order), sorted by
    sequence. The padded layout is compacted to its scored positions here, with one host sync (the counts)."""
    if (sequence_ids is None) != (sequence_lengths is None):
        raise ValueError("sequence_ids and sequence_lengths must be given together (the packed layout)")
    if sequence_ids is None:
        if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[0] % 2 or hidden.shape[1] == 0:
            raise ValueError("hidden must have shape [2B, T, H] (chosen rows first, then rejected) with B, T > 0, "
                             f"or [N, H] with sequence_ids and sequence_lengths; got {tuple(hidden.shape)}")
        rows, t = hidden.shape[:2]
        flat = hidden.reshape(rows * t, -1)
        scored = labels.reshape(-1) != ignore_index
        lengths = scored.view(rows, t).sum(1).tolist()
        positions = torch.nonzero_static(scored, size=sum(lengths)).squeeze(1)
        ids = torch.arange(rows, device=hidden.device).repeat_interleave(
            torch.tensor(lengths, device=hidden.device), output_size=positions.shape[0])
        return rows // 2, flat, labels.reshape(-1)[positions], ids, lengths, positions
    if hidden.dim() != 2:
        raise ValueError(f"with sequence_ids, hidden must have shape [N, H], got {tuple(hidden.shape)}")
    check_tensor("sequence_ids", sequence_ids, INDEX_DTYPES, ndim=1)
    if sequence_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"sequence_ids must have shape [N] = [{hidden.shape[0]}], got {tuple(sequence_ids.shape)}")
    if sequence_ids.device != hidden.device:
        raise ValueError(f"sequence_ids is on {sequence_ids.device} but hidden is on {hidden.device}")
    if (not isinstance(sequence_lengths, (list, tuple)) or not sequence_lengths or len(sequence_lengths) % 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sequence_lengths)):
        raise ValueError("sequence_lengths must be a non-empty list of 2B ints >= 0 (positions of each chosen, "
                         f"then each rejected answer), got {sequence_lengths!r:.200}")
    if sum(sequence_lengths) != hidden.shape[0]:
        raise ValueError(f"sequence_lengths must sum to N = {hidden.shape[0]} (the rows of hidden), "
                         f"got {sum(sequence_lengths)}")
    return (len(sequence_lengths) // 2, hidden, labels, sequence_ids.long().contiguous(), list(sequence_lengths),
            None)


def pair_chunks(lengths: list, chunk_size: int) -> list:
    """``(first, stop)`` pair ranges of at most ``chunk_size`` positions (chosen + rejected); a longer pair alone."""
    b = len(lengths) // 2
    out, start, size = [], 0, 0
    for p in range(b):
        n = lengths[p] + lengths[b + p]
        if p > start and size + n > chunk_size:
            out.append((start, p))
            start, size = p, 0
        size += n
    out.append((start, b))
    return out


GRAD_NAMES = ("hidden", "weight", "bias", "z", "ref_logps", "code_logits")


@torch.library.custom_op("lpc::linear_preference_loss", mutates_args=())
@autocast_off
def linear_preference_loss_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, sequence_ids: Tensor,
        sequence_lengths: list[int], positions: Optional[Tensor], z: Optional[Tensor],
        ref_chosen_logps: Optional[Tensor],
        ref_rejected_logps: Optional[Tensor], prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor],
        loss_type: str, beta: float, gamma: float, label_smoothing: float, kl_weight: float, ipo_average: bool,
        ignore_index: int, chunk_size: int, needs: list[bool], backend: str, filter_eps: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """hidden [M, H], labels / sequence_ids [N] of the scored positions (rows ``positions`` of hidden, all rows
    when None), sorted by sequence, their 2B counts ->
    (loss, losses, chosen_rewards, rejected_rewards, kl, chosen_logps, rejected_logps, then the gradients of the
    loss to hidden, weight, bias, z, prior_logits, posterior_logits, of kl to prior_logits, posterior_logits, and
    of the loss to ref_chosen_logps, ref_rejected_logps); ``needs`` (``GRAD_NAMES``) says which gradients to
    compute, a ``[0]`` tensor stands for the others."""
    be = backend_module(backend)
    need_h, need_w, need_b, need_z, need_ref, need_codes = needs
    b2, b = len(sequence_lengths), len(sequence_lengths) // 2
    cdt, dev = compute_dtype(hidden), hidden.device
    labels = check_label_values(labels, weight.shape[0], ignore_index)
    if positions is None:  # the packed layout: the caller's ids (the padded layout made its own)
        check_sequence_ids(sequence_ids, sequence_lengths)
    counts = torch.zeros(b2, dtype=torch.long, device=dev).index_add_(0, sequence_ids, (labels != ignore_index).long())
    cl, rl = counts[:b], counts[b:]
    raise_if_bad_values({"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                         "prior_logits": prior_logits, "posterior_logits": posterior_logits,
                         "scored tokens per answer (labels)": counts},
                        positive=("scored tokens per answer (labels)",) if loss_type != "dpo" and (
                            loss_type == "simpo" or ipo_average) else ())
    offsets = [0]
    for n in sequence_lengths:
        offsets.append(offsets[-1] + n)
    gemm = HeadGemms(weight, bias)
    seq_logp = torch.zeros(b2, dtype=cdt, device=dev)
    gh = torch.zeros_like(hidden) if need_h else None
    gw = torch.zeros(weight.shape, dtype=cdt, device=dev) if need_w else None
    gb = torch.zeros(weight.shape[0], dtype=cdt, device=dev) if need_b else None
    gz = torch.zeros(b, hidden.shape[1], dtype=cdt, device=dev) if need_z else None
    zh = z.to(hidden.dtype) if z is not None else None
    for p0, p1 in pair_chunks(sequence_lengths, chunk_size):
        parts = [(offsets[p0], offsets[p1]), (offsets[b + p0], offsets[b + p1])]
        parts = [(s, e) for s, e in parts if e > s]
        if not parts:
            continue

        def cut(t):
            return t[parts[0][0]:parts[0][1]] if len(parts) == 1 else torch.cat([t[s:e] for s, e in parts])

        sid, tgt = cut(sequence_ids), cut(labels)
        rows = cut(positions) if positions is not None else None
        h = cut(hidden) if rows is None else hidden.index_select(0, rows)
        pair = torch.where(sid < b, sid, sid - b)
        if zh is not None:
            h = h + zh[pair]
        h = gemm.operand(h)
        x = gemm.logits(h)
        logp, lse = be.token_logprobs_fwd(x, tgt, ignore_index)
        seq_logp.index_add_(0, sid, logp)
        if not (need_h or need_w or need_b or need_z):
            continue
        n = p1 - p0
        ref = (ref_chosen_logps[p0:p1], ref_rejected_logps[p0:p1]) if ref_chosen_logps is not None else (None, None)
        zero = torch.zeros(n, dtype=cdt, device=dev)
        d_pc, d_pr = be.preference_loss_bwd(
            torch.full((), n / b, dtype=cdt, device=dev), zero, zero, zero, zero, seq_logp[p0:p1],
            seq_logp[b + p0:b + p1], *ref, cl[p0:p1], rl[p0:p1], None, None, loss_type, beta, gamma,
            label_smoothing, 0.0, ipo_average)[:2]
        g_pos = torch.cat([d_pc, d_pr]).to(cdt)[torch.where(sid < b, sid - p0, sid - b - p0 + n)]
        # in place in x (dead after this), on the columns the filter keeps
        d_c, kept, cols = softmax_grad(be, gemm, g_pos, x, lse, tgt, ignore_index, filter_eps)
        d = kept.tile(d_c)
        if need_h or need_z:
            ghc = kept.hidden_grad(d)
            if need_h and rows is not None:
                gh.index_copy_(0, rows, ghc.to(gh.dtype))
            elif need_h:
                k = 0
                for s, e in parts:
                    gh[s:e] = ghc[k:k + e - s]
                    k += e - s
            if need_z:
                gz.index_add_(0, pair, ghc)
        if need_w:
            kept.add_weight_grad(gw, d, h, cols)
        if need_b:
            if cols is None:
                gb += d_c.sum(0)
            else:
                gb.index_add_(0, cols, d_c.sum(0))
    pc, pr = seq_logp[:b].clone(), seq_logp[b:].clone()
    loss, losses, cr, rj, kl = be.preference_loss_fwd(pc, pr, ref_chosen_logps, ref_rejected_logps, cl, rl,
                                                      prior_logits, posterior_logits, loss_type, beta, gamma,
                                                      label_smoothing, kl_weight, ipo_average)
    tail = [None] * 6
    if need_ref or need_codes:
        zeros = torch.zeros(b, dtype=cdt, device=dev)
        args = (pc, pr, ref_chosen_logps, ref_rejected_logps, cl, rl, prior_logits, posterior_logits, loss_type,
                beta, gamma, label_smoothing, kl_weight, ipo_average)
        g = be.preference_loss_bwd(torch.ones((), dtype=cdt, device=dev), zeros, zeros, zeros, zeros, *args)
        tail[0], tail[1], tail[4], tail[5] = g[6], g[7], g[2], g[3]
        if need_codes:
            g = be.preference_loss_bwd(torch.zeros((), dtype=cdt, device=dev), zeros, zeros, zeros,
                                       torch.ones(b, dtype=cdt, device=dev), *args)
            tail[2], tail[3] = g[6], g[7]
    grads = [gh, _cast(gw, weight), _cast(gb, bias), _cast(gz, z)] + tail
    return (loss, losses, cr, rj, kl, pc, pr) + tuple(t if t is not None else hidden.new_empty(0) for t in grads)


def _cast(t: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return t.to(like.dtype) if t is not None else None


@linear_preference_loss_op.register_fake
def _(hidden, weight, bias, labels, sequence_ids, sequence_lengths, positions, z, rc, rr, prior, post, loss_type,
      beta, gamma, label_smoothing, kl_weight, ipo_average, ignore_index, chunk_size, needs, backend,
      filter_eps=0.0):
    b = len(sequence_lengths) // 2
    values = loss_outputs(hidden.new_empty(b, dtype=compute_dtype(hidden)))
    logps = tuple(hidden.new_empty(b, dtype=compute_dtype(hidden)) for _ in range(2))
    need_h, need_w, need_b, need_z, need_ref, need_codes = needs
    like = [(hidden, need_h), (weight, need_w), (bias, need_b), (z, need_z)] + [
        (t, need_codes) for t in (prior, post, prior, post)] + [(rc, need_ref), (rr, need_ref)]
    grads = tuple(torch.empty_like(t) if t is not None and need else hidden.new_empty(0) for t, need in like)
    return values + logps + grads


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[7:])
    ctx.mark_non_differentiable(*output[1:4], *output[5:])


def _backward(ctx, g_loss, g_losses, g_cr, g_rj, g_kl, *unused):
    if torch.is_grad_enabled():
        raise RuntimeError("linear_preference_loss is not twice differentiable (its gradients are computed in the "
                           "forward pass and only scaled in backward): do not use create_graph=True through it")
    gh, gw, gb, gz, d_prior, d_post, k_prior, k_post, d_rc, d_rr = ctx.saved_tensors

    def scaled(t):
        if t.numel() == 0 or g_loss is None:
            return None
        return t * g_loss.to(t.dtype)

    def codes(d, k):
        if d.numel() == 0:
            return None
        out = d * g_loss.to(d.dtype) if g_loss is not None else torch.zeros_like(d)
        return out + g_kl.to(d.dtype)[:, None] * k if g_kl is not None else out

    return (scaled(gh), scaled(gw), scaled(gb), None, None, None, None, scaled(gz), scaled(d_rc), scaled(d_rr),
            codes(d_prior, k_prior), codes(d_post, k_post)) + (None,) * 11


linear_preference_loss_op.register_autograd(_backward, setup_context=_setup)
