"""The CUDA C++ backend (csrc/cuda) on a GPU: every op against float64 formulas and the reference backend,
gradients, the raw ``torch.ops.lpc.*`` CUDA kernels (opcheck, argument checks), bit-exact Gumbel noise,
in-place backward, and the shapes the small CPU table does not reach (long rows, misaligned buffers,
multi-chunk / multi-tile linear paths, many pairs).

Marked ``cuda``; skipped without a GPU. On a GPU machine build the extension with that machine's CUDA
torch first (``python setup.py build_ext --inplace``), then ``pytest -m cuda tests/test_cuda.py``.
A GPU with an extension that lacks CUDA kernels fails here rather than skipping.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import lpc_kernels as lk
from backend_checks import (LOW, NOISE_CASES, check_compiled_step_matches_eager, check_gumbel_matches_reference,
                            check_hard_samples_equal_reference, check_op_noise_bit_exact,
                            check_preference_mixed_dtypes_match_reference, check_preference_vs_float64,
                            gradcheck_gumbel, gradcheck_preference, linear_run, one_rounding, truth_close)
from backend_checks import close64 as _close
from backend_checks import leaf as _leaf
from backend_checks import reference_tol as _tol
from formulas import PREF_CASES, f_linear_token_logprobs, f_token_logprobs
from raw_op_cases import KERNEL_SCHEMAS, bad_raw_calls, public_op_cases, raw_op_cases
from lpc_kernels import _ops, philox, reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")
OPS = torch.ops.lpc


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    reason = _ops._unavailable_reason("cuda", DEV)
    assert reason is None, f"GPU present but the cuda backend is unavailable: {reason}"
    torch.cuda.manual_seed_all(0)


def _close_scaled(ours, ref, rel):
    """max |ours - ref| <= rel * max |ref|: for sums whose terms carry their own rounding (bf16 GEMM
    operands), where elementwise relative bounds fail on entries that cancel to ~0."""
    err = (ours.double() - ref.double()).abs().max().item()
    bound = rel * ref.double().abs().max().item() + 1e-6
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _up(t):
    """The exact fp32 upcast of fp16/bf16 tensors: the reference then does the same math in fp32."""
    return t.float() if t is not None and t.dtype in LOW else t


# ------------------------------------------------------------------------------------ token_logprobs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("n,v", [(1, 1), (1, 37), (5, 130), (9, 1000), (4, 4099), (3, 32003), (2, 128256)])
def test_token_logprobs_vs_float64(dtype, n, v):
    base = torch.randn(n, v, device=DEV, dtype=torch.float64) * 4
    if v > 8:
        base[0, v // 3] = 30.0  # a late maximum: the running sums are rescaled
    logits = base.to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV)
    if n > 2:
        labels[1] = -100
    g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for inplace in (False, True):
        leaf = _leaf(logits)
        buf = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        out = lk.token_logprobs(buf, labels, backend="cuda", inplace_backward=inplace)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        x64 = _leaf(logits, torch.float64)
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


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_token_logprobs_matches_reference_backend(dtype):
    n, v = 33, 5000
    logits = (torch.randn(n, v, device=DEV) * 5).to(dtype)
    logits[4, : v // 2] = float("-inf")  # masked vocabulary entries
    labels = torch.randint(v // 2, v, (n,), device=DEV)
    labels[[2, 7]] = -100
    g = torch.randn(n, device=DEV)
    leaf = _leaf(logits)
    out = lk.token_logprobs(leaf, labels, backend="cuda")
    out.backward(g)
    ref_leaf = _leaf(_up(logits))
    ref = lk.token_logprobs(ref_leaf, labels, backend="reference")
    ref.backward(g)
    _close(out, ref, rtol=1e-5, atol=1e-5)
    if dtype in LOW:
        one_rounding(leaf.grad, ref_leaf.grad, dtype)
    else:
        _close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("misalign", [1, 3])
def test_token_logprobs_misaligned_buffers(dtype, misalign):
    """A contiguous view whose data does not start on 16 bytes: scalar head/tail, then vectors."""
    n, v = 6, 777
    flat = (torch.randn(n * v + misalign, device=DEV) * 3).to(dtype)
    logits = flat[misalign:].view(n, v)
    assert logits.data_ptr() % 16 != 0
    labels = torch.randint(0, v, (n,), device=DEV)
    g = torch.randn(n, device=DEV)
    logp, lse = OPS.token_logprobs_fwd(logits, labels, -100)
    truth = f_token_logprobs(logits, labels)
    truth_close(logp, truth, atol=2e-5)
    grad = OPS.token_logprobs_bwd(g, logits, labels, lse, -100)  # output aligned, input not: scalar path
    ref = reference.token_logprobs_bwd(g, _up(logits), labels, lse, -100, False)
    if dtype in LOW:
        one_rounding(grad, ref, dtype)
    else:
        _close(grad, ref, rtol=1e-5, atol=1e-6)
    buf = logits.clone() if misalign == 1 else flat.clone()[misalign:].view(n, v)
    OPS.token_logprobs_bwd_(g, buf, labels, lse, -100)  # in place: same misalignment in and out
    _close(buf, grad, rtol=torch.finfo(dtype).eps, atol=1e-7)


def test_token_logprobs_large_magnitude_and_custom_ignore():
    logits = torch.randn(4, 70, device=DEV) * 1e4
    labels = torch.tensor([3, 7, 69, 0], device=DEV)
    labels[1] = 5
    out = lk.token_logprobs(logits, labels, ignore_index=5, backend="cuda")
    truth = f_token_logprobs(logits, labels, ignore_index=5)
    assert out[1] == 0
    _close(out, truth, rtol=1e-6, atol=1e-2)  # fp32 rounding of 1e4-sized values: ~1e-3 absolute
    big = torch.randn(6, 3000, device=DEV) * 1e4
    lab = torch.randint(0, 3000, (6,), device=DEV)
    lab[2] = -100
    leaf = _leaf(big)
    o = lk.token_logprobs(leaf, lab, backend="cuda")
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[2], torch.zeros(3000, device=DEV))  # ignored row: exact zeros, no NaN


def test_token_logprobs_all_ignored_and_inplace_bitwise():
    logits = _leaf(torch.randn(3, 33, device=DEV))
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
        leaf = _leaf(base)
        buf = leaf * 1
        lk.token_logprobs(buf, lab, backend="cuda", inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_token_logprobs_deterministic():
    logits, labels = torch.randn(128, 50000, device=DEV), torch.randint(0, 50000, (128,), device=DEV)
    a = OPS.token_logprobs_fwd(logits, labels, -100)
    b = OPS.token_logprobs_fwd(logits, labels, -100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- linear_token_logprobs
# (n, h, v, chunk): vocab tiles (Nv <= V; several tiles of 128 columns when chunk * V / Nv < V), row
# chunks (Nv > V: the fp32 weight-gradient accumulator across chunks), one row, one chunk.
LINEAR_SHAPES = [(1, 64, 77, 1024), (11, 64, 300, 2), (11, 24, 2500, 1), (11, 24, 2500, 1024), (200, 32, 77, 16),
                 (300, 48, 130, 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "n{}-h{}-v{}-c{}".format(*s))
def test_linear_token_logprobs_matches_reference(dtype, with_bias, shape):
    n, h, v, chunk = shape
    hidden = torch.randn(n, h, device=DEV, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, device=DEV, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    bias = torch.randn(v, device=DEV, dtype=torch.float64).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (n,), device=DEV)
    if n > 5:
        labels[[0, 4, 5]] = -100  # valid rows are not consecutive: gathered chunks, scattered grad rows
    g = torch.randn(n, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours = linear_run("cuda", hidden, weight, bias, labels, chunk, g)
    ref = linear_run("reference", _up(hidden), _up(weight), _up(bias), labels, chunk, g)
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    _close(ours[0], ref[0], **tol)
    truth_close(ours[0], f_linear_token_logprobs(hidden, weight, labels, bias), atol=1e-4)
    for o, r in zip(ours[1:], ref[1:]):
        if r is None:
            assert o is None
            continue
        assert o.dtype == dtype
        if dtype in LOW:  # GEMM operands in the input dtype (softmax-grad rounded once): a few ulps
            _close_scaled(o, r, 4 * torch.finfo(dtype).eps)
        else:
            _close(o, r, **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)))
    if n > 5:
        assert torch.equal(ours[1][[0, 4, 5]], torch.zeros(3, h, device=DEV, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_need_flags_and_chunking(dtype):
    """Each subset of gradients (which picks the row or the vocabulary tiling) equals the full result."""
    n, h, v = 40, 32, 1000
    hidden, weight = torch.randn(n, h, device=DEV).to(dtype), (torch.randn(v, h, device=DEV) / 4).to(dtype)
    bias = torch.randn(v, device=DEV).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[3] = -100
    logp, lse = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, 4)
    for chunk in (1, 7, 64, 4096):
        lp2, lse2 = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, chunk)
        _close(lp2, logp, rtol=1e-5, atol=1e-5)
        _close(lse2, lse, rtol=1e-5, atol=1e-5)
    g = torch.randn(n, device=DEV)
    full = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 4, True, True, True)
    for need in [(True, False, False), (False, True, False), (False, False, True), (True, False, True),
                 (False, True, True)]:
        for chunk in (3, 1024):
            part = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, chunk, *need)
            for flag, p, f in zip(need, part, full):
                if flag:
                    _close_scaled(p, f, 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)
                else:
                    assert p.numel() == 0


def test_linear_token_logprobs_all_ignored_frozen_weight_and_no_grad():
    hidden = _leaf(torch.randn(3, 16, device=DEV))
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


def test_linear_token_logprobs_bf16_larger():
    """A transformer-like head in bf16 (fp32 GEMM outputs): log-probs to fp32 accuracy."""
    n, h, v = 512, 256, 5000
    hidden = torch.randn(n, h, device=DEV).bfloat16()
    weight = (torch.randn(v, h, device=DEV) / h**0.5).bfloat16()
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[::5] = -100
    out = lk.linear_token_logprobs(hidden, weight, labels, backend="cuda", chunk_size=100)
    truth_close(out, f_linear_token_logprobs(hidden, weight, labels), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ gumbel_softmax_codes
@pytest.mark.parametrize("seed,offset", NOISE_CASES)
def test_op_noise_is_bit_exact(seed, offset):
    """The kernel's noise equals philox.gumbel_noise evaluated by torch on the GPU, exactly."""
    check_op_noise_bit_exact(DEV, seed, offset)


def test_philox_uniforms_same_on_gpu_and_cpu():
    """The reference's integer Philox gives the same uniforms on both devices (the CUDA kernel's noise
    is checked against the GPU evaluation above)."""
    counters = torch.arange(2**32 - 1000, 2**32 + 1000, dtype=torch.int64)
    for seed in (0, 7, 2**40 + 1):
        assert torch.equal(philox.philox_uniform(seed, counters), philox.philox_uniform(seed, counters.to(DEV)).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("b,k,d", [(1, 1, 1), (5, 12, 24), (37, 33, 300), (9, 100, 3), (3, 1024, 8)])
def test_gumbel_matches_reference(dtype, hard, b, k, d):
    check_gumbel_matches_reference("cuda", DEV, dtype, hard, b, k, d, fp32_atol=1e-5, fp32_weights_atol=2e-6)


def test_gumbel_vs_float64_formula():
    b, k, d, tau = 64, 40, 96, 0.7
    seed, offset = 2**33 + 11, 2**32 - 20
    logits, codebook = torch.randn(b, k, device=DEV) * 2, torch.randn(k, d, device=DEV)
    for hard in (False, True):
        lg, cb = _leaf(logits), _leaf(codebook)
        weights, z = lk.gumbel_softmax_codes(lg, cb, tau=tau, hard=hard, seed=seed, offset=offset, backend="cuda")
        noise = philox.gumbel_noise(seed, offset, b, k, device=DEV).double()
        l64, e64 = _leaf(logits, torch.float64), _leaf(codebook, torch.float64)
        soft = torch.softmax((l64 + noise) / tau, dim=-1)
        w_truth = F.one_hot(soft.argmax(-1), k).double() - soft.detach() + soft if hard else soft
        z_truth = w_truth @ e64
        if hard:
            assert torch.equal(weights, w_truth.detach().float())
        truth_close(weights, w_truth, atol=1e-6)
        truth_close(z, z_truth, atol=1e-5)
        gw, gz = torch.randn(b, k, device=DEV), torch.randn(b, d, device=DEV)
        torch.autograd.backward([weights, z], [gw, gz])
        torch.autograd.backward([w_truth, z_truth], [gw.double(), gz.double()])
        truth_close(lg.grad, l64.grad, atol=1e-5)
        truth_close(cb.grad, e64.grad, atol=1e-5)


def test_hard_samples_equal_reference_for_many_seeds():
    check_hard_samples_equal_reference(DEV, rows=256, n_seeds=10)


# ----------------------------------------------------------------------------------- preference_loss


@pytest.mark.parametrize("b,k", [(1, 1), (6, 5), (1000, 32), (70, 1024)])
@pytest.mark.parametrize("case", PREF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_preference_loss_vs_float64(case, b, k):
    check_preference_vs_float64("cuda", DEV, case, b, k)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_preference_loss_matches_reference_mixed_dtypes(loss_type, dtype):
    check_preference_mixed_dtypes_match_reference("cuda", DEV, loss_type, dtype, b=333)


def test_preference_loss_mean_is_deterministic_and_one_code_is_plain():
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


# ------------------------------------------------------------------------------ gradcheck (float64)
def test_gradcheck_token_and_linear_float64():
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x = torch.randn(5, 2100, **d)
    labels = torch.tensor([0, -100, 2099, 1500, 7], device=DEV)
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend="cuda"), (x,), fast_mode=True)
    h, w, b = torch.randn(6, 5, **d), torch.randn(300, 5, **d), torch.randn(300, **d)
    lab = torch.tensor([1, -100, 8, -100, 299, 4], device=DEV)
    for chunk in (1, 2, 16):
        assert torch.autograd.gradcheck(
            lambda h, w, b: lk.linear_token_logprobs(h, w, lab, bias=b, backend="cuda", chunk_size=chunk),
            (h, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda h: lk.linear_token_logprobs(h, w.detach(), lab, backend="cuda"), (h,))


def test_gradcheck_gumbel_softmax_codes_float64():
    gradcheck_gumbel("cuda", DEV)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_gradcheck_preference_loss_float64(loss_type):
    gradcheck_preference("cuda", DEV, loss_type)


# ---------------------------------------------------------------------- opcheck: public and raw ops
def _count(cases):
    return range(len(cases())) if torch.cuda.is_available() else []


@pytest.mark.parametrize("case", _count(lambda: public_op_cases("cuda", DEV)))
def test_opcheck_public_ops(case):
    op, args = public_op_cases("cuda", DEV)[case]
    opcheck(op, args)


def _raw_cases():
    return raw_op_cases(DEV)


def test_every_schema_has_a_cuda_kernel():
    for name in KERNEL_SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lpc::{name}", "CUDA"), name


@pytest.mark.parametrize("case", _count(_raw_cases))
def test_opcheck_raw_ops(case):
    op, args = _raw_cases()[case]
    opcheck(op, args)


def _bad_calls(device=DEV):
    """The shared bad kernel calls plus what only the CUDA kernels check (``device``: the probe script lists
    the case names on CPU)."""
    return bad_raw_calls(device) + [
        ("logits", lambda: OPS.token_logprobs_fwd(torch.randn(4, 10), torch.tensor([1, 2, 3, 4], device=device),
                                                  -100)),  # logits on the CPU
    ]


@pytest.mark.parametrize("case", _count(_bad_calls))
def test_bad_inputs_reaching_cuda_name_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        call()


def test_bad_input_messages_format_values():
    """The messages that format a shape, a dtype, a device or a number (built in csrc/cuda/checks.cpp, not in
    nvcc-compiled code: formatting one from a .cu file once segfaulted the process on an H100)."""
    x, lab = torch.randn(4, 10, device=DEV), torch.tensor([1, 2, -100, 3], device=DEV)
    with pytest.raises(RuntimeError, match=r"logits must be 2-D, got shape \[1, 4, 10\]"):
        OPS.token_logprobs_fwd(x[None], lab, -100)
    with pytest.raises(RuntimeError, match=r"logits must be float32, float64, float16 or bfloat16, got Long"):
        OPS.token_logprobs_fwd(x.long(), lab, -100)
    with pytest.raises(RuntimeError, match=r"logits must be a CUDA tensor, got a tensor on cpu"):
        OPS.token_logprobs_fwd(x.cpu(), lab, -100)
    with pytest.raises(RuntimeError, match=r"labels must have shape \[N\] = \[4\], got \[3\]"):
        OPS.token_logprobs_fwd(x, lab[:3], -100)
    with pytest.raises(RuntimeError, match=r"tau must be > 0, got 0"):
        OPS.gumbel_softmax_fwd(torch.randn(2, 5, device=DEV), torch.randn(5, 3, device=DEV), 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"loss_type must be one of \['dpo', 'ipo', 'simpo'\], got 'kto'"):
        pc = torch.randn(3, device=DEV)
        OPS.preference_loss_fwd(pc, pc, pc, pc, None, None, None, None, "kto", 0.1, 0.0, 0.0, 0.0, True)


# ------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    check_compiled_step_matches_eager("cuda", DEV)
