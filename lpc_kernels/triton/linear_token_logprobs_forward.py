"""The fused LM head's forward: ``(logp, lse)`` per row without ``[N, V]`` logits in global memory.

``_lin_fwd_kernel``: program ``(row block, V split)`` walks its split in ``BLOCK_V`` tiles with an online
log-sum-exp and picks the target logit; ``_lin_combine_kernel`` merges the splits' partial ``(lse, target)``
without atomics and scatters them to the original rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear_token_logprobs_configs as configs
from ._common import INTERPRET, compute_dtype, device_guard, launch, next_pow2, sm_count, tuned
from .linear_token_logprobs_tiles import dot_flags, even_h, logits_tile, valid_rows


@tuned(configs.FWD_CONFIGS + configs.FWD_CONFIGS_F64, key=["V", "H"], quick=configs.FWD_QUICK,
       prune_configs_by=configs.prune_by_dtype(configs.FWD_CONFIGS_F64, configs.recompute_smem))
@even_h
@triton.jit
def _lin_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, part_lse_ptr, part_tgt_ptr,
    NV, V, H, stride_h, stride_w, v_per_split,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
):
    CDT: tl.constexpr = part_lse_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    # compacted -> original row; padded rows repeat the last valid row (NV >= 1): real, finite values
    # at valid addresses, dropped at the store
    rows = tl.load(rows_ptr + tl.minimum(offs_n, NV - 1)).to(tl.int64)
    labels = tl.load(labels_ptr + rows)
    m = tl.full([BLOCK_N], float("-inf"), CDT)
    s = tl.zeros([BLOCK_N], CDT)
    tgt = tl.zeros([BLOCK_N], CDT)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        x = logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
                        HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
        x = tl.where(v_mask[None, :], x, float("-inf"))
        tgt += tl.sum(tl.where(offs_v[None, :] == labels[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # a row whose logits so far are all -inf (a -inf bias over whole tiles) has m_new = -inf: rescale
        # against 0 instead, so that -inf - -inf is never formed (s stays 0, the split's lse -inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    out = split.to(tl.int64) * NV + offs_n
    tl.store(part_lse_ptr + out, m + tl.log(s), mask=n_mask)
    tl.store(part_tgt_ptr + out, tgt, mask=n_mask)


@triton.jit
def _lin_combine_kernel(
    part_lse_ptr, part_tgt_ptr, rows_ptr, logp_ptr, lse_ptr, NV, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """``lse = logsumexp over splits``, ``target = sum over splits``, scattered to the original rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_s[:, None] < SPLITS) & n_mask[None, :]
    idx = offs_s.to(tl.int64)[:, None] * NV + offs_n[None, :]
    # padded splits are -inf; padded rows load 0 (finite, never stored) so no -inf - -inf is formed
    part = tl.load(part_lse_ptr + idx, mask=mask, other=0.0)
    part = tl.where((offs_s < SPLITS)[:, None], part, float("-inf"))
    m = tl.max(part, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split -inf: lse = 0 + log(0) = -inf, no NaN
    lse = m + tl.log(tl.sum(tl.exp(part - m[None, :]), axis=0))
    tgt = tl.sum(tl.load(part_tgt_ptr + idx, mask=mask, other=0.0), axis=0)
    rows = tl.load(rows_ptr + offs_n, mask=n_mask, other=0)
    tl.store(lse_ptr + rows, lse, mask=n_mask)
    tl.store(logp_ptr + rows, tgt - lse, mask=n_mask)


def _splits(nv: int, v: int, device_sms: int) -> tuple[int, int]:
    """(number of V splits, columns per split) for the forward grid ``(cdiv(nv, BLOCK_N), splits)``."""
    if INTERPRET:
        block_v = configs.INTERPRET_FWD["BLOCK_V"]
        splits = max(1, min(configs.INTERPRET_SPLITS, triton.cdiv(v, block_v)))
    else:
        block_v = configs.MAX_BLOCK_V
        row_blocks = triton.cdiv(nv, 128)
        # about two waves of programs, each split still >= 8 tiles wide so the merge stays negligible
        splits = max(1, min(triton.cdiv(2 * device_sms, row_blocks), triton.cdiv(v, 8 * block_v), 64))
    per_split = triton.cdiv(triton.cdiv(v, splits), block_v) * block_v  # split edges on tile edges
    return triton.cdiv(v, per_split), per_split


def linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index, chunk_size):
    """``(logp, lse)``; ``chunk_size`` is ignored: no ``[rows, V]`` block is ever materialised."""
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden)
    logp = torch.zeros(n, dtype=cdt, device=hidden.device)
    lse = torch.zeros(n, dtype=cdt, device=hidden.device)
    rows = valid_rows(labels, ignore_index)
    nv = rows.numel()
    if nv == 0:  # all rows ignored: zeros, no launch
        return logp, lse
    splits, per_split = _splits(nv, v, sm_count(hidden))
    part_lse = torch.empty(splits, nv, dtype=cdt, device=hidden.device)
    part_tgt = torch.empty(splits, nv, dtype=cdt, device=hidden.device)
    prec, upcast = dot_flags(hidden)
    b = bias if bias is not None else hidden  # dummy pointer, never read (HAS_BIAS=False)
    with device_guard(hidden):
        launch(_lin_fwd_kernel, lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]), splits),
               (hidden, weight, b, rows, labels, part_lse, part_tgt, nv, v, h, hidden.stride(0), weight.stride(0),
                per_split, bias is not None, prec, upcast), configs.INTERPRET_FWD)
        block_n = 64 if INTERPRET else 128
        _lin_combine_kernel[(triton.cdiv(nv, block_n),)](
            part_lse, part_tgt, rows, logp, lse, nv, splits, BLOCK_N=block_n, BLOCK_S=next_pow2(splits))
    return logp, lse
