"""``lk.gumbel_softmax_codes`` (lpc_kernels/ops/gumbel_softmax_codes.py) and its noise (lpc_kernels/philox.py), on
every backend.

* The noise: the vectorised Philox4x32-10 of lpc_kernels.philox against a scalar transcription of the published
  algorithm, the Random123 known-answer vectors, and Triton's own ``tl.rand``.
* The backend table (the ``backend`` fixture) against the float64 formula of tests/helpers/formulas.py (the same
  codes drawn for the same seed); gradcheck, opcheck and bad inputs.
* The compiled cpu kernels through the op against the reference backend; on a GPU (``cuda`` marker) the cuda
  backend against the reference and float64.

The raw kernels' bit-exact noise and hard samples are tested in tests/backends.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import lpc_kernels as lk
from lpc_kernels import philox
from tests.helpers.backend_checks import (CPU, LOW, check_bad_input, check_gumbel_matches_reference, cuda_opcheck_cases,
                                          gradcheck_gumbel, needs_cpu_kernels, new_leaf, on_cuda, opcheck_family,
                                          truth_close)
from tests.helpers.formulas import f_gumbel

DEV = torch.device("cuda")
B, K, D = 4, 5, 3


def gumbel(lg=None, cb=None, **kw):
    lg = torch.randn(B, K) if lg is None else lg
    cb = torch.randn(K, D) if cb is None else cb
    return lambda backend: lk.gumbel_softmax_codes(lg, cb, backend=backend, **kw)


CASES = [
    # (id, call, exception, words the message must contain)
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
]

M32 = 0xFFFFFFFF


# Random123 tests/kat_vectors, "philox4x32 10": counter[4], key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


# ----------------------------------------------------------------------- the noise (Philox4x32-10)
def scalar_philox4x32_10(ctr, key):
    """Plain transcription of Random123's philox4x32_R(10, ctr, key): bump the key before rounds 2..10."""
    m0, m1 = 0xD2511F53, 0xCD9E8D57
    w0, w1 = 0x9E3779B9, 0xBB67AE85
    c, k = list(ctr), list(key)
    for r in range(10):
        if r > 0:
            k = [(k[0] + w0) & M32, (k[1] + w1) & M32]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
    return tuple(c)


def scalar_uniform(seed, counter):
    x = scalar_philox4x32_10((counter & M32, counter >> 32, 0, 0), (seed & M32, seed >> 32))[0]
    signed = x - 2**32 if x >= 2**31 else x
    folded = ~signed if signed < 0 else signed
    return (torch.tensor(float(folded), dtype=torch.float32)
            * torch.tensor(philox.UNIFORM_SCALE, dtype=torch.float32)).item()


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_scalar_transcription_known_answers(ctr, key, expected):
    assert scalar_philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_vectorised_known_answers(ctr, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = philox.philox4x32(*words, key[0], key[1])
    assert tuple(int(w) for w in out) == expected


def test_philox_vectorised_matches_scalar_on_random_counters_and_seeds():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**62, (64,), generator=gen)
    counters[:4] = torch.tensor([0, 1, 2**32 - 1, 2**32])  # around the low/high word boundary
    for seed in (0, 1, 2**32 - 1, 2**32 + 7, 2**63 - 1):
        ours = philox.philox_uniform(seed, counters)
        expected = torch.tensor([scalar_uniform(seed, int(c)) for c in counters], dtype=torch.float32)
        assert torch.equal(ours, expected), seed


def test_philox_uniform_mapping_edges():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = philox.uint32_to_uniform(words)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0xffffffff is int32 -1, folded to 0
    assert u[2] == u[3] and u[2] < 1.0  # 2**31 is int32 min, folded to int32 max


def test_philox_gumbel_noise_finite_and_layout():
    g = philox.gumbel_noise(5, 100, 3, 7)
    assert g.shape == (3, 7) and torch.isfinite(g).all()
    u = philox.philox_uniform(5, torch.arange(100, 121))
    assert torch.equal(g.flatten(), philox.gumbel_from_uniform(u))


def test_philox_seed_range_checked():
    with pytest.raises(ValueError, match="seed"):
        philox.philox_uniform(-1, torch.arange(3))
    with pytest.raises(TypeError, match="seed"):
        philox.philox_uniform(1.5, torch.arange(3))


@pytest.mark.triton
def test_philox_matches_triton_tl_rand():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        counters = offset + idx.to(tl.int64)
        tl.store(out_ptr + idx, tl.rand(seed, counters), mask=idx < n)

    # natively on a GPU; through the interpreter (TRITON_INTERPRET=1) on CPU tensors
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    device = "cpu" if interpreted else "cuda"
    for seed, offset in ((0, 0), (1234, 2**32 - 3), (2**40 + 5, 17)):
        out = torch.empty(16, dtype=torch.float32, device=device)
        _rand_kernel[(1,)](out, seed, offset, 16, BLOCK=16)
        expected = philox.philox_uniform(seed, offset + torch.arange(16))
        assert torch.equal(out.cpu(), expected), (seed, offset)


# ------------------------------------------------------------------------------- the backend table
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_softmax_codes(backend, hard, dtype):
    b, k, d = 5, 12, 24
    logits = new_leaf(torch.randn(b, k) * 2, dtype)
    codebook = new_leaf(torch.randn(k, d), dtype)
    seed, offset = 2**33 + 11, 2**32 - 20  # counters cross the 32-bit word boundary
    weights, z = lk.gumbel_softmax_codes(logits, codebook, tau=0.7, hard=hard, seed=seed, offset=offset,
                                         backend=backend)
    assert weights.dtype == torch.float32 and z.dtype == dtype
    l64, e64 = new_leaf(logits.detach(), torch.float64), new_leaf(codebook.detach(), torch.float64)
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


def test_gumbel_same_seed_same_sample_across_backends(backend):
    logits, codebook = torch.randn(8, 16), torch.randn(16, 4)
    ours = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=7, offset=3, backend=backend)[0]
    ref = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=7, offset=3, backend="reference")[0]
    other = lk.gumbel_softmax_codes(logits, codebook, hard=True, seed=8, offset=3, backend=backend)[0]
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, other)


def test_gradcheck_float64(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    lg, cb = torch.randn(3, 4, **d), torch.randn(4, 6, **d)
    assert torch.autograd.gradcheck(
        lambda a, e: lk.gumbel_softmax_codes(a, e, tau=0.5, seed=1, backend=backend), (lg, cb))


def test_opcheck(backend):
    opcheck_family(backend, CPU, "gumbel_softmax_codes")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case, backend):
    check_bad_input(case, backend)


# --------------------------------------------------------------------------------- the cpu kernels
@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_matches_reference_cpu(dtype, hard):
    check_gumbel_matches_reference("cpu", "cpu", dtype, hard, 7, 13, 5, fp32_atol=1e-6)


@needs_cpu_kernels
def test_gradcheck_float64_cpu():
    gradcheck_gumbel("cpu", "cpu")


# ------------------------------------------------------------------------------------ CUDA tensors
@on_cuda
def test_philox_uniforms_same_on_gpu_and_cpu():
    """The reference's integer Philox gives the same uniforms on both devices (the CUDA kernel's noise
    is checked against the GPU evaluation above)."""
    counters = torch.arange(2**32 - 1000, 2**32 + 1000, dtype=torch.int64)
    for seed in (0, 7, 2**40 + 1):
        assert torch.equal(philox.philox_uniform(seed, counters), philox.philox_uniform(seed, counters.to(DEV)).cpu())


@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("b,k,d", [(1, 1, 1), (5, 12, 24), (37, 33, 300), (9, 100, 3), (3, 1024, 8)])
def test_gumbel_matches_reference_cuda(dtype, hard, b, k, d):
    check_gumbel_matches_reference("cuda", DEV, dtype, hard, b, k, d, fp32_atol=1e-5, fp32_weights_atol=2e-6)


@on_cuda
def test_gumbel_vs_float64_formula_cuda():
    b, k, d, tau = 64, 40, 96, 0.7
    seed, offset = 2**33 + 11, 2**32 - 20
    logits, codebook = torch.randn(b, k, device=DEV) * 2, torch.randn(k, d, device=DEV)
    for hard in (False, True):
        lg, cb = new_leaf(logits), new_leaf(codebook)
        weights, z = lk.gumbel_softmax_codes(lg, cb, tau=tau, hard=hard, seed=seed, offset=offset, backend="cuda")
        noise = philox.gumbel_noise(seed, offset, b, k, device=DEV).double()
        l64, e64 = new_leaf(logits, torch.float64), new_leaf(codebook, torch.float64)
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


@on_cuda
def test_gradcheck_float64_cuda():
    gradcheck_gumbel("cuda", DEV)


@on_cuda
@pytest.mark.parametrize("case", cuda_opcheck_cases("gumbel_softmax_codes"))
def test_opcheck_cuda(case):
    opcheck_family("cuda", DEV, "gumbel_softmax_codes", case)
