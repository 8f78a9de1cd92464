"""``python -m lpc.tiny_model --dataset data.jsonl --out DIR``: a tiny random-init HF model directory for
smoke tests of a data pipeline (no download): a byte-level BPE tokenizer trained on the dataset's text,
with a chat template, and a small ``LlamaForCausalLM``, saved in HF layout (``--model DIR`` loads it).

It learns nothing useful about language; it exercises exactly the code paths a real ``--model`` takes
(``AutoModelForCausalLM`` / ``AutoTokenizer`` loading, chat template, padding, LoRA, checkpoints).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .cli import HelpFormatter
from .data import load_preference_rows
from .data.tokenizer import row_texts
from .hf import build_tiny_llama
from .io import atomic_directory
from .runtime import quiet_transformers

# a ChatML-style template: every turn is "<|role|>text<eos>", the generation prompt opens an assistant turn. No
# space after the role token: with a byte-level tokenizer it would be a lone space token ending every prompt,
# so the rendered prompt would not be a token prefix of prompt + answer (TRL warns about exactly that)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")


def make_tiny_model(out_dir: os.PathLike, texts: Iterable[str], *, vocab_size: int = 512, hidden_size: int = 32,
                    num_layers: int = 1, num_heads: int = 2, seed: int = 0) -> Path:
    """Train a tokenizer on ``texts``, build a tiny Llama, and save both to ``out_dir`` (atomically)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>", padding_side="right", model_max_length=2048)
    hf_tok.chat_template = CHAT_TEMPLATE
    model = build_tiny_llama(hf_tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                             max_positions=2048, seed=seed)
    with atomic_directory(out_dir) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
    return Path(out_dir)


def dataset_texts(spec: str) -> list[str]:
    """Every prompt and answer of a preference dataset (for the tokenizer)."""
    return row_texts(load_preference_rows(spec)[0])


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m lpc.tiny_model", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, help="preference dataset whose text trains the tokenizer")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    p.add_argument("--hidden-size", type=int, default=32, help="hidden size")
    p.add_argument("--num-layers", type=int, default=1, help="layers")
    p.add_argument("--num-heads", type=int, default=2, help="attention heads")
    p.add_argument("--seed", type=int, default=0, help="init seed")
    a = p.parse_args(argv)
    try:
        out = make_tiny_model(a.out, dataset_texts(a.dataset), vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                              num_layers=a.num_layers, num_heads=a.num_heads, seed=a.seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        p.error(str(exc))
    print(f"wrote {out} (train with: python -m lpc.train --model {out} --dataset {a.dataset})")
    return out


if __name__ == "__main__":
    main()
