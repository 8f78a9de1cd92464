"""What the ``python -m lpc.*`` command lines share, and the training command line itself.

``build_parser`` generates one ``--flag`` per ``TrainConfig`` field from the field's type, default and metadata
(help, group, choices: ``lpc.config.setting``), plus ``--config``. ``parse_command_line`` layers the settings:
explicit flags > the resumed checkpoint's config > the ``--config`` file > defaults; a config file's values
are checked like the flags (``read_config_file``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from . import checkpoint as ckpt_lib
from .config import GROUPS, ConfigError, TrainConfig, drop_removed_settings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with ``(default: X)`` after each flag, unless its help text already says the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def _flag_type(annotation) -> type:
    """``int`` for ``int`` and ``Optional[int]``, and so on: the type argparse converts a flag's value to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lpc.train`` argument parser: one flag per ``TrainConfig`` field, plus ``--config``."""
    p = argparse.ArgumentParser(
        prog="python -m lpc.train", formatter_class=HelpFormatter,
        description="Train a Latent Preference Coding (LPC) policy with DPO / IPO / SimPO. With no arguments: "
                    "LPC-DPO on synthetic preference data with a tiny random-init Llama on CPU.")
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of settings (keys: flag names, with - or _); flags given on the command "
                        "line override it. A run's train_config.json is such a file (default: none)")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    types = typing.get_type_hints(TrainConfig)
    # in --help order: by group (the LPC fields, inherited from LPCConfig, come first in the dataclass)
    for f in sorted(dataclasses.fields(TrainConfig), key=lambda f: GROUPS.index(f.metadata["group"])):
        flag, typ = "--" + f.name.replace("_", "-"), _flag_type(types[f.name])
        kwargs: dict[str, Any] = dict(default=f.default, help=f.metadata["help"])
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        elif typ is not str:
            kwargs["type"] = typ
        groups[f.metadata["group"]].add_argument(flag, **kwargs)
    return p


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """A config-file value checked (and converted) like the flag would be."""
    flag = action.option_strings[0]
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(action.dest, f"{where}: {flag} cannot be null")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(action.dest, f"{where}: {flag} must be true or false, got {value!r}")
        return value
    typ = action.type or str
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        if not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            raise ConfigError(action.dest, f"{where}: {flag} must be an integer, got {value!r}")
    if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ConfigError(action.dest, f"{where}: {flag} must be a number, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(action.dest, f"{where}: {flag} must be a string, got {value!r}")
    try:
        value = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(action.dest, f"{where}: {flag} must be {typ.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(action.dest, f"{where}: {flag} must be one of {list(action.choices)}, got {value!r}")
    return value


def read_config_file(path: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Settings from a YAML (``.yaml``/``.yml``) or JSON file, keyed by ``TrainConfig`` field name.

    Keys may use ``-`` or ``_``; values are checked like the flags. Raises ``ConfigError`` naming the
    key for unknown keys (with a suggestion) and bad values, ``ValueError`` for unreadable files.
    """
    parser = parser or build_parser()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("config", f"file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("config", f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use a "
                                        ".json config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid JSON: {exc}") from None
    else:
        raise ConfigError("config", f"{path}: expected a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    actions = _actions_by_dest(parser)
    out = {}
    for key, value in drop_removed_settings(data, str(path)).items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError("config", f"{path}: unknown setting {key!r}{hint}")
        out[dest] = _coerce(actions[dest], value, str(path))
    return out


class CommandLine(NamedTuple):
    """A parsed ``lpc.train`` command line: the config, and the checkpoint ``--resume`` names, verified once
    (``None`` without one)."""

    config: TrainConfig
    resume: Optional[ckpt_lib.ResumePoint]


def parse_command_line(argv: Optional[Sequence[str]] = None) -> CommandLine:
    """Flags -> ``CommandLine``. Precedence: explicit flags > the resumed checkpoint's config > ``--config``
    file > defaults. Bad values exit with ``python -m lpc.train: error: --flag: ...``."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--resume", "--output-dir"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    layered: dict = {}
    point = None
    try:
        if known.config:
            layered.update(read_config_file(known.config, parser))
        resume = known.resume or layered.get("resume")
        if resume:
            actions = _actions_by_dest(parser)
            output_dir = known.output_dir or layered.get("output_dir")
            point = ckpt_lib.resume_point(resume, output_dir)
            inherited = ckpt_lib.inherited_settings(point, output_dir)
            layered.update({k: v for k, v in inherited.items() if k in actions})
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")
    except ValueError as exc:
        parser.error(str(exc))
    parser.set_defaults(**layered)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return CommandLine(TrainConfig(**args), point)
    except ConfigError as exc:
        parser.error(f"{exc.flag}: {exc.message}")


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The ``TrainConfig`` of an ``lpc.train`` command line (``parse_command_line``)."""
    return parse_command_line(argv).config
