"""Triton ``token_logprobs``: log p(label) from materialised logits ``[N, V]``. Forward: one program per row, one
streaming pass over ``V`` (online log-sum-exp), only ``lse [N]`` saved. Backward: ``g * (onehot - exp(x - lse))``
recomputed in fp32 (fp64 for fp64 logits) and rounded once at the store, on an ``(N, cdiv(V, BLOCK_V))`` grid
where each program reads exactly the elements it writes, so ``inplace=True`` can overwrite the logits buffer.
Ignored rows get ``logp = lse = 0`` and a zero gradient row without reading their logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cast_out, compute_dtype, device_guard, launch, next_pow2, tuned

# Interpreter configs (wide blocks: the interpreter pays per program and per loop step).
INTERPRET_FWD = {"BLOCK_V": 1024}
INTERPRET_BWD_BLOCK_V = 1024

# GPU: the forward is a bandwidth-bound row reduction; 16-32 KiB of logits in flight per program.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=ns)
    for bv, nw in ((2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
    for ns in (1, 2)
]


@tuned(_FWD_CONFIGS, key=["V"])
@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, labels_ptr, logp_ptr, lse_ptr,
    V, stride_x, ignore_index,
    BLOCK_V: tl.constexpr,
):
    CDT: tl.constexpr = lse_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride multiply: N * V may exceed 2**31
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, tl.cast(0.0, CDT))
        tl.store(lse_ptr + row, tl.cast(0.0, CDT))
    else:
        x_row = x_ptr + row * stride_x
        m = tl.cast(float("-inf"), CDT)
        s = tl.cast(0.0, CDT)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # a row whose entries so far are all -inf has m_new = -inf: rescale against 0 instead of
            # forming -inf - -inf = NaN (the sum stays 0 and lse = -inf, as torch.logsumexp gives)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(x_row + label).to(CDT)
        tl.store(logp_ptr + row, target - lse)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, out_ptr, labels_ptr, lse_ptr, grad_ptr,
    V, stride_x, stride_out, ignore_index,
    BLOCK_V: tl.constexpr,
):
    CDT: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    g = tl.load(grad_ptr + row).to(CDT)
    lse = tl.load(lse_ptr + row).to(CDT)
    # ignored rows skip the read (masked load) and store zeros
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row & valid, other=0.0).to(CDT)
    p = tl.exp(x - lse)
    onehot = tl.where(cols == label, 1.0, 0.0).to(CDT)
    d = g * (onehot - p)  # the true-class term 1 - p in fp32: in bf16 it cancels to a few bits for p near 1
    d = tl.where(valid, d, 0.0)
    tl.store(out_ptr + row * stride_out + cols, cast_out(d, out_ptr.dtype.element_ty), mask=in_row)


def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    n, v = logits.shape
    cdt = compute_dtype(logits)
    logp = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty(n, dtype=cdt, device=logits.device)
    if n == 0:
        return logp, lse
    with device_guard(logits):
        launch(_token_logprobs_fwd_kernel, lambda meta: (n,),
               (logits, labels, logp, lse, v, logits.stride(0), ignore_index), INTERPRET_FWD)
    return logp, lse


def _bwd_block_v(v: int) -> int:
    if INTERPRET:
        return min(INTERPRET_BWD_BLOCK_V, next_pow2(v))
    # a streaming elementwise kernel: 4096 elements per program keeps the grid's second axis far below
    # its 65535 limit for any vocabulary (V <= 2**28) and enough bytes in flight per SM
    return min(4096, next_pow2(v))


def token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, inplace):
    n, v = logits.shape
    out = logits if inplace else torch.empty_like(logits)
    if n == 0:
        return out
    block_v = _bwd_block_v(v)
    # no autotuning here: the in-place variant cannot be re-run on its own output
    with device_guard(logits):
        _token_logprobs_bwd_kernel[(n, triton.cdiv(v, block_v))](
            logits, out, labels, lse, grad_logp.contiguous(), v, logits.stride(0), out.stride(0), ignore_index,
            BLOCK_V=block_v, num_warps=8 if block_v >= 4096 else 4)
    return out
