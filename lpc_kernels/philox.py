"""Philox4x32-10 counter-based random numbers, bit-exact with Triton's ``tl.rand``.

The Gumbel noise of ``gumbel_softmax_codes`` for element ``(b, k)`` is a pure function of
``(seed, offset + b * K + k)``; every backend (reference, CPU C++, CUDA C++, Triton) computes the same
function, so samples agree exactly across backends for the same ``(seed, offset)``.

The function (the one ``tl.rand(seed, counter)`` computes for an int64 ``counter``):

* counter words ``c = (counter & 0xffffffff, counter >> 32, 0, 0)``,
  key ``k = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)``;
* ten Philox rounds (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3");
* the first output word ``x`` read as int32, mapped to ``[0, 1)`` by
  ``float32(x if x >= 0 else ~x) * float32(4.6566127342e-10)``.

Tensors here hold 32-bit words in int64 so that every operation is exact on any device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # largest scale with int32_max * scale < 1 in fp32 (Triton's)
N_ROUNDS = 10


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of 32-bit words, exact in int64 (16-bit limbs)."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    return hi & MASK32, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS):
    """Vectorised Philox4x32 over int64 tensors holding uint32 words; returns the four output words."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def philox_uint32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """First Philox4x32-10 output word (as int64 in ``[0, 2**32)``) for int64 ``counters`` (>= 0)."""
    seed = _check_seed(seed)
    counters = counters.to(torch.int64)
    lo, hi = counters & MASK32, (counters >> 32) & MASK32
    zero = torch.zeros_like(lo)
    x, _, _, _ = philox4x32(lo, hi, zero, zero, seed & MASK32, (seed >> 32) & MASK32)
    return x


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (held in int64) to float32 in ``[0, 1)`` exactly as ``tl.rand`` does."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negatives
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in ``[0, 1)``: ``tl.rand(seed, counters)`` computed with torch ops."""
    return uint32_to_uniform(philox_uint32(seed, counters))


def gumbel_noise(seed: int, offset: int, batch: int, num_codes: int, device=None) -> torch.Tensor:
    """float32 Gumbel(0, 1) noise ``[batch, num_codes]``: ``-log(-log(u))`` with ``u`` from Philox.

    ``u`` is clamped to ``[2**-32, 1 - 2**-24]`` before the logs, so the noise is always finite; every
    backend applies the same clamp.
    """
    counters = offset + torch.arange(batch * num_codes, device=device, dtype=torch.int64)
    u = philox_uniform(seed, counters).view(batch, num_codes)
    return gumbel_from_uniform(u)


GUMBEL_U_MIN = 2.0**-32
GUMBEL_U_MAX = 1.0 - 2.0**-24


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log(clamp(u)))`` in float32 (the clamp keeps the noise finite at u = 0)."""
    u = u.to(torch.float32).clamp(GUMBEL_U_MIN, GUMBEL_U_MAX)
    return -torch.log(-torch.log(u))
