"""Training checkpoints (``<run>/checkpoints/step-N/``: model, heads, optimizer, RNG and trainer state): save, find,
verify and load them with safetensors and JSON only (nothing is unpickled), and the rules of a resumed run. A save goes
to a temp directory renamed into place, ``manifest.json`` (each file's size and SHA-256) written last; the faults this
survives: ``docs/reliability.md``, "Checkpoints" and "Faults during a save"."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from safetensors.torch import save_file

from .config import RESUME_FREE, RESUME_LAUNCH, ConfigError, TrainConfig
from .io import (IntegrityError, atomic_directory, read_safetensors, remove_stale_temps, verify_manifest,
                 write_json_atomic, write_manifest, write_text_atomic)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
FORMAT = "lpc-checkpoint-v1"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(IntegrityError):
    """A checkpoint that cannot be written or used; the message names the file and what is wrong with it."""


def checkpoint_name(step: int) -> str:
    """``step-00000050``: zero-padded so names sort by step."""
    return f"step-{step:08d}"


def list_checkpoints(run_dir: os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: os.PathLike) -> Optional[Path]:
    """The newest checkpoint of a run (verified or not), or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def verify_checkpoint(path: os.PathLike) -> None:
    """Raise ``CheckpointError`` naming the file when the checkpoint at ``path`` fails its manifest or its
    ``trainer_state.json`` cannot be read (checkpoints without a manifest are only checked for the latter)."""
    verify_manifest(path)
    read_state(path)


def newest_intact_checkpoint(run_dir: os.PathLike) -> tuple[Optional[Path], list[str]]:
    """``(the newest checkpoint that passes verify_checkpoint, notes on the newer ones skipped)``; ``(None, [])``
    when the run has no checkpoint. Raises ``CheckpointError`` when it has some and none is intact."""
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except IntegrityError as exc:
            skipped.append(f"skipped checkpoint {path.name}: {exc}")
    if skipped:
        raise CheckpointError(f"no intact checkpoint under {Path(run_dir) / CHECKPOINTS_DIR} (newest: "
                              f"{skipped[0].split(': ', 1)[1]})")
    return None, []


def resolve_resume(spec: str, output_dir: Optional[os.PathLike]) -> tuple[Optional[Path], list[str]]:
    """The checkpoint directory ``--resume`` names, verified, with notes on the checkpoints skipped.

    ``"latest"``: the newest intact checkpoint under ``output_dir`` (``None`` when there is none yet, so a job
    script can always pass ``--resume latest``). A checkpoint directory: itself. A run directory: its
    newest intact checkpoint.

    Raises:
        ValueError: ``latest`` without ``output_dir``; a path that is neither a checkpoint nor a run with one.
        CheckpointError: the named checkpoint fails verification, or no checkpoint of the run is intact.
    """
    if spec == "latest":
        if output_dir is None:
            raise ValueError("--resume latest needs --output-dir (the run directory to look in)")
        return newest_intact_checkpoint(output_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"--resume {spec!r}: no such directory (pass a checkpoint directory, a run directory, "
                         "or 'latest' with --output-dir)")
    if (path / STATE_FILE).is_file():
        verify_checkpoint(path)
        return path, []
    found, notes = newest_intact_checkpoint(path)
    if found is None:
        raise ValueError(f"--resume {spec!r}: not a checkpoint (no {STATE_FILE}) and no checkpoints under "
                         f"{path / CHECKPOINTS_DIR}")
    return found, notes


def run_dir_of(checkpoint: os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step-N`` -> ``<run>``)."""
    return Path(checkpoint).resolve().parent.parent


# ------------------------------------------------------------------------------------------ optimizer
def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``state/<param>/<name>``) and a JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG the training step could draw from (dropout, any library code)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = st
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    info = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    py = info["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------- save / load
def is_peft(policy) -> bool:
    return hasattr(policy, "peft_config") and hasattr(policy, "disable_adapter")


def save_checkpoint(run_dir: os.PathLike, step: int, *, model, tokenizer, optimizer, scheduler, sampler_state: dict,
                    extra_state: dict, config: dict, keep: int = 0, model_state_dict: Optional[dict] = None,
                    optimizer_state_dict: Optional[dict] = None) -> Path:
    """Write ``<run>/checkpoints/step-N`` atomically, then delete all but the newest ``keep`` (0: keep all).

    ``model_state_dict`` / ``optimizer_state_dict``: full states gathered from an FSDP2-sharded run
    (``lpc.distributed.full_state_dict`` / ``full_optimizer_state_dict``), written instead of the model's and
    optimizer's own (shards); called on rank 0 only. Returns the checkpoint path.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    path = root / checkpoint_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)  # leftovers of a save that was killed
        with atomic_directory(path) as tmp:  # an exception removes tmp: nothing half-written stays
            model.write_files(tmp, tokenizer, {"train_config.json": config}, state_dict=model_state_dict)
            tensors, meta = optimizer_to_tensors(optimizer_state_dict or optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format": FORMAT, "meta": json.dumps(meta)})
            rng_tensors, rng_info = capture_rng()
            save_file(rng_tensors, str(tmp / RNG_FILE), metadata={"format": FORMAT})
            state = {"format": FORMAT, "step": step, "scheduler": scheduler.state_dict(), "data": sampler_state,
                     "rng": rng_info, "peft": is_peft(model.policy), "config": config, **extra_state}
            write_json_atomic(tmp / STATE_FILE, state)
            write_manifest(tmp)  # last: it vouches for everything above
    except OSError as exc:
        prev = latest_checkpoint(run_dir)
        code = f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}{code}; what it wrote was "
                              f"removed, the newest checkpoint is {prev if prev is not None else 'none'}") from exc
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_state(path: os.PathLike) -> dict:
    """``trainer_state.json`` of a checkpoint; ``CheckpointError`` naming the file when it cannot be read."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: unknown checkpoint format {got!r} (expected {FORMAT})")
    return state


def _load_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from None
        out = {}
        for shard in shards:
            out.update(read_safetensors(directory / shard))
        return out
    raise FileNotFoundError(f"{directory}: no model.safetensors (or model.safetensors.index.json)")


def load_policy_weights(policy, directory: os.PathLike) -> None:
    """Load the policy weights of a checkpoint into ``policy`` (in place, any dtype/device).

    Full models: every tensor of the HF-layout safetensors; keys missing from the file must be tied to a
    loaded one (``save_pretrained`` drops tied duplicates such as a tied LM head). LoRA: the adapter.
    """
    directory = Path(directory)
    if is_peft(policy):
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(policy, read_safetensors(directory / "adapter_model.safetensors"))
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"{directory}: adapter has keys this model lacks: {unexpected[:5]}")
        return
    sd = _load_hf_state_dict(directory)
    missing, unexpected = policy.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"{directory}: checkpoint has weights this model lacks: {unexpected[:5]}")
    params = dict(policy.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    untied = [k for k in untied if k in params]  # buffers (e.g. rotary inv_freq) are rebuilt by the model
    if untied:
        raise ValueError(f"{directory}: checkpoint lacks weights {untied[:5]}")


def load_model_state(path: os.PathLike, model, *, state: Optional[dict] = None) -> dict:
    """Restore the policy weights and the codebook / heads of ``model`` from ``path``; returns its
    ``trainer_state.json`` (``state``: that file as ``read_state`` already returned it). (Data-parallel runs
    load these before wrapping the model: FSDP2 then shards them.)"""
    path = Path(path)
    state = read_state(path) if state is None else state
    if state.get("peft", False) != is_peft(model.policy):
        raise ValueError(f"{path}: checkpoint {'has' if state.get('peft') else 'has no'} LoRA adapter, this run "
                         f"{'uses' if is_peft(model.policy) else 'does not use'} LoRA (--lora-r)")
    load_policy_weights(model.policy, path)
    if model.lpc is not None:
        model.load_heads(path)
    return state


def load_training_state(path: os.PathLike, *, optimizer, scheduler, prepare_optimizer_state=None,
                        state: Optional[dict] = None) -> dict:
    """Restore optimizer and scheduler from ``path``; returns its ``trainer_state.json`` (``state``: that
    file as ``read_state`` already returned it).

    ``prepare_optimizer_state``: maps the saved state dict (the 1-process layout, full tensors) before
    ``optimizer.load_state_dict``; FSDP2 runs cut each tensor to their parameter's shard with it.
    """
    path = Path(path)
    state = read_state(path) if state is None else state
    tensors, metadata = read_safetensors(path / OPTIM_FILE, with_metadata=True)
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / OPTIM_FILE}: no optimizer metadata ({exc})") from None
    sd = optimizer_from_tensors(tensors, meta)
    optimizer.load_state_dict(prepare_optimizer_state(sd) if prepare_optimizer_state is not None else sd)
    scheduler.load_state_dict(state["scheduler"])
    return state


def load_rng(path: os.PathLike, state: dict) -> None:
    """Restore the global RNG states saved with the checkpoint at ``path``."""
    restore_rng(read_safetensors(Path(path) / RNG_FILE), state["rng"])


# ---------------------------------------------------------------------------------------------- resume
class ResumePoint(NamedTuple):
    """A verified checkpoint to resume from: its directory, its ``trainer_state.json`` and notes on the newer
    checkpoints skipped (``resume_point``)."""

    checkpoint: Path
    state: dict
    notes: list


def resume_point(spec: str, output_dir: Optional[os.PathLike]) -> Optional[ResumePoint]:
    """The checkpoint ``--resume spec`` names (``resolve_resume``: its manifest verified), or ``None`` for ``latest``
    without a checkpoint yet. Verifying hashes every file: resolve once per start and pass the result on."""
    path, skipped = resolve_resume(spec, output_dir)
    return None if path is None else ResumePoint(path, read_state(path), skipped)


def find_resume(cfg: TrainConfig, point: Optional[ResumePoint] = None
                ) -> tuple[Optional[Path], Optional[dict], Optional[Path], list[str]]:
    """``(checkpoint, its trainer_state.json, run directory, notes)`` for ``cfg.resume``; the checkpoint and
    state are ``None`` without ``--resume`` (or with ``latest`` and no checkpoint yet: a fresh start), the run
    directory ``None`` when neither ``--output-dir`` nor a checkpoint names it. ``point``: ``cfg.resume`` already
    resolved (``resume_point``; the command line does it to read the checkpoint's settings).

    Raises:
        ConfigError: ``--resume`` names nothing usable, or a checkpoint whose settings differ from ``cfg`` in a
            setting a resumed run may not change.
    """
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if not cfg.resume:
        return None, None, out_dir, []
    if point is None:
        try:
            point = resume_point(cfg.resume, out_dir)
        except ValueError as exc:  # CheckpointError included
            raise ConfigError("resume", str(exc)) from None
    if point is None:
        return None, None, out_dir, [f"--resume latest: no checkpoint under {out_dir}, starting from step 0"]
    notes = point.notes + check_resume_compatible(cfg, point.state["config"], point.checkpoint)
    return point.checkpoint, point.state, out_dir or run_dir_of(point.checkpoint), notes


def inherited_settings(point: Optional[ResumePoint], output_dir: Optional[str]) -> dict:
    """The settings a run resumed from ``point`` takes from its checkpoint (all but the launch ones), with the run
    directory; ``{}`` without a checkpoint (``latest`` before the first one)."""
    if point is None:
        return {}
    launch = TrainConfig.fields_with(RESUME_LAUNCH)
    saved = {k: v for k, v in point.state["config"].items() if k not in launch}
    return {**saved, "output_dir": output_dir or str(run_dir_of(point.checkpoint))}


def check_resume_compatible(cfg: TrainConfig, saved: dict, path: Path) -> list[str]:
    """Raise on settings that would make the resumed run a different run; return notes on free ones."""
    now = cfg.to_dict()
    free = TrainConfig.fields_with(RESUME_FREE) | TrainConfig.fields_with(RESUME_LAUNCH)
    bad = [k for k in now if k not in free and k in saved and saved[k] != now[k]]
    if bad:
        raise ConfigError("resume", f"{path} was trained with " + ", ".join(
            f"{k}={saved[k]!r}" for k in bad) + "; this run has " + ", ".join(f"{k}={now[k]!r}" for k in bad)
            + ". Resume with the checkpoint's settings, or start a new run (another --output-dir)")
    notes = []
    if saved.get("steps") != cfg.steps:
        notes.append(f"steps changed {saved.get('steps')} -> {cfg.steps}: the learning-rate schedule and the "
                     "prior mix follow the new total from here")
    return notes


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of a metrics file with ``step <= max_step`` (what a killed run wrote after its last
    checkpoint is redone by the resumed run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))
