"""Batch layouts (``--batch-layout padded|packed|shared-prompt``): the collated rows checked by hand, and the
log-probs, LPC features, loss and gradients of every layout against independent unpadded forwards and against each
other (float64), on a tiny Llama, GPT-2 and Qwen2, with eager and sdpa attention."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from lpc.builders import build_collator
from lpc.config import BATCH_LAYOUTS, ConfigError, LPCConfig, TrainConfig
from lpc.data import PreferenceCollator, TokenizedPair
from lpc.data.batching import pack_rows
from lpc.losses import LossConfig, preference_objective
from lpc.hf import build_tiny_llama, check_batch_layout, final_hidden_states, layout_mask
from lpc.model import LPCModel
from lpc.objective import response_logps
from lpc.train import train
from tests.helpers.runs import RUN_TOL, assert_same_metrics, read_jsonl

VOCAB = 40


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return VOCAB


def _hand_pairs():
    return [TokenizedPair(prompt=[2, 5, 6], chosen=[7, 8, 3], rejected=[9, 3], source=1),
            TokenizedPair(prompt=[2, 4], chosen=[3], rejected=[10, 11, 12, 3], source=-1)]


def _random_pairs(n, seed=0, longest=12):
    """Pairs of widely varying length (so that packing puts several sequences in one row)."""
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(prompt=[1] + toks(0, longest), chosen=toks(0, longest) + [2],
                          rejected=toks(0, longest) + [2], source=i % 3, index=i) for i in range(n)]


# ----------------------------------------------------------------------------------- rows, by hand
def _common_keys(b):
    assert b["prompt_lengths"].tolist() == [3, 2]
    assert b["chosen_lengths"].tolist() == [3, 1] and b["rejected_lengths"].tolist() == [2, 4]
    assert b["source"].tolist() == [1, -1]
    assert b["num_tokens"] == (3 + 3) + (2 + 1) + (3 + 2) + (2 + 4)  # prompt+chosen and prompt+rejected
    # the scored tokens are the answers, sequence by sequence: chosen of pair 0, 1, then rejected of 0, 1
    assert b["score_sequence"].tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert b["score_target"].tolist() == [7, 8, 3, 3, 9, 3, 10, 11, 12, 3]


def test_padded_rows_by_hand():
    b = PreferenceCollator(0)(_hand_pairs())
    _common_keys(b)
    assert b["layout"] == "padded"
    assert b["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3], [2, 4, 3, 0, 0, 0], [2, 5, 6, 9, 3, 0],
                                       [2, 4, 10, 11, 12, 3]]
    assert b["segment_ids"].tolist() == [[0] * 6, [1, 1, 1, -1, -1, -1], [2, 2, 2, 2, 2, -1], [3] * 6]
    assert b["position_ids"].tolist()[0] == list(range(6))
    # position t - 1 predicts token t; rows are 6 long
    assert b["score_index"].tolist() == [2, 3, 4, 7, 14, 15, 19, 20, 21, 22]
    assert b["feature_index"].tolist() == [[2, 7], [5, 8], [16, 23]]


def test_shared_prompt_rows_by_hand():
    b = PreferenceCollator(0, "shared-prompt")(_hand_pairs())
    _common_keys(b)
    # one row per pair [prompt | chosen | rejected], as long as the longest pair (3 + 3 + 2 = 8)
    assert b["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3, 9, 3], [2, 4, 3, 10, 11, 12, 3, 0]]
    # the rejected answer's positions restart at the prompt's end
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 2, 2, 3, 4, 5, 0]]
    assert b["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2, 2, 0]]
    assert b["segment_ids"].tolist() == [[0] * 8, [1] * 7 + [-1]]
    # both answers' first tokens are predicted by the last prompt token (positions 2 and 8 + 1)
    assert b["score_index"].tolist() == [2, 3, 4, 9, 2, 6, 9, 11, 12, 13]
    assert b["feature_index"].tolist() == [[2, 9], [5, 10], [7, 14]]


def test_packed_rows_by_hand():
    pairs = [TokenizedPair(prompt=[2, 5], chosen=[7, 3], rejected=[8, 9, 10, 3], source=0),
             TokenizedPair(prompt=[2], chosen=[4, 3], rejected=[3], source=0)]
    b = PreferenceCollator(0, "packed")(pairs)
    # sequences: chosen 0 (4 tokens), chosen 1 (3), rejected 0 (6), rejected 1 (2); rows of 6, first fit
    # decreasing: rejected 0 alone, chosen 0 + rejected 1, chosen 1 alone; rows ordered by first sequence
    assert b["input_ids"].tolist() == [[2, 5, 7, 3, 2, 3], [2, 4, 3, 0, 0, 0], [2, 5, 8, 9, 10, 3]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0], list(range(6))]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 3, 3], [1, 1, 1, -1, -1, -1], [2] * 6]
    assert b["score_sequence"].tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert b["score_index"].tolist() == [1, 2, 6, 7, 13, 14, 15, 16, 4]
    assert b["feature_index"].tolist() == [[1, 6], [3, 8], [17, 5]]
    assert b["num_tokens"] == 4 + 3 + 6 + 2


def test_layout_mask_by_hand():
    b = PreferenceCollator(0, "shared-prompt")(_hand_pairs())
    allowed = layout_mask(b["segment_ids"], b["branch_ids"])[:, 0]
    # row 0 = [p p p c c c r r]: the rejected tokens see the prompt and themselves, never the chosen answer
    assert allowed[0, 6].tolist() == [True, True, True, False, False, False, True, False]
    assert allowed[0, 7].tolist() == [True, True, True, False, False, False, True, True]
    assert allowed[0, 5].tolist() == [True] * 6 + [False, False]
    # row 1's padding query attends to itself only; no real token attends to it
    assert allowed[1, 7].tolist() == [False] * 7 + [True]
    assert not allowed[1, :7, 7].any()
    p = PreferenceCollator(0, "packed")([TokenizedPair([2], [4, 3], [3], 0), TokenizedPair([2, 5], [7, 3], [8, 3], 0)])
    m = layout_mask(p["segment_ids"], p["branch_ids"])[:, 0]
    seg = p["segment_ids"]
    for r in range(seg.shape[0]):  # block-diagonal causal: same sequence and not in the future
        for i in range(seg.shape[1]):
            for j in range(seg.shape[1]):
                want = (j <= i and seg[r, i] == seg[r, j] and seg[r, j] >= 0) or i == j
                assert bool(m[r, i, j]) == want, (r, i, j)


@pytest.mark.parametrize("capacity", [6, 9, 20])
def test_pack_rows_first_fit_decreasing(capacity):
    lengths = [5, 1, 6, 3, 2, 4, 6, 2]
    rows = pack_rows(lengths, capacity)
    assert sorted(u for r in rows for u in r) == list(range(len(lengths)))
    assert all(sum(lengths[u] for u in r) <= capacity for r in rows)
    # first-fit decreasing by hand never needs more rows than this lower bound + the FFD slack (11/9 OPT + 1)
    assert len(rows) >= -(-sum(lengths) // capacity)
    assert rows == sorted(rows, key=lambda r: r[0]) and all(r == sorted(r) for r in rows)


@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_split_keeps_order_and_budget(layout):
    collate = PreferenceCollator(0, layout)
    pairs = _random_pairs(13, seed=4)
    budget = 60
    groups = collate.split(pairs, budget)
    assert [p.index for g in groups for p in g] == list(range(13))
    assert all(collate.cost(g) <= budget or len(g) == 1 for g in groups)
    assert all(collate.cost(g + [h[0]]) > budget for g, h in zip(groups, groups[1:]))  # greedy: none could grow
    assert collate.split(pairs, None) == [pairs]
    b = collate(pairs)
    assert b["input_ids"].numel() == collate.cost(pairs)


def test_bad_layout_and_budget_are_clear_errors():
    with pytest.raises(ValueError, match="layout must be one of padded, packed, shared-prompt; got 'ragged'"):
        PreferenceCollator(0, "ragged")
    with pytest.raises(ConfigError, match="batch_layout"):
        TrainConfig(batch_layout="ragged")
    with pytest.raises(ConfigError, match="max_tokens_per_batch.*at least 2 \\* max_length = 128"):
        TrainConfig(max_length=64, max_tokens_per_batch=100)


def test_auto_takes_the_fastest_layout_the_attention_takes():
    policy = build_tiny_llama(_Tok(), hidden_size=16, num_layers=1, num_heads=2)
    cfg = TrainConfig()
    assert cfg.batch_layout == "auto"
    for impl, want in [("sdpa", "shared-prompt"), ("eager", "shared-prompt"), ("flash_attention_2", "packed"),
                       ("flex_attention", "padded")]:
        policy.config._attn_implementation = impl
        assert build_collator(cfg, _Tok(), policy).layout == want, impl
    # every model must take it: a flash-attention reference beside an sdpa policy -> packed
    other = build_tiny_llama(_Tok(), hidden_size=16, num_layers=1, num_heads=2)
    policy.config._attn_implementation = "sdpa"
    other.config._attn_implementation = "flash_attention_2"
    assert build_collator(cfg, _Tok(), policy, other).layout == "packed"


def test_attention_without_4d_masks_is_refused_by_name():
    policy = build_tiny_llama(_Tok(), hidden_size=16, num_layers=1, num_heads=2)
    policy.config._attn_implementation = "flash_attention_2"
    check_batch_layout(policy, "padded")
    check_batch_layout(policy, "packed")  # HF's varlen path through the position ids
    with pytest.raises(ValueError, match="batch layout 'shared-prompt'.*LlamaForCausalLM uses "
                                         "attn_implementation='flash_attention_2'"):
        check_batch_layout(policy, "shared-prompt")
    policy.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="batch_layout: batch layout 'packed'.*'flex_attention'"):
        build_collator(TrainConfig(batch_layout="packed"), _Tok(), policy)


# --------------------------------------------------------------------- against unpadded forwards
def _llama():
    return build_tiny_llama(_Tok(), hidden_size=32, num_layers=2, num_heads=4, seed=0)


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


MODELS = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_layout_matches_unpadded_forwards(arch, attn):
    model = MODELS[arch]().double().eval()
    model.config._attn_implementation = attn
    pairs = _random_pairs(7, seed=1)
    w = model.get_output_embeddings().weight

    def last_hidden(ids):
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]

    with torch.no_grad():
        want_logps, want_feat = [], [[], [], []]
        for side in ("chosen", "rejected"):
            for p in pairs:
                ids, n_p = p.prompt + getattr(p, side), len(p.prompt)
                h = last_hidden(ids)
                lp = torch.log_softmax(h @ w.T, -1)
                want_logps.append(sum(lp[t - 1, ids[t]] for t in range(n_p, len(ids))))
                want_feat[1 if side == "chosen" else 2].append(h[-1])
        want_feat[0] = [last_hidden(p.prompt)[-1] for p in pairs]
        want_logps = torch.stack(want_logps)
        rows = {}
        for layout in BATCH_LAYOUTS:
            batch = PreferenceCollator(0, layout)(pairs)
            rows[layout] = batch["input_ids"].shape[0]
            hidden = final_hidden_states(model, batch)
            # eager attention takes its softmax in fp32 (each weight rounded by <= 2^-24 relative); a log-prob sums
            # <= 16 tokens' log-softmax of values moved by that, so 1e-6 bounds it, nothing structural
            torch.testing.assert_close(response_logps(hidden, batch, w), want_logps, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{layout}: {m}")
            for k, name in enumerate(("h_x", "h_w", "h_l")):
                torch.testing.assert_close(hidden[batch["feature_index"][k]], torch.stack(want_feat[k]),
                                           rtol=1e-6, atol=1e-6, msg=lambda m: f"{layout} {name}: {m}")
    assert rows["padded"] == 2 * len(pairs) and rows["packed"] < 2 * len(pairs)  # packing shared rows here
    assert rows["shared-prompt"] <= len(pairs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_and_gradients_equal_across_layouts(arch):
    """One LPC-SimPO step (Gumbel latent, KL): loss and every gradient equal across the layouts (float64, RUN_TOL:
    the layouts sum the same terms in other orders)."""
    pairs = _random_pairs(6, seed=2)
    got = {}
    for layout in BATCH_LAYOUTS:
        torch.manual_seed(5)
        model = LPCModel(MODELS[arch](), LPCConfig(num_codes=4, codebook_scale=1.0), backend="reference").double()
        batch = PreferenceCollator(0, layout)(pairs)
        out = model(batch, mix=0.3, seed=7, offset=0, diagnostics=True)
        res = preference_objective(out, None, None, LossConfig(loss_type="simpo", kl_weight=0.5))
        res.loss.backward()
        got[layout] = (torch.cat([out.chosen_logps, out.rejected_logps]).detach(), res.loss.detach(),
                       {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
                       out.num_tokens)
    want = got["padded"]
    for layout in BATCH_LAYOUTS[1:]:
        logps, loss, grads, num_tokens = got[layout]
        assert loss.dtype == torch.float64
        torch.testing.assert_close(logps, want[0], rtol=RUN_TOL, atol=RUN_TOL)
        torch.testing.assert_close(loss, want[1], rtol=RUN_TOL, atol=RUN_TOL)
        assert grads.keys() == want[2].keys() and len(grads) > 10
        for k in grads:
            torch.testing.assert_close(grads[k], want[2][k], rtol=RUN_TOL, atol=RUN_TOL,
                                       msg=lambda m: f"{layout} {k}: {m}")
        assert num_tokens == want[3]


# ------------------------------------------------------------------------------------- training runs
def test_training_runs_agree_across_layouts_and_token_budgets(tmp_path, cache_dir, monkeypatch):
    """Three steps with accumulation, evaluation and a checkpoint: the same metrics in every layout, and with
    micro-batches cut into passes by --max-tokens-per-batch; the run resumes in another layout."""
    base = dict(steps=3, batch_size=8, gradient_accumulation_steps=2, num_train=32, eval_size=8, eval_every=3,
                hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False, num_codes=4, cache_dir=cache_dir,
                max_length=64, save_every=2, warmup_steps=1, dtype="float64")

    def run(name, **kw):
        train(TrainConfig(output_dir=str(tmp_path / name), **base, **kw))
        return read_jsonl(tmp_path / name / "metrics.jsonl"), json.load(open(tmp_path / name / "eval.json"))

    import lpc.train as train_module

    passes = []
    real = train_module.backbone_passes
    monkeypatch.setattr(train_module, "backbone_passes", lambda *a: passes.append(real(*a)) or passes[-1])
    want, want_eval = run("padded", batch_layout="padded")
    assert [len(p) for p in passes] == [1] * 6  # 3 steps x 2 micro-batches
    for name, kw in [("packed", dict(batch_layout="packed")), ("shared", dict(batch_layout="shared-prompt")),
                     ("budget", dict(batch_layout="shared-prompt", max_tokens_per_batch=128))]:
        passes.clear()
        got, got_eval = run(name, **kw)
        if name == "budget":  # the budget did cut micro-batches into several passes
            assert sum(len(p) for p in passes) > 6 and all(len(g) >= 1 for p in passes for _, g in p)
        assert_same_metrics(want, got)
        assert got_eval["accuracy"] == want_eval["accuracy"]
        assert got_eval["reward_margin"] == pytest.approx(want_eval["reward_margin"], rel=RUN_TOL, abs=RUN_TOL)
    # resume the padded run's step-2 checkpoint in the packed layout: step 3 as before
    shutil.copytree(tmp_path / "padded", tmp_path / "resumed")
    out = train(TrainConfig(output_dir=str(tmp_path / "resumed"), resume="latest", batch_layout="packed", **base))
    assert out["resumed_from"].endswith("step-00000002")
    assert_same_metrics(want, read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
