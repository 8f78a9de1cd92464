"""Shared machinery of the benchmark suite: device, shapes, implementation registry, timing, memory, checks.

Every ``bench_*.py`` module defines::

    OP                    op family name (the first word of every benchmark group)
    SHAPES                list[Shape] for this device (``shapes_for`` picks CPU or GPU lists)
    IMPLS                 implementation names, peers first (eager is the value oracle), ours after
    make_inputs(shape)    tensors shared by every implementation at one shape (built once, cached)
    build(impl, shape, inputs) -> Case   or raise Unavailable(reason)

and one test per family that calls :func:`run`. A :class:`Case` is three callables (forward, backward,
zero_grad) around one implementation; :func:`run` checks it against the oracle once, measures peak
memory once (all three modes), then times the requested mode with ``benchmark.pedantic``.

Conventions, recorded in each benchmark's ``extra_info``:

* modes: ``fwd`` (training forward: graph kept), ``bwd`` (backward only; the forward runs in the untimed
  setup), ``fwd_bwd``. GPU timings synchronise the device at the end of every timed call.
* memory (``peak_mem_bytes``): the peak *extra* memory of the timed region above what was allocated when
  it started (inputs, weights and, for ``bwd``, the saved forward graph are not counted). GPU:
  ``torch.cuda.max_memory_allocated`` growth in this process (``peak_mem_total_bytes`` is the absolute
  peak). CPU: peak RSS growth (``VmHWM`` after a ``clear_refs`` reset) in a fresh subprocess
  (``benches/_memory.py``) with glibc's mmap threshold pinned so freed blocks go back to the OS.
* check: the first forward/backward of each case is compared with the oracle (``CHECK_IMPL``) at the same
  inputs: max relative error of the output and of each gradient. ``check`` is ``ok``, ``MISMATCH ...``
  (the row is still timed, and the report flags it), ``finite`` or ``n/a (...)``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
MODES = ("fwd_bwd", "fwd", "bwd")


def _pick_device() -> torch.device:
    want = os.environ.get("LPC_BENCH_DEVICE", "").strip()
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = _pick_device()
_LOADAVG_AT_IMPORT = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
ON_GPU = DEVICE.type == "cuda"


@dataclass
class Settings:
    """Run-wide switches, set by ``benches/conftest.py`` from options / environment before collection."""

    quick: bool = os.environ.get("LPC_BENCH_QUICK", "0") == "1"
    memory: bool = os.environ.get("LPC_BENCH_MEMORY", "1") != "0"
    check: bool = os.environ.get("LPC_BENCH_CHECK", "1") != "0"
    deadline: float = float(os.environ.get("LPC_BENCH_DEADLINE", "0") or 0)  # epoch seconds, 0 = none
    mem_timeout_s: float = float(os.environ.get("LPC_BENCH_MEM_TIMEOUT", "900"))
    max_rounds: int = int(os.environ.get("LPC_BENCH_MAX_ROUNDS", "0") or 0)  # 0 = the shapes' own counts
    # timed rounds per benchmark: the shape's count, fewer if they would take longer than this (>= 2 rounds)
    max_time_s: float = float(os.environ.get("LPC_BENCH_MAX_TIME", "0") or 0) or 3.0


MIN_ROUNDS = 2


SETTINGS = Settings()


class Unavailable(Exception):
    """An implementation that cannot run here; the message is the reason shown in the skip."""


# ------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One benchmark shape. ``dims`` are the sizes the report plots against (``N``, ``V``, ...)."""

    id: str
    dims: dict
    dtype: str                 # torch dtype name of the floating inputs
    rounds: int                # timed rounds per mode (fwd_bwd uses it, fwd/bwd too)
    quick: bool = False        # part of the --quick set
    tags: tuple = ()           # e.g. ("target",): the shape an issue target is stated at
    memory: bool = True        # False: too small for a meaningful CPU RSS measurement (KiB-sized tensors)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def shapes_for(cpu: list, gpu: list) -> list:
    return gpu if ON_GPU else cpu


def shape_by_id(shapes: list, shape_id: str) -> Shape:
    for s in shapes:
        if s.id == shape_id:
            return s
    raise KeyError(f"unknown shape {shape_id!r}; known: {[s.id for s in shapes]}")


def params(shapes: list, impls: list, modes=MODES, sweep_skip=()) -> list:
    """pytest params ``(shape, impl, mode)`` in run order: shape-major (inputs are shared per shape).

    ``sweep_skip``: implementations run at the target shapes only, not at the extra (scaling) shapes
    (e.g. the reference backend: the oracle, not a performance candidate; keeps ``make bench`` short)."""
    out = []
    for s in shapes:
        if SETTINGS.quick and not s.quick:
            continue
        for impl in impls:
            if impl in sweep_skip and "target" not in s.tags:
                continue
            for mode in modes:
                out.append(pytest.param(s, impl, mode, id=f"{s.id}-{impl}-{mode}"))
    return out


# ---------------------------------------------------------------------------------- implementations
OURS_BACKENDS = ("cuda", "triton", "cpu", "reference")  # run order: the reference (oracle backend) last


def impl_kind(impl: str) -> str:
    """``ours`` for our backends (``ours_<backend>[_variant]``), else the peer's family name."""
    return "ours" if impl.startswith("ours_") else impl.split("_")[0]


def ours_backend(impl: str) -> str:
    return impl.split("_")[1]


def require_ours(backend: str, device: torch.device = None) -> None:
    """Raise Unavailable unless our ``backend`` runs on ``device`` (lpc_kernels' own reason is kept)."""
    device = device or DEVICE
    from lpc_kernels.backends import unavailable_reason

    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise Unavailable(f"lpc_kernels backend {backend!r} unavailable on {device.type}: {reason}")
    if backend == "triton" and device.type == "cpu":
        raise Unavailable("the triton backend runs on CPU only under TRITON_INTERPRET=1, a correctness tool "
                          "(timing the interpreter would be meaningless); it is benchmarked on GPU")


def require_module(name: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a peer broken against this torch/triton
        raise Unavailable(f"{pip_name} is not importable ({type(exc).__name__}: {exc}); "
                          f"install it with `pip install --no-deps {pip_name}`") from None


def require_cuda(what: str) -> None:
    if not ON_GPU:
        raise Unavailable(f"{what} is Triton-only: it needs a CUDA device (running on {DEVICE.type})")


def cce_impl_name() -> str:
    """Cut Cross-Entropy's implementation for this device: its Triton kernels on GPU, torch.compile on CPU."""
    return "cce" if ON_GPU else "torch_compile"


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of an eager function with default options, shapes specialised (``dynamic=False``)
    so every benchmark shape gets its own best kernels."""
    return torch.compile(fn, dynamic=False)


# -------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One implementation at one shape. ``forward()`` returns the output; ``backward(out)`` runs the
    backward pass; ``params`` are the leaves whose ``.grad`` the backward fills."""

    forward: Callable[[], Any]
    backward: Callable[[Any], None]
    params: list
    value: Callable[[Any], torch.Tensor] = lambda out: out   # the tensor compared with the oracle
    check_params: Optional[list] = None  # leaves whose gradients are compared (default: params)
    check: str = "value"            # "value" | "finite" | "n/a (<why>)"
    info: dict = field(default_factory=dict)
    # filled by run():
    checked: Optional[dict] = None
    memory: Optional[dict] = None
    call_s: Optional[float] = None  # steady-state seconds of one fwd+bwd call (sizes the round counts)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def grads(self) -> list:
        return [p.grad for p in (self.check_params if self.check_params is not None else self.params)]


def backward_with(grad: torch.Tensor) -> Callable[[Any], None]:
    """Backward of an output tensor with a fixed upstream gradient (cast to the output's dtype)."""

    def bwd(out):
        out.backward(grad.to(out.dtype))

    return bwd


def backward_scalar(out) -> None:
    out.backward()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# -------------------------------------------------------------------------------- caches per process
class _Cache:
    """Inputs of the current (op, shape) and the current case; one of each is kept alive at a time."""

    def __init__(self):
        self.inputs_key = None
        self.inputs = None
        self.case_key = None
        self.case = None
        self.expected = {}  # (op, shape.id, oracle) -> (value, grads) on the device

    def drop_case(self):
        self.case_key, self.case = None, None

    def release(self):
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()


CACHE = _Cache()


def get_inputs(mod, shape: Shape):
    key = (mod.OP, shape.id)
    if CACHE.inputs_key != key:
        CACHE.drop_case()
        CACHE.inputs_key, CACHE.inputs = None, None
        CACHE.expected = {k: v for k, v in CACHE.expected.items() if k[:2] == key}
        CACHE.release()
        torch.manual_seed(0)
        CACHE.inputs = mod.make_inputs(shape)
        CACHE.inputs_key = key
    return CACHE.inputs


def get_case(mod, impl: str, shape: Shape) -> Case:
    key = (mod.OP, impl, shape.id)
    if CACHE.case_key != key:
        CACHE.drop_case()
        CACHE.release()
        inputs = get_inputs(mod, shape)
        case = mod.build(impl, shape, inputs)
        CACHE.case_key, CACHE.case = key, case
    return CACHE.case


# --------------------------------------------------------------------------------------------- checks
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp32, on the tensors' device, in slices (bounded temporaries)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().reshape(-1), b.detach().to(a.device).reshape(-1)
    err, scale, step = 0.0, 0.0, 1 << 24
    for i in range(0, a.numel(), step):
        x, y = a[i:i + step].float(), b[i:i + step].float()
        if not bool(torch.isfinite(x).all()):
            return float("inf")
        err = max(err, (x - y).abs().max().item())
        scale = max(scale, y.abs().max().item())
    return err / (scale if scale > 0 else 1.0)


def _finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + (1 << 24)]).all()) for i in range(0, flat.numel(), 1 << 24))


def check_tolerance(shape: Shape) -> float:
    """Max relative error (|a-b|_max / |b|_max) accepted against the oracle: fp32 math on the same inputs
    agrees to ~1e-5; bf16/fp16 inputs and gradients carry the rounding of their dtype (and CCE's default
    gradient filtering), so 2e-2."""
    return 1e-3 if shape.dtype in ("float32", "float64") else 2e-2


def _run_once(case: Case):
    """One forward + backward (the warm-up). Returns (value, grads): detached copies on the device."""
    case.zero_grad()
    out = case.forward()
    sync()
    value = case.value(out).detach().clone()
    case.backward(out)
    sync()
    grads = [g.detach().clone() if g is not None else None for g in case.grads()]
    del out
    case.zero_grad()
    return value, grads


def warm_and_check(mod, impl: str, shape: Shape, case: Case) -> dict:
    """First forward + backward of a case (warm-up: compiles, autotunes) and its comparison with the oracle."""
    if case.checked is not None:
        return case.checked
    t0 = time.perf_counter()
    value, grads = _run_once(case)
    first = time.perf_counter() - t0
    case.call_s = first
    cap = min(shape.rounds, SETTINGS.max_rounds) if SETTINGS.max_rounds > 0 else shape.rounds
    if max(MIN_ROUNDS, int(SETTINGS.max_time_s / first)) < cap and first > 0.05:
        # the first call may include compilation / autotuning: time a second one to size the rounds
        t0 = time.perf_counter()
        case.zero_grad()
        out = case.forward()
        case.backward(out)
        sync()
        del out
        case.zero_grad()
        case.call_s = time.perf_counter() - t0
    result = {"check": case.check, "first_call_s": round(first, 3)}
    finite = _finite(value) and all(g is None or _finite(g) for g in grads)
    oracle = getattr(mod, "CHECK_IMPL", None)
    oracle = oracle(impl) if callable(oracle) else oracle
    if not finite:
        result["check"] = "MISMATCH: non-finite output or gradient"
    elif case.check == "value" and SETTINGS.check and oracle is not None:
        key = (mod.OP, shape.id, oracle)
        if impl == oracle:
            CACHE.expected[key] = (value, grads)
            result["check"] = "oracle"
        else:
            if key not in CACHE.expected:
                try:
                    ref_case = mod.build(oracle, shape, get_inputs(mod, shape))
                except Unavailable as exc:
                    result["check"] = f"n/a (oracle {oracle} unavailable: {exc})"
                    case.checked = result
                    return result
                CACHE.expected[key] = _run_once(ref_case)
                del ref_case
                CACHE.release()
            ev, eg = CACHE.expected[key]
            errs = {"out": _rel_err(value, ev)}
            for i, (g, e) in enumerate(zip(grads, eg)):
                if g is not None and e is not None:
                    errs[f"grad{i}"] = _rel_err(g, e)
            worst = max(errs.values())
            tol = check_tolerance(shape)
            result["check_vs"] = oracle
            result["check_err"] = {k: float(f"{v:.3g}") for k, v in errs.items()}
            result["check"] = "ok" if worst <= tol else f"MISMATCH: max rel err {worst:.3g} > {tol:g} vs {oracle}"
    elif case.check == "value":
        result["check"] = "finite"
    case.checked = result
    return result


# --------------------------------------------------------------------------------------------- memory
def _gpu_memory(case: Case) -> dict:
    gc.collect()
    sync()
    case.zero_grad()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = case.forward()
    sync()
    peak_fwd = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    base2 = torch.cuda.memory_allocated()
    case.backward(out)
    sync()
    peak_bwd = torch.cuda.max_memory_allocated()
    del out
    case.zero_grad()
    return {
        "fwd": peak_fwd - base, "bwd": peak_bwd - base2, "fwd_bwd": max(peak_fwd, peak_bwd) - base,
        "total": {"fwd": peak_fwd, "bwd": peak_bwd, "fwd_bwd": max(peak_fwd, peak_bwd)},
        "method": "torch.cuda.max_memory_allocated growth over the memory allocated at the start",
    }


MEMORY_RESULT_PREFIX = "LPC_MEMORY_RESULT "  # the line of _memory.py's stdout that holds its JSON result


def _cpu_memory(module: str, impl: str, shape_id: str, *, timeout_s: float) -> dict:
    """Run ``benches/_memory.py`` in a fresh Python; returns {"fwd", "bwd", "fwd_bwd": bytes, "method"} or
    {"error"}. glibc's mmap threshold is pinned to 64 KiB so freed tensors go back to the OS."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([BENCH_DIR, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "_memory.py"), module, impl, shape_id],
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_RESULT_PREFIX):
            result = json.loads(line[len(MEMORY_RESULT_PREFIX):])
            result["subprocess_s"] = round(time.time() - start, 1)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"memory subprocess failed (rc {proc.returncode}): {' | '.join(tail)}"}


def measure_memory(mod, impl: str, shape: Shape, case: Case) -> dict:
    if case.memory is not None:
        return case.memory
    if not SETTINGS.memory:
        case.memory = {"error": "memory measurement disabled (--bench-no-memory / LPC_BENCH_MEMORY=0)"}
    elif ON_GPU:
        case.memory = _gpu_memory(case)
    elif not shape.memory:
        case.memory = {"error": "not measured: tensors of this shape are below the resolution of peak RSS"}
    else:
        case.memory = _cpu_memory(mod.__name__, impl, shape.id, timeout_s=SETTINGS.mem_timeout_s)
    return case.memory


# ----------------------------------------------------------------------------------------------- run
def _rounds(case: Case, shape: Shape) -> int:
    """The shape's round count, capped by --bench-max-rounds and by max_time_s / (one fwd+bwd call)."""
    r = min(shape.rounds, SETTINGS.max_rounds) if SETTINGS.max_rounds > 0 else shape.rounds
    if case.call_s and case.call_s > 0:
        r = min(r, max(MIN_ROUNDS, int(SETTINGS.max_time_s / case.call_s)))
    return max(1, r)


def skip_if_past_deadline() -> None:
    if SETTINGS.deadline and time.time() > SETTINGS.deadline:
        pytest.skip("time budget exhausted (LPC_BENCH_DEADLINE passed before this benchmark started)")


def _pedantic(benchmark, case: Case, mode: str, rounds: int):
    if mode == "fwd":
        def setup():
            case.zero_grad()
            sync()

        def target():
            out = case.forward()
            sync()
            del out

        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    elif mode == "bwd":
        def setup():
            case.zero_grad()
            out = case.forward()
            sync()
            return (out,), {}

        def target(out):
            case.backward(out)
            sync()

        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    elif mode == "fwd_bwd":
        def setup():
            case.zero_grad()
            sync()

        def target():
            out = case.forward()
            case.backward(out)
            sync()
            del out

        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        raise ValueError(mode)
    case.zero_grad()


def run(benchmark, request, mod, shape: Shape, impl: str, mode: str, *, op: Optional[str] = None,
        modes=MODES) -> None:
    """The body of every benchmark test (``op`` names the family in the report; default ``mod.OP``)."""
    op = op or mod.OP
    meta = {"op": op, "shape": shape.id, "dims": dict(shape.dims), "dtype": shape.dtype, "impl": impl,
            "kind": impl_kind(impl), "mode": mode, "device": DEVICE.type, "tags": list(shape.tags)}
    request.node.user_properties.append(("lpc_case", meta))
    skip_if_past_deadline()
    try:
        case = get_case(mod, impl, shape)
    except Unavailable as exc:
        CACHE.drop_case()
        pytest.skip(str(exc))
    benchmark.group = f"{op} {shape.id} {mode}"
    benchmark.extra_info.update(meta)
    benchmark.extra_info.update(case.info)
    benchmark.extra_info.update(warm_and_check(mod, impl, shape, case))
    mem = measure_memory(mod, impl, shape, case)
    if "error" in mem:
        benchmark.extra_info["mem_error"] = mem["error"]
    else:
        benchmark.extra_info["peak_mem_bytes"] = int(mem[mode])
        benchmark.extra_info["mem_method"] = mem["method"]
        if "total" in mem:
            benchmark.extra_info["peak_mem_total_bytes"] = int(mem["total"][mode])
        if "subprocess_s" in mem:
            benchmark.extra_info["mem_subprocess_s"] = mem["subprocess_s"]
    _pedantic(benchmark, case, mode, _rounds(case, shape))
    if mode == "fwd_bwd" and benchmark.stats is not None:  # None under --benchmark-disable (one untimed call)
        case.call_s = benchmark.stats.stats.median
    if hasattr(os, "getloadavg"):
        benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if mode == modes[-1]:
        CACHE.drop_case()


# ------------------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            name, driver, mem, clock = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")]
            return {"gpu_smi_name": name, "driver": driver, "gpu_memory": mem, "gpu_max_sm_clock": clock}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return {}


def _version(mod_name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod_name)
    except Exception:
        return None


def machine_info() -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "device": DEVICE.type,
        "quick": SETTINGS.quick,
        "loadavg_start": _LOADAVG_AT_IMPORT,
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "LPC_KERNELS_BACKEND", "OMP_NUM_THREADS",
                                               "CUDA_VISIBLE_DEVICES") if os.environ.get(k) is not None},
    }
    try:
        import lpc_kernels
        from lpc_kernels import backends

        info["lpc_kernels"] = lpc_kernels.__version__
        info["lpc_extension"] = "loaded" if backends.EXTENSION_ERROR is None else backends.EXTENSION_ERROR
        info["lpc_available_backends"] = lpc_kernels.available_backends()
        info["lpc_auto_backend"] = backends.resolve_backend("auto", DEVICE)
    except Exception as exc:  # the suite still reports what it can
        info["lpc_kernels"] = f"import failed: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                     "gpu_capability": f"{props.major}.{props.minor}",
                     "gpu_total_memory_gib": round(props.total_memory / 2**30, 1)})
        info.update(_nvidia_smi())
    return info

