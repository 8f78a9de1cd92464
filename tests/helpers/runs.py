"""What the tests of training runs share: tiny-model flags and readers/comparators of a run's JSONL files."""

import json

import pytest

# the smallest model the trainer builds, as command-line flags
TINY_ARGS = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--threads", "1", "--no-progress",
             "--num-codes", "4"]
WALL_CLOCK_KEYS = ("tokens_per_s",)  # metrics that depend on the machine's speed, not on the run


def read_jsonl(path):
    """Every line of a JSON Lines file (a blank or cut line is an error)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_same_metrics(a, b, tol):
    """Two runs' metrics rows: the same steps, the same keys, every value but the wall-clock ones equal to
    ``tol`` (relative and absolute)."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if k not in WALL_CLOCK_KEYS:
                assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (x["step"], k, x[k], y[k])
