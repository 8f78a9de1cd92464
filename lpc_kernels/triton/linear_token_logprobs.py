"""Triton ``linear_token_logprobs``: log p(label) straight from the LM head, Cut-Cross-Entropy style.

With ``x = h @ W.T + b`` the op returns ``logp_i = x[i, label_i] - lse_i`` and never stores ``x`` in global
memory. The design (``docs/design.md`` section 6, "The fused LM head"), in short:

* Forward (``_lin_fwd_kernel`` + ``_lin_combine_kernel``): ignored rows compacted away on the host; program
  ``(row block, V split)`` walks its split in ``BLOCK_V`` tiles (``tl.dot`` over ``H``) with an online
  log-sum-exp; the splits' partial ``(lse, target)`` are combined without atomics.
* Backward, ``D = g (onehot - softmax)``: ``split`` (default, deterministic): per ``V`` chunk, the logits
  gradient ``D[:, chunk]`` (``_lin_dlogits_kernel``) then ``grad_W[chunk] = D.T @ h`` and
  ``grad_h += D @ W[chunk]`` (``_mm_kernel``); ``atomic`` (``$LPC_TRITON_LINEAR_BWD=atomic``, CCE's scheme):
  one kernel scattering both products with fp32 atomics.
* ``filter_eps > 0`` (opt-in): tiles holding no label whose softmax entries are all below it are skipped; the
  error bound is in ``docs/design.md`` section 2.
* Every kernel is autotuned on the GPU, keyed on ``V`` and ``H`` (never on ``N``); ``LPC_TRITON_AUTOTUNE_LOG``
  records the winners (``_common.write_autotune_log``).

``chunk_size`` (rows per materialised ``[chunk, V]`` block in the chunked backends) is accepted for the shared
signature and ignored: the split backward sizes its own ``V`` chunks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (AUTOTUNE, INTERPRET, cast_out, compute_dtype, device_guard, dot_precision, grouped_tile, launch, next_pow2,
                      prune_smem, sm_count, tuned)

# Interpreter configs: wide in V (few loop steps), the minimum 16 rows tl.dot allows.
INTERPRET_FWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64}
INTERPRET_BWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64, "BLOCK_HB": 32, "GROUP_N": 4}
INTERPRET_DLOGITS = {"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_H": 64, "GROUP_N": 4}
INTERPRET_MM_DW = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}  # grad_W = D.T @ h (M = V chunk)
INTERPRET_MM_DH = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}  # grad_h += D @ W (K = V chunk)
INTERPRET_SPLITS = 2  # > 1 so that the split/combine path runs in every interpreter test with V > BLOCK_V
INTERPRET_CHUNK_V = 512  # split backward: V = 1100 gives 3 chunks (the accumulate path) in the tests

BWD_VARIANTS = ("split", "atomic")
DEFAULT_BWD_VARIANT = "split"
D_CHUNK_ELEMS = 1 << 27  # split backward: at most this many D entries per V chunk (256 MiB in bf16)

_MAX_BLOCK_V = 256  # the largest BLOCK_V in the GPU configs: split boundaries are multiples of it


def _configs(tiles, blocks, **fixed):
    """A ``triton.Config`` per ``(*block sizes, num_warps, num_stages)`` tuple of ``tiles``: the block sizes
    under the names ``blocks``, then the ``fixed`` meta-parameters."""
    return [triton.Config({**dict(zip(blocks, t[:-2])), **fixed}, num_warps=t[-2], num_stages=t[-1]) for t in tiles]


# block-size names of the tile tuples: the logits recompute, the gradient products, the atomic backward
_RECOMPUTE = ("BLOCK_N", "BLOCK_V", "BLOCK_H")
_MM = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_BWD = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_HB")
# Hopper (H100/H200), bf16/fp16: 128x128 / 128x256 tiles with a 64-wide K step are the wgmma sweet spot.
# Lists pruned to what fits shared memory (``num_stages`` copies of both operand tiles), so fp32 inputs
# ("ieee" dots, 4-byte tiles) keep the smaller ones. (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages):
_RECOMPUTE_TILES = (
    (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (64, 256, 64, 4, 4), (128, 128, 64, 4, 5), (64, 128, 64, 4, 4), (128, 256, 32, 8, 5),
)
_FWD_CONFIGS = _configs(_RECOMPUTE_TILES, _RECOMPUTE)
# the split backward's logits-gradient kernel: the forward's tile loop plus an elementwise epilogue and a store
_DLOGITS_CONFIGS = _configs(_RECOMPUTE_TILES, _RECOMPUTE, GROUP_N=8)
# the split backward's gradient products: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_MM_CONFIGS = _configs((
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 5),
    (64, 128, 32, 4, 4),  # the one that fits shared memory with fp32 operands too
), _MM, GROUP_M=8)
# BLOCK_HB: the H step of the atomic kernel's scatter phase (D_tile @ W, D_tile.T @ h, atomics), a divisor
# of BLOCK_H. Narrower than the recompute's K step because each step holds an fp32 [BLOCK, BLOCK_HB] result
# and a block of 64-bit atomic addresses in registers. Spills per thread in the sm_90 ptxas build (bf16,
# cuobjdump): 0.5-1.7 KiB with BLOCK_HB = 64, 56-600 bytes with 32 or 16 (80 bytes for the first config).
_BWD_CONFIGS = _configs((
    (128, 128, 64, 16, 8, 3), (128, 128, 64, 32, 8, 3), (64, 256, 64, 32, 8, 3), (128, 64, 64, 32, 4, 3),
    (64, 128, 64, 32, 4, 3), (128, 256, 64, 16, 8, 3), (64, 64, 64, 32, 4, 4), (128, 128, 64, 32, 8, 4),
), _BWD, GROUP_N=8)
# fp64: 8-byte tiles; the lists above exceed shared memory (and registers) in fp64
_F64_TILES = ((32, 64, 32, 4, 2), (64, 64, 32, 4, 2), (32, 32, 32, 4, 2))
_FWD_CONFIGS_F64 = _configs(_F64_TILES, _RECOMPUTE)
_DLOGITS_CONFIGS_F64 = _configs(_F64_TILES, _RECOMPUTE, GROUP_N=8)
_MM_CONFIGS_F64 = _configs(_F64_TILES, _MM, GROUP_M=8)
_BWD_CONFIGS_F64 = _configs(((32, 64, 32, 32, 4, 2), (32, 32, 32, 32, 4, 2)), _BWD, GROUP_N=8)  # BLOCK_HB = BLOCK_H


def _recompute_smem(c, elem):  # the pipelined h and W.T tiles of the logits recompute
    k = c.kwargs
    return c.num_stages * (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_H"] * elem


def _mm_smem(c, elem):
    k = c.kwargs
    return c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem


def _prune(f64_configs, smem_bytes, ptr="h_ptr"):
    """``early_config_prune``: the fp64 list for fp64 inputs, the others otherwise; then what fits shared
    memory for the operands' element size (never empty); with ``LPC_TRITON_AUTOTUNE=0`` only the first of
    those (the ``quick`` lists hold one config per dtype family that fits, after the preferred one)."""
    f64 = set(f64_configs)
    fits = prune_smem(smem_bytes)

    def prune(configs, nargs, **kwargs):
        t = nargs[ptr]
        is_f64 = t.dtype == torch.float64
        family = [c for c in configs if (c in f64) == is_f64] or list(configs)
        kept = fits(family, nargs, t.element_size())
        return kept if AUTOTUNE else kept[:1]

    return {"early_config_prune": prune}


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
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
def _dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, offs_n, n_mask, offs_v, v_mask,
                  NV, V, H, stride_h, stride_w,
                  HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  CDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``(rows, mask, d, p, is_label)`` for one tile: ``D = g (onehot - p)``, ``p = exp(x - lse)``, both zero
    outside ``mask``; ``rows`` are the original rows of the compacted rows ``offs_n``."""
    rows = tl.load(rows_ptr + tl.minimum(offs_n, NV - 1)).to(tl.int64)  # padded rows: the last valid row
    labels = tl.load(labels_ptr + rows)
    lse = tl.load(lse_ptr + rows).to(CDT)  # a real lse: exp(x - lse) stays <= 1 on padded rows too
    g = tl.load(grad_ptr + rows).to(CDT)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
                     HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    mask = n_mask[:, None] & v_mask[None, :]
    p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
    is_label = offs_v[None, :] == labels[:, None]
    d = g[:, None] * (tl.where(is_label, 1.0, 0.0) - p)  # fp32: the true-class 1 - p does not cancel
    d = tl.where(mask, d, 0.0)
    return rows, mask, d, p, is_label


@triton.jit
def _tile_kept(mask, p, is_label, filter_eps):
    """The gradient filter (module docstring): whether a tile holds a row's label or any ``p >= filter_eps``."""
    holds_label = tl.max(tl.where(is_label & mask, 1, 0)) > 0
    return holds_label | (tl.max(p) >= filter_eps)


_EVEN_H = triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})


@tuned(_FWD_CONFIGS + _FWD_CONFIGS_F64, key=["V", "H"], quick=[_FWD_CONFIGS[0], _FWD_CONFIGS[6], _FWD_CONFIGS_F64[0]],
       prune_configs_by=_prune(_FWD_CONFIGS_F64, _recompute_smem))
@_EVEN_H
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
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
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


@tuned(_BWD_CONFIGS + _BWD_CONFIGS_F64, key=["V", "H", "FILTER", "NEED_H", "NEED_W"],
       quick=[_BWD_CONFIGS[0], _BWD_CONFIGS_F64[0]], prune_configs_by=_prune(_BWD_CONFIGS_F64, _recompute_smem),
       reset_to_zero=["gh_ptr", "gw_ptr", "gb_ptr"])  # the atomics accumulate: zero them between trials
@_EVEN_H
@triton.jit
def _lin_bwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, gh_ptr, gw_ptr, gb_ptr,
    NV, V, H, stride_h, stride_w, stride_gh, stride_gw, filter_eps,
    HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    FILTER: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    rows, mask, d, p, is_label = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr,
                                               offs_n, n_mask, offs_v, v_mask, NV, V, H, stride_h, stride_w,
                                               HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    keep = True
    if FILTER:
        keep = _tile_kept(mask, p, is_label, filter_eps)
    if keep:
        if NEED_B:
            tl.atomic_add(gb_ptr + offs_v, tl.sum(d, axis=0).to(CDT), mask=v_mask, sem="relaxed")
        if NEED_H or NEED_W:
            if UPCAST:
                d_op = d
            else:  # tensor-core operands: D rounded to the input dtype (no-op for fp32/fp64)
                d_op = d.to(h_ptr.dtype.element_ty)
            h_rows = h_ptr + rows[:, None] * stride_h
            w_rows = w_ptr + tl.minimum(offs_v, V - 1).to(tl.int64)[:, None] * stride_w  # clamped, as above
            # two passes over H in BLOCK_HB steps, not one pass: each keeps one [BLOCK, BLOCK_HB] result and
            # one block of atomic addresses live (see _BWD_CONFIGS). Operands unmasked but for a ragged H
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



@tuned(_DLOGITS_CONFIGS + _DLOGITS_CONFIGS_F64, key=["V", "H", "FILTER", "NEED_B", "STORE_D"],
       quick=[_DLOGITS_CONFIGS[0], _DLOGITS_CONFIGS[6], _DLOGITS_CONFIGS_F64[0]],
       prune_configs_by=_prune(_DLOGITS_CONFIGS_F64, _recompute_smem))
@_EVEN_H
@triton.jit
def _lin_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr, d_ptr, db_ptr,
    NV, V, H, v0, VC, stride_h, stride_w, stride_d, stride_db, filter_eps,
    HAS_BIAS: tl.constexpr, NEED_B: tl.constexpr, STORE_D: tl.constexpr, FILTER: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Split backward, step 1: ``D[:, :VC] = g (onehot - exp(x - lse))`` for columns ``v0 .. v0 + VC``.

    ``D`` rows are the compacted rows (``rows``), stored in ``d_ptr``'s dtype; ``db[pid_n, :]`` gets the
    fp32 column sums of this program's rows (``grad_b``, summed over row blocks on the host).
    """
    CDT: tl.constexpr = db_ptr.dtype.element_ty  # fp32 (fp64 for fp64 inputs)
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(NV, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    c_mask = offs_c < VC  # the host keeps v0 + VC <= V
    _, mask, d, p, is_label = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, lse_ptr, grad_ptr,
                                            offs_n, n_mask, v0 + offs_c, c_mask, NV, V, H, stride_h, stride_w,
                                            HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    if FILTER:  # the whole tile becomes zeros (see the module docstring for the error bound)
        d = tl.where(_tile_kept(mask, p, is_label, filter_eps), d, 0.0)
    if NEED_B:
        tl.store(db_ptr + pid_n.to(tl.int64) * stride_db + offs_c, tl.sum(d, axis=0), mask=c_mask)
    if STORE_D:
        tl.store(d_ptr + offs_n.to(tl.int64)[:, None] * stride_d + offs_c[None, :],
                 cast_out(d, d_ptr.dtype.element_ty), mask=mask)


@tuned(_MM_CONFIGS + _MM_CONFIGS_F64, key=["MB", "N", "KB", "ACCUM"], quick=[_MM_CONFIGS[0], _MM_CONFIGS[-1], _MM_CONFIGS_F64[0]],
       prune_configs_by=_prune(_MM_CONFIGS_F64, _mm_smem, ptr="a_ptr"),
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


def _splits(nv: int, v: int, device_sms: int) -> tuple[int, int]:
    """(number of V splits, columns per split) for the forward grid ``(cdiv(nv, BLOCK_N), splits)``."""
    if INTERPRET:
        block_v = INTERPRET_FWD["BLOCK_V"]
        splits = max(1, min(INTERPRET_SPLITS, triton.cdiv(v, block_v)))
    else:
        block_v = _MAX_BLOCK_V
        row_blocks = triton.cdiv(nv, 128)
        # about two waves of programs, each split still >= 8 tiles wide so the merge stays negligible
        splits = max(1, min(triton.cdiv(2 * device_sms, row_blocks), triton.cdiv(v, 8 * block_v), 64))
    per_split = triton.cdiv(triton.cdiv(v, splits), block_v) * block_v  # split edges on tile edges
    return triton.cdiv(v, per_split), per_split


def _flags(hidden: torch.Tensor):
    return dot_precision(hidden.dtype), INTERPRET


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # one host sync; the grid size depends on it (ignored rows never reach a kernel)
    return torch.nonzero(labels != ignore_index).squeeze(1)


def linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index, chunk_size):
    """``chunk_size`` is ignored: no ``[rows, V]`` block is ever materialised (see module docstring)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden)
    logp = torch.zeros(n, dtype=cdt, device=hidden.device)
    lse = torch.zeros(n, dtype=cdt, device=hidden.device)
    rows = _valid_rows(labels, ignore_index)
    nv = rows.numel()
    if nv == 0:  # all rows ignored: zeros, no launch
        return logp, lse
    splits, per_split = _splits(nv, v, sm_count(hidden))
    part_lse = torch.empty(splits, nv, dtype=cdt, device=hidden.device)
    part_tgt = torch.empty(splits, nv, dtype=cdt, device=hidden.device)
    prec, upcast = _flags(hidden)
    b = bias if bias is not None else hidden  # dummy pointer, never read (HAS_BIAS=False)
    with device_guard(hidden):
        launch(_lin_fwd_kernel, lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]), splits),
               (hidden, weight, b, rows, labels, part_lse, part_tgt, nv, v, h, hidden.stride(0), weight.stride(0),
                per_split, bias is not None, prec, upcast), INTERPRET_FWD)
        block_n = 64 if INTERPRET else 128
        _lin_combine_kernel[(triton.cdiv(nv, block_n),)](
            part_lse, part_tgt, rows, logp, lse, nv, splits, BLOCK_N=block_n, BLOCK_S=next_pow2(splits))
    return logp, lse


def bwd_variant(variant: str | None = None) -> str:
    """The backward variant: ``variant`` if given, else ``$LPC_TRITON_LINEAR_BWD`` (read at every call),
    else :data:`DEFAULT_BWD_VARIANT`."""
    v = variant if variant is not None else (os.environ.get("LPC_TRITON_LINEAR_BWD", "").strip().lower()
                                            or DEFAULT_BWD_VARIANT)
    if v not in BWD_VARIANTS:
        raise ValueError(f"LPC_TRITON_LINEAR_BWD / variant must be one of {BWD_VARIANTS}, got {v!r}")
    return v


def _chunk_v(nv: int, v: int) -> int:
    """Columns of ``V`` per chunk of the split backward: ``D_CHUNK_ELEMS / nv`` on tile edges, >= 1024."""
    if INTERPRET:
        return min(v, INTERPRET_CHUNK_V)
    c = max(1024, (D_CHUNK_ELEMS // max(nv, 1)) // _MAX_BLOCK_V * _MAX_BLOCK_V)
    return v if c >= v else c


def _launched_meta(kernel, interpret_config: dict) -> dict:
    """The block sizes of ``kernel``'s last launch: the interpreter's config, or the autotuner's choice."""
    return interpret_config if INTERPRET else kernel.best_config.kwargs


def _mm(a, b, c, m, n, k, strides_a, strides_b, strides_c, accum, prec, upcast, interpret_config):
    """``c (+)= a @ b`` through ``_mm_kernel`` (``a [m, k]``, ``b [k, n]`` given by their strides)."""
    launch(_mm_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
           (a, b, c, m, n, k, next_pow2(m), next_pow2(k), *strides_a, *strides_b, *strides_c, bool(accum), prec,
            upcast), interpret_config)


def _bwd_split(g, hidden, weight, bias, rows, labels, lse, need_hidden, need_weight, need_bias, filter_eps):
    """The split backward (module docstring): per V chunk, D, then grad_W[chunk], then grad_h += D @ W[chunk].

    Returns (grad_h, grad_W, grad_b) in the input dtypes (None where not needed).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    nv = rows.numel()
    dev = hidden.device
    cdt = compute_dtype(hidden)
    prec, upcast = _flags(hidden)
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
                nv, v, h, v0, vc, hidden.stride(0), weight.stride(0), chunk, chunk, filter_eps,
                bias is not None, bool(need_bias), bool(store_d), filter_eps > 0.0, prec, upcast),
               INTERPRET_DLOGITS)
        if need_bias:  # the row blocks of the config that ran (tuning trials may have written more rows)
            blocks = triton.cdiv(nv, _launched_meta(_lin_dlogits_kernel, INTERPRET_DLOGITS)["BLOCK_N"])
            gb[v0:v0 + vc] = db_part[:blocks, :vc].sum(0)  # fixed order: deterministic
        if need_weight:  # grad_W[chunk] = D[:, chunk].T @ h: [vc, nv] @ [nv, h]
            _mm(d_buf, h_rows, gw[v0:v0 + vc], vc, h, nv, (1, chunk), (h_rows.stride(0), h_rows.stride(1)),
                (gw.stride(0), gw.stride(1)), False, prec, upcast, INTERPRET_MM_DW)
        if need_hidden:  # grad_h (+)= D[:, chunk] @ W[chunk]: [nv, vc] @ [vc, h]
            w_c = weight[v0:v0 + vc]
            _mm(d_buf, w_c, gh_acc, nv, h, vc, (chunk, 1), (w_c.stride(0), w_c.stride(1)),
                (gh_acc.stride(0), gh_acc.stride(1)), ci > 0, prec, upcast, INTERPRET_MM_DH)
    gh = None
    if need_hidden:
        if all_rows:
            gh = gh_acc.to(hidden.dtype)
        else:
            gh = torch.zeros(n, h, dtype=hidden.dtype, device=dev)
            gh.index_copy_(0, rows, gh_acc.to(hidden.dtype))
    return gh, gw, (gb.to(bias.dtype) if gb is not None else None)


def _bwd_atomic(g, hidden, weight, bias, rows, labels, lse, need_hidden, need_weight, need_bias, filter_eps):
    """The atomic backward (module docstring): one kernel, fp32 atomics into fp32 [N, H] and [V, H]."""
    n, h = hidden.shape
    v = weight.shape[0]
    nv = rows.numel()
    cdt = compute_dtype(hidden)
    dev = hidden.device
    gh = torch.zeros(n, h, dtype=cdt, device=dev) if need_hidden else None
    gw = torch.zeros(v, h, dtype=cdt, device=dev) if need_weight else None
    gb = torch.zeros(v, dtype=cdt, device=dev) if need_bias else None
    dummy = torch.empty(1, dtype=cdt, device=dev)  # stands for an accumulator not asked for: never read
    prec, upcast = _flags(hidden)
    g_h, g_w, g_b = (gh if gh is not None else dummy, gw if gw is not None else dummy,
                     gb if gb is not None else dummy)
    launch(_lin_bwd_kernel,
           lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),),
           (hidden, weight, bias if bias is not None else hidden, rows, labels, lse, g,
            g_h, g_w, g_b, nv, v, h, hidden.stride(0), weight.stride(0), h, h, filter_eps,
            bias is not None, bool(need_hidden), bool(need_weight), bool(need_bias), filter_eps > 0.0, prec,
            upcast), INTERPRET_BWD)
    return (gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None)


def linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size,
                              need_hidden, need_weight, need_bias, *, filter_eps=0.0):
    """Gradients for hidden, weight, bias (None where not needed), by the variant ``$LPC_TRITON_LINEAR_BWD``
    names (default ``split``); ``filter_eps``: see ``backward``."""
    return backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
                    need_bias, filter_eps=filter_eps)


def backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
             need_bias, *, filter_eps: float = 0.0, variant: str | None = None):
    """``linear_token_logprobs_bwd`` with the variant chosen by the caller (tests compare the two).

    ``filter_eps`` (keyword-only, default 0 = exact): skip logits tiles whose softmax entries are all
    below it and that hold no label; error bound in ``docs/design.md`` section 2. ``variant``:
    ``"split"`` or ``"atomic"`` (default: ``$LPC_TRITON_LINEAR_BWD``, else ``"split"``).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden)
    filter_eps = float(filter_eps)
    if not filter_eps >= 0.0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps}")
    variant = bwd_variant(variant)
    need_hidden, need_weight = bool(need_hidden), bool(need_weight)
    need_bias = bool(need_bias and bias is not None)
    rows = _valid_rows(labels, ignore_index)
    nv = rows.numel()
    dev = hidden.device
    if nv == 0 or not (need_hidden or need_weight or need_bias):  # nothing to compute: zeros
        return (torch.zeros(n, h, dtype=hidden.dtype, device=dev) if need_hidden else None,
                torch.zeros(v, h, dtype=weight.dtype, device=dev) if need_weight else None,
                torch.zeros(v, dtype=bias.dtype, device=dev) if need_bias else None)
    args = (grad_logp.contiguous().to(cdt), hidden, weight, bias, rows, labels, lse, need_hidden, need_weight,
            need_bias, filter_eps)
    with device_guard(hidden):
        return _bwd_split(*args) if variant == "split" else _bwd_atomic(*args)
