"""Multi-process jobs for the ``distributed`` tests: spawn, bound by a timeout, never leave a process behind.

A job runs every case on every rank in ONE spawn (process start-up and imports dominate the cost): each rank
records each case's verdict (``"ok"``, ``"skipped: ..."`` or its traceback) in ``rank{r}.json`` as it goes;
the pytest process reads the files back and gives one test per case its verdict.
"""

import json
import os
import time
import traceback

import pytest
import torch.multiprocessing as mp


def run_spawned(fn, args, nprocs, timeout_s):
    """Start ``fn(rank, *args)`` in ``nprocs`` spawned processes; raise (and kill them) past ``timeout_s``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"distributed job still running after {timeout_s} s: killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------------------ in a spawned rank
def run_cases(rank, out_dir, runs, after_each=None):
    """Run ``runs``, ``(name, run, skip reason or None)`` each, recording every verdict in
    ``out_dir/rank{rank}.json`` (rewritten atomically after each case): ``"skipped: <reason>"``, the string
    ``run()`` returns, ``"ok"`` for any other return, or the traceback of what it raised. ``after_each()``
    runs after every case, failed or not (e.g. a barrier: a failed case must not leave the other rank inside
    a collective of the next one)."""
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for name, run, skip in runs:
        started = time.perf_counter()
        if skip is not None:  # must be the same on every rank: no rank enters a collective another skips
            results[name] = f"skipped: {skip}"
        else:
            try:
                outcome = run()
                results[name] = outcome if isinstance(outcome, str) else "ok"
            except Exception:  # recorded per case; the tests report it
                results[name] = traceback.format_exc()
        if after_each is not None:
            after_each()
        results[name + ".seconds"] = round(time.perf_counter() - started, 2)
        with open(path + ".tmp", "w") as fh:
            json.dump(results, fh)
        os.replace(path + ".tmp", path)
    return results


# -------------------------------------------------------------------------------- in the pytest process
def run_job(fn, args, world, timeout_s, out_dir):
    """``run_spawned(fn, args, world, timeout_s)``, then what each rank recorded in ``out_dir``: returns
    ``({rank: {case: verdict}}, job error or None)``; a rank that wrote nothing has ``{}``."""
    error = None
    try:
        run_spawned(fn, args, world, timeout_s)
    except Exception as exc:  # reported by every test, with what the ranks recorded before it
        error = f"{type(exc).__name__}: {exc}"
    results = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as fh:
                results[r] = json.load(fh)
        else:
            results[r] = {}
    return results, error


def check_verdict(job, case):
    """Fail unless every rank ran ``case`` and recorded ``"ok"``; skip if a rank recorded it skipped."""
    results, error = job
    verdicts = {r: rows.get(case) for r, rows in results.items()}
    if any(v is None for v in verdicts.values()):
        pytest.fail(f"case {case} did not run on every rank ({verdicts}); job error: {error}")
    for r, v in verdicts.items():
        if v.startswith("skipped"):
            pytest.skip(v)
        assert v == "ok", f"rank {r}, case {case}:\n{v}"
