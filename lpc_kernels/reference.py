"""The ``reference`` backend: ``lpc_kernels.backend_interface`` in the plainest PyTorch, any device, the oracle for
the others. It computes in float64 for float64 inputs, else in float32 (16-bit inputs upcast exactly), and
materialises the linear op's ``[N, V]`` logits ``chunk_size`` rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import DEFAULT_CHUNK_SIZE, chunks, compute_dtype
from .philox import gumbel_noise
from .preference import PreferenceLossInputs, PreferenceLossOutput


# ----------------------------------------------------------------------------------- token_logprobs
def token_logprobs_fwd(logits, labels, ignore_index):
    cdt = compute_dtype(logits)
    n = logits.shape[0]
    logp = torch.zeros(n, dtype=cdt, device=logits.device)
    lse = torch.zeros(n, dtype=cdt, device=logits.device)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    for s, e in chunks(n, DEFAULT_CHUNK_SIZE):  # bounds the upcast copy to [chunk, V]
        x = logits[s:e].to(cdt)
        lse[s:e] = torch.logsumexp(x, dim=-1)
        tgt = x.gather(1, safe[s:e, None]).squeeze(1)
        logp[s:e] = torch.where(valid[s:e], tgt - lse[s:e], 0.0)
    lse = torch.where(valid, lse, 0.0)
    return logp, lse


def _softmax_grad_block(x, lse, labels, valid, grad):
    """``grad * (onehot(label) - softmax(x))`` for a block of rows, zero on ignored rows."""
    g = torch.where(valid, grad.to(x.dtype), 0.0)
    # ignored rows carry lse = 0, where exp(x) may overflow: mask the softmax, not just the factor
    d = torch.where(valid[:, None], torch.exp(x - lse[:, None]), 0.0) * (-g[:, None])
    d.scatter_add_(1, torch.where(valid, labels, 0)[:, None], g[:, None])
    return d


def token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, inplace):
    cdt = compute_dtype(logits)
    out = logits if inplace else torch.empty_like(logits)
    valid = labels != ignore_index
    for s, e in chunks(logits.shape[0], DEFAULT_CHUNK_SIZE):
        x = logits[s:e].to(cdt)
        out[s:e] = _softmax_grad_block(x, lse[s:e].to(cdt), labels[s:e], valid[s:e], grad_logp[s:e])
    return out


# ---------------------------------------------------------------------------- linear_token_logprobs
def _logits_block(h, weight_c, bias_c):
    x = h @ weight_c.T
    return x + bias_c if bias_c is not None else x


def linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index, chunk_size):
    cdt = compute_dtype(hidden)
    n = hidden.shape[0]
    logp = torch.zeros(n, dtype=cdt, device=hidden.device)
    lse = torch.zeros(n, dtype=cdt, device=hidden.device)
    rows = torch.nonzero(labels != ignore_index).squeeze(1)  # ignored rows never reach the matmul
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    for s, e in chunks(rows.numel(), chunk_size):
        r = rows[s:e]
        x = _logits_block(hidden[r].to(cdt), w, b)
        row_lse = torch.logsumexp(x, dim=-1)
        lse[r] = row_lse
        logp[r] = x.gather(1, labels[r, None]).squeeze(1) - row_lse
    return logp, lse


def linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size,
                              need_hidden, need_weight, need_bias):
    cdt = compute_dtype(hidden)
    rows = torch.nonzero(labels != ignore_index).squeeze(1)
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    gh = torch.zeros_like(hidden, dtype=cdt) if need_hidden else None
    gw = torch.zeros_like(weight, dtype=cdt) if need_weight else None
    gb = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_bias else None
    for s, e in chunks(rows.numel(), chunk_size):
        r = rows[s:e]
        h = hidden[r].to(cdt)
        x = _logits_block(h, w, b)
        ones = torch.ones_like(r, dtype=torch.bool)
        d = _softmax_grad_block(x, lse[r].to(cdt), labels[r], ones, grad_logp[r])
        if gh is not None:
            gh[r] = d @ w
        if gw is not None:
            gw += d.T @ h
        if gb is not None:
            gb += d.sum(0)
    return (gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None)


# ----------------------------------------------------------------------------- gumbel_softmax_codes
def gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset):
    cdt = compute_dtype(logits)
    b, k = logits.shape
    noise = gumbel_noise(seed, offset, b, k, device=logits.device).to(cdt)
    soft = torch.softmax((logits.to(cdt) + noise) / tau, dim=-1)
    weights = F.one_hot(soft.argmax(dim=-1), k).to(cdt) if hard else soft
    z = (weights @ codebook.to(cdt)).to(codebook.dtype)
    return weights, z, soft if hard else None


def gumbel_softmax_bwd(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook):
    soft = weights if soft is None else soft
    cdt = soft.dtype
    g_logits = g_codebook = None
    if need_logits:
        # straight-through for hard samples: the gradient flows through the soft sample either way
        g = grad_weights.to(cdt) + grad_z.to(cdt) @ codebook.to(cdt).T
        g_logits = soft * (g - (g * soft).sum(-1, keepdim=True)) / tau
    if need_codebook:
        g_codebook = (weights.T @ grad_z.to(cdt)).to(codebook.dtype)
    return g_logits, g_codebook


# ----------------------------------------------------------------------------------- preference_loss
def _pair_terms(pc, pr, rc, rr, cl, rl, loss_type, beta, gamma, ipo_average):
    """Margin ``h`` and the scales ``a_w, a_l`` with ``h = a_w * (pc - rc) - a_l * (pr - rr) + const``.

    Rewards are ``beta * a * (policy - ref)`` (ref = 0 for SimPO, whose ``a`` already holds ``beta``).
    """
    if loss_type == "simpo":
        a_w, a_l = beta / cl, beta / rl
        return a_w * pc - a_l * pr - gamma, a_w, a_l, a_w * pc, a_l * pr
    if loss_type == "ipo":
        a_w = 1.0 / cl if ipo_average else torch.ones_like(pc)
        a_l = 1.0 / rl if ipo_average else torch.ones_like(pr)
        dw, dl = a_w * (pc - rc), a_l * (pr - rr)
        return dw - dl, a_w, a_l, beta * dw, beta * dl
    a_w = torch.full_like(pc, beta)
    dw, dl = beta * (pc - rc), beta * (pr - rr)
    return dw - dl, a_w, a_w, dw, dl


def _pair_loss_and_slope(h, loss_type, beta, label_smoothing):
    if loss_type == "ipo":
        t = h - 1.0 / (2.0 * beta)
        return t * t, 2.0 * t
    eps = label_smoothing
    loss = -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    slope = -(1.0 - eps) * torch.sigmoid(-h) + eps * torch.sigmoid(h)
    return loss, slope


def _kl_terms(prior, post, cdt):
    lq = torch.log_softmax(post.to(cdt), dim=-1)
    lp = torch.log_softmax(prior.to(cdt), dim=-1)
    q = lq.exp()
    kl = (q * (lq - lp)).sum(-1)
    return kl, q, lp.exp(), lq - lp


def _upcast(cdt, *ts):
    return [t.to(cdt) if t is not None else None for t in ts]


def preference_loss_fwd(inputs, options):
    cdt = compute_dtype(inputs.policy_chosen_logps)
    pc, pr, rc, rr, cl, rl = _upcast(cdt, inputs.policy_chosen_logps, inputs.policy_rejected_logps,
                                     inputs.ref_chosen_logps, inputs.ref_rejected_logps, inputs.chosen_lengths,
                                     inputs.rejected_lengths)
    h, _, _, cr, rj = _pair_terms(pc, pr, rc, rr, cl, rl, options.loss_type, options.beta, options.gamma,
                                  options.ipo_average)
    pair, _ = _pair_loss_and_slope(h, options.loss_type, options.beta, options.label_smoothing)
    prior, post = inputs.prior_logits, inputs.posterior_logits
    kl = _kl_terms(prior, post, cdt)[0] if prior is not None else torch.zeros_like(pc)
    losses = pair + options.kl_weight * kl
    return PreferenceLossOutput(loss=losses.mean(), losses=losses, chosen_rewards=cr, rejected_rewards=rj, kl=kl)


def preference_loss_bwd(grad_outputs, inputs, options):
    pc = inputs.policy_chosen_logps
    cdt = compute_dtype(pc)
    pc, pr, rc, rr, cl, rl = _upcast(cdt, pc, inputs.policy_rejected_logps, inputs.ref_chosen_logps,
                                     inputs.ref_rejected_logps, inputs.chosen_lengths, inputs.rejected_lengths)
    g = PreferenceLossOutput(*_upcast(cdt, *grad_outputs))
    loss_type, beta = options.loss_type, options.beta
    h, a_w, a_l, _, _ = _pair_terms(pc, pr, rc, rr, cl, rl, loss_type, beta, options.gamma, options.ipo_average)
    _, slope = _pair_loss_and_slope(h, loss_type, beta, options.label_smoothing)
    g_each = g.loss / pc.shape[0] + g.losses
    dh = g_each * slope
    reward_scale = beta if loss_type == "ipo" else 1.0  # rewards = reward_scale * a * (policy - ref)
    d_pc = a_w * (dh + reward_scale * g.chosen_rewards)
    d_pr = a_l * (reward_scale * g.rejected_rewards - dh)
    d_prior = d_post = None
    if inputs.prior_logits is not None:
        kl, q, p, log_ratio = _kl_terms(inputs.prior_logits, inputs.posterior_logits, cdt)
        g_kl_total = (g_each * options.kl_weight + g.kl)[:, None]
        d_post = g_kl_total * q * (log_ratio - kl[:, None])
        d_prior = g_kl_total * (p - q)

    def like(grad, t):  # in the input's dtype; None where the input is absent
        return grad.to(t.dtype) if t is not None else None

    return PreferenceLossInputs(
        policy_chosen_logps=like(d_pc, inputs.policy_chosen_logps),
        policy_rejected_logps=like(d_pr, inputs.policy_rejected_logps),
        ref_chosen_logps=like(-d_pc, inputs.ref_chosen_logps),
        ref_rejected_logps=like(-d_pr, inputs.ref_rejected_logps),
        prior_logits=like(d_prior, inputs.prior_logits), posterior_logits=like(d_post, inputs.posterior_logits))
