"""Multi-process jobs for the ``distributed`` tests: spawn, bound by a timeout, never leave a process behind."""

import time

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
