"""Property-based tests (hypothesis) of every op on every CPU-testable backend against the float64 formulas of
``tests/helpers/formulas.py``: random shapes (N = 1, V = 1..3 and V not a multiple of any block, K = 1, B = 1),
dtypes, strides (transposed, sliced, expanded inputs), ignore patterns (none, all, alternating, random),
extreme values (|x| up to 1e4, ``-inf`` entries and ``-inf`` bias over whole leading vocabulary blocks),
forward and backward.

Profiles: ``ci`` (the default: derandomized, so CI sees the same examples every run, about a minute) and
``long`` (``HYPOTHESIS_PROFILE=long``: random, many more examples, for nightly runs).

Bound of every comparison (the numerics contract, ``docs/design.md``, "Numerics", widened for magnitude):
``|ours - truth| <= 2 |same - truth| + atol + rtol |truth|``, ``truth`` float64 math on the dtype-rounded inputs,
``same`` PyTorch doing the computation in the op's compute dtype, ``atol`` growing with the magnitude of the
terms (``4 eps (terms + 1) max|term|``), one rounding of the output dtype added for 16-bit gradients.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lpc_kernels as lk
from lpc_kernels import philox
from tests.helpers.backend_checks import CPU_BACKENDS
from tests.helpers.formulas import f_gumbel, f_linear_token_logprobs, f_preference, f_token_logprobs

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def _examples(backend, n):
    """The ci profile spends fewer examples on the Triton interpreter (slow); long runs them all alike."""
    profile = settings.get_profile(PROFILE)
    if PROFILE != "ci":
        return profile
    return settings(profile, max_examples=n if backend != "triton" else max(4, n // 3))


def _eps(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _close(ours, truth, same, *, atol, what, rtol=1e-5, out_dtype=None, terms=None):
    """``|ours - truth| <= 2 |same - truth| + atol + rtol |truth|`` (+ one rounding of a 16-bit ``out_dtype``, of
    ``|truth|`` or, for sums whose terms are rounded (``terms``: the sum of their magnitudes), of ``terms``),
    equal infinities allowed."""
    if terms is not None:
        atol = atol + torch.finfo(out_dtype).eps * terms.detach().double()[~torch.isinf(truth.detach())]
    ours, truth, same = (t.detach().double() for t in (ours, truth, same))
    assert ours.shape == truth.shape, (what, ours.shape, truth.shape)
    inf = torch.isinf(truth)
    assert torch.equal(ours[inf], truth[inf]), f"{what}: infinities differ"
    o, t, s = ours[~inf], truth[~inf], same[~inf]
    assert torch.isfinite(o).all(), f"{what}: non-finite values {o[~torch.isfinite(o)][:4].tolist()}"
    bound = 2 * (s - t).abs().nan_to_num(0.0) + atol + rtol * t.abs()
    if out_dtype in (torch.bfloat16, torch.float16):
        bound = bound + t.abs() * torch.finfo(out_dtype).eps
    err = o - t
    assert (err.abs() <= bound).all(), f"{what}: max error {err.abs().max().item():.3e}, worst excess " \
                                       f"{(err.abs() - bound).max().item():.3e}"


def _view(leaf: torch.Tensor, layout: str, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` view of ``layout`` over a leaf that ``_layout`` built (or a copy of one)."""
    if layout == "transposed":
        return leaf.T
    if layout == "sliced":
        return leaf[:, ::2]
    if layout == "expanded":
        return leaf.expand(rows, cols)
    return leaf


def _layout(base: torch.Tensor, layout: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, view)``: a ``[rows, cols]`` view of the given layout over a fresh leaf built from ``base``
    (``[rows, cols]`` values; ``expanded`` repeats the first row)."""
    if layout == "transposed":
        leaf = base.T.contiguous()
    elif layout == "sliced":
        leaf = torch.zeros(rows, 2 * cols, dtype=base.dtype)
        leaf[:, ::2] = base
    elif layout == "expanded":
        leaf = base[:1].clone()
    else:
        leaf = base.clone()
    leaf.requires_grad_(True)
    return leaf, _view(leaf, layout, rows, cols)


def _recast(leaf: torch.Tensor, dtype: torch.dtype, layout: str, rows: int, cols: int) -> torch.Tensor:
    """The ``layout`` view of a fresh leaf copy of ``leaf`` in ``dtype``: the formulas' input, same strides."""
    return _view(leaf.detach().to(dtype).requires_grad_(True), layout, rows, cols)


def _labels(n, v, pattern, low, gen):
    labels = torch.randint(low, v, (n,), generator=gen)
    if pattern == "all":
        labels[:] = IGNORE
    elif pattern == "alternating":
        labels[1::2] = IGNORE
    elif pattern == "random":
        labels[torch.rand(n, generator=gen) < 0.4] = IGNORE
    return labels


def _grads(outputs, leaves, upstream):
    """Gradients of ``sum(upstream * outputs)`` with respect to ``leaves`` (zeros where a leaf gets none; outputs
    without a graph, such as the KL without logits, are left out)."""
    if isinstance(outputs, (list, tuple)):
        pairs = [(o, u) for o, u in zip(outputs, upstream) if o.requires_grad]
        outputs, upstream = [o for o, _ in pairs], [u for _, u in pairs]
    got = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]


# ---------------------------------------------------------------------------------------- token_logprobs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_properties(backend):
    @_examples(backend, 100)
    @example(n=3, v=700, dtype=torch.float32, layout="contiguous", scale=1.0, neg_inf="leading", ignore="none",
             seed=1)  # a -inf first tile (every backend's tiles are <= 512 wide)
    @given(n=st.integers(1, 6), v=st.one_of(st.integers(1, 3), st.integers(4, 70), st.integers(513, 700)),
           dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([1.0, 30.0, 1e4]),
           neg_inf=st.sampled_from(["none", "entries", "leading"]),
           ignore=st.sampled_from(["none", "all", "alternating", "random"]), seed=st.integers(0, 2**31 - 1))
    def check(n, v, dtype, layout, scale, neg_inf, ignore, seed):
        gen = torch.Generator().manual_seed(seed)
        base = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
        low = 0
        if neg_inf != "none" and v > 1:
            cut = v // 2 if neg_inf == "leading" else 0
            mask = torch.zeros(n, v, dtype=torch.bool)
            if neg_inf == "leading":
                mask[:, :cut] = True
            else:
                mask = torch.rand(n, v, generator=gen) < 0.3
                mask[:, -1] = False  # a finite entry per row: the label's
            base = base.masked_fill(mask, float("-inf"))
            low = cut if neg_inf == "leading" else v - 1
        labels = _labels(n, v, ignore, low, gen)
        if neg_inf == "entries" and v > 1:
            labels = torch.where(labels == IGNORE, labels, torch.full_like(labels, v - 1))
        leaf, logits = _layout(base, layout, n, v)
        ours = lk.token_logprobs(logits, labels, backend=backend)
        logits64 = _recast(leaf, torch.float64, layout, n, v)
        truth = f_token_logprobs(logits64, labels)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        same = f_token_logprobs(logits64.detach().to(cdt), labels).to(cdt)
        finite = logits64.detach().masked_fill(torch.isinf(logits64.detach()), 0)
        atol = 1e-5 + 4 * _eps(dtype) * (v + 1) * float(finite.abs().max())
        assert ours.dtype == cdt
        _close(ours, truth, same, atol=atol, what=f"{backend} logp")
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        (got,) = _grads(ours, [logits], g.to(ours.dtype))
        (want,) = _grads(truth, [logits64], g)
        same_view = _recast(leaf, cdt, layout, n, v)
        (same_g,) = _grads(f_token_logprobs(same_view, labels).to(cdt), [same_view], g.to(cdt))
        assert got.dtype == dtype and torch.isfinite(got).all()
        _close(got, want, same_g, atol=atol, what=f"{backend} grad", out_dtype=dtype)

    check()


# -------------------------------------------------------------------------------- linear_token_logprobs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:linear_token_logprobs. weight .* is not contiguous")  # strided weights, on purpose
def test_linear_token_logprobs_properties(backend):
    @_examples(backend, 100)
    @example(n=3, h=8, v=1100, dtype=torch.float32, h_layout="contiguous", w_layout="contiguous", scale=1.0,
             bias="leading-inf", ignore="none", seed=1)  # -inf bias over whole leading tiles (was NaN on triton)
    @given(n=st.integers(1, 6), h=st.integers(1, 24),
           v=st.one_of(st.integers(1, 3), st.integers(4, 70), st.integers(513, 1300)),
           dtype=st.sampled_from(DTYPES), h_layout=st.sampled_from(LAYOUTS), w_layout=st.sampled_from(LAYOUTS),
           scale=st.sampled_from([1.0, 10.0, 100.0]), bias=st.sampled_from(["none", "random", "leading-inf"]),
           ignore=st.sampled_from(["none", "all", "alternating", "random"]), seed=st.integers(0, 2**31 - 1))
    def check(n, h, v, dtype, h_layout, w_layout, scale, bias, ignore, seed):
        gen = torch.Generator().manual_seed(seed)
        hb = (torch.randn(n, h, generator=gen, dtype=torch.float64) * scale).to(dtype)
        wb = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype)
        low = 0
        b_leaf = None
        if bias != "none":
            b = torch.randn(v, generator=gen, dtype=torch.float64)
            if bias == "leading-inf" and v > 1:
                low = max(1, (v * 3) // 4)  # with v > 512: a whole leading block of every backend's tiles
                b[:low] = float("-inf")
            b_leaf = b.to(dtype).requires_grad_(True)
        labels = _labels(n, v, ignore, low, gen)
        h_leaf, hidden = _layout(hb, h_layout, n, h)
        w_leaf, weight = _layout(wb, w_layout, v, h)
        ours = lk.linear_token_logprobs(hidden, weight, labels, bias=b_leaf, backend=backend)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        b64 = None if b_leaf is None else b_leaf.detach().double().requires_grad_(True)
        views64 = [_recast(h_leaf, torch.float64, h_layout, n, h), _recast(w_leaf, torch.float64, w_layout, v, h)]
        truth = f_linear_token_logprobs(*views64, labels, b64)
        b_same = None if b_leaf is None else b_leaf.detach().to(cdt).requires_grad_(True)
        hs, ws = _recast(h_leaf, cdt, h_layout, n, h), _recast(w_leaf, cdt, w_layout, v, h)
        logits_same = hs @ ws.T + (b_same if b_same is not None else 0)
        same = f_token_logprobs(logits_same, labels).to(cdt)
        terms = (hs.detach().abs() @ ws.detach().abs().T).max() + (0 if b_leaf is None else
                                                                     b_leaf.detach().nan_to_num(0, 0, 0).abs().max())
        atol = 1e-5 + 4 * _eps(dtype) * (h + v + 1) * float(terms)
        assert ours.dtype == cdt
        _close(ours, truth, same, atol=atol, what=f"{backend} logp")
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        got = _grads(ours, [hidden, weight] + ([b_leaf] if b_leaf is not None else []), g.to(ours.dtype))
        want = _grads(truth, views64 + ([b64] if b64 is not None else []), g)
        same_g = _grads(same, [hs, ws] + ([b_same] if b_same is not None else []), g.to(cdt))
        terms = [None] * 3
        if dtype in (torch.bfloat16, torch.float16):
            # 16-bit: the triton and cuda backends round D = g (onehot - p) to the input dtype before the gradient
            # products (docs/design.md, "Numerics"), an error of one rounding per term of each sum
            x = (views64[0] @ views64[1].T + (0 if b64 is None else b64)).detach()
            valid = labels != IGNORE
            d = (g[:, None] * torch.softmax(x, -1)).nan_to_num(0.0).abs() + valid[:, None] * g.abs()[:, None]
            d = d * valid[:, None]
            terms = [d @ views64[1].detach().abs(), d.T @ views64[0].detach().abs(), d.sum(0)]
        for name, a, w_, s, t in zip(("hidden", "weight", "bias"), got, want, same_g, terms):
            assert a.dtype == dtype and torch.isfinite(a).all(), name
            # gradients are sums over N (weight, bias) or V (hidden) terms of the same magnitude as the logits'
            _close(a, w_, s, atol=atol * max(1.0, scale), what=f"{backend} grad_{name}", out_dtype=dtype,
                   terms=None if t is None else t.reshape(a.shape))

    check()


# -------------------------------------------------------------------------------- gumbel_softmax_codes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gumbel_softmax_codes_properties(backend):
    @_examples(backend, 80)
    @given(b=st.integers(1, 5), k=st.integers(1, 9), d=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
           layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([1.0, 30.0, 1e4]),
           tau=st.sampled_from([0.1, 0.5, 1.0, 3.0]), hard=st.booleans(), seed=st.integers(0, 2**63 - 1),
           offset=st.integers(0, 2**40), data_seed=st.integers(0, 2**31 - 1))
    def check(b, k, d, dtype, layout, scale, tau, hard, seed, offset, data_seed):
        gen = torch.Generator().manual_seed(data_seed)
        lb = (torch.randn(b, k, generator=gen, dtype=torch.float64) * scale).to(dtype)
        cb_leaf = torch.randn(k, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
        l_leaf, logits = _layout(lb, layout, b, k)
        w, z = lk.gumbel_softmax_codes(logits, cb_leaf, tau=tau, hard=hard, seed=seed, offset=offset,
                                       backend=backend)
        l64, c64 = _recast(l_leaf, torch.float64, layout, b, k), cb_leaf.detach().double().requires_grad_(True)
        w64, z64 = f_gumbel(l64, c64, tau, hard, seed, offset)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        ls, cs = _recast(l_leaf, cdt, layout, b, k), cb_leaf.detach().to(cdt).requires_grad_(True)
        ws, zs = f_gumbel(ls, cs, tau, hard, seed, offset)
        ws, zs = ws.to(cdt), zs.to(cdt)
        if hard:  # the same one-hot sample, unless two perturbed logits tie to rounding
            perturbed = l64.detach() + philox.gumbel_noise(seed, offset, b, k).double()
            top2 = perturbed.topk(min(2, k), -1).values
            if k > 1 and ((top2[:, 0] - top2[:, 1]) < 1e-4 * (1 + top2[:, 0].abs())).any():
                return
            assert torch.equal(w.detach().double().round(), w64.detach().round()), "hard sample"
        atol = 1e-5 + 4 * _eps(dtype) * float(lb.double().abs().max() + 30) / tau
        _close(w, w64, ws, atol=atol, what=f"{backend} weights")
        _close(z, z64, zs, atol=atol * d, what=f"{backend} z", out_dtype=dtype)
        gw, gz = torch.randn(b, k, generator=gen, dtype=torch.float64), torch.randn(b, d, generator=gen,
                                                                                     dtype=torch.float64)
        gw, gz = gw.to(w.dtype), gz.to(z.dtype)  # the upstream gradients as the op receives them
        got = _grads([w, z], [logits, cb_leaf], [gw, gz])
        gw, gz = gw.double(), gz.double()
        want = _grads([w64, z64], [l64, c64], [gw, gz])
        same_g = _grads([ws, zs], [ls, cs], [gw.to(cdt), gz.to(cdt)])
        for name, a, w_, s in zip(("logits", "codebook"), got, want, same_g):
            assert a.dtype == dtype and torch.isfinite(a).all(), name
            _close(a, w_, s, atol=atol * (k + d) / tau, what=f"{backend} grad_{name}", out_dtype=dtype)

    check()


# ------------------------------------------------------------------------------------- preference_loss
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_preference_loss_properties(backend):
    @_examples(backend, 100)
    @given(b=st.integers(1, 6), k=st.integers(1, 9), loss_type=st.sampled_from(["dpo", "ipo", "simpo"]),
           beta=st.sampled_from([0.01, 0.1, 2.0]), eps=st.sampled_from([0.0, 0.2]),
           kl_weight=st.sampled_from([0.0, 0.05, 10.0]), ipo_average=st.booleans(), with_kl=st.booleans(),
           scale=st.sampled_from([1.0, 100.0, 1e4]), layout=st.sampled_from(["contiguous", "sliced", "expanded"]),
           seed=st.integers(0, 2**31 - 1))
    def check(b, k, loss_type, beta, eps, kl_weight, ipo_average, with_kl, scale, layout, seed):
        gen = torch.Generator().manual_seed(seed)

        def logps():
            return -(torch.rand(b, generator=gen, dtype=torch.float64) * scale).float().requires_grad_(True)

        pc, pr, rc, rr = (logps() for _ in range(4))
        if loss_type == "simpo":
            rc = rr = None
        cl, rl = torch.randint(1, 50, (b,), generator=gen), torch.randint(1, 50, (b,), generator=gen)
        prior = post = prior_leaf = post_leaf = None
        if with_kl:
            prior_leaf, prior = _layout(torch.randn(b, k, generator=gen) * 3, layout, b, k)
            post_leaf, post = _layout(torch.randn(b, k, generator=gen) * 3, layout, b, k)
        opts = dict(loss_type=loss_type, beta=beta, gamma=0.5 if loss_type == "simpo" else 0.0,
                    label_smoothing=0.0 if loss_type == "ipo" else eps, kl_weight=kl_weight if with_kl else 0.0,
                    ipo_average=ipo_average)
        out = lk.preference_loss(pc, pr, rc, rr, chosen_lengths=cl, rejected_lengths=rl, prior_logits=prior,
                                 posterior_logits=post, backend=backend, **opts)
        inputs = [t for t in (pc, pr, rc, rr, prior, post) if t is not None]  # what the op received
        def formula(cast):
            c = {id(t): t.detach().to(cast).requires_grad_(True) for t in (pc, pr, rc, rr, prior_leaf, post_leaf)
                 if t is not None}
            args = [None if t is None else c[id(t)] for t in (pc, pr, rc, rr)]
            args += [None if t is None else _view(c[id(t)], layout, b, k) for t in (prior_leaf, post_leaf)]
            res = f_preference(*args[:4], cl, rl, *args[4:], opts["loss_type"], opts["beta"], opts["gamma"],
                               opts["label_smoothing"], opts["kl_weight"], opts["ipo_average"])
            return res, [a for a in args if a is not None]

        (truth, leaves64), (same, leaves32) = formula(torch.float64), formula(torch.float32)
        # the pair losses are functions of beta * (log-prob differences): their rounding scales with both
        magnitude = 1 + beta * scale + opts["kl_weight"] * 10  # of the pair losses' arguments and terms
        atol = 1e-5 + 16 * _eps(torch.float32) * magnitude ** 2
        for name, o, t, s in zip(("loss", "losses", "chosen_rewards", "rejected_rewards", "kl"), out, truth, same):
            assert o.dtype == torch.float32, name
            _close(o, t, s.to(torch.float32), atol=atol, what=f"{backend} {name}")
        grads = [torch.randn((), generator=gen, dtype=torch.float64),
                 *(torch.randn(b, generator=gen, dtype=torch.float64) for _ in range(4))]
        got = _grads(list(out), inputs, [g.float() for g in grads])
        want = _grads(list(truth), leaves64, grads)
        same_g = _grads([s.float() for s in same], leaves32, [g.float() for g in grads])
        for a, w_, s in zip(got, want, same_g):
            assert torch.isfinite(a).all()
            _close(a, w_, s, atol=atol * max(1.0, beta), what=f"{backend} grad")

    check()
