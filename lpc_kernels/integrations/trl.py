"""TRL's fused LM head on ``lk.linear_token_logprobs``.

TRL's trainers (``DPOTrainer``, ``GRPOTrainer``, ``KTOTrainer``, ...) patch their models with
``trl.trainer.utils.add_fused_lm_head`` and score completions as ``model(..., labels=..., fused_lm_head=True)``,
which runs ``trl.kernels.ChunkedLogProbFunction`` on the backbone's hidden states. ``patch_fused_lm_head()``
swaps that function, process-wide, for one whose log-probs (and their gradients) come from
``lk.linear_token_logprobs``::

    from lpc_kernels.integrations.trl import patch_fused_lm_head

    patch = patch_fused_lm_head()   # before trainer.train(); patch.undo() (or `with patch_fused_lm_head():`)

The optional per-token fields TRL asks for (``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``: its
logging and WPO weights) are computed in one more chunked pass without gradient; a loss that differentiates
``entropy`` gets a clear error. Calls with a temperature, logit scale or soft-capping other than the identity go
to TRL's own function (with a warning, once). Tested with TRL ``TESTED_TRL``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch
from torch import Tensor

import lpc_kernels as lk

from ..backends import BACKENDS
from ..head_gemm import HeadGemms
from ..numerics import DEFAULT_CHUNK_SIZE, chunks

TESTED_TRL = "1.16"
FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's optional outputs, in its order


def _trl_utils():
    try:
        return importlib.import_module("trl.trainer.utils")
    except ImportError as exc:
        raise ImportError(f"patch_fused_lm_head needs TRL {TESTED_TRL} (pip install 'lpc-kernels[trl]'): "
                          f"{exc}") from None


@torch.no_grad()
def row_statistics(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, fields,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """TRL's optional per-token fields of ``softmax(hidden @ weight.T + bias)`` ``[N]`` (float32; ``is_top1`` bool:
    the target is the first maximum), chunk by chunk, no gradient."""
    gemm = HeadGemms(weight, bias)
    n = hidden.shape[0]
    out = {f: torch.empty(n, dtype=torch.bool if f == "is_top1" else torch.float32, device=hidden.device)
           for f in fields}
    for s, e in chunks(n, chunk_size):
        x = gemm.logits(gemm.operand(hidden[s:e])).float()
        lse = torch.logsumexp(x, -1)
        if "entropy" in out:
            out["entropy"][s:e] = lse - (torch.softmax(x, -1) * x).sum(-1)
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * x, -1) - 2 * lse
        if "mean_logits" in out:
            out["mean_logits"][s:e] = x.mean(-1)
        if "is_top1" in out:
            out["is_top1"][s:e] = x.argmax(-1) == targets[s:e]
    return out


class _ValueOnly(torch.autograd.Function):
    """Attaches a value computed without gradient to ``anchor``'s graph, so that a loss using it fails loudly."""

    @staticmethod
    def forward(ctx, value, anchor, name):
        ctx.name = name
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"the {ctx.name} of lpc_kernels' patched TRL fused LM head has no gradient; undo "
                           "patch_fused_lm_head() for a trainer that differentiates it")


class LinearTokenLogprobsFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` arguments and outputs)."""

    def __init__(self, original, backend: str = "auto"):
        self.original, self.backend, self.warned = original, backend, False

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=FIELDS):
        if temperature != 1.0 or logit_scale != 1.0 or final_logit_softcapping is not None:
            if not self.warned:
                warnings.warn(f"lpc_kernels' TRL fused LM head: temperature={temperature}, logit_scale={logit_scale}, "
                              f"final_logit_softcapping={final_logit_softcapping} transform the logits, which "
                              "linear_token_logprobs does not: these calls run TRL's own function", stacklevel=2)
                self.warned = True
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        dev = hidden.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        h, w = hidden.to(dt), weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        logp = lk.linear_token_logprobs(h, w, targets, bias=b, backend=self.backend)
        fields = [f for f in FIELDS if f in outputs]
        stats = row_statistics(h.detach(), w.detach(), b.detach() if b is not None else None, targets, fields)
        if "entropy" in stats and torch.is_grad_enabled() and hidden.requires_grad:
            stats["entropy"] = _ValueOnly.apply(stats["entropy"], hidden, "entropy")
        return (logp,) + tuple(stats.get(f) for f in FIELDS)


class FusedLMHeadPatch:
    """The handle ``patch_fused_lm_head`` returns: ``undo()`` restores TRL's function; a context manager too."""

    def __init__(self, utils, original):
        self.utils, self.original = utils, original

    def undo(self) -> None:
        self.utils._ChunkedLogProbFunction = self.original

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def patch_fused_lm_head(backend: str = "auto") -> FusedLMHeadPatch:
    """Make TRL's fused LM head (every model patched by ``add_fused_lm_head``, before or after this call) compute
    its log-probs with ``lk.linear_token_logprobs(backend=backend)``. Raises ``ImportError`` naming the extra when
    TRL is not installed; warns when its version is not the tested one."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    utils = _trl_utils()
    version = importlib.import_module("trl").__version__
    if not version.startswith(TESTED_TRL + "."):
        warnings.warn(f"patch_fused_lm_head is tested with TRL {TESTED_TRL}.x, this is TRL {version}", stacklevel=2)
    current = utils._ChunkedLogProbFunction
    original = current.original if isinstance(current, LinearTokenLogprobsFunction) else current
    utils._ChunkedLogProbFunction = LinearTokenLogprobsFunction(original, backend)
    return FusedLMHeadPatch(utils, current)
