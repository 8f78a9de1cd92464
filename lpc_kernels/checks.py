"""Argument-check primitives shared by the op contracts (``lpc_kernels.ops``) and the vocab-parallel op.

Metadata checks (types, shapes, dtypes, devices, scalar ranges) run in the public functions before any
kernel launches and raise ``TypeError`` / ``ValueError`` naming the argument. Value checks that need the
tensors' contents (label range, NaN, lengths) run inside the custom ops without blocking the host on a GPU:
they compute a flag on the device and ``raise_pending_errors()`` raises the same ``ValueError`` at the
caller's next sync (``docs/design.md`` section 2, "Value checks").
"""

from __future__ import annotations

import math
import os
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


SYNC_CHECKS_ENV = "LPC_KERNELS_SYNC_CHECKS"
MAX_PENDING = 256  # deferred checks kept before they are read anyway (bounds what an unchecked loop holds)
_PENDING: list = []  # (flags [k] bool, values [k] float64, messages: k format strings with {value})


def checks_block(device: torch.device) -> bool:
    """Whether value checks raise inside the op (reading the device) or are deferred: ``LPC_KERNELS_SYNC_CHECKS``
    ``1`` always raise in the op, ``0`` always defer; unset: raise for CPU tensors (reading them costs nothing),
    defer for GPU tensors (a read would stall the host on every op)."""
    mode = os.environ.get(SYNC_CHECKS_ENV, "")
    if mode in ("0", "1"):
        return mode == "1"
    return device.type == "cpu"


def raise_pending_errors() -> None:
    """Raise the first value error an op found on the device since the last call (one host read for all of them);
    nothing pending: returns at once. ``lpc.train`` calls it every step after reading the loss; call it where
    your loop reads a value anyway (e.g. after ``loss.item()``)."""
    if not _PENDING:
        return
    pending = _PENDING[:]
    _PENDING.clear()
    for flags, values, messages in pending:
        hits = flags.tolist()
        if any(hits):
            i = hits.index(True)
            raise ValueError(messages[i].format(value=_number(values[i].item())) + " (found on the device by an "
                             f"earlier op; {SYNC_CHECKS_ENV}=1 raises inside the op)")


def _number(v: float):
    return int(v) if float(v).is_integer() else v


def _report(flags: list, values: list, messages: list) -> None:
    """Raise now (``checks_block``) or record for ``raise_pending_errors``: ``flags`` / ``values`` are 0-d device
    tensors, ``messages`` format strings with ``{value}``."""
    flags_t, values_t = torch.stack(flags), torch.stack([v.double() for v in values])
    if checks_block(flags_t.device):
        hits = flags_t.tolist()
        if any(hits):
            i = hits.index(True)
            raise ValueError(messages[i].format(value=_number(values_t[i].item())))
        return
    _PENDING.append((flags_t, values_t, messages))
    if len(_PENDING) >= MAX_PENDING:
        raise_pending_errors()


def raise_if_bad_values(named: dict, positive: tuple = ()) -> None:
    """NaN/inf in any float tensor of ``named``, then values <= 0 in the ``positive`` ones (lengths); raised or
    deferred by ``_report`` (no per-tensor read)."""
    flags, values, messages = [], [], []
    for name, t in named.items():
        if t is not None and t.is_floating_point():
            bad = ~torch.isfinite(t)
            flags.append(bad.any())
            values.append(t.reshape(-1)[bad.reshape(-1).int().argmax()] if t.numel() else t.new_zeros(()))
            messages.append(f"{name} contains NaN or infinite values (e.g. {{value}})")
    for name in positive:
        t = named[name]
        if t is not None:
            low = t.min()
            flags.append(low <= 0)
            values.append(low)
            messages.append(f"{name} must be > 0 (response token counts), got min {{value}}")
    if flags:
        _report(flags, values, messages)


def check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """``labels`` in ``[0, vocab)`` or ``ignore_index``; returns the labels the kernels may read: when the check is
    deferred, out-of-range labels become ``ignore_index`` (no kernel reads outside the vocabulary) until
    ``raise_pending_errors`` reports them."""
    if labels.numel() == 0:
        return labels
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    _report([bad.any()], [labels[bad.int().argmax()]],
            [f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {{value}}"])
    return labels if checks_block(labels.device) else torch.where(bad, ignore_index, labels)


def readable_labels(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """The labels a backward kernel may read: as ``check_label_values`` returned them to the forward."""
    if checks_block(labels.device):
        return labels
    return torch.where((labels != ignore_index) & ((labels < 0) | (labels >= vocab)), ignore_index, labels)
