"""Run every bad-input case of tests/backends/test_cuda_kernels.py (``_bad_calls``) in its own fresh Python process and
report which raise the expected RuntimeError naming the argument, which raise something else, and which
crash the process (a signal such as SIGSEGV). Each crashing case is rerun under cuda-gdb (when it is on
PATH) to save a native backtrace.

Why: on an H100 (torch 2.11) ``torch.ops.lpc.token_logprobs_fwd(x[None], lab, -100)`` with CUDA tensors
segfaulted instead of raising "logits must be 2-D, got shape [1, 4, 10]", which killed the whole pytest
run. One process per case means one crash cannot hide the others, and the backtrace says where it died.

    python3 scripts/cuda_bad_input_probe.py --out OUTDIR            # on a GPU machine
    python3 scripts/cuda_bad_input_probe.py --out OUTDIR --dry-run  # anywhere: the probe's own logic

Besides the CUDA cases, control cases run on CPU tensors through the same extension and through torch
itself, with messages that format a shape like the crashing one:
    control:cpu_kernel_dim  the C++ CPU kernel (g++-compiled csrc/cpu) raising "... must be 2-D, got shape ..."
    control:torch_view      libtorch raising a shape error by itself
If a control crashes too, the cause is not in the nvcc-compiled code. ``--dry-run`` (or a machine
without a GPU) runs the controls plus ``selftest:segfault`` (a deliberate crash, so the crash path and the
cuda-gdb invocation are exercised) and lists the CUDA cases as skipped.

Outputs in --out: probe.json (one record per case), probe.txt (the table), gdb_<case>.txt (backtraces).
Exit status: 0 when every case that ran behaved as expected (in a dry run: when the self-test crash was
detected as a crash), 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROLS = ["control:cpu_kernel_dim", "control:torch_view"]
SELFTEST = "selftest:segfault"
RESULT_TAG = "PROBE_RESULT "  # the child's one result line on stdout


# ------------------------------------------------------------------------------------ case table
def cuda_case_names() -> list[str]:
    """The argument names of ``_bad_calls`` in tests/backends/test_cuda_kernels.py, listed from the table built on
    CPU tensors (no GPU needed; the names do not depend on the device). The child processes index the live CUDA
    list."""
    import torch

    sys.path[:0] = [ROOT]
    from tests.backends import test_cuda_kernels

    return [name for name, _ in test_cuda_kernels._bad_calls(torch.device("cpu"))]


# ------------------------------------------------------------------------------------------ child
def _control_call(kind: str):
    import torch

    import lpc_kernels  # noqa: F401  (loads lpc_kernels._C: the torch.ops.lpc kernels)

    x, lab = torch.randn(4, 10), torch.tensor([1, 2, -100, 3])
    if kind == "control:cpu_kernel_dim":
        return "logits", lambda: torch.ops.lpc.token_logprobs_fwd(x[None], lab, -100)
    if kind == "control:torch_view":
        return "shape", lambda: x.view(7)
    raise SystemExit(f"probe: unknown control {kind}")


def child(case: str) -> int:
    """Run one case in this process; print one PROBE_RESULT json line. A crash prints nothing."""
    sys.path[:0] = [ROOT]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if case == SELFTEST:
        import ctypes

        sys.stdout.flush()
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as the real crash did
        return 3
    if case.startswith("control:"):
        name, call = _control_call(case)
    else:
        from tests.backends import test_cuda_kernels

        index = int(case.split(":", 1)[1])
        name, call = test_cuda_kernels._bad_calls()[index]
    rec = {"case": case, "name": name}
    try:
        call()
        rec.update(status="no_error", detail="returned without raising")
    except RuntimeError as e:  # what the test expects (c10::Error -> RuntimeError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        ok = re.search(rf"\b{re.escape(name)}\b", str(e)) is not None
        rec.update(status="ok" if ok else "wrong_message", detail=f"{type(e).__name__}: {msg}"[:300])
    except Exception as e:  # noqa: BLE001  (any other type is a finding, not a probe failure)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rec.update(status="wrong_type", detail=f"{type(e).__name__}: {msg}"[:300])
    if case.startswith("cuda:"):
        import torch

        torch.cuda.synchronize()  # a kernel fault after the raise would surface here, not in a later case
    print(RESULT_TAG + json.dumps(rec), flush=True)
    return 0 if rec["status"] == "ok" else 1


# ----------------------------------------------------------------------------------------- parent
def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def run_case(case: str, name: str, timeout: float) -> dict:
    cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--case", case]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_SHOW_CPP_STACKTRACES="1")
    t0 = time.time()
    rec = {"case": case, "name": name}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec.update(status="timeout", detail=f"no result within {timeout:.0f}s", seconds=round(time.time() - t0, 1),
                   tail=out[-1500:])
        return rec
    rec["seconds"] = round(time.time() - t0, 1)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode < 0:
        rec.update(status="crash", detail=f"killed by {_signal_name(p.returncode)}", returncode=p.returncode)
    elif lines:
        got = json.loads(lines[-1][len(RESULT_TAG):])
        rec.update(status=got["status"], detail=got["detail"], returncode=p.returncode)
    else:
        rec.update(status="error", detail=f"exit {p.returncode} without a result line", returncode=p.returncode)
    if rec["status"] != "ok":
        rec["tail"] = (p.stdout[-800:] + "\n--- stderr ---\n" + p.stderr[-2500:]).strip()
    return rec


def gdb_backtrace(case: str, out_dir: str, timeout: float) -> str:
    """Rerun one case under cuda-gdb; save and return the path of the log (run, bt at the fault)."""
    log = os.path.join(out_dir, "gdb_" + re.sub(r"[^A-Za-z0-9_.-]", "_", case) + ".txt")
    cmd = ["cuda-gdb", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt", "-ex", "info registers rip",
           "-ex", "quit", "--args", sys.executable, os.path.abspath(__file__), "--case", case]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        text = f"$ {' '.join(cmd)}\n(exit {p.returncode})\n{p.stdout}\n--- stderr ---\n{p.stderr}"
    except subprocess.TimeoutExpired as e:
        so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text = f"$ {' '.join(cmd)}\nTIMEOUT after {timeout:.0f}s\n{so}"
    with open(log, "w") as f:
        f.write(text)
    return log


def _bt_lines(path: str, n: int = 12) -> list[str]:
    """The first frames of the backtrace in a cuda-gdb log (lines starting with #<digit>)."""
    with open(path) as f:
        return [ln.rstrip() for ln in f if re.match(r"#\d+ ", ln)][:n]


def parent(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    os.makedirs(args.out, exist_ok=True)
    names = cuda_case_names()
    have_gpu = False
    gpu_reason = "dry run (--dry-run)"
    if not args.dry_run:
        try:
            import torch

            have_gpu = torch.cuda.is_available()
            gpu_reason = "" if have_gpu else "torch.cuda.is_available() is False"
        except ImportError as e:
            gpu_reason = f"torch not importable: {e}"
    cases = [(c, "logits" if c.endswith("dim") else "shape") for c in CONTROLS]
    skipped = []
    if have_gpu:
        cases += [(f"cuda:{i}", n) for i, n in enumerate(names)]
    else:
        skipped = [{"case": f"cuda:{i}", "name": n, "status": "skipped", "detail": gpu_reason}
                   for i, n in enumerate(names)]
        cases.append((SELFTEST, "-"))
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c[0] in keep]
    print(f"probe: {len(cases)} case(s) in fresh processes, {args.jobs} at a time"
          f"{'' if have_gpu else f'; {len(names)} CUDA cases skipped: {gpu_reason}'}", flush=True)

    results = {}
    per_case = max(5.0, min(args.case_timeout, deadline - time.time() - 1))
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(run_case, c, n, per_case): c for c, n in cases}
        for fut in cf.as_completed(futs):
            rec = fut.result()
            results[rec["case"]] = rec
            print(f"  {rec['case']:<24} {rec['status']:<14} {rec.get('seconds', 0):>5}s  {rec['detail'][:110]}",
                  flush=True)

    crashes = [c for c, _ in cases if results[c]["status"] in ("crash", "timeout")][: args.max_gdb]
    gdb = shutil.which("cuda-gdb")
    if crashes:
        left = deadline - time.time() - 1
        if not gdb:
            print("probe: cuda-gdb not on PATH: no native backtraces (the faulthandler's Python stack is in "
                  "probe.json 'tail')", flush=True)
            for c in crashes:
                results[c]["gdb"] = "cuda-gdb not on PATH"
        elif left < 10:
            print(f"probe: only {left:.0f}s of the budget left: cuda-gdb reruns skipped", flush=True)
            for c in crashes:
                results[c]["gdb"] = "skipped: budget exhausted"
        else:
            print(f"probe: rerunning {len(crashes)} crash(es) under cuda-gdb (timeout {min(args.gdb_timeout, left):.0f}s)",
                  flush=True)
            with cf.ThreadPoolExecutor(max_workers=max(1, len(crashes))) as pool:
                logs = dict(zip(crashes, pool.map(lambda c: gdb_backtrace(c, args.out, min(args.gdb_timeout, left)),
                                                   crashes)))
            for c, log in logs.items():
                results[c]["gdb"] = os.path.basename(log)
                results[c]["backtrace"] = _bt_lines(log)

    ordered = [results[c] for c, _ in cases] + skipped
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"have_gpu": have_gpu, "dry_run": bool(args.dry_run), "seconds": round(time.time() - t_start, 1),
                   "cases": ordered}, f, indent=1)

    counts = {}
    for r in ordered:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    table = [f"{r['case']:<24} {r['name']:<12} {r['status']:<14} {r['detail'][:150]}" for r in ordered]
    for r in ordered:
        for ln in r.get("backtrace", []):
            table.append(f"    {r['case']} bt| {ln[:200]}")
    table.append("probe summary: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                 + f" in {time.time() - t_start:.0f}s"
                 + ("" if have_gpu else f" (no CUDA cases: {gpu_reason}; the crash is {SELFTEST}, on purpose)"))
    with open(os.path.join(args.out, "probe.txt"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table), flush=True)

    ran = [r for r in ordered if r["status"] != "skipped"]
    if have_gpu:
        return 0 if all(r["status"] == "ok" for r in ran) else 1
    # dry run: the controls raise, and the deliberate segfault is seen as a crash
    controls_ok = all(r["status"] == "ok" for r in ran if r["case"] != SELFTEST)
    selftest_ok = SELFTEST not in results or results[SELFTEST]["status"] == "crash"
    return 0 if controls_ok and selftest_ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="probe_out", help="directory for probe.json, probe.txt, gdb_*.txt")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="processes at a time")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds for the whole probe (cuda-gdb included)")
    ap.add_argument("--case-timeout", type=float, default=60.0, help="seconds per case process")
    ap.add_argument("--gdb-timeout", type=float, default=90.0, help="seconds per cuda-gdb rerun")
    ap.add_argument("--max-gdb", type=int, default=3, help="crashing cases rerun under cuda-gdb, at most")
    ap.add_argument("--dry-run", action="store_true", help="no CUDA cases: controls + a deliberate crash")
    ap.add_argument("--only", default=None, help="comma list of case ids (cuda:1,control:torch_view,...)")
    ap.add_argument("--list", action="store_true", help="print the case ids and argument names, then exit")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child mode: run one case in this process
    args = ap.parse_args(argv)
    if args.case:
        return child(args.case)
    if args.list:
        for c in CONTROLS:
            print(c)
        for i, n in enumerate(cuda_case_names()):
            print(f"cuda:{i:<3} {n}")
        print(SELFTEST)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
