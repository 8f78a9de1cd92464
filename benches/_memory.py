"""Peak CPU memory of one (op, implementation, shape) in a fresh process.

A script, not a library: ``_common.measure_memory`` runs it in a fresh Python per implementation and
shape, and reads the JSON line it prints. Usage::

    python benches/_memory.py <bench module> <impl> <shape id>

The child builds the same inputs and case as the benchmark, runs one forward + backward as a warm-up
(compilation, first-call allocations), then one measured forward + backward:

* ``fwd``: peak RSS during the forward minus RSS just before it (the inputs are already resident);
* ``bwd``: peak RSS during the backward minus RSS just before it (the forward's saved graph is resident);
* ``fwd_bwd``: the peak over both minus RSS before the forward.

Peak RSS is ``VmHWM`` from ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0). The parent pins glibc's mmap threshold to 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed
tensors go back to the OS instead of staying in the heap, where they would hide the growth of a later call.
tracemalloc is not used: it does not see tensors (they are not allocated through Python's allocator).
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list) -> None:
    module, impl, shape_id = argv
    sys.path[:0] = [HERE, ROOT]
    import torch

    import _common

    mod = __import__(module)
    shape = _common.shape_by_id(mod.SHAPES, shape_id)
    torch.manual_seed(0)
    inputs = mod.make_inputs(shape)
    case = mod.build(impl, shape, inputs)
    # warm-up: compile / first-call allocations, then let everything transient go
    out = case.forward()
    case.backward(out)
    del out
    case.zero_grad()
    gc.collect()
    if not _reset_peak():
        raise SystemExit("cannot reset peak RSS (/proc/self/clear_refs not writable)")
    base = _status_kib("VmRSS")
    out = case.forward()
    peak_fwd = _status_kib("VmHWM")
    _reset_peak()
    base2 = _status_kib("VmRSS")
    case.backward(out)
    peak_bwd = _status_kib("VmHWM")
    kib = 1024
    result = {"fwd": (peak_fwd - base) * kib, "bwd": (peak_bwd - base2) * kib,
              "fwd_bwd": (max(peak_fwd, peak_bwd) - base) * kib,
              "method": "peak RSS growth (VmHWM after clear_refs) in a fresh process"}
    sys.stdout.write(_common.MEMORY_RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
