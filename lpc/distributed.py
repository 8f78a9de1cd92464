"""Data-parallel training under ``torchrun`` (``--strategy ddp|fsdp2``) on PyTorch's own engine: process groups, DDP
or FSDP2 (``fully_shard``) wrapping, each rank's slice of the global batch, the gathers that make the metrics the
1-process run's, and full state dicts so that checkpoints resume at any world size. The strategies and their
trade-offs: ``docs/distributed.md``, "Training with torchrun"."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from .config import STRATEGIES, ConfigError
from .runtime import resolve_device

# torchrun sets these for every worker (torch.distributed.elastic)
_ENV_RANK, _ENV_WORLD, _ENV_LOCAL = "RANK", "WORLD_SIZE", "LOCAL_RANK"


# ---------------------------------------------------------------------------------------- context
@dataclass
class DistContext:
    """Where this process stands in the job.

    Attributes:
        strategy: ``"none"`` (one process, no process group), ``"ddp"`` or ``"fsdp2"``.
        rank / world_size / local_rank: from torchrun's environment (0 / 1 / 0 without torchrun).
        device: this rank's device (``cuda:LOCAL_RANK`` on GPU).
        backend: ``"nccl"`` or ``"gloo"``; ``None`` when there is no process group.
    """

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    _store_dir: Optional[str] = None  # FileStore directory of a 1-process group started without torchrun

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (``--strategy ddp|fsdp2``, any world size)."""
        return self.backend is not None and dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """``RANK`` and ``WORLD_SIZE`` are set: this process is a worker of torchrun (or a similar launcher)."""
    return _ENV_RANK in os.environ and _ENV_WORLD in os.environ


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError("strategy", f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(strategy: str = "none", device: str = "auto", *,
                     timeout: Optional[timedelta] = None) -> DistContext:
    """Start the process group for ``strategy`` and pick this rank's device.

    ``"none"``: no process group; refused when torchrun started more than one process (each would train
    its own copy of the model and write the same files). ``"ddp"`` / ``"fsdp2"``: NCCL for a CUDA device,
    gloo otherwise, rendezvous through torchrun's environment; started by hand (no ``RANK`` /
    ``WORLD_SIZE``), a 1-process group over a FileStore in a temp directory (no port needed).

    Raises:
        ConfigError: an unknown strategy, ``--strategy none`` with ``WORLD_SIZE > 1``, a device that does
            not fit the job (see ``resolve_device``).
    """
    if strategy not in STRATEGIES:
        raise ConfigError("strategy", f"must be one of {list(STRATEGIES)}, got {strategy!r}")
    world = _env_int(_ENV_WORLD, 1)
    rank = _env_int(_ENV_RANK, 0)
    local_rank = _env_int(_ENV_LOCAL, 0)
    if strategy == "none":
        if world > 1:
            raise ConfigError("strategy", f"torchrun started {world} processes but --strategy is none: each would "
                                          "train its own copy of the model; pass --strategy ddp or fsdp2")
        return DistContext(device=resolve_device(device))  # no job: "cuda" stays the current device
    if not dist.is_available():
        raise ConfigError("strategy", f"--strategy {strategy} needs torch.distributed, which this torch build lacks")
    dev = resolve_device(device, local_rank, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before any collective: NCCL binds each rank's communicator to its GPU
    ctx = DistContext(strategy=strategy, rank=rank, world_size=world, local_rank=local_rank, device=dev,
                      backend=backend)
    if dist.is_initialized():  # a caller (test, notebook) set the group up already: use it as it is
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        ctx.backend = dist.get_backend()
        return ctx
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # eager NCCL init on the right GPU
    if launched_by_torchrun():
        dist.init_process_group(backend, **kwargs)
    else:
        ctx._store_dir = tempfile.mkdtemp(prefix="lpc-dist-")
        dist.init_process_group(backend, init_method=f"file://{os.path.join(ctx._store_dir, 'store')}", rank=0,
                                world_size=1, **kwargs)
    return ctx


def destroy_distributed(ctx: DistContext, *, error: bool = False) -> None:
    """Tear the process group down. After an error the other ranks may sit in a collective this rank will
    never join: NCCL's orderly destroy could then block, so the group is aborted instead (gloo's destroy is
    local and never waits)."""
    if ctx.backend is None or not dist.is_initialized():
        return
    # free what still holds the group (FSDP2 states, DDP reducers: reference cycles) while it exists,
    # rather than during interpreter shutdown, where native destructors run in an arbitrary order
    gc.collect()
    try:
        if error and ctx.backend == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as exc:  # tearing down must not hide the error that brought us here
        print(f"[rank {ctx.rank}] destroying the process group failed: {exc}", file=sys.stderr, flush=True)
    finally:
        if ctx._store_dir is not None:
            shutil.rmtree(ctx._store_dir, ignore_errors=True)


@contextlib.contextmanager
def process_group(strategy: str = "none", device: str = "auto", *,
                  timeout: Optional[timedelta] = None) -> Iterator[DistContext]:
    """``with process_group(strategy, device) as ctx:`` run the job; the group is destroyed on the way out.

    An exception inside names the failing rank on stderr, aborts the group (so this rank does not wait for
    the others) and propagates: the process then exits non-zero with its traceback, and torchrun stops
    the other ranks. A ``SystemExit`` with status 0 is a normal exit.
    """
    ctx = init_distributed(strategy, device, timeout=timeout)
    try:
        yield ctx
    except BaseException as exc:
        failed = not (isinstance(exc, SystemExit) and exc.code in (0, None))
        if failed and ctx.world_size > 1:
            print(f"lpc.train: rank {ctx.rank} of {ctx.world_size} failed with {type(exc).__name__}: {exc} "
                  "(traceback below); stopping the job", file=sys.stderr, flush=True)
        destroy_distributed(ctx, error=failed)
        raise
    destroy_distributed(ctx)


# ----------------------------------------------------------------------------------- rank-0 helpers
def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op without a process group)."""
    if not ctx.distributed or ctx.world_size == 1:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (e.g. the tokenizer trained and cached on
    first use: rank 0 writes the cache, the others then read it instead of racing to write it)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (a picklable Python object created in this job, e.g. the
    run directory name, which embeds a timestamp that could differ between ranks)."""
    if not ctx.distributed or ctx.world_size == 1:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


# ------------------------------------------------------------------------------------ batch slicing
def rank_slice(n: int, rank: int, world_size: int, *, what: str = "batch_size") -> slice:
    """The contiguous slice of ``n`` global items that ``rank`` takes.

    Raises:
        ConfigError: ``n`` is not a multiple of ``world_size`` (``what`` names the setting), since unequal
            slices would weight the ranks' gradients unequally and break the match with one process.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if n % world_size:
        raise ConfigError(what, f"{n} is not divisible by the {world_size} processes: every rank takes an equal "
                                f"slice of the global batch (use a multiple of {world_size})")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


def split_evenly(n: int, rank: int, world_size: int) -> range:
    """Contiguous near-equal shares of ``n`` items (sizes differ by at most one; the first ``n % world``
    ranks get one more): held-out pairs need not be divisible by the world size."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


# --------------------------------------------------------------------------------------- reductions
def gather_rows(t: Optional[Tensor], ctx: DistContext) -> Optional[Tensor]:
    """Concatenate every rank's ``t`` along dim 0, in rank order (the global batch order when each rank
    holds its ``rank_slice``). Sizes may differ between ranks; other dims and the dtype must agree."""
    if t is None or not ctx.distributed or ctx.world_size == 1:
        return t
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    x = t.detach().to(dev).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=dev))
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    if x.shape[0] < top:  # all_gather needs equal shapes: pad, then cut each rank's rows back out
        x = torch.cat([x, x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def all_reduce_scalar(value: float, ctx: DistContext, op: str = "mean") -> float:
    """``sum``, ``mean`` (unweighted, over ranks), ``max`` or ``min`` of one float over all ranks."""
    if not ctx.distributed or ctx.world_size == 1:
        return float(value)
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}
    if op not in red:
        raise ValueError(f"op must be one of {list(red)}, got {op!r}")
    dist.all_reduce(t, op=red[op])
    out = float(t)
    return out / ctx.world_size if op == "mean" else out


def weighted_mean(value: float, weight: float, ctx: DistContext) -> float:
    """``sum_r value_r * weight_r / sum_r weight_r``: the global mean of a per-example quantity whose
    rank-local mean is ``value`` over ``weight`` examples (a rank with no examples contributes nothing)."""
    if not ctx.distributed or ctx.world_size == 1:
        return float(value)
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    v = float(value) * float(weight) if weight else 0.0
    t = torch.tensor([v, float(weight)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if float(t[1]) > 0 else float("nan")


def gather_fields(obj: Any, ctx: DistContext) -> Any:
    """A copy of a dataclass or ``SimpleNamespace`` of per-example results with every field combined over
    ranks: tensors with a batch dimension are concatenated in rank order (``gather_rows``), 0-dim tensors
    averaged over ranks (batch means of equal-size slices), ints summed (counts), ``None`` kept.

    Every rank must hold the same fields (the same ones ``None``), as each runs the same code."""
    if not ctx.distributed or ctx.world_size == 1:
        return obj
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
    else:
        names = list(vars(obj))
    values = {}
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, Tensor) and v.ndim > 0:
            v = gather_rows(v, ctx)
        elif isinstance(v, Tensor):
            v = torch.tensor(all_reduce_scalar(float(v), ctx, "mean"), dtype=v.dtype, device=v.device)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            v = int(all_reduce_scalar(v, ctx, "sum"))
        values[name] = v
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **values)
    return type(obj)(**values)


# ---------------------------------------------------------------------------------------- wrapping
@torch.no_grad()
def broadcast_module_(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place).

    FSDP2 keeps each rank's own slice of its local full tensors (unlike DDP, it broadcasts nothing), so
    a model initialised differently on some rank (a seed, an unseeded init) would be silently mixed.
    """
    if not ctx.distributed or ctx.world_size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu" and ctx.backend == "nccl":
            buf = t.detach().to(ctx.device)
            dist.broadcast(buf, src)
            t.copy_(buf.cpu())
        else:
            dist.broadcast(t.detach(), src)


def _fsdp_mp_policies(mixed_precision: Optional[torch.dtype]):
    if mixed_precision is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    body = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    # the root (LM head, codebook, heads): fp32 parameters, like a 1-process --dtype bfloat16 run
    return body, MixedPrecisionPolicy(reduce_dtype=torch.float32)


def fsdp2_shard(root: nn.Module, ctx: DistContext, *, mixed_precision: Optional[torch.dtype] = None) -> nn.Module:
    """``fully_shard`` each of ``root.fsdp_units()`` (for an ``LPCModel``: every decoder layer of its policy, then
    the transformer body: ``lpc.hf.shard_units``), then ``root`` itself (everything left: the LM head and, for
    an ``LPCModel``, the codebook and heads). ``root`` must be the module whose ``forward`` the trainer calls:
    FSDP2 gathers a unit's parameters in that unit's forward hook, and the LM head weight is read directly, not
    through ``lm_head.forward``. Sharded in place; returns ``root``."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    body_mp, root_mp = _fsdp_mp_policies(mixed_precision)
    broadcast_module_(root, ctx)
    for unit in root.fsdp_units():
        fully_shard(unit, mesh=mesh, mp_policy=body_mp)
    fully_shard(root, mesh=mesh, mp_policy=root_mp)
    return root


def wrap_model(model: nn.Module, ctx: DistContext, *, mixed_precision: Optional[torch.dtype] = None,
               find_unused_parameters: bool = False) -> nn.Module:
    """The module to call for training forward passes of ``model`` (an ``LPCModel``, already on
    ``ctx.device``), by strategy:

    * ``none``: ``model`` itself.
    * ``ddp``: a ``DistributedDataParallel`` wrapper; ``model`` stays the plain module (evaluation,
      saving, ``gumbel_offsets`` use it). Buffers are not broadcast per step (rotary tables are computed,
      never trained). ``find_unused_parameters`` is needed when a parameter can get no gradient in a step
      (the prior head with ``kl_weight = 0`` while the prior mix is 0); DDP then leaves such gradients
      ``None`` on every rank, as one process does, so AdamW skips them the same way.
    * ``fsdp2``: ``model`` sharded in place (``fsdp2_shard``) and returned; build the optimizer AFTER
      this call (the parameters become sharded ``DTensor``\\ s).
    """
    if ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # no buffer broadcast before every forward: the model's buffers (rotary tables) are computed, never
        # trained, hence equal on every rank; the flag was renamed in recent torch (the old name warns)
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters, **no_sync)
    if ctx.strategy == "fsdp2":
        # LPCModel returns views (the chosen / rejected halves of one [2B] pass); FSDP2 warns that an in-place
        # op on such a view would skip its backward hook. The trainer never modifies outputs in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return fsdp2_shard(model, ctx, mixed_precision=mixed_precision)
    raise ConfigError("strategy", f"must be one of {list(STRATEGIES)}, got {ctx.strategy!r}")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place: the module is its own)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over replicated or FSDP2-sharded gradients; returns the global
    pre-clip norm as a float (``inf`` / 0 ``max_norm`` disables clipping but still measures)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm and max_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):  # a DTensor over sharded gradients: the reduced, global norm
        norm = norm.full_tensor()
    return float(norm)


def set_gradient_sync(module: nn.Module, enabled: bool):
    """A context for one micro-batch's backward: with ``enabled=False`` DDP skips its all-reduce
    (gradients accumulate locally until the last micro-batch). FSDP2 reduce-scatters every micro-batch
    regardless: keeping unsharded gradients between micro-batches would cost the full model's gradient
    memory, which is what FSDP2 is used to avoid."""
    if not enabled and type(module).__name__ == "DistributedDataParallel":
        return module.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ state dicts
def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def full_state_dict(module: nn.Module, ctx: DistContext) -> dict[str, Tensor]:
    """The full (unsharded) state dict of ``module`` (DDP-wrapped, FSDP2-sharded or plain) as CPU tensors
    on rank 0, ``{}`` on the other ranks. Keys are the plain module's (FSDP2 keeps them, DDP's
    ``module.`` prefix is dropped). Collective under FSDP2: every rank must call it."""
    module = unwrap(module)
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if _is_dtensor(value):
            value = value.full_tensor()  # all-gather, one tensor at a time
        if ctx.is_main:
            out[key] = value.detach().cpu().clone() if isinstance(value, Tensor) else value
    return out


def flat_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to its full shape: the layout a
    1-process run's optimizer has (state keyed by parameter position in the param groups), on rank 0
    (CPU tensors); ``{}`` on the other ranks. Collective under FSDP2."""
    sd = optimizer.state_dict()
    state: dict = {}
    for pid, st in sd["state"].items():
        row = {}
        for name, value in st.items():
            if _is_dtensor(value):
                value = value.full_tensor()
            if isinstance(value, Tensor):
                value = value.detach().cpu().clone()
            row[name] = value
        state[pid] = row
    return {"state": state, "param_groups": sd["param_groups"]} if ctx.is_main else {}


def _shard_like(full: Tensor, param: Tensor) -> Tensor:
    """``full`` cut to ``param``'s sharding (a DTensor with the same placements), or moved to its device."""
    if _is_dtensor(param):
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"a saved tensor of shape {tuple(full.shape)} cannot fill a parameter of shape "
                             f"{tuple(param.shape)}")
        # every rank holds the full tensor already (read from the checkpoint): take the local chunk, no
        # communication (src_data_rank=None)
        return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full.to(param.device)


def _clone_dtensor(t: Tensor) -> Tensor:
    """A DTensor with the same placements over a copy of ``t``'s local shard."""
    return DTensor.from_local(t.to_local().clone(), t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())


def shard_state_dict(full: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """A full state dict (``full_state_dict``, a checkpoint's tensors) laid out for ``module``'s
    parameters (FSDP2 ``DTensor`` shards where it is sharded), for ``module.load_state_dict``."""
    current = unwrap(module).state_dict()
    out = {}
    for key, value in full.items():
        out[key] = _shard_like(value, current[key]) if key in current else value
    return out


def shard_optimizer_state_dict(full: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A 1-process-layout optimizer state dict (``full_optimizer_state_dict`` or a checkpoint's) with each
    parameter-shaped state tensor (Adam's ``exp_avg``, ``exp_avg_sq``) cut to that parameter's sharding,
    for ``optimizer.load_state_dict`` on an optimizer over FSDP2-sharded parameters. The parameter order
    must be the one the state was saved with (the trainer builds its param groups the same way at any
    world size)."""
    params = flat_params(optimizer)
    state = {}
    for pid, st in full["state"].items():
        idx = int(pid)
        if idx >= len(params):
            raise ValueError(f"optimizer state has parameter #{idx}, this optimizer has {len(params)} parameters")
        p = params[idx]
        row = {}
        for name, v in st.items():
            if isinstance(v, Tensor):
                if v.ndim > 0 and tuple(v.shape) == tuple(p.shape):
                    v = _shard_like(v, p)
                # fresh memory: a local chunk can be a view of the input (e.g. a live optimizer's state), and
                # the optimizer updates its state in place
                v = _clone_dtensor(v) if _is_dtensor(v) else v.clone()
            row[name] = v
        state[pid] = row
    return {"state": state, "param_groups": full["param_groups"]}


def gather_objects(obj: Any, ctx: DistContext) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    if not ctx.distributed or ctx.world_size == 1:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
