"""``lk.token_logprobs`` (lpc_kernels/ops/token_logprobs.py), on every backend.

* The backend table (the ``backend`` fixture: every backend that takes CPU tensors here) against the float64
  formula of tests/helpers/formulas.py, written independently of lpc_kernels.reference; gradcheck, opcheck and
  bad inputs (a ValueError/TypeError naming the argument, before any kernel runs). Shapes stay small: the
  Triton interpreter costs milliseconds per program instance.
* The compiled cpu kernels through the op: paths the small table does not reach (multi-block rows, -inf
  logits), against the reference backend (fp32/fp64 to ~1e-5 / 1e-12 relative, 16-bit inputs against the
  reference on the exactly upcast inputs, gradients within one rounding).
* On a GPU (``cuda`` marker, skipped without one): the cuda backend against float64 and the reference.

The raw kernels (``torch.ops.lpc.token_logprobs_*``) are tested in tests/backends, the Triton kernels' own
paths in tests/backends/test_triton_kernels.py.
"""

import pytest
import torch

import lpc_kernels as lk
from tests.helpers.backend_checks import (CPU, LOW, check_bad_input, close64, cuda_opcheck_cases, exact_fp32,
                                          needs_cpu_kernels, new_leaf, on_cuda, one_rounding, opcheck_family,
                                          reference_tol, truth_close)
from tests.helpers.formulas import f_token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = torch.device("cuda")
V = 11


def logits():
    return torch.randn(3, V)


def labels():
    return torch.tensor([0, 4, -100])


def tok(**kw):
    args = dict(logits=logits(), labels=labels())
    args.update(kw)
    return lambda backend: lk.token_logprobs(args["logits"], args["labels"], backend=backend)


CASES = [
    # (id, call, exception, words the message must contain)
    ("float labels", tok(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    ("label >= V", tok(labels=torch.tensor([0, V, 1])), ValueError, "labels"),
    ("negative label", tok(labels=torch.tensor([0, -3, 1])), ValueError, "labels"),
    ("N mismatch", tok(labels=torch.tensor([0, 1])), ValueError, "labels"),
    ("int logits", tok(logits=torch.ones(3, V, dtype=torch.int64)), TypeError, "logits"),
    ("empty logits", tok(logits=torch.randn(0, V), labels=torch.zeros(0, dtype=torch.long)), ValueError, "logits"),
    ("V = 0", tok(logits=torch.randn(3, 0)), ValueError, "logits"),
]
if torch.device("meta").type == "meta":  # mixed devices: a meta tensor stands in for a second device
    CASES.append(("mixed devices", tok(labels=torch.tensor([0, 1, 2], device="meta")), ValueError, "labels"))


# ------------------------------------------------------------------------------- the backend table
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 3, 130)])
def test_token_logprobs_forward_backward(backend, dtype, shape):
    logits = new_leaf(torch.randn(shape) * 4, dtype)
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
    leaf = new_leaf(logits)
    lk.token_logprobs(leaf, labels, ignore_index=5, backend=backend).sum().backward()
    assert torch.isfinite(leaf.grad).all() and torch.equal(leaf.grad[1], torch.zeros(70))


def test_token_logprobs_all_ignored_gives_zeros(backend):
    logits = new_leaf(torch.randn(3, 33))
    labels = torch.full((3,), -100)
    out = lk.token_logprobs(logits, labels, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3)) and torch.equal(logits.grad, torch.zeros(3, 33))


def test_token_logprobs_inplace_backward_matches(backend):
    base = torch.randn(3, 50)
    labels = torch.tensor([1, -100, 49])
    grads = []
    for inplace in (False, True):
        leaf = new_leaf(base)
        logits = leaf * 1.0  # a non-leaf buffer the in-place backward may overwrite
        lk.token_logprobs(logits, labels, backend=backend, inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_gradcheck_float64(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    x, labels = torch.randn(3, 9, **d), torch.tensor([0, -100, 8])
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend=backend), (x,))


def test_opcheck(backend):
    opcheck_family(backend, CPU, "token_logprobs")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case, backend):
    check_bad_input(case, backend)


# --------------------------------------------------------------------------------- the cpu kernels
def _token_ref(logits, labels, ignore_index=-100):
    """Reference backend on the exactly upcast input: the same math in fp32 (fp64 for fp64)."""
    up = logits.detach().float() if logits.dtype in LOW else logits.detach()
    leaf = up.clone().requires_grad_(True)
    out = lk.token_logprobs(leaf, labels, ignore_index=ignore_index, backend="reference")
    return out, leaf


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("v", [1, 7, 2048, 5000])  # 5000: three row blocks of 2048, the last one partial
def test_token_logprobs_matches_reference_cpu(dtype, v):
    n = 9
    base = torch.randn(n, v, dtype=torch.float64) * 5
    base[2, v // 2] = 40.0  # the max grows in a later block: the running sum is rescaled
    if v > 1:
        base[4, : v // 2] = float("-inf")  # masked vocabulary entries
    logits = base.to(dtype)
    labels = torch.randint(v // 2, v, (n,))
    labels[[1, 6]] = -100
    g = torch.randn(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for inplace in (False, True):
        leaf = new_leaf(logits)
        buf = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        out = lk.token_logprobs(buf, labels, backend="cpu", inplace_backward=inplace)
        out.backward(g)
        ref, ref_leaf = _token_ref(logits, labels)
        ref.backward(g)
        assert out.dtype == ref.dtype and leaf.grad.dtype == dtype
        close64(out, ref, **reference_tol(dtype))
        if dtype in LOW:
            one_rounding(leaf.grad, ref_leaf.grad, dtype)
        else:
            close64(leaf.grad, ref_leaf.grad, **reference_tol(dtype))
        assert torch.equal(leaf.grad[1], torch.zeros(v, dtype=dtype))  # ignored row


@needs_cpu_kernels
def test_token_logprobs_extreme_logits_stay_finite_cpu():
    logits = torch.randn(6, 3000) * 1e4
    labels = torch.randint(0, 3000, (6,))
    leaf = new_leaf(logits)
    out = lk.token_logprobs(leaf, labels, backend="cpu")
    out.sum().backward()
    ref = lk.token_logprobs(logits.double(), labels, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
    close64(out, ref, rtol=1e-6, atol=1e-2)  # fp32 rounding of 1e4-sized values: ~1e-3 absolute


@needs_cpu_kernels
def test_gradcheck_float64_cpu():
    x = torch.randn(5, 2100, dtype=torch.float64, requires_grad=True)  # two row blocks
    labels = torch.tensor([0, -100, 2099, 1500, 7])
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend="cpu"), (x,), fast_mode=True)
    # (inplace_backward is covered by test_token_logprobs_matches_reference: gradcheck runs backward
    # several times, and the in-place variant consumes its logits buffer on the first)
    x2 = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, torch.tensor([0, -100, 10]), backend="cpu"),
                                    (x2,))


# ------------------------------------------------------------------------------------ CUDA tensors
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("n,v", [(1, 1), (1, 37), (5, 130), (9, 1000), (4, 4099), (3, 32003), (2, 128256)])
def test_token_logprobs_vs_float64_cuda(dtype, n, v):
    base = torch.randn(n, v, device=DEV, dtype=torch.float64) * 4
    if v > 8:
        base[0, v // 3] = 30.0  # a late maximum: the running sums are rescaled
    logits = base.to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV)
    if n > 2:
        labels[1] = -100
    g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for inplace in (False, True):
        leaf = new_leaf(logits)
        buf = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        out = lk.token_logprobs(buf, labels, backend="cuda", inplace_backward=inplace)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        x64 = new_leaf(logits, torch.float64)
        truth = f_token_logprobs(x64, labels)
        truth_close(out, truth, **(dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(atol=2e-5)))
        out.backward(g)
        truth.backward(g.double())
        assert leaf.grad.dtype == dtype
        if dtype in LOW:
            truth_close(leaf.grad, x64.grad, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        else:
            truth_close(leaf.grad, x64.grad, **(dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64
                                                else dict(rtol=1e-5, atol=1e-6)))
        if n > 2:
            assert torch.equal(leaf.grad[1], torch.zeros(v, device=DEV, dtype=dtype))


@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_token_logprobs_matches_reference_backend_cuda(dtype):
    n, v = 33, 5000
    logits = (torch.randn(n, v, device=DEV) * 5).to(dtype)
    logits[4, : v // 2] = float("-inf")  # masked vocabulary entries
    labels = torch.randint(v // 2, v, (n,), device=DEV)
    labels[[2, 7]] = -100
    g = torch.randn(n, device=DEV)
    leaf = new_leaf(logits)
    out = lk.token_logprobs(leaf, labels, backend="cuda")
    out.backward(g)
    ref_leaf = new_leaf(exact_fp32(logits))
    ref = lk.token_logprobs(ref_leaf, labels, backend="reference")
    ref.backward(g)
    close64(out, ref, rtol=1e-5, atol=1e-5)
    if dtype in LOW:
        one_rounding(leaf.grad, ref_leaf.grad, dtype)
    else:
        close64(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


@on_cuda
def test_token_logprobs_large_magnitude_and_custom_ignore_cuda():
    logits = torch.randn(4, 70, device=DEV) * 1e4
    labels = torch.tensor([3, 7, 69, 0], device=DEV)
    labels[1] = 5
    out = lk.token_logprobs(logits, labels, ignore_index=5, backend="cuda")
    truth = f_token_logprobs(logits, labels, ignore_index=5)
    assert out[1] == 0
    close64(out, truth, rtol=1e-6, atol=1e-2)  # fp32 rounding of 1e4-sized values: ~1e-3 absolute
    big = torch.randn(6, 3000, device=DEV) * 1e4
    lab = torch.randint(0, 3000, (6,), device=DEV)
    lab[2] = -100
    leaf = new_leaf(big)
    o = lk.token_logprobs(leaf, lab, backend="cuda")
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[2], torch.zeros(3000, device=DEV))  # ignored row: exact zeros, no NaN


@on_cuda
def test_token_logprobs_all_ignored_and_inplace_bitwise_cuda():
    logits = new_leaf(torch.randn(3, 33, device=DEV))
    labels = torch.full((3,), -100, device=DEV)
    out = lk.token_logprobs(logits, labels, backend="cuda")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, device=DEV))
    assert torch.equal(logits.grad, torch.zeros(3, 33, device=DEV))
    base = torch.randn(64, 4099, device=DEV).to(torch.bfloat16)
    lab = torch.randint(0, 4099, (64,), device=DEV)
    lab[::7] = -100
    grads = []
    for inplace in (False, True):
        leaf = new_leaf(base)
        buf = leaf * 1
        lk.token_logprobs(buf, lab, backend="cuda", inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@on_cuda
def test_gradcheck_float64_cuda():
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x = torch.randn(5, 2100, **d)
    labels = torch.tensor([0, -100, 2099, 1500, 7], device=DEV)
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend="cuda"), (x,), fast_mode=True)


@on_cuda
@pytest.mark.parametrize("case", cuda_opcheck_cases("token_logprobs"))
def test_opcheck_cuda(case):
    opcheck_family("cuda", DEV, "token_logprobs", case)
