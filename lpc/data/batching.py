"""Tokenised pairs, batches and the training order.

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

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

IGNORE_INDEX = -100

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


class IndexView:
    """``dataset[indices]`` as a sequence (what ``batches`` needs); pairs keep their own index."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.rows = [dataset.rows[i] for i in self.indices] if hasattr(dataset, "rows") else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]
