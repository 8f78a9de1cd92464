"""Vocab-parallel ``linear_token_logprobs``: the LM-head weight sharded along the vocabulary over a group.

Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the weight (and bias) and the same ``hidden`` and
``labels``; every rank gets the exact full-vocabulary log-probs from the backend's fused kernels on its shard and
two small all-reduces (``d hidden`` all-reduced in backward). Why it is exact: ``docs/design.md``, "Vocab-parallel
LM head"; training-side use and costs: ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import backend_module, resolve_backend
from .checks import check_bool, check_int
from .numerics import DEFAULT_CHUNK_SIZE, FLOAT_DTYPES, chunks, compute_dtype
from .ops.linear_token_logprobs import check_linear_token_logprobs

__all__ = ["vocab_parallel_linear_token_logprobs"]

# Local label meaning "ignored" handed to the backend. Local labels of valid rows are >= 0, so -1
# never collides with one, whatever the caller's ignore_index (which may be any int, even a vocab id).
_LOCAL_IGNORE = -1
# Local column standing in for the label of rows whose target lies in another shard (the backend's kernels need
# a label on every scored row); its one-hot term is removed from the gradient exactly in backward.
_STAND_IN = 0

# Layout of the per-rank record exchanged by the one consistency all_gather.
_META_FIELDS = ("vocab_start", "V_local", "H", "N", "dtype", "has_bias", "ignore_index", "reduce_hidden_grad",
                "needs_hidden_grad", "label_min", "label_max", "label_sum", "label_weighted_sum")


def _check_local(hidden, weight_shard, labels, vocab_start, bias_shard, ignore_index, chunk_size,
                 reduce_hidden_grad) -> None:
    """Checks that need no other rank: types, shapes, dtypes, devices, scalar ranges."""
    check_linear_token_logprobs(hidden, weight_shard, labels, bias_shard, ignore_index, chunk_size,
                                     weight_name="weight_shard", bias_name="bias_shard", vocab="V_local")
    check_int("vocab_start", vocab_start, low=0)
    check_bool("reduce_hidden_grad", reduce_hidden_grad)


def _check_group(process_group, hidden) -> None:
    """The group exists, holds this rank, and can carry tensors on hidden's device."""
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_linear_token_logprobs needs torch.distributed, which this torch build "
                           "lacks (use lk.linear_token_logprobs)")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on ranks outside it
        raise ValueError("process_group does not contain this rank (it is GroupMember.NON_GROUP_MEMBER): call "
                         "the op only on the group's members")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None (the default group), "
                        f"got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_linear_token_logprobs needs an initialised process group: call "
                           "torch.distributed.init_process_group first (or use lk.linear_token_logprobs)")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group does not contain this rank: call the op only on the group's members")
    if dist.get_backend(process_group) == "nccl" and hidden.device.type != "cuda":
        raise ValueError(f"process_group uses NCCL, which needs CUDA tensors; hidden is on {hidden.device}")


def _exchange_and_check_world(hidden, weight_shard, labels, vocab_start, process_group, bias_shard, ignore_index,
                              reduce_hidden_grad) -> int:
    """One small all_gather of every rank's shard and call metadata; returns the global vocab size.

    Every rank checks the same gathered table, so either every rank raises (the same message) or none
    does: no rank is left waiting in a later collective. Label statistics are gathered instead of being
    checked before the exchange, because their valid range (the global vocab) is only known after it;
    computing them on the device keeps this to one host sync.
    """
    valid = labels != ignore_index
    lab = labels.long()
    big = torch.iinfo(torch.int64).max
    needs_hidden_grad = bool(torch.is_grad_enabled() and hidden.requires_grad)
    scalars = torch.tensor(
        [vocab_start, weight_shard.shape[0], weight_shard.shape[1], labels.numel(),
         FLOAT_DTYPES.index(hidden.dtype), bias_shard is not None, ignore_index, reduce_hidden_grad,
         needs_hidden_grad], dtype=torch.int64, device=hidden.device)
    flat = lab.reshape(-1)
    # fingerprints of the labels (wrapping int64 sums are still deterministic): replicated labels agree
    stats = torch.stack([torch.where(valid, lab, big).min(), torch.where(valid, lab, -1).max(), flat.sum(),
                         (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()])
    mine = torch.cat([scalars, stats])
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    table = [dict(zip(_META_FIELDS, t.tolist())) for t in gathered]

    def _disagree(field: str) -> bool:
        return len({row[field] for row in table}) > 1

    def _per_rank(*fields: str) -> str:
        return "; ".join(f"rank {r}: " + ", ".join(f"{f}={row[f]}" for f in fields) for r, row in enumerate(table))

    if _disagree("H"):
        raise ValueError("hidden must have the same hidden size H = weight_shard.shape[1] on every rank of "
                         f"process_group, got {_per_rank('H')}")
    if _disagree("N"):
        raise ValueError("hidden and labels must be replicated over process_group (same tokens on every rank), "
                         f"got different numbers of rows: {_per_rank('N')}")
    if _disagree("dtype"):
        names = {i: str(d) for i, d in enumerate(FLOAT_DTYPES)}
        raise TypeError("hidden and weight_shard must have the same dtype on every rank, got "
                        + "; ".join(f"rank {r}: {names[row['dtype']]}" for r, row in enumerate(table)))
    for field, what in (("has_bias", "bias_shard must be given on every rank or on none"),
                        ("ignore_index", "ignore_index must be the same on every rank"),
                        ("reduce_hidden_grad", "reduce_hidden_grad must be the same on every rank"),
                        ("needs_hidden_grad", "hidden must require grad on every rank or on none (the backward "
                                              "all-reduce of d hidden needs every rank)")):
        if _disagree(field):
            raise ValueError(f"{what}, got {_per_rank(field)}")
    if _disagree("label_sum") or _disagree("label_weighted_sum"):
        raise ValueError("labels must be identical on every rank of process_group (hidden and labels are "
                         "replicated; only the weight is sharded), but they differ across ranks")
    # the shards must tile [0, V): sorted by start, each begins where the previous one ends
    order = sorted(range(world), key=lambda r: table[r]["vocab_start"])
    expected = 0
    for r in order:
        if table[r]["vocab_start"] != expected:
            layout = _per_rank("vocab_start", "V_local")
            raise ValueError(f"vocab_start / weight_shard.shape[0] must tile the vocabulary: the shards "
                             f"[vocab_start, vocab_start + V_local) of the ranks must be disjoint and cover "
                             f"[0, V) without gaps; expected a shard starting at {expected}, got {layout}")
        expected += table[r]["V_local"]
    vocab = expected
    row = table[dist.get_rank(process_group)]
    if row["label_max"] >= 0 and (row["label_min"] < 0 or row["label_max"] >= vocab):
        bad = row["label_min"] if row["label_min"] < 0 else row["label_max"]
        raise ValueError(f"labels must be in [0, {vocab}) (the global vocab: sum of weight_shard.shape[0] over "
                         f"the group) or equal ignore_index={ignore_index}, got {bad}")
    return vocab


class _VocabParallelLinearTokenLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V_local, H], bias [V_local]? -> logp [N] (compute dtype): forward an all-reduce MAX
    of ``[N]`` and an all-reduce SUM of ``[2, N]`` combine the shards' log-sum-exps; backward the backend's
    gradient on the shard with the global ``lse``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start, ignore_index, chunk_size, backend, group,
                reduce_hidden_grad):
        mod = backend_module(backend)
        cdt = compute_dtype(hidden)
        v_local = weight.shape[0]
        valid = labels != ignore_index
        local = valid & (labels >= vocab_start) & (labels < vocab_start + v_local)
        # valid rows whose target is elsewhere get the stand-in label: the backend then returns their
        # local lse (it returns lse = 0 for ignored rows); their target logit is dropped below
        local_labels = torch.where(local, labels - vocab_start,
                                   torch.where(valid, _STAND_IN, _LOCAL_IGNORE)).contiguous()
        logp_r, lse_r = mod.linear_token_logprobs_fwd(hidden, weight, bias, local_labels, _LOCAL_IGNORE, chunk_size)
        lse_r, logp_r = lse_r.to(cdt), logp_r.to(cdt)
        # ignored rows: lse_r = 0 on every rank, so m = 0 and the (discarded) lse stays finite
        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        packed = torch.stack([torch.exp(lse_r - m), torch.where(local, logp_r + lse_r, 0.0)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        lse = torch.where(valid, m + torch.log(packed[0]), 0.0)
        logp = torch.where(valid, packed[1] - lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, local_labels, lse, local, valid)
        ctx.chunk_size, ctx.backend, ctx.group, ctx.reduce = chunk_size, backend, group, reduce_hidden_grad
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, local_labels, lse, local, valid = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = bool(need_b and bias is not None)
        gh = gw = gb = None
        if need_h or need_w or need_b:
            cdt = compute_dtype(hidden)
            g = grad_logp.to(cdt).contiguous()
            gh, gw, gb = backend_module(ctx.backend).linear_token_logprobs_bwd(
                g, hidden, weight, bias, local_labels, lse, _LOCAL_IGNORE, ctx.chunk_size, need_h, need_w, need_b)
            stand_in = valid & ~local
            g_stand = torch.where(stand_in, g, 0.0)  # upstream grad of the rows that got the stand-in label
            w0 = weight[_STAND_IN].to(cdt)
            b0 = bias[_STAND_IN].to(cdt) if bias is not None else None
            g_w0 = torch.zeros_like(w0) if need_w else None
            g_b0 = torch.zeros((), dtype=cdt, device=w0.device)
            # bounded row chunks: the correction never holds more than [chunk, H] in the compute dtype
            for s, e in chunks(hidden.shape[0], ctx.chunk_size):
                if need_h:  # drop the stand-in one-hot term g_i * W[0] from d hidden
                    gh[s:e] = (gh[s:e].to(cdt) - g_stand[s:e, None] * w0).to(gh.dtype)
                if need_w or need_b:  # row 0 of d W / d b from scratch, in the compute dtype
                    h = hidden[s:e].to(cdt)
                    x0 = h @ w0 + (b0 if b0 is not None else 0.0)
                    p0 = torch.where(valid[s:e], torch.exp(x0 - lse[s:e]), 0.0)
                    onehot0 = (local[s:e] & (local_labels[s:e] == _STAND_IN)).to(cdt)
                    coef = g[s:e] * (onehot0 - p0)
                    if need_w:
                        g_w0 += coef @ h
                    g_b0 += coef.sum()
            if need_w:
                gw[_STAND_IN] = g_w0.to(gw.dtype)
            if need_b:
                gb[_STAND_IN] = g_b0.to(gb.dtype)
            if need_h and ctx.reduce:
                # hidden is replicated over the group: its gradient is the sum of every shard's share
                dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=ctx.group)
        return gh, gw, gb, None, None, None, None, None, None, None


def vocab_parallel_linear_token_logprobs(hidden: Tensor, weight_shard: Tensor, labels: Tensor, *, vocab_start: int,
                                         process_group: Optional["dist.ProcessGroup"] = None,
                                         bias_shard: Optional[Tensor] = None, ignore_index: int = -100,
                                         backend: str = "auto", chunk_size: Optional[int] = None,
                                         reduce_hidden_grad: bool = True) -> Tensor:
    """``linear_token_logprobs`` with the LM head sharded along the vocabulary over ``process_group``.

    Every rank of the group calls it with the same ``hidden`` and ``labels`` and its own shard: rows
    ``[vocab_start, vocab_start + V_local)`` of the full ``[V, H]`` weight. The shards must tile the
    vocabulary (disjoint, no gaps, any order of ranks); ``V = sum of V_local`` over the group. Every rank
    gets the exact full-vocabulary log-probs; no rank holds ``[N, V]`` or ``[N, V_local]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64, identical on every rank.
        weight_shard: ``[V_local, H]`` this rank's rows of the LM-head weight, same dtype as ``hidden``.
        labels: ``[...]`` int64 (or int32) GLOBAL vocab ids in ``[0, V)`` or ``ignore_index``, identical
            on every rank.
        vocab_start: global id of ``weight_shard[0]``, an int >= 0.
        process_group: the vocab-parallel (tensor-parallel) group; ``None`` is the default group.
        bias_shard: optional ``[V_local]`` rows of the bias (all ranks pass one, or none does).
        ignore_index: label value whose row gets log-prob 0 and no gradient.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``: the kernels that run
            this rank's shard (as in ``lk.linear_token_logprobs``; ranks may differ).
        chunk_size: rows per recomputed logits block for the chunked backends (default
            ``DEFAULT_CHUNK_SIZE``), also the row block of the stand-in correction in backward.
        reduce_hidden_grad: all-reduce (sum) ``d hidden`` over the group in backward, so every rank gets
            the full gradient of its replicated ``hidden`` (Megatron-LM semantics). ``False`` leaves each
            rank its shard's share, for callers whose tensor-parallel layer does that reduction itself.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-probs, 0 where ignored, identical on every rank;
        gradients flow to ``hidden``, ``weight_shard`` and ``bias_shard``.

    Collectives: one ``all_gather`` of 13 int64 per rank (shard layout and call consistency: every rank
    raises the same error if the shards do not tile the vocabulary or the ranks disagree), then in
    forward an all-reduce MAX of ``[N]`` and an all-reduce SUM of ``[2, N]`` in the compute dtype, and
    in backward (when ``hidden`` needs a gradient and ``reduce_hidden_grad``) an all-reduce SUM of
    ``[N, H]`` in ``hidden``'s dtype. Every rank must call forward and backward. Eager only: the
    collectives run in Python, so this op is not a ``torch.library`` custom op.

    Raises:
        TypeError / ValueError naming the argument, before any collective, for checks that need no
        other rank; the same ValueError on every rank, after the one all_gather and before any kernel,
        for checks across ranks (tiling, H, row count, dtype, bias presence, labels identical and in
        ``[0, V)``). RuntimeError if torch.distributed is not initialised or the backend cannot run.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    _check_local(hidden, weight_shard, labels, vocab_start, bias_shard, ignore_index, chunk_size, reduce_hidden_grad)
    name = resolve_backend(backend, hidden.device)
    _check_group(process_group, hidden)
    _exchange_and_check_world(hidden, weight_shard, labels, vocab_start, process_group, bias_shard, ignore_index,
                              reduce_hidden_grad)
    lead = labels.shape
    logp = _VocabParallelLinearTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight_shard.contiguous(),
        bias_shard.contiguous() if bias_shard is not None else None, labels.reshape(-1).long().contiguous(),
        vocab_start, ignore_index, chunk_size, name, process_group, reduce_hidden_grad)
    return logp.view(lead)
