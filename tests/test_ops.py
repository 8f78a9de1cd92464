"""One contract, every backend: each op against float64 formulas written here, independently of
lpc_kernels.reference, plus gradcheck, opcheck and torch.compile(fullgraph=True).

The table runs every backend that can take CPU tensors in this process: ``reference`` always,
``cpu`` when the C++ extension is built, ``triton`` under ``TRITON_INTERPRET=1`` (tests/conftest.py);
``LPC_TEST_BACKENDS=reference,cpu`` narrows the table.
Shapes stay small: the Triton interpreter costs milliseconds per program instance.
"""

import pytest
import torch
from torch.library import opcheck

import lpc_kernels as lk
from backend_checks import check_compiled_step_matches_eager, check_preference_vs_float64, truth_close
from backend_checks import CPU_BACKENDS as BACKENDS
from backend_checks import leaf as _leaf
from raw_op_cases import public_op_cases
from formulas import PREF_CASES, f_gumbel, f_linear_token_logprobs, f_token_logprobs

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------- token_logprobs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 3, 130)])
def test_token_logprobs_forward_backward(backend, dtype, shape):
    logits = _leaf(torch.randn(shape) * 4, dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels.view(-1)[-1] = -100
    out = lk.token_logprobs(logits, labels, backend=backend)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    x64 = logits.detach().double().requires_grad_(True)  # exact upcast of the dtype-rounded input
    truth = f_token_logprobs(x64, labels)
    truth_close(out, truth)
    g = torch.randn(labels.shape, dtype=torch.float32)
    out.backward(g)
    truth.backward(g.double())
    assert logits.grad.dtype == dtype
    truth_close(logits.grad, x64.grad, atol=2e-3 if dtype != torch.float32 else 1e-6,
                rtol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_large_magnitude_and_custom_ignore(backend):
    logits = torch.randn(4, 70) * 1e4
    labels = torch.tensor([3, 7, 69, 0])
    labels[1] = 5  # ignore_index is 5 below: row 1 ignored, label 5 elsewhere is not valid for it
    out = lk.token_logprobs(logits, labels, ignore_index=5, backend=backend)
    truth = f_token_logprobs(logits, labels, ignore_index=5)
    fp32_err = (f_token_logprobs(logits.float(), labels, 5).float().double() - truth).abs()
    fp32_err = (torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1).double()
                - truth).abs() + fp32_err
    truth_close(out, truth, dtype_err=fp32_err)
    assert out[1] == 0
    leaf = _leaf(logits)
    lk.token_logprobs(leaf, labels, ignore_index=5, backend=backend).sum().backward()
    assert torch.isfinite(leaf.grad).all() and torch.equal(leaf.grad[1], torch.zeros(70))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_all_ignored_gives_zeros(backend):
    logits = _leaf(torch.randn(3, 33))
    labels = torch.full((3,), -100)
    out = lk.token_logprobs(logits, labels, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3)) and torch.equal(logits.grad, torch.zeros(3, 33))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_inplace_backward_matches(backend):
    base = torch.randn(3, 50)
    labels = torch.tensor([1, -100, 49])
    grads = []
    for inplace in (False, True):
        leaf = _leaf(base)
        logits = leaf * 1.0  # a non-leaf buffer the in-place backward may overwrite
        lk.token_logprobs(logits, labels, backend=backend, inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- linear_token_logprobs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_token_logprobs_forward_backward(backend, dtype, with_bias):
    n, h, v = 6, 32, 77
    hidden = _leaf(torch.randn(2, n // 2, h), dtype)
    weight = _leaf(torch.randn(v, h) / h**0.5, dtype)
    bias = _leaf(torch.randn(v), dtype) if with_bias else None
    labels = torch.randint(0, v, (2, n // 2))
    labels[0, 1] = -100
    out = lk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    h64, w64 = _leaf(hidden.detach(), torch.float64), _leaf(weight.detach(), torch.float64)
    b64 = _leaf(bias.detach(), torch.float64) if with_bias else None
    truth = f_linear_token_logprobs(h64, w64, labels, b64)
    truth_close(out, truth, rtol=1e-5, atol=1e-4)
    g = torch.randn(labels.shape)
    out.backward(g)
    truth.backward(g.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    truth_close(hidden.grad, h64.grad, **tol)
    truth_close(weight.grad, w64.grad, **tol)
    if with_bias:
        truth_close(bias.grad, b64.grad, **tol)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert torch.equal(hidden.grad[0, 1], torch.zeros(h, dtype=dtype))  # ignored row: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_gradient_filter_bound(backend):
    """With filter_eps, every gradient entry is within |g| * eps (times the H-sum) of the exact one."""
    hidden, weight = _leaf(torch.randn(4, 16)), _leaf(torch.randn(300, 16))
    labels = torch.tensor([1, 299, 150, -100])
    grads = []
    for eps in (0.0, 1e-3):
        hidden.grad = weight.grad = None
        lk.linear_token_logprobs(hidden, weight, labels, backend=backend, filter_eps=eps).sum().backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    (gh0, gw0), (gh1, gw1) = grads
    # |dW_vj - dW'_vj| <= sum_i eps * |h_ij|;  |dh_ij - dh'_ij| <= sum_v eps * |W_vj|
    assert ((gw0 - gw1).abs() <= 1e-3 * hidden.detach().abs().sum(0) + 1e-6).all()
    assert ((gh0 - gh1).abs() <= 1e-3 * weight.detach().abs().sum(0) + 1e-6).all()
    if backend != "triton":  # only triton filters; the others are exact
        assert torch.equal(gh0, gh1) and torch.equal(gw0, gw1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_all_ignored_and_frozen_weight(backend):
    hidden = _leaf(torch.randn(3, 16))
    weight = torch.randn(40, 16)  # frozen: no weight gradient is computed
    labels = torch.full((3,), -100)
    out = lk.linear_token_logprobs(hidden, weight, labels, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3)) and torch.equal(hidden.grad, torch.zeros(3, 16))
    assert weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_no_grad_forward(backend):
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (5,))
    with torch.no_grad():
        out = lk.linear_token_logprobs(hidden, weight, labels, backend=backend)
    truth_close(out, f_linear_token_logprobs(hidden, weight, labels), atol=1e-4)


# ---------------------------------------------------------------------------- gumbel_softmax_codes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_softmax_codes(backend, hard, dtype):
    b, k, d = 5, 12, 24
    logits = _leaf(torch.randn(b, k) * 2, dtype)
    codebook = _leaf(torch.randn(k, d), dtype)
    seed, offset = 2**33 + 11, 2**32 - 20  # counters cross the 32-bit word boundary
    weights, z = lk.gumbel_softmax_codes(logits, codebook, tau=0.7, hard=hard, seed=seed, offset=offset,
                                         backend=backend)
    assert weights.dtype == torch.float32 and z.dtype == dtype
    l64, e64 = _leaf(logits.detach(), torch.float64), _leaf(codebook.detach(), torch.float64)
    w_truth, z_truth = f_gumbel(l64, e64, 0.7, hard, seed, offset)
    if hard:
        assert torch.equal(weights, w_truth.detach().float())  # the same codes are drawn
    truth_close(weights, w_truth, atol=1e-6)
    truth_close(z, z_truth, atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    gw, gz = torch.randn(b, k), torch.randn(b, d)
    torch.autograd.backward([weights, z], [gw, gz.to(dtype)])
    torch.autograd.backward([w_truth, z_truth], [gw.double(), gz.to(dtype).double()])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    truth_close(logits.grad, l64.grad, **tol)
    truth_close(codebook.grad, e64.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_same_seed_same_sample_across_backends(backend):
    logits, codebook = torch.randn(8, 16), torch.randn(16, 4)
    ours = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=7, offset=3, backend=backend)[0]
    ref = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=7, offset=3, backend="reference")[0]
    other = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=8, offset=3, backend=backend)[0]
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, other)


# --------------------------------------------------------------------------------- preference_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PREF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_preference_loss_forward_backward(backend, case):
    check_preference_vs_float64(backend, torch.device("cpu"), case, b=6, k=5)


@pytest.mark.parametrize("backend", BACKENDS)
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


# ------------------------------------------------------------------------- gradcheck, opcheck, compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    x, labels = torch.randn(3, 9, **d), torch.tensor([0, -100, 8])
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend=backend), (x,))
    h, w, b = torch.randn(4, 5, **d), torch.randn(9, 5, **d), torch.randn(9, **d)
    lab = torch.tensor([1, 8, -100, 0])
    assert torch.autograd.gradcheck(
        lambda h, w, b: lk.linear_token_logprobs(h, w, lab, bias=b, backend=backend, chunk_size=3), (h, w, b))
    lg, cb = torch.randn(3, 4, **d), torch.randn(4, 6, **d)
    assert torch.autograd.gradcheck(
        lambda a, e: lk.gumbel_softmax_codes(a, e, tau=0.5, seed=1, backend=backend), (lg, cb))
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for op, args in public_op_cases(backend, CPU):
        opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    check_compiled_step_matches_eager(backend, CPU)


# ------------------------------------------------------------------------ compositions and modules
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend):
    hidden, weight = _leaf(torch.randn(2, 5, 8)), torch.randn(30, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 29], [-100, 7, 8, -100, -100]])
    total, count = lk.sequence_logprobs(hidden, weight, labels, backend=backend)
    truth = f_linear_token_logprobs(hidden.detach(), weight, labels).sum(-1)
    truth_close(total, truth, atol=1e-4)
    assert count.tolist() == [3, 2]


def test_nn_modules_match_functions():
    from lpc_kernels.nn import GumbelCodebook, LinearTokenLogprobs, PreferenceLoss

    book = GumbelCodebook(6, 4, tau=0.5, backend="reference")
    logits = torch.randn(3, 6)
    w, z = book(logits, seed=9)
    w2, z2 = lk.gumbel_softmax_codes(logits, book.codebook, tau=0.5, seed=9, backend="reference")
    assert torch.equal(w, w2) and torch.equal(z, z2)
    torch.testing.assert_close(book.expected(logits), torch.softmax(logits, -1) @ book.codebook)
    h, wt, lab = torch.randn(4, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, -100])
    torch.testing.assert_close(LinearTokenLogprobs(backend="reference")(h, wt, lab),
                               lk.linear_token_logprobs(h, wt, lab, backend="reference"))
    pc, pr, rc, rr = (torch.randn(3) for _ in range(4))
    out = PreferenceLoss(beta=0.2, backend="reference")(pc, pr, rc, rr)
    torch.testing.assert_close(out.loss, lk.preference_loss(pc, pr, rc, rr, beta=0.2, backend="reference").loss)
