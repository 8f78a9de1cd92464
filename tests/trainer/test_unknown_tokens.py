"""The tokenizer a run gets and the unknown-token check: without ``--model`` a ``--dataset`` run learns the tiny
model's tokenizer on that data (cached by its hash); with any tokenizer, data that maps to ``<unk>`` above
``--max-unknown-token-share`` stops the run before anything is written, with a one-line error."""

from __future__ import annotations

import json
import re

import pytest

from lpc.builders import build_data, build_policy, build_tokenizer
from lpc.config import TrainConfig
from lpc.data import PreferenceDataset
from lpc.data import tokenizer as tokenizer_lib
from lpc.data.tokenizer import load_synthetic_tokenizer
from lpc.hf import build_tiny_llama
from lpc.train import main
from tests.helpers import DATA
from tests.helpers.runs import TINY_ARGS, read_jsonl

SAMPLE = str(DATA / "ultrafeedback_sample.jsonl")


def _write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unknown_token_share_counts_prompt_and_answer_tokens(cache_dir):
    tok = load_synthetic_tokenizer(cache_dir)  # knows the synthetic lexicon only
    known = next(w for w in tok.get_vocab() if w.isalpha())
    rows = [{"prompt": f"zebra {known} quokka", "chosen": "wombat", "rejected": f"{known} {known}", "source": -1}]
    share = PreferenceDataset(rows, tok, 64).unknown_token_share(tok.unk_token_id)
    # prompt: <bos> zebra known quokka -> 2 of 4; answers: wombat <eos>, known known <eos> -> 1 of 5
    assert share.prompt == pytest.approx(2 / 4) and share.answer == pytest.approx(1 / 5)
    assert PreferenceDataset(rows, tok, 64).unknown_token_share(None) == (0.0, 0.0)  # no unknown token


def test_dataset_without_model_learns_its_tokenizer_cached_by_the_data(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset=SAMPLE, eval_size=8, cache_dir=str(tmp_path / "cache"))
    tok = build_tokenizer(cfg)
    synthetic = load_synthetic_tokenizer(tmp_path / "cache")
    assert tok.get_vocab() != synthetic.get_vocab()
    for word in ("reverse", "Python", "slicing"):  # words of the sample, unknown to the synthetic tokenizer
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id
        assert synthetic.convert_tokens_to_ids(word) == synthetic.unk_token_id
    train_set, eval_set, _, _ = build_data(cfg, tok)
    assert train_set.unknown_token_share(tok.unk_token_id) == (0.0, 0.0)
    assert eval_set.unknown_token_share(tok.unk_token_id) == (0.0, 0.0)  # learnt on the whole file
    policy, policy_tok = build_policy(cfg)
    assert policy.config.vocab_size == len(tok) and policy_tok.get_vocab() == tok.get_vocab()
    # cached: the same data loads the saved tokenizer without training; other data gets its own
    monkeypatch.setattr(tokenizer_lib, "train_dataset_tokenizer", lambda texts: pytest.fail("trained again"))
    assert build_tokenizer(cfg).get_vocab() == tok.get_vocab()
    assert len(list((tmp_path / "cache").glob("dataset-tokenizer-*"))) == 1
    other = _write_rows(tmp_path / "other.jsonl", [{"prompt": "p", "chosen": "yes", "rejected": "no"}] * 4)
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        build_tokenizer(TrainConfig(dataset=other, cache_dir=str(tmp_path / "cache")))
    # no --dataset: the synthetic tokenizer, as before
    assert build_tokenizer(TrainConfig(cache_dir=str(tmp_path / "cache"))).get_vocab() == synthetic.get_vocab()


@pytest.fixture(scope="module")
def synthetic_vocab_model(tmp_path_factory, cache_dir):
    """A ``--model`` directory whose word-level tokenizer knows only the synthetic data's words."""
    out = tmp_path_factory.mktemp("synthetic-vocab-model")
    tok = load_synthetic_tokenizer(cache_dir)
    build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_data_the_tokenizer_cannot_read_stops_the_run_before_it_starts(synthetic_vocab_model, tmp_path, capsys):
    argv = ["--model", synthetic_vocab_model, "--dataset", SAMPLE, "--steps", "1", "--batch-size", "4",
            "--eval-size", "8", "--max-length", "64", "--threads", "1", "--no-progress", "--num-codes", "4"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--output-dir", str(tmp_path / "refused")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    line, = [ln for ln in err.splitlines() if "error:" in ln]  # one line, no traceback
    assert "Traceback" not in err
    share = re.search(r"error: (\d+\.\d)% of the (prompt|answer) tokens of the training pairs are the tokenizer's "
                      r"unknown token '<unk>', above --max-unknown-token-share 0\.05", line)
    assert share and float(share.group(1)) > 50, line
    assert "use a --model whose tokenizer covers the data, or leave out --model" in line
    assert not (tmp_path / "refused").exists()  # nothing written
    # raising the threshold lets it train, and the share is printed
    summary = main(argv + ["--output-dir", str(tmp_path / "run"), "--max-unknown-token-share", "1"])
    assert summary["eval"]["num_pairs"] == 8
    assert re.search(r"data: unknown token '<unk>': \d+\.\d% of prompt and \d+\.\d% of answer tokens \(training "
                     r"pairs\)", capsys.readouterr().err)


def test_own_dataset_without_model_trains_on_known_words_and_learns(tmp_path, capsys):
    # learnable: the chosen answer always ends with "good", the rejected one with "bad"
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"prompt": f"question {i} about {words[i % 6]}", "chosen": f"{words[(i + 1) % 6]} {words[i % 5]} good",
             "rejected": f"{words[(i + 2) % 6]} {words[i % 4]} bad"} for i in range(48)]
    data = _write_rows(tmp_path / "own.jsonl", rows)
    summary = main(["--dataset", data, "--steps", "12", "--batch-size", "8", "--eval-size", "16", "--warmup-steps",
                    "2", "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY_ARGS])
    err = capsys.readouterr().err
    assert ("data: unknown token '<unk>': 0.0% of prompt and 0.0% of answer tokens (training pairs); 0.0% of prompt "
            "and 0.0% of answer tokens (held-out pairs)") in err
    assert summary["eval"]["num_pairs"] == 16 and summary["eval"]["accuracy"] == 1.0
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 12
