"""The CUDA kernels themselves (csrc/cuda) on a GPU: the raw ``torch.ops.lpc.*`` CUDA kernels (opcheck, argument
checks and the formatting of their messages), misaligned buffers, determinism, need flags, the noise and hard
samples drawn by the raw kernel. The ops' results through the public API on CUDA tensors are in tests/ops.

Marked ``cuda``; skipped without a GPU. On a GPU machine build the extension with that machine's CUDA torch
first (``python setup.py build_ext --inplace``), then ``pytest -m cuda tests/backends tests/ops``. A GPU with an
extension that lacks CUDA kernels fails here rather than skipping.
"""

import pytest
import torch
from torch.library import opcheck

from lpc_kernels import reference
from tests.helpers.backend_checks import (LOW, NOISE_CASES, check_hard_samples_equal_reference,
                                          check_op_noise_bit_exact, close64, close_scaled, exact_fp32, one_rounding,
                                          truth_close)
from tests.helpers.formulas import f_token_logprobs
from tests.helpers.raw_op_cases import KERNEL_SCHEMAS, bad_raw_calls, raw_op_cases

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("cuda_backend"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")
OPS = torch.ops.lpc


# ---------------------------------------------------------------------------------- token_logprobs
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
    ref = reference.token_logprobs_bwd(g, exact_fp32(logits), labels, lse, -100, False)
    if dtype in LOW:
        one_rounding(grad, ref, dtype)
    else:
        close64(grad, ref, rtol=1e-5, atol=1e-6)
    buf = logits.clone() if misalign == 1 else flat.clone()[misalign:].view(n, v)
    OPS.token_logprobs_bwd_(g, buf, labels, lse, -100)  # in place: same misalignment in and out
    close64(buf, grad, rtol=torch.finfo(dtype).eps, atol=1e-7)


def test_token_logprobs_deterministic():
    logits, labels = torch.randn(128, 50000, device=DEV), torch.randint(0, 50000, (128,), device=DEV)
    a = OPS.token_logprobs_fwd(logits, labels, -100)
    b = OPS.token_logprobs_fwd(logits, labels, -100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- linear_token_logprobs
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
        close64(lp2, logp, rtol=1e-5, atol=1e-5)
        close64(lse2, lse, rtol=1e-5, atol=1e-5)
    g = torch.randn(n, device=DEV)
    full = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, 4, True, True, True)
    for need in [(True, False, False), (False, True, False), (False, False, True), (True, False, True),
                 (False, True, True)]:
        for chunk in (3, 1024):
            part = OPS.linear_token_logprobs_bwd(g, hidden, weight, bias, labels, lse, -100, chunk, *need)
            for flag, p, f in zip(need, part, full):
                if flag:
                    close_scaled(p, f, 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)
                else:
                    assert p.numel() == 0


# ---------------------------------------------------------------------------- gumbel_softmax_codes
@pytest.mark.parametrize("seed,offset", NOISE_CASES)
def test_op_noise_is_bit_exact(seed, offset):
    """The kernel's noise equals philox.gumbel_noise evaluated by torch on the GPU, exactly."""
    check_op_noise_bit_exact(DEV, seed, offset)


def test_hard_samples_equal_reference_for_many_seeds():
    check_hard_samples_equal_reference(DEV, rows=256, n_seeds=10)


# -------------------------------------------------------------------------------- raw ops: opcheck
def _count(cases):
    return range(len(cases())) if torch.cuda.is_available() else []


def _raw_cases():
    return raw_op_cases(DEV)


def test_every_schema_has_a_cuda_kernel():
    for name in KERNEL_SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lpc::{name}", "CUDA"), name


@pytest.mark.parametrize("case", _count(_raw_cases))
def test_opcheck_raw_ops(case):
    op, args = _raw_cases()[case]
    opcheck(op, args)


# ----------------------------------------------------------------------------- raw ops: bad inputs
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
