"""Argument-check primitives shared by the op contracts (``lpc_kernels.ops``) and the vocab-parallel op:
metadata checks that raise naming the argument before any kernel runs, and value checks (label range, NaN,
lengths) that a GPU op records on the device for ``raise_pending_errors()`` instead of blocking the host
(``docs/design.md``, "Value checks").
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
_PENDING: list = []  # (ok: 0-d bool device tensor, culprit: () -> message of the first bad value)


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
    oks = torch.stack([ok.to(pending[0][0].device) for ok, _ in pending]).tolist()
    for ok, (_, culprit) in zip(oks, pending):
        if not ok:
            raise ValueError(f"{culprit()} (found on the device by an earlier op; {SYNC_CHECKS_ENV}=1 raises "
                             "inside the op)")


def _report(ok: Tensor, culprit) -> None:
    """``ok``: a 0-d bool device tensor, all values valid; ``culprit()``: the message naming the first bad value
    (run only when ``ok`` is false: it reads the tensors again). Raise now (``checks_block``) or record it for
    ``raise_pending_errors`` (the message is then built from the tensors as they are at that time)."""
    if checks_block(ok.device):
        if not bool(ok):
            raise ValueError(culprit())
        return
    _PENDING.append((ok, culprit))
    if len(_PENDING) >= MAX_PENDING:
        raise_pending_errors()


def raise_if_bad_values(named: dict, positive: tuple = ()) -> None:
    """NaN/inf in any float tensor of ``named``, then values <= 0 in the ``positive`` ones (lengths): one flag for
    all of them (raised or deferred by ``_report``); the per-tensor search runs only to name the culprit."""
    floats = [t for t in named.values() if t is not None and t.is_floating_point() and t.numel()]
    # max |x| of every tensor in one call: NaN or inf in a tensor makes its norm non-finite
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(floats, float("inf")))).all()] if floats else []
    flags += [(named[n] > 0).all() for n in positive if named[n] is not None]
    if not flags:
        return

    def culprit() -> str:
        for name, t in named.items():
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{name} contains NaN or infinite values"
        for name in positive:
            t = named[name]
            if t is not None and not bool((t > 0).all()):
                return f"{name} must be > 0 (response token counts), got min {t.min().item()}"
        return "a value check failed, but the tensors changed since"

    _report(torch.stack(flags).all() if len(flags) > 1 else flags[0], culprit)


def check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """``labels`` in ``[0, vocab)`` or ``ignore_index``; returns the labels the kernels may read: when the check is
    deferred, out-of-range labels become ``ignore_index`` (no kernel reads outside the vocabulary) until
    ``raise_pending_errors`` reports them."""
    bad = _out_of_range(labels, vocab, ignore_index)

    def culprit() -> str:
        now = _out_of_range(labels, vocab, ignore_index)
        value = int(labels[now][0]) if bool(now.any()) else "(changed since)"
        return f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {value}"

    _report(~bad.any(), culprit)
    return labels if checks_block(labels.device) else torch.where(bad, ignore_index, labels)


def _out_of_range(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def check_sequence_ids(sequence_ids: Tensor, sequence_lengths: list) -> None:
    """``sequence_ids`` of the packed layout equal ``i`` repeated ``sequence_lengths[i]`` times (raised or deferred
    like the other value checks; the counts go to the device without a host sync)."""
    counts = torch.tensor(sequence_lengths, dtype=torch.long)
    if sequence_ids.is_cuda:
        counts = counts.pin_memory().to(sequence_ids.device, non_blocking=True)
    expected = torch.arange(len(sequence_lengths), device=sequence_ids.device).repeat_interleave(
        counts, output_size=sequence_ids.shape[0])

    def culprit() -> str:
        at = int((sequence_ids != expected).int().argmax())
        return (f"sequence_ids must list each position's sequence in order, as sequence_lengths counts them: "
                f"position {at} has {int(sequence_ids[at])}, expected {int(expected[at])}")

    _report((sequence_ids == expected).all(), culprit)


def readable_labels(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """The labels a backward kernel may read: as ``check_label_values`` returned them to the forward."""
    if checks_block(labels.device):
        return labels
    return torch.where(_out_of_range(labels, vocab, ignore_index), ignore_index, labels)
