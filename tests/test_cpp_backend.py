"""Tests specific to the compiled CPU kernels (csrc/cpu, lpc_kernels._cpp).

The backend table in test_ops.py checks every backend against independent float64 formulas; this file
covers what only the C++ side has: the raw ``torch.ops.lpc.*_fwd/_bwd`` ops (opcheck, argument checks
that raise RuntimeError naming the argument), the Philox header (bit-exact words and uniforms, compiled
on its own), the noise drawn through the op, paths the small table does not reach (multi-block rows,
-inf logits, non-consecutive valid rows, chunk sizes), and agreement with the reference backend:
fp32/fp64 inputs to ~1e-5 / 1e-12 relative, bf16/fp16 inputs against the reference run on the exactly
upcast fp32 inputs (same math in fp32), gradients within one rounding of the input dtype.
"""

import os
import shutil
import struct
import subprocess

import pytest
import torch
from torch.library import opcheck

import lpc_kernels as lk
from backend_checks import (LOW, NOISE_CASES, check_gumbel_matches_reference, check_hard_samples_equal_reference,
                            check_op_noise_bit_exact, gradcheck_gumbel, gradcheck_preference, linear_run,
                            one_rounding)
from backend_checks import check_preference_mixed_dtypes_match_reference
from backend_checks import close64 as _close
from backend_checks import leaf as _leaf
from backend_checks import reference_tol as _tol
from lpc_kernels import _ops, philox
from raw_op_cases import KERNEL_SCHEMAS, bad_raw_calls, raw_op_cases

CPU = torch.device("cpu")
_REASON = _ops._unavailable_reason("cpu", CPU)
if _REASON is not None:
    pytest.skip(f"cpu backend unavailable: {_REASON}", allow_module_level=True)

from lpc_kernels import _cpp  # noqa: E402  (needs lpc_kernels._C)

OPS = torch.ops.lpc
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- raw ops: opcheck
def _raw_cases():
    return raw_op_cases(torch.device("cpu"))


def test_every_schema_has_a_cpu_kernel():
    for name in KERNEL_SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lpc::{name}", "CPU"), name


@pytest.mark.parametrize("case", range(len(_raw_cases())))
def test_opcheck_raw_ops(case):
    op, args = _raw_cases()[case]
    opcheck(op, args)


# ------------------------------------------------------------------- raw ops: bad inputs reach C++
def _bad_calls():
    """The shared bad kernel calls plus what only the CPU kernels check: int32 labels (the CUDA kernels widen
    them), label values (checked in Python for CUDA), a hidden size that does not match the weight."""
    x = torch.randn(4, 10)
    return bad_raw_calls("cpu") + [
        ("labels", lambda: OPS.token_logprobs_fwd(x, torch.tensor([1, 2, -100, 3], dtype=torch.int32), -100)),
        ("labels", lambda: OPS.token_logprobs_fwd(x, torch.tensor([1, 2, 10, 3]), -100)),  # out of range
        ("labels", lambda: OPS.token_logprobs_fwd(x, torch.tensor([1, -1, 0, 3]), -100)),
        ("hidden", lambda: OPS.linear_token_logprobs_fwd(torch.randn(4, 5), torch.randn(10, 6), None,
                                                         torch.tensor([1, 2, -100, 3]), -100, 4)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_reaching_cpp_name_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        call()


# ------------------------------------------------------------------------ against the reference
def _token_ref(logits, labels, ignore_index=-100):
    """Reference backend on the exactly upcast input: the same math in fp32 (fp64 for fp64)."""
    up = logits.detach().float() if logits.dtype in LOW else logits.detach()
    leaf = up.clone().requires_grad_(True)
    out = lk.token_logprobs(leaf, labels, ignore_index=ignore_index, backend="reference")
    return out, leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("v", [1, 7, 2048, 5000])  # 5000: three row blocks of 2048, the last one partial
def test_token_logprobs_matches_reference(dtype, v):
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
        leaf = _leaf(logits)
        buf = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        out = lk.token_logprobs(buf, labels, backend="cpu", inplace_backward=inplace)
        out.backward(g)
        ref, ref_leaf = _token_ref(logits, labels)
        ref.backward(g)
        assert out.dtype == ref.dtype and leaf.grad.dtype == dtype
        _close(out, ref, **_tol(dtype))
        if dtype in LOW:
            one_rounding(leaf.grad, ref_leaf.grad, dtype)
        else:
            _close(leaf.grad, ref_leaf.grad, **_tol(dtype))
        assert torch.equal(leaf.grad[1], torch.zeros(v, dtype=dtype))  # ignored row


def test_token_logprobs_extreme_logits_stay_finite():
    logits = torch.randn(6, 3000) * 1e4
    labels = torch.randint(0, 3000, (6,))
    leaf = _leaf(logits)
    out = lk.token_logprobs(leaf, labels, backend="cpu")
    out.sum().backward()
    ref = lk.token_logprobs(logits.double(), labels, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
    _close(out, ref, rtol=1e-6, atol=1e-2)  # fp32 rounding of 1e4-sized values: ~1e-3 absolute


def test_token_logprobs_deterministic_across_thread_counts():
    logits, labels = torch.randn(64, 4099), torch.randint(0, 4099, (64,))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, max(threads, 2)):
            torch.set_num_threads(t)
            logp, lse = OPS.token_logprobs_fwd(logits, labels, -100)
            results.append((logp, lse, OPS.token_logprobs_bwd(torch.ones(64), logits, labels, lse, -100)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_linear_token_logprobs_matches_reference(dtype, with_bias, chunk_size):
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
    tol = _tol(dtype) if dtype != torch.float32 else dict(rtol=1e-5, atol=2e-5)
    _close(ours[0], ref[0], **(tol if dtype not in LOW else dict(rtol=1e-5, atol=2e-5)))
    for o, r in zip(ours[1:], ref[1:]):
        if r is None:
            assert o is None
        elif dtype in LOW:
            one_rounding(o, r, dtype)
        else:
            _close(o, r, **tol)
    assert torch.equal(ours[1][[0, 4, 5, 9]], torch.zeros(4, h, dtype=dtype))


def test_linear_token_logprobs_need_flags_and_results_independent_of_chunking():
    hidden, weight, bias = torch.randn(10, 16), torch.randn(300, 16), torch.randn(300)
    labels = torch.randint(0, 300, (10,))
    labels[3] = -100
    logp, lse = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, 4)
    for chunk in (1, 7, 64):
        lp2, lse2 = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, chunk)
        _close(lp2, logp, rtol=1e-6, atol=1e-6)
        _close(lse2, lse, rtol=1e-6, atol=1e-6)
    g = torch.randn(10)
    full = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 4, True, True, True)
    for need in [(True, False, False), (False, True, False), (False, False, True)]:
        part = _cpp.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 3, *need)
        for flag, p, f in zip(need, part, full):
            if flag:
                _close(p, f, rtol=1e-5, atol=1e-6)
            else:
                assert p is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_matches_reference(dtype, hard):
    check_gumbel_matches_reference("cpu", "cpu", dtype, hard, 7, 13, 5, fp32_atol=1e-6)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_preference_loss_matches_reference(loss_type, dtype):
    check_preference_mixed_dtypes_match_reference("cpu", CPU, loss_type, dtype, b=33)


# ------------------------------------------------------------------------------ float64 gradcheck
def test_gradcheck_token_logprobs_float64():
    x = torch.randn(5, 2100, dtype=torch.float64, requires_grad=True)  # two row blocks
    labels = torch.tensor([0, -100, 2099, 1500, 7])
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, labels, backend="cpu"), (x,), fast_mode=True)
    # (inplace_backward is covered by test_token_logprobs_matches_reference: gradcheck runs backward
    # several times, and the in-place variant consumes its logits buffer on the first)
    x2 = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lk.token_logprobs(x, torch.tensor([0, -100, 10]), backend="cpu"),
                                    (x2,))


def test_gradcheck_linear_token_logprobs_float64():
    d = dict(dtype=torch.float64, requires_grad=True)
    h, w, b = torch.randn(6, 5, **d), torch.randn(9, 5, **d), torch.randn(9, **d)
    labels = torch.tensor([1, -100, 8, -100, 0, 4])
    for chunk in (1, 2, 16):
        assert torch.autograd.gradcheck(
            lambda h, w, b: lk.linear_token_logprobs(h, w, labels, bias=b, backend="cpu", chunk_size=chunk),
            (h, w, b))
    assert torch.autograd.gradcheck(lambda h: lk.linear_token_logprobs(h, w.detach(), labels, backend="cpu"), (h,))


def test_gradcheck_gumbel_softmax_codes_float64():
    gradcheck_gumbel("cpu", "cpu")


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_gradcheck_preference_loss_float64(loss_type):
    gradcheck_preference("cpu", "cpu", loss_type)


# ----------------------------------------------------------------------------------------- Philox
def _f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


_HEADER_PROBE = r"""
#include <cstdio>
#include <cinttypes>
#include "philox.h"
int main(int argc, char**) {
  if (argc > 1) {  // the float constants, for exactness against lpc_kernels.philox
    std::printf("%a %a %a\n", (double)lpc::philox::kUniformScale, (double)lpc::philox::kGumbelUMin,
                (double)lpc::philox::kGumbelUMax);
    return 0;
  }
  unsigned long long seed, counter;
  float u;
  while (std::scanf("%llu %llu", &seed, &counter) == 2) {
    const uint32_t w = lpc::philox::philox_first_word(seed, counter);
    u = lpc::philox::philox_uniform(seed, counter);
    const float g = lpc::philox::gumbel_from_uniform(u);
    std::printf("%" PRIu32 " %a %a\n", w, (double)u, (double)g);
  }
}
"""


@pytest.fixture(scope="module")
def header_probe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the csrc/philox.h probe")
    d = tmp_path_factory.mktemp("philox_probe")
    (d / "probe.cpp").write_text(_HEADER_PROBE)
    subprocess.run([cxx, "-O2", "-std=c++17", "-I", os.path.join(REPO, "csrc"), str(d / "probe.cpp"), "-o",
                    str(d / "probe")], check=True)
    return str(d / "probe")


def test_philox_header_bit_exact(header_probe):
    """csrc/philox.h alone (no torch): words and uniforms equal lpc_kernels.philox bit for bit."""
    seeds = [0, 1, 7, 2**32 - 1, 2**32, 2**32 + 11, 2**40 + 5, 2**63 - 1]
    counters = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 12345, 2**62 - 1, 2**63 - 1]
    counters += torch.randint(0, 2**62, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    pairs = [(s, c) for s in seeds for c in counters]
    out = subprocess.run([header_probe], input="".join(f"{s} {c}\n" for s, c in pairs), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    for (s, c), line in zip(pairs, out):
        word, u, g = line.split()
        ctr = torch.tensor([c])
        assert int(word) == int(philox.philox_uint32(s, ctr)[0]), (s, c)
        assert _f32_bits(float.fromhex(u)) == _f32_bits(philox.philox_uniform(s, ctr)[0].item()), (s, c)
        # the header's gumbel uses the platform logf; torch's log may differ by an ulp in each log, which
        # is a few ulps of g, or ~1e-7 absolute where g is near 0 (the outer log's result is small there)
        ref_g = philox.gumbel_from_uniform(philox.philox_uniform(s, ctr))[0].item()
        assert abs(_f32_bits(float.fromhex(g)) - _f32_bits(ref_g)) <= 4 or abs(float.fromhex(g) - ref_g) < 1e-6


def test_philox_header_constants(header_probe):
    """The header's float32 constants are the ones lpc_kernels.philox uses (as float32 tensors)."""
    out = subprocess.run([header_probe, "consts"], capture_output=True, text=True, check=True).stdout.split()
    expected = (philox.UNIFORM_SCALE, philox.GUMBEL_U_MIN, philox.GUMBEL_U_MAX)
    for got, want in zip(out, expected):
        assert float.fromhex(got) == torch.tensor(want, dtype=torch.float32).item()


@pytest.mark.parametrize("seed,offset", NOISE_CASES)
def test_op_noise_is_bit_exact(seed, offset):
    check_op_noise_bit_exact("cpu", seed, offset)


def test_hard_samples_equal_reference_for_many_seeds():
    check_hard_samples_equal_reference("cpu", rows=16, n_seeds=25)
