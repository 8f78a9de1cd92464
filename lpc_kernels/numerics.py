"""What every backend computes in: the accepted dtypes, the compute dtype, and row chunking. Shared by the op
contracts (``lpc_kernels.ops``) and every backend; the numerics contract: ``docs/design.md``, "Numerics".
"""

from __future__ import annotations

from typing import Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
DEFAULT_CHUNK_SIZE = 1024  # rows per [chunk, V] logits block of the chunked backends: 128 MiB of fp32 at V = 32k


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype every backend computes and returns in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of at most ``chunk_size`` out of ``n`` rows."""
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)
