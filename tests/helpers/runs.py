"""What the tests of training runs share: tiny-model flags and readers/comparators of a run's JSONL files."""

import json

import pytest

# the smallest model the trainer builds, as command-line flags
TINY_ARGS = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--threads", "1", "--no-progress",
             "--num-codes", "4"]
WALL_CLOCK_KEYS = ("tokens_per_s",)  # metrics that depend on the machine's speed, not on the run

# Runs (or steps) that differ only in the order of their sums -- processes, thread counts, batch layouts,
# micro-batch splits, and the CPU's own kernels (ATEN_CPU_CAPABILITY, another vendor) -- are compared in float64
# (``--dtype float64``, or models in ``.double()``). A sum of n terms taken in another order moves by at most
# (n - 1) u sum|x_i|, u = 2^-53: <= 1.1e-12 of the terms' magnitude for n <= 1e4. (HF's RMSNorm computes in float32
# even in a float64 model; the same float64 input rounds to the same float32 value, so it adds a float32 ulp only
# where the two runs' inputs straddle a rounding boundary: rarely, and by 2^-24 relative.) Over a few steps the
# metrics, smooth functions of weights and data, stay orders of magnitude below RUN_TOL, while a real difference (a
# dropped pair, a rank's gradient counted twice) moves them by > 1e-3. In float32 (u = 2^-24) the same bound is
# 5e8 times larger, which is why float32 runs failed at 1e-5 on another CPU. Single weights after AdamW steps are
# the exception: where a gradient cancels to rounding level, Adam's normalised step can differ by up to lr
# (tests/trainer/test_distributed_train.py checks weights with that bound).
RUN_TOL = 1e-6
FLOAT64_ARGS = ["--dtype", "float64"]


def read_jsonl(path):
    """Every line of a JSON Lines file (a blank or cut line is an error)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_same_metrics(a, b, tol=RUN_TOL):
    """Two runs' metrics rows: the same steps, the same keys, every value but the wall-clock ones equal to
    ``tol`` (relative and absolute)."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if k not in WALL_CLOCK_KEYS:
                assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (x["step"], k, x[k], y[k])
