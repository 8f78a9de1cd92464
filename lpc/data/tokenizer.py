"""A word-level tokenizer for the synthetic data, learnt locally (no network) from ``lpc.data.synthetic.corpus`` on
first use and cached in ``$LPC_CACHE_DIR`` or ``~/.cache/lpc-kernels``, under a name that carries a hash of the
lexicon; written to a temp directory and renamed, so concurrent first uses never see half a tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..io import umask
from . import synthetic


def default_cache_dir() -> Path:
    return Path(os.environ.get("LPC_CACHE_DIR") or Path.home() / ".cache" / "lpc-kernels")


def _lexicon_hash() -> str:
    text = "\n".join(list(synthetic.SPECIAL_TOKENS) + synthetic.lexicon())
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_tokenizer():
    """Train a WordLevel tokenizer on the synthetic corpus; returns a ``PreTrainedTokenizerFast``."""
    pad, unk, bos, eos = synthetic.SPECIAL_TOKENS
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the generator separates every token by a space
    trainer = trainers.WordLevelTrainer(special_tokens=list(synthetic.SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(synthetic.corpus(), trainer=trainer)
    missing = [w for w in synthetic.lexicon() if tok.token_to_id(w) is None]
    if missing:  # corpus() yields the whole lexicon, so this means the trainer dropped words
        raise RuntimeError(f"tokenizer training lost words: {missing[:5]}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos,
                                   eos_token=eos, padding_side="right", model_max_length=512)


def load_synthetic_tokenizer(cache_dir: Optional[os.PathLike] = None):
    """The cached synthetic tokenizer, training and caching it first if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"synthetic-tokenizer-{_lexicon_hash()}"
    if not (path / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a shared cache entry should be readable
        try:
            train_tokenizer().save_pretrained(tmp)
            try:
                os.replace(tmp, path)
            except OSError:  # another process won the race: its copy is identical, keep it
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(path))
