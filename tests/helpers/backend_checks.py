"""Checks shared by the op tests (tests/ops: the backend table on CPU tensors, the cpu kernels, CUDA tensors) and
the backend tests (tests/backends): each takes the backend and the device, so every backend is held to the same
assertions."""

import os

import pytest
import torch

from torch.library import opcheck

import lpc_kernels as lk
from lpc_kernels import philox, reference
from lpc_kernels.backends import BACKENDS, unavailable_reason
from tests.helpers.formulas import f_preference
from tests.helpers.raw_op_cases import public_op_cases

LOW = (torch.bfloat16, torch.float16)
CPU = torch.device("cpu")
# the backends that take CPU tensors in this process (triton under TRITON_INTERPRET=1), narrowed by
# LPC_TEST_BACKENDS=reference,cpu: the table of tests/ops (the ``backend`` fixture)
CPU_BACKENDS = [b for b in BACKENDS if unavailable_reason(b, CPU) is None
                and b in os.environ.get("LPC_TEST_BACKENDS", ",".join(BACKENDS)).split(",")]
# the compiled cpu kernels (csrc/cpu): tests that call them directly carry this mark
needs_cpu_kernels = pytest.mark.skipif(unavailable_reason("cpu", CPU) is not None,
                                       reason=f"cpu backend unavailable: {unavailable_reason('cpu', CPU)}")


def on_cuda(test):
    """Marks a test that runs on a GPU (``cuda`` marker; skipped without one). Its ``cuda_backend`` fixture
    (tests/conftest.py) fails it when a GPU is present but the cuda backend is not."""
    for mark in (pytest.mark.usefixtures("cuda_backend"),
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.cuda):
        test = mark(test)
    return test


def new_leaf(t, dtype=None):
    """A fresh leaf copy of ``t`` (in ``dtype``) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def close64(ours, ref, rtol, atol):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol)


def one_rounding(ours, ref_fp32, dtype):
    """ours (dtype) equals ref_fp32 rounded to dtype, up to one ulp of dtype (summation order)."""
    assert ours.dtype == dtype
    close64(ours, ref_fp32.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)


def linear_run(backend, hidden, weight, bias, labels, chunk_size, g, need=(True, True, True)):
    """[logp, grad_hidden, grad_weight, grad_bias] of ``lk.linear_token_logprobs`` on ``backend``, with grads
    only for the inputs ``need`` names (None for the others and for an absent bias)."""
    h = new_leaf(hidden) if need[0] else hidden.detach()
    w = new_leaf(weight) if need[1] else weight.detach()
    b = (new_leaf(bias) if need[2] else bias.detach()) if bias is not None else None
    out = lk.linear_token_logprobs(h, w, labels, bias=b, backend=backend, chunk_size=chunk_size)
    if any(t is not None and t.requires_grad for t in (h, w, b)):
        out.backward(g)
    grads = [t.grad if t is not None and t.requires_grad else None for t in (h, w, b)]
    return [out.detach()] + grads


def check_bad_input(case, backend):
    """One row ``(id, call, exception, words)`` of an op's table of bad calls: ``call(backend)`` raises
    ``exception`` with a message containing ``words`` (the argument's name)."""
    _, call, exc, words = case
    with pytest.raises(exc, match=words):
        call(backend)


def opcheck_family(backend, device, family, case=None):
    """``torch.library.opcheck`` on the custom ops of one op family (``raw_op_cases.public_op_cases``): every case,
    or the one numbered ``case``."""
    cases = public_op_cases(backend, device, family=family)
    for op, args in cases if case is None else [cases[case]]:
        opcheck(op, args)


def cuda_opcheck_cases(family):
    """The case numbers of ``opcheck_family("cuda", ...)``: one test each on a GPU, none without."""
    return range(len(public_op_cases("cuda", torch.device("cuda"), family=family))) if torch.cuda.is_available() \
        else []


def exact_fp32(t):
    """The exact fp32 upcast of fp16/bf16 tensors: the reference then does the same math in fp32."""
    return t.float() if t is not None and t.dtype in LOW else t


def close_scaled(ours, ref, rel):
    """max |ours - ref| <= rel * max |ref|: for sums whose terms carry their own rounding (bf16 GEMM
    operands), where elementwise relative bounds fail on entries that cancel to ~0."""
    err = (ours.double() - ref.double()).abs().max().item()
    bound = rel * ref.double().abs().max().item() + 1e-6
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def reference_tol(dtype):
    """rtol/atol of a backend against the reference backend on the same inputs: 1e-12 in float64, else 1e-5."""
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def truth_close(ours, truth, dtype_err=None, rtol=1e-5, atol=1e-5, what=""):
    """``|ours - truth| <= 2 * dtype_err + atol + rtol * |truth|`` elementwise on float64 CPU copies of the same
    shape, finite values only (CCE-style tolerance); ``what`` labels the failure.

    ``truth`` is float64 math on the (dtype-rounded) inputs; ``dtype_err`` is the error of the same
    computation done by PyTorch in float32 (or the input dtype), where that rounding itself dominates.
    """
    assert ours.shape == truth.shape, (what, ours.shape, truth.shape)
    ours, truth = ours.detach().double().cpu(), truth.detach().double().cpu()
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours - truth).abs()
    bound = atol + rtol * truth.abs()
    if dtype_err is not None:
        bound = bound + 2 * dtype_err.detach().double().cpu()
    worst = (err - bound).max()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds the bound by {worst.item():.3e}"


def check_preference_vs_float64(backend, device, case, b, k):
    """``lk.preference_loss`` on ``backend`` against the float64 formula (tests/helpers/formulas.py), all five outputs
    and the gradients of every float input, for one of ``formulas.PREF_CASES``."""
    pc, pr, rc, rr = (new_leaf(torch.randn(b, device=device) * 5 - 20) for _ in range(4))
    cl, rl = torch.randint(1, 30, (b,), device=device), torch.randint(1, 30, (b,), device=device)
    prior, post = new_leaf(torch.randn(b, k, device=device)), new_leaf(torch.randn(b, k, device=device) * 2)
    if case["loss_type"] == "simpo":
        rc = rr = None
    opts = dict(loss_type=case["loss_type"], beta=case["beta"], gamma=case.get("gamma", 0.0),
                label_smoothing=case.get("label_smoothing", 0.0), kl_weight=case["kl_weight"],
                ipo_average=case.get("ipo_average", True))
    out = lk.preference_loss(pc, pr, rc, rr, chosen_lengths=cl, rejected_lengths=rl, prior_logits=prior,
                             posterior_logits=post, backend=backend, **opts)
    leaves = [t for t in (pc, pr, rc, rr, prior, post) if t is not None]
    copies = {id(t): new_leaf(t, torch.float64) for t in leaves}

    def c(t):
        return copies[id(t)] if t is not None else None

    truth = f_preference(c(pc), c(pr), c(rc), c(rr), cl, rl, c(prior), c(post), opts["loss_type"], opts["beta"],
                         opts["gamma"], opts["label_smoothing"], opts["kl_weight"], opts["ipo_average"])
    for o, t in zip(out, truth):
        assert o.dtype == torch.float32
        truth_close(o, t, atol=1e-5)
    grads = [torch.randn((), device=device), *(torch.randn(b, device=device) for _ in range(4))]
    torch.autograd.backward(list(out), grads)
    torch.autograd.backward(list(truth), [g.double() for g in grads])
    for t in leaves:
        truth_close(t.grad, copies[id(t)].grad, atol=1e-5)


def check_compiled_step_matches_eager(backend, device):
    """One LPC step through all four ops compiles with fullgraph=True and equals eager, values and grads."""
    torch._dynamo.reset()
    x = torch.randn(4, 33, device=device, requires_grad=True)
    labels = torch.tensor([0, 32, -100, 5], device=device)
    h = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(33, 8, device=device, requires_grad=True)
    lg = torch.randn(4, 6, device=device, requires_grad=True)
    cb = torch.randn(6, 8, device=device, requires_grad=True)
    ref = torch.randn(4, device=device)

    def step(x, h, w, lg, cb):
        tok = lk.token_logprobs(x, labels, backend=backend)
        weights, z = lk.gumbel_softmax_codes(lg, cb, seed=5, backend=backend)
        lin = lk.linear_token_logprobs(h + z, w, labels, backend=backend)
        out = lk.preference_loss(tok, lin, ref, ref.flip(0), prior_logits=lg, posterior_logits=lg * 2,
                                 kl_weight=0.1, backend=backend)
        return out.loss

    assert_compiled_matches_eager(step, (x, h, w, lg, cb))


def assert_compiled_matches_eager(step, args):
    """``torch.compile(step, fullgraph=True)`` equals eager ``step``: the scalar it returns and the gradients of
    ``args``."""
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    got.backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    expected = step(*args)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for g, a in zip(grads, args):
        torch.testing.assert_close(g, a.grad)


def check_preference_mixed_dtypes_match_reference(backend, device, loss_type, dtype, b, k=7):
    """``backend`` equals the reference backend on mixed-dtype inputs (int and float lengths, code logits in
    other dtypes), outputs and all gradients, bf16 results within one rounding."""
    pc, pr, rc, rr = ((torch.randn(b, device=device, dtype=torch.float64) * 30 - 100).to(dtype) for _ in range(4))
    cl, rl = torch.randint(1, 50, (b,), device=device), torch.randint(1, 50, (b,), device=device).double()
    prior, post = (torch.randn(b, k, device=device) * 3).to(dtype), torch.randn(b, k, device=device).double()
    refs = (rc, rr) if loss_type != "simpo" else (None, None)
    opts = dict(loss_type=loss_type, beta=0.2 if loss_type != "simpo" else 2.0,
                gamma=0.5 if loss_type == "simpo" else 0.0, label_smoothing=0.0 if loss_type == "ipo" else 0.15,
                kl_weight=0.3, ipo_average=loss_type != "ipo" or dtype != torch.float32)
    grads = [torch.randn((), device=device), *(torch.randn(b, device=device) for _ in range(4))]
    res = {}
    for name in (backend, "reference"):
        leaves = [new_leaf(t) if t is not None else None for t in (pc, pr, *refs, prior, post)]
        out = lk.preference_loss(*leaves[:4], chosen_lengths=cl, rejected_lengths=rl, prior_logits=leaves[4],
                                 posterior_logits=leaves[5], backend=name, **opts)
        torch.autograd.backward(list(out), [g.to(out.loss.dtype) for g in grads])
        res[name] = list(out) + [t.grad if t is not None else None for t in leaves]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for o, r in zip(res[backend], res["reference"]):
        if r is None:
            assert o is None
            continue
        assert o.dtype == r.dtype
        if o.dtype == torch.bfloat16:  # rounded once from the same fp32 value
            close64(o, r, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)
        else:
            close64(o, r, **tol)


def check_gumbel_matches_reference(backend, device, dtype, hard, b, k, d, fp32_atol, fp32_weights_atol=None):
    """``lk.gumbel_softmax_codes`` on ``backend`` against the reference backend, same seed and an offset just
    below 2**32 (the Philox counter carries into its high word): hard samples equal bit for bit; weights, z
    and both gradients within ``reference_tol`` (float32: rtol 1e-5 with ``fp32_atol``, weights
    ``fp32_weights_atol`` when given; 16-bit: one rounding, rtol eps)."""
    logits, codebook = (torch.randn(b, k, device=device) * 2).to(dtype), torch.randn(k, d, device=device).to(dtype)
    gw, gz = torch.randn(b, k, device=device), torch.randn(b, d, device=device).to(dtype)
    res = {}
    for name in (backend, "reference"):
        lg, cb = new_leaf(logits), new_leaf(codebook)
        w, z = lk.gumbel_softmax_codes(lg, cb, tau=0.6, hard=hard, seed=77, offset=2**32 - 50, backend=name)
        torch.autograd.backward([w, z], [gw.to(w.dtype), gz])
        res[name] = (w.detach(), z.detach(), lg.grad, cb.grad)
    if hard:
        assert torch.equal(res[backend][0], res["reference"][0])
        assert torch.equal(res[backend][1], res["reference"][1])
    tol = reference_tol(dtype) if dtype != torch.float32 else dict(rtol=1e-5, atol=fp32_atol)
    if dtype in LOW:
        tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    for name, o, r in zip(("weights", "z", "grad_logits", "grad_codebook"), res[backend], res["reference"]):
        assert o.dtype == r.dtype, name
        weights_fp32 = name == "weights" and dtype == torch.float32 and fp32_weights_atol is not None
        close64(o, r, **(dict(tol, atol=fp32_weights_atol) if weights_fp32 else tol))


def check_hard_samples_equal_reference(device, rows, n_seeds):
    """The raw ``gumbel_softmax_fwd`` kernel on ``device`` draws the reference's hard samples bit for bit over
    ``n_seeds`` seeds spread up to 2**45 and offsets at 0, just below 2**32 and seed-dependent above it."""
    logits, codebook = torch.randn(rows, 32, device=device), torch.randn(32, 3, device=device)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for seed in range(0, 2**45, 2**45 // n_seeds):
            for offset in (0, 2**32 - 100, 2**32 + 3 * seed % 1000):
                args = (logits.to(dtype), codebook.to(dtype), 0.5, True, seed, offset)
                ours = torch.ops.lpc.gumbel_softmax_fwd(*args)
                w_ref, z_ref, soft_ref = reference.gumbel_softmax_fwd(*args)
                assert torch.equal(ours[0], w_ref), (dtype, seed, offset)
                assert torch.equal(ours[1], z_ref), (dtype, seed, offset)
                torch.testing.assert_close(ours[2], soft_ref, **reference_tol(dtype))


# (seed, offset) pairs for the bit-exact noise check: counters that carry into the high word, huge seeds
NOISE_CASES = [(0, 0), (1, 5), (123456789, 2**32 - 7), (2**40 + 3, 2**33 + 1), (2**63 - 1, 2**62),
               (99, 2**63 - 1 - 64)]


def check_op_noise_bit_exact(device, seed, offset, b=8, k=8):
    """The raw gumbel kernel's float32 noise on ``device`` equals ``philox.gumbel_noise`` evaluated by torch on
    the same device, exactly: the differences g[:, j] - g[:, 0] are recovered from float64 soft weights of
    zero logits (differences of float32 values are exact in float64; the softmax/log round trip is accurate
    to ~1e-14)."""
    soft, _, _ = torch.ops.lpc.gumbel_softmax_fwd(torch.zeros(b, k, dtype=torch.float64, device=device),
                                                  torch.zeros(k, 1, device=device), 1.0, False, seed, offset)
    logs = soft.log()
    g = philox.gumbel_noise(seed, offset, b, k, device=device).double()
    torch.testing.assert_close(logs - logs[:, :1], g - g[:, :1], rtol=0, atol=1e-11)


def gradcheck_gumbel(backend, device):
    """float64 gradcheck of ``lk.gumbel_softmax_codes`` (soft at two temperatures; hard in the codebook)."""
    d = dict(dtype=torch.float64, device=device, requires_grad=True)
    lg, cb = torch.randn(4, 6, **d), torch.randn(6, 3, **d)
    for tau in (0.3, 1.7):
        assert torch.autograd.gradcheck(
            lambda a, e: lk.gumbel_softmax_codes(a, e, tau=tau, seed=11, offset=2**32, backend=backend), (lg, cb))
    # hard samples: z is a row of the codebook, differentiable in the codebook
    assert torch.autograd.gradcheck(
        lambda e: lk.gumbel_softmax_codes(lg.detach(), e, hard=True, seed=3, backend=backend)[1], (cb,))


def gradcheck_preference(backend, device, loss_type):
    """float64 gradcheck of ``lk.preference_loss``, all five outputs, int and float lengths, KL on."""
    d = dict(dtype=torch.float64, device=device, requires_grad=True)
    pc, pr, rc, rr = (torch.randn(5, **d) for _ in range(4))
    prior, post = torch.randn(5, 4, **d), torch.randn(5, 4, **d)
    cl = torch.tensor([3, 1, 4, 2, 6], device=device)
    rl = torch.tensor([2.0, 5.0, 1.0, 1.0, 3.0], dtype=torch.float64, device=device)
    refs = loss_type != "simpo"

    def f(*t):
        rc_, rr_ = (t[2], t[3]) if refs else (None, None)
        return tuple(lk.preference_loss(t[0], t[1], rc_, rr_, prior_logits=t[-2], posterior_logits=t[-1],
                                        chosen_lengths=cl, rejected_lengths=rl, loss_type=loss_type, beta=0.3,
                                        gamma=0.4 if loss_type == "simpo" else 0.0,
                                        label_smoothing=0.0 if loss_type == "ipo" else 0.2, kl_weight=0.5,
                                        ipo_average=loss_type == "ipo", backend=backend))

    assert torch.autograd.gradcheck(f, (pc, pr, rc, rr, prior, post) if refs else (pc, pr, prior, post))
