"""The command lines: bad flags, --config files, python -m lpc.evaluate and python -m lpc.generate."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lpc.config import TrainConfig
from lpc.cli import build_parser, parse_args
from lpc.train import main, train
from tests.helpers import DATA
from tests.helpers.runs import RUN_TOL, TINY_ARGS



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run")
    # float64: lpc.evaluate reloads final/ and scores other batches than the trainer did (RUN_TOL)
    train(TrainConfig(steps=6, batch_size=4, num_train=32, eval_size=16, num_codes=4, hidden_size=32, num_layers=1,
                      num_heads=2, threads=1, progress=False, output_dir=str(out), cache_dir=cache_dir,
                      dtype="float64"))
    return out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size: must be an integer >= 1"),
    (["--lr", "0"], "--lr: must be a number > 0"),
    (["--loss", "kto"], "argument --loss: invalid choice: 'kto'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice"),
    (["--batch-size", "4", "--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps: must divide"),
    (["--max-length", "64", "--max-prompt-length", "64"], "--max-prompt-length: must be None or an integer in [1,"),
    (["--lora-r", "-1"], "--lora-r: must be an integer >= 0"),
    (["--lora-dropout", "1.5"], "--lora-dropout: must be in [0, 1)"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio: must be a number in [0, 1]"),
    (["--label-smoothing", "0.5"], "--label-smoothing: must be in [0, 0.5)"),
    (["--device", "gpu"], "--device: must be 'auto' or a torch device"),
    (["--hidden-size", "30", "--num-heads", "4"], "--num-heads: must divide hidden_size=30"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--config", "/nonexistent/c.yaml"], "--config: file '/nonexistent/c.yaml' does not exist"),
    (["--resume", "/nonexistent/run"], "--resume '/nonexistent/run': no such directory"),
    (["--resume", "latest"], "--resume latest needs --output-dir"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "python -m lpc.train: error:" in err and message in " ".join(err.split()), err


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "--model: '/nonexistent/model' is not a directory"),
    (["--dataset", "/nonexistent/prefs.jsonl"], "dataset file '/nonexistent/prefs.jsonl' does not exist"),
    (["--dataset", str(DATA / "malformed.jsonl"), "--strict"], "malformed.jsonl:3: missing field"),
])
def test_bad_paths_exit_before_training(argv, message, tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + TINY_ARGS + ["--output-dir", str(tmp_path / "r"), "--cache-dir", cache_dir])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path, cache_dir, capsys):
    args = ["--steps", "2", "--batch-size", "4", "--num-train", "8", "--eval-size", "0", "--save-every", "2",
            "--output-dir", str(tmp_path), "--cache-dir", cache_dir, *TINY_ARGS]
    main(args)
    with pytest.raises(SystemExit):
        main(args)
    assert "already holds checkpoints of a run; pass --resume latest" in capsys.readouterr().err


def test_config_file_layers_under_explicit_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("loss: ipo\nbatch-size: 8\nlr: 1e-4\nlpc: false\nmax_prompt_length: 32\n")
    cfg = parse_args(["--config", str(cfg_file), "--batch-size", "16"])
    assert (cfg.loss, cfg.batch_size, cfg.lr, cfg.lpc, cfg.max_prompt_length) == ("ipo", 16, 1e-4, False, 32)
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "dtype": "bfloat16"}))
    cfg = parse_args(["--config", str(tmp_path / "c.json")])
    assert cfg.steps == 7 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("text, message", [
    ("btach_size: 4\n", "unknown setting 'btach_size' (did you mean 'batch_size'?)"),
    ("steps: many\n", "--steps must be an integer, got 'many'"),
    ("lpc: 1\n", "--lpc must be true or false"),
    ("loss: kto\n", "--loss must be one of ['dpo', 'ipo', 'simpo', 'sigmoid']"),
    ("- a\n- b\n", "expected a mapping"),
    ("steps: [1\n", "is not valid YAML"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert message in capsys.readouterr().err


def test_saved_config_reproduces_the_run_config(tiny_run):
    saved = tiny_run / "train_config.json"
    cfg = parse_args(["--config", str(saved)])
    assert cfg.to_dict() == json.loads(saved.read_text())


def test_help_documents_every_flag_with_its_default():
    text = build_parser().format_help()
    entries = re.findall(r"\n  (--[\w-]+)(.*?)(?=\n  -|\n\n|\Z)", text, re.S)
    flags = {f for f, _ in entries}
    assert len(flags) > 60
    for flag, body in entries:
        assert "default:" in " ".join(body.split()), flag
    # the documented defaults of the main flags (--no-lpc shares the "--lpc, --no-lpc" entry)
    entry_of = {flag: flag + body for flag, body in entries}
    for flag, default in (("--loss", "dpo"), ("--num-codes", "32"), ("--kl-weight", None), ("--beta", "0.1"),
                          ("--gamma", "0.5"), ("--tau", "1.0"), ("--seed", "0"), ("--backend", "auto"),
                          ("--no-lpc", None)):
        entry = entry_of.get(flag) or next(e for e in entry_of.values() if flag in e.strip().split("\n")[0])
        assert "default:" in " ".join(entry.split()), flag
        if default is not None:
            assert f"default: {default})" in " ".join(entry.split()), (flag, entry)
    kl = " ".join(entry_of["--kl-weight"].split())  # a default per loss (config.DEFAULT_KL_WEIGHT)
    assert "default: 1 for dpo and simpo" in kl and "10 for ipo" in kl, kl
    # one flag per TrainConfig field
    from dataclasses import fields

    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in flags, f.name


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_cli_writes_json_and_plots_matching_the_run(tiny_run, capsys):
    from lpc.evaluate import main as evaluate_main

    res = evaluate_main(["--run", str(tiny_run)])
    out = tiny_run / "evaluation"
    data = json.loads((out / "evaluation.json").read_text())
    ev = json.loads((tiny_run / "eval.json").read_text())
    # a fresh process-independent path (model reloaded from final/, reference rebuilt from the seed)
    for k in ("accuracy", "reward_margin", "loss", "num_pairs"):
        assert data[k] == pytest.approx(ev[k], rel=RUN_TOL, abs=RUN_TOL), k
    assert sum(data["prior_code_histogram"]) == 16 and len(data["posterior_code_histogram"]) == 4
    # the leak diagnostics, as the trainer's final evaluation computed them
    for k in ("accuracy_posterior", "accuracy_posterior_swapped", "accuracy_zero_z", "z_rms_ratio"):
        assert data[k] == pytest.approx(ev[k], rel=RUN_TOL, abs=RUN_TOL), k
    assert len(data["accuracy_by_code"]) == 4 and data["accuracy_by_code"] == pytest.approx(ev["accuracy_by_code"])
    assert 1.0 <= data["prior_code_usage_perplexity"] <= 4.0
    assert set(data["num_pairs_by_source"]) == set(data["accuracy_by_source"])
    pytest.importorskip("matplotlib")
    for name in ("code_usage.png", "reward_margins.png", "accuracy_by_source.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "held-out preference accuracy" in capsys.readouterr().out and res["plots"]


def test_evaluate_cli_errors(tmp_path, capsys):
    from lpc.evaluate import main as evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main(["--run", str(tmp_path)])
    assert "no train_config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ generate
def _greedy_reference(model, ids, z, n):
    """Greedy decoding without a KV cache: the full sequence each step, z added before the LM head."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            h = model.policy(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0, -1]
            tok = int(model.policy.lm_head(h + z).argmax())
            out.append(tok)
            seq.append(tok)
    return out


def test_generate_cli_forced_codes_match_an_uncached_greedy_decoder(tiny_run, capsys):
    from lpc.generate import main as generate_main, prompt_ids
    from lpc.model import LPCModel
    from transformers import AutoTokenizer

    prompt = "user_1 asks : tell me about cats ."
    answers = generate_main(["--run", str(tiny_run), "--prompt", prompt, "--code", "all", "--max-new-tokens", "6",
                             "--json"])
    assert [a["code"] for a in answers] == [0, 1, 2, 3]
    model = LPCModel.from_pretrained(tiny_run / "final").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_run / "final"))
    ids = prompt_ids(tok, prompt, chat=False)
    assert ids[0] == tok.bos_token_id
    for a in answers:
        want = _greedy_reference(model, ids, (model.codebook[a["code"]] * model.hidden_rms).detach(), 6)
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id) + 1]
        assert a["text"] == tok.decode(want, skip_special_tokens=True)
        assert sum(a["prior"]) == pytest.approx(1.0, abs=1e-3)
    # z from the prior (the default): the expected embedding (softmax(prior) @ E) * hidden_rms
    (prior_answer,) = generate_main(["--run", str(tiny_run), "--prompt", prompt, "--max-new-tokens", "6"])
    probs = torch.tensor(prior_answer["prior"], dtype=model.codebook.dtype)
    want = _greedy_reference(model, ids, (torch.softmax(torch.log(probs), -1) @ model.codebook
                                          * model.hidden_rms).detach(), 6)
    if tok.eos_token_id in want:
        want = want[:want.index(tok.eos_token_id) + 1]
    assert prior_answer["text"] == tok.decode(want, skip_special_tokens=True)
    assert "z from the prior" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--code", "7"], "--code: must be in [0, 4)"),
    (["--code", "x"], "--code: expected an integer in [0, 4) or 'all'"),
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
])
def test_generate_cli_bad_flags(tiny_run, capsys, argv, message):
    from lpc.generate import main as generate_main

    with pytest.raises(SystemExit):
        generate_main(["--run", str(tiny_run), "--prompt", "hi"] + argv)
    assert message in capsys.readouterr().err
