"""Tokenised pairs (``PreferenceDataset``), the training order (``EpochSampler``; ``UserGroupedSampler`` for whole
users) and the batches of a batch layout
(``PreferenceCollator``): ``B`` pairs become ``R`` rows of ``L`` positions that the backbone runs as one ``[R, L]``
pass, with the same keys in every layout (``docs/design.md``, "Batch layouts")."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import torch

from ..config import BATCH_LAYOUTS
from .rows import assign_user_ids

IGNORE_INDEX = -100

# ------------------------------------------------------------------------------------------ tokenising
@dataclass
class TokenizedPair:
    """Token ids of one pair: ``prompt`` (with BOS / chat template), answers ending with EOS; ``user``: the user's
    index (``assign_user_ids``), -1 for none."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: int
    index: int = -1
    user: int = -1


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


class UnknownTokenShare(NamedTuple):
    """The share of a dataset's prompt tokens and of its answer tokens that are the tokenizer's unknown token."""

    prompt: float
    answer: float


class PreferenceDataset(torch.utils.data.Dataset):
    """Pre-tokenised pairs (tokenising once up front keeps the training loop free of tokenizer calls).

    Prompt ids start with BOS when the tokenizer has one; with ``chat_template=True`` the prompt's
    conversation is rendered by the tokenizer's chat template with the generation prompt instead (the
    template adds BOS); with ``conversational_only`` too, only for rows that came as message lists (TRL's
    rule). Answer ids end with EOS. Long pairs are cut by ``truncate_pair``; ``num_truncated`` counts them.
    ``rows`` are normalised rows (``normalize_row``) or plain dicts with string ``prompt``/``chosen``/``rejected``,
    an int ``source`` and optionally a ``user``: an int index (``assign_user_ids``, which shares the indices between
    the training and held-out rows; ``user_names`` names them), or raw ids, which are indexed here for these rows
    alone.
    """

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int = 512, *, chat_template: bool = False,
                 max_prompt_length: Optional[int] = None, conversational_only: bool = False,
                 user_names: Optional[Sequence[str]] = None):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}")
        self.rows = list(rows)
        users = [row.get("user") for row in self.rows]
        if user_names is None and any(isinstance(u, str) for u in users):  # raw ids (synthetic rows, say)
            indexed = [{"user": u} for u in users]
            user_names = assign_user_ids(indexed)
            users = [r["user"] for r in indexed]
        self.user_names = list(user_names) if user_names is not None else None
        self.pairs: list[TokenizedPair] = []
        self.num_truncated = 0
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer needs an eos token (answers end with it)")
        prompts = [row["prompt"] for row in self.rows]
        # rows rendered by the chat template (which adds BOS): all, or (conversational_only, as TRL does) only those
        # given as message lists
        templated = [chat_template and not (conversational_only and row.get("conversational") is False)
                     for row in self.rows]
        if chat_template:  # render each conversation + generation prompt
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat_template=True but the tokenizer has no chat template")
            prompts = [tokenizer.apply_chat_template(
                row.get("messages") or [{"role": "user", "content": row["prompt"]}], tokenize=False,
                add_generation_prompt=True) if use else row["prompt"] for row, use in zip(self.rows, templated)]

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
            prompt = ([bos] if bos is not None and not templated[i] else []) + prompt
            prompt, chosen, rejected, cut = truncate_pair(prompt, chosen + [eos], rejected + [eos], max_length,
                                                          max_prompt_length, bos=bos)
            self.num_truncated += cut
            source = row.get("source", -1)
            source = -1 if source is None else source
            if isinstance(source, bool) or not isinstance(source, int):
                raise ValueError(f"row {i}: source must be an int id (map names with assign_source_ids first), "
                                 f"got {source!r}")
            user = -1 if users[i] is None else users[i]
            if isinstance(user, bool) or not isinstance(user, int):
                raise ValueError(f"row {i}: user must be an int index (map ids with assign_user_ids first), "
                                 f"got {user!r}")
            self.pairs.append(TokenizedPair(prompt, chosen, rejected, source, i, user))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.pairs[i]

    @property
    def users(self) -> list[int]:
        """The user index of each pair (-1: none)."""
        return [p.user for p in self.pairs]

    def unknown_token_share(self, unk_id: Optional[int]) -> UnknownTokenShare:
        """The share of prompt tokens and of answer tokens (chosen and rejected) that are ``unk_id``, the tokenizer's
        unknown token (0 for a tokenizer without one); counted on the pairs as trained, special tokens included."""
        if unk_id is None:
            return UnknownTokenShare(0.0, 0.0)
        prompt = [t for p in self.pairs for t in p.prompt]
        answer = [t for p in self.pairs for side in (p.chosen, p.rejected) for t in side]
        return UnknownTokenShare(*(seq.count(unk_id) / len(seq) if seq else 0.0 for seq in (prompt, answer)))

    def fingerprint(self) -> str:
        """SHA-256 of every pair's token ids: identifies the exact tokenised data (for caches)."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()


# branch ids of the shared-prompt layout: a token attends to earlier tokens of its pair's prompt and its own branch
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of ``capacity`` tokens: the units (by index) of each row, in index order
    within a row; rows ordered by their first unit. Deterministic (ties broken by index)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


class PreferenceCollator:
    """Lays out a list of ``TokenizedPair`` as the rows of one backbone pass in its ``layout``:

    * ``padded``: ``R = 2B`` rows, the chosen sequences (prompt + answer + eos) first, then the rejected ones,
      right-padded to the longest (``L``).
    * ``packed``: the same ``2B`` sequences packed without padding into rows as long as the longest sequence
      (first-fit decreasing); each sequence attends only to itself and its positions restart at 0.
    * ``shared-prompt``: one unit ``[prompt | chosen | rejected]`` per pair, packed the same way; the rejected
      tokens attend to the prompt and to themselves, not to the chosen answer, and their positions restart at the
      prompt's end. The prompt is encoded once per pair.

    Every layout gives the same keys::

        layout            str                 the layout's name
        input_ids         [R, L]  int64       token ids, pad_id at padding
        position_ids      [R, L]  int64       position of each token in its own sequence (0 at padding)
        segment_ids       [R, L]  int64       unit of each token (sequence; pair for shared-prompt), -1 at padding
        branch_ids        [R, L]  int64       0 prompt, 1 chosen, 2 rejected (shared-prompt; 0 elsewhere)
        score_index       [N]     int64       flat position r * L + t of the hidden state predicting each scored token
        score_sequence    [N]     int64       its sequence: pair b's chosen answer is b, its rejected answer B + b
        score_target      [N]     int64       the scored (answer) token; sequences in order, tokens in order
        score_lengths     list    2B ints     scored positions per sequence (host values: lk.linear_preference_loss's
                                              sequence_lengths, so the loss op never reads the device)
        feature_index     [3, B]  int64       flat positions of h_x (last prompt token), h_w, h_l (last answer tokens)
        prompt_lengths    [B]     int64       prompt tokens (shared by both sequences)
        chosen_lengths / rejected_lengths [B] answer tokens, eos included
        source            [B]     int64       source id, -1 when unknown
        user              [B]     int64       user index (``assign_user_ids``), -1 when the pair has no user
        index             [B]     int64       position of the pair in its dataset (-1: unknown)
        num_tokens        int                 real tokens of prompt + chosen and prompt + rejected: the same work
                                              count in every layout (what ``tokens_per_s`` divides)

    The attention each layout needs is built from ``segment_ids`` / ``branch_ids`` by ``lpc.hf.attention_inputs``.

    Args:
        pad_token_id: the id written at padding positions (never attended to or scored).
        layout: ``"padded"``, ``"packed"`` or ``"shared-prompt"`` (``BATCH_LAYOUTS``).
    """

    def __init__(self, pad_token_id: int, layout: str = "padded"):
        if pad_token_id is None:
            raise ValueError("pad_token_id must be an int (set tokenizer.pad_token)")
        if layout not in BATCH_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(BATCH_LAYOUTS)}; got {layout!r}")
        self.pad, self.layout = int(pad_token_id), layout

    def units(self, pairs: Sequence[TokenizedPair]) -> list[int]:
        """Token count of each unit the layout places in a row: the ``2B`` sequences (chosen ones first) for
        ``padded`` / ``packed``, the ``B`` rows ``prompt + chosen + rejected`` for ``shared-prompt``."""
        if self.layout == "shared-prompt":
            return [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
        return [len(p.prompt) + len(getattr(p, side)) for side in ("chosen", "rejected") for p in pairs]

    def rows(self, pairs: Sequence[TokenizedPair]) -> tuple[list[int], list[list[int]], int]:
        """``(token count of each unit, units of each row, row length L)``: one unit per row when padded, else
        packed into rows as long as the longest unit."""
        lengths = self.units(pairs)
        longest = max(lengths)
        if self.layout == "padded":
            return lengths, [[i] for i in range(len(lengths))], longest
        return lengths, pack_rows(lengths, longest), longest

    def cost(self, pairs: Sequence[TokenizedPair]) -> int:
        """Positions (``R * L``, padding included) the backbone runs for ``pairs`` in this layout."""
        _, rows, length = self.rows(pairs)
        return len(rows) * length

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        b = len(pairs)
        lengths, rows, length = self.rows(pairs)
        r = len(rows)
        ids = torch.full((r, length), self.pad, dtype=torch.long)
        pos = torch.zeros((r, length), dtype=torch.long)
        seg = torch.full((r, length), -1, dtype=torch.long)
        branch = torch.zeros((r, length), dtype=torch.long)
        feature = [[0] * b for _ in range(3)]  # h_x, h_w, h_l

        def place(flat: int, tokens: list[int], positions: range, unit: int, br: int) -> None:
            row, col = divmod(flat, length)
            n = len(tokens)
            ids[row, col:col + n] = torch.tensor(tokens, dtype=torch.long)
            pos[row, col:col + n] = torch.tensor(positions, dtype=torch.long)
            seg[row, col:col + n] = unit
            branch[row, col:col + n] = br

        starts = {}
        for k, units in enumerate(rows):
            col = 0
            for u in units:
                starts[u] = k * length + col
                col += lengths[u]
        scored = {}  # sequence -> (predictor positions, answer tokens), emitted in sequence order below
        for i, p in enumerate(pairs):
            n_p = len(p.prompt)
            if self.layout == "shared-prompt":
                s = starts[i]
                place(s, p.prompt, range(n_p), i, PROMPT)
                c0, r0 = s + n_p, s + n_p + len(p.chosen)
                place(c0, p.chosen, range(n_p, n_p + len(p.chosen)), i, CHOSEN)
                place(r0, p.rejected, range(n_p, n_p + len(p.rejected)), i, REJECTED)
                feature[0][i] = s + n_p - 1
                feature[1][i], feature[2][i] = c0 + len(p.chosen) - 1, r0 + len(p.rejected) - 1
                # the first token of either answer is predicted by the last prompt token
                scored[i] = [s + n_p - 1] + list(range(c0, c0 + len(p.chosen) - 1)), p.chosen
                scored[b + i] = [s + n_p - 1] + list(range(r0, r0 + len(p.rejected) - 1)), p.rejected
                continue
            for j, side in enumerate(("chosen", "rejected")):
                seq, answer = j * b + i, getattr(p, side)
                s, n = starts[seq], n_p + len(answer)
                place(s, p.prompt + answer, range(n), seq, PROMPT)
                if j == 0:
                    feature[0][i] = s + n_p - 1
                feature[1 + j][i] = s + n - 1
                scored[seq] = list(range(s + n_p - 1, s + n - 1)), answer
        score_index, score_sequence, score_target = [], [], []
        score_lengths = [len(scored[seq][1]) for seq in range(2 * b)]
        for seq in range(2 * b):
            predictor, answer = scored[seq]
            score_index += predictor
            score_sequence += [seq] * len(answer)
            score_target += answer
        out = {"layout": self.layout, "input_ids": ids, "position_ids": pos, "segment_ids": seg, "branch_ids": branch,
               "score_index": torch.tensor(score_index, dtype=torch.long),
               "score_sequence": torch.tensor(score_sequence, dtype=torch.long),
               "score_target": torch.tensor(score_target, dtype=torch.long), "score_lengths": score_lengths,
               "feature_index": torch.tensor(feature, dtype=torch.long)}
        for side in ("chosen", "rejected"):
            out[f"{side}_lengths"] = torch.tensor([len(getattr(p, side)) for p in pairs], dtype=torch.long)
        out["prompt_lengths"] = torch.tensor([len(p.prompt) for p in pairs], dtype=torch.long)
        out["source"] = torch.tensor([p.source for p in pairs], dtype=torch.long)
        out["user"] = torch.tensor([p.user for p in pairs], dtype=torch.long)
        out["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        out["num_tokens"] = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        return out

    def split(self, pairs: Sequence[TokenizedPair], max_tokens: Optional[int]) -> list[list[TokenizedPair]]:
        """``pairs`` cut, in order, into the fewest consecutive groups whose ``cost`` stays within
        ``max_tokens`` (``None``: one group). A pair that alone exceeds the budget is a group by itself."""
        if max_tokens is None:
            return [list(pairs)]
        groups: list[list[TokenizedPair]] = []
        for p in pairs:
            if groups and self.cost(groups[-1] + [p]) <= max_tokens:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups


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


class UserGroupedSampler(EpochSampler):
    """``EpochSampler``'s interface and guarantees, with every global batch made of ``batch_size // pairs_per_user``
    groups of ``pairs_per_user`` consecutive pairs of one user.

    Each epoch (a generator seeded by ``(seed, epoch)``) shuffles each user's pairs, cuts them into groups of
    ``pairs_per_user`` (a remainder of fewer pairs sits the epoch out, a different one each epoch; a user with
    fewer pairs than that is never drawn: repeating a pair inside a group would put its own label into its
    user's context), shuffles the groups and cuts them into batches (the remainder is dropped). Pairs without a
    user (-1) are never drawn. A group may share a batch with another group of the same user. Contiguous slices
    of the batch whose sizes are multiples of ``pairs_per_user`` (a rank's, a micro-batch's) hold whole groups.
    """

    def __init__(self, users: Sequence[int], batch_size: int, pairs_per_user: int, seed: int):
        if pairs_per_user < 1 or batch_size % pairs_per_user:
            raise ValueError(f"batch_size={batch_size} must be a multiple of pairs_per_user={pairs_per_user} >= 1")
        super().__init__(len(users), batch_size, seed)
        self.pairs_per_user = pairs_per_user
        by_user: dict[int, list[int]] = {}
        for i, u in enumerate(users):
            if u >= 0:
                by_user.setdefault(int(u), []).append(i)
        self.pairs_by_user = [by_user[u] for u in sorted(by_user)]
        num_groups = sum(len(pairs) // pairs_per_user for pairs in self.pairs_by_user)
        self.groups_per_batch = batch_size // pairs_per_user
        if num_groups < self.groups_per_batch:
            raise ValueError(f"the users' pairs make {num_groups} groups of pairs_per_user={pairs_per_user}, fewer "
                             f"than the {self.groups_per_batch} of one batch of batch_size={batch_size}")
        self.batches_per_epoch = num_groups // self.groups_per_batch

    def order(self, epoch: int) -> list[int]:
        """The pairs of epoch ``epoch``'s batches, in order (``batches_per_epoch * batch_size`` indices)."""
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        m, groups = self.pairs_per_user, []
        for pairs in self.pairs_by_user:
            shuffled = [pairs[k] for k in torch.randperm(len(pairs), generator=gen).tolist()]
            groups += [shuffled[s:s + m] for s in range(0, len(pairs) - m + 1, m)]
        picked = torch.randperm(len(groups), generator=gen).tolist()[:self.batches_per_epoch * self.groups_per_batch]
        return [i for g in picked for i in groups[g]]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pairs_per_user": self.pairs_per_user}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pairs_per_user", 0) != self.pairs_per_user:
            raise ValueError(f"data position was saved for pairs_per_user={state.get('pairs_per_user', 0)}, this "
                             f"run has {self.pairs_per_user}")
        super().load_state_dict(state)


def batches(dataset: PreferenceDataset, batch_size: int, collator: PreferenceCollator) -> Iterator[dict]:
    """One ordered pass over ``dataset`` in batches of ``batch_size`` (the last may be shorter)."""
    n = len(dataset)
    for s in range(0, n, batch_size):
        yield collator([dataset[i] for i in range(s, min(s + batch_size, n))])


class IndexView:
    """``dataset[indices]`` as a sequence (what ``batches`` needs); pairs keep their own index."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.rows = [dataset.rows[i] for i in self.indices] if hasattr(dataset, "rows") else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]
