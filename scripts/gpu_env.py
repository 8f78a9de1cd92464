"""Write the machine's description to a JSON file: GPU, driver, CUDA runtime, torch, triton, python, nvcc,
git commit. benches/gpu_check.sh calls it for OUTDIR/env.json, so committed results can name what they
were measured on.

    python3 scripts/gpu_env.py OUT.json      # GIT_COMMIT / GIT_COMMIT_SOURCE from the environment

Every probe is best effort: a missing tool or package is recorded as such, never an error (the script
also runs, for the dry run, on machines without a GPU or without torch).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001  (a missing or hanging tool is recorded, not fatal)
        return f"unavailable: {type(e).__name__}"


def collect() -> dict:
    env = {"python": platform.python_version(), "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
           "git_commit_source": os.environ.get("GIT_COMMIT_SOURCE", "not given"), "hostname": platform.node(),
           "budget_s": int(os.environ.get("BUDGET", "0") or 0), "steps": os.environ.get("STEPS", ""),
           "dry_run": os.environ.get("DRY") == "1", "gpu": None, "driver": None}
    try:
        import torch

        env.update(torch=torch.__version__, cuda_runtime=torch.version.cuda)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}",
                       gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_sms=p.multi_processor_count)
    except Exception as e:  # noqa: BLE001
        env["torch"] = f"not importable: {type(e).__name__}: {e}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable: {type(e).__name__}"
    if shutil.which("nvidia-smi"):
        q = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        env["nvidia_smi"] = q
        parts = [x.strip() for x in q.splitlines()[0].split(",")] if "," in q else []
        if len(parts) >= 2:
            env["gpu"] = env["gpu"] or parts[0]
            env["driver"] = parts[1]
        m = re.search(r"CUDA Version:\s*([0-9.]+)", _run(["nvidia-smi"]))
        env["driver_cuda"] = m.group(1) if m else None  # the newest CUDA the driver supports
    if shutil.which("nvcc"):
        m = re.search(r"release ([0-9.]+), (V[0-9.]+)", _run(["nvcc", "--version"]))
        env["nvcc"] = " ".join(m.groups()) if m else "unparsed"
    else:
        env["nvcc"] = None
    for tool in ("compute-sanitizer", "cuda-gdb", "ncu", "torchrun"):
        env[tool.replace("-", "_") + "_on_path"] = shutil.which(tool) is not None
    for mod in ("transformers", "liger_kernel", "cut_cross_entropy", "pytest_benchmark", "numpy"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "importable")
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    env = collect()
    with open(sys.argv[1], "w") as f:
        json.dump(env, f, indent=1)
    print("env.json:", json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
