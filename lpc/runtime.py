"""Where and how this process computes: its device, autocast, CPU threads, and quiet library output.

The one place for these, imported by every command (``train``, ``evaluate``, ``generate``, ``experiments``)
and by ``lpc.distributed``, which takes each rank's device from ``resolve_device``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

import torch
from transformers.utils import logging as hf_logging

from .config import ConfigError, TrainConfig


def resolve_device(name: str, local_rank: Optional[int] = None, world_size: int = 1) -> torch.device:
    """The device ``--device name`` means for this process.

    ``auto``: ``cuda`` when CUDA is available, else ``cpu``. In a data-parallel job (``local_rank`` given),
    ``auto`` / ``cuda`` mean ``cuda:LOCAL_RANK``, and an explicit ``cuda:N`` is accepted for one process only
    (each rank needs its own GPU); without a job ``cuda`` stays the current CUDA device.

    Raises:
        ConfigError: not a torch device, CUDA asked for but not available, a device that does not fit the job.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"{name!r} is not a torch device") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but torch sees no CUDA device")
    if local_rank is None or dev.index is not None:
        if dev.index is not None and world_size > 1:
            raise ConfigError("device", f"{name!r} names one GPU but {world_size} processes run: pass --device "
                                        "cuda (or auto) and each rank takes cuda:LOCAL_RANK")
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError("device", f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: start at "
                                    f"most {count} processes per node (--nproc-per-node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """``--deterministic``: bitwise reproducible runs on one device, restored on exit. PyTorch's deterministic
    algorithms (the trainer's gathers and scatters, ``index_add`` and the backward of ``hidden[index]``, then take
    their sort-based CUDA paths instead of atomics; an op without one raises), cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, before CUDA starts), no cuDNN autotuning, and the Triton LM head's ``split``
    backward (no atomics; ``LPC_TRITON_LINEAR_BWD``). The CPU and CUDA backends have no atomics in their sums."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "LPC_TRITON_LINEAR_BWD")}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["LPC_TRITON_LINEAR_BWD"] = "split"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def autocast_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """The forward passes' autocast dtype for ``--dtype`` (``None``: fp32, no autocast)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None`` / fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def default_threads(cfg: TrainConfig) -> int:
    """Intra-op threads when ``--threads`` is not given.

    The built-in tiny model's matmuls take about a millisecond: a second thread gains little on an idle machine,
    and on a shared one OpenMP threads spin-waiting on oversubscribed cores make the run several times slower. So
    one thread for the tiny model; real models (``--model``) have enough work per op to use the cores (capped at 8).
    """
    if cfg.model is None and cfg.hidden_size <= 256:
        return 1
    # under torchrun the node's cores are shared by its LOCAL_WORLD_SIZE processes
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min((os.cpu_count() or 1) // local_world, 8))


@contextlib.contextmanager
def threads_for(cfg: TrainConfig) -> Iterator[None]:
    """Run the block with ``--threads`` (or ``default_threads``) torch threads; the caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads(cfg))
    try:
        yield
    finally:  # callers in the same process (tests, notebooks) keep their own thread setting
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") inside the block: they would
    break the trainer's own progress bar and the study's one line per run."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def log(msg: str) -> None:
    """One line to stderr, flushed (the progress bar and the summary go to stderr and stdout)."""
    print(msg, file=sys.stderr, flush=True)
