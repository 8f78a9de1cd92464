"""``lk.linear_preference_loss`` (lpc_kernels/ops/linear_preference_loss.py), on every backend.

* The backend table against the float64 composition of the formulas of tests/helpers/formulas.py (the LM head's
  log-softmax, then the pair loss and KL): values and the gradients to hidden, weight, bias, z, the reference
  log-probs and the code logits; both layouts; chunk sizes from one pair per chunk to all pairs in one.
* Against today's ops on the same backend (``linear_token_logprobs`` + ``preference_loss``), fp32 and bf16.
* gradcheck (float64), opcheck, torch.compile(fullgraph=True), frozen head / no grad, not twice differentiable,
  at most one chunk of logits held, bad inputs.
"""

import pytest
import torch
from torch.library import opcheck

import lpc_kernels as lk
from lpc_kernels.backends import backend_module
from lpc_kernels.ops.linear_preference_loss import GradRequests, linear_preference_loss_op, pair_chunks
from tests.helpers.backend_checks import assert_compiled_matches_eager, check_bad_input, new_leaf, truth_close
from tests.helpers.formulas import f_linear_token_logprobs, f_preference

B, T, H, V, K = 3, 5, 8, 37, 4
CASES = {
    "dpo": dict(loss_type="dpo", beta=0.3, label_smoothing=0.1, kl_weight=0.5),
    "ipo": dict(loss_type="ipo", beta=0.2, kl_weight=1.0),
    "ipo_sum": dict(loss_type="ipo", beta=0.2, kl_weight=0.0, ipo_average=False),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.3, kl_weight=0.2),
}


def make_inputs(dtype=torch.float32, seed=0, bias=True, z=True, codes=True, ref=True):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        hidden=torch.randn(2 * B, T, H, generator=g), weight=torch.randn(V, H, generator=g) / H**0.5,
        bias=torch.randn(V, generator=g) if bias else None, z=torch.randn(B, H, generator=g) * 0.5 if z else None,
        ref_chosen_logps=torch.randn(B, generator=g) * 3 if ref else None,
        ref_rejected_logps=torch.randn(B, generator=g) * 3 if ref else None,
        prior_logits=torch.randn(B, K, generator=g) if codes else None,
        posterior_logits=torch.randn(B, K, generator=g) if codes else None)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt positions
    labels[1, 4:] = -100  # padding
    labels[B + 2, 3:] = -100
    t = {k: new_leaf(v, dtype if k in ("hidden", "weight", "bias") else None) if v is not None else None
         for k, v in t.items()}
    return t, labels


def options(case):
    return dict(CASES[case])


def truth(t, labels, case):
    """float64: z added to each answer's positions, log-softmax of the head, sums, then the pair loss + KL."""
    d = {k: new_leaf(v, torch.float64) if v is not None else None for k, v in t.items()}
    h = d["hidden"] + (torch.cat([d["z"], d["z"]])[:, None, :] if d["z"] is not None else 0)
    logp = f_linear_token_logprobs(h, d["weight"], labels, d["bias"]).sum(-1)
    n = (labels != -100).sum(-1)
    opts = options(case)
    loss_type = opts["loss_type"]
    rc, rr = (d["ref_chosen_logps"], d["ref_rejected_logps"]) if loss_type != "simpo" else (None, None)
    out = f_preference(logp[:B], logp[B:], rc, rr, n[:B], n[B:], d["prior_logits"], d["posterior_logits"],
                       loss_type, opts["beta"], opts.get("gamma", 0.0), opts.get("label_smoothing", 0.0),
                       opts["kl_weight"], opts.get("ipo_average", True))
    return d, out, logp


def call(t, labels, case, backend, **kw):
    args = {k: v for k, v in t.items() if k not in ("hidden", "weight")}
    if options(case)["loss_type"] == "simpo":
        args.pop("ref_chosen_logps"), args.pop("ref_rejected_logps")
    return lk.linear_preference_loss(t["hidden"], t["weight"], labels, **args, **options(case), backend=backend,
                                     **kw)


# ------------------------------------------------------------------------------- the backend table
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_float64_formula(backend, case, chunk_size):
    t, labels = make_inputs()
    out = call(t, labels, case, backend, chunk_size=chunk_size)
    d, ref, logp = truth(t, labels, case)
    assert out.loss.dtype == torch.float32 and out.chosen_logps.shape == (B,)
    for ours, want in zip(out[:5], ref):
        truth_close(ours, want, rtol=1e-5, atol=1e-5)
    truth_close(out.chosen_logps, logp[:B], atol=1e-4)
    truth_close(out.rejected_logps, logp[B:], atol=1e-4)
    g_kl = torch.randn(B)
    torch.autograd.backward([out.loss, out.kl], [torch.tensor(1.5), g_kl])
    torch.autograd.backward([ref[0], ref[4]], [torch.tensor(1.5, dtype=torch.float64), g_kl.double()])
    for name, leaf in t.items():
        if leaf is None or (name.startswith("ref_") and options(case)["loss_type"] == "simpo"):
            continue
        truth_close(leaf.grad, d[name].grad, rtol=1e-4, atol=1e-5, what=name)


def test_packed_layout_equals_padded(backend):
    """The scored positions alone, sorted by sequence, with their counts: the same values and gradients."""
    t, labels = make_inputs()
    out = call(t, labels, "dpo", backend, chunk_size=9)
    out.loss.backward()
    padded = {k: v.grad.clone() for k, v in t.items() if v is not None and v.grad is not None}
    keep = labels != -100
    hidden = new_leaf(t["hidden"].detach()[keep])
    packed = dict(t, hidden=hidden)
    for v in t.values():
        if v is not None:
            v.grad = None
    ids = torch.arange(2 * B)[:, None].expand(2 * B, T)[keep]
    out2 = call(packed, labels[keep], "dpo", backend, chunk_size=9, sequence_ids=ids,
                sequence_lengths=keep.sum(1).tolist())
    out2.loss.backward()
    for a, b in zip(out, out2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, padded.pop("hidden")[keep], rtol=1e-6, atol=1e-7)
    for name, g in padded.items():
        torch.testing.assert_close(t[name].grad, g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_composition_of_todays_ops(backend, dtype):
    """linear_token_logprobs on hidden + z, then preference_loss: the same values and gradients (bf16: within
    one rounding of the bf16 gradients)."""
    t, labels = make_inputs(dtype)
    out = call(t, labels, "ipo", backend, chunk_size=8)
    out.loss.backward()
    ours = {k: v.grad.clone() for k, v in t.items() if v is not None and v.grad is not None}
    for v in t.values():
        if v is not None:
            v.grad = None
    h = t["hidden"] + torch.cat([t["z"], t["z"]]).to(dtype)[:, None, :]
    s = lk.linear_token_logprobs(h, t["weight"], labels, bias=t["bias"], backend=backend).sum(-1)
    n = (labels != -100).sum(-1)
    o2 = lk.preference_loss(s[:B], s[B:], t["ref_chosen_logps"], t["ref_rejected_logps"], chosen_lengths=n[:B],
                            rejected_lengths=n[B:], prior_logits=t["prior_logits"],
                            posterior_logits=t["posterior_logits"], **options("ipo"), backend=backend)
    o2.loss.backward()
    for a, b in zip(out[:5], o2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name, g in ours.items():
        assert g.dtype == t[name].dtype, name
        torch.testing.assert_close(g.float(), t[name].grad.float(), **tol, msg=name)


def test_frozen_head_and_no_grad(backend):
    t, labels = make_inputs(bias=False)
    t["weight"] = t["weight"].detach()
    out = call(t, labels, "dpo", backend)
    out.loss.backward()
    assert t["weight"].grad is None and t["hidden"].grad is not None
    d, ref, _ = truth(t, labels, "dpo")
    ref[0].backward()
    truth_close(t["hidden"].grad, d["hidden"].grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        out2 = call(t, labels, "dpo", backend)
    assert not out2.loss.requires_grad
    torch.testing.assert_close(out2.loss, out.loss.detach())


def test_reference_logps_gradient_without_code_logits_gradient(backend):
    """Only hidden and the reference log-probs require grad, with the loss and the kl both reaching backward: the op
    returns no code-logits gradient it was not asked for."""
    t, labels = make_inputs()
    for name in ("weight", "bias", "z", "prior_logits", "posterior_logits"):
        t[name] = t[name].detach()
    out = call(t, labels, "dpo", backend)
    torch.autograd.backward([out.loss, out.kl], [torch.tensor(1.5), torch.ones(B)])
    d, ref, _ = truth(t, labels, "dpo")
    ref[0].backward(torch.tensor(1.5, dtype=torch.float64))
    for name in ("hidden", "ref_chosen_logps", "ref_rejected_logps"):
        truth_close(t[name].grad, d[name].grad, rtol=1e-4, atol=1e-5, what=name)


def test_not_twice_differentiable(backend):
    t, labels = make_inputs()
    out = call(t, labels, "dpo", backend)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(out.loss, t["hidden"], create_graph=True)


def test_gradcheck_float64(backend):
    t, labels = make_inputs(torch.float64)
    names = [k for k, v in t.items() if v is not None]
    t = {k: (v.double() if v is not None else None) for k, v in t.items()}

    def f(*leaves):
        kw = dict(zip(names, leaves))
        o = lk.linear_preference_loss(kw.pop("hidden"), kw.pop("weight"), labels, **kw, loss_type="dpo", beta=0.5,
                                      kl_weight=0.3, backend=backend, chunk_size=6)
        return o.loss, o.kl

    leaves = [new_leaf(t[k].detach()) for k in names]
    # under the Triton interpreter the full Jacobian takes minutes: one random direction there (fast_mode)
    assert torch.autograd.gradcheck(f, leaves, atol=1e-6, fast_mode=backend == "triton")


def test_opcheck(backend):
    t, labels = make_inputs()
    keep = labels != -100
    ids = torch.arange(2 * B)[:, None].expand(2 * B, T)[keep]
    lengths = keep.sum(1).tolist()
    h = t["hidden"].detach()[keep].requires_grad_(True)
    base = (h, t["weight"], t["bias"], labels[keep], ids, lengths, None, t["z"], t["ref_chosen_logps"],
            t["ref_rejected_logps"], t["prior_logits"], t["posterior_logits"], "dpo", 0.1, 0.0, 0.0, 0.5, True,
            -100, 7)
    opcheck(linear_preference_loss_op, base + (list(GradRequests(*[True] * 6)), backend))
    # the reference log-probs' gradients without the code logits': only what is requested comes back
    some = GradRequests(hidden=True, weight=False, bias=False, z=True, ref_logps=True, code_logits=False)
    opcheck(linear_preference_loss_op, base + (list(some), backend))
    pos = torch.nonzero(keep.reshape(-1)).squeeze(1)
    flat = t["hidden"].detach().reshape(-1, H).requires_grad_(True)
    frozen = (flat, t["weight"].detach(), None, labels.reshape(-1)[pos], ids, lengths, pos, None, None, None, None,
              None, "simpo", 2.0, 0.5, 0.0, 0.0, True, -100, 1000)
    only_hidden = GradRequests(hidden=True, weight=False, bias=False, z=False, ref_logps=False, code_logits=False)
    opcheck(linear_preference_loss_op, frozen + (list(only_hidden), backend))


def test_torch_compile_fullgraph_packed(backend):
    torch._dynamo.reset()
    t, labels = make_inputs()
    keep = labels != -100
    ids = torch.arange(2 * B)[:, None].expand(2 * B, T)[keep]
    lengths = keep.sum(1).tolist()
    h, scored = new_leaf(t["hidden"].detach()[keep]), labels[keep]

    def step(h, w, z):
        o = lk.linear_preference_loss(h, w, scored, z=z, ref_chosen_logps=t["ref_chosen_logps"].detach(),
                                      ref_rejected_logps=t["ref_rejected_logps"].detach(), backend=backend,
                                      sequence_ids=ids, sequence_lengths=lengths)
        return o.loss

    assert_compiled_matches_eager(step, (h, t["weight"], t["z"]))


def test_holds_one_pair_chunk_of_logits(backend, monkeypatch):
    """With chunk_size c the logits blocks have at most max(c, longest pair) rows."""
    module = backend_module(backend)
    rows = []

    def recording(logits, labels, ignore_index, fwd=module.token_logprobs_fwd):
        rows.append(logits.shape[0])
        return fwd(logits, labels, ignore_index)

    monkeypatch.setattr(module, "token_logprobs_fwd", recording)
    t, labels = make_inputs(bias=False)
    lengths = (labels != -100).sum(1).tolist()
    longest = max(lengths[p] + lengths[B + p] for p in range(B))
    for c in (1, 7):
        rows.clear()
        call(t, labels, "dpo", backend, chunk_size=c).loss.backward()
        assert rows and max(rows) <= max(c, longest) and sum(rows) == sum(lengths)


def test_pair_chunks():
    assert pair_chunks([3, 3, 3, 3, 3, 3], 6) == [(0, 1), (1, 2), (2, 3)]
    assert pair_chunks([3, 3, 3, 3, 3, 3], 12) == [(0, 2), (2, 3)]
    assert pair_chunks([9, 1, 1, 1], 4) == [(0, 1), (1, 2)]  # a longer pair is a chunk by itself
    assert pair_chunks([2, 2], 100) == [(0, 1)]


def bad(**kw):
    t, labels = make_inputs(bias=False, z=False, codes=False)
    args = dict(hidden=t["hidden"].detach(), weight=t["weight"].detach(), labels=labels,
                ref_chosen_logps=t["ref_chosen_logps"].detach(), ref_rejected_logps=t["ref_rejected_logps"].detach())
    args.update(kw)
    return lambda backend: lk.linear_preference_loss(**args, backend=backend)


BAD = [
    ("odd rows", bad(hidden=torch.randn(3, T, H), labels=torch.zeros(3, T, dtype=torch.long)), ValueError, "2B"),
    ("labels shape", bad(labels=torch.zeros(2 * B, T + 1, dtype=torch.long)), ValueError, "labels"),
    ("label >= V", bad(labels=torch.full((2 * B, T), V)), ValueError, "labels"),
    ("z shape", bad(z=torch.randn(B + 1, H)), ValueError, "z"),
    ("ref missing", bad(ref_rejected_logps=None), ValueError, "ref_"),
    ("simpo no tokens", bad(ref_chosen_logps=None, ref_rejected_logps=None, loss_type="simpo",
                            labels=torch.full((2 * B, T), -100)), ValueError, "scored tokens"),
    ("ids without lengths", bad(sequence_ids=torch.zeros(2 * B * T, dtype=torch.long)), ValueError, "sequence_"),
    ("lengths sum", bad(hidden=torch.randn(4, H), labels=torch.zeros(4, dtype=torch.long),
                        sequence_ids=torch.zeros(4, dtype=torch.long), sequence_lengths=[1, 1, 1, 0, 0, 0]),
     ValueError, "sum to N"),
    ("ids disagree with lengths", bad(hidden=torch.randn(6, H), labels=torch.zeros(6, dtype=torch.long),
                                      sequence_ids=torch.tensor([0, 1, 2, 3, 5, 4]), sequence_lengths=[1] * 6),
     ValueError, "position 4 has 5, expected 4"),
    ("beta", bad(beta=0.0), ValueError, "beta"),
    ("chunk_size", bad(chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(backend, case):
    check_bad_input(case, backend)
