"""The compiled CPU kernels themselves (csrc/cpu, lpc_kernels/_cpp.py): what only the C++ side has.

The raw ``torch.ops.lpc.*_fwd/_bwd`` ops (opcheck; argument checks that raise RuntimeError naming the
argument; need flags; determinism across thread counts), the Philox header csrc/philox.h compiled on its own
(bit-exact words and uniforms), and the noise and hard samples drawn by the raw kernel. The ops' results through
the public API (against float64 and the reference backend) are in tests/ops.
"""

import shutil
import struct
import subprocess

import pytest
import torch
from torch.library import opcheck

from lpc_kernels import philox
from lpc_kernels.backends import unavailable_reason
from tests.helpers import REPO
from tests.helpers.backend_checks import (CPU, NOISE_CASES, check_hard_samples_equal_reference,
                                          check_op_noise_bit_exact, close64)
from tests.helpers.raw_op_cases import KERNEL_SCHEMAS, bad_raw_calls, raw_op_cases

_REASON = unavailable_reason("cpu", CPU)
if _REASON is not None:
    pytest.skip(f"cpu backend unavailable: {_REASON}", allow_module_level=True)

from lpc_kernels import _cpp  # noqa: E402  (needs lpc_kernels._C)

OPS = torch.ops.lpc


# -------------------------------------------------------------------------------- raw ops: opcheck
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


# -------------------------------------------------------------------------------- raw ops: results
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


def test_linear_token_logprobs_need_flags_and_results_independent_of_chunking():
    hidden, weight, bias = torch.randn(10, 16), torch.randn(300, 16), torch.randn(300)
    labels = torch.randint(0, 300, (10,))
    labels[3] = -100
    logp, lse = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, 4)
    for chunk in (1, 7, 64):
        lp2, lse2 = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, -100, chunk)
        close64(lp2, logp, rtol=1e-6, atol=1e-6)
        close64(lse2, lse, rtol=1e-6, atol=1e-6)
    g = torch.randn(10)
    full = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 4, True, True, True)
    for need in [(True, False, False), (False, True, False), (False, False, True)]:
        part = _cpp.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 3, *need)
        for flag, p, f in zip(need, part, full):
            if flag:
                close64(p, f, rtol=1e-5, atol=1e-6)
            else:
                assert p is None


# ------------------------------------------------------------------------------------------ Philox
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
    subprocess.run([cxx, "-O2", "-std=c++17", "-I", str(REPO / "csrc"), str(d / "probe.cpp"), "-o",
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
