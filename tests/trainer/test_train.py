"""Short end-to-end runs of ``python -m lpc.train`` (in-process: the same ``main`` the CLI calls)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lpc.config import TrainConfig
from lpc.model import LPCModel
from lpc.train import main, train
from tests.helpers import DATA
from tests.helpers.runs import RUN_TOL, WALL_CLOCK_KEYS, assert_same_metrics, read_jsonl

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False)


def _metrics_wo_time(path):
    return [{k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS} for m in read_jsonl(path)]


def test_short_lpc_dpo_run_learns_and_writes_outputs(tmp_path, cache_dir):
    cfg = TrainConfig(steps=60, batch_size=16, num_train=512, eval_size=128, lr=3e-3, warmup_steps=5,
                      eval_every=30, output_dir=str(tmp_path / "run"), cache_dir=cache_dir, **TINY)
    summary = train(cfg)
    out = tmp_path / "run"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 61))
    names = ["loss", "step", "lr", "tokens_per_s", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins", "logps/chosen", "logps/rejected", "lpc/kl", "lpc/prior_entropy",
             "lpc/posterior_entropy", "lpc/code_perplexity", "lpc/mix"]
    for m in metrics:
        assert set(names) <= set(m), set(names) - set(m)
    assert metrics[0]["lpc/mix"] == 0.0 and metrics[-1]["lpc/mix"] == 1.0
    # the policy starts as the reference: DPO loss log(2) plus the weighted KL term, then it learns
    first = sum(m["loss"] for m in metrics[:10]) / 10
    last = sum(m["loss"] for m in metrics[-10:]) / 10
    assert metrics[0]["lpc/kl_weight"] == 1.0 and metrics[0]["lpc/kl"] > 0
    assert metrics[0]["loss"] - metrics[0]["lpc/kl"] == pytest.approx(0.6931, abs=0.02)
    assert last < first - 0.1, (first, last)
    assert sum(m["rewards/accuracies"] for m in metrics[-10:]) / 10 > 0.7

    ev = json.loads((out / "eval.json").read_text())
    assert ev == summary["eval"] and ev["num_pairs"] == 128 and ev["accuracy"] > 0.6
    assert 0.0 <= ev["code_source_nmi"] <= 1.0 and set(ev["accuracy_by_source"]) == {
        "concise", "detailed", "formal", "casual"}
    assert len(read_jsonl(out / "eval.jsonl")) == 1  # step 30 (the last step is the final eval)
    final = out / "final"
    for name in ("model.safetensors", "config.json", "lpc_heads.safetensors", "lpc_config.json",
                 "tokenizer.json", "train_config.json"):
        assert (final / name).exists(), name
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]  # temp files were renamed away
    assert (out / ".lock").read_text() == ""  # the run lock, released
    loaded = LPCModel.from_pretrained(final)
    assert loaded.lpc.num_codes == 32 and loaded.codebook.shape == (32, 32)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("lpc", [True, False])
def test_each_loss_with_and_without_lpc_runs(tmp_path, cache_dir, loss, lpc):
    cfg = TrainConfig(loss=loss, lpc=lpc, steps=3, batch_size=4, num_train=32, eval_size=8, num_codes=4,
                      output_dir=str(tmp_path), cache_dir=cache_dir, **TINY)
    summary = train(cfg)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert ("lpc/kl" in metrics[0]) == lpc
    assert summary["eval"]["num_pairs"] == 8 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert (tmp_path / "final" / "lpc_heads.safetensors").exists() == lpc


def test_cli_prints_accuracy_and_outputs(tmp_path, cache_dir, capsys):
    main(["--steps", "2", "--batch-size", "4", "--num-train", "16", "--eval-size", "8", "--hidden-size", "32",
          "--num-layers", "1", "--num-heads", "2", "--no-progress", "--output-dir", str(tmp_path / "cli"),
          "--cache-dir", cache_dir, "--loss", "simpo", "--gamma", "0.3"])
    text = capsys.readouterr().out
    assert "held-out preference accuracy:" in text and str(tmp_path / "cli") in text
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert saved["loss"] == "simpo" and saved["gamma"] == 0.3 and saved["lpc"] is True


def test_dataset_jsonl_and_chat_format(tmp_path, cache_dir):
    rows = [{"prompt": "user_1 asks : tell me about cats .", "chosen": "indeed cats are warm .",
             "rejected": "yeah cats seem teh ."},
            {"chosen": [{"role": "user", "content": "user_2 asks : tell me about tea ."},
                        {"role": "assistant", "content": "moreover tea feel calm ."}],
             "rejected": [{"role": "user", "content": "user_2 asks : tell me about tea ."},
                          {"role": "assistant", "content": "like tea are old ."}]}] * 8
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(dataset=str(path), steps=2, batch_size=4, eval_size=4, output_dir=str(tmp_path / "run"),
                      cache_dir=cache_dir, num_codes=4, **TINY)
    summary = train(cfg)
    assert summary["eval"]["num_pairs"] == 4 and "accuracy_by_source" not in summary["eval"]


def test_train_from_a_saved_model_directory(tmp_path, cache_dir):
    first = train(TrainConfig(steps=1, batch_size=4, num_train=8, eval_size=4, num_codes=4,
                              output_dir=str(tmp_path / "a"), cache_dir=cache_dir, **TINY))
    cfg = TrainConfig(model=first["checkpoint"], steps=2, batch_size=4, num_train=8, eval_size=4, num_codes=4,
                      output_dir=str(tmp_path / "b"), cache_dir=cache_dir, **TINY)
    summary = train(cfg)
    loaded = LPCModel.from_pretrained(summary["checkpoint"])
    assert loaded.policy.config.hidden_size == 32 and summary["eval"]["num_pairs"] == 4


def test_same_seed_gives_the_same_run(tmp_path, cache_dir):
    def run(name):
        train(TrainConfig(steps=3, batch_size=4, num_train=16, eval_size=4, num_codes=4, seed=11,
                          output_dir=str(tmp_path / name), cache_dir=cache_dir, **TINY))
        return _metrics_wo_time(tmp_path / name / "metrics.jsonl")

    assert run("a") == run("b")


# ------------------------------------------------------------------------------ trainer features (issue 6)
def test_lr_schedules_by_hand():
    from lpc.builders import lr_factor

    assert [lr_factor(s, 2, 10) for s in (0, 1)] == [0.5, 1.0]  # linear warmup
    assert lr_factor(2, 2, 10) == pytest.approx(1.0) and lr_factor(9, 2, 10) == pytest.approx(0.1)
    # cosine halfway between the end of warmup (step 2) and the last step (9): 0.1 + 0.9 * 0.5
    assert lr_factor(5.5, 2, 10) == pytest.approx(0.55)
    assert lr_factor(5.5, 2, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(9, 2, 10, "linear", 0.2) == pytest.approx(0.2)
    assert lr_factor(7, 2, 10, "constant") == 1.0


def test_gradient_accumulation_equals_one_big_batch(tmp_path, cache_dir):
    def run(name, accum):
        train(TrainConfig(steps=3, batch_size=8, gradient_accumulation_steps=accum, num_train=32, eval_size=4,
                          num_codes=4, output_dir=str(tmp_path / name), cache_dir=cache_dir, dtype="float64", **TINY))
        return read_jsonl(tmp_path / name / "metrics.jsonl")

    # same pairs, same Gumbel noise per pair, same update: the sums in another order only (float64, RUN_TOL)
    assert_same_metrics(run("one", 1), run("four", 4))


def test_gradient_checkpointing_gives_the_same_run(tmp_path, cache_dir):
    def run(name, gc):
        train(TrainConfig(steps=2, batch_size=4, num_train=16, eval_size=4, num_codes=4, gradient_checkpointing=gc,
                          output_dir=str(tmp_path / name), cache_dir=cache_dir, dtype="float64", **TINY))
        return read_jsonl(tmp_path / name / "metrics.jsonl")

    assert_same_metrics(run("plain", False), run("ckpt", True))


def test_reference_logp_cache_equals_live_reference(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from lpc.data import PreferenceCollator
    from lpc.objective import make_reference, reference_logps
    from lpc.builders import build_data, build_policy

    base = dict(steps=3, batch_size=4, num_train=16, eval_size=8, num_codes=4, seed=2, cache_dir=cache_dir,
                dtype="float64", **TINY)  # the cache scores other batches than the live reference: RUN_TOL
    train(TrainConfig(output_dir=str(tmp_path / "live"), **base))
    train(TrainConfig(output_dir=str(tmp_path / "cached"), precompute_ref_logps=True, **base))
    cache = load_file(str(tmp_path / "cached" / "ref_logps.safetensors"))
    assert cache["train.chosen"].shape == (16,) and cache["eval.rejected"].shape == (8,)
    # independently: the initial policy scored one unpadded pair at a time
    cfg = TrainConfig(**base)
    policy, tok = build_policy(cfg)
    ref = make_reference(policy)
    train_set, eval_set, _, _ = build_data(cfg, tok)
    collate = PreferenceCollator(tok.pad_token_id)
    for split, ds in (("train", train_set), ("eval", eval_set)):
        for i in range(len(ds)):
            c, r = reference_logps(ref, collate([ds[i]]))
            assert float(cache[f"{split}.chosen"][i]) == pytest.approx(float(c[0]), rel=RUN_TOL, abs=RUN_TOL)
            assert float(cache[f"{split}.rejected"][i]) == pytest.approx(float(r[0]), rel=RUN_TOL, abs=RUN_TOL)
    assert_same_metrics(read_jsonl(tmp_path / "live" / "metrics.jsonl"),
                        read_jsonl(tmp_path / "cached" / "metrics.jsonl"))


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, cache_dir):
    summary = train(TrainConfig(steps=3, batch_size=4, num_train=16, eval_size=4, num_codes=4, dtype="bfloat16",
                                output_dir=str(tmp_path), cache_dir=cache_dir, **TINY))
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=0.03)  # policy == reference at step 1, bf16 rounding
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert summary["eval"]["num_pairs"] == 4


def test_lora_run_trains_adapters_and_saves_a_merged_model(tmp_path, cache_dir):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from lpc.builders import build_policy

    cfg = TrainConfig(steps=3, batch_size=4, num_train=16, eval_size=4, num_codes=4, lora_r=4, lr=1e-2,
                      save_every=3, output_dir=str(tmp_path), cache_dir=cache_dir, **TINY)
    train(cfg)
    ck = tmp_path / "checkpoints" / "step-00000003"
    assert (ck / "adapter_model.safetensors").is_file() and not (ck / "model.safetensors").exists()
    adapter = load_file(str(ck / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    merged = load_file(str(tmp_path / "final" / "model.safetensors"))
    initial = build_policy(cfg)[0].state_dict()
    assert set(merged) <= set(initial)  # a plain HF model, no adapter keys
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], initial[q])  # the trained adapter was merged in
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged[emb], initial[emb])  # LoRA leaves non-adapted weights alone
    assert LPCModel.from_pretrained(tmp_path / "final").lpc.num_codes == 4


def test_lora_without_peft_is_a_clear_error(tmp_path, cache_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="--lora-r needs the optional `peft` package: pip install peft"):
        train(TrainConfig(steps=1, batch_size=4, num_train=8, eval_size=0, lora_r=4, num_codes=4,
                          output_dir=str(tmp_path), cache_dir=cache_dir, **TINY))


def test_flip_marker_reaches_the_synthetic_config(monkeypatch, cache_dir):
    from lpc.builders import build_data
    from lpc.data import synthetic
    from lpc.data.tokenizer import load_synthetic_tokenizer

    seen = []
    real = synthetic.make_splits
    monkeypatch.setattr(synthetic, "make_splits", lambda cfg: seen.append(cfg) or real(cfg))
    tok = load_synthetic_tokenizer(cache_dir)
    for marker in (True, False):
        build_data(TrainConfig(num_train=8, eval_size=4, flip_fraction=0.5, flip_marker=marker, **TINY), tok)
    assert [c.flip_marker for c in seen] == [True, False] and all(c.flip_fraction == 0.5 for c in seen)


def test_hf_model_dir_with_chat_template_and_ultrafeedback_sample(tmp_path, cache_dir):

    from lpc.tiny_model import dataset_texts, make_tiny_model

    sample = str(DATA / "ultrafeedback_sample.jsonl")
    model_dir = make_tiny_model(tmp_path / "model", dataset_texts(sample), vocab_size=400)
    summary = train(TrainConfig(model=str(model_dir), dataset=sample, steps=2, batch_size=4, eval_size=8,
                                num_codes=4, max_length=64, output_dir=str(tmp_path / "run"), threads=1,
                                progress=False))
    ev = summary["eval"]
    assert ev["num_pairs"] == 8 and set(ev["accuracy_by_source"]) <= {"evol_instruct", "false_qa", "sharegpt",
                                                                     "ultrachat"}
    assert (tmp_path / "run" / "final" / "chat_template.jinja").exists() or \
        "chat_template" in (tmp_path / "run" / "final" / "tokenizer_config.json").read_text()
