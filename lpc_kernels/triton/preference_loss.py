"""Triton ``preference_loss``: DPO / IPO / SimPO + label smoothing + ``kl_weight * KL(q || p)``, one forward and
one backward launch for ``B`` pairs; each program owns ``BLOCK_B`` pairs and their ``[BLOCK_B, K]`` code logits.
The math is the reference's (``lpc_kernels.reference._pair_terms`` and friends). The forward's mean is
deterministic in the same launch: the program that draws the last ticket of an atomic counter sums the
per-program partials in program order. Rows of more than ``MAX_TILE_K`` codes are streamed in ``LOOP_BLOCK_K``
chunks (online log-sum-exp, a KL pass, in backward a gradient pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..preference import PreferenceLossInputs, PreferenceLossOutput
from ._common import INTERPRET, cast_out, compute_dtype, device_guard, next_pow2, scalar_args

LOSS_IDS = {"dpo": 0, "ipo": 1, "simpo": 2}
MAX_TILE_K = 2048  # above this, the K axis is streamed in LOOP_BLOCK_K chunks
LOOP_BLOCK_K = 256 if INTERPRET else 1024
INTERPRET_BLOCK_B = 128


@triton.jit
def _log1p(t):  # log(u) * t / (u - 1), u = 1 + t (Goldberg): the interpreter has no libdevice.log1p
    u = 1.0 + t
    um1 = u - 1.0
    return tl.where(um1 == 0.0, t, tl.log(u) * (t / tl.where(um1 == 0.0, 1.0, um1)))


@triton.jit
def _logsigmoid(x):  # min(x, 0) - log1p(exp(-|x|)): never overflows
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _f64_scalars(scal_ptr):
    """(beta, gamma, ipo_target, eps, one_minus_eps, kl_weight) from the fp64 scalar tensor, in the order
    ``_scalars`` passes them to ``scalar_args`` (kernel float arguments are fp32)."""
    return (tl.load(scal_ptr + 0), tl.load(scal_ptr + 1), tl.load(scal_ptr + 2), tl.load(scal_ptr + 3),
            tl.load(scal_ptr + 4), tl.load(scal_ptr + 5))


@triton.jit
def _pair_terms(pc_ptr, pr_ptr, rc_ptr, rr_ptr, cl_ptr, rl_ptr, rows, r_mask, beta, gamma, ipo_target, eps,
                one_minus_eps, LOSS_TYPE: tl.constexpr, IPO_AVG: tl.constexpr, CDT: tl.constexpr):
    """Per pair: ``(a_w, a_l, chosen_reward, rejected_reward, pair_loss, d pair_loss / d h)`` of the margin
    ``h = a_w (lp_w - ref_w) - a_l (lp_l - ref_l)`` (simpo: ``a_w lp_w - a_l lp_l - gamma``)."""
    pc = tl.load(pc_ptr + rows, mask=r_mask, other=0.0).to(CDT)
    pr = tl.load(pr_ptr + rows, mask=r_mask, other=0.0).to(CDT)
    if LOSS_TYPE == 2:  # simpo (reference free)
        a_w = beta / tl.load(cl_ptr + rows, mask=r_mask, other=1).to(CDT)
        a_l = beta / tl.load(rl_ptr + rows, mask=r_mask, other=1).to(CDT)
        cr = a_w * pc
        rj = a_l * pr
        h = cr - rj - gamma
    else:
        rc = tl.load(rc_ptr + rows, mask=r_mask, other=0.0).to(CDT)
        rr = tl.load(rr_ptr + rows, mask=r_mask, other=0.0).to(CDT)
        if LOSS_TYPE == 1:  # ipo
            if IPO_AVG:
                a_w = 1.0 / tl.load(cl_ptr + rows, mask=r_mask, other=1).to(CDT)
                a_l = 1.0 / tl.load(rl_ptr + rows, mask=r_mask, other=1).to(CDT)
            else:
                a_w = tl.full(pc.shape, 1.0, CDT)
                a_l = tl.full(pc.shape, 1.0, CDT)
            dw = a_w * (pc - rc)
            dl = a_l * (pr - rr)
            cr = beta * dw
            rj = beta * dl
        else:  # dpo
            a_w = tl.full(pc.shape, 1.0, CDT) * beta
            a_l = a_w
            dw = beta * (pc - rc)
            dl = beta * (pr - rr)
            cr = dw
            rj = dl
        h = dw - dl
    if LOSS_TYPE == 1:
        t = h - ipo_target
        pair = t * t
        slope = 2.0 * t
    else:
        pair = -one_minus_eps * _logsigmoid(h) - eps * _logsigmoid(-h)
        slope = -one_minus_eps * _sigmoid(-h) + eps * _sigmoid(h)
    return a_w, a_l, cr, rj, pair, slope


@triton.jit
def _load_logits(ptr, rows, r_mask, offs_k, K, CDT: tl.constexpr):
    """A ``[BLOCK_B, BLOCK_K]`` logits tile, ``-inf`` in columns >= K (0 in padded rows: stays finite)."""
    k_mask = offs_k < K
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                other=0.0).to(CDT)
    return tl.where(k_mask[None, :], x, float("-inf"))


@triton.jit
def _log_softmax_tile(x):
    m = tl.max(x, axis=1)
    y = x - m[:, None]
    return y - tl.log(tl.sum(tl.exp(y), axis=1))[:, None]


@triton.jit
def _kl_parts(lq, lp, k_mask):
    """``(q, p, log q - log p)`` with zeros in the padded columns (where ``lq = lp = -inf``)."""
    q = tl.where(k_mask, tl.exp(lq), 0.0)
    p = tl.where(k_mask, tl.exp(lp), 0.0)
    log_ratio = tl.where(k_mask, lq, 0.0) - tl.where(k_mask, lp, 0.0)
    return q, p, log_ratio


@triton.jit
def _online_lse_step(x, m, s):
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no -inf - -inf
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _kl_tile(prior_ptr, post_ptr, rows, r_mask, offs_k, K, lse_q, lse_p, CDT: tl.constexpr, ONE_TILE: tl.constexpr):
    """``(lq, lp, k_mask, kl)`` of the K tile ``offs_k``: ``log q``, ``log p`` (``-inf`` in columns >= K), the
    column mask and the tile's part of ``KL`` per row. ``ONE_TILE``: the tile holds the whole rows and is
    normalised here (``lse_q``, ``lse_p`` unused); otherwise the streamed rows' ``lse_q``, ``lse_p`` are
    subtracted."""
    k_mask = (offs_k < K)[None, :]
    if ONE_TILE:
        lq = _log_softmax_tile(_load_logits(post_ptr, rows, r_mask, offs_k, K, CDT))
        lp = _log_softmax_tile(_load_logits(prior_ptr, rows, r_mask, offs_k, K, CDT))
    else:
        lq = _load_logits(post_ptr, rows, r_mask, offs_k, K, CDT) - lse_q[:, None]
        lp = _load_logits(prior_ptr, rows, r_mask, offs_k, K, CDT) - lse_p[:, None]
    q, _, log_ratio = _kl_parts(lq, lp, k_mask)
    return lq, lp, k_mask, tl.sum(q * log_ratio, axis=1)


@triton.jit
def _kl_stats(prior_ptr, post_ptr, rows, r_mask, K, CDT: tl.constexpr, ONE_TILE: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(lse_q, lse_p, kl)`` per row (``lse`` only filled on the streamed path)."""
    if ONE_TILE:
        lse_q = tl.zeros([BLOCK_B], CDT)
        lse_p = tl.zeros([BLOCK_B], CDT)
        _, _, _, kl = _kl_tile(prior_ptr, post_ptr, rows, r_mask, tl.arange(0, BLOCK_K), K, lse_q, lse_p, CDT,
                               ONE_TILE)
    else:
        m_q = tl.full([BLOCK_B], float("-inf"), CDT)
        m_p = tl.full([BLOCK_B], float("-inf"), CDT)
        s_q = tl.zeros([BLOCK_B], CDT)
        s_p = tl.zeros([BLOCK_B], CDT)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            m_q, s_q = _online_lse_step(_load_logits(post_ptr, rows, r_mask, offs_k, K, CDT), m_q, s_q)
            m_p, s_p = _online_lse_step(_load_logits(prior_ptr, rows, r_mask, offs_k, K, CDT), m_p, s_p)
        lse_q = m_q + tl.log(s_q)
        lse_p = m_p + tl.log(s_p)
        kl = tl.zeros([BLOCK_B], CDT)
        for k0 in range(0, K, BLOCK_K):
            _, _, _, kl_k = _kl_tile(prior_ptr, post_ptr, rows, r_mask, k0 + tl.arange(0, BLOCK_K), K, lse_q, lse_p,
                                     CDT, ONE_TILE)
            kl += kl_k
    return lse_q, lse_p, kl


@triton.jit
def _kl_grads_tile(lq, lp, kl, gk, rows, r_mask, offs_k, k_mask, K, d_prior_ptr, d_post_ptr):
    q, p, log_ratio = _kl_parts(lq, lp, k_mask)
    d_post = gk[:, None] * q * (log_ratio - kl[:, None])
    d_prior = gk[:, None] * (p - q)
    mask = r_mask[:, None] & k_mask
    idx = rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(d_post_ptr + idx, cast_out(d_post, d_post_ptr.dtype.element_ty), mask=mask)
    tl.store(d_prior_ptr + idx, cast_out(d_prior, d_prior_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pref_fwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, cl_ptr, rl_ptr, prior_ptr, post_ptr,
    loss_ptr, losses_ptr, cr_ptr, rj_ptr, kl_ptr, partial_ptr, counter_ptr,
    B, K, beta, gamma, ipo_target, eps, one_minus_eps, kl_weight, scal_ptr,
    LOSS_TYPE: tl.constexpr, IPO_AVG: tl.constexpr, HAS_KL: tl.constexpr, F64_SCALARS: tl.constexpr,
    ONE_TILE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    CDT: tl.constexpr = losses_ptr.dtype.element_ty
    if F64_SCALARS:  # fp64 inputs: the Python floats in full precision (kernel float args are fp32)
        beta, gamma, ipo_target, eps, one_minus_eps, kl_weight = _f64_scalars(scal_ptr)
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    a_w, a_l, cr, rj, pair, slope = _pair_terms(pc_ptr, pr_ptr, rc_ptr, rr_ptr, cl_ptr, rl_ptr, rows, r_mask, beta,
                                                gamma, ipo_target, eps, one_minus_eps, LOSS_TYPE, IPO_AVG, CDT)
    if HAS_KL:
        _, _, kl = _kl_stats(prior_ptr, post_ptr, rows, r_mask, K, CDT, ONE_TILE, BLOCK_B, BLOCK_K)
        losses = pair + kl_weight * kl
    else:
        kl = tl.zeros([BLOCK_B], CDT)
        losses = pair
    tl.store(losses_ptr + rows, losses, mask=r_mask)
    tl.store(cr_ptr + rows, cr, mask=r_mask)
    tl.store(rj_ptr + rows, rj, mask=r_mask)
    tl.store(kl_ptr + rows, kl, mask=r_mask)

    # deterministic mean in the same launch: the last program to finish sums the partials in order
    tl.store(partial_ptr + pid, tl.sum(tl.where(r_mask, losses, 0.0), axis=0))
    tl.debug_barrier()  # every thread's part of this program's store precedes the release below
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    n_prog = tl.num_programs(0)
    if ticket == n_prog - 1:
        acc = tl.zeros([BLOCK_P], CDT)
        for p0 in range(0, n_prog, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            acc += tl.load(partial_ptr + offs, mask=offs < n_prog, other=0.0, volatile=True)
        tl.store(loss_ptr, tl.sum(acc, axis=0) / B)


@triton.jit
def _pref_bwd_kernel(
    grad_loss_ptr, grad_losses_ptr, grad_chosen_rewards_ptr, grad_rejected_rewards_ptr, grad_kl_ptr,
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, cl_ptr, rl_ptr, prior_ptr, post_ptr,
    d_pc_ptr, d_pr_ptr, d_rc_ptr, d_rr_ptr, d_prior_ptr, d_post_ptr,
    B, K, beta, gamma, ipo_target, eps, one_minus_eps, kl_weight, scal_ptr,
    LOSS_TYPE: tl.constexpr, IPO_AVG: tl.constexpr, HAS_REF: tl.constexpr, HAS_KL: tl.constexpr,
    F64_SCALARS: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CDT: tl.constexpr = grad_losses_ptr.dtype.element_ty
    if F64_SCALARS:
        beta, gamma, ipo_target, eps, one_minus_eps, kl_weight = _f64_scalars(scal_ptr)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    a_w, a_l, cr, rj, pair, slope = _pair_terms(pc_ptr, pr_ptr, rc_ptr, rr_ptr, cl_ptr, rl_ptr, rows, r_mask, beta,
                                                gamma, ipo_target, eps, one_minus_eps, LOSS_TYPE, IPO_AVG, CDT)
    # the gradient of pair i's loss term: from the mean and from losses[i]
    g_each = tl.load(grad_loss_ptr).to(CDT) / B + tl.load(grad_losses_ptr + rows, mask=r_mask, other=0.0).to(CDT)
    grad_cr = tl.load(grad_chosen_rewards_ptr + rows, mask=r_mask, other=0.0).to(CDT)
    grad_rj = tl.load(grad_rejected_rewards_ptr + rows, mask=r_mask, other=0.0).to(CDT)
    dh = g_each * slope
    if LOSS_TYPE == 1:  # ipo rewards are beta * a * (lp - ref)
        d_pc = a_w * (dh + beta * grad_cr)
        d_pr = a_l * (beta * grad_rj - dh)
    else:
        d_pc = a_w * (dh + grad_cr)
        d_pr = a_l * (grad_rj - dh)
    tl.store(d_pc_ptr + rows, cast_out(d_pc, d_pc_ptr.dtype.element_ty), mask=r_mask)
    tl.store(d_pr_ptr + rows, cast_out(d_pr, d_pr_ptr.dtype.element_ty), mask=r_mask)
    if HAS_REF:
        tl.store(d_rc_ptr + rows, cast_out(-d_pc, d_rc_ptr.dtype.element_ty), mask=r_mask)
        tl.store(d_rr_ptr + rows, cast_out(-d_pr, d_rr_ptr.dtype.element_ty), mask=r_mask)
    if HAS_KL:
        gk = g_each * kl_weight + tl.load(grad_kl_ptr + rows, mask=r_mask, other=0.0).to(CDT)
        if ONE_TILE:  # each logits tile is loaded once
            offs_k = tl.arange(0, BLOCK_K)
            lq, lp, k_mask, kl = _kl_tile(prior_ptr, post_ptr, rows, r_mask, offs_k, K, None, None, CDT, ONE_TILE)
            _kl_grads_tile(lq, lp, kl, gk, rows, r_mask, offs_k, k_mask, K, d_prior_ptr, d_post_ptr)
        else:  # streamed: statistics pass(es), then a gradient pass
            lse_q, lse_p, kl = _kl_stats(prior_ptr, post_ptr, rows, r_mask, K, CDT, ONE_TILE, BLOCK_B, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                lq, lp, k_mask, _ = _kl_tile(prior_ptr, post_ptr, rows, r_mask, offs_k, K, lse_q, lse_p, CDT,
                                             ONE_TILE)
                _kl_grads_tile(lq, lp, kl, gk, rows, r_mask, offs_k, k_mask, K, d_prior_ptr, d_post_ptr)


def _blocks(k: int, has_kl: bool):
    """(ONE_TILE, BLOCK_B, BLOCK_K, num_warps)."""
    if not has_kl:
        return True, (INTERPRET_BLOCK_B if INTERPRET else 1024), 1, 4
    one_tile = next_pow2(k) <= MAX_TILE_K
    block_k = next_pow2(k) if one_tile else LOOP_BLOCK_K
    if INTERPRET:
        block_b = max(1, min(INTERPRET_BLOCK_B, 8192 // block_k))
    else:
        block_b = max(1, min(256, 4096 // block_k))  # ~4k logits per tensor per program
    return one_tile, block_b, block_k, (8 if block_b * block_k >= 4096 else 4)


def _scalars(options, cdt, device):
    vals = (float(options.beta), float(options.gamma), 1.0 / (2.0 * float(options.beta)),
            float(options.label_smoothing), 1.0 - float(options.label_smoothing), float(options.kl_weight))
    scal, f64 = scalar_args(cdt, device, *vals)
    return vals, scal, f64


def _pointers(inputs, stand_in):
    """The eight input tensors in the kernels' order, ``stand_in`` (never read) for the absent ones."""
    return tuple(t if t is not None else stand_in for t in inputs)


def preference_loss_fwd(inputs, options):
    pc, prior = inputs.policy_chosen_logps, inputs.prior_logits
    cdt = compute_dtype(pc)
    b = pc.shape[0]
    dev = pc.device
    has_kl = prior is not None
    k = prior.shape[1] if has_kl else 1
    losses = torch.empty(b, dtype=cdt, device=dev)
    cr = torch.empty(b, dtype=cdt, device=dev)
    rj = torch.empty(b, dtype=cdt, device=dev)
    kl = torch.empty(b, dtype=cdt, device=dev)
    loss = torch.empty((), dtype=cdt, device=dev)
    one_tile, block_b, block_k, num_warps = _blocks(k, has_kl)
    n_prog = triton.cdiv(b, block_b)
    partial = torch.empty(n_prog, dtype=cdt, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    vals, scal, f64 = _scalars(options, cdt, dev)
    with device_guard(pc):
        _pref_fwd_kernel[(n_prog,)](
            *_pointers(inputs, pc), loss, losses, cr, rj, kl, partial, counter, b, k, *vals,
            scal if f64 else partial, LOSS_TYPE=LOSS_IDS[options.loss_type], IPO_AVG=bool(options.ipo_average),
            HAS_KL=has_kl, F64_SCALARS=f64, ONE_TILE=one_tile, BLOCK_B=block_b, BLOCK_K=block_k,
            BLOCK_P=min(1024, next_pow2(n_prog)), num_warps=num_warps)
    return PreferenceLossOutput(loss=loss, losses=losses, chosen_rewards=cr, rejected_rewards=rj, kl=kl)


def preference_loss_bwd(grad_outputs, inputs, options):
    pc, pr = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    cdt = compute_dtype(pc)
    b = pc.shape[0]
    dev = pc.device
    has_kl = inputs.prior_logits is not None
    has_ref = inputs.ref_chosen_logps is not None
    k = inputs.prior_logits.shape[1] if has_kl else 1
    d_pc, d_pr = torch.empty_like(pc), torch.empty_like(pr)
    d_rc = torch.empty_like(inputs.ref_chosen_logps) if has_ref else None
    d_rr = torch.empty_like(inputs.ref_rejected_logps) if has_ref else None
    d_prior = torch.empty_like(inputs.prior_logits) if has_kl else None
    d_post = torch.empty_like(inputs.posterior_logits) if has_kl else None
    one_tile, block_b, block_k, num_warps = _blocks(k, has_kl)
    vals, scal, f64 = _scalars(options, cdt, dev)
    grads = PreferenceLossOutput(*(t.to(cdt).contiguous() for t in grad_outputs))
    with device_guard(pc):
        _pref_bwd_kernel[(triton.cdiv(b, block_b),)](
            *grads, *_pointers(inputs, pc), d_pc, d_pr, d_rc if has_ref else d_pc, d_rr if has_ref else d_pr,
            d_prior if has_kl else d_pc, d_post if has_kl else d_pc, b, k, *vals, scal if f64 else grads.losses,
            LOSS_TYPE=LOSS_IDS[options.loss_type], IPO_AVG=bool(options.ipo_average), HAS_REF=has_ref,
            HAS_KL=has_kl, F64_SCALARS=f64, ONE_TILE=one_tile, BLOCK_B=block_b, BLOCK_K=block_k,
            num_warps=num_warps)
    return PreferenceLossInputs(policy_chosen_logps=d_pc, policy_rejected_logps=d_pr, ref_chosen_logps=d_rc,
                                ref_rejected_logps=d_rr, prior_logits=d_prior, posterior_logits=d_post)
