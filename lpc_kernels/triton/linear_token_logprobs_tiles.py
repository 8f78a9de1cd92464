"""What the fused LM head's kernels share: one tile of logits recomputed from ``h`` and ``W``, one tile of
the logits gradient ``D``, the ``EVEN_H`` heuristic, and on the host the compacted rows and the
``tl.dot`` flags every launch passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision

# H a multiple of BLOCK_H: the operand loads need no mask
even_h = triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})


def valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The rows every kernel walks (compacted: ignored rows never reach a kernel)."""
    # one host sync; the grid size depends on it
    return torch.nonzero(labels != ignore_index).squeeze(1)


def dot_flags(hidden: torch.Tensor) -> tuple[str, bool]:
    """``(DOT_PREC, UPCAST)`` of every kernel's ``tl.dot`` for inputs like ``hidden``."""
    return dot_precision(hidden.dtype), INTERPRET


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                CDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``x[rows, offs_v] = h[rows] @ W[offs_v].T (+ b)`` for one tile, accumulated in ``CDT``.

    The operand loads are unmasked except for a ragged ``H`` tail: padded rows arrive as copies of a real
    row and columns past ``V`` are clamped to ``V - 1``, so every address is valid and the callers mask
    the results instead (masked loads cost registers: measured as spills in the sm_90 build).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], CDT)
    h_rows = h_ptr + rows[:, None] * stride_h  # rows are int64
    offs_vc = tl.minimum(offs_v, V - 1)
    w_cols = w_ptr + offs_vc.to(tl.int64)[None, :] * stride_w  # V * H may exceed 2**31
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        if EVEN_H:
            a = tl.load(h_rows + offs_h[None, :])
            b = tl.load(w_cols + offs_h[:, None])  # W.T tile [BLOCK_H, BLOCK_V]
        else:
            h_mask = offs_h < H
            a = tl.load(h_rows + offs_h[None, :], mask=h_mask[None, :], other=0.0)
            b = tl.load(w_cols + offs_h[:, None], mask=h_mask[:, None], other=0.0)
        if UPCAST:  # interpreter: no 16-bit arithmetic there
            a = a.to(CDT)
            b = b.to(CDT)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=CDT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_vc).to(CDT)[None, :]
    return acc


@triton.jit
def dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, offs_n, n_mask, offs_v, v_mask,
                 NV, V, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 CDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``(rows, mask, d)`` for one tile: ``D = g (onehot - exp(x - lse))``, zero outside ``mask``; ``rows``
    are the original rows of the compacted rows ``offs_n``."""
    rows = tl.load(rows_ptr + tl.minimum(offs_n, NV - 1)).to(tl.int64)  # padded rows: the last valid row
    labels = tl.load(labels_ptr + rows)
    lse = tl.load(lse_ptr + rows).to(CDT)  # a real lse: exp(x - lse) stays <= 1 on padded rows too
    g = tl.load(grad_ptr + rows).to(CDT)
    x = logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
                    HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    mask = n_mask[:, None] & v_mask[None, :]
    p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
    is_label = offs_v[None, :] == labels[:, None]
    d = g[:, None] * (tl.where(is_label, 1.0, 0.0) - p)  # fp32: the true-class 1 - p does not cancel
    d = tl.where(mask, d, 0.0)
    return rows, mask, d
