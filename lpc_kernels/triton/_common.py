"""Shared helpers of the Triton backend's kernels: interpreter detection, compute dtypes, launch and
autotune plumbing, small ``@triton.jit`` helpers (``docs/design.md``, "Triton kernels"). What each
autotuner chose is recorded by ``autotune_log.py``.

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

from ..numerics import compute_dtype  # noqa: F401  (the kernel files import it from here)
from .autotune_log import MODES, logged

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

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
MODES.update(interpret=INTERPRET, autotune=AUTOTUNE)


def tuned(configs, key, quick=None, **kwargs):
    """``triton.autotune(configs, key)`` on the GPU; a one-config autotuner under the interpreter.

    Returns a decorator. Under the interpreter the caller passes an explicit config at launch (see
    :func:`launch`) and the autotuner holds one empty config (``triton.autotune`` with more than one
    config fails there), so the kernel is still recorded for ``LPC_TRITON_AUTOTUNE_LOG``. ``quick``: the
    configs kept when ``LPC_TRITON_AUTOTUNE=0`` (default: the first one). Every kernel made here is
    registered with the autotune log (``autotune_log.logged``) under its function name.
    """

    def wrap(fn):
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
        if INTERPRET:
            return logged(name, triton.autotune(configs=[triton.Config({})], key=key)(fn))
        return logged(name, triton.autotune(configs=configs if AUTOTUNE else (quick or configs[:1]), key=key,
                                            **kwargs)(fn))

    return wrap


def launch(kernel, grid, args, interpret_config: dict):
    """Launch an autotuned kernel (GPU) or the kernel with ``interpret_config`` (interpreter).

    ``grid`` is a callable of the meta-parameters (block sizes) as Triton expects.
    """
    if INTERPRET:
        kernel[grid(interpret_config)](*args, **interpret_config)
    else:
        kernel[grid](*args)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 232448)


def smem_limit() -> int:
    """Shared memory one program may use on the current GPU (227 KiB on Hopper); Hopper's when none."""
    if torch.cuda.is_available():
        return _smem_limit(torch.cuda.current_device())
    return 232448


def prune_smem(bytes_of, limit=None):
    """Keep the configs whose pipelined operand tiles fit shared memory: ``bytes_of(config, elem_size)``.

    Never returns an empty list (the smallest config is kept so that the launch still has one).
    """

    def prune(configs, nargs, elem_size):
        lim = limit or smem_limit()
        keep = [c for c in configs if bytes_of(c, elem_size) <= lim]
        return keep or [min(configs, key=lambda c: bytes_of(c, elem_size))]

    return prune


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


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of program ``pid`` in grouped order (Triton's matmul tutorial): programs in
    flight share GROUP_M row blocks of the first operand and walk the second together, so both stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
