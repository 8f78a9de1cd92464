"""The LPC model wrapper, collation and synthetic data, each checked against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lpc_kernels as lk
from lpc.config import LossConfig, LPCConfig, SyntheticConfig
from lpc.data import PreferenceCollator, PreferenceDataset, synthetic
from lpc.hf import build_tiny_llama, final_hidden_states
from lpc.losses import code_perplexity, entropy_from_logits, preference_objective
from lpc.model import LPCModel, prior_mix_weight
from lpc.objective import Objective, make_reference, reference_logps, response_logps
from lpc.data.tokenizer import load_synthetic_tokenizer
from tests.helpers.runs import RUN_TOL


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_synthetic_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def rows():
    cfg = SyntheticConfig(num_train=6, num_eval=0, hint_prob=0.5, seed=3)
    return synthetic.generate_pairs(6, cfg, "train")


def _pairs(tokenizer, rows):
    ds = PreferenceDataset(rows, tokenizer)
    return [ds[i] for i in range(len(ds))]


def _batch(tokenizer, rows):
    return PreferenceCollator(tokenizer.pad_token_id)(_pairs(tokenizer, rows))


def _policy(tokenizer, dtype=torch.float64, seed=0):
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=seed).to(dtype)


def _independent_logps(logits_fn, pairs, side, z=None):
    """Sum of log_softmax(logits)[label] over answer tokens, one unpadded sequence at a time, float64."""
    out = []
    for i, pair in enumerate(pairs):
        ids = torch.tensor(pair.prompt + getattr(pair, side))
        n, p = len(ids), len(pair.prompt)
        logits = logits_fn(ids[None], None if z is None else z[i])[0].double()  # [n, V]
        lp = torch.log_softmax(logits, dim=-1)
        out.append(sum(lp[t - 1, ids[t]] for t in range(p, n)))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ collation
def test_dataset_adds_bos_eos_and_truncates(tokenizer):
    row = {"prompt": "user_1 asks : tell me about cats .", "chosen": "yeah cats are warm .",
           "rejected": "indeed cats are calm and moreover they seem old ."}
    ds = PreferenceDataset([row], tokenizer)
    p = ds[0]
    assert p.prompt[0] == tokenizer.bos_token_id and p.chosen[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(p.chosen[:-1]) == row["chosen"]
    assert tokenizer.unk_token_id not in p.prompt + p.chosen + p.rejected
    short = PreferenceDataset([row], tokenizer, max_length=8)[0]
    assert len(short.prompt) + max(len(short.chosen), len(short.rejected)) <= 8
    # the prompt (9 tokens) keeps BOS + its last 3 (max_length // 2 = 4), the answers their first 4
    assert short.prompt == [p.prompt[0]] + p.prompt[-3:]
    assert short.chosen == p.chosen[:4] and short.rejected == p.rejected[:4]


def test_dataset_chat_template_renders_prompt(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} :{% endif %}")
    row = {"prompt": "someone asks : tell me about tea .", "chosen": "yeah tea is warm .", "rejected": "maybe tea ."}
    p = PreferenceDataset([row], tok, chat_template=True)[0]
    assert tok.decode(p.prompt) == "<bos> someone asks : tell me about tea . :"  # one BOS, from the template
    with pytest.raises(ValueError, match="chat template"):
        PreferenceDataset([row], tokenizer, chat_template=True)


# --------------------------------------------------------------------------------- one backbone pass
def test_features_from_one_pass_match_independent_forwards(tokenizer, rows):
    policy = _policy(tokenizer)
    model = LPCModel(policy, LPCConfig(num_codes=4)).double().eval()
    pairs = _pairs(tokenizer, rows)
    batch = _batch(tokenizer, rows)
    with torch.no_grad():
        hidden = final_hidden_states(policy, batch)
        h_x, h_w, h_l = model.features(hidden, batch)
        for i, pair in enumerate(pairs):
            prompt_only = policy(torch.tensor([pair.prompt]), output_hidden_states=True)
            torch.testing.assert_close(h_x[i], prompt_only.hidden_states[-1][0, -1], rtol=1e-8, atol=1e-8)
            for side, h in (("chosen", h_w), ("rejected", h_l)):
                full = policy(torch.tensor([pair.prompt + getattr(pair, side)]), output_hidden_states=True)
                torch.testing.assert_close(h[i], full.hidden_states[-1][0, -1], rtol=1e-8, atol=1e-8)


def test_forward_never_materialises_full_logits(tokenizer, rows):
    policy = _policy(tokenizer, torch.float32)
    model = LPCModel(policy, LPCConfig(num_codes=4))

    def boom(*_):
        raise AssertionError("the LM head module was called: [N, V] logits materialised")

    handle = policy.lm_head.register_forward_hook(boom)
    try:
        out = model(_batch(tokenizer, rows), mix=0.5, seed=1, offset=0)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    finally:
        handle.remove()
    assert policy.lm_head.weight.grad is not None and model.codebook.grad is not None


@pytest.mark.parametrize("detach", [True, False])
def test_detach_features_stops_head_gradients_into_the_backbone(tokenizer, rows, detach):
    policy = _policy(tokenizer, torch.float32)
    model = LPCModel(policy, LPCConfig(num_codes=4, detach_features=detach))
    out = model(_batch(tokenizer, rows), mix=0.5, seed=0, offset=0)
    (out.prior_logits.sum() + out.posterior_logits.sum()).backward()
    backbone_grad = sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)
    assert (backbone_grad == 0.0) == detach
    assert model.posterior[0].weight.grad is not None and model.prior[0].weight.grad is not None


# ------------------------------------------------------------------------------- z before the LM head
def test_z_added_before_head_matches_float64_log_softmax(tokenizer, rows):
    policy = _policy(tokenizer)
    pairs = _pairs(tokenizer, rows)
    batch = _batch(tokenizer, rows)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2 * len(rows), 32, generator=gen, dtype=torch.float64)
    bias = torch.randn(len(tokenizer), generator=gen, dtype=torch.float64)
    w = policy.lm_head.weight
    with torch.no_grad():
        got = response_logps(final_hidden_states(policy, batch), batch, w, bias, z, backend="reference")

        def logits_fn(x, zi):
            h = policy(x, output_hidden_states=True).hidden_states[-1]
            return F.linear(h + zi, w, bias)

        for k, side in enumerate(("chosen", "rejected")):
            want = _independent_logps(logits_fn, pairs, side, z[k * len(rows):(k + 1) * len(rows)])
            torch.testing.assert_close(got[k * len(rows):(k + 1) * len(rows)], want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("inference", ["expected", "argmax"])
def test_inference_z_comes_from_the_prior(tokenizer, rows, inference):
    policy = _policy(tokenizer)
    model = LPCModel(policy, LPCConfig(num_codes=5, inference=inference, codebook_scale=0.5)).double().eval()
    batch = _batch(tokenizer, rows)
    with torch.no_grad():
        out = model(batch, use_prior=True)
        p = torch.softmax(out.prior_logits, -1)
        w = p if inference == "expected" else F.one_hot(p.argmax(-1), 5).double()
        z = w @ model.codebook
        torch.testing.assert_close(out.z, z)
        want = _independent_logps(lambda x, zi: policy.lm_head(policy(x, output_hidden_states=True)
                                                               .hidden_states[-1] + zi), _pairs(tokenizer, rows), "chosen", z)
        torch.testing.assert_close(out.chosen_logps, want, rtol=1e-8, atol=1e-8)


def test_training_latent_uses_gumbel_seed_and_prior_mix(tokenizer, rows):
    policy = _policy(tokenizer)
    model = LPCModel(policy, LPCConfig(num_codes=6, codebook_scale=0.5)).double()
    batch = _batch(tokenizer, rows)
    with torch.no_grad():
        a = model(batch, mix=0.0, seed=7, offset=0)
        b = model(batch, mix=0.0, seed=7, offset=0)
        c = model(batch, mix=0.0, seed=7, offset=model.gumbel_numel(len(rows)))
        torch.testing.assert_close(a.z, b.z)
        assert not torch.allclose(a.z, c.z)
        _, z_post = lk.gumbel_softmax_codes(a.posterior_logits, model.codebook, seed=7, offset=0)
        torch.testing.assert_close(a.z, z_post)
        d = model(batch, mix=0.25, seed=7, offset=0)
        z_prior = torch.softmax(d.prior_logits, -1) @ model.codebook
        torch.testing.assert_close(d.z, 0.25 * z_prior + 0.75 * z_post)


def test_prior_mix_schedule_values():
    assert [prior_mix_weight(s, 11) for s in (0, 1, 5, 10)] == pytest.approx([0.0, 0.1, 0.5, 1.0])
    assert prior_mix_weight(3, 11, "none") == 0.0
    assert prior_mix_weight(0, 1) == 1.0
    assert prior_mix_weight(50, 11) == 1.0  # clamped past the end
    with pytest.raises(ValueError, match="prior_mix"):
        prior_mix_weight(0, 10, "cosine")


def test_entropy_and_code_perplexity():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]])
    ent = entropy_from_logits(logits)
    assert ent[0] == pytest.approx(np.log(4)) and ent[1] == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.tensor([[30.0, 0, 0], [0, 30.0, 0]])  # two different codes used equally
    assert float(code_perplexity(one_hot)) == pytest.approx(2.0, rel=1e-5)


# ----------------------------------------------------------- K = 1 and kl_weight = 0 reduce to plain losses
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_single_code_lpc_equals_plain_loss_with_constant_z(tokenizer, rows, loss_type):
    ref_policy = _policy(tokenizer, seed=0)
    policy = _policy(tokenizer, seed=0)
    with torch.no_grad():  # move the policy away from the reference so the margins are not all zero
        for prm in policy.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    ref = make_reference(ref_policy)
    model = LPCModel(policy, LPCConfig(num_codes=1, codebook_scale=0.3)).double()
    pairs = _pairs(tokenizer, rows)
    batch = _batch(tokenizer, rows)
    beta, gamma = 0.1, 0.5
    cfg = LossConfig(loss_type=loss_type, beta=beta, gamma=gamma, kl_weight=0.0)
    out = model(batch, mix=0.4, seed=3, offset=11)
    ref_c, ref_r = reference_logps(ref, batch)
    got = preference_objective(out, ref_c, ref_r, cfg).loss

    e = model.codebook.detach()[0]
    with torch.no_grad():
        pol = {s: _independent_logps(lambda x, _: policy.lm_head(policy(x, output_hidden_states=True)
                                                                 .hidden_states[-1] + e), pairs, s)
               for s in ("chosen", "rejected")}
        rf = {s: _independent_logps(lambda x, _: ref(x).logits, pairs, s) for s in ("chosen", "rejected")}
    lw, ll = batch["chosen_lengths"].double(), batch["rejected_lengths"].double()
    if loss_type == "dpo":
        h = beta * ((pol["chosen"] - rf["chosen"]) - (pol["rejected"] - rf["rejected"]))
        want = -F.logsigmoid(h).mean()
    elif loss_type == "ipo":
        h = (pol["chosen"] - rf["chosen"]) / lw - (pol["rejected"] - rf["rejected"]) / ll
        want = ((h - 1 / (2 * beta)) ** 2).mean()
    else:
        h = beta * (pol["chosen"] / lw - pol["rejected"] / ll) - gamma
        want = -F.logsigmoid(h).mean()
    torch.testing.assert_close(got.detach(), want, rtol=1e-8, atol=1e-8)
    got.backward()  # the single code still learns: it shifts every answer token's logits
    assert model.codebook.grad is not None and bool(model.codebook.grad.abs().sum() > 0)


def test_save_and_load_roundtrip(tokenizer, rows, tmp_path):
    model = LPCModel(_policy(tokenizer, torch.float32), LPCConfig(num_codes=3, codebook_scale=0.5)).eval()
    batch = _batch(tokenizer, rows)
    path = model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    for name in ("model.safetensors", "config.json", "lpc_heads.safetensors", "lpc_config.json", "tokenizer.json"):
        assert (path / name).exists(), name
    loaded = LPCModel.from_pretrained(path).eval()
    with torch.no_grad():
        a, b = model(batch, use_prior=True), loaded(batch, use_prior=True)
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps)
    torch.testing.assert_close(a.prior_logits, b.prior_logits)


# -------------------------------------------------------------------------------------- synthetic data
def test_synthetic_is_deterministic_and_splits_are_independent():
    cfg = SyntheticConfig(num_train=50, num_eval=20, seed=5, hint_prob=0.5)
    a, b = synthetic.make_splits(cfg), synthetic.make_splits(cfg)
    assert a == b
    other = synthetic.make_splits(SyntheticConfig(num_train=80, num_eval=20, seed=5, hint_prob=0.5))
    assert other[1] == a[1]  # held-out pairs do not depend on the training split's size
    assert synthetic.make_splits(SyntheticConfig(num_train=50, num_eval=20, seed=6))[0] != a[0]
    train_prompts = {(r["prompt"], r["chosen"], r["rejected"]) for r in a[0]}
    assert not train_prompts & {(r["prompt"], r["chosen"], r["rejected"]) for r in a[1]}


def test_synthetic_ground_truth_consistency():
    cfg = SyntheticConfig(num_train=400, num_eval=0, seed=1, hint_prob=0.5)
    rows = synthetic.generate_pairs(400, cfg, "train")
    assert {r["source"] for r in rows} == set(range(len(synthetic.SOURCES)))
    for r in rows:
        s = r["source"]
        a, b = synthetic.parse_attributes(r["chosen"]), synthetic.parse_attributes(r["rejected"])
        ua, ub = synthetic.utility(s, a), synthetic.utility(s, b)
        assert ua == pytest.approx(r["chosen_utility"]) and ub == pytest.approx(r["rejected_utility"])
        assert ua - ub >= cfg.min_gap - 1e-12  # deterministic labels: the chosen answer wins by the gap
        assert r["source_name"] == synthetic.SOURCES[s]
        hinted = r["prompt"].startswith(synthetic.source_hint(s))
        assert hinted or r["prompt"].startswith(synthetic.ANON_SOURCE)
    # sources conflict: a good share of pairs would be labelled the other way by some other source
    assert synthetic.source_agreement(rows) < 0.5
    # with every prompt naming its source the Bayes-optimal accuracy is 1; without hints it drops
    full = SyntheticConfig(num_eval=300, hint_prob=1.0)
    assert synthetic.bayes_accuracy(synthetic.generate_pairs(300, full, "eval"), full) == 1.0
    blind = SyntheticConfig(num_eval=300, hint_prob=0.0, topic_bias=0.0)
    assert 0.55 < synthetic.bayes_accuracy(synthetic.generate_pairs(300, blind, "eval"), blind) < 0.85


def test_attributes_render_and_parse_roundtrip():
    rng = np.random.default_rng(0)
    for answer, _ in synthetic._answer_space():
        text = synthetic.render_answer(answer, "cats", rng)
        assert synthetic.parse_attributes(text) == answer, text
    assert sum(p for _, p in synthetic._answer_space()) == pytest.approx(1.0)


def test_flipped_labels_carry_the_marker():
    cfg = SyntheticConfig(num_train=200, flip_fraction=0.5, seed=2)
    rows = synthetic.generate_pairs(200, cfg, "train")
    flipped = [r for r in rows if r["flipped"]]
    assert 0.3 < len(flipped) / len(rows) < 0.7
    for r in rows:
        assert r["prompt"].endswith(synthetic.FLIP_MARKER) == r["flipped"]
        assert (r["chosen_utility"] < r["rejected_utility"]) == r["flipped"]
    assert not any(r["flipped"] for r in synthetic.generate_pairs(50, cfg, "eval"))


def test_source_posterior_uses_hint_and_topic():
    cfg = SyntheticConfig(topic_bias=0.5)
    np.testing.assert_allclose(synthetic.source_posterior("user_2 asks : tell me about cats .", cfg),
                               [0, 0, 1, 0])
    post = synthetic.source_posterior("someone asks : tell me about cats .", cfg)
    assert post.sum() == pytest.approx(1.0) and int(post.argmax()) == 0  # cats is a favourite of source 0


def test_tokenizer_is_cached_and_covers_the_lexicon(tmp_path):
    tok = load_synthetic_tokenizer(tmp_path)
    again = load_synthetic_tokenizer(tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # one cache entry, no leftover temp dirs
    assert tok.get_vocab() == again.get_vocab()
    ids = tok.convert_tokens_to_ids(synthetic.lexicon())
    assert tok.unk_token_id not in ids and len(set(ids)) == len(ids)
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == set(synthetic.SPECIAL_TOKENS)


# ------------------------------------------------------------------- Gumbel noise per training example
def test_gumbel_offsets_make_each_examples_noise_independent_of_micro_batching():
    """The posterior sample of example i at step s must not depend on how the global batch is split
    (gradient accumulation, data parallelism): compare a whole batch against two halves."""
    torch.manual_seed(0)
    k, g, step = 5, 6, 3
    cfg = LPCConfig(num_codes=k, prior_sample="gumbel")
    model = LPCModel.__new__(LPCModel)
    torch.nn.Module.__init__(model)
    model.lpc, model.backend = cfg, "reference"
    # float64: z = w @ E of fewer rows may take another GEMM blocking (RUN_TOL: sums in another order)
    model.codebook = torch.nn.Parameter(torch.randn(k, 4, dtype=torch.float64))
    model.register_buffer("hidden_rms", torch.tensor(1.5, dtype=torch.float64))
    post, prior = torch.randn(g, k, dtype=torch.float64), torch.randn(g, k, dtype=torch.float64)
    off, poff = model.gumbel_offsets(step, g, 0)
    # the documented layout: step s owns [s*2GK, (s+1)*2GK), posterior first, then the prior block
    assert (off, poff) == (step * 2 * g * k, step * 2 * g * k + g * k)
    w_full, z_full, _ = model.latent(prior, post, mix=0.5, seed=7, offset=off, prior_offset=poff)
    parts = []
    for lo, hi in ((0, 2), (2, 6)):
        o, p = model.gumbel_offsets(step, g, lo)
        parts.append(model.latent(prior[lo:hi], post[lo:hi], mix=0.5, seed=7, offset=o, prior_offset=p))
    torch.testing.assert_close(torch.cat([w for w, _, _ in parts]), w_full, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([z for _, z, _ in parts]), z_full, rtol=RUN_TOL, atol=RUN_TOL)
    # the whole-batch layout is the plain one the first trainer used: offset advanced by gumbel_numel
    assert off == step * model.gumbel_numel(g)
    w_plain, _, _ = model.latent(prior, post, mix=0.5, seed=7, offset=off)
    torch.testing.assert_close(w_plain, w_full, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type,lpc,free_bits", [("dpo", True, 0.0), ("ipo", True, 0.3), ("simpo", True, 0.0),
                                                     ("dpo", False, 0.0)])
def test_loss_in_the_forward_equals_the_composition(tokenizer, rows, loss_type, lpc, free_bits):
    """``forward(objective=...)`` (lk.linear_preference_loss inside the forward) against log-probs from the forward
    and ``preference_objective`` on them: the same loss, metrics inputs and every parameter's gradient (fp64)."""
    batch = _batch(tokenizer, rows)
    b = batch["chosen_lengths"].shape[0]
    ref = (None, None) if loss_type == "simpo" else (torch.randn(b, dtype=torch.float64) - 20,
                                                     torch.randn(b, dtype=torch.float64) - 20)
    cfg = LossConfig(loss_type=loss_type, kl_weight=0.7, free_bits=free_bits, backend="reference")
    got = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = LPCModel(_policy(tokenizer), LPCConfig(num_codes=4, codebook_scale=1.0) if lpc else None,
                         backend="reference").double()
        objective = Objective(*ref, cfg, 0.4) if fused else None
        out = model(batch, mix=0.3, seed=1, offset=0, objective=objective)
        res = preference_objective(out, *ref, cfg, kl_weight=0.4)
        res.loss.backward()
        got.append((res, out, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (r1, o1, g1), (r2, o2, g2) = got
    for a, c in zip(r1, r2):
        torch.testing.assert_close(a.detach(), c.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(o1.chosen_logps, o2.chosen_logps.detach(), rtol=1e-12, atol=1e-10)
    assert g1.keys() == g2.keys() and len(g1) > 5
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-8, atol=1e-12, msg=k)
