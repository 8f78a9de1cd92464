"""float64 formulas of every op, written independently of lpc_kernels.reference: the oracles of the
op tests (tests/ops: the backend table on CPU tensors, the cpu kernels, CUDA tensors)."""

import torch
import torch.nn.functional as F

from lpc_kernels import philox


def f_token_logprobs(logits, labels, ignore_index=-100):
    valid = labels != ignore_index
    lsm = torch.log_softmax(logits.double(), dim=-1)
    out = lsm.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros_like(out))


def f_linear_token_logprobs(hidden, weight, labels, bias=None, ignore_index=-100):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return f_token_logprobs(logits, labels, ignore_index)


def f_gumbel(logits, codebook, tau, hard, seed, offset):
    b, k = logits.shape
    noise = philox.gumbel_noise(seed, offset, b, k).double()
    soft = torch.softmax((logits.double() + noise) / tau, dim=-1)
    if hard:  # straight-through estimator
        w = F.one_hot(soft.argmax(-1), k).double() - soft.detach() + soft
    else:
        w = soft
    return w, w @ codebook.double()


def f_preference(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, eps, kl_weight, ipo_average):
    pc, pr = pc.double(), pr.double()
    if loss_type == "dpo":
        cr, rj = beta * (pc - rc.double()), beta * (pr - rr.double())
        h = cr - rj
    elif loss_type == "ipo":
        n_w = cl.double() if ipo_average else torch.ones_like(pc)
        n_l = rl.double() if ipo_average else torch.ones_like(pr)
        dw, dl = (pc - rc.double()) / n_w, (pr - rr.double()) / n_l
        h, cr, rj = dw - dl, beta * dw, beta * dl
    else:
        cr, rj = beta * pc / cl.double(), beta * pr / rl.double()
        h = cr - rj - gamma
    if loss_type == "ipo":
        pair = (h - 1 / (2 * beta)) ** 2
    else:
        pair = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    if prior is not None:
        lq, lp = torch.log_softmax(post.double(), -1), torch.log_softmax(prior.double(), -1)
        kl = (lq.exp() * (lq - lp)).sum(-1)
    else:
        kl = torch.zeros_like(pc)
    losses = pair + kl_weight * kl
    return losses.mean(), losses, cr, rj, kl


PREF_CASES = [
    dict(loss_type="dpo", beta=0.1, label_smoothing=0.0, kl_weight=0.05),
    dict(loss_type="dpo", beta=0.5, label_smoothing=0.2, kl_weight=0.0),
    dict(loss_type="ipo", beta=0.1, kl_weight=0.1, ipo_average=True),
    dict(loss_type="ipo", beta=0.3, kl_weight=0.1, ipo_average=False),
    dict(loss_type="simpo", beta=2.0, gamma=0.5, label_smoothing=0.1, kl_weight=0.05),
]
