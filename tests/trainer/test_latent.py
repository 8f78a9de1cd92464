"""The latent made real (issue 16): z in units of the hidden states, the leak diagnostics and controls, the
``annotators`` preset and the statistics of the studies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lpc import analysis
from lpc.cli import parse_args as parse_train_args
from lpc.config import ConfigError, LossConfig, LPCConfig, SyntheticConfig, TrainConfig
from lpc.data import PreferenceCollator, PreferenceDataset, synthetic
from lpc.data.tokenizer import load_synthetic_tokenizer
from lpc.evaluate import evaluate
from lpc.experiments.common import bootstrap_ci, mean_ci, t975
from lpc.hf import build_tiny_llama
from lpc.losses import preference_objective
from lpc.model import LPCModel, LPCOutput
from lpc.objective import make_reference
from lpc.train import train
from lpc.train_components import LEAK_GAP, LEAK_WINDOW, leak_warning

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False)


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_synthetic_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    rows = synthetic.generate_pairs(12, SyntheticConfig(preset="annotators", label_mode="bradley_terry", seed=5),
                                    "eval")
    return rows, PreferenceDataset(rows, tokenizer), PreferenceCollator(tokenizer.pad_token_id)


def _model(tokenizer, num_codes=4, scale=1.0, seed=0):
    torch.manual_seed(seed)
    policy = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=seed).double()
    return LPCModel(policy, LPCConfig(num_codes=num_codes, codebook_scale=scale), backend="reference").double()


def _all(ds, collator):
    return collator([ds[i] for i in range(len(ds))])


# ------------------------------------------------------------------------------- z in units of the hidden states
def test_calibrate_sets_hidden_rms_to_the_rms_of_the_scored_hidden_states(tokenizer, pairs):
    _, ds, collator = pairs
    model = _model(tokenizer)
    batch = _all(ds, collator)
    rms = model.calibrate(batch)
    # independent: every unpadded sequence alone, the positions that predict its answer tokens
    sq, n = 0.0, 0
    for side in ("chosen", "rejected"):
        for i in range(len(ds)):
            pair = ds[i]
            ids = torch.tensor(pair.prompt + getattr(pair, side))
            length, p = len(ids), len(pair.prompt)
            with torch.no_grad():
                h = model.policy(ids[None], output_hidden_states=True).hidden_states[-1][0, p - 1:length - 1]
            sq, n = sq + float(h.pow(2).sum()), n + h.numel()
    assert rms == pytest.approx((sq / n) ** 0.5, rel=1e-6) and float(model.hidden_rms) == rms
    # z = E[k] * hidden_rms, E drawn with std codebook_scale
    codes = torch.arange(4)
    torch.testing.assert_close(model.code_z(codes), model.codebook * rms)
    w = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    torch.testing.assert_close(model.embed(w), (w @ model.codebook) * rms)


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_codebook_init_std_is_codebook_scale(tokenizer, scale):
    torch.manual_seed(1)
    policy = build_tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2)
    model = LPCModel(policy, LPCConfig(num_codes=64, codebook_scale=scale))
    assert float(model.codebook.detach().std()) == pytest.approx(scale, rel=0.05)  # 4096 draws: std error 1.1%


def test_heads_saved_before_hidden_rms_load_in_absolute_units(tokenizer, tmp_path):
    model = _model(tokenizer).float()
    model.hidden_rms.fill_(2.5)
    model.save_pretrained(tmp_path / "new")
    assert float(LPCModel.from_pretrained(tmp_path / "new").hidden_rms) == 2.5
    # an old checkpoint: no hidden_rms tensor, codebook_init_std in lpc_config.json
    old = tmp_path / "old"
    model.save_pretrained(old)
    heads = {k: v for k, v in load_file(str(old / "lpc_heads.safetensors")).items() if k != "hidden_rms"}
    save_file(heads, str(old / "lpc_heads.safetensors"))
    meta = json.loads((old / "lpc_config.json").read_text())
    meta["lpc"]["codebook_init_std"] = 0.02
    del meta["lpc"]["codebook_scale"]
    (old / "lpc_config.json").write_text(json.dumps(meta))
    (old / "manifest.json").unlink()  # saved before manifests existed
    loaded = LPCModel.from_pretrained(old)
    assert float(loaded.hidden_rms) == 1.0 and loaded.lpc.codebook_scale == 0.02
    torch.testing.assert_close(loaded.code_z(torch.arange(4)), model.codebook.detach())


# ------------------------------------------------------------------------------------ evaluation diagnostics
def _moved(model):
    """The policy moved off its reference, so that margins are not all zero."""
    ref = make_reference(model.policy)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref


def test_diagnostic_margins_follow_their_latents(tokenizer, pairs):
    rows, ds, collator = pairs
    model = _model(tokenizer, scale=1.0)
    ref = _moved(model)
    model.calibrate(_all(ds, collator))
    cfg = LossConfig(loss_type="dpo", beta=1.0)
    res, arr = evaluate(model, ref, ds, collator, cfg, batch_size=5, return_arrays=True, diagnostics=True)
    assert len(res["accuracy_by_code"]) == 4 and arr["margin_by_code"].shape == (12, 4)
    for key in ("accuracy_posterior", "accuracy_posterior_swapped", "accuracy_zero_z", "z_rms_ratio"):
        assert key in res, key
    # the posterior fed [h_l; h_w] is the posterior of the pair with its label swapped: scoring the swapped rows
    # with their own posterior gives the negated margins
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows]
    _, arr_sw = evaluate(model, ref, PreferenceDataset(swapped, tokenizer), collator, cfg, batch_size=5,
                         return_arrays=True, diagnostics=True)
    np.testing.assert_allclose(arr_sw["margin_posterior"], -arr["margin_posterior_swapped"], atol=1e-6)
    np.testing.assert_allclose(arr_sw["margin_zero"], -arr["margin_zero"], atol=1e-6)
    # a prior that puts all its mass on code 2 (inference argmax): the margins are those of code 2, and z's RMS
    # over the hidden states' (hidden_rms measured on these very pairs) is the RMS of E[2]
    with torch.no_grad():
        last = model.prior[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
    model.lpc.inference = "argmax"
    res2, arr2 = evaluate(model, ref, ds, collator, cfg, batch_size=5, return_arrays=True, diagnostics=True)
    np.testing.assert_allclose(arr2["margin"], arr2["margin_by_code"][:, 2], atol=1e-9)
    assert res2["z_rms_ratio"] == pytest.approx(float(model.codebook[2].detach().pow(2).mean().sqrt()), rel=1e-6)
    # z = 0 is the plain policy: its margins are the plain model's
    plain = LPCModel(model.policy, None, backend="reference")
    _, arr_plain = evaluate(plain, ref, ds, collator, cfg, batch_size=5, return_arrays=True)
    np.testing.assert_allclose(arr2["margin_zero"], arr_plain["margin"], atol=1e-9)


def test_a_zero_codebook_gives_the_same_accuracy_under_every_latent(tokenizer, pairs):
    _, ds, collator = pairs
    model = _model(tokenizer, scale=0.0)
    ref = _moved(model)
    res = evaluate(model, ref, ds, collator, LossConfig(loss_type="dpo"), batch_size=12, diagnostics=True)
    acc = res["accuracy"]
    assert res["accuracy_posterior"] == res["accuracy_posterior_swapped"] == res["accuracy_zero_z"] == acc
    assert res["accuracy_by_code"] == [acc] * 4 and res["z_rms_ratio"] == 0.0


# --------------------------------------------------------------------------------------------- leak controls
def _output(b=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -5 * torch.rand(b, generator=g, dtype=torch.float64)  # noqa: E731
    return LPCOutput(lp(), lp(), torch.full((b,), 3), torch.full((b,), 4),
                     torch.randn(b, k, generator=g, dtype=torch.float64) * 2,
                     torch.randn(b, k, generator=g, dtype=torch.float64) * 2, None, None, 0), lp(), lp()


@pytest.mark.parametrize("free_bits", [0.0, 0.3])
@pytest.mark.parametrize("kl_weight", [0.05, 1.0])
def test_objective_with_kl_weight_and_free_bits_matches_float64_formula(free_bits, kl_weight):
    out, ref_w, ref_l = _output()
    out.posterior_logits.requires_grad_(True)
    cfg = LossConfig(loss_type="dpo", beta=0.5, kl_weight=123.0, free_bits=free_bits, backend="reference")
    res = preference_objective(out, ref_w, ref_l, cfg, kl_weight=kl_weight)  # the step's weight wins
    q, logp = F.softmax(out.posterior_logits, -1), F.log_softmax(out.prior_logits, -1)
    kl = (q * (torch.log(q) - logp)).sum(-1)
    h = 0.5 * ((out.chosen_logps - ref_w) - (out.rejected_logps - ref_l))
    expected = -F.logsigmoid(h) + kl_weight * torch.maximum(kl, torch.tensor(free_bits, dtype=torch.float64))
    torch.testing.assert_close(res.losses.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.kl.double(), kl.detach(), rtol=1e-5, atol=1e-6)
    # free bits: no KL gradient for a pair whose KL is below the threshold (the DPO term does not depend on it)
    res.loss.backward()
    below = kl.detach() < free_bits
    if below.any():
        assert float(out.posterior_logits.grad[below].abs().max()) == 0.0
    assert float(out.posterior_logits.grad[~below].abs().max()) > 0.0


def test_kl_weight_warm_up_schedule():
    cfg = TrainConfig(kl_weight=0.8, kl_warmup_steps=4)
    assert [cfg.kl_weight_at(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert TrainConfig(kl_weight=0.8).kl_weight_at(0) == 0.8
    with pytest.raises(ConfigError, match="kl_warmup_steps"):
        TrainConfig(kl_warmup_steps=-1)
    with pytest.raises(ConfigError, match="free_bits"):
        TrainConfig(free_bits=-0.1)


def test_leak_warning_needs_a_full_window_and_a_large_gap():
    def window(post, prior, n=LEAK_WINDOW):
        return [{"lpc/posterior_accuracy": post, "lpc/prior_accuracy": prior}] * n

    assert leak_warning(window(0.95, 0.55, LEAK_WINDOW - 1)) is None
    assert leak_warning(window(0.55 + LEAK_GAP - 0.01, 0.55)) is None
    msg = leak_warning(window(0.95, 0.55))
    assert "95%" in msg and "55%" in msg and "--kl-weight" in msg and "accuracy_posterior_swapped" in msg
    assert leak_warning([{"loss": 0.7}] * LEAK_WINDOW) is None  # no LPC (or --no-latent-diagnostics)


# --------------------------------------------------------------------------- random labels: fitted through z?
RANDOM_LABELS = dict(synthetic="sources", flip_fraction=0.5, flip_marker=False, steps=200, batch_size=32,
                     num_train=2048, eval_size=512, lr=3e-3, warmup_steps=10, eval_every=10 ** 6, **TINY)


@pytest.mark.parametrize("leaky", [False, True])
def test_random_labels_are_not_fitted_through_z_at_the_defaults(tmp_path, cache_dir, capsys, leaky):
    """Half the training labels flipped without a marker: nothing to learn. At the defaults (KL weight 1, prior
    mix linear) the posterior's z carries nothing: held-out accuracy with it stays at chance. The paper's KL
    weight 0.05 without the prior mix (the control that shows the check can fail) leaks the label: the posterior
    ranks held-out pairs far above chance, the swapped posterior far below, and the trainer says so."""
    extra = dict(kl_weight=0.05, prior_mix="none") if leaky else {}
    summary = train(TrainConfig(output_dir=str(tmp_path / "run"), cache_dir=cache_dir, **RANDOM_LABELS, **extra))
    ev = summary["eval"]
    warned = "likely label leak" in capsys.readouterr().err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-50:]
    gap = np.mean([m["lpc/posterior_accuracy"] - m["lpc/prior_accuracy"] for m in metrics])
    if leaky:
        assert ev["accuracy_posterior"] > 0.8 and ev["accuracy_posterior_swapped"] < 0.2 and gap > 0.25 and warned
    else:  # 512 held-out pairs: the std error of an accuracy of 0.5 is 0.022
        assert abs(ev["accuracy_posterior"] - 0.5) < 0.07 and abs(ev["accuracy_posterior_swapped"] - 0.5) < 0.07
        assert abs(gap) < 0.05 and not warned


def test_training_metrics_carry_the_latent_diagnostics(tmp_path, cache_dir):
    base = dict(synthetic="annotators", steps=6, batch_size=8, num_train=64, eval_size=16, num_codes=4,
                kl_warmup_steps=4, cache_dir=cache_dir, **TINY)
    train(TrainConfig(output_dir=str(tmp_path / "a"), **base))
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lpc/kl_weight"] for m in metrics] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    for m in metrics:
        assert {"lpc/prior_accuracy", "lpc/posterior_accuracy", "lpc/z_rms_ratio"} <= set(m)
        assert m["lpc/z_rms_ratio"] > 0
    # step 1 has prior mix 0: z is the posterior's sample, so the batch accuracy is the posterior's
    assert metrics[0]["lpc/mix"] == 0.0 and metrics[0]["lpc/posterior_accuracy"] == metrics[0]["rewards/accuracies"]
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert len(ev["accuracy_by_code"]) == 4 and "accuracy_posterior_swapped" in ev
    train(TrainConfig(output_dir=str(tmp_path / "b"), latent_diagnostics=False, **base))
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert "lpc/prior_accuracy" not in first and "lpc/z_rms_ratio" in first
    assert first["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-6)  # diagnostics do not change training


# ------------------------------------------------------------------------------------- the annotators preset
@pytest.mark.parametrize("hint_prob, ceiling", [(1.0, "with_annotator"), (0.0, "prompt_only")])
def test_annotator_ceilings_are_the_accuracy_of_the_bayes_predictor_on_sampled_pairs(hint_prob, ceiling):
    cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry", hint_prob=hint_prob, seed=11)
    rows = synthetic.generate_pairs(12000, cfg, "eval")
    exact = synthetic.annotator_ceilings(cfg)[ceiling]
    # Monte Carlo over the generator's own label draws: std error <= sqrt(0.25 / 12000) = 0.0046
    assert synthetic.bayes_accuracy(rows, cfg) == pytest.approx(exact, abs=0.015)


def test_annotator_log_likelihoods_match_sampled_pairs():
    cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry", hint_prob=1.0, seed=4)
    ll = synthetic.annotator_log_likelihoods(cfg)
    rows = synthetic.generate_pairs(12000, cfg, "eval")
    known, mix, shared = [], [], []
    w_mean = synthetic.ANNOTATOR_WEIGHTS.mean(0) / cfg.bt_temperature  # one reward: the annotators' mean
    for r in rows:
        a, b = synthetic.parse_attributes(r["chosen"]).vector(), synthetic.parse_attributes(r["rejected"]).vector()
        gap = (synthetic.ANNOTATOR_WEIGHTS @ (np.array(a) - np.array(b))) / cfg.bt_temperature
        p_win = 1.0 / (1.0 + np.exp(-gap))  # P(chosen beats rejected) under each annotator
        known.append(np.log(p_win[r["source"]]))
        mix.append(np.log(p_win.mean()))
        shared.append(-np.logaddexp(0.0, -w_mean @ (np.array(a) - np.array(b))))
    # Monte Carlo std errors are about 0.005 here
    assert ll["with_annotator"] == pytest.approx(np.mean(known), abs=0.02)
    assert ll["mixture"] == pytest.approx(np.mean(mix), abs=0.02)
    # the fitted shared reward beats the mean-weights one and cannot beat the true mixture
    assert np.mean(shared) - 0.02 < ll["best_linear"] <= ll["mixture"] < ll["with_annotator"]


def test_annotators_preset_keeps_the_annotator_out_of_the_prompt():
    cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry", hint_prob=0.0, seed=2)
    rows = synthetic.generate_pairs(3000, cfg, "train")
    assert {r["prompt"].split()[0] for r in rows} == {synthetic.ANON_SOURCE}
    assert {r["source_name"] for r in rows} == set(synthetic.ANNOTATORS)
    # topics are uniform whoever the annotator: the prompt says nothing about them
    topic = np.array([synthetic.TOPICS.index(r["prompt"].split()[-2]) for r in rows])
    src = np.array([r["source"] for r in rows])
    assert analysis.normalized_mutual_information(topic, src) < 0.01
    ceilings = synthetic.annotator_ceilings(cfg)
    assert ceilings["prompt_only"] < ceilings["with_annotator"] - 0.1


def test_train_config_picks_the_presets_data():
    ann = TrainConfig(synthetic="annotators").synthetic_config()
    assert (ann.preset, ann.hint_prob, ann.label_mode) == ("annotators", 0.0, "bradley_terry")
    assert TrainConfig(synthetic="annotators", hint_prob=0.25).synthetic_config().hint_prob == 0.25
    src = TrainConfig().synthetic_config()
    assert (src.preset, src.hint_prob, src.label_mode) == ("sources", 0.5, "deterministic")
    with pytest.raises(ConfigError, match="synthetic"):
        TrainConfig(synthetic="voters")


def test_kl_weight_defaults_by_loss_and_an_explicit_one_wins(capsys):
    assert [TrainConfig(loss=loss).kl_weight for loss in ("dpo", "simpo", "ipo")] == [1.0, 1.0, 10.0]
    assert TrainConfig(loss="ipo", kl_weight=0.05).kl_weight == 0.05
    assert TrainConfig(**TrainConfig(loss="ipo").to_dict()).kl_weight == 10.0
    assert parse_train_args(["--loss", "ipo"]).kl_weight == 10.0
    assert parse_train_args(["--loss", "ipo", "--kl-weight", "0"]).kl_weight == 0.0
    with pytest.raises(SystemExit):
        parse_train_args(["--kl-weight", "-1"])
    assert "--kl-weight" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- study statistics
def test_adjusted_rand_index_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, ka, kb in ((50, 3, 4), (200, 6, 32), (7, 1, 3)):
        a, b = rng.integers(0, ka, n), rng.integers(0, kb, n)
        b[: n // 2] = a[: n // 2]  # partly agreeing
        assert analysis.adjusted_rand_index(a, b) == pytest.approx(sklearn_metrics.adjusted_rand_score(a, b))
    a = rng.integers(0, 5, 40)
    assert analysis.adjusted_rand_index(a, (a + 2) % 5) == pytest.approx(1.0)  # relabelled: identical
    with pytest.raises(ValueError, match="same items"):
        analysis.adjusted_rand_index([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        analysis.adjusted_rand_index([], [])


def test_few_shot_accuracy_finds_the_planted_codes():
    # three annotators, code a ranks annotator a's pairs right and the others' wrong
    src = np.repeat(np.arange(3), 30)
    m = np.where(np.arange(3)[None, :] == src[:, None], 1.0, -1.0)
    assert analysis.few_shot_accuracy(m, src, 1) == 1.0 and analysis.few_shot_accuracy(m, src, 16) == 1.0
    # no shots: the prior's favourite code for everyone (uniform -> code 0: right for annotator 0 only)
    assert analysis.few_shot_accuracy(m, src, 0) == pytest.approx(1 / 3)
    assert analysis.few_shot_accuracy(m, src, 0, log_prior=np.log([0.2, 0.2, 0.6])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="too few"):
        analysis.few_shot_accuracy(m, src, 30)
    with pytest.raises(ValueError, match="shots"):
        analysis.few_shot_accuracy(m, src, -1)


def test_few_shot_accuracy_with_one_shot_matches_exact_enumeration():
    rng = np.random.default_rng(3)
    src = np.repeat(np.arange(2), 9)
    m = rng.normal(size=(18, 5))
    exact = []  # one shot: each pair of the annotator is the support equally often
    for a in (0, 1):
        idx = np.flatnonzero(src == a)
        accs = []
        for s in idx:
            code = int(np.argmax(-np.log1p(np.exp(-m[s]))))
            accs.append(np.mean(m[idx[idx != s], code] > 0))
        exact.append(np.mean(accs))
    est = analysis.few_shot_accuracy(m, src, 1, draws=4000, seed=1)
    assert est == pytest.approx(np.mean(exact), abs=0.01)


def test_student_t_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 9, 30, 31, 45, 200):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-3)
    rng = np.random.default_rng(0)
    for n in (2, 5, 10):
        x = rng.normal(0.02, 0.03, n)
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert mean_ci(x) == pytest.approx((x.mean(), lo, hi), abs=2e-4)
    assert mean_ci([0.1]) == (0.1, 0.1, 0.1) and all(np.isnan(mean_ci([None])))
    m, lo, hi = bootstrap_ci(x)
    assert lo < m < hi and hi - lo < 2 * (mean_ci(x)[2] - m)
