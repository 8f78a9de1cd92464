"""``--report-to``: TensorBoard event files readable back with TensorBoard's own reader, W&B calls (through a
stand-in module, offline), the metric names of ``metrics.jsonl``, and clear errors for missing packages."""

from __future__ import annotations

import sys
import types

import pytest

from lpc.config import ConfigError, TrainConfig
from lpc.train import train
from tests.helpers.runs import read_jsonl

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False, num_codes=4)


def _cfg(tmp_path, cache_dir, **kw):
    return TrainConfig(steps=4, batch_size=4, num_train=16, eval_size=4, eval_every=2, output_dir=str(tmp_path / "run"),
                       cache_dir=cache_dir, **TINY, **kw)


def test_tensorboard_event_files_hold_the_metrics(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path, cache_dir, report_to="tensorboard"))
    run = tmp_path / "run"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = read_jsonl(run / "metrics.jsonl")
    for name in [k for k in rows[0] if k != "step"]:
        events = acc.Scalars(name)
        assert [e.step for e in events] == [r["step"] for r in rows], name
        assert [e.value for e in events] == pytest.approx([float(r[name]) for r in rows], rel=1e-6, abs=1e-6), name
    evals = read_jsonl(run / "eval.jsonl")
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [r["step"] for r in evals] + [4]  # + the final one
    assert acc.Tags()["tensors"] == ["config/text_summary"]  # the hyperparameters, once


class _FakeRun:
    def __init__(self, **kw):
        self.init, self.logged, self.finished = kw, [], False

    def log(self, row, step):
        self.logged.append((step, row))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_metrics_offline(tmp_path, cache_dir, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    import os

    train(_cfg(tmp_path, cache_dir, report_to="tensorboard,wandb"))
    (run,) = runs
    assert os.environ["WANDB_MODE"] == "offline" and run.finished
    assert run.init["config"]["steps"] == 4 and run.init["dir"] == str(tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train_logs = [(s, r) for s, r in run.logged if "loss" in r]
    assert [s for s, _ in train_logs] == [1, 2, 3, 4]
    assert set(train_logs[0][1]) == {k for k, v in rows[0].items() if k != "step"}
    assert any("eval/accuracy" in r for _, r in run.logged)
    assert (tmp_path / "run" / "tensorboard").is_dir()


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_tracker_package_is_a_config_error(tmp_path, cache_dir, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=f"report_to: {name} needs the .* package: pip install"):
        train(_cfg(tmp_path, cache_dir, report_to=name))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_report_to_none_writes_no_tracker_files(tmp_path, cache_dir):
    train(_cfg(tmp_path, cache_dir))
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()
    with pytest.raises(ConfigError, match="report_to: must be a comma-separated list of none, tensorboard, wandb"):
        TrainConfig(report_to="mlflow")
