"""The tiny model's word-level tokenizers, learnt locally (no network): on the synthetic data's lexicon
(``lpc.data.synthetic.corpus``) or on a ``--dataset``'s text, on first use, and cached in ``$LPC_CACHE_DIR`` or
``~/.cache/lpc-kernels`` under a name that carries a hash of what it was learnt from; written to a temp directory
and renamed, so concurrent first uses never see half a tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..io import umask
from . import synthetic

# words a --dataset tokenizer keeps (the most frequent): bounds the tiny model's embedding and LM head
DATASET_VOCAB_SIZE = 32768


def default_cache_dir() -> Path:
    return Path(os.environ.get("LPC_CACHE_DIR") or Path.home() / ".cache" / "lpc-kernels")


def _lexicon_hash() -> str:
    text = "\n".join(list(synthetic.SPECIAL_TOKENS) + synthetic.lexicon())
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _fast_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    pad, unk, bos, eos = synthetic.SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos,
                                   eos_token=eos, padding_side="right", model_max_length=512)


def train_tokenizer():
    """Train a WordLevel tokenizer on the synthetic corpus; returns a ``PreTrainedTokenizerFast``."""
    tok = Tokenizer(models.WordLevel(unk_token=synthetic.SPECIAL_TOKENS[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the generator separates every token by a space
    trainer = trainers.WordLevelTrainer(special_tokens=list(synthetic.SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(synthetic.corpus(), trainer=trainer)
    missing = [w for w in synthetic.lexicon() if tok.token_to_id(w) is None]
    if missing:  # corpus() yields the whole lexicon, so this means the trainer dropped words
        raise RuntimeError(f"tokenizer training lost words: {missing[:5]}")
    return _fast_tokenizer(tok)


def train_dataset_tokenizer(texts: Sequence[str], vocab_size: int = DATASET_VOCAB_SIZE):
    """A WordLevel tokenizer of a dataset's text: words and punctuation runs (``Whitespace``), the ``vocab_size``
    most frequent kept (the tiny model's embedding and LM head grow with it), the rest ``<unk>``."""
    tok = Tokenizer(models.WordLevel(unk_token=synthetic.SPECIAL_TOKENS[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(synthetic.SPECIAL_TOKENS),
                                        min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    return _fast_tokenizer(tok)


def row_texts(rows: Sequence[dict]) -> list[str]:
    """Every prompt and answer of preference rows (``normalize_row``), in order: what a tokenizer learns from."""
    return [t for r in rows for t in (r["prompt"], r["chosen"], r["rejected"])]


def _cached(path: Path, train: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """The tokenizer saved at ``path``, trained by ``train`` and saved there first if needed."""
    if not (path / "tokenizer.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a shared cache entry should be readable
        try:
            train().save_pretrained(tmp)
            try:
                os.replace(tmp, path)
            except OSError:  # another process won the race: its copy is identical, keep it
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_synthetic_tokenizer(cache_dir: Optional[os.PathLike] = None):
    """The cached synthetic tokenizer, training and caching it first if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _cached(root / f"synthetic-tokenizer-{_lexicon_hash()}", train_tokenizer)


def load_dataset_tokenizer(texts: Sequence[str], cache_dir: Optional[os.PathLike] = None):
    """The cached tokenizer of ``texts`` (``train_dataset_tokenizer``), keyed by a hash of the texts and the
    tokenizer's settings; trained and cached first if needed."""
    digest = hashlib.sha256(f"word-level whitespace vocab={DATASET_VOCAB_SIZE}".encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _cached(root / f"dataset-tokenizer-{digest.hexdigest()[:16]}", lambda: train_dataset_tokenizer(texts))
