"""Triton ``linear_token_logprobs``: log p(label) straight from the LM head, Cut-Cross-Entropy style.

With ``x = h @ W.T + b`` (``h [N, H]``, ``W [V, H]``, ``b [V]``) the op returns
``logp_i = x[i, label_i] - lse_i``, ``lse_i = log sum_v exp x[i, v]``, and never writes ``x`` to global
memory: it only exists as ``[BLOCK_N, BLOCK_V]`` tiles in registers.

Forward (``_lin_fwd_kernel`` + ``_lin_combine_kernel``)
    Rows with ``label == ignore_index`` are compacted away on the host first (``rows = nonzero(valid)``),
    so no FLOP is spent on them; they get ``logp = lse = 0``. Program ``(row block, split)`` walks the
    split's range of ``V`` in ``BLOCK_V`` tiles; each tile is ``tl.dot``-accumulated over ``H`` in
    ``BLOCK_H`` steps (fp32 accumulation, fp64 for fp64 inputs) and merged into a per-row online
    log-sum-exp (``m' = max(m, max_tile)``, ``s' = s e^{m - m'} + sum_tile e^{x - m'}``). The target logit
    is picked out of whichever tile holds column ``label``. Splitting ``V`` gives the GPU enough programs
    when ``N`` is small; each split writes a partial ``(lse_s, target_s)`` and the combine kernel forms
    ``lse = logsumexp_s lse_s``, ``target = sum_s target_s`` (deterministic: no atomics). The forward
    computes nothing for backward beyond ``lse``, which is an output anyway, so the reference model's
    forward-only call (``torch.no_grad``) does exactly the work of the log-probs.

Backward (``_lin_bwd_kernel``)
    ``d logp_i / d x[i, v] = onehot_iv - p_iv`` with ``p_iv = exp(x_iv - lse_i)``, so with upstream
    ``g_i`` the logits gradient is ``D_iv = g_i (onehot_iv - p_iv)`` and

        grad_h = D @ W,    grad_W = D.T @ h,    grad_b = D.sum(0).

    Each program recomputes one ``[BLOCK_N, BLOCK_V]`` tile of ``x`` (same loop as the forward), forms
    ``D`` in fp32, and scatters its two contributions ``D_tile @ W[tile_v, :]`` and
    ``D_tile.T @ h[tile_n, :]`` over ``H`` with fp32 atomic adds into fp32 accumulators (one kernel with
    atomics, as CCE does). Why not two atomic-free kernels: an atomic-free ``grad_h`` program must own
    ``grad_h[tile_n, :]``, an ``[BLOCK_N, H]`` accumulator (1 MiB at ``H = 4096``), or recompute every
    logits tile once per ``H`` block (``H / BLOCK_H`` times the forward FLOPs); the same holds for
    ``grad_W``. The atomics make the result's last bits depend on the GPU's scheduling (run to run),
    not its value beyond fp32 rounding. Under the interpreter the programs run in order, so it is tested
    there like any other kernel.

    For 16-bit inputs on the GPU ``D`` is rounded to the input dtype before the two ``tl.dot`` calls
    (tensor cores; the CCE / Liger choice): a relative error of ``2**-9`` (bf16) per term, the size of
    the final rounding of the gradient to bf16. fp32 inputs use ``input_precision="ieee"`` dots
    throughout (TF32 would break the 1e-5 contract).

Gradient filter (opt-in, ``filter_eps > 0``; CCE's idea)
    A tile is skipped when it holds no row's label and every ``p_iv`` in it is below ``filter_eps``.
    Each skipped entry satisfies ``|D_iv| = |g_i| p_iv < |g_i| filter_eps``, so the error is bounded by
    the skipped softmax mass:

        |err grad_h[i, :]| <= |g_i| * sum_{v: p_iv < eps} p_iv * max_v |W[v, :]|
        |err grad_W[v, :]| <= sum_{i: p_iv < eps} |g_i| p_iv * max_i |h[i, :]|
        |err grad_b[v]|    <= sum_{i: p_iv < eps} |g_i| p_iv

    (``tests/test_triton.py`` checks exactly these bounds). In a trained model most tiles of a large
    vocabulary sit below bf16's resolution (CCE filters at ``2**-12`` for bf16 by default), so the filter
    removes most of the atomic traffic; how much at ``N=16k, V=128k`` is for the GPU benchmark to show.

Memory: the backward accumulates in fp32 buffers ``[N, H]`` and ``[V, H]`` (2 GiB at ``V = 128256``,
``H = 4096``), cast to the input dtype at the end; nothing ``[N, V]``. fp16 caveat: ``D`` is rounded to
fp16 for the tensor cores, so ``|g_i|`` above 65504 (an extreme loss scale) would overflow there, and
probabilities below ``2**-24`` flush to zero (an error bounded like the filter's, with ``eps = 2**-24``).

``chunk_size`` (rows per materialised ``[chunk, V]`` block in the chunked backends) is accepted for the
shared signature and ignored: nothing of size ``[rows, V]`` is ever materialised here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtype, device_guard, dot_precision, launch, next_pow2, sm_count, tuned

# Interpreter configs: wide in V (few loop steps), the minimum 16 rows tl.dot allows.
INTERPRET_FWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64}
INTERPRET_BWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64, "BLOCK_HB": 32, "GROUP_N": 4}
INTERPRET_SPLITS = 2  # > 1 so that the split/combine path runs in every interpreter test with V > BLOCK_V

_MAX_BLOCK_V = 256  # the largest BLOCK_V in the GPU configs: split boundaries are multiples of it

# Hopper (H100/H200), bf16/fp16: 128x128 / 128x256 tiles with a 64-wide K step are the wgmma sweet spot;
# fp32 ("ieee" dots, no tensor cores) prefers the smaller tiles of the same lists
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=nw, num_stages=ns)
    for bn, bv, bh, nw, ns in (
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4), (256, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3),
    )
]
# BLOCK_HB: the H step of the scatter phase (D_tile @ W, D_tile.T @ h, atomics), a divisor of BLOCK_H.
# Narrower than the recompute's K step because each step holds an fp32 [BLOCK, BLOCK_HB] result and a
# block of 64-bit atomic addresses in registers. Spills per thread in the sm_90 ptxas build (bf16,
# cuobjdump): 0.5-1.7 KiB with BLOCK_HB = 64, 56-600 bytes with 32 or 16 (80 bytes for the first config).
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "BLOCK_HB": hb, "GROUP_N": 8}, num_warps=nw,
                  num_stages=ns)
    for bn, bv, bh, hb, nw, ns in (
        (128, 128, 64, 16, 8, 3), (128, 128, 64, 32, 8, 3), (64, 256, 64, 32, 8, 3), (128, 64, 64, 32, 4, 3),
        (64, 128, 64, 32, 4, 3), (128, 256, 64, 16, 8, 3), (64, 64, 64, 32, 4, 4),
    )
]
# fp64: 8-byte tiles; the lists above exceed shared memory (and registers) in fp64
_FWD_CONFIGS_F64 = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=nw, num_stages=ns)
    for bn, bv, bh, nw, ns in ((32, 64, 32, 4, 2), (64, 64, 32, 4, 2), (32, 32, 32, 4, 2))
]
_BWD_CONFIGS_F64 = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "BLOCK_HB": bh, "GROUP_N": 8}, num_warps=nw,
                  num_stages=ns)
    for bn, bv, bh, nw, ns in ((32, 64, 32, 4, 2), (32, 32, 32, 4, 2))
]


def _by_dtype(f64_configs):
    """``early_config_prune``: the fp64 list for fp64 inputs, the others otherwise."""
    f64 = set(f64_configs)

    def prune(configs, nargs, **kwargs):
        is_f64 = nargs["h_ptr"].dtype == torch.float64
        return [c for c in configs if (c in f64) == is_f64]

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


_EVEN_H = triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})


@tuned(_FWD_CONFIGS + _FWD_CONFIGS_F64, key=["V", "H"], quick=[_FWD_CONFIGS[0], _FWD_CONFIGS_F64[0]],
       prune_configs_by=_by_dtype(_FWD_CONFIGS_F64))
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
        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: every tile has at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
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
    lse = m + tl.log(tl.sum(tl.exp(part - m[None, :]), axis=0))
    tgt = tl.sum(tl.load(part_tgt_ptr + idx, mask=mask, other=0.0), axis=0)
    rows = tl.load(rows_ptr + offs_n, mask=n_mask, other=0)
    tl.store(lse_ptr + rows, lse, mask=n_mask)
    tl.store(logp_ptr + rows, tgt - lse, mask=n_mask)


@tuned(_BWD_CONFIGS + _BWD_CONFIGS_F64, key=["V", "H", "FILTER", "NEED_H", "NEED_W"],
       quick=[_BWD_CONFIGS[0], _BWD_CONFIGS_F64[0]], prune_configs_by=_by_dtype(_BWD_CONFIGS_F64),
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
    # grouped ordering (Triton matmul tutorial): programs in flight share GROUP_N row blocks of h and
    # walk V together, so both operand tiles and the atomically updated tiles stay in L2
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(NV, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    num_pid_in_group = GROUP_N * num_pid_v
    first_pid_n = (pid // num_pid_in_group) * GROUP_N
    group_size_n = tl.minimum(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % num_pid_in_group) % group_size_n
    pid_v = (pid % num_pid_in_group) // group_size_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NV
    rows = tl.load(rows_ptr + tl.minimum(offs_n, NV - 1)).to(tl.int64)  # padded rows: the last valid row
    labels = tl.load(labels_ptr + rows)
    lse = tl.load(lse_ptr + rows).to(CDT)  # a real lse: exp(x - lse) stays <= 1 on padded rows too
    g = tl.load(grad_ptr + rows).to(CDT)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V

    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, V, H, stride_h, stride_w,
                     HAS_BIAS, EVEN_H, DOT_PREC, UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H)
    mask = n_mask[:, None] & v_mask[None, :]
    p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
    is_label = offs_v[None, :] == labels[:, None]
    d = g[:, None] * (tl.where(is_label, 1.0, 0.0) - p)  # fp32: the true-class 1 - p does not cancel
    d = tl.where(mask, d, 0.0)

    keep = True
    if FILTER:
        holds_label = tl.max(tl.where(is_label & mask, 1, 0)) > 0
        keep = holds_label | (tl.max(p) >= filter_eps)
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


def linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size,
                              need_hidden, need_weight, need_bias, *, filter_eps: float = 0.0):
    """Gradients for hidden, weight, bias (None where not needed).

    ``filter_eps`` (keyword-only, default 0 = exact): skip logits tiles whose softmax entries are all
    below it and that hold no label; see the module docstring for the error bound.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = compute_dtype(hidden)
    filter_eps = float(filter_eps)
    if not filter_eps >= 0.0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps}")
    need_bias = bool(need_bias and bias is not None)
    dev = hidden.device
    gh = torch.zeros(n, h, dtype=cdt, device=dev) if need_hidden else None
    gw = torch.zeros(v, h, dtype=cdt, device=dev) if need_weight else None
    gb = torch.zeros(v, dtype=cdt, device=dev) if need_bias else None
    rows = _valid_rows(labels, ignore_index)
    nv = rows.numel()
    if nv > 0 and (need_hidden or need_weight or need_bias):
        dummy = torch.zeros(1, dtype=cdt, device=dev)  # stands for an accumulator not asked for
        prec, upcast = _flags(hidden)
        g_h, g_w, g_b = (gh if gh is not None else dummy, gw if gw is not None else dummy,
                         gb if gb is not None else dummy)
        with device_guard(hidden):
            launch(_lin_bwd_kernel,
                   lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),),
                   (hidden, weight, bias if bias is not None else hidden, rows, labels, lse, grad_logp.contiguous(),
                    g_h, g_w, g_b, nv, v, h, hidden.stride(0), weight.stride(0), h, h, filter_eps,
                    bias is not None, bool(need_hidden), bool(need_weight), need_bias, filter_eps > 0.0, prec,
                    upcast), INTERPRET_BWD)
    return (gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None)
