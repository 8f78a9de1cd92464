"""The DPO/IPO reference ``pi_ref``: scored live, through the policy with its LoRA adapters disabled, or
from a cache of log-probs computed once before training (``--precompute-ref-logps``).

Every scorer is a callable ``batch -> (chosen [B], rejected [B])`` of summed answer log-probs (fp32,
no ``z``: the reference is the unconditioned model), so the trainer and ``lpc.evaluate`` need not know
which kind they hold.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .data import PreferenceCollator, PreferenceDataset, batches, to_device
from .io import atomic_file
from .model import reference_logps

CACHE_FILE = "ref_logps.safetensors"
RefScorer = Callable[[dict], tuple[Tensor, Tensor]]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None`` / fp32 (the trainer's
    ``--dtype``: see ``lpc.train._autocast_dtype``)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LiveReference:
    """A frozen reference model scored on each batch (under ``autocast_dtype`` when given)."""

    def __init__(self, model: nn.Module, *, backend: str = "auto", autocast_dtype: Optional[torch.dtype] = None):
        self.model, self.backend, self.autocast_dtype = model, backend, autocast_dtype

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        device = batch["chosen_input_ids"].device
        with _autocast(device, self.autocast_dtype):
            return reference_logps(self.model, batch, backend=self.backend)


class AdapterDisabledReference(LiveReference):
    """The LoRA policy with its adapters switched off (= the base model): no second copy of the weights.

    The policy is put in eval mode for the call (no dropout, like a frozen copy) and restored after.
    """

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return super().__call__(batch)
        finally:
            self.model.train(was_training)


class CachedReference:
    """Log-probs looked up by ``batch["index"]`` (the pair's position in its dataset)."""

    def __init__(self, chosen: Tensor, rejected: Tensor):
        if chosen.shape != rejected.shape or chosen.ndim != 1:
            raise ValueError(f"cached chosen/rejected log-probs must be two [N] tensors, got "
                             f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
        self.chosen, self.rejected = chosen.float(), rejected.float()

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        idx = batch["index"].cpu()  # one copy to the host, then the bounds check there
        if bool((idx < 0).any()) or int(idx.max()) >= self.chosen.numel():
            raise IndexError(f"batch indices outside the cached reference log-probs (N={self.chosen.numel()})")
        dev = batch["chosen_input_ids"].device
        return self.chosen[idx].to(dev), self.rejected[idx].to(dev)


@torch.no_grad()
def compute_reference_logps(scorer: RefScorer, dataset: PreferenceDataset, collator: PreferenceCollator, *,
                            batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(chosen [N], rejected [N])`` reference log-probs of every pair of ``dataset``, in dataset order."""
    chosen, rejected = [], []
    for batch in batches(dataset, batch_size, collator):
        c, r = scorer(to_device(batch, device))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def save_cache(path: os.PathLike, tensors: dict[str, Tensor], fingerprint: str) -> Path:
    """Write the cache (``{split}.chosen`` / ``{split}.rejected`` tensors) by temp file + rename."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fingerprint})
    return Path(path)


def load_cache(path: os.PathLike, fingerprint: str) -> Optional[dict[str, Tensor]]:
    """The cached tensors if ``path`` exists and was written for ``fingerprint``, else ``None``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}
