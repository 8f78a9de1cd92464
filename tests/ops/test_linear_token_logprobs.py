"""``lk.linear_token_logprobs`` and ``lk.sequence_logprobs`` (lpc_kernels/ops/linear_token_logprobs.py), on every
backend.

* The backend table (the ``backend`` fixture) against the float64 formula of tests/helpers/formulas.py;
  gradcheck, opcheck and bad inputs.
* The compiled cpu kernels through the op: rows spanning several blocks, non-consecutive valid rows, chunk
  sizes, against the reference backend (16-bit inputs: gradients within one rounding).
* On a GPU (``cuda`` marker): the cuda backend against the reference and float64.

The raw kernels are tested in tests/backends, the Triton kernels' own paths (V splits, split / atomic
backward, autotune configs) in tests/backends/test_triton_kernels.py.
"""

import pytest
import torch

import lpc_kernels as lk
from tests.helpers.backend_checks import (CPU, LOW, check_bad_input, close64, close_scaled, cuda_opcheck_cases,
                                          exact_fp32, linear_run, needs_cpu_kernels, new_leaf, on_cuda, one_rounding,
                                          opcheck_family, reference_tol, truth_close)
from tests.helpers.formulas import f_linear_token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = torch.device("cuda")
V, H = 11, 6


def labels():
    return torch.tensor([0, 4, -100])


def lin(hidden=None, weight=None, labels_=None, **kw):
    hidden = torch.randn(3, H) if hidden is None else hidden
    weight = torch.randn(V, H) if weight is None else weight
    labels_ = labels() if labels_ is None else labels_
    return lambda backend: lk.linear_token_logprobs(hidden, weight, labels_, backend=backend, **kw)


CASES = [
    # (id, call, exception, words the message must contain)
    ("H mismatch", lin(hidden=torch.randn(3, H + 1)), ValueError, "hidden"),
    ("weight 1-D", lin(weight=torch.randn(V)), ValueError, "weight"),
    ("hidden/weight dtype", lin(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight"),
    ("bias shape", lin(bias=torch.randn(V + 1)), ValueError, "bias"),
    ("linear label >= V", lin(labels_=torch.tensor([0, 1, V])), ValueError, "labels"),
    ("chunk_size 0", lin(chunk_size=0), ValueError, "chunk_size"),
]


# ------------------------------------------------------------------------------- the backend table
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_token_logprobs_forward_backward(backend, dtype, with_bias):
    n, h, v = 6, 32, 77
    hidden = new_leaf(torch.randn(2, n // 2, h), dtype)
    weight = new_leaf(torch.randn(v, h) / h**0.5, dtype)
    bias = new_leaf(torch.randn(v), dtype) if with_bias else None
    labels = torch.randint(0, v, (2, n // 2))
    labels[0, 1] = -100
    out = lk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    h64, w64 = new_leaf(hidden.detach(), torch.float64), new_leaf(weight.detach(), torch.float64)
    b64 = new_leaf(bias.detach(), torch.float64) if with_bias else None
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


def test_linear_token_logprobs_all_ignored_and_frozen_weight(backend):
    hidden = new_leaf(torch.randn(3, 16))
    weight = torch.randn(40, 16)  # frozen: no weight gradient is computed
    labels = torch.full((3,), -100)
    out = lk.linear_token_logprobs(hidden, weight, labels, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3)) and torch.equal(hidden.grad, torch.zeros(3, 16))
    assert weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_gradient_from_the_forward(backend, dtype, monkeypatch):
    """Frozen weight and bias: the hidden gradient (g * a, a computed in the forward) against float64, and the
    trainable head's backward op is never called; with no gradient wanted the frozen-head op is not used."""
    from lpc_kernels.ops import linear_token_logprobs as module

    hidden = new_leaf(torch.randn(2, 5, 16), dtype)
    weight, bias = torch.randn(40, 16).to(dtype) / 4, torch.randn(40).to(dtype)
    labels = torch.randint(0, 40, (2, 5))
    labels[1, 2] = -100
    monkeypatch.setattr(module, "linear_token_logprobs_backward_op", None)  # calling it would fail
    out = lk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk_size=3)
    g = torch.randn(2, 5)
    out.backward(g)
    h64 = new_leaf(hidden.detach(), torch.float64)
    truth = f_linear_token_logprobs(h64, weight, labels, bias)
    truth.backward(g.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    truth_close(out, truth, rtol=1e-5, atol=1e-4)
    truth_close(hidden.grad, h64.grad, **tol)
    assert hidden.grad.dtype == dtype and torch.equal(hidden.grad[1, 2], torch.zeros(16, dtype=dtype))
    monkeypatch.setattr(module, "linear_token_logprobs_frozen_head_op", None)
    with torch.no_grad():  # the reference pass: no gradient factor computed
        lk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)


def test_linear_token_logprobs_no_grad_forward(backend):
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (5,))
    with torch.no_grad():
        out = lk.linear_token_logprobs(hidden, weight, labels, backend=backend)
    truth_close(out, f_linear_token_logprobs(hidden, weight, labels), atol=1e-4)


def test_strided_weight_is_copied_with_a_warning(backend):
    """A transposed [H, V] matrix as weight: the same values and gradients as the contiguous weight, and a warning
    naming the copy (the kernels read contiguous rows)."""
    hidden, base = new_leaf(torch.randn(4, 16)), torch.randn(16, 40)
    labels = torch.randint(0, 40, (4,))
    strided = base.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match=r"weight \(40, 16\) with strides \(1, 40\) is not contiguous, so it is "
                                         r"copied on every call"):
        out = lk.linear_token_logprobs(hidden, strided.T, labels, backend=backend)
    out.sum().backward()
    contiguous = base.T.contiguous().requires_grad_(True)
    h2 = new_leaf(hidden)
    want = lk.linear_token_logprobs(h2, contiguous, labels, backend=backend)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(strided.grad.T, contiguous.grad)
    torch.testing.assert_close(hidden.grad, h2.grad)


def test_sequence_logprobs(backend):
    hidden, weight = new_leaf(torch.randn(2, 5, 8)), torch.randn(30, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 29], [-100, 7, 8, -100, -100]])
    total, count = lk.sequence_logprobs(hidden, weight, labels, backend=backend)
    truth = f_linear_token_logprobs(hidden.detach(), weight, labels).sum(-1)
    truth_close(total, truth, atol=1e-4)
    assert count.tolist() == [3, 2]


def test_gradcheck_float64(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    h, w, b = torch.randn(4, 5, **d), torch.randn(9, 5, **d), torch.randn(9, **d)
    lab = torch.tensor([1, 8, -100, 0])
    assert torch.autograd.gradcheck(
        lambda h, w, b: lk.linear_token_logprobs(h, w, lab, bias=b, backend=backend, chunk_size=3), (h, w, b))


def test_opcheck(backend):
    opcheck_family(backend, CPU, "linear_token_logprobs")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case, backend):
    check_bad_input(case, backend)


# --------------------------------------------------------------------------------- the cpu kernels
@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_linear_token_logprobs_matches_reference_cpu(dtype, with_bias, chunk_size):
    n, h, v = 11, 24, 2500  # rows span two blocks of 2048
    hidden = (torch.randn(n, h, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    bias = torch.randn(v, dtype=torch.float64).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[[0, 4, 5, 9]] = -100  # valid rows are not consecutive: gathered chunks, scattered grad rows
    g = torch.randn(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours = linear_run("cpu", hidden, weight, bias, labels, chunk_size, g)
    up = (lambda t: t.float() if t is not None else None) if dtype in LOW else (lambda t: t)
    ref = linear_run("reference", up(hidden), up(weight), up(bias), labels, chunk_size, g)
    tol = reference_tol(dtype) if dtype != torch.float32 else dict(rtol=1e-5, atol=2e-5)
    close64(ours[0], ref[0], **(tol if dtype not in LOW else dict(rtol=1e-5, atol=2e-5)))
    for o, r in zip(ours[1:], ref[1:]):
        if r is None:
            assert o is None
        elif dtype in LOW:
            one_rounding(o, r, dtype)
        else:
            close64(o, r, **tol)
    assert torch.equal(ours[1][[0, 4, 5, 9]], torch.zeros(4, h, dtype=dtype))


@needs_cpu_kernels
def test_gradcheck_float64_cpu():
    d = dict(dtype=torch.float64, requires_grad=True)
    h, w, b = torch.randn(6, 5, **d), torch.randn(9, 5, **d), torch.randn(9, **d)
    labels = torch.tensor([1, -100, 8, -100, 0, 4])
    for chunk in (1, 2, 16):
        assert torch.autograd.gradcheck(
            lambda h, w, b: lk.linear_token_logprobs(h, w, labels, bias=b, backend="cpu", chunk_size=chunk),
            (h, w, b))
    assert torch.autograd.gradcheck(lambda h: lk.linear_token_logprobs(h, w.detach(), labels, backend="cpu"), (h,))


# ------------------------------------------------------------------------------------ CUDA tensors
# (n, h, v, chunk): vocab tiles (Nv <= V; several tiles of 128 columns when chunk * V / Nv < V), row
# chunks (Nv > V: the fp32 weight-gradient accumulator across chunks), one row, one chunk.
LINEAR_SHAPES = [(1, 64, 77, 1024), (11, 64, 300, 2), (11, 24, 2500, 1), (11, 24, 2500, 1024), (200, 32, 77, 16),
                 (300, 48, 130, 1024)]


@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "n{}-h{}-v{}-c{}".format(*s))
def test_linear_token_logprobs_matches_reference_cuda(dtype, with_bias, shape):
    n, h, v, chunk = shape
    hidden = torch.randn(n, h, device=DEV, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, device=DEV, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    bias = torch.randn(v, device=DEV, dtype=torch.float64).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (n,), device=DEV)
    if n > 5:
        labels[[0, 4, 5]] = -100  # valid rows are not consecutive: gathered chunks, scattered grad rows
    g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours = linear_run("cuda", hidden, weight, bias, labels, chunk, g)
    ref = linear_run("reference", exact_fp32(hidden), exact_fp32(weight), exact_fp32(bias), labels, chunk, g)
    tol = reference_tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    close64(ours[0], ref[0], **tol)
    truth_close(ours[0], f_linear_token_logprobs(hidden, weight, labels, bias), atol=1e-4)
    for o, r in zip(ours[1:], ref[1:]):
        if r is None:
            assert o is None
            continue
        assert o.dtype == dtype
        if dtype in LOW:  # GEMM operands in the input dtype (softmax-grad rounded once): a few ulps
            close_scaled(o, r, 4 * torch.finfo(dtype).eps)
        else:
            close64(o, r, **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)))
    if n > 5:
        assert torch.equal(ours[1][[0, 4, 5]], torch.zeros(3, h, device=DEV, dtype=dtype))


@on_cuda
def test_linear_token_logprobs_all_ignored_frozen_weight_and_no_grad_cuda():
    hidden = new_leaf(torch.randn(3, 16, device=DEV))
    weight = torch.randn(40, 16, device=DEV)
    labels = torch.full((3,), -100, device=DEV)
    out = lk.linear_token_logprobs(hidden, weight, labels, backend="cuda")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, device=DEV)) and torch.equal(hidden.grad, torch.zeros(3, 16, device=DEV))
    h, w = torch.randn(5, 16, device=DEV), torch.randn(40, 16, device=DEV)
    lab = torch.randint(0, 40, (5,), device=DEV)
    with torch.no_grad():
        o = lk.linear_token_logprobs(h, w, lab, backend="cuda")
    truth_close(o, f_linear_token_logprobs(h, w, lab), atol=1e-4)


@on_cuda
def test_linear_token_logprobs_bf16_larger_cuda():
    """A transformer-like head in bf16 (fp32 GEMM outputs): log-probs to fp32 accuracy."""
    n, h, v = 512, 256, 5000
    hidden = torch.randn(n, h, device=DEV).bfloat16()
    weight = (torch.randn(v, h, device=DEV) / h**0.5).bfloat16()
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[::5] = -100
    out = lk.linear_token_logprobs(hidden, weight, labels, backend="cuda", chunk_size=100)
    truth_close(out, f_linear_token_logprobs(hidden, weight, labels), rtol=1e-5, atol=1e-4)


@on_cuda
def test_gradcheck_float64_cuda():
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    h, w, b = torch.randn(6, 5, **d), torch.randn(300, 5, **d), torch.randn(300, **d)
    lab = torch.tensor([1, -100, 8, -100, 299, 4], device=DEV)
    for chunk in (1, 2, 16):
        assert torch.autograd.gradcheck(
            lambda h, w, b: lk.linear_token_logprobs(h, w, lab, bias=b, backend="cuda", chunk_size=chunk),
            (h, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda h: lk.linear_token_logprobs(h, w.detach(), lab, backend="cuda"), (h,))


@on_cuda
@pytest.mark.parametrize("case", cuda_opcheck_cases("linear_token_logprobs"))
def test_opcheck_cuda(case):
    opcheck_family("cuda", DEV, "linear_token_logprobs", case)
