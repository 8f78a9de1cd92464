"""``linear_preference_loss``: LM head + DPO / IPO / SimPO + the LPC KL term in one op whose forward pass also
computes the gradients, one chunk of complete pairs at a time (the pair loss is separable); the backward only
scales them (the op is not twice differentiable). Contract and the per-chunk steps: ``docs/design.md``, "Op
contracts" (``linear_preference_loss``). Layers: ``linear_preference_loss`` (checks, the two input layouts) ->
``linear_preference_loss_op`` (custom op ``lpc::linear_preference_loss``) -> autograd (scales).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import backend_module, resolve_backend
from ..checks import check_label_values, check_sequence_ids, check_tensor, raise_if_bad_values
from ..head_gemm import HeadGemms, autocast_off
from ..numerics import DEFAULT_CHUNK_SIZE, INDEX_DTYPES, compute_dtype
from ..preference import PreferenceLossInputs, PreferenceLossOptions, PreferenceLossOutput
from ..shapes import loss_outputs
from .linear_token_logprobs import check_linear_token_logprobs
from .preference_loss import check_preference_loss


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
                           sequence_lengths: Optional[list] = None) -> LinearPreferenceLossOutput:
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

    Returns:
        ``LinearPreferenceLossOutput``, float32 (float64 for float64 inputs). The gradients are computed during
        this call (a ``[V, H]`` float32 weight gradient is held until backward; a frozen head skips it and its
        GEMM), only for the inputs that require grad, and none under ``torch.no_grad()``.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size)
    b, flat_hidden, flat_labels, seq_ids, lengths, positions = _layout(hidden, labels, sequence_ids,
                                                                       sequence_lengths, ignore_index)
    if z is not None:
        check_tensor("z", z, ndim=2)
        if tuple(z.shape) != (b, weight.shape[1]):
            raise ValueError(f"z must have shape [B, H] = [{b}, {weight.shape[1]}], got {tuple(z.shape)}")
    pc = flat_hidden.new_empty(b, dtype=compute_dtype(flat_hidden))  # stands for the policy log-probs
    n = flat_labels.new_ones(b) if loss_type in ("ipo", "simpo") else None
    options = PreferenceLossOptions(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average).checked()
    check_preference_loss(PreferenceLossInputs(pc, pc, ref_chosen_logps, ref_rejected_logps, n, n, prior_logits,
                                               posterior_logits), options)
    if z is not None and z.device != flat_hidden.device:
        raise ValueError(f"z is on {z.device} but hidden is on {flat_hidden.device}; all tensors must be on one device")
    requests = GradRequests(hidden=_wants_grad(hidden), weight=_wants_grad(weight), bias=_wants_grad(bias),
                            z=_wants_grad(z), ref_logps=_wants_grad(ref_chosen_logps, ref_rejected_logps),
                            code_logits=_wants_grad(prior_logits, posterior_logits))
    out = linear_preference_loss_op(
        flat_hidden.contiguous(), weight.contiguous(), _contiguous(bias), flat_labels.long().contiguous(), seq_ids,
        lengths, positions, _contiguous(z), _contiguous(ref_chosen_logps), _contiguous(ref_rejected_logps),
        _contiguous(prior_logits), _contiguous(posterior_logits), *options, ignore_index, chunk_size,
        list(requests), resolve_backend(backend, flat_hidden.device))
    values, _ = unpack_outputs(out)
    return values


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


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


class GradRequests(NamedTuple):
    """Which gradients ``linear_preference_loss_op`` computes in its forward (the op takes them as ``list[bool]``)."""

    hidden: bool
    weight: bool
    bias: bool
    z: bool
    ref_logps: bool  # ref_chosen_logps and ref_rejected_logps
    code_logits: bool  # prior_logits and posterior_logits, of the loss and of the kl


class LinearPreferenceLossGrads(NamedTuple):
    """The gradients the op returns after its values (``LinearPreferenceLossOutput``): of ``loss`` to each
    differentiable input, and of ``kl`` to the code logits. A fresh ``[0]`` tensor stands for one not requested."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    z: Optional[Tensor]
    ref_chosen_logps: Optional[Tensor]
    ref_rejected_logps: Optional[Tensor]
    prior_logits: Optional[Tensor]
    posterior_logits: Optional[Tensor]
    kl_prior_logits: Optional[Tensor]
    kl_posterior_logits: Optional[Tensor]


# the request (a field of GradRequests) that each gradient answers
REQUESTED_BY = LinearPreferenceLossGrads(
    hidden="hidden", weight="weight", bias="bias", z="z", ref_chosen_logps="ref_logps",
    ref_rejected_logps="ref_logps", prior_logits="code_logits", posterior_logits="code_logits",
    kl_prior_logits="code_logits", kl_posterior_logits="code_logits")


def requested(grads: LinearPreferenceLossGrads, requests: GradRequests) -> LinearPreferenceLossGrads:
    """``grads`` with ``None`` for each gradient not requested."""
    return LinearPreferenceLossGrads(*(g if getattr(requests, r) else None for g, r in zip(grads, REQUESTED_BY)))


def pack_outputs(values: LinearPreferenceLossOutput, grads: LinearPreferenceLossGrads, like: Tensor) -> tuple:
    """The op's outputs: the values, then the gradients, a fresh ``[0]`` tensor (of ``like``) for each ``None``."""
    return (*values, *(g if g is not None else like.new_empty(0) for g in grads))


def unpack_outputs(out) -> tuple[LinearPreferenceLossOutput, LinearPreferenceLossGrads]:
    """``(values, gradients)`` of the op's outputs (or of their incoming gradients), as ``pack_outputs`` laid them."""
    n = len(LinearPreferenceLossOutput._fields)
    return LinearPreferenceLossOutput(*out[:n]), LinearPreferenceLossGrads(*out[n:])


def _linear_preference_loss(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, sequence_ids: Tensor,
        sequence_lengths: list[int], positions: Optional[Tensor], z: Optional[Tensor],
        ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], prior_logits: Optional[Tensor],
        posterior_logits: Optional[Tensor], loss_type: str, beta: float, gamma: float, label_smoothing: float,
        kl_weight: float, ipo_average: bool, ignore_index: int, chunk_size: int, grad_requests: list[bool],
        backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor]:
    """hidden [M, H], labels / sequence_ids [N] of the scored positions (rows ``positions`` of hidden, all rows
    when None), sorted by sequence, their 2B counts, the ``PreferenceLossOptions`` fields, ``GradRequests`` ->
    ``pack_outputs`` of the values and the requested gradients."""
    be = backend_module(backend)
    wants = GradRequests(*grad_requests)
    options = PreferenceLossOptions(loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
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
                        positive=("scored tokens per answer (labels)",) if options.needs_lengths else ())
    offsets = [0]
    for n in sequence_lengths:
        offsets.append(offsets[-1] + n)
    gemm = HeadGemms(weight, bias)
    seq_logp = torch.zeros(b2, dtype=cdt, device=dev)
    gh = torch.zeros_like(hidden) if wants.hidden else None
    gw = torch.zeros(weight.shape, dtype=cdt, device=dev) if wants.weight else None
    gb = torch.zeros(weight.shape[0], dtype=cdt, device=dev) if wants.bias else None
    gz = torch.zeros(b, hidden.shape[1], dtype=cdt, device=dev) if wants.z else None
    zh = z.to(hidden.dtype) if z is not None else None
    # the pair terms' gradient per chunk: the chunk's share of the mean, no KL (it does not depend on the logps)
    pair_options = options._replace(kl_weight=0.0)
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
        if not (wants.hidden or wants.weight or wants.bias or wants.z):
            continue
        n = p1 - p0
        zero = torch.zeros(n, dtype=cdt, device=dev)
        chunk = PreferenceLossInputs(
            policy_chosen_logps=seq_logp[p0:p1], policy_rejected_logps=seq_logp[b + p0:b + p1],
            ref_chosen_logps=ref_chosen_logps[p0:p1] if ref_chosen_logps is not None else None,
            ref_rejected_logps=ref_rejected_logps[p0:p1] if ref_chosen_logps is not None else None,
            chosen_lengths=cl[p0:p1], rejected_lengths=rl[p0:p1])
        of_logps = be.preference_loss_bwd(
            PreferenceLossOutput(loss=torch.full((), n / b, dtype=cdt, device=dev), losses=zero, chosen_rewards=zero,
                                 rejected_rewards=zero, kl=zero), chunk, pair_options)
        g_pos = torch.cat([of_logps.policy_chosen_logps, of_logps.policy_rejected_logps]).to(cdt)[
            torch.where(sid < b, sid - p0, sid - b - p0 + n)]
        d_c = be.token_logprobs_bwd(g_pos, x, tgt, lse, ignore_index, True)  # in place in x (dead after this)
        d = gemm.tile(d_c)
        if wants.hidden or wants.z:
            ghc = gemm.hidden_grad(d)
            if wants.hidden and rows is not None:
                gh.index_copy_(0, rows, ghc.to(gh.dtype))
            elif wants.hidden:
                k = 0
                for s, e in parts:
                    gh[s:e] = ghc[k:k + e - s]
                    k += e - s
            if wants.z:
                gz.index_add_(0, pair, ghc)
        if wants.weight:
            gemm.add_weight_grad(gw, d, h)
        if wants.bias:
            gb += d_c.sum(0)
    inputs = PreferenceLossInputs(seq_logp[:b].clone(), seq_logp[b:].clone(), ref_chosen_logps, ref_rejected_logps,
                                  cl, rl, prior_logits, posterior_logits)
    values = LinearPreferenceLossOutput(*be.preference_loss_fwd(inputs, options),
                                        chosen_logps=inputs.policy_chosen_logps,
                                        rejected_logps=inputs.policy_rejected_logps)
    of_loss = of_kl = PreferenceLossInputs(None, None)  # no gradient computed
    if wants.ref_logps or wants.code_logits:
        zeros = torch.zeros(b, dtype=cdt, device=dev)
        of_loss = be.preference_loss_bwd(
            PreferenceLossOutput(loss=torch.ones((), dtype=cdt, device=dev), losses=zeros, chosen_rewards=zeros,
                                 rejected_rewards=zeros, kl=zeros), inputs, options)
        if wants.code_logits:
            of_kl = be.preference_loss_bwd(
                PreferenceLossOutput(loss=torch.zeros((), dtype=cdt, device=dev), losses=zeros, chosen_rewards=zeros,
                                     rejected_rewards=zeros, kl=torch.ones(b, dtype=cdt, device=dev)), inputs, options)
    grads = LinearPreferenceLossGrads(
        hidden=gh, weight=_cast(gw, weight), bias=_cast(gb, bias), z=_cast(gz, z),
        ref_chosen_logps=of_loss.ref_chosen_logps, ref_rejected_logps=of_loss.ref_rejected_logps,
        prior_logits=of_loss.prior_logits, posterior_logits=of_loss.posterior_logits,
        kl_prior_logits=of_kl.prior_logits, kl_posterior_logits=of_kl.posterior_logits)
    return pack_outputs(values, requested(grads, wants), hidden)


def _cast(t: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return t.to(like.dtype) if t is not None else None


linear_preference_loss_op = torch.library.custom_op("lpc::linear_preference_loss",
                                                    mutates_args=())(autocast_off(_linear_preference_loss))
OP_INPUTS = tuple(inspect.signature(_linear_preference_loss).parameters)  # the op's arguments, in order


@linear_preference_loss_op.register_fake
def _(hidden, weight, bias, labels, sequence_ids, sequence_lengths, positions, z, ref_chosen_logps, ref_rejected_logps,
      prior_logits, posterior_logits, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average, ignore_index,
      chunk_size, grad_requests, backend):
    b, cdt = len(sequence_lengths) // 2, compute_dtype(hidden)
    values = LinearPreferenceLossOutput(*loss_outputs(hidden.new_empty(b, dtype=cdt)),
                                        chosen_logps=hidden.new_empty(b, dtype=cdt),
                                        rejected_logps=hidden.new_empty(b, dtype=cdt))
    like = LinearPreferenceLossGrads(
        hidden=hidden, weight=weight, bias=bias, z=z, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, prior_logits=prior_logits, posterior_logits=posterior_logits,
        kl_prior_logits=prior_logits, kl_posterior_logits=posterior_logits)
    grads = LinearPreferenceLossGrads(*(torch.empty_like(t) if t is not None else None for t in like))
    return pack_outputs(values, requested(grads, GradRequests(*grad_requests)), hidden)


def _setup(ctx, inputs, output):
    values, grads = unpack_outputs(output)
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(values.losses, values.chosen_rewards, values.rejected_rewards, values.chosen_logps,
                                values.rejected_logps, *grads)


def _backward(ctx, *grad_outputs):
    if torch.is_grad_enabled():
        raise RuntimeError("linear_preference_loss is not twice differentiable (its gradients are computed in the "
                           "forward pass and only scaled in backward): do not use create_graph=True through it")
    incoming, _ = unpack_outputs(grad_outputs)
    grad_loss, grad_kl = incoming.loss, incoming.kl
    grads = LinearPreferenceLossGrads(*ctx.saved_tensors)

    def scaled(t):
        if t.numel() == 0 or grad_loss is None:
            return None
        return t * grad_loss.to(t.dtype)

    def codes(d, k):
        if d.numel() == 0:
            return None
        out = d * grad_loss.to(d.dtype) if grad_loss is not None else torch.zeros_like(d)
        return out + grad_kl.to(d.dtype)[:, None] * k if grad_kl is not None else out

    of_inputs = dict(hidden=scaled(grads.hidden), weight=scaled(grads.weight), bias=scaled(grads.bias),
                     z=scaled(grads.z), ref_chosen_logps=scaled(grads.ref_chosen_logps),
                     ref_rejected_logps=scaled(grads.ref_rejected_logps),
                     prior_logits=codes(grads.prior_logits, grads.kl_prior_logits),
                     posterior_logits=codes(grads.posterior_logits, grads.kl_posterior_logits))
    return tuple(of_inputs.get(name) for name in OP_INPUTS)


linear_preference_loss_op.register_autograd(_backward, setup_context=_setup)
