"""The gradient filter (``filter_eps``, lpc_kernels/vocab_filter.py) of ``linear_preference_loss`` and of the
frozen-head path of ``linear_token_logprobs``, on every backend.

* The keep-or-skip decision against its promise in float64 (dropped columns: no label, below eps on every row,
  at most eps of any row's mass together); a near-uniform softmax (random init) loses nothing.
* The error bound of docs/design.md (``filter_eps``) against the float64 softmax: each gradient is within the
  bound computed from the entries below ``eps`` (a superset of the skipped ones) and the per-row mass bound, on
  peaked logits whose labels partly sit among negligible columns (a dropped label column would break the bound by
  orders of magnitude); something is really skipped (the gradients differ from the exact ones); values are never
  filtered; ``eps = 0`` is exact.
"""

import pytest
import torch
from torch.library import opcheck

import lpc_kernels as lk
from lpc_kernels import vocab_filter
from lpc_kernels.ops.linear_preference_loss import linear_preference_loss_op
from lpc_kernels.ops.linear_token_logprobs import linear_token_logprobs_frozen_head_op
from tests.helpers.backend_checks import new_leaf
from tests.helpers.formulas import f_preference

EPS = 1e-3
B, T, H, V = 3, 6, 8, 300


def peaked(seed=0):
    """Logits decaying along the vocabulary (bias), so column maxima cross eps; labels mostly among the likely
    columns, some deep among the negligible ones."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    bias = -0.08 * torch.arange(V) + 0.5 * torch.randn(V, generator=g)
    labels = torch.randint(0, 40, (2 * B, T), generator=g)
    labels[:, 0] = -100
    labels[1, 1], labels[B + 2, 4], labels[0, 5] = 250, 131, 299  # columns kept only for their label
    labels[2, 5] = -100
    return hidden, weight, bias, labels


def small_mass(x64, labels):
    """``p * [p < eps]`` ``[N, V]`` of the float64 softmax, zero on ignored rows: the entries the filter may drop."""
    p = torch.softmax(x64, -1)
    return torch.where((p < EPS) & (labels != -100)[:, None], p, 0.0)


def check_dropped(x, labels, cols):
    """The filter's promise, in float64: every dropped column is no scored row's label, below EPS on every scored
    row, and all of them together hold at most EPS of any scored row's softmax mass."""
    scored = labels != -100
    p = torch.softmax(x.double(), -1)[scored]
    drop = torch.ones(x.shape[1], dtype=torch.bool)
    drop[cols] = False
    assert not drop[labels[scored]].any()
    assert (p[:, drop] < EPS).all()
    assert (p[:, drop].sum(1) <= EPS * (1 + 1e-5)).all()
    return drop


def test_kept_columns_keeps_its_promise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, V, generator=g) * 2 - 0.06 * torch.arange(V)
    labels = torch.tensor([3, 120, -100, 10, 299, 7, -100])
    x[2, 200] = 30.0  # huge, but on an ignored row: no reason to keep it
    lse, x0 = torch.logsumexp(x, -1), x.clone()
    cols = vocab_filter.kept_columns(x, lse, labels, -100, EPS)
    drop = check_dropped(x0, labels, cols)
    assert drop[200] and drop.sum() > V / 2  # the filter does drop
    scored = labels != -100
    torch.testing.assert_close(x[scored], torch.log_softmax(x0, -1)[scored])  # x became the log-softmax
    assert (x[~scored] == -torch.inf).all()


def test_near_uniform_softmax_drops_nothing():
    """At random init every entry (~1/V) is below eps but together they are all the mass: nothing may go."""
    x = torch.randn(9, 5000, generator=torch.Generator().manual_seed(3)) * 0.1
    labels = torch.randint(0, 5000, (9,))
    assert vocab_filter.kept_columns(x, torch.logsumexp(x, -1), labels, -100, 2.0**-12) is None
    x = torch.randn(9, 5000) * 0.1
    x[:, :3] += 20.0  # peaked on three columns: now the small ones are negligible together
    cols = vocab_filter.kept_columns(x.clone(), torch.logsumexp(x, -1), labels, -100, 2.0**-12)
    check_dropped(x, labels, cols)
    assert cols.numel() < 100


def run_loss(backend, eps, chunk_size):
    hidden, weight, bias, labels = peaked()
    g = torch.Generator().manual_seed(2)
    t = dict(hidden=new_leaf(hidden), weight=new_leaf(weight), bias=new_leaf(bias),
             z=new_leaf(torch.randn(B, H, generator=g) * 0.3))
    ref = torch.randn(2, B, generator=g) * 3
    out = lk.linear_preference_loss(t["hidden"], t["weight"], labels, bias=t["bias"], z=t["z"],
                                    ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], beta=0.5,
                                    backend=backend, chunk_size=chunk_size, filter_eps=eps)
    out.loss.backward()
    return out, {k: v.grad for k, v in t.items()}, t, labels, ref


@pytest.mark.parametrize("chunk_size", [1, 12, 1000])
def test_fused_loss_gradients_within_the_bound(backend, chunk_size):
    exact, g0, t, labels, ref = run_loss(backend, 0.0, chunk_size)
    out, g1, _, _, _ = run_loss(backend, EPS, chunk_size)
    for a, b in zip(out, exact):
        assert torch.equal(a, b)  # values never filtered
    # float64: d loss / d logp of each position, and the entries below eps
    d = {k: v.detach().double() for k, v in t.items()}
    h = (d["hidden"] + torch.cat([d["z"], d["z"]])[:, None, :]).reshape(-1, H)
    x = h @ d["weight"].T + d["bias"]
    flat = labels.reshape(-1)
    tok = torch.log_softmax(x, -1).gather(1, flat.clamp(min=0)[:, None]).squeeze(1).where(flat != -100, 0.0)
    tok.requires_grad_(True)
    seq = tok.view(2 * B, T).sum(1)
    loss = f_preference(seq[:B], seq[B:], ref[0], ref[1], None, None, None, None, "dpo", 0.5, 0.0, 0.0, 0.0,
                        True)[0]
    (g_tok,) = torch.autograd.grad(loss, tok)
    small = small_mass(x, flat) * g_tok.abs()[:, None]  # [N, V]: |g_i| p_iv on the entries below eps
    # and each row drops at most eps of its mass
    bound_h = torch.minimum(small @ d["weight"].abs(), EPS * g_tok.abs()[:, None] * d["weight"].abs().amax(0))
    bounds = dict(hidden=bound_h.view(2 * B, T, H), z=bound_h.view(2, B, T, H).sum((0, 2)),
                  weight=small.T @ h.abs(), bias=small.sum(0))
    for name, bound in bounds.items():
        err = (g1[name].double() - g0[name].double()).abs()
        assert (err <= bound + 1e-6).all(), f"{name}: worst excess {(err - bound).max():.3g}"
    assert (g1["weight"] != g0["weight"]).any()  # columns were skipped


def test_frozen_head_factor_within_the_bound(backend):
    hidden, weight, bias, labels = peaked()
    grads = []
    for eps in (0.0, EPS):
        h = new_leaf(hidden)
        out = lk.linear_token_logprobs(h, weight, labels, bias=bias, backend=backend, chunk_size=5, filter_eps=eps)
        g = torch.linspace(-2, 2, out.numel()).view(out.shape)
        out.backward(g)
        grads.append((out.detach(), h.grad))
    (out0, gh0), (out1, gh1) = grads
    assert torch.equal(out0, out1)
    flat = labels.reshape(-1)
    x = hidden.reshape(-1, H).double() @ weight.double().T + bias.double()
    g_abs = g.reshape(-1, 1).double().abs()
    bound = torch.minimum((small_mass(x, flat) * g_abs) @ weight.double().abs(),
                          EPS * g_abs * weight.double().abs().amax(0))
    err = (gh1 - gh0).reshape(-1, H).double().abs()
    assert (err <= bound + 1e-6).all() and (err > 0).any()


def test_filter_opcheck(backend):
    hidden, weight, bias, labels = peaked()
    flat = labels.reshape(-1)
    keep = flat != -100
    h = hidden.reshape(-1, H)[keep].requires_grad_(True)
    ids = torch.arange(2 * B)[:, None].expand(2 * B, T).reshape(-1)[keep]
    lengths = (labels != -100).sum(1).tolist()
    ref = torch.zeros(B)
    opcheck(linear_preference_loss_op,
            (h, weight.requires_grad_(True), bias, flat[keep], ids, lengths, None, None, ref, ref, None, None,
             "dpo", 0.1, 0.0, 0.0, 0.0, True, -100, 12, [True, True, False, False, False, False], backend, EPS))
    opcheck(linear_token_logprobs_frozen_head_op, (h, weight.detach(), bias, flat[keep], -100, 7, backend, EPS))
