"""pytest-benchmark suite for lpc-kernels against eager PyTorch, torch.compile, Liger-Kernel and Cut
Cross-Entropy. Run ``make bench`` or ``python -m pytest benches/ --benchmark-only -rs``.

Options (each also an environment variable, so subprocesses and scripts see the same setting):
  --quick               only the shapes marked quick (the issue's target shapes)   LPC_BENCH_QUICK=1
  --bench-no-memory     skip the peak-memory measurement                           LPC_BENCH_MEMORY=0
  --bench-no-check      skip the comparison with the oracle                        LPC_BENCH_CHECK=0
  --bench-max-rounds R  at most R timed rounds per benchmark (smoke runs)          LPC_BENCH_MAX_ROUNDS=R
  --bench-deadline S    skip benchmarks that would start more than S seconds after the session started
                        (LPC_BENCH_DEADLINE=<epoch seconds> does the same with an absolute time)
The device is CUDA when visible, else CPU (LPC_BENCH_DEVICE=cpu|cuda overrides).

Fixtures and the implementation registry live in ``_common.py``; ``_memory.py`` measures CPU memory in a
fresh process. Skipped implementations (not installed, not runnable on this device) are listed with
their reason in the terminal summary (``-rs``) and in the JSON (``lpc_skipped``).
"""

import os
import signal
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_root, ".cache", "inductor"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_root, ".cache", "torch_extensions"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_root, ".cache", "triton"))
# TRITON_INTERPRET is deliberately not set here (tests/conftest.py sets it): benchmarks time real kernels.

import torch  # noqa: E402

import _common  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("lpc-bench")
    group.addoption("--quick", action="store_true", default=False, help="only the quick (target) shapes")
    group.addoption("--bench-no-memory", action="store_true", default=False, help="skip peak-memory rows")
    group.addoption("--bench-no-check", action="store_true", default=False, help="skip oracle comparisons")
    group.addoption("--bench-max-rounds", type=int, default=None, help="cap on timed rounds (smoke runs)")
    group.addoption("--bench-deadline", type=float, default=None,
                    help="seconds after session start past which benchmarks are skipped")


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")  # pytest's default pattern is test_*.py only
    s = _common.SETTINGS
    if config.getoption("--quick"):
        s.quick = True
        os.environ["LPC_BENCH_QUICK"] = "1"
    if config.getoption("--bench-no-memory"):
        s.memory = False
    if config.getoption("--bench-no-check"):
        s.check = False
    if config.getoption("--bench-deadline") is not None:
        s.deadline = time.time() + config.getoption("--bench-deadline")
    if config.getoption("--bench-max-rounds") is not None:
        s.max_rounds = config.getoption("--bench-max-rounds")
    _install_graceful_sigint()
    # torch.compile peers are specialised per shape: never let them fall back to eager on a recompile limit
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096


# Run order: the target shapes (Shape.quick) of every op first, in this file order, then the other
# shapes; so a run cut short by LPC_BENCH_DEADLINE (gpu_check.sh) still has every issue target.
_FILE_PRIORITY = ["bench_linear_token_logprobs", "bench_token_logprobs", "bench_train_step", "bench_gumbel_softmax",
                  "bench_preference_loss"]


def pytest_collection_modifyitems(session, config, items):
    def key(pair):
        index, item = pair
        shape = getattr(getattr(item, "callspec", None), "params", {}).get("shape")
        tier = 0 if getattr(shape, "quick", False) else 1
        stem = item.path.stem if hasattr(item, "path") else ""
        rank = _FILE_PRIORITY.index(stem) if stem in _FILE_PRIORITY else len(_FILE_PRIORITY)
        return tier, rank, index

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def _install_graceful_sigint():
    """First SIGINT (Ctrl-C, ``timeout -s INT``): finish the running benchmark, skip the rest, and still write
    the JSON (pytest-benchmark writes nothing when a benchmark is interrupted). Second SIGINT: abort."""
    state = {"hit": False}

    def handler(signum, frame):
        if state["hit"]:
            raise KeyboardInterrupt
        state["hit"] = True
        _common.SETTINGS.deadline = time.time() - 1
        sys.stderr.write("\nlpc-bench: SIGINT: finishing this benchmark, skipping the rest (again to abort)\n")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def pytest_report_header(config):
    info = _common.machine_info()
    lines = [f"lpc-bench: device {info['device']}"
             + (f" ({info.get('gpu')}, driver {info.get('driver', '?')})" if info.get("gpu") else "")
             + f", cpu {info['cpu_model']} x{info['cpu_count']}, torch {info['torch']}, triton {info['triton']}",
             f"lpc-bench: lpc_kernels backends {info.get('lpc_available_backends')} (extension: "
             f"{info.get('lpc_extension')}), liger {info['liger_kernel']}, cce {info['cut_cross_entropy']}, "
             f"quick={_common.SETTINGS.quick}, memory={_common.SETTINGS.memory}"]
    return lines


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        case = dict(report.user_properties).get("lpc_case", {})
        entry = {"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")}
        entry.update({k: case[k] for k in ("op", "shape", "impl", "mode", "device") if k in case})
        _skipped.append(entry)
    elif report.when == "call" and report.failed:
        case = dict(report.user_properties).get("lpc_case", {})
        _failed.append({"nodeid": report.nodeid, **{k: case[k] for k in ("op", "shape", "impl", "mode") if k in case},
                        "error": str(report.longrepr).strip().splitlines()[-1][:500]})


_skipped: list = []
_failed: list = []


def pytest_benchmark_update_machine_info(config, machine_info):
    info = _common.machine_info()
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine_info["lpc_bench"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lpc_skipped"] = list(_skipped)
    output_json["lpc_failed"] = list(_failed)
    s = _common.SETTINGS
    output_json["lpc_settings"] = {"quick": s.quick, "memory": s.memory, "check": s.check,
                                   "max_rounds": s.max_rounds or None, "device": _common.DEVICE.type}
