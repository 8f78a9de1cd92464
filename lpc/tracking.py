"""Experiment tracking for ``python -m lpc.train --report-to``: TensorBoard event files and Weights & Biases,
fed the rows ``metrics.jsonl`` and ``eval.jsonl`` get, under the same names (held-out ones prefixed ``eval/``).

Both work offline: TensorBoard writes event files under ``<run>/tensorboard``; W&B runs in offline mode
(``<run>/wandb``, ``wandb sync`` uploads it later) unless ``WANDB_MODE`` says otherwise. The hyperparameters are
logged once, at the start. Both packages are optional; asking for a missing one is a ``ConfigError`` naming the
package, raised before the model is built.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Optional

from .config import ConfigError

TENSORBOARD_DIR = "tensorboard"


def trackers_of(report_to: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` -> ``[]``."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _require(name: str, module: str, pip: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError("report_to", f"{name} needs the {pip} package: pip install {pip} (or pip install "
                                       "'lpc-kernels[tracking]')") from None


def check_trackers(report_to: str) -> None:
    """Raise ``ConfigError`` when a tracker's package is missing (before anything is built)."""
    for name in trackers_of(report_to):
        if name == "tensorboard":
            _require(name, "torch.utils.tensorboard", "tensorboard")
        elif name == "wandb":
            _require(name, "wandb", "wandb")


class Trackers:
    """The trackers of one run (rank 0 only). ``log(metrics, step)`` sends every number of a metrics row;
    ``close()`` flushes them."""

    def __init__(self, report_to: str, run_dir: os.PathLike, config: dict, *, resumed: bool = False):
        run_dir = Path(run_dir)
        self.tensorboard = self.wandb_run = None
        names = trackers_of(report_to)
        if "tensorboard" in names:
            tb = _require("tensorboard", "torch.utils.tensorboard", "tensorboard")
            self.tensorboard = tb.SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if "wandb" in names:
            wandb = _require("wandb", "wandb", "wandb")
            os.environ.setdefault("WANDB_MODE", "offline")
            # one W&B run per run directory, continued on resume
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lpc-kernels"), name=run_dir.name,
                                        id=_wandb_id(run_dir), dir=str(run_dir), config=config,
                                        resume="allow" if resumed else None)

    def log(self, row: dict, step: int, prefix: str = "") -> None:
        numbers = {prefix + k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for k, v in numbers.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: Path) -> Optional[str]:
    """A W&B run id kept in ``<run>/wandb_id.txt``, so a resumed run continues the same W&B run."""
    f = run_dir / "wandb_id.txt"
    if f.is_file():
        return f.read_text().strip() or None
    run_id = secrets.token_hex(4)
    f.write_text(run_id + "\n")
    return run_id
