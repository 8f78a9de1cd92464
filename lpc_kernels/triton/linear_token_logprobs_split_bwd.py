"""The fused LM head's ``split`` backward (the default): deterministic, no atomics, no fp32 ``[V, H]`` buffer.

Per ``V`` chunk: ``_lin_dlogits_kernel`` writes the logits gradient ``D[:, chunk]`` (and per row block the
column sums for ``grad_b``), then ``_mm_kernel`` forms ``grad_W[chunk] = D.T @ h`` and
``grad_h (+)= D @ W[chunk]``, each output tile owned by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear_token_logprobs_configs as configs
from ._common import INTERPRET, cast_out, compute_dtype, grouped_tile, launch, next_pow2, tuned
from .linear_token_logprobs_tiles import dlogits_tile, dot_flags, even_h


@tuned(configs.DLOGITS_CONFIGS + configs.DLOGITS_CONFIGS_F64, key=["V", "H", "NEED_B", "STORE_D"],
       quick=configs.DLOGITS_QUICK,
       prune_configs_by=configs.prune_by_dtype(configs.DLOGITS_CONFIGS_F64, configs.recompute_smem))
@even_h
@triton.jit
def _lin_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, d_ptr, db_ptr,
    NV, V, H, v0, VC, stride_h, stride_w, stride_d, stride_db,
    HAS_BIAS: tl.constexpr, NEED_B: tl.constexpr, STORE_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """``D[:, :VC] = g (onehot - exp(x - lse))`` for columns ``v0 .. v0 + VC``.

    ``D`` rows are the compacted rows (``rows``), stored in ``d_ptr``'s dtype; ``db[pid_n, :]`` gets the
    fp32 column sums of this program's rows (``grad_b``, summed over row blocks on the host).
    """
    CDT: tl.constexpr = db_ptr.dtype.element_ty  # fp32 (fp64 for fp64 inputs)
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(NV, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    c_mask = offs_c < VC  # the host keeps v0 + VC <= V
    _, mask, d = dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr,
                              offs_n, n_mask, v0 + offs_c, c_mask, NV, V, H, stride_h, stride_w,
                              HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    if NEED_B:
        tl.store(db_ptr + pid_n.to(tl.int64) * stride_db + offs_c, tl.sum(d, axis=0), mask=c_mask)
    if STORE_D:
        tl.store(d_ptr + offs_n.to(tl.int64)[:, None] * stride_d + offs_c[None, :],
                 cast_out(d, d_ptr.dtype.element_ty), mask=mask)


@tuned(configs.MM_CONFIGS + configs.MM_CONFIGS_F64, key=["MB", "N", "KB", "ACCUM"], quick=configs.MM_QUICK,
       prune_configs_by=configs.prune_by_dtype(configs.MM_CONFIGS_F64, configs.mm_smem, ptr="a_ptr"),
       restore_value=["c_ptr"])  # ACCUM reads C: every trial must start from the same accumulator
@triton.heuristics({"EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0,
                    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
                    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, MB, KB,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUM: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``C = A @ B`` (``C += A @ B`` with ``ACCUM``), any strides, fp32 accumulation (fp64 for fp64 A),
    rounded once into ``C``'s dtype. Each output tile belongs to one program: deterministic.

    ``MB``, ``KB``: power-of-two buckets of ``M``, ``K``, only part of the autotune key. Loads are masked
    only along a ragged dimension (``EVEN_*``), never clamped: either operand may be contiguous along
    ``M`` / ``N`` (``A = D.T`` for grad_W), and clamped offsets would lose the contiguity the vectorised,
    pipelined loads need.
    """
    F64: tl.constexpr = a_ptr.dtype.element_ty == tl.float64
    CDT: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = tl.max_contiguous(tl.multiple_of(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), BLOCK_M), BLOCK_M)
    offs_n = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUM:  # start from C: loaded into the accumulator's registers (an epilogue load would spill)
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0).to(CDT)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], CDT)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        if EVEN_M and EVEN_K:
            a = tl.load(a_ptrs)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        elif EVEN_M:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if EVEN_N and EVEN_K:
            b = tl.load(b_ptrs)
        elif EVEN_K:
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        elif EVEN_N:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # interpreter: no 16-bit arithmetic there
            a = a.to(CDT)
            b = b.to(CDT)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=CDT)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=c_mask)


def _chunk_v(nv: int, v: int) -> int:
    """Columns of ``V`` per chunk: ``D_CHUNK_ELEMS / nv`` on tile edges, >= 1024."""
    if INTERPRET:
        return min(v, configs.INTERPRET_CHUNK_V)
    c = max(1024, (configs.D_CHUNK_ELEMS // max(nv, 1)) // configs.MAX_BLOCK_V * configs.MAX_BLOCK_V)
    return v if c >= v else c


def _launched_meta(kernel, interpret_config: dict) -> dict:
    """The block sizes of ``kernel``'s last launch: the interpreter's config, or the autotuner's choice."""
    return interpret_config if INTERPRET else kernel.best_config.kwargs


def _mm(a, b, c, m, n, k, strides_a, strides_b, strides_c, accum, prec, upcast, interpret_config):
    """``c (+)= a @ b`` through ``_mm_kernel`` (``a [m, k]``, ``b [k, n]`` given by their strides)."""
    launch(_mm_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
           (a, b, c, m, n, k, next_pow2(m), next_pow2(k), *strides_a, *strides_b, *strides_c, bool(accum), prec,
            upcast), interpret_config)


def split_backward(g, hidden, weight, bias, rows, labels, lse, need_hidden, need_weight, need_bias):
    """Per V chunk: D, then grad_W[chunk] = D.T @ h, then grad_h += D @ W[chunk].

    Returns (grad_h, grad_W, grad_b) in the input dtypes (None where not needed).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    nv = rows.numel()
    dev = hidden.device
    cdt = compute_dtype(hidden)
    prec, upcast = dot_flags(hidden)
    # D in the input dtype: the tensor-core operand of the gradient products (fp32 / fp64 stay exact)
    d_dtype = hidden.dtype
    chunk = _chunk_v(nv, v)
    n_chunks = triton.cdiv(v, chunk)
    all_rows = nv == n  # no ignored row: rows == arange(n), no gather / scatter
    store_d = need_hidden or need_weight
    d_buf = torch.empty(nv, chunk, dtype=d_dtype, device=dev) if store_d else None
    # per row block column sums of D for grad_b; 16 = the smallest BLOCK_N of any config
    db_part = torch.empty(triton.cdiv(nv, 16), chunk, dtype=cdt, device=dev) if need_bias else None
    h_rows = hidden if all_rows else hidden.index_select(0, rows)  # the B operand of grad_W = D.T @ h
    gw = torch.empty(v, h, dtype=weight.dtype, device=dev) if need_weight else None
    gb = torch.empty(v, dtype=cdt, device=dev) if need_bias else None
    gh_acc = None
    if need_hidden:  # fp32 accumulator over chunks; the output dtype directly when there is one chunk
        gh_acc = torch.empty(nv, h, dtype=cdt if n_chunks > 1 else hidden.dtype, device=dev)
    dummy = torch.empty(1, dtype=cdt, device=dev)  # never read: stands for D / db when not stored
    for ci in range(n_chunks):
        v0 = ci * chunk
        vc = min(chunk, v - v0)
        launch(_lin_dlogits_kernel,
               lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),),
               (hidden, weight, bias if bias is not None else hidden, rows, labels, lse, g,
                d_buf if store_d else dummy, db_part if need_bias else dummy,
                nv, v, h, v0, vc, hidden.stride(0), weight.stride(0), chunk, chunk,
                bias is not None, bool(need_bias), bool(store_d), prec, upcast),
               configs.INTERPRET_DLOGITS)
        if need_bias:  # the row blocks of the config that ran (tuning trials may have written more rows)
            blocks = triton.cdiv(nv, _launched_meta(_lin_dlogits_kernel, configs.INTERPRET_DLOGITS)["BLOCK_N"])
            gb[v0:v0 + vc] = db_part[:blocks, :vc].sum(0)  # fixed order: deterministic
        if need_weight:  # grad_W[chunk] = D[:, chunk].T @ h: [vc, nv] @ [nv, h]
            _mm(d_buf, h_rows, gw[v0:v0 + vc], vc, h, nv, (1, chunk), (h_rows.stride(0), h_rows.stride(1)),
                (gw.stride(0), gw.stride(1)), False, prec, upcast, configs.INTERPRET_MM_DW)
        if need_hidden:  # grad_h (+)= D[:, chunk] @ W[chunk]: [nv, vc] @ [vc, h]
            w_c = weight[v0:v0 + vc]
            _mm(d_buf, w_c, gh_acc, nv, h, vc, (chunk, 1), (w_c.stride(0), w_c.stride(1)),
                (gh_acc.stride(0), gh_acc.stride(1)), ci > 0, prec, upcast, configs.INTERPRET_MM_DH)
    gh = None
    if need_hidden:
        if all_rows:
            gh = gh_acc.to(hidden.dtype)
        else:
            gh = torch.zeros(n, h, dtype=hidden.dtype, device=dev)
            gh.index_copy_(0, rows, gh_acc.to(hidden.dtype))
    return gh, gw, (gb.to(bias.dtype) if gb is not None else None)
