"""Block-size configs of the fused LM head's kernels (``linear_token_logprobs*.py``).

GPU: the ``triton.autotune`` lists of every kernel (Hopper-oriented tiles, separate fp64 lists), the
``LPC_TRITON_AUTOTUNE=0`` ("quick") lists and the pruning by dtype family and shared memory. Interpreter:
the one config each kernel launches with, and the split / chunk sizes (tests monkeypatch them).
"""

from __future__ import annotations

import torch
import triton

from ._common import AUTOTUNE, prune_smem

# Interpreter configs: wide in V (few loop steps), the minimum 16 rows tl.dot allows.
INTERPRET_FWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64}
INTERPRET_BWD = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_H": 64, "BLOCK_HB": 32, "GROUP_N": 4}
INTERPRET_DLOGITS = {"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_H": 64, "GROUP_N": 4}
INTERPRET_MM_DW = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}  # grad_W = D.T @ h (M = V chunk)
INTERPRET_MM_DH = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}  # grad_h += D @ W (K = V chunk)
INTERPRET_SPLITS = 2  # > 1 so that the split/combine path runs in every interpreter test with V > BLOCK_V
INTERPRET_CHUNK_V = 512  # split backward: V = 1100 gives 3 chunks (the accumulate path) in the tests

D_CHUNK_ELEMS = 1 << 27  # split backward on the GPU: at most this many D entries per V chunk (256 MiB in bf16)


def _configs(tiles, blocks, **fixed):
    """A ``triton.Config`` per ``(*block sizes, num_warps, num_stages)`` tuple of ``tiles``: the block sizes
    under the names ``blocks``, then the ``fixed`` meta-parameters."""
    return [triton.Config({**dict(zip(blocks, t[:-2])), **fixed}, num_warps=t[-2], num_stages=t[-1]) for t in tiles]


# block-size names of the tile tuples: the logits recompute, the gradient products, the atomic backward
_RECOMPUTE = ("BLOCK_N", "BLOCK_V", "BLOCK_H")
_MM = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_BWD = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_HB")
# Hopper (H100/H200), bf16/fp16: 128x128 / 128x256 tiles with a 64-wide K step are the wgmma sweet spot.
# Lists pruned to what fits shared memory (``num_stages`` copies of both operand tiles), so fp32 inputs
# ("ieee" dots, 4-byte tiles) keep the smaller ones. (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages):
_RECOMPUTE_TILES = (
    (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (64, 256, 64, 4, 4), (128, 128, 64, 4, 5), (64, 128, 64, 4, 4), (128, 256, 32, 8, 5),
)
FWD_CONFIGS = _configs(_RECOMPUTE_TILES, _RECOMPUTE)
# the split backward's logits-gradient kernel: the forward's tile loop plus an elementwise epilogue and a store
DLOGITS_CONFIGS = _configs(_RECOMPUTE_TILES, _RECOMPUTE, GROUP_N=8)
# the split backward's gradient products: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
MM_CONFIGS = _configs((
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 5),
    (64, 128, 32, 4, 4),  # the one that fits shared memory with fp32 operands too
), _MM, GROUP_M=8)
# BLOCK_HB: the H step of the atomic kernel's scatter phase (D_tile @ W, D_tile.T @ h, atomics), a divisor
# of BLOCK_H. Narrower than the recompute's K step because each step holds an fp32 [BLOCK, BLOCK_HB] result
# and a block of 64-bit atomic addresses in registers, which spill with BLOCK_HB = 64 (sm_90 ptxas build).
BWD_CONFIGS = _configs((
    (128, 128, 64, 16, 8, 3), (128, 128, 64, 32, 8, 3), (64, 256, 64, 32, 8, 3), (128, 64, 64, 32, 4, 3),
    (64, 128, 64, 32, 4, 3), (128, 256, 64, 16, 8, 3), (64, 64, 64, 32, 4, 4), (128, 128, 64, 32, 8, 4),
), _BWD, GROUP_N=8)
# fp64: 8-byte tiles; the lists above exceed shared memory (and registers) in fp64
_F64_TILES = ((32, 64, 32, 4, 2), (64, 64, 32, 4, 2), (32, 32, 32, 4, 2))
FWD_CONFIGS_F64 = _configs(_F64_TILES, _RECOMPUTE)
DLOGITS_CONFIGS_F64 = _configs(_F64_TILES, _RECOMPUTE, GROUP_N=8)
MM_CONFIGS_F64 = _configs(_F64_TILES, _MM, GROUP_M=8)
BWD_CONFIGS_F64 = _configs(((32, 64, 32, 32, 4, 2), (32, 32, 32, 32, 4, 2)), _BWD, GROUP_N=8)  # BLOCK_HB = BLOCK_H

# LPC_TRITON_AUTOTUNE=0: the configs kept (prune_by_dtype then runs the first of the input's dtype family
# that fits shared memory)
FWD_QUICK = [FWD_CONFIGS[0], FWD_CONFIGS[6], FWD_CONFIGS_F64[0]]
DLOGITS_QUICK = [DLOGITS_CONFIGS[0], DLOGITS_CONFIGS[6], DLOGITS_CONFIGS_F64[0]]
MM_QUICK = [MM_CONFIGS[0], MM_CONFIGS[-1], MM_CONFIGS_F64[0]]
BWD_QUICK = [BWD_CONFIGS[0], BWD_CONFIGS_F64[0]]

# the largest BLOCK_V of the GPU configs: forward splits and backward chunks start on multiples of it
MAX_BLOCK_V = max(c.kwargs["BLOCK_V"] for c in FWD_CONFIGS + DLOGITS_CONFIGS + BWD_CONFIGS)


def recompute_smem(c, elem):
    """Shared memory of the pipelined ``h`` and ``W.T`` tiles of the logits recompute."""
    k = c.kwargs
    return c.num_stages * (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_H"] * elem


def mm_smem(c, elem):
    """Shared memory of the pipelined operand tiles of a gradient product."""
    k = c.kwargs
    return c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem


def prune_by_dtype(f64_configs, smem_bytes, ptr="h_ptr"):
    """``early_config_prune``: the fp64 list for fp64 inputs, the others otherwise; then what fits shared
    memory for the operands' element size (never empty); with ``LPC_TRITON_AUTOTUNE=0`` only the first of
    those (the ``*_QUICK`` lists hold one config per dtype family that fits, after the preferred one)."""
    f64 = set(f64_configs)
    fits = prune_smem(smem_bytes)

    def prune(configs, nargs, **kwargs):
        t = nargs[ptr]
        is_f64 = t.dtype == torch.float64
        family = [c for c in configs if (c in f64) == is_f64] or list(configs)
        kept = fits(family, nargs, t.element_size())
        return kept if AUTOTUNE else kept[:1]

    return {"early_config_prune": prune}
