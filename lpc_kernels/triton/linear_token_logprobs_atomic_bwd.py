"""The fused LM head's ``atomic`` backward (``$LPC_TRITON_LINEAR_BWD=atomic``, Cut Cross-Entropy's scheme).

One kernel: each program recomputes one logits tile, forms ``D = g (onehot - softmax)`` and scatters
``D_tile @ W`` and ``D_tile.T @ h`` with fp32 atomic adds into fp32 ``[N, H]`` and ``[V, H]`` accumulators,
cast to the input dtypes at the end. Its last bits depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear_token_logprobs_configs as configs
from ._common import compute_dtype, grouped_tile, launch, tuned
from .linear_token_logprobs_tiles import dlogits_tile, dot_flags, even_h


@tuned(configs.BWD_CONFIGS + configs.BWD_CONFIGS_F64, key=["V", "H", "NEED_H", "NEED_W"], quick=configs.BWD_QUICK,
       prune_configs_by=configs.prune_by_dtype(configs.BWD_CONFIGS_F64, configs.recompute_smem),
       reset_to_zero=["gh_ptr", "gw_ptr", "gb_ptr"])  # the atomics accumulate: zero them between trials
@even_h
@triton.jit
def _lin_bwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, gh_ptr, gw_ptr, gb_ptr,
    NV, V, H, stride_h, stride_w, stride_gh, stride_gw,
    HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HB: tl.constexpr,
    GROUP_N: tl.constexpr, EVEN_H: tl.constexpr,
):
    tl.static_assert(BLOCK_H % BLOCK_HB == 0)  # so EVEN_H (H % BLOCK_H == 0) covers the scatter steps too
    CDT: tl.constexpr = gh_ptr.dtype.element_ty  # fp32 accumulators (fp64 for fp64 inputs)
    # grouped ordering: programs in flight share GROUP_N row blocks of h and walk V together, so both
    # operand tiles and the atomically updated tiles stay in L2
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(NV, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    rows, _, d = dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr,
                              offs_n, n_mask, offs_v, v_mask, NV, V, H, stride_h, stride_w,
                              HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    if NEED_B:
        tl.atomic_add(gb_ptr + offs_v, tl.sum(d, axis=0).to(CDT), mask=v_mask, sem="relaxed")
    if NEED_H or NEED_W:
        if UPCAST:
            d_op = d
        else:  # tensor-core operands: D rounded to the input dtype (no-op for fp32/fp64)
            d_op = d.to(h_ptr.dtype.element_ty)
        h_rows = h_ptr + rows[:, None] * stride_h
        w_rows = w_ptr + tl.minimum(offs_v, V - 1).to(tl.int64)[:, None] * stride_w  # clamped, as in logits_tile
        # two passes over H in BLOCK_HB steps, not one pass: each keeps one [BLOCK, BLOCK_HB] result and
        # one block of atomic addresses live (see BWD_CONFIGS). Operands unmasked but for a ragged H
        # tail (padded rows/columns of D are exact zeros).
        if NEED_H:  # grad_h[rows, :] += D_tile @ W[offs_v, :]
            for h0 in range(0, H, BLOCK_HB):
                offs_h = h0 + tl.arange(0, BLOCK_HB)
                h_mask = offs_h < H
                if EVEN_H:
                    w_t = tl.load(w_rows + offs_h[None, :])
                else:
                    w_t = tl.load(w_rows + offs_h[None, :], mask=h_mask[None, :], other=0.0)
                if UPCAST:
                    w_t = w_t.to(CDT)
                dh = tl.dot(d_op, w_t, input_precision=DOT_PREC, out_dtype=CDT)
                tl.atomic_add(gh_ptr + rows[:, None] * stride_gh + offs_h[None, :], dh,
                              mask=n_mask[:, None] & h_mask[None, :], sem="relaxed")
        if NEED_W:  # grad_W[offs_v, :] += D_tile.T @ h[rows, :]
            d_t = tl.trans(d_op)
            for h0 in range(0, H, BLOCK_HB):
                offs_h = h0 + tl.arange(0, BLOCK_HB)
                h_mask = offs_h < H
                if EVEN_H:
                    h_t = tl.load(h_rows + offs_h[None, :])
                else:
                    h_t = tl.load(h_rows + offs_h[None, :], mask=h_mask[None, :], other=0.0)
                if UPCAST:
                    h_t = h_t.to(CDT)
                dw = tl.dot(d_t, h_t, input_precision=DOT_PREC, out_dtype=CDT)
                tl.atomic_add(gw_ptr + offs_v.to(tl.int64)[:, None] * stride_gw + offs_h[None, :], dw,
                              mask=v_mask[:, None] & h_mask[None, :], sem="relaxed")


def atomic_backward(g, hidden, weight, bias, rows, labels, lse, need_hidden, need_weight, need_bias):
    """Returns (grad_h, grad_W, grad_b) in the input dtypes (None where not needed)."""
    n, h = hidden.shape
    v = weight.shape[0]
    nv = rows.numel()
    cdt = compute_dtype(hidden)
    dev = hidden.device
    gh = torch.zeros(n, h, dtype=cdt, device=dev) if need_hidden else None
    gw = torch.zeros(v, h, dtype=cdt, device=dev) if need_weight else None
    gb = torch.zeros(v, dtype=cdt, device=dev) if need_bias else None
    dummy = torch.empty(1, dtype=cdt, device=dev)  # stands for an accumulator not asked for: never read
    prec, upcast = dot_flags(hidden)
    g_h, g_w, g_b = (gh if gh is not None else dummy, gw if gw is not None else dummy,
                     gb if gb is not None else dummy)
    launch(_lin_bwd_kernel,
           lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),),
           (hidden, weight, bias if bias is not None else hidden, rows, labels, lse, g,
            g_h, g_w, g_b, nv, v, h, hidden.stride(0), weight.stride(0), h, h,
            bias is not None, bool(need_hidden), bool(need_weight), bool(need_bias), prec, upcast),
           configs.INTERPRET_BWD)
    return (gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None)
