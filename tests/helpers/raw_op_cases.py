"""opcheck cases shared by the tests: calls of every compiled kernel (``torch.ops.lpc.*``: tests/backends, CPU and
CUDA) and of every public custom op with its backward ops (tests/ops, per op family, and the Triton tests)."""

import torch

from lpc_kernels.ops.gumbel_softmax_codes import gumbel_softmax_codes_backward_op, gumbel_softmax_codes_op
from lpc_kernels.ops.linear_token_logprobs import (linear_token_logprobs_backward_op,
                                                  linear_token_logprobs_frozen_head_op, linear_token_logprobs_op)
from lpc_kernels.ops.preference_loss import preference_loss_backward_op, preference_loss_op
from lpc_kernels.ops.token_logprobs import (token_logprobs_backward_inplace_op, token_logprobs_backward_op,
                                            token_logprobs_op)

OPS = torch.ops.lpc
KERNEL_SCHEMAS = ["token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_", "linear_token_logprobs_fwd",
                  "linear_token_logprobs_bwd", "gumbel_softmax_fwd", "gumbel_softmax_bwd", "preference_loss_fwd",
                  "preference_loss_bwd"]


def raw_op_cases(device):
    """(op, args) pairs covering every compiled kernel schema and option, on ``device``."""
    lab = torch.tensor([0, 32, -100, 5], device=device)
    x = torch.randn(4, 33, device=device)
    lse = OPS.token_logprobs_fwd(x, lab, -100)[1]
    g = torch.randn(4, device=device)
    h, w, b = torch.randn(4, 8, device=device), torch.randn(33, 8, device=device), torch.randn(33, device=device)
    lin_lse = OPS.linear_token_logprobs_fwd(h, w, b, lab, -100, 2)[1]
    lg, cb = torch.randn(3, 6, device=device), torch.randn(6, 4, device=device)
    w_soft, _, none = OPS.gumbel_softmax_fwd(lg, cb, 0.8, False, 3, 0)
    w_hard, _, soft = OPS.gumbel_softmax_fwd(lg, cb, 0.8, True, 3, 2**32 + 1)
    pc, pr, rc, rr = (torch.randn(3, device=device) for _ in range(4))
    prior, post = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    cl, rl = torch.tensor([2, 3, 4], device=device), torch.tensor([1.0, 5.0, 2.0], device=device)
    grads = (torch.randn((), device=device), *(torch.randn(3, device=device) for _ in range(4)))
    cases = [
        (OPS.token_logprobs_fwd, (x, lab, -100)),
        (OPS.token_logprobs_fwd, (x.to(torch.bfloat16), lab, -100)),
        (OPS.token_logprobs_fwd, (x.double(), torch.tensor([0, 32, 5, 5], device=device), 5)),
        (OPS.token_logprobs_bwd, (g, x, lab, lse, -100)),
        (OPS.token_logprobs_bwd, (g, x.half(), lab, lse, -100)),
        (OPS.token_logprobs_bwd_, (g, x.clone(), lab, lse, -100)),
        (OPS.linear_token_logprobs_fwd, (h, w, b, lab, -100, 2)),
        (OPS.linear_token_logprobs_fwd, (h.bfloat16(), w.bfloat16(), None, lab, -100, 16)),
        (OPS.linear_token_logprobs_bwd, (g, h, w, b, lab, lin_lse, -100, 3, True, True, True)),
        (OPS.linear_token_logprobs_bwd, (g, h, w, None, lab, lin_lse, -100, 3, True, False, False)),
        (OPS.linear_token_logprobs_bwd, (g, h.half(), w.half(), b.half(), lab, lin_lse, -100, 1, False, True, True)),
        (OPS.gumbel_softmax_fwd, (lg, cb, 0.8, False, 3, 0)),
        (OPS.gumbel_softmax_fwd, (lg.bfloat16(), cb.bfloat16(), 1.3, True, 2**40, 2**33)),
        (OPS.gumbel_softmax_bwd, (torch.randn(3, 6, device=device), torch.randn(3, 4, device=device), w_soft, none, cb, 0.8,
                                  True, True)),
        (OPS.gumbel_softmax_bwd, (torch.randn(3, 6, device=device), torch.randn(3, 4, device=device), w_hard, soft, cb, 0.8,
                                  True, False)),
        (OPS.gumbel_softmax_bwd, (torch.randn(3, 6, device=device), torch.randn(3, 4, device=device), w_hard, soft, cb, 0.8,
                                  False, True)),
    ]
    dpo = (pc, pr, rc, rr, cl, rl, prior, post, "dpo", 0.1, 0.0, 0.1, 0.05, True)
    ipo = (pc, pr, rc, rr, None, None, None, None, "ipo", 0.3, 0.0, 0.0, 0.0, False)
    simpo = (pc, pr, None, None, cl, rl, prior.double(), post.half(), "simpo", 2.0, 0.5, 0.0, 0.1, True)
    for args in (dpo, ipo, simpo):
        cases.append((OPS.preference_loss_fwd, args))
        cases.append((OPS.preference_loss_bwd, (*grads, *args)))
    return cases


def bad_raw_calls(device):
    """(argument the error must name, call) pairs: a bad argument reaching each compiled kernel, on ``device``.
    Shared by the CPU and CUDA kernel tests; each adds the cases only its device checks."""
    x, lab = torch.randn(4, 10, device=device), torch.tensor([1, 2, -100, 3], device=device)
    g, lse = torch.randn(4, device=device), torch.zeros(4, device=device)
    h, w = torch.randn(4, 6, device=device), torch.randn(10, 6, device=device)
    lg, cb = torch.randn(2, 5, device=device), torch.randn(5, 3, device=device)
    wts, _, _ = OPS.gumbel_softmax_fwd(lg, cb, 1.0, False, 0, 0)
    pc = torch.randn(3, device=device)
    return [
        ("logits", lambda: OPS.token_logprobs_fwd(x.t(), lab, -100)),
        ("logits", lambda: OPS.token_logprobs_fwd(x[None], lab, -100)),
        ("logits", lambda: OPS.token_logprobs_fwd(x.long(), lab, -100)),
        ("labels", lambda: OPS.token_logprobs_fwd(x, lab[:3], -100)),
        ("labels", lambda: OPS.token_logprobs_fwd(x, torch.stack([lab, lab], 1)[:, 0], -100)),
        ("grad_logp", lambda: OPS.token_logprobs_bwd(g[:2], x, lab, lse, -100)),
        ("lse", lambda: OPS.token_logprobs_bwd(g, x, lab, lse[None], -100)),
        ("logits", lambda: OPS.token_logprobs_bwd_(g, x.t().contiguous().t(), lab, lse, -100)),
        ("hidden", lambda: OPS.linear_token_logprobs_fwd(h.t(), w, None, lab, -100, 4)),
        ("weight", lambda: OPS.linear_token_logprobs_fwd(h, w.double(), None, lab, -100, 4)),
        ("weight", lambda: OPS.linear_token_logprobs_fwd(h, w[:, :, None], None, lab, -100, 4)),
        ("bias", lambda: OPS.linear_token_logprobs_fwd(h, w, torch.randn(9, device=device), lab, -100, 4)),
        ("chunk_size", lambda: OPS.linear_token_logprobs_fwd(h, w, None, lab, -100, 0)),
        ("need_bias", lambda: OPS.linear_token_logprobs_bwd(g, h, w, None, lab, lse, -100, 4, True, True, True)),
        ("lse", lambda: OPS.linear_token_logprobs_bwd(g, h, w, None, lab, lse[:3], -100, 4, True, True, False)),
        ("codebook", lambda: OPS.gumbel_softmax_fwd(lg, cb[:4], 1.0, False, 0, 0)),
        ("codebook", lambda: OPS.gumbel_softmax_fwd(lg, cb.t().contiguous().t(), 1.0, False, 0, 0)),
        ("tau", lambda: OPS.gumbel_softmax_fwd(lg, cb, 0.0, False, 0, 0)),
        ("seed", lambda: OPS.gumbel_softmax_fwd(lg, cb, 1.0, False, -1, 0)),
        ("offset", lambda: OPS.gumbel_softmax_fwd(lg, cb, 1.0, False, 0, 2**63 - 5)),
        ("soft", lambda: OPS.gumbel_softmax_bwd(torch.randn(2, 5, device=device), torch.randn(2, 3, device=device), wts,
                                                torch.randn(5, device=device), cb, 1.0, True, True)),
        ("grad_z", lambda: OPS.gumbel_softmax_bwd(torch.randn(2, 5, device=device), torch.randn(2, 4, device=device), wts,
                                                  wts.new_empty(0), cb, 1.0, True, True)),
        ("weights", lambda: OPS.gumbel_softmax_bwd(torch.randn(2, 5, device=device), torch.randn(2, 3, device=device),
                                                   wts.half(), wts.new_empty(0), cb, 1.0, True, True)),
        ("loss_type", lambda: OPS.preference_loss_fwd(pc, pc, pc, pc, None, None, None, None, "kto", 0.1, 0.0,
                                                      0.0, 0.0, True)),
        ("pr", lambda: OPS.preference_loss_fwd(pc, pc[:2], pc, pc, None, None, None, None, "dpo", 0.1, 0.0,
                                               0.0, 0.0, True)),
        ("rc", lambda: OPS.preference_loss_fwd(pc, pc, pc, None, None, None, None, None, "dpo", 0.1, 0.0, 0.0,
                                               0.0, True)),
        ("cl", lambda: OPS.preference_loss_fwd(pc, pc, None, None, None, None, None, None, "simpo", 2.0, 0.5,
                                               0.0, 0.0, True)),
        ("post", lambda: OPS.preference_loss_fwd(pc, pc, pc, pc, None, None, torch.randn(3, 4, device=device),
                                                 torch.randn(3, 5, device=device), "dpo", 0.1, 0.0, 0.0, 0.1, True)),
        ("prior", lambda: OPS.preference_loss_fwd(pc, pc, pc, pc, None, None, torch.randn(3, 4, device=device).t(),
                                                  torch.randn(4, 3, device=device), "dpo", 0.1, 0.0, 0.0, 0.1, True)),
        ("kl_weight", lambda: OPS.preference_loss_fwd(pc, pc, pc, pc, None, None, None, None, "dpo", 0.1, 0.0,
                                                      0.0, 0.1, True)),
        ("grad_loss", lambda: OPS.preference_loss_bwd(pc, pc, pc, pc, pc, pc, pc, pc, pc, None, None, None, None,
                                                      "dpo", 0.1, 0.0, 0.0, 0.0, True)),
        ("grad_kl", lambda: OPS.preference_loss_bwd(pc[0], pc, pc, pc, pc[:1], pc, pc, pc, pc, None, None, None,
                                                    None, "dpo", 0.1, 0.0, 0.0, 0.0, True)),
    ]


def public_op_cases(backend, device, family=None):
    """(op, args) pairs for every public custom op of ``lpc_kernels.ops`` and its backward ops on ``backend``
    (``family``: only those of one op family, e.g. ``"token_logprobs"``): both token modes, bias with and
    without a gradient, soft and hard samples, the three losses, and backward calls with outputs not asked for
    (their ``[0]`` placeholders must not alias)."""
    dev = dict(device=device)
    x = torch.randn(4, 33, **dev, requires_grad=True)
    labels = torch.tensor([0, 32, -100, 5], **dev)
    h, w = torch.randn(4, 8, **dev, requires_grad=True), torch.randn(33, 8, **dev, requires_grad=True)
    b, b_grad = torch.randn(33, **dev), torch.randn(33, **dev, requires_grad=True)
    lg, cb = torch.randn(3, 6, **dev, requires_grad=True), torch.randn(6, 4, **dev, requires_grad=True)
    pc, pr, rc, rr = (torch.randn(3, **dev, requires_grad=True) for _ in range(4))
    prior, post = torch.randn(3, 6, **dev, requires_grad=True), torch.randn(3, 6, **dev, requires_grad=True)
    lengths = torch.tensor([2, 3, 4], **dev)
    lse = token_logprobs_op(x, labels, -100, False, backend)[1].detach()
    lin_lse = linear_token_logprobs_op(h, w, b, labels, -100, 2, backend)[1].detach()
    weights, _, soft = gumbel_softmax_codes_op(lg, cb, 0.8, True, 3, 0, backend)
    g4, g3 = torch.randn(4, **dev), torch.randn(3, **dev)
    dpo = ("dpo", 0.1, 0.0, 0.1, 0.05, True, backend)
    cases = [
        (token_logprobs_op, (x, labels, -100, False, backend)),
        (token_logprobs_op, (x, labels, -100, True, backend)),
        (token_logprobs_backward_op, (g4, x.detach(), labels, lse, -100, backend)),
        (token_logprobs_backward_inplace_op, (g4, x.detach().clone(), labels, lse, -100, backend)),
        (linear_token_logprobs_op, (h, w, b, labels, -100, 2, backend)),
        (linear_token_logprobs_op, (h, w, b_grad, labels, -100, 2, backend)),
        (linear_token_logprobs_op, (h, w, None, labels, -100, 16, backend)),
        (linear_token_logprobs_frozen_head_op, (h, w.detach(), b, labels, -100, 2, backend)),
        (linear_token_logprobs_backward_op,
         (g4, h.detach(), w.detach(), b.detach(), labels, lin_lse, -100, 2, True, False, True, backend)),
        (linear_token_logprobs_backward_op,
         (g4, h.detach(), w.detach(), None, labels, lin_lse, -100, 2, True, False, False, backend)),
        (gumbel_softmax_codes_op, (lg, cb, 0.8, False, 3, 0, backend)),
        (gumbel_softmax_codes_op, (lg, cb, 0.8, True, 3, 0, backend)),
        (gumbel_softmax_codes_backward_op, (torch.randn(3, 6, **dev), torch.randn(3, 4, **dev),
                                                 weights.detach(), soft.detach(), cb.detach(), 0.8, True, True,
                                                 backend)),
        (gumbel_softmax_codes_backward_op, (torch.randn(3, 6, **dev), torch.randn(3, 4, **dev),
                                                 torch.softmax(lg.detach(), -1), torch.empty(0, **dev),
                                                 cb.detach(), 0.8, False, False, backend)),
        (preference_loss_op, (pc, pr, rc, rr, lengths, lengths, prior, post, *dpo)),
        (preference_loss_op, (pc, pr, rc, rr, lengths, lengths, prior, post, "ipo", 0.1, 0.0, 0.0, 0.05, True,
                                   backend)),
        (preference_loss_op, (pc, pr, None, None, lengths, lengths, None, None, "simpo", 2.0, 0.5, 0.0, 0.0,
                                   True, backend)),
        (preference_loss_backward_op, (torch.randn((), **dev), g3, g3, g3, g3, pc.detach(), pr.detach(),
                                            rc.detach(), rr.detach(), lengths, lengths, prior.detach(), post.detach(),
                                            *dpo)),
    ]
    return [(op, args) for op, args in cases if family is None or FAMILY[op] == family]


FAMILY = {token_logprobs_op: "token_logprobs", token_logprobs_backward_op: "token_logprobs",
          token_logprobs_backward_inplace_op: "token_logprobs", linear_token_logprobs_op: "linear_token_logprobs",
          linear_token_logprobs_backward_op: "linear_token_logprobs",
          linear_token_logprobs_frozen_head_op: "linear_token_logprobs",
          gumbel_softmax_codes_op: "gumbel_softmax_codes", gumbel_softmax_codes_backward_op: "gumbel_softmax_codes",
          preference_loss_op: "preference_loss",
          preference_loss_backward_op: "preference_loss"}
