"""The gradient filter of the ops that hold a chunk of logits while they form its gradient (``linear_preference_loss``,
the frozen-head path of ``linear_token_logprobs``): Cut Cross-Entropy's idea, saving work, not only zeroing it.

For a chunk of rows the logits ``x [c, V]`` and their ``lse`` are already in hand, so deciding costs a few passes
over ``x`` and no recompute. Vocabulary columns are dropped from the gradient (their softmax-gradient entries, both
gradient GEMMs, the bias gradient) when they are no scored row's label, their softmax entries are below ``eps`` on
every scored row of the chunk, and together they hold at most ``eps`` of each scored row's softmax mass (so a
near-uniform softmax, where every entry is small but the small ones are all the mass, loses nothing). The kept
columns are gathered and the gradient GEMMs run on them alone, so the saving does not depend on how the vocabulary
is ordered. Contract and error bound: ``docs/design.md`` section 2 (``filter_eps``). Deciding needs the kept
columns' count on the host: one host sync per chunk when ``eps > 0``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_IGNORED = -1  # the label of an ignored row among the kept columns (never a kept column's position)
_DEPTHS = 32  # nats below log(eps) told apart; deeper columns share the last depth
_ROWS = 256  # rows per exp(x) block of the mass GEMM (bounds its temporary to [256, V])


def kept_columns(x: Tensor, lse: Tensor, labels: Tensor, ignore_index: int, eps: float) -> Optional[Tensor]:
    """Turns ``x [c, V]`` in place into the log-softmax ``x - lse`` (``-inf`` on rows that are not scored) and
    returns the columns to keep (int64, ascending), or ``None`` when every column is kept.

    ``lse [c]``: the rows' log-sum-exp; ``labels [c]`` with ``ignore_index`` on rows that are not scored. The
    dropped columns are no scored row's label, below ``eps`` on every scored row, and hold at most ``eps`` of any
    scored row's softmax mass: columns are grouped by how many nats their largest log-probability lies below
    ``log(eps)`` (depth 0: at or above, always kept), each row's mass per depth is one small GEMM, and the
    shallowest depth whose deeper columns hold at most ``eps`` on every row is where dropping starts."""
    scored = labels != ignore_index
    x.sub_(torch.where(scored, lse.to(x.dtype), math.inf)[:, None])
    depth = (math.log(eps) - x.amax(0)).clamp_(0, _DEPTHS).ceil_().long()
    # labels: depth 0 (an ignored row's stand-in index 0 keeps its depth)
    depth.scatter_reduce_(0, torch.where(scored, labels, 0), torch.where(scored, 0, _DEPTHS), reduce="amin")
    groups = torch.nn.functional.one_hot(depth, _DEPTHS + 1).to(x.dtype)  # [V, depths]
    mass = torch.cat([torch.exp(x[s:s + _ROWS]) @ groups for s in range(0, x.shape[0], _ROWS)])  # [c, depths]
    dropped = mass.flip(1).cumsum(1).flip(1).amax(0)  # [j]: the most any row loses dropping depths >= j
    ok = dropped <= eps
    ok[0] = False
    start = torch.where(ok.any(), ok.int().argmax(), _DEPTHS + 1)
    cols = torch.nonzero(depth < start).squeeze(1)  # the host sync
    return None if cols.numel() in (0, x.shape[1]) else cols  # none kept: no row is scored, d is 0 anyway


def softmax_grad(backend, gemms, grad: Tensor, x: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
                 eps: float):
    """``(d, gemms, cols)``: ``d = grad * (onehot - softmax)``, computed by the backend's ``token_logprobs_bwd`` in
    place in ``x`` (``eps = 0``), or on the columns ``cols`` the filter keeps (``None``: all), and the ``HeadGemms``
    on those columns."""
    if eps == 0:
        return backend.token_logprobs_bwd(grad, x, labels, lse, ignore_index, True), gemms, None
    cols = kept_columns(x, lse, labels, ignore_index, eps)
    zero = torch.zeros_like(lse)  # x now holds x - lse: the same exp(x - lse), bit for bit
    if cols is None:
        return backend.token_logprobs_bwd(grad, x, labels, zero, ignore_index, True), gemms, None
    position = torch.full((x.shape[1],), _IGNORED, dtype=torch.long, device=x.device)
    position[cols] = torch.arange(cols.numel(), device=x.device)
    scored = labels != ignore_index
    labels = torch.where(scored, position[torch.where(scored, labels, 0)], _IGNORED)  # in cols, by construction
    d = backend.token_logprobs_bwd(grad, x.index_select(1, cols), labels, zero, _IGNORED, True)
    return d, gemms.columns(cols), cols
