"""Nothing lost, nothing unexplained: verified checkpoints, faults during a save (full disk, read-only directory,
SIGKILL at several points of the save), one run per output directory, and data errors as one-line errors or
skipped rows. ``docs/reliability.md`` lists each case with its test."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lpc import checkpoint as ckpt_lib
from lpc.config import ConfigError, TrainConfig
from lpc.data import DataError, load_preference_rows
from lpc.data import rows as rows_lib
from lpc.evaluate import main as evaluate_main
from lpc.io import DirectoryInUse, DirectoryLock, IntegrityError, verify_manifest, write_manifest
from lpc.train import main, train
from tests.helpers import REPO
from tests.helpers.runs import TINY_ARGS, assert_same_metrics, read_jsonl

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False, num_codes=4)
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _args(cache_dir, steps=4):
    return ["--steps", str(steps), "--batch-size", "4", "--num-train", "16", "--eval-size", "4", "--seed", "2",
            "--save-every", "2", "--keep-checkpoints", "0", "--cache-dir", cache_dir, *TINY_ARGS]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A 4-step run with checkpoints at steps 2 and 4 (kept), and its metrics."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main(_args(cache_dir) + ["--output-dir", str(run)])
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ manifests
def test_manifest_catches_truncation_corruption_and_missing_files(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"0123456789")
    (d / "sub" / "b.json").write_text("{}")
    write_manifest(d)
    assert verify_manifest(d) is True
    listed = json.loads((d / "manifest.json").read_text())["files"]
    assert sorted(listed) == ["a.bin", "sub/b.json"] and listed["a.bin"]["size"] == 10
    (d / "a.bin").write_bytes(b"01234")
    with pytest.raises(IntegrityError, match=r"a\.bin: 5 bytes, the manifest says 10 \(truncated"):
        verify_manifest(d)
    (d / "a.bin").write_bytes(b"0123456780")  # same size, one byte changed
    with pytest.raises(IntegrityError, match=r"a\.bin: contents differ from the manifest's checksum"):
        verify_manifest(d)
    (d / "a.bin").unlink()
    with pytest.raises(IntegrityError, match=r"a\.bin: missing"):
        verify_manifest(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"manifest\.json: unreadable manifest"):
        verify_manifest(d)
    (d / "manifest.json").unlink()
    assert verify_manifest(d) is False  # written before manifests existed: nothing to check


def test_checkpoints_and_final_carry_a_manifest(finished_run):
    for _, path in ckpt_lib.list_checkpoints(finished_run):
        files = json.loads((path / "manifest.json").read_text())["files"]
        assert {"model.safetensors", "optimizer.safetensors", "rng_state.safetensors", "trainer_state.json",
                "lpc_heads.safetensors"} <= set(files)
        assert verify_manifest(path)
    assert verify_manifest(finished_run / "final")


@pytest.mark.parametrize("damage", ["truncate-model", "garbage-optimizer", "broken-state"])
def test_resume_latest_skips_a_damaged_checkpoint(finished_run, tmp_path, cache_dir, damage):
    run = _copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "step-00000004"
    if damage == "truncate-model":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "garbage-optimizer":
        f = newest / "optimizer.safetensors"
        f.write_bytes(os.urandom(f.stat().st_size))
    else:
        f = newest / "trainer_state.json"
        f.write_text("{\n")
    shutil.rmtree(run / "final")
    res = _cli("-m", "lpc.train", *_args(cache_dir), "--output-dir", str(run), "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipped checkpoint step-00000004: {f}" in res.stderr
    assert "resumed from" in res.stderr and "at step 2" in res.stderr
    assert_same_metrics(read_jsonl(run / "metrics.jsonl"), read_jsonl(finished_run / "metrics.jsonl"), 1e-6)


def test_named_or_all_damaged_checkpoints_are_one_line_errors(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    for _, path in ckpt_lib.list_checkpoints(run):
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
    named = run / "checkpoints" / "step-00000002"
    for argv, needle in [(["-m", "lpc.train", *_args(cache_dir), "--output-dir", str(run), "--resume", str(named)],
                          f"{named / 'model.safetensors'}: "),
                         (["-m", "lpc.train", *_args(cache_dir), "--output-dir", str(run), "--resume", "latest"],
                          "no intact checkpoint under"),
                         (["-m", "lpc.evaluate", "--run", str(run), "--checkpoint", "latest", "--no-plots"],
                          "no intact checkpoint under")]:
        res = _cli(*argv)
        assert res.returncode == 2, res.stderr[-2000:]
        assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "truncated or rewritten" in res.stderr


def test_checkpoints_without_a_manifest_still_load(finished_run, tmp_path, cache_dir):
    """Checkpoints written before the manifest existed: resume and evaluate as before."""
    run = _copy(finished_run, tmp_path)
    for _, path in ckpt_lib.list_checkpoints(run):
        (path / "manifest.json").unlink()
    shutil.rmtree(run / "final")
    (run / "checkpoints" / "step-00000004").rename(run / "checkpoints" / "gone")  # resume from step 2
    res = _cli("-m", "lpc.train", *_args(cache_dir), "--output-dir", str(run), "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_metrics(read_jsonl(run / "metrics.jsonl"), read_jsonl(finished_run / "metrics.jsonl"), 1e-6)


def test_evaluate_latest_skips_a_damaged_checkpoint(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    f = run / "checkpoints" / "step-00000004" / "lpc_heads.safetensors"
    f.write_bytes(b"\0" * f.stat().st_size)
    res = evaluate_main(["--run", str(run), "--checkpoint", "latest", "--no-plots", "--output", str(tmp_path / "ev")])
    assert f"skipped checkpoint step-00000004: {f}" in capsys.readouterr().err
    assert res["num_pairs"] == 4


# ------------------------------------------------------------------------------- faults in a save
def _full_disk(real):
    def write(*args, **kwargs):
        real(*args, **kwargs)  # a partial file is on disk when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_full_disk_during_a_save_stops_with_a_clear_error_and_leaves_nothing(tmp_path, cache_dir, monkeypatch):
    base = dict(steps=4, batch_size=4, num_train=16, eval_size=4, save_every=2, output_dir=str(tmp_path / "run"),
                cache_dir=cache_dir, seed=2, **TINY)
    calls = []
    real = ckpt_lib.save_file

    def save_file(*args, **kwargs):  # the second checkpoint's optimizer file hits a full disk
        calls.append(args[1])
        (_full_disk(real) if len(calls) == 3 else real)(*args, **kwargs)

    monkeypatch.setattr(ckpt_lib, "save_file", save_file)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"cannot write checkpoint .*step-00000004: No space left on "
                                                         r"device \(ENOSPC\); what it wrote was removed, the newest "
                                                         r"checkpoint is .*step-00000002"):
        train(TrainConfig(**base))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no temp directory left
    ckpt_lib.verify_checkpoint(root / "step-00000002")
    assert not (tmp_path / "run" / ".lock").read_text()  # the lock was released


def test_full_disk_is_a_one_line_cli_error(tmp_path, cache_dir):
    script = ("import errno, os, sys\nimport lpc.checkpoint as c\n"
              "def boom(*a, **k):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "c.save_file = boom\nimport lpc.train as t\nt.main(sys.argv[1:])\n")
    res = _cli("-c", script, *_args(cache_dir, steps=2), "--output-dir", str(tmp_path / "run"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "No space left on device (ENOSPC)" in res.stderr.splitlines()[-1]
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_directory_is_a_clear_error(tmp_path, cache_dir):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.chmod(run / "checkpoints", 0o555)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match="cannot write checkpoint .*Permission denied"):
            train(TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, save_every=2, output_dir=str(run),
                              cache_dir=cache_dir, **TINY))
    finally:
        os.chmod(run / "checkpoints", 0o755)


def test_read_only_directory_via_a_failing_mkdtemp(tmp_path, cache_dir, monkeypatch):
    """The read-only case as root sees it: creating the temp directory fails with EROFS."""
    import lpc.io as io_lib

    def mkdtemp(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    base = dict(steps=2, batch_size=4, num_train=16, eval_size=4, save_every=2, output_dir=str(tmp_path / "run"),
                cache_dir=cache_dir, **TINY)
    monkeypatch.setattr(io_lib.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"Read-only file system \(EROFS\).*the newest checkpoint is "
                                                         r"none"):
        train(TrainConfig(**base))


# The save is killed (SIGKILL) in the middle, at the n-th call of one of its writers; the resumed run must find
# the previous checkpoint intact and finish exactly as the uninterrupted run.
_KILL_IN_SAVE = """
import os, signal, sys
import lpc.checkpoint as c, lpc.model as m, lpc.io as io
where, nth = sys.argv[1], int(sys.argv[2])
mod, name = {"model": (m, "save_file"), "optimizer": (c, "save_file"), "state": (c, "write_json_atomic"),
             "manifest": (c, "write_manifest"), "rename": (io.os, "replace")}[where]
real, calls = getattr(mod, name), [0]
def killing(*a, **k):
    calls[0] += where != "rename" or str(a[-1]).endswith("step-00000004")  # rename: the checkpoint's own
    if calls[0] == nth:
        if where in ("model", "optimizer"):
            real(*a, **k)  # the file is written, the save is not finished
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(mod, name, killing)
import lpc.train as t
t.main(sys.argv[3:])
"""


@pytest.mark.parametrize("where,nth", [("model", 2), ("optimizer", 3), ("state", 2), ("manifest", 2),
                                       ("rename", 1)])
def test_kill_during_a_save_keeps_the_previous_checkpoint(finished_run, tmp_path, cache_dir, where, nth):
    run = tmp_path / "run"
    args = _args(cache_dir) + ["--output-dir", str(run)]
    res = _cli("-c", _KILL_IN_SAVE, where, str(nth), *args)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    # the step-4 save died: only the step-2 checkpoint is a checkpoint, nothing half-written is picked
    assert [s for s, _ in ckpt_lib.list_checkpoints(run)] == [2], list((run / "checkpoints").iterdir())
    assert ckpt_lib.newest_intact_checkpoint(run)[0].name == "step-00000002"
    res = _cli("-m", "lpc.train", *args, "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2" in res.stderr
    assert_same_metrics(read_jsonl(run / "metrics.jsonl"), read_jsonl(finished_run / "metrics.jsonl"), 1e-6)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers removed


# ------------------------------------------------------------------------------ one run per directory
def test_a_second_run_on_the_same_directory_refuses(tmp_path, cache_dir):
    run = tmp_path / "run"
    gate = tmp_path / "gate"
    script = ("import sys, time, pathlib\nimport lpc.train as t\nstep = t.train_step\n"
              "def slow(tr, s):\n    pathlib.Path(sys.argv[1]).touch()\n    time.sleep(600)\n"
              "t.train_step = slow\nt.main(sys.argv[2:])\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(gate), *_args(cache_dir), "--output-dir", str(run)],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not gate.exists():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        res = _cli("-m", "lpc.train", *_args(cache_dir), "--output-dir", str(run))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"is in use by another run: pid {first.pid} on " in res.stderr
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    # the holder died (SIGKILL): its lock is taken over
    out = train(TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, output_dir=str(run),
                            cache_dir=cache_dir, **TINY))
    assert out["rank"] == 0


def test_lock_is_exclusive_between_processes_and_taken_over_when_stale(tmp_path):
    d = tmp_path / "run"
    lock = DirectoryLock(d).acquire()
    assert DirectoryLock(d).acquire() is lock  # re-entrant within a process
    code = "import sys; from lpc.io import DirectoryLock; DirectoryLock(sys.argv[1]).acquire()"
    res = _cli("-c", code, str(d))
    assert res.returncode != 0 and f"DirectoryInUse: {d.resolve()} is in use by another run: pid {os.getpid()}" in \
        res.stderr
    lock.release()
    lock.release()
    assert _cli("-c", code, str(d)).returncode == 0  # free again
    (d / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "then"}))  # a dead holder
    taken = DirectoryLock(d).acquire()
    assert taken.previous == {"pid": 999999, "host": "elsewhere", "started": "then"}
    taken.release()
    with pytest.raises(DirectoryInUse):  # and a live one in another process refuses this one
        proc = subprocess.Popen([sys.executable, "-c", code + "; print('held', flush=True); import time; "
                                 "time.sleep(60)", str(d)], cwd=REPO, env=ENV, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"held"
            DirectoryLock(d).acquire()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_lock_refusal_is_a_config_error_in_train(tmp_path, cache_dir):
    d = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from lpc.io import DirectoryLock; "
                             "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                             str(d)], cwd=REPO, env=ENV, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        with pytest.raises(ConfigError, match="output_dir: .* is in use by another run"):
            train(TrainConfig(steps=1, batch_size=4, num_train=16, eval_size=4, output_dir=str(d),
                              cache_dir=cache_dir, **TINY))
        assert not (d / "train_config.json").exists()  # refused before writing anything
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------------- data errors
def _row(i):
    return json.dumps({"prompt": f"question {i}", "chosen": "good", "rejected": "bad"})


def test_undecodable_and_overlong_rows_are_skipped_and_counted(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    long_row = json.dumps({"prompt": "x" * 300, "chosen": "a", "rejected": "b"})
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    f.write_bytes(b"\n".join([_row(0).encode(), bad, long_row.encode(), _row(3).encode()]) + b"\n")
    monkeypatch.setattr(rows_lib, "MAX_ROW_BYTES", 200)
    rows, stats = load_preference_rows(f)
    assert [r["prompt"] for r in rows] == ["question 0", "question 3"]
    assert stats.skipped["not UTF-8"] == 1 and stats.skipped["row too long"] == 1
    at = bad.index(b"\xe9")
    assert stats.first_errors[0][0] == f"{f}:2" and f"byte {at} of the line" in stats.first_errors[0][1]
    assert "1 not UTF-8, 1 row too long" in stats.summary()
    with pytest.raises(DataError, match=f"{f}:2: not UTF-8"):
        load_preference_rows(f, strict=True)


def test_undecodable_json_array_names_file_and_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(DataError, match=f"{f}:3: not UTF-8"):
        load_preference_rows(f)


def test_directory_and_unreadable_files_are_one_line_errors(tmp_path, cache_dir, monkeypatch):
    d = tmp_path / "data.jsonl"
    d.mkdir()
    res = _cli("-m", "lpc.train", *_args(cache_dir, steps=1), "--dataset", str(d), "--output-dir",
               str(tmp_path / "run"))
    assert res.returncode == 2 and "is a directory" in res.stderr and "Traceback" not in res.stderr
    f = tmp_path / "d.jsonl"
    f.write_text(_row(0) + "\n")
    real_open = open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(DataError, match=f"{f}: cannot read \\(Permission denied\\)"):
        load_preference_rows(f)
    g = tmp_path / "d.parquet"
    g.write_bytes(b"not parquet at all")
    monkeypatch.setattr("builtins.open", real_open)
    with pytest.raises(DataError, match=f"{g}: cannot read as parquet"):
        load_preference_rows(g)


# ----------------------------------------------------------------------------------------- determinism
def test_determinism_switches_on_and_restores(monkeypatch):
    import torch

    from lpc.runtime import determinism

    monkeypatch.setenv("LPC_TRITON_LINEAR_BWD", "atomic")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with determinism(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["LPC_TRITON_LINEAR_BWD"] == "split" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before
    assert os.environ["LPC_TRITON_LINEAR_BWD"] == "atomic" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with determinism(False):
        assert os.environ["LPC_TRITON_LINEAR_BWD"] == "atomic"
