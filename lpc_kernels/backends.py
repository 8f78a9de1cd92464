"""Which backends exist (``reference``, ``cpu`` and ``cuda`` through ``lpc_kernels._cpp``, ``triton``), which can
run here, and which one ``backend="auto"`` picks; each implements ``lpc_kernels.backend_interface``. The rule and
the errors: ``docs/design.md``, "Choosing a backend".
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference
from .extension import ExtensionStatus, build_hint, load_extension

BACKENDS = ("reference", "cpu", "cuda", "triton")


# the in-place (``make build``) or wheel build of lpc_kernels._C, else the first-use build of an installed pure-Python
# wheel (``lpc_kernels.extension``); importing it registers the lpc::*_fwd/_bwd kernels for CPU and, in CUDA builds,
# CUDA. Without it the package runs on its reference and triton backends.
EXTENSION: ExtensionStatus = load_extension(__package__)
EXTENSION_ERROR: Optional[str] = EXTENSION.error  # None when loaded, else why not


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Read once at import, so that resolve_backend stays traceable by torch.compile (plain constants).
_EXT_DISPATCH_KEYS = frozenset(
    key for key in ("CPU", "CUDA")
    if EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("lpc::token_logprobs_fwd", key))
_TRITON_IMPORTABLE = _triton_importable()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if EXTENSION_ERROR is not None:
            return f"the C++ extension lpc_kernels._C is unavailable ({EXTENSION_ERROR}); {build_hint()}"
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors, got tensors on {device}"
        if backend.upper() not in _EXT_DISPATCH_KEYS:
            return f"lpc_kernels._C was built without {backend} kernels"
        return None
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before import"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def available_backends() -> list[str]:
    """Backends usable in this process for at least one device (CPU, or CUDA when visible)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]


# auto rule: on CUDA tensors the CUDA C++ kernels, then triton; on CPU the C++ kernels; reference last.
# CUDA C++ first because it measured faster on an H100 (benches/results/cuda).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` (``"auto"`` or a name) on tensors on ``device``.

    ``"auto"`` takes ``$LPC_KERNELS_BACKEND`` when set, else the first available of: on CUDA
    ``cuda``, ``triton``, ``reference``; on CPU ``cpu``, ``reference``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("LPC_KERNELS_BACKEND", "auto") or "auto"
        source = "environment variable LPC_KERNELS_BACKEND"
    else:
        source = "backend"
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{source}={backend!r} is not available: {reason}")
    return backend


def backend_module(backend: str):
    """The module implementing ``lpc_kernels.backend_interface`` for a resolved backend name."""
    if backend == "reference":
        return reference
    if backend == "triton":
        from . import triton as triton_backend  # imports triton: only when asked for

        return triton_backend
    from . import _cpp  # needs the compiled extension

    return _cpp
