"""The autotune log: which config each autotuned kernel of this package ran with, per autotune key.

``LPC_TRITON_AUTOTUNE_LOG=<path>``: at exit, write ``{kernel: [{key, config, timing_ms?}]}`` for every key
each kernel made by ``_common.tuned`` saw in this process (:func:`write_autotune_log`). ``tuned`` hands
each autotuner to :func:`logged`, which wraps its ``run``: this room reads Triton's ``Autotuner``
internals (``cache``, ``best_config``, ``configs_timings``), and nothing else does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile

import torch
import triton

AUTOTUNE_LOG: str = os.environ.get("LPC_TRITON_AUTOTUNE_LOG", "")

_TUNERS: list = []  # (kernel name, Autotuner, {key: record}) for every kernel passed to logged()
MODES: dict = {}  # the log's execution modes ("interpret", "autotune"), set by _common (which imports this module)


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _config_dict(cfg, meta: dict) -> dict:
    """Block sizes (the config's own plus those passed at launch, as under the interpreter), warps, stages."""
    out = {"kwargs": _jsonable({**dict(getattr(cfg, "kwargs", {}) or {}), **meta}),
           "num_warps": getattr(cfg, "num_warps", None), "num_stages": getattr(cfg, "num_stages", None)}
    for extra in ("num_ctas", "maxnreg"):
        if getattr(cfg, extra, None) not in (None, 1):
            out[extra] = getattr(cfg, extra)
    return out


def _timing(t):
    """``configs_timings`` values: do_bench's [median, p20, p80] ms (a list) or one float."""
    if isinstance(t, (list, tuple)):
        return [float(x) for x in t]
    try:
        return float(t)
    except (TypeError, ValueError):
        return None


def logged(name: str, tuner):
    """Wrap ``tuner.run`` (what ``kernel[grid](...)`` calls) to remember, per key, the config it ran with.

    The key is computed as Triton's Autotuner computes it (3.6 and 3.8 alike: the ``key`` arguments, then
    the dtype of every tensor argument); the config comes from ``tuner.cache`` (filled only when more than
    one config survives pruning) or ``tuner.best_config`` (set by ``run`` in both versions).
    """
    seen: dict = {}
    orig = tuner.run
    arg_names = list(getattr(tuner, "arg_names", None) or tuner.fn.arg_names)

    def run(*args, **kwargs):
        nargs = {**dict(zip(arg_names, args)), **{k: v for k, v in kwargs.items() if k in arg_names}}
        key = [nargs[k] for k in tuner.keys if k in nargs]
        key += [str(v.dtype) for v in nargs.values() if hasattr(v, "dtype")]
        key = tuple(key)
        was_cached = key in getattr(tuner, "cache", {})
        ret = orig(*args, **kwargs)
        if key not in seen:
            cfg = getattr(tuner, "cache", {}).get(key) or getattr(tuner, "best_config", None)
            meta = {k: v for k, v in kwargs.items() if k in arg_names}
            meta = {k: v for k, v in meta.items() if not hasattr(v, "dtype") and k.isupper()}
            rec = {"key": _jsonable(list(key)), "config": _config_dict(cfg, meta) if cfg is not None else None}
            timings = getattr(tuner, "configs_timings", None)
            if not was_cached and key in getattr(tuner, "cache", {}) and timings:
                rec["timing_ms"] = _timing(timings.get(cfg))
                rec["all_timings_ms"] = [{"config": _config_dict(c, {}), "timing_ms": _timing(t)}
                                         for c, t in timings.items()]
            seen[key] = rec
        return ret

    tuner.run = run  # an instance attribute: KernelInterface.__getitem__ calls self.run
    _TUNERS.append((name, tuner, seen))
    return tuner


def autotune_records() -> dict:
    """``{kernel: [{key, config, timing_ms?}]}``: every key each logged kernel ran with in this process.

    Keys in ``Autotuner.cache`` that this process's wrapper did not see (e.g. loaded another way) are
    listed too, without timings.
    """
    out = {}
    for name, tuner, seen in _TUNERS:
        recs = dict(seen)
        for key, cfg in list(getattr(tuner, "cache", {}).items()):
            if key not in recs:
                recs[key] = {"key": _jsonable(list(key)), "config": _config_dict(cfg, {})}
        if recs:
            out.setdefault(name, []).extend(recs.values())
    return out


def write_autotune_log(path: str) -> dict:
    """Write :func:`autotune_records` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    data = {"triton": triton.__version__, **MODES,
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
            "kernels": autotune_records()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return data


if AUTOTUNE_LOG:
    atexit.register(lambda: write_autotune_log(AUTOTUNE_LOG))
