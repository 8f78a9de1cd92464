"""Triton ``gumbel_softmax_codes``: Gumbel noise, softmax over K codes and ``z = w @ E`` in one launch (one
program per ``BLOCK_B`` rows, the whole code axis in one tile; ``soft`` stored only when ``hard``), and a one-launch
backward (the first programs do ``grad_logits = soft * (g_w - sum_k g_w,k soft_k) / tau`` with
``g_w = grad_w + grad_z @ E.T``, the rest ``grad_E = w.T @ grad_z`` as a loop over ``B``: no atomics). The noise is
``lpc_kernels.philox``'s function (``docs/design.md``, "Random numbers").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..philox import GUMBEL_U_MAX, GUMBEL_U_MIN, UNIFORM_SCALE
from ._common import _INTERPRET, INTERPRET, cast_out, compute_dtype, device_guard, next_pow2, scalar_args

MAX_K = 65536  # one tile holds a row's K codes: BLOCK_B * BLOCK_K <= 2**20 elements (Triton's limit)

INTERPRET_BLOCK_B = 16
INTERPRET_BLOCK_D = 256

# Triton kernels may only read module globals that are constexprs
_U_SCALE = tl.constexpr(UNIFORM_SCALE)
_U_MIN = tl.constexpr(GUMBEL_U_MIN)
_U_MAX = tl.constexpr(GUMBEL_U_MAX)


@triton.jit
def _gumbel_noise(seed, counters):
    """fp32 Gumbel(0, 1) noise for int64 ``counters``: ``lpc_kernels.philox.gumbel_noise`` in Triton. The counter
    words go to ``tl.philox`` as uint32 (not an int64 offset through ``tl.rand``, whose 64-bit handling has
    differed between Triton releases)."""
    lo = (counters & 0xFFFFFFFF).to(tl.uint32)
    hi = ((counters >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = lo * 0
    x, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    xi = x.to(tl.int32, bitcast=True)
    xi = tl.where(xi < 0, -xi - 1, xi)  # ~x for negatives: the fold tl.rand uses
    u = xi.to(tl.float32) * _U_SCALE
    u = tl.minimum(tl.maximum(u, _U_MIN), _U_MAX)
    if _INTERPRET:  # numpy's float32 log (the interpreter has no libdevice.log)
        return -tl.log(-tl.log(u))
    else:  # libdevice logf: what torch.log runs on CUDA, whatever lowering tl.log gets
        return -libdevice.log(-libdevice.log(u))


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_fwd_kernel(
    logits_ptr, e_ptr, w_ptr, soft_ptr, z_ptr,
    B, K, D, seed, offset, tau, scal_ptr,
    HARD: tl.constexpr, F64_SCALARS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    CDT: tl.constexpr = w_ptr.dtype.element_ty
    if F64_SCALARS:
        tau = tl.load(scal_ptr)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    r_mask = rows < B
    mask = r_mask[:, None] & (cols[None, :] < K)
    idx = rows.to(tl.int64)[:, None] * K + cols[None, :]  # also the Philox counter, less the offset
    x = tl.load(logits_ptr + idx, mask=mask, other=0.0).to(CDT)
    noise = _gumbel_noise(seed, offset + idx)
    y = (x + noise.to(CDT)) / tau
    k_mask = (cols < K)[None, :]
    y = tl.where(k_mask, y, float("-inf"))  # padded rows keep finite values: no NaN anywhere
    y = y - tl.max(y, axis=1)[:, None]
    e = tl.where(k_mask, tl.exp(y), 0.0)
    soft = e / tl.sum(e, axis=1)[:, None]
    if HARD:
        best = tl.argmax(soft, axis=1, tie_break_left=True)  # first maximum, like torch.argmax
        w = tl.where(cols[None, :] == best[:, None], 1.0, 0.0).to(CDT)
        tl.store(soft_ptr + idx, soft, mask=mask)
    else:
        w = soft
    tl.store(w_ptr + idx, w, mask=mask)
    # z = w @ E, D in BLOCK_D column tiles (padded rows/columns of w are exact zeros)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        e_t = tl.load(e_ptr + cols.to(tl.int64)[:, None] * D + offs_d[None, :],
                      mask=(cols[:, None] < K) & d_mask[None, :], other=0.0).to(CDT)
        z = tl.dot(w, e_t, input_precision=DOT_PREC, out_dtype=CDT)
        tl.store(z_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], cast_out(z, z_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _gumbel_bwd_kernel(
    gw_ptr, gz_ptr, w_ptr, soft_ptr, e_ptr, g_logits_ptr, g_e_ptr,
    B, K, D, tau, scal_ptr, n_logit_programs,
    F64_SCALARS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KC: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_BC: tl.constexpr,
):
    CDT: tl.constexpr = w_ptr.dtype.element_ty
    if F64_SCALARS:
        tau = tl.load(scal_ptr)
    pid = tl.program_id(0)
    if pid < n_logit_programs:  # 0 logits programs unless grad_logits is needed; the rest: codebook
        # grad_logits for BLOCK_B rows
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_K)
        r_mask = rows < B
        k_mask = cols < K
        mask = r_mask[:, None] & k_mask[None, :]
        idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
        g = tl.load(gw_ptr + idx, mask=mask, other=0.0).to(CDT)
        for d0 in range(0, D, BLOCK_D):  # g += grad_z @ E.T
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            gz = tl.load(gz_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                         mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(CDT)
            e_t = tl.load(e_ptr + cols.to(tl.int64)[None, :] * D + offs_d[:, None],
                          mask=d_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)  # E.T tile [BLOCK_D, BLOCK_K]
            g = tl.dot(gz, e_t, g, input_precision=DOT_PREC, out_dtype=CDT)
        soft = tl.load(soft_ptr + idx, mask=mask, other=0.0).to(CDT)
        dot_gs = tl.sum(g * soft, axis=1)
        tl.store(g_logits_ptr + idx, soft * (g - dot_gs[:, None]) / tau, mask=mask)
    else:
        # grad_E[k block, d block] = sum over B of w.T @ grad_z
        cpid = pid - n_logit_programs
        num_d = tl.cdiv(D, BLOCK_DC)
        offs_k = (cpid // num_d) * BLOCK_KC + tl.arange(0, BLOCK_KC)
        offs_d = (cpid % num_d) * BLOCK_DC + tl.arange(0, BLOCK_DC)
        k_mask = offs_k < K
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_KC, BLOCK_DC], CDT)
        for b0 in range(0, B, BLOCK_BC):
            offs_b = b0 + tl.arange(0, BLOCK_BC)
            b_mask = offs_b < B
            w_t = tl.load(w_ptr + offs_b.to(tl.int64)[None, :] * K + offs_k[:, None],
                          mask=k_mask[:, None] & b_mask[None, :], other=0.0).to(CDT)  # w.T tile [BLOCK_KC, BLOCK_BC]
            gz = tl.load(gz_ptr + offs_b.to(tl.int64)[:, None] * D + offs_d[None, :],
                         mask=b_mask[:, None] & d_mask[None, :], other=0.0).to(CDT)
            acc = tl.dot(w_t, gz, acc, input_precision=DOT_PREC, out_dtype=CDT)
        tl.store(g_e_ptr + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :], cast_out(acc, g_e_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & d_mask[None, :])


def _check_k(k: int) -> None:
    if k > MAX_K:
        raise ValueError(f"the triton backend supports at most K = {MAX_K} codes (one tile per row), got {k}")


def _fwd_blocks(k: int, d: int):
    block_k = max(16, next_pow2(k))  # tl.dot needs every dim >= 16
    if INTERPRET:
        return INTERPRET_BLOCK_B, block_k, min(INTERPRET_BLOCK_D, max(16, next_pow2(d)))
    block_b = 16
    block_d = max(16, min(128, 8192 // block_k, next_pow2(d)))  # [BLOCK_K, BLOCK_D] codebook tile <= 8k
    return block_b, block_k, block_d


def gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset):
    b, k = logits.shape
    d = codebook.shape[1]
    _check_k(k)
    cdt = compute_dtype(logits)
    weights = torch.empty(b, k, dtype=cdt, device=logits.device)
    soft = torch.empty(b, k, dtype=cdt, device=logits.device) if hard else None
    z = torch.empty(b, d, dtype=codebook.dtype, device=logits.device)
    block_b, block_k, block_d = _fwd_blocks(k, d)
    scal, f64 = scalar_args(cdt, logits.device, tau)
    with device_guard(logits):
        _gumbel_fwd_kernel[(triton.cdiv(b, block_b),)](
            logits, codebook, weights, soft if hard else weights, z, b, k, d, int(seed), int(offset), float(tau),
            scal if f64 else weights, HARD=bool(hard), F64_SCALARS=f64, DOT_PREC="ieee", BLOCK_B=block_b,
            BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4 if block_k <= 256 else 8)
    return weights, z, soft


def gumbel_softmax_bwd(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook):
    soft = weights if soft is None else soft
    b, k = weights.shape
    d = codebook.shape[1]
    _check_k(k)
    cdt = soft.dtype
    g_logits = torch.empty(b, k, dtype=cdt, device=weights.device) if need_logits else None
    g_codebook = torch.empty(k, d, dtype=codebook.dtype, device=weights.device) if need_codebook else None
    if not (need_logits or need_codebook):
        return g_logits, g_codebook
    block_b, block_k, block_d = _fwd_blocks(k, d)
    block_kc = max(16, min(64, next_pow2(k)))
    block_dc = max(16, min(256 if INTERPRET else 64, next_pow2(d)))
    block_bc = 64 if INTERPRET else 32
    n_logit = triton.cdiv(b, block_b) if need_logits else 0
    n_code = triton.cdiv(k, block_kc) * triton.cdiv(d, block_dc) if need_codebook else 0
    scal, f64 = scalar_args(cdt, weights.device, tau)
    with device_guard(weights):
        _gumbel_bwd_kernel[(n_logit + n_code,)](
            grad_weights.contiguous(), grad_z.contiguous(), weights, soft, codebook,
            g_logits if g_logits is not None else soft, g_codebook if g_codebook is not None else codebook,
            b, k, d, float(tau), scal if f64 else soft, n_logit, F64_SCALARS=f64, DOT_PREC="ieee",
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_KC=block_kc,
            BLOCK_DC=block_dc, BLOCK_BC=block_bc, num_warps=4 if block_k <= 256 else 8)
    return g_logits, g_codebook
