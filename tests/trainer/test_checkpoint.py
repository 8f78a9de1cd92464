"""Checkpoints: optimizer/RNG round trips, atomic saves, and resume after SIGKILL == the uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lpc import checkpoint as ckpt_lib
from lpc import model as model_lib
from lpc.config import ConfigError, TrainConfig
from lpc.evaluate import main as evaluate_main
from lpc.train import main, train
from tests.helpers import REPO
from tests.helpers.runs import TINY_ARGS, assert_same_metrics, read_jsonl

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False, num_codes=4)


def test_optimizer_state_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    groups = [{"params": list(net[0].parameters()), "lr": 1e-2}, {"params": list(net[1].parameters()), "lr": 3e-3}]
    opt = torch.optim.AdamW(groups, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    tensors, meta = ckpt_lib.optimizer_to_tensors(opt.state_dict())
    save_file(tensors, str(tmp_path / "o.safetensors"))
    restored = ckpt_lib.optimizer_from_tensors(load_file(str(tmp_path / "o.safetensors")),
                                               json.loads(json.dumps(meta)))
    net2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW([{"params": list(net2[0].parameters())}, {"params": list(net2[1].parameters())}])
    opt2.load_state_dict(restored)
    assert opt2.param_groups[1]["lr"] == 3e-3 and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    x = torch.randn(5, 3)
    for o, n in ((opt, net), (opt2, net2)):  # one more step from the same state gives the same weights
        o.zero_grad()
        n(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_rng_state_roundtrip():
    tensors, info = ckpt_lib.capture_rng()
    want = (torch.rand(3), random.random(), np.random.rand())
    ckpt_lib.restore_rng(tensors, json.loads(json.dumps(info)))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    cfg = TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, save_every=2, keep_checkpoints=0,
                      output_dir=str(tmp_path / "run"), cache_dir=cache_dir, **TINY)
    train(cfg)
    good = tmp_path / "run" / "checkpoints" / "step-00000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def boom():  # fails after the model, heads and optimizer files are already in the temp directory
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_lib, "capture_rng", boom)
    from lpc.train import setup
    from lpc.train_components import Checkpointer

    checkpointer = Checkpointer(setup(TrainConfig(**{**cfg.to_dict(), "resume": "latest", "steps": 4})))
    with pytest.raises(ckpt_lib.CheckpointError, match="disk full"):
        checkpointer.save(2)  # overwriting step 2 fails half-way
    with pytest.raises(ckpt_lib.CheckpointError, match="disk full"):
        checkpointer.save(4)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no temp dirs, no step 4
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    state = ckpt_lib.read_state(good)
    assert state["step"] == 2 and state["data"]["position"] == 2


def test_checkpoint_contents_and_pruning(tmp_path, cache_dir):
    train(TrainConfig(steps=6, batch_size=4, num_train=16, eval_size=4, save_every=2, keep_checkpoints=2,
                      output_dir=str(tmp_path), cache_dir=cache_dir, **TINY))
    found = ckpt_lib.list_checkpoints(tmp_path)
    assert [s for s, _ in found] == [4, 6]  # step 2 pruned
    ck = found[-1][1]
    for name in ("model.safetensors", "config.json", "lpc_heads.safetensors", "lpc_config.json", "tokenizer.json",
                 "optimizer.safetensors", "rng_state.safetensors", "trainer_state.json", "train_config.json"):
        assert (ck / name).is_file(), name
    assert not list(ck.glob("*.bin")) and not list(ck.glob("*.pt"))  # nothing pickled
    state = ckpt_lib.read_state(ck)
    # 16 pairs / 4 per step = 4 batches per epoch: after 6 steps, epoch 1, position 2
    assert state["step"] == 6 and state["data"]["epoch"] == 1 and state["data"]["position"] == 2
    assert state["scheduler"]["last_epoch"] == 6
    # the saved policy equals the final one (same step): loaded with safetensors only
    from safetensors.torch import load_file

    a, b = load_file(str(ck / "model.safetensors")), load_file(str(tmp_path / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_run(tmp_path, cache_dir):
    base = dict(steps=2, batch_size=4, num_train=16, eval_size=4, save_every=2, output_dir=str(tmp_path),
                cache_dir=cache_dir, **TINY)
    train(TrainConfig(**base))
    with pytest.raises(ConfigError, match=r"resume: .*lr=0.003.*this run has lr=0.01"):
        train(TrainConfig(**{**base, "lr": 1e-2, "resume": "latest", "steps": 4}))
    with pytest.raises(ConfigError, match="no such directory"):
        train(TrainConfig(**{**base, "resume": str(tmp_path / "missing")}))


def test_resume_verifies_the_checkpoint_once_and_reads_old_configs(tmp_path, cache_dir, monkeypatch, capsys):
    """The command line reads the checkpoint's settings and the run resumes from it: its manifest is hashed once.
    A train_config.json of an older version (``filter_eps``, since removed, at 0) still works as ``--config``; the
    removed setting at any other value is refused by name."""
    run = tmp_path / "run"
    train(TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, save_every=2, output_dir=str(run),
                      cache_dir=cache_dir, **TINY))
    old = {**json.loads((run / "train_config.json").read_text()), "filter_eps": 0.0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    verified = []
    real = ckpt_lib.verify_manifest
    monkeypatch.setattr(ckpt_lib, "verify_manifest", lambda path: verified.append(path) or real(path))
    monkeypatch.setattr(model_lib, "verify_manifest", lambda path: verified.append(path) or real(path))
    out = main(["--config", str(tmp_path / "old.json"), "--resume", "latest", "--steps", "3"])
    assert out["resumed_from"] is not None and len(read_jsonl(run / "metrics.jsonl")) == 3
    assert verified == [run / "checkpoints" / "step-00000002"]
    verified.clear()  # lpc.evaluate too: once for the checkpoint it picks, once for final/ (loaded, not picked)
    evaluate_main(["--run", str(run), "--checkpoint", "latest", "--no-plots"])
    evaluate_main(["--run", str(run), "--no-plots"])
    assert verified == [run / "checkpoints" / "step-00000002", run / "final"]
    (tmp_path / "bad.json").write_text(json.dumps({**old, "filter_eps": 1e-3}))
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "bad.json")])
    assert "--filter-eps: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match="filter_eps: config: filter_eps=0.001: this setting was removed"):
        TrainConfig.from_dict({"filter_eps": 1e-3})
    assert TrainConfig.from_dict({"filter_eps": 0.0, "steps": 5}).steps == 5
    assert TrainConfig.from_dict({"filter_eps": 1e-3, "steps": 5}, ignore_unknown=True).steps == 5  # lpc.evaluate


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, cache_dir):
    out = train(TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, resume="latest",
                            output_dir=str(tmp_path), cache_dir=cache_dir, **TINY))
    assert out["resumed_from"] is None and len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


# The killed process runs the real CLI; a wrapper only makes step 7 wait (so the kill lands mid-training
# after the step-4 checkpoint, with metrics lines 5 and 6 already written past it).
_KILLABLE = """
import sys, time
import lpc.train as t
step_fn = t.train_step
def gated(tr, step):
    if step == 6:
        time.sleep(600)
    return step_fn(tr, step)
t.train_step = gated
t.main(sys.argv[1:])
"""


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, cache_dir):
    """Under --deterministic the resumed run is the uninterrupted one bit for bit: metrics and final weights."""
    args = ["--steps", "10", "--batch-size", "4", "--num-train", "24", "--eval-size", "8", "--seed", "3",
            "--save-every", "4", "--cache-dir", cache_dir, "--eval-every", "5", "--deterministic", *TINY_ARGS]
    main(args + ["--output-dir", str(tmp_path / "full")])

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *args, "--output-dir", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 6 and \
                    ckpt_lib.latest_checkpoint(run) is not None:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached step 6")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists() and len(read_jsonl(run / "metrics.jsonl")) == 6
    assert [s for s, _ in ckpt_lib.list_checkpoints(run)] == [4]

    res = subprocess.run([sys.executable, "-m", "lpc.train", *args, "--output-dir", str(run), "--resume", "latest"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 4" in res.stderr
    assert_same_metrics(read_jsonl(run / "metrics.jsonl"), read_jsonl(tmp_path / "full" / "metrics.jsonl"), 0.0)
    assert_same_metrics(read_jsonl(run / "eval.jsonl"), read_jsonl(tmp_path / "full" / "eval.jsonl"), 0.0)
    a = json.loads((run / "eval.json").read_text())
    b = json.loads((tmp_path / "full" / "eval.json").read_text())
    for k in ("accuracy", "reward_margin", "loss", "prior_entropy"):
        assert a[k] == b[k], k
    for name in ("model.safetensors", "lpc_heads.safetensors"):  # bit for bit
        assert (run / "final" / name).read_bytes() == (tmp_path / "full" / "final" / name).read_bytes(), name
