"""Preference rows: loading (JSONL / JSON / Parquet / ``datasets``), validation and source ids. Rows hold
``prompt`` / ``chosen`` / ``rejected`` as strings or as chat-message lists (UltraFeedback-binarized, TRL's
conversational layout), an optional ``source`` and an optional user id (``user_field``); malformed rows are skipped and
counted (``LoadStats``), or raise ``DataError`` with ``strict=True``."""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# reasons a row is skipped, in the order the summary lists them
REASONS = ("invalid JSON", "not UTF-8", "row too long", "not an object", "missing field", "non-string content",
           "bad message list", "empty prompt", "empty answer", "chosen == rejected", "prompts differ", "no user")
MAX_ROW_BYTES = 64 * 2**20  # a JSON Lines row longer than this is skipped ("row too long"), never parsed


class DataError(ValueError):
    """A dataset that cannot be used as given (unreadable file, no usable rows, a bad row under --strict)."""


class MalformedRow(ValueError):
    """A row that cannot be a preference pair; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --------------------------------------------------------------------------------------- normalising
def _check_messages(value, name: str) -> list[dict]:
    if not value:
        raise MalformedRow("bad message list", f"{name} is an empty message list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "content" not in m:
            raise MalformedRow("bad message list", f"{name}[{i}] is not a {{'role', 'content'}} message")
        if not isinstance(m["content"], str):
            raise MalformedRow("non-string content", f"{name}[{i}].content is {type(m['content']).__name__}")
        role = m.get("role", "user")
        if not isinstance(role, str):
            raise MalformedRow("bad message list", f"{name}[{i}].role is {type(role).__name__}")
        out.append({"role": role, "content": m["content"]})
    return out


def _answer(value, name: str) -> tuple[Optional[list[dict]], str]:
    """``(history | None, answer)`` from a string or a message list whose last message is the answer."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, list):
        msgs = _check_messages(value, name)
        return msgs[:-1], msgs[-1]["content"]
    raise MalformedRow("non-string content", f"{name} is {type(value).__name__}, expected a string or a "
                                             "list of chat messages")


def _prompt_text(messages: Sequence[dict]) -> str:
    """Plain-text prompt for tokenizers without a chat template: the user message, or the transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen answer, rejected answer)`` of a row whose two texts carry the prompt: the prompt is their
    common prefix, and a space just before the split goes with the answers (as TRL's ``extract_prompt`` does).

    Raises:
        MalformedRow: the texts share no prefix (no prompt to take).
    """
    n, most = 0, min(len(chosen), len(rejected))
    while n < most and chosen[n] == rejected[n]:
        n += 1
    if n < most and n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise MalformedRow("missing field", "no 'prompt', and chosen and rejected share no prefix to take as the "
                                            "prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(row: Any, *, user_field: str = "user", require_user: bool = False) -> dict:
    """Validate one raw row; returns ``{"prompt": str, "messages": [...], "chosen", "rejected", "source", "user",
    "conversational"}`` (``conversational``: the row came as message lists).

    ``messages`` is the conversation before the answer (for chat templates); ``prompt`` its plain-text
    form (the ``prompt`` string when the row has one). ``source`` is the raw value or ``None``; ``user`` the raw
    value of the row's ``user_field`` (a string or int), ``None`` when missing or empty (``user_id``).

    Raises:
        MalformedRow: missing field, non-string content, empty prompt or answer, chosen == rejected,
            chosen and rejected conversations that differ before the answer, or (``require_user``) no user id.
    """
    if not isinstance(row, dict):
        raise MalformedRow("not an object", f"row is {type(row).__name__}, expected an object")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise MalformedRow("missing field", f"no {key!r}")
    hist_c, chosen = _answer(row["chosen"], "chosen")
    hist_r, rejected = _answer(row["rejected"], "rejected")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = _check_messages(prompt, "prompt") + (hist_c or [])
        text = _prompt_text(messages)
    elif isinstance(prompt, str):
        text = prompt
        messages = hist_c if hist_c else [{"role": "user", "content": prompt}]
    elif prompt is None and hist_c:
        messages = hist_c
        text = _prompt_text(messages)
    elif prompt is None:  # an implicit prompt (TRL's extract_prompt): the text the two answers share
        text, chosen, rejected = split_implicit_prompt(chosen, rejected)
        messages = [{"role": "user", "content": text}]
    else:
        raise MalformedRow("non-string content", f"prompt is {type(prompt).__name__}")
    if hist_c is not None and hist_r is not None and hist_c != hist_r:
        raise MalformedRow("prompts differ", "chosen and rejected conversations differ before the answer")
    if not text.strip():
        raise MalformedRow("empty prompt", "the prompt is empty")
    for name, ans in (("chosen", chosen), ("rejected", rejected)):
        if not ans.strip():
            raise MalformedRow("empty answer", f"{name} answer is empty")
    if chosen == rejected:
        raise MalformedRow("chosen == rejected", "both answers are the same text")
    source = row.get("source")
    if source is not None and (isinstance(source, bool) or not isinstance(source, (str, int))):
        raise MalformedRow("non-string content", f"source is {type(source).__name__}, expected a string or int")
    user = user_id(row, user_field)
    if user is None and require_user:
        raise MalformedRow("no user", f"no {user_field!r} (or an empty one)")
    conversational = isinstance(prompt, list) or hist_c is not None  # given as message lists (TRL's term)
    return {"prompt": text, "messages": messages, "chosen": chosen, "rejected": rejected, "source": source,
            "user": user, "conversational": conversational}


def user_id(row: dict, user_field: str = "user"):
    """The user id of a raw row: its ``user_field`` as a string or int; ``None`` when missing, ``None`` or a blank
    string (a row without a user).

    Raises:
        MalformedRow: the field holds anything else (a float, a bool, a list ...).
    """
    user = row.get(user_field)
    if isinstance(user, str) and not user.strip():
        return None
    if user is not None and (isinstance(user, bool) or not isinstance(user, (str, int))):
        raise MalformedRow("non-string content", f"{user_field} is {type(user).__name__}, expected a string or int "
                                                 "user id")
    return user


# ------------------------------------------------------------------------------------------- loading
@dataclass
class LoadStats:
    """What loading a dataset kept and skipped."""

    name: str
    total: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    first_errors: list = field(default_factory=list)  # (location, message) of the first few skipped rows

    def summary(self) -> str:
        """One line, e.g. ``data: x.jsonl: 30 rows, 27 used, 3 skipped (1 empty answer, 2 missing field)``."""
        n_skip = sum(self.skipped.values())
        line = f"data: {self.name}: {self.total} rows, {self.kept} used"
        if n_skip:
            parts = [f"{self.skipped[r]} {r}" for r in REASONS if self.skipped[r]]
            line += f", {n_skip} skipped ({', '.join(parts)}; --strict to stop at the first)"
        return line


def looks_local(spec: str) -> bool:
    """``spec`` names a local file (a path, or a name with a data-file suffix), not a ``datasets`` hub name."""
    p = Path(spec).expanduser()
    return (p.exists() or p.suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))
            or spec.count("/") > 1 or os.sep != "/" and os.sep in spec)


def _iter_local(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, raw row | MalformedRow)`` for each row of a local file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # ArrowIOError / ArrowInvalid
            raise DataError(f"{path}: cannot read as parquet ({exc})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
        return
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if suffix == ".json" and data.lstrip().startswith((b"[", b"{")) and not _is_json_lines(data):
        try:
            parsed = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 (byte {exc.start} of the file: {exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); expected a list of rows or JSON Lines") from None
        if isinstance(parsed, dict):  # {"data": [...]} / {"train": [...]} wrappers
            lists = [v for v in parsed.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list)")
            parsed = lists[0]
        for i, row in enumerate(parsed):
            yield f"{path}:row {i}", row
        return
    for i, raw in enumerate(data.split(b"\n")):  # one row per line; each decoded on its own
        if not raw.strip():
            continue
        loc = f"{path}:{i + 1}"
        if len(raw) > MAX_ROW_BYTES:
            yield loc, MalformedRow("row too long", f"{len(raw)} bytes, more than {MAX_ROW_BYTES}")
            continue
        try:
            yield loc, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield loc, MalformedRow("not UTF-8", f"byte {exc.start} of the line: {exc.reason}")
        except json.JSONDecodeError as exc:
            yield loc, MalformedRow("invalid JSON", str(exc))


def _is_json_lines(data: bytes) -> bool:
    """True when the file is several JSON values, one per line (a ``.json`` file may be either)."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        json.loads(lines[0].decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"dataset {name!r} is not a local file ({'/'.join(LOCAL_SUFFIXES)}), and loading a "
                          "dataset by name needs the optional `datasets` package: pip install datasets "
                          "(or download the data and pass the .jsonl/.parquet path)") from None
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i}", row


def load_preference_rows(spec: os.PathLike | str, *, split: str = "train", strict: bool = False,
                         user_field: str = "user", require_user: bool = False) -> tuple[list[dict], LoadStats]:
    """Load and validate preference rows from a local file or a ``datasets`` name.

    Args:
        spec: ``.jsonl`` (JSON Lines), ``.json`` (a list of rows, or JSON Lines), ``.parquet``, or a
            Hugging Face dataset name (needs ``datasets``).
        split: the split of a named dataset (e.g. ``train_prefs`` for UltraFeedback-binarized).
        strict: raise on the first malformed row instead of skipping it.
        user_field: the column holding each row's user id (``normalize_row``'s ``user``).
        require_user: a row without a user id is malformed (``"no user"``: skipped and counted, or raised).

    Returns:
        ``(rows, stats)``: the normalised rows (``normalize_row``) and what was skipped.

    Raises:
        FileNotFoundError: a local path that does not exist. ValueError: unsupported file type, unreadable
        file, no usable rows, or (``strict``) a malformed row, naming its location.
    """
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset must be a non-empty path or dataset name, got {spec!r}")
    if looks_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset file {spec!r} does not exist")
        if path.is_dir():
            raise DataError(f"dataset {spec!r} is a directory; pass a {'/'.join(LOCAL_SUFFIXES)} file")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"dataset {spec!r}: unsupported file type {path.suffix!r}; expected one of "
                             f"{', '.join(LOCAL_SUFFIXES)}")
        source, name = _iter_local(path), str(path)
    else:
        source, name = _iter_hub(spec, split), f"{spec}[{split}]"
    stats = LoadStats(name)
    rows = []
    for loc, raw in source:
        stats.total += 1
        try:
            if isinstance(raw, MalformedRow):
                raise raw
            rows.append(normalize_row(raw, user_field=user_field, require_user=require_user))
        except MalformedRow as exc:
            if strict:
                raise DataError(f"{loc}: {exc} (strict mode: fix the row, or drop --strict to skip such rows)") \
                    from None
            stats.skipped[exc.reason] += 1
            if len(stats.first_errors) < 3:
                stats.first_errors.append((loc, str(exc)))
    stats.kept = len(rows)
    if not rows:
        hint = f" (first problems: {stats.first_errors})" if stats.first_errors else ""
        raise DataError(f"dataset {name} has no usable preference pairs: {stats.total} rows read{hint}")
    return rows, stats


def load_jsonl(path: os.PathLike) -> list[dict]:
    """Rows of a JSONL file (strict: any malformed row raises ``ValueError``). Kept for callers of the
    first version; ``load_preference_rows`` is the general loader."""
    return load_preference_rows(path, strict=True)[0]


def assign_user_ids(*row_lists: list[dict]) -> Optional[list[str]]:
    """Replace each row's raw ``user`` (string or int, ``None``: no user) by a dense int index (in place); returns the
    index -> name list, or ``None`` when no row has a user. One index space for all lists (train and held-out), so a
    held-out pair of a user seen in training has that user's index. Ints sort by value, otherwise ids sort by their
    string (``7`` and ``"7"`` are one user); rows without a user get -1."""
    raw = {r["user"] for rows in row_lists for r in rows if r.get("user") is not None}
    if all(isinstance(u, int) for u in raw):
        names = [str(u) for u in sorted(raw)]
    else:
        names = sorted({str(u) for u in raw})
    index = {name: i for i, name in enumerate(names)}
    for rows in row_lists:
        for r in rows:
            r["user"] = index[str(r["user"])] if r.get("user") is not None else -1
    return names or None


def assign_source_ids(*row_lists: list[dict]) -> Optional[list[str]]:
    """Replace each row's raw ``source`` by an int id (in place); returns the id -> name list, or ``None``
    when no row has a source. Ints keep their value (names ``str(i)``); strings get ids in sorted order;
    rows without one get -1. The ids are shared by all lists (train and held-out)."""
    raw = {r["source"] for rows in row_lists for r in rows if r.get("source") is not None}
    if not raw:
        for rows in row_lists:
            for r in rows:
                r["source"] = -1
        return None
    if all(isinstance(s, int) for s in raw):
        if min(raw) < 0:
            raise DataError(f"integer sources must be >= 0, got {min(raw)}")
        names = [str(i) for i in range(max(raw) + 1)]
        ids = {s: s for s in raw}
    else:
        names = sorted(str(s) for s in raw)
        ids = {s: names.index(str(s)) for s in raw}
    for rows in row_lists:
        for r in rows:
            r["source"] = ids[r["source"]] if r.get("source") is not None else -1
    return names
