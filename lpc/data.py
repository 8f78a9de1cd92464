"""Preference data: loading (JSONL / JSON / Parquet / ``datasets``), validation, tokenisation, collation.

Rows have ``prompt`` / ``chosen`` / ``rejected`` as strings, or the UltraFeedback-binarized layout where
``chosen`` / ``rejected`` are chat-message lists ``[{"role", "content"}, ...]`` whose last message is the
answer and whose earlier messages are the conversation (the prompt). A ``prompt`` given as a message list
(TRL's conversational layout, answers then hold only the assistant turn) works too. An optional
``source`` column (any string or int: annotator, sub-dataset) is kept for per-source evaluation.

Malformed rows (missing field, empty answer, chosen == rejected, non-string content, ...) are skipped and
counted (``LoadStats.summary()`` is the one-line report), or raise ``ValueError`` with ``strict=True``.

Batch layout (``PreferenceCollator``), ``B`` pairs, ``T`` = longest sequence in the batch::

    chosen_input_ids / rejected_input_ids     [B, T] int64  prompt + answer + eos, right-padded with pad_id
    chosen_attention_mask / rejected_...      [B, T] int64  1 on real tokens
    chosen_labels / rejected_labels           [B, T] int64  the token id on answer tokens, -100 on prompt and
                                                            padding; aligned with input_ids (HF convention):
                                                            the model predicts labels[:, t] from position t-1
    prompt_lengths                            [B]    int64  prompt tokens (shared by both sequences)
    chosen_lengths / rejected_lengths         [B]    int64  answer tokens, eos included (= labels != -100)
    source                                    [B]    int64  source id, -1 when unknown
    index                                     [B]    int64  position of the pair in its dataset (-1: unknown)

Both sequences of a pair are padded to the same ``T`` so the model can run them as one ``[2B, T]`` pass
(padding only, no packing: every sequence starts at position 0 and pads are masked out).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# reasons a row is skipped, in the order the summary lists them
REASONS = ("invalid JSON", "not an object", "missing field", "non-string content", "bad message list",
           "empty prompt", "empty answer", "chosen == rejected", "prompts differ")


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


def normalize_row(row: Any) -> dict:
    """Validate one raw row; returns ``{"prompt": str, "messages": [...], "chosen", "rejected", "source"}``.

    ``messages`` is the conversation before the answer (for chat templates); ``prompt`` its plain-text
    form (the ``prompt`` string when the row has one). ``source`` is the raw value or ``None``.

    Raises:
        MalformedRow: missing field, non-string content, empty prompt or answer, chosen == rejected, or
            chosen and rejected conversations that differ before the answer.
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
    elif prompt is None:
        if not hist_c:
            raise MalformedRow("missing field", "no 'prompt' and no conversation before the answers")
        messages = hist_c
        text = _prompt_text(messages)
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
    return {"prompt": text, "messages": messages, "chosen": chosen, "rejected": rejected, "source": source}


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


def _looks_local(spec: str) -> bool:
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
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if suffix == ".json" and text.lstrip().startswith(("[", "{")) and not _is_json_lines(text):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); expected a list of rows or JSON Lines") from None
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list)")
            data = lists[0]
        for i, row in enumerate(data):
            yield f"{path}:row {i}", row
        return
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                yield f"{path}:{i + 1}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{i + 1}", MalformedRow("invalid JSON", str(exc))


def _is_json_lines(text: str) -> bool:
    """True when the text is several JSON values, one per line (a ``.json`` file may be either)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        json.loads(lines[0])
        return True
    except json.JSONDecodeError:
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


def load_preference_rows(spec: os.PathLike | str, *, split: str = "train",
                         strict: bool = False) -> tuple[list[dict], LoadStats]:
    """Load and validate preference rows from a local file or a ``datasets`` name.

    Args:
        spec: ``.jsonl`` (JSON Lines), ``.json`` (a list of rows, or JSON Lines), ``.parquet``, or a
            Hugging Face dataset name (needs ``datasets``).
        split: the split of a named dataset (e.g. ``train_prefs`` for UltraFeedback-binarized).
        strict: raise on the first malformed row instead of skipping it.

    Returns:
        ``(rows, stats)``: the normalised rows (``normalize_row``) and what was skipped.

    Raises:
        FileNotFoundError: a local path that does not exist. ValueError: unsupported file type, unreadable
        file, no usable rows, or (``strict``) a malformed row, naming its location.
    """
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset must be a non-empty path or dataset name, got {spec!r}")
    if _looks_local(spec):
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
            rows.append(normalize_row(raw))
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


# ------------------------------------------------------------------------------------------ tokenising
@dataclass
class TokenizedPair:
    """Token ids of one pair: ``prompt`` (with BOS / chat template), answers ending with EOS."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: int
    index: int = -1


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: Optional[int] = None, bos: Optional[int] = None):
    """Apply the truncation rule; returns ``(prompt, chosen, rejected, truncated)``.

    The prompt keeps its last ``max_prompt_length`` tokens (default ``max_length // 2``; a leading BOS is
    kept as the first of them), then each answer keeps its first ``max_length - len(prompt)`` tokens, so
    ``len(prompt) + len(answer) <= max_length``. The prompt is cut only when it is too long by itself
    or the pair does not fit; the end of the prompt (next to the answer) is what the answer depends on most.
    """
    limit = max_prompt_length if max_prompt_length is not None else max_length // 2
    longest = max(len(chosen), len(rejected))
    truncated = False
    if (max_prompt_length is not None and len(prompt) > max_prompt_length) or \
            (len(prompt) + longest > max_length and len(prompt) > limit):
        truncated = True
        if bos is not None and prompt and prompt[0] == bos and limit >= 2:
            prompt = [bos] + prompt[len(prompt) - (limit - 1):]
        else:
            prompt = prompt[len(prompt) - limit:]
    room = max_length - len(prompt)
    if len(chosen) > room or len(rejected) > room:
        truncated = True
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected, truncated


class PreferenceDataset(torch.utils.data.Dataset):
    """Pre-tokenised pairs (tokenising once up front keeps the training loop free of tokenizer calls).

    Prompt ids start with BOS when the tokenizer has one; with ``chat_template=True`` the prompt's
    conversation is rendered by the tokenizer's chat template with the generation prompt instead (the
    template adds BOS). Answer ids end with EOS. Long pairs are cut by ``truncate_pair``;
    ``num_truncated`` counts them. ``rows`` are normalised rows (``normalize_row``) or plain dicts with
    string ``prompt``/``chosen``/``rejected`` and an int ``source``.
    """

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int = 512, *, chat_template: bool = False,
                 max_prompt_length: Optional[int] = None):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}")
        self.rows = list(rows)
        self.pairs: list[TokenizedPair] = []
        self.num_truncated = 0
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer needs an eos token (answers end with it)")
        prompts = [row["prompt"] for row in self.rows]
        if chat_template:  # render each conversation + generation prompt; the template adds BOS
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat_template=True but the tokenizer has no chat template")
            prompts = [tokenizer.apply_chat_template(
                row.get("messages") or [{"role": "user", "content": row["prompt"]}], tokenize=False,
                add_generation_prompt=True) for row in self.rows]
            bos_prefix = None
        else:
            bos_prefix = bos

        backend = getattr(tokenizer, "backend_tokenizer", None)

        def enc(texts: list[str]) -> list[list[int]]:
            if not texts:
                return []
            if backend is not None:  # the Rust tokenizer's batch loop directly: ~2x faster than __call__
                return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

        chosen_ids = enc([row["chosen"] for row in self.rows])
        rejected_ids = enc([row["rejected"] for row in self.rows])
        for i, (row, prompt, chosen, rejected) in enumerate(zip(self.rows, enc(prompts), chosen_ids, rejected_ids)):
            prompt = ([bos_prefix] if bos_prefix is not None else []) + prompt
            prompt, chosen, rejected, cut = truncate_pair(prompt, chosen + [eos], rejected + [eos], max_length,
                                                          max_prompt_length, bos=bos)
            self.num_truncated += cut
            source = row.get("source", -1)
            source = -1 if source is None else source
            if isinstance(source, bool) or not isinstance(source, int):
                raise ValueError(f"row {i}: source must be an int id (map names with assign_source_ids first), "
                                 f"got {source!r}")
            self.pairs.append(TokenizedPair(prompt, chosen, rejected, source, i))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.pairs[i]

    def fingerprint(self) -> str:
        """SHA-256 of every pair's token ids: identifies the exact tokenised data (for caches)."""
        import hashlib

        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()


class PreferenceCollator:
    """Pads a list of ``TokenizedPair`` into the batch dict described in the module docstring."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("pad_token_id must be an int (set tokenizer.pad_token)")
        self.pad = int(pad_token_id)

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict:
        b = len(pairs)
        t = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
        out = {}
        for side in ("chosen", "rejected"):
            ids = torch.full((b, t), self.pad, dtype=torch.long)
            mask = torch.zeros((b, t), dtype=torch.long)
            labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
            for i, p in enumerate(pairs):
                answer = getattr(p, side)
                n_p, n = len(p.prompt), len(p.prompt) + len(answer)
                ids[i, :n] = torch.tensor(p.prompt + answer)
                mask[i, :n] = 1
                labels[i, n_p:n] = torch.tensor(answer)
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_labels"] = ids, mask, labels
            out[f"{side}_lengths"] = torch.tensor([len(getattr(p, side)) for p in pairs], dtype=torch.long)
        out["prompt_lengths"] = torch.tensor([len(p.prompt) for p in pairs], dtype=torch.long)
        out["source"] = torch.tensor([p.source for p in pairs], dtype=torch.long)
        out["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        return out


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- order
def _epoch_seed(seed: int, epoch: int) -> int:
    # a fixed odd-multiplier mix (not Python's hash): the order must be identical across processes
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


class EpochSampler:
    """Training order as a pure function of ``(seed, epoch)``, with a position counter.

    Each epoch is a fresh permutation from a generator seeded by ``(seed, epoch)``, cut into
    ``len // batch_size`` full batches (the remainder is dropped, so every step has ``batch_size``
    pairs). ``state_dict()`` is ``{"epoch", "position"}``; restoring it resumes the exact order, and the
    order does not depend on how many processes or micro-batches consume it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_items < batch_size:
            raise ValueError(f"dataset has {num_items} pairs, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = num_items // batch_size
        self.epoch, self.position = 0, 0
        self._perm: Optional[list[int]] = None

    def order(self, epoch: int) -> list[int]:
        """The permutation of epoch ``epoch``."""
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def next_indices(self) -> list[int]:
        """The dataset indices of the next global batch; advances the position."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self.order(self.epoch)
        s = self.position * self.batch_size
        self.position += 1
        return self._perm[s:s + self.batch_size]

    @property
    def epoch_float(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.epoch + self.position / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.n,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "batch_size", "seed"):
            mine = {"num_items": self.n, "batch_size": self.batch_size, "seed": self.seed}[key]
            if state.get(key, mine) != mine:
                raise ValueError(f"data position was saved for {key}={state[key]}, this run has {mine}")
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None


def batches(dataset: PreferenceDataset, batch_size: int, collator: PreferenceCollator) -> Iterator[dict]:
    """One ordered pass over ``dataset`` in batches of ``batch_size`` (the last may be shorter)."""
    n = len(dataset)
    for s in range(0, n, batch_size):
        yield collator([dataset[i] for i in range(s, min(s + batch_size, n))])
