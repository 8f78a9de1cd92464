"""TRL conventions where a TRL user would trip: dropout off by default, ``sigmoid`` as the DPO loss's name,
datasets whose prompt is implicit (the prefix ``chosen`` and ``rejected`` share), and a chat template whose
generation prompt is a token prefix of prompt + answer (tests/trainer/test_data.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lpc.builders import build_policy, disable_dropout
from lpc.cli import parse_args
from lpc.config import TrainConfig
from lpc.data import MalformedRow, load_preference_rows, normalize_row
from lpc.data.rows import split_implicit_prompt


# -------------------------------------------------------------------------------------- implicit prompts
@pytest.mark.parametrize("chosen,rejected,want", [
    ("Q: sky? A: blue", "Q: sky? A: green", ("Q: sky? A:", " blue", " green")),  # the space goes with the answers
    ("Human: hi\n\nAssistant: hello", "Human: hi\n\nAssistant: bye", ("Human: hi\n\nAssistant:", " hello", " bye")),
    ("abcX", "abcY", ("abc", "X", "Y")),
])
def test_implicit_prompt_is_the_shared_prefix(chosen, rejected, want):
    assert split_implicit_prompt(chosen, rejected) == want
    row = normalize_row({"chosen": chosen, "rejected": rejected})
    assert (row["prompt"], row["chosen"], row["rejected"]) == want
    assert row["messages"] == [{"role": "user", "content": want[0]}]


def test_implicit_prompt_needs_a_shared_prefix_and_two_answers():
    with pytest.raises(MalformedRow, match="share no prefix"):
        normalize_row({"chosen": "yes", "rejected": "no"})
    with pytest.raises(MalformedRow, match="empty answer"):  # chosen is a prefix of rejected
        normalize_row({"chosen": "Q: x? A: yes", "rejected": "Q: x? A: yesterday"})


def test_implicit_prompt_dataset_file(tmp_path):
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away"},
        {"chosen": "Human: 2+2? Assistant: 4", "rejected": "Human: 2+2? Assistant: 5"},
        {"chosen": "same", "rejected": "different"}]))  # nothing shared: skipped and counted
    rows, stats = load_preference_rows(f)
    assert [r["prompt"] for r in rows] == ["Human: hi Assistant:", "Human: 2+2? Assistant:"]
    assert [r["chosen"] for r in rows] == [" hello there", " 4"] and stats.skipped["missing field"] == 1


# ------------------------------------------------------------------------------------------ loss names
def test_sigmoid_is_dpo():
    assert TrainConfig(loss="sigmoid").loss == "dpo"
    assert TrainConfig(loss="sigmoid").kl_weight == TrainConfig(loss="dpo").kl_weight
    assert parse_args(["--loss", "sigmoid"]).loss == "dpo"


# --------------------------------------------------------------------------------------------- dropout
def test_disable_dropout_switches_off_modules_and_attention_dropout():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert disable_dropout(gpt2) > 0
    assert all(m.p == 0.0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))
    gpt2.train()  # dropout would act in train mode: two forwards must now agree
    x = torch.randint(0, 40, (2, 8))
    torch.testing.assert_close(gpt2(x).logits, gpt2(x).logits)


@pytest.mark.parametrize("disable", [True, False])
def test_policy_dropout_off_by_default(tmp_path, disable):
    from lpc.tiny_model import make_tiny_model

    d = make_tiny_model(tmp_path / "m", ["hello world", "what is two plus two"], vocab_size=300)
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (d / "config.json").write_text(json.dumps(cfg))
    policy, _ = build_policy(TrainConfig(model=str(d), disable_dropout=disable))
    rates = [m.attention_dropout for m in policy.modules() if isinstance(getattr(m, "attention_dropout", None),
                                                                              float)]
    assert rates and all(r == (0.0 if disable else 0.1) for r in rates)


# ------------------------------------------------------------------------------------------- chat template
def test_chat_template_conversational_renders_message_rows_only(tmp_path):
    """--chat-template conversational is TRL's rule: string rows are tokenized as written (BOS + text), rows given
    as message lists go through the template; always (the default) renders both."""
    from transformers import AutoTokenizer

    from lpc.data import PreferenceDataset
    from lpc.tiny_model import make_tiny_model

    tok = AutoTokenizer.from_pretrained(str(make_tiny_model(tmp_path / "m", ["hello world", "two plus two"],
                                                            vocab_size=300)))
    rows = [normalize_row({"prompt": "two plus two?", "chosen": "four", "rejected": "five"}),
            normalize_row({"prompt": [{"role": "user", "content": "two plus two?"}], "chosen": "four",
                           "rejected": "five"})]
    assert [r["conversational"] for r in rows] == [False, True]
    for r in rows:
        r["source"] = -1
    trl = PreferenceDataset(rows, tok, chat_template=True, conversational_only=True)
    assert tok.decode(trl[0].prompt) == "<s>two plus two?"
    assert tok.decode(trl[1].prompt) == "<s><|user|>two plus two?</s><|assistant|>"
    always = PreferenceDataset(rows, tok, chat_template=True)
    assert always[0].prompt == always[1].prompt == trl[1].prompt
    assert TrainConfig(chat_template="conversational").chat_template == "conversational"
