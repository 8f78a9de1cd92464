"""``lk.preference_loss`` (lpc_kernels/ops/preference_loss.py): DPO / IPO / SimPO + KL, on every backend.

* The backend table (the ``backend`` fixture) against the float64 formula of tests/helpers/formulas.py, all five
  outputs and the gradients of every float input; one code with zero KL weight is the plain loss; gradcheck,
  opcheck and bad inputs.
* The compiled cpu kernels through the op against the reference backend on mixed-dtype inputs; on a GPU
  (``cuda`` marker) the cuda backend against float64 and the reference, and a deterministic mean.
"""

import pytest
import torch

import lpc_kernels as lk
from tests.helpers.backend_checks import (CPU, check_bad_input, check_preference_mixed_dtypes_match_reference,
                                          check_preference_vs_float64, cuda_opcheck_cases, gradcheck_preference,
                                          needs_cpu_kernels, on_cuda, opcheck_family, truth_close)
from tests.helpers.formulas import PREF_CASES

DEV = torch.device("cuda")
B, K = 4, 5


def pair():
    return torch.randn(B), torch.randn(B)


def pref(*args, **kw):
    if not args:
        args = (*pair(), *pair())
    return lambda backend: lk.preference_loss(*args, backend=backend, **kw)


NAN_LOGPS = torch.tensor([0.0, float("nan"), 1.0, 2.0])
LEN = torch.tensor([3, 4, 5, 6])

CASES = [
    # (id, call, exception, words the message must contain)
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
    ("string logps", pref("a", *pair(), torch.randn(B)), TypeError, "policy_chosen_logps"),]
if torch.device("meta").type == "meta":  # mixed devices: a meta tensor stands in for a second device
    CASES.append(("mixed devices pref", pref(torch.randn(B), torch.randn(B, device="meta"), *pair()), ValueError,
                  "policy_rejected_logps"))


# ------------------------------------------------------------------------------- the backend table
@pytest.mark.parametrize("case", PREF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_preference_loss_forward_backward(backend, case):
    check_preference_vs_float64(backend, torch.device("cpu"), case, b=6, k=5)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_one_code_zero_kl_weight_is_plain_loss(backend, loss_type):
    pc, pr, rc, rr = (torch.randn(6) * 5 - 20 for _ in range(4))
    cl, rl = torch.randint(1, 30, (6,)), torch.randint(1, 30, (6,))
    if loss_type == "simpo":
        rc = rr = None
    kw = dict(chosen_lengths=cl, rejected_lengths=rl, loss_type=loss_type, backend=backend)
    plain = lk.preference_loss(pc, pr, rc, rr, **kw)
    one_code = lk.preference_loss(pc, pr, rc, rr, prior_logits=torch.randn(6, 1), posterior_logits=torch.randn(6, 1),
                                  kl_weight=0.0, **kw)
    for a, b in zip(plain, one_code):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(one_code.kl, torch.zeros(6))  # a single code: q = p = 1


def test_gradcheck_float64(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    pc, pr, rc, rr = (torch.randn(4, **d) for _ in range(4))
    prior, post = torch.randn(4, 3, **d), torch.randn(4, 3, **d)
    lengths = torch.tensor([3, 1, 4, 2])
    for loss_type in ("dpo", "ipo"):
        assert torch.autograd.gradcheck(
            lambda *t: tuple(lk.preference_loss(*t[:4], prior_logits=t[4], posterior_logits=t[5], kl_weight=0.2,
                                                chosen_lengths=lengths, rejected_lengths=lengths + 1,
                                                loss_type=loss_type, label_smoothing=0.0, backend=backend)),
            (pc, pr, rc, rr, prior, post))
    assert torch.autograd.gradcheck(
        lambda *t: tuple(lk.preference_loss(*t[:2], prior_logits=t[2], posterior_logits=t[3], kl_weight=0.2,
                                            chosen_lengths=lengths, rejected_lengths=lengths, loss_type="simpo",
                                            gamma=0.3, label_smoothing=0.1, backend=backend)),
        (pc, pr, prior, post))


def test_opcheck(backend):
    opcheck_family(backend, CPU, "preference_loss")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case, backend):
    check_bad_input(case, backend)


# --------------------------------------------------------------------------------- the cpu kernels
@needs_cpu_kernels
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_preference_loss_matches_reference_cpu(loss_type, dtype):
    check_preference_mixed_dtypes_match_reference("cpu", CPU, loss_type, dtype, b=33)


@needs_cpu_kernels
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_gradcheck_float64_cpu(loss_type):
    gradcheck_preference("cpu", "cpu", loss_type)


# ------------------------------------------------------------------------------------ CUDA tensors
@on_cuda
@pytest.mark.parametrize("b,k", [(1, 1), (6, 5), (1000, 32), (70, 1024)])
@pytest.mark.parametrize("case", PREF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_preference_loss_vs_float64_cuda(case, b, k):
    check_preference_vs_float64("cuda", DEV, case, b, k)


@on_cuda
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_preference_loss_matches_reference_mixed_dtypes_cuda(loss_type, dtype):
    check_preference_mixed_dtypes_match_reference("cuda", DEV, loss_type, dtype, b=333)


@on_cuda
def test_preference_loss_mean_is_deterministic_and_one_code_is_plain_cuda():
    b = 65536
    pc, pr, rc, rr = (torch.randn(b, device=DEV) * 5 - 20 for _ in range(4))
    prior, post = torch.randn(b, 1, device=DEV), torch.randn(b, 1, device=DEV)
    plain = [lk.preference_loss(pc, pr, rc, rr, backend="cuda") for _ in range(3)]
    for other in plain[1:]:
        for x, y in zip(plain[0], other):
            assert torch.equal(x, y)
    one = lk.preference_loss(pc, pr, rc, rr, prior_logits=prior, posterior_logits=post, kl_weight=0.0,
                             backend="cuda")
    for x, y in zip(plain[0], one):
        assert torch.equal(x, y)
    assert torch.equal(one.kl, torch.zeros(b, device=DEV))
    truth_close(plain[0].loss, plain[0].losses.double().mean(), rtol=1e-6, atol=1e-6)


@on_cuda
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_gradcheck_float64_cuda(loss_type):
    gradcheck_preference("cuda", DEV, loss_type)


@on_cuda
@pytest.mark.parametrize("case", cuda_opcheck_cases("preference_loss"))
def test_opcheck_cuda(case):
    opcheck_family("cuda", DEV, "preference_loss", case)
