"""The preference-data loader (shipped UltraFeedback-layout sample, malformed files, file formats),
the truncation rule, source ids and the resumable data order. Expected values are written by hand."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers import DATA
from tests.helpers.fake_tokenizer import WhitespaceTokenizer as _Tok
from lpc.data import (DataError, EpochSampler, PreferenceCollator, PreferenceDataset, assign_source_ids,
                      load_preference_rows, truncate_pair)

SAMPLE = DATA / "ultrafeedback_sample.jsonl"
MALFORMED = DATA / "malformed.jsonl"


def test_ultrafeedback_sample_loads_with_sources_and_conversations():
    rows, stats = load_preference_rows(SAMPLE)
    assert len(rows) == 24 and stats.kept == 24 and stats.total == 24 and not stats.skipped
    assert stats.summary() == f"data: {SAMPLE}: 24 rows, 24 used"
    first = rows[0]
    assert first["prompt"] == "How do I reverse a list in Python?"
    assert first["chosen"].startswith("Use slicing: `items[::-1]`")
    assert first["rejected"] == "Python lists cannot be reversed."
    assert first["messages"] == [{"role": "user", "content": "How do I reverse a list in Python?"}]
    names = assign_source_ids(rows)
    assert names == ["evol_instruct", "false_qa", "sharegpt", "ultrachat"]  # sorted, shared ids
    assert [r["source"] for r in rows[:7]] == [0] * 6 + [1]


def test_malformed_rows_are_skipped_and_counted():
    rows, stats = load_preference_rows(MALFORMED)
    assert [r["prompt"] for r in rows] == ["Name a primary colour.", "What is 2 + 2?"]
    assert rows[1]["chosen"] == "4" and rows[1]["rejected"] == "5"
    assert stats.total == 7 and stats.kept == 2
    assert dict(stats.skipped) == {"invalid JSON": 1, "missing field": 1, "empty answer": 1,
                                   "chosen == rejected": 1, "non-string content": 1}
    line = stats.summary()
    assert "\n" not in line and "7 rows, 2 used, 5 skipped" in line
    for part in ("1 invalid JSON", "1 missing field", "1 empty answer", "1 chosen == rejected",
                 "1 non-string content"):
        assert part in line


def test_strict_mode_names_the_first_bad_row():
    with pytest.raises(DataError, match=r"malformed\.jsonl:3: missing field: no 'rejected'.*strict"):
        load_preference_rows(MALFORMED, strict=True)


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "empty answer"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "non-string content"),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "bad message list"),
    ({"chosen": "a", "rejected": "b"}, "missing field"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "prompts differ"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "source": 1.5}, "non-string content"),
    ([1, 2], "not an object"),
])
def test_each_malformed_kind(tmp_path, row, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(row) + "\n")
    rows, stats = load_preference_rows(path)
    assert len(rows) == 1 and dict(stats.skipped) == {reason: 1}


def test_json_array_and_parquet_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    (tmp_path / "s.json").write_text(json.dumps(raw))
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "s.parquet")
    want = load_preference_rows(SAMPLE)[0]
    assert load_preference_rows(tmp_path / "s.json")[0] == want
    assert load_preference_rows(tmp_path / "s.parquet")[0] == want


def test_conversational_prompt_layout_and_multi_turn():
    # TRL's conversational layout: prompt = messages, answers = the assistant turn only
    from lpc.data import normalize_row

    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    out = normalize_row(row)
    assert out["messages"] == row["prompt"] and out["chosen"] == "hello" and out["rejected"] == "go away"
    assert out["prompt"] == "system: be brief\n\nuser: hi"


def test_bad_dataset_specs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_preference_rows(tmp_path / "x.csv")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_preference_rows(tmp_path / "bad.json")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_preference_rows(tmp_path / "empty.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `datasets` not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_preference_rows("someorg/some_prefs")


def test_truncation_rule_by_hand():
    # fits: unchanged
    assert truncate_pair([1, 2], [3, 4], [5], 8) == ([1, 2], [3, 4], [5], False)
    # pair too long, prompt (6) > max_length // 2 (5): prompt keeps BOS + its last 4, answers cut to 10 - 5
    p, c, r, cut = truncate_pair([9, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [20, 21], 10, bos=9)
    assert (p, c, r, cut) == ([9, 2, 3, 4, 5], [10, 11, 12, 13, 14], [20, 21], True)
    # prompt short: only the answers are cut
    assert truncate_pair([9, 1], [1] * 12, [2] * 3, 10, bos=9) == ([9, 1], [1] * 8, [2] * 3, True)
    # explicit --max-prompt-length cuts even pairs that fit
    assert truncate_pair([9, 1, 2, 3], [5], [6], 100, max_prompt_length=2, bos=9) == ([9, 3], [5], [6], True)
    assert truncate_pair([1, 2, 3], [5], [6], 100, max_prompt_length=2) == ([2, 3], [5], [6], True)


def test_dataset_lengths_respect_max_length_and_count_truncations():
    rows = [{"prompt": " ".join(["w"] * 30), "chosen": " ".join(["a"] * 30), "rejected": "b", "source": 0},
            {"prompt": "short", "chosen": "x", "rejected": "y", "source": 1}]
    ds = PreferenceDataset(rows, _Tok(), max_length=16)
    assert ds.num_truncated == 1
    p = ds[0]
    assert len(p.prompt) == 8 and p.prompt[0] == 1  # max_length // 2 = 8 with BOS kept
    assert len(p.chosen) == 8 and p.chosen[-1] != 2  # cut answers lose their EOS
    assert ds[1].chosen[-1] == 2 and [q.index for q in ds] == [0, 1]
    batch = PreferenceCollator(0)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (4, 16) and batch["index"].tolist() == [0, 1]


def test_chat_template_prompt_rendering(tmp_path):
    from lpc.tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    d = make_tiny_model(tmp_path / "m", ["hello world", "what is two plus two"], vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(d))
    rows, _ = load_preference_rows(SAMPLE)
    with pytest.raises(ValueError, match="assign_source_ids"):
        PreferenceDataset(rows[:2], tok, chat_template=True)  # source names not mapped to ids yet
    assign_source_ids(rows)
    ds = PreferenceDataset(rows[:2], tok, chat_template=True)
    # the template renders "<s><|user|>{content}</s><|assistant|>" (lpc.tiny_model.CHAT_TEMPLATE)
    assert tok.decode(ds[0].prompt) == "<s><|user|>How do I reverse a list in Python?</s><|assistant|>"
    assert tok.decode(ds[0].chosen) == rows[0]["chosen"] + "</s>"
    # the prompt is a token prefix of prompt + answer rendered as one conversation (no lone space token)
    messages = [{"role": "user", "content": rows[0]["prompt"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": rows[0]["chosen"]}],
                                   tokenize=True, return_dict=False)
    assert full[:len(prompt)] == prompt and full[len(prompt):] == ds[0].chosen


def test_source_ids_for_ints_and_missing():
    a = [{"source": 2}, {"source": None}]
    b = [{"source": 0}]
    assert assign_source_ids(a, b) == ["0", "1", "2"]
    assert [r["source"] for r in a + b] == [2, -1, 0]
    c = [{"source": None}]
    assert assign_source_ids(c) is None and c[0]["source"] == -1


def test_epoch_sampler_is_a_pure_function_of_seed_epoch_and_position():
    s = EpochSampler(10, 3, seed=5)
    got = [s.next_indices() for _ in range(7)]  # 3 batches per epoch (remainder dropped)
    e0, e1 = s.order(0), s.order(1)
    assert sorted(e0) == list(range(10)) and e0 != e1
    assert got[:3] == [e0[0:3], e0[3:6], e0[6:9]] and got[3:6] == [e1[0:3], e1[3:6], e1[6:9]]
    assert got[6] == s.order(2)[0:3]
    # a fresh sampler restored at any point continues identically
    t = EpochSampler(10, 3, seed=5)
    for k in range(5):
        t.next_indices()
    state = json.loads(json.dumps(t.state_dict()))
    u = EpochSampler(10, 3, seed=5)
    u.load_state_dict(state)
    assert [u.next_indices() for _ in range(2)] == got[5:7]
    assert EpochSampler(10, 3, seed=6).order(0) != e0
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        EpochSampler(2, 3, seed=0)
    assert torch.equal(torch.tensor(EpochSampler(10, 3, seed=5).order(1)), torch.tensor(e1))
