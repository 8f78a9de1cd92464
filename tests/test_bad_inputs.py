"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs, on every backend."""

import pytest
import torch

import lpc_kernels as lk
from backend_checks import CPU_BACKENDS as BACKENDS

CPU = torch.device("cpu")

V, H, B, K, D = 11, 6, 4, 5, 3


def logits():
    return torch.randn(3, V)


def labels():
    return torch.tensor([0, 4, -100])


def pair():
    return torch.randn(B), torch.randn(B)


def tok(**kw):
    args = dict(logits=logits(), labels=labels())
    args.update(kw)
    return lambda backend: lk.token_logprobs(args["logits"], args["labels"], backend=backend)


def lin(hidden=None, weight=None, labels_=None, **kw):
    hidden = torch.randn(3, H) if hidden is None else hidden
    weight = torch.randn(V, H) if weight is None else weight
    labels_ = labels() if labels_ is None else labels_
    return lambda backend: lk.linear_token_logprobs(hidden, weight, labels_, backend=backend, **kw)


def gumbel(lg=None, cb=None, **kw):
    lg = torch.randn(B, K) if lg is None else lg
    cb = torch.randn(K, D) if cb is None else cb
    return lambda backend: lk.gumbel_softmax_codes(lg, cb, backend=backend, **kw)


def pref(*args, **kw):
    if not args:
        args = (*pair(), *pair())
    return lambda backend: lk.preference_loss(*args, backend=backend, **kw)


NAN_LOGPS = torch.tensor([0.0, float("nan"), 1.0, 2.0])
LEN = torch.tensor([3, 4, 5, 6])

CASES = [
    # (id, call, exception, words the message must contain)
    ("float labels", tok(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    ("label >= V", tok(labels=torch.tensor([0, V, 1])), ValueError, "labels"),
    ("negative label", tok(labels=torch.tensor([0, -3, 1])), ValueError, "labels"),
    ("N mismatch", tok(labels=torch.tensor([0, 1])), ValueError, "labels"),
    ("int logits", tok(logits=torch.ones(3, V, dtype=torch.int64)), TypeError, "logits"),
    ("empty logits", tok(logits=torch.randn(0, V), labels=torch.zeros(0, dtype=torch.long)), ValueError, "logits"),
    ("V = 0", tok(logits=torch.randn(3, 0)), ValueError, "logits"),
    ("H mismatch", lin(hidden=torch.randn(3, H + 1)), ValueError, "hidden"),
    ("weight 1-D", lin(weight=torch.randn(V)), ValueError, "weight"),
    ("hidden/weight dtype", lin(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight"),
    ("bias shape", lin(bias=torch.randn(V + 1)), ValueError, "bias"),
    ("linear label >= V", lin(labels_=torch.tensor([0, 1, V])), ValueError, "labels"),
    ("chunk_size 0", lin(chunk_size=0), ValueError, "chunk_size"),
    ("negative filter_eps", lin(filter_eps=-0.1), ValueError, "filter_eps"),
    ("K mismatch", gumbel(cb=torch.randn(K + 1, D)), ValueError, "codebook"),
    ("D = 0", gumbel(cb=torch.randn(K, 0)), ValueError, "codebook"),
    ("tau = 0", gumbel(tau=0.0), ValueError, "tau"),
    ("tau < 0", gumbel(tau=-1.0), ValueError, "tau"),
    ("tau nan", gumbel(tau=float("nan")), ValueError, "tau"),
    ("tau inf", gumbel(tau=float("inf")), ValueError, "tau"),
    ("negative seed", gumbel(seed=-1), ValueError, "seed"),
    ("float seed", gumbel(seed=1.5), TypeError, "seed"),
    ("negative offset", gumbel(offset=-2), ValueError, "offset"),
    ("gumbel empty batch", gumbel(lg=torch.randn(0, K)), ValueError, "logits"),
    ("NaN gumbel logits", gumbel(lg=torch.full((B, K), float("nan"))), ValueError, "logits"),
    ("beta = 0", pref(beta=0.0), ValueError, "beta"),
    ("beta < 0", pref(beta=-0.1), ValueError, "beta"),
    ("unknown loss_type", pref(loss_type="kto"), ValueError, "loss_type"),
    ("missing ref logps dpo", pref(*pair()), ValueError, "ref_chosen_logps"),
    ("missing ref logps ipo", pref(*pair(), chosen_lengths=LEN, rejected_lengths=LEN, loss_type="ipo"), ValueError,
     "ref_chosen_logps"),
    ("one ref logps", pref(*pair(), torch.randn(B)), ValueError, "ref_rejected_logps"),
    ("zero lengths", pref(*pair(), chosen_lengths=torch.tensor([3, 0, 1, 1]), rejected_lengths=LEN,
                          loss_type="simpo"), ValueError, "chosen_lengths"),
    ("missing lengths simpo", pref(*pair(), loss_type="simpo"), ValueError, "chosen_lengths"),
    ("B mismatch", pref(torch.randn(B), torch.randn(B + 1), *pair()), ValueError, "policy_rejected_logps"),
    ("empty batch", pref(torch.randn(0), torch.randn(0), torch.randn(0), torch.randn(0)), ValueError,
     "policy_chosen_logps"),
    ("NaN logps", pref(NAN_LOGPS, *pair(), torch.randn(B)), ValueError, "policy_chosen_logps"),
    ("kl without logits", pref(kl_weight=0.1), ValueError, "prior_logits"),
    ("prior/posterior K mismatch", pref(prior_logits=torch.randn(B, K), posterior_logits=torch.randn(B, K + 1)),
     ValueError, "posterior_logits"),
    ("label_smoothing > 0.5", pref(label_smoothing=0.7), ValueError, "label_smoothing"),
    ("negative kl_weight", pref(kl_weight=-1.0, prior_logits=torch.randn(B, K), posterior_logits=torch.randn(B, K)),
     ValueError, "kl_weight"),
    ("gamma for dpo", pref(gamma=0.5), ValueError, "gamma"),
    ("ref logps for simpo", pref(chosen_lengths=LEN, rejected_lengths=LEN, loss_type="simpo"), ValueError, "simpo"),
    ("string logps", pref("a", *pair(), torch.randn(B)), TypeError, "policy_chosen_logps"),
]

if torch.device("meta").type == "meta":  # mixed devices: a meta tensor stands in for a second device
    CASES.append(("mixed devices", tok(labels=torch.tensor([0, 1, 2], device="meta")), ValueError, "labels"))
    CASES.append(("mixed devices pref", pref(torch.randn(B), torch.randn(B, device="meta"), *pair()), ValueError,
                  "policy_rejected_logps"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case, backend):
    _, call, exc, words = case
    with pytest.raises(exc, match=words):
        call(backend)


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        lk.token_logprobs(logits(), labels(), backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        lk.token_logprobs(logits(), labels(), backend=3)


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cuda"):
        lk.token_logprobs(logits(), labels(), backend="cuda")  # CPU tensors on the cuda backend


def test_env_var_chooses_backend(monkeypatch):
    monkeypatch.setenv("LPC_KERNELS_BACKEND", "reference")
    assert lk.resolve_backend("auto", CPU) == "reference"
    monkeypatch.setenv("LPC_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LPC_KERNELS_BACKEND"):
        lk.resolve_backend("auto", CPU)
    assert lk.resolve_backend("reference", CPU) == "reference"  # an explicit argument wins


def test_auto_rule_on_cpu(monkeypatch):
    monkeypatch.delenv("LPC_KERNELS_BACKEND", raising=False)
    expected = "cpu" if "cpu" in lk.available_backends() else "reference"
    assert lk.resolve_backend("auto", CPU) == expected
    assert "reference" in lk.available_backends()
