"""Shared helpers of the Triton backend: interpreter detection, compute dtypes, launch plumbing.

Two execution modes, fixed when this package is imported (Triton reads ``TRITON_INTERPRET`` when a
``@triton.jit`` function is created, so the mode cannot change later):

* GPU: the fused LM-head kernels and the token-logprobs forward are wrapped in ``triton.autotune`` over
  a config list keyed on sizes that do not change from step to step (``V``, ``H``), never on ``N`` (no
  re-tuning and no recompilation for new sequence lengths: those are ordinary runtime arguments); the
  small kernels (Gumbel, preference loss, token backward, which must not be re-run in place) pick their
  blocks from the shapes. ``LPC_TRITON_AUTOTUNE=0`` turns the sweeps off (first config only).
* Interpreter (``TRITON_INTERPRET=1``, CPU tensors): ``triton.autotune`` with more than one config fails
  there, and every program instance costs milliseconds per loop step, so each kernel is launched with
  one wide-block config taken from the module-level ``INTERPRET_*`` dicts of its file (tests may
  monkeypatch them to force several blocks, splits or the looped paths).

bf16 arithmetic is wrong under the interpreter (casts to bf16 truncate, bf16 ``tl.dot`` returns garbage),
so every kernel upcasts 16-bit tiles right after ``tl.load``; on the GPU the 16-bit tiles go straight
into ``tl.dot`` (tensor cores: exact products, fp32 accumulation), which is the same math.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the reference backend's rule)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``.

    fp32/fp64 operands need ``"ieee"``: Triton's default on NVIDIA is TF32 (10-bit mantissa), which misses
    the 1e-5 relative contract for fp32 inputs. 16-bit operands are exact in any mode (products of two
    16-bit floats are exact in fp32), so they keep the default (tensor cores).
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the *current* device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 1


# LPC_TRITON_AUTOTUNE=0: no tuning sweep on the GPU, each kernel uses its first config (per dtype family).
# For quick GPU test runs: a sweep compiles and times every config for every new (V, H, dtype) key.
AUTOTUNE: bool = os.environ.get("LPC_TRITON_AUTOTUNE", "1") != "0"


def tuned(configs, key, quick=None, **kwargs):
    """``triton.autotune(configs, key)`` on the GPU; the bare kernel under the interpreter.

    Returns a decorator. Under the interpreter the caller launches the bare kernel with an explicit
    config (see :func:`launch`). ``quick``: the configs kept when ``LPC_TRITON_AUTOTUNE=0`` (default: the
    first one).
    """

    def wrap(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=configs if AUTOTUNE else (quick or configs[:1]), key=key, **kwargs)(fn)

    return wrap


def launch(kernel, grid, args, interpret_config: dict):
    """Launch an autotuned kernel (GPU) or the bare kernel with ``interpret_config`` (interpreter).

    ``grid`` is a callable of the meta-parameters (block sizes) as Triton expects.
    """
    if INTERPRET:
        kernel[grid(interpret_config)](*args, **interpret_config)
    else:
        kernel[grid](*args)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def cast_out(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even, also under the interpreter.

    The interpreter converts fp32 to bf16 by truncation; there the value is first rounded to the nearest
    bf16 in fp32 bits (add half an ulp, ties to even, clear the low 16 bits), so the final cast is exact
    and matches the GPU's ``cvt.rn.bf16.f32`` and torch's ``.to(torch.bfloat16)``.
    """
    if _INTERPRET:
        if DTYPE == tl.bfloat16:
            x = x.to(tl.float32)
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def scalar_args(cdt: torch.dtype, device, *values: float):
    """Scalar float arguments for a kernel: Triton passes Python floats as fp32.

    For fp32 compute that is exactly what torch does with a Python scalar; fp64 compute needs the full
    double, so the values travel in a small fp64 tensor instead (``F64_SCALARS=True`` in the kernel).
    Returns ``(tensor or None, F64_SCALARS)``.
    """
    if cdt == torch.float64:
        return torch.tensor(values, dtype=torch.float64, device=device), True
    return None, False
