"""The DPO/IPO reference ``pi_ref``: scored live (a frozen model, the policy with its LoRA adapters disabled,
or an FSDP2-sharded frozen model), or from a cache of log-probs computed once before training
(``--precompute-ref-logps``). ``build_reference_scorers`` picks the kind a run's config asks for.

Every scorer is a callable ``batch -> (chosen [B], rejected [B])`` of summed answer log-probs (fp32,
no ``z``: the reference is the unconditioned model), so the trainer and ``lpc.evaluate`` need not know
which kind they hold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lpc_kernels.numerics import compute_dtype

from . import distributed as dist_lib
from .builders import load_reference_model, reference_fingerprint
from .config import ConfigError, TrainConfig
from .data import IndexView, PreferenceCollator, PreferenceDataset, batches, to_device
from .io import atomic_file
from .hf import check_batch_layout, shard_units
from .model import LPCModel
from .objective import make_reference, reference_logps
from .runtime import autocast

CACHE_FILE = "ref_logps.safetensors"
RefScorer = Callable[[dict], tuple[Tensor, Tensor]]


class LiveReference:
    """A frozen reference model scored on each batch (under ``autocast_dtype`` when given)."""

    def __init__(self, model: nn.Module, *, backend: str = "auto", autocast_dtype: Optional[torch.dtype] = None):
        self.model, self.backend, self.autocast_dtype = model, backend, autocast_dtype

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        device = batch["input_ids"].device
        with autocast(device, self.autocast_dtype):
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
        self.chosen, self.rejected = chosen.to(compute_dtype(chosen)), rejected.to(compute_dtype(rejected))

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        idx = batch["index"].cpu()  # one copy to the host, then the bounds check there
        if bool((idx < 0).any()) or int(idx.max()) >= self.chosen.numel():
            raise IndexError(f"batch indices outside the cached reference log-probs (N={self.chosen.numel()})")
        dev = batch["input_ids"].device
        return self.chosen[idx].to(dev), self.rejected[idx].to(dev)


class ReferenceScorer(nn.Module):
    """A frozen reference model as a module whose ``forward(batch)`` returns ``(chosen [B], rejected [B])``
    summed answer log-probs: the unit FSDP2 shards, so that its forward hook gathers the LM head weight
    that ``lpc.objective.reference_logps`` reads directly."""

    def __init__(self, ref_model: nn.Module, backend: str = "auto"):
        super().__init__()
        self.ref = ref_model
        self.backend = backend

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards before this root (``lpc.distributed.fsdp2_shard``)."""
        return shard_units(self.ref)

    def forward(self, batch: dict) -> tuple[Tensor, Tensor]:
        return reference_logps(self.ref, batch, backend=self.backend)


class ShardedReference:
    """The ``batch -> (chosen, rejected)`` scorer of an FSDP2-sharded reference (``wrap_reference``): no
    gradients, under ``autocast_dtype`` like ``LiveReference``. Every rank must call it the same number of
    times (each call all-gathers the reference's shards)."""

    def __init__(self, scorer: ReferenceScorer, autocast_dtype: Optional[torch.dtype] = None):
        self.scorer, self.autocast_dtype = scorer, autocast_dtype

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        with autocast(batch["input_ids"].device, self.autocast_dtype):
            return self.scorer(batch)


def wrap_reference(ref_model: nn.Module, ctx: dist_lib.DistContext, *, backend: str = "auto",
                   autocast_dtype: Optional[torch.dtype] = None) -> ShardedReference:
    """An FSDP2-sharded scorer of the frozen ``ref_model`` (on ``ctx.device``), for ``--strategy fsdp2``.
    Under DDP the reference is simply replicated: use ``LiveReference``."""
    if ctx.strategy != "fsdp2":
        raise ValueError(f"wrap_reference shards for fsdp2; under {ctx.strategy!r} replicate the reference")
    ref_model.eval().requires_grad_(False)
    scorer = ReferenceScorer(ref_model, backend)
    # the reference's weights are stored in their compute dtype already (bf16 with --dtype bfloat16)
    dist_lib.fsdp2_shard(scorer, ctx, mixed_precision=None)
    return ShardedReference(scorer, autocast_dtype)


@torch.no_grad()
def compute_reference_logps(scorer: RefScorer, dataset: PreferenceDataset, collator: PreferenceCollator, *,
                            batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(chosen [N], rejected [N])`` reference log-probs of every pair of ``dataset``, in dataset order."""
    chosen, rejected = [], []
    for batch in batches(dataset, batch_size, collator):
        c, r = scorer(to_device(batch, device))
        chosen.append(c.to(compute_dtype(c)).cpu())  # float32, or float64 in a float64 run
        rejected.append(r.to(compute_dtype(r)).cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def save_cache(path: os.PathLike, tensors: dict[str, Tensor], fingerprint: str) -> Path:
    """Write the cache (``{split}.chosen`` / ``{split}.rejected`` tensors) by temp file + rename."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fingerprint})
    return Path(path)


def load_cache(path: os.PathLike, fingerprint: str) -> Optional[dict[str, Tensor]]:
    """The cached tensors if ``path`` exists and was written for ``fingerprint``, else ``None``."""
    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}


def build_reference_scorers(cfg: TrainConfig, policy, model: LPCModel, train_set: PreferenceDataset,
                            eval_set: PreferenceDataset, collator: PreferenceCollator, device: torch.device,
                            autocast_dtype: Optional[torch.dtype], out_dir: Path, notes: list,
                            ctx: Optional[dist_lib.DistContext] = None) -> tuple[Optional[RefScorer], Optional[RefScorer]]:
    """``(train_ref, eval_ref)`` scorers for DPO/IPO (``(None, None)`` for SimPO).

    ``policy``: the initial policy to copy (full fine-tuning), ``None`` with LoRA (the reference is then the
    policy in ``model`` with its adapters disabled). Data-parallel (``ctx``): the live reference is replicated
    (DDP) or sharded like the policy (FSDP2); ``--precompute-ref-logps`` scores each rank's share of the pairs
    and gathers them, rank 0 writes the cache. What happened goes to ``notes``.
    """
    ctx = ctx or dist_lib.DistContext()
    if cfg.loss == "simpo":
        return None, None
    if cfg.ref_model is not None:
        ref_model = load_reference_model(cfg).to(device)
        try:
            check_batch_layout(ref_model, collator.layout)
        except ValueError as exc:
            raise ConfigError("batch_layout", f"--ref-model {cfg.ref_model}: {exc}") from None
        live = LiveReference(ref_model, backend=cfg.backend, autocast_dtype=autocast_dtype)
    elif cfg.lora_r > 0:
        ref_model = None
        live = AdapterDisabledReference(model.policy, backend=cfg.backend, autocast_dtype=autocast_dtype)
    else:
        ref_model = make_reference(policy)
        if autocast_dtype is not None:  # frozen: no fp32 master copy needed
            ref_model.to(autocast_dtype)
        live = LiveReference(ref_model, backend=cfg.backend, autocast_dtype=autocast_dtype)
    if not cfg.precompute_ref_logps:
        if ctx.strategy == "fsdp2" and ref_model is not None:  # (fsdp2 with LoRA is refused by TrainConfig)
            live = wrap_reference(ref_model, ctx, backend=cfg.backend, autocast_dtype=autocast_dtype)
        return live, live
    fp = reference_fingerprint(cfg, train_set, eval_set)
    cache_path = out_dir / CACHE_FILE
    cached = load_cache(cache_path, fp)
    # rank 0 decides, so that every rank takes the same branch (computing has collectives)
    hit = dist_lib.broadcast_object(cached is not None, ctx)
    if hit and cached is None:
        raise FileNotFoundError(f"rank {ctx.rank} cannot read {cache_path}, which rank 0 read: the run directory "
                                "must be on a filesystem every rank sees")
    if not hit:
        cached = None
    if cached is None:
        t0 = time.perf_counter()
        tensors = {}
        for split, ds in (("train", train_set), ("eval", eval_set)):
            # each rank scores its contiguous share (the unsharded reference: no collective per batch), then
            # the shares are gathered in rank order = dataset order
            share = IndexView(ds, dist_lib.split_evenly(len(ds), ctx.rank, ctx.world_size))
            c, r = compute_reference_logps(live, share, collator, batch_size=cfg.eval_batch_size, device=device)
            tensors[f"{split}.chosen"], tensors[f"{split}.rejected"] = (dist_lib.gather_rows(c, ctx),
                                                                        dist_lib.gather_rows(r, ctx))
        if ctx.is_main:
            save_cache(cache_path, tensors, fp)
        dist_lib.barrier(ctx)
        notes.append(f"reference log-probs of {len(train_set) + len(eval_set)} pairs cached in {cache_path} "
                     f"({time.perf_counter() - t0:.1f}s)")
        cached = tensors
    else:
        notes.append(f"reference log-probs read from {cache_path}")
    del ref_model, live  # training holds one model from here on
    return (CachedReference(cached["train.chosen"], cached["train.rejected"]),
            CachedReference(cached["eval.chosen"], cached["eval.rejected"]))


def cached_eval_reference(cfg: TrainConfig, run_dir: Path, train_set: PreferenceDataset,
                          eval_set: PreferenceDataset) -> Optional[CachedReference]:
    """The held-out reference log-probs a finished run cached (``--precompute-ref-logps``), or ``None``."""
    cached = load_cache(Path(run_dir) / CACHE_FILE, reference_fingerprint(cfg, train_set, eval_set))
    return None if cached is None else CachedReference(cached["eval.chosen"], cached["eval.rejected"])
