"""Argument-check primitives shared by the op contracts (``lpc_kernels.ops``) and the vocab-parallel op.

Metadata checks (types, shapes, dtypes, devices, scalar ranges) run in the public functions before any
kernel launches and raise ``TypeError`` / ``ValueError`` naming the argument. Value checks that need the
tensors' contents (label range, NaN, lengths) run inside the custom ops, with one host sync for all of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .numerics import FLOAT_DTYPES, INDEX_DTYPES


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(named: dict) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def check_int(name: str, value, low: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_float(name: str, value, *, positive: bool = False, low: Optional[float] = None,
                high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_labels(labels: Tensor, lead_shape, lead_name: str) -> None:
    check_tensor("labels", labels, INDEX_DTYPES)
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (the leading dims of {lead_name}), "
                         f"got {tuple(labels.shape)}")


def raise_if_bad_values(named: dict, positive: tuple = ()) -> None:
    """NaN/inf in any float tensor of ``named``, then values <= 0 in the ``positive`` ones (lengths): one host
    sync for all checks; the per-tensor loop below runs only to name the culprit."""
    floats = [t for t in named.values() if t is not None and t.is_floating_point()]
    flags = [torch.isfinite(t).all() for t in floats] + [(named[n] > 0).all() for n in positive
                                                         if named[n] is not None]
    if not flags or bool(torch.stack(flags).all()):
        return
    for name, t in named.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    for name in positive:
        t = named[name]
        if t is not None and not bool((t > 0).all()):
            raise ValueError(f"{name} must be > 0 (response token counts), got min {t.min().item()}")


def check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {value}")
