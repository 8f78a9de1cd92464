"""``lpc.analysis``: metrics against hand-computed cases, label-noise injection, projection, plots, latents."""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest

from lpc import analysis, plots
from lpc.data import synthetic
from lpc.analysis import (code_histogram, flip_mask, flip_pairs, normalized_mutual_information, perplexity,
                          project_2d)
from lpc.config import SyntheticConfig


# ------------------------------------------------------------------------------------------------ NMI
def test_nmi_identical_and_relabelled_partitions_are_one():
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    # only the partition matters: renamed labels (and strings) give the same value
    assert normalized_mutual_information([0, 0, 1, 1], [7, 7, 3, 3]) == pytest.approx(1.0)
    assert normalized_mutual_information(["a", "a", "b", "b"], [1, 1, 0, 0]) == pytest.approx(1.0)


def test_nmi_independent_labelings_are_zero():
    # every combination (a, b) occurs once: p(a, b) = p(a) p(b), so I(a; b) = 0
    assert normalized_mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)


def test_nmi_hand_computed_case():
    # a = [0,0,1,1], b = [0,0,0,1]: p(0,0) = 1/2, p(1,0) = 1/4, p(1,1) = 1/4; p(a) = (1/2, 1/2), p(b) = (3/4, 1/4)
    mi = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + \
        0.25 * math.log(0.25 / (0.5 * 0.25))
    h_a = math.log(2)
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((h_a + h_b) / 2)
    assert expected == pytest.approx(0.3437, abs=1e-4)  # the hand arithmetic itself, to 4 digits
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected, rel=1e-12)
    assert normalized_mutual_information([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(expected, rel=1e-12)


def test_nmi_matches_scikit_learn_on_random_labelings():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for n, ka, kb in ((5, 2, 3), (50, 4, 4), (300, 8, 3)):
        a, b = rng.integers(0, ka, n), rng.integers(0, kb, n)
        assert normalized_mutual_information(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b),
                                                                    abs=1e-12)


def test_nmi_degenerate_cases():
    assert normalized_mutual_information([3, 3, 3], [1, 1, 1]) == 1.0  # both one cluster: identical partitions
    assert normalized_mutual_information([3, 3, 3], [0, 1, 2]) == 0.0  # one labeling carries no information
    assert normalized_mutual_information([0, 1, 2], [5, 5, 5]) == 0.0
    assert normalized_mutual_information([4], [9]) == 1.0  # one item: a single cluster each


@pytest.mark.parametrize("a, b, match", [([], [], "empty"), ([0, 1], [0], "same items"),
                                         ([[0, 1]], [[0, 1]], "1-D"), ([0, 1], [[0], [1]], "b must be")])
def test_nmi_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        normalized_mutual_information(a, b)


# ------------------------------------------------------------------------------- perplexity, histogram
def test_perplexity_hand_computed():
    assert perplexity([0.25] * 4) == pytest.approx(4.0)
    assert perplexity([1.0, 0.0, 0.0]) == pytest.approx(1.0)  # 0 log 0 = 0
    assert perplexity([0.5, 0.5, 0.0]) == pytest.approx(2.0)
    # H = 1/2 log 2 + 2 * 1/4 log 4 = 3/2 log 2  ->  exp(H) = 2^1.5
    assert perplexity([0.5, 0.25, 0.25]) == pytest.approx(2 ** 1.5)
    assert perplexity(np.full(128, 1 / 128)) == pytest.approx(128.0)


@pytest.mark.parametrize("p, match", [([0.5, 0.6], "sum to 1"), ([1.5, -0.5], "non-negative"), ([], "non-empty"),
                                      ([[0.5, 0.5]], "1-D"), ([np.nan, 1.0], "finite"), ([3, 1], "sum to 1")])
def test_perplexity_bad_inputs(p, match):
    with pytest.raises(ValueError, match=match):
        perplexity(p)


def test_code_histogram_counts():
    h = code_histogram(np.array([0, 2, 2, 3]), 5)
    assert h.dtype == np.int64 and h.tolist() == [1, 0, 2, 1, 0]
    assert code_histogram([], 3).tolist() == [0, 0, 0]
    assert code_histogram([1, 1, 1], 2).tolist() == [0, 3]
    assert perplexity(code_histogram([0, 1, 2, 3], 4) / 4) == pytest.approx(4.0)


@pytest.mark.parametrize("codes, k, match", [([0, 5], 5, r"\[0, num_codes=5\)"), ([-1, 0], 3, "lie in"),
                                             ([0, 1], 0, "num_codes"), ([0.5, 1.0], 3, "integers"),
                                             ([[0, 1]], 3, "1-D"), ([0], True, "num_codes")])
def test_code_histogram_bad_inputs(codes, k, match):
    with pytest.raises(ValueError, match=match):
        code_histogram(codes, k)


def test_mean_std():
    assert analysis.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std of 1, 2, 3 is 1
    assert analysis.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in analysis.mean_std([]))


# ----------------------------------------------------------------------------------------- label noise
def test_flip_mask_exact_count_seeded_and_nested():
    m = flip_mask(10, 0.3, seed=1)
    assert m.dtype == bool and m.sum() == 3
    assert (flip_mask(10, 0.3, seed=1) == m).all()
    assert flip_mask(7, 0.0).sum() == 0 and flip_mask(7, 1.0).all() and flip_mask(0, 0.5).size == 0
    assert flip_mask(1000, 0.25, seed=0).sum() == 250 and flip_mask(5, 0.5).sum() == 2  # round(2.5) = 2
    # same seed: a lower rate flips a subset of what a higher rate flips (noise levels are nested)
    low, high = flip_mask(200, 0.1, seed=4), flip_mask(200, 0.4, seed=4)
    assert (high[low]).all()


@pytest.mark.parametrize("n, frac, match", [(-1, 0.1, "n must"), (10, 1.5, "fraction"), (10, -0.1, "fraction"),
                                            (2.5, 0.1, "n must")])
def test_flip_mask_bad_inputs(n, frac, match):
    with pytest.raises(ValueError, match=match):
        flip_mask(n, frac)


def _rows(n):
    return [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "chosen_utility": 1.0,
             "rejected_utility": -1.0, "source": i % 2} for i in range(n)]


def test_flip_pairs_swaps_marks_and_leaves_the_input_alone():
    rows = _rows(8)
    before = [dict(r) for r in rows]
    out = flip_pairs(rows, 0.5, marker="[FLIP]", seed=0)
    assert rows == before  # copies, not edits
    mask = flip_mask(8, 0.5, seed=0)
    assert [r["flipped"] for r in out] == mask.tolist() and sum(mask) == 4
    for i, (r, flipped) in enumerate(zip(out, mask)):
        if flipped:
            assert (r["prompt"], r["chosen"], r["rejected"]) == (f"p{i} [FLIP]", f"bad{i}", f"good{i}")
            assert (r["chosen_utility"], r["rejected_utility"]) == (-1.0, 1.0)
        else:
            assert (r["prompt"], r["chosen"], r["rejected"]) == (f"p{i}", f"good{i}", f"bad{i}")
        assert r["source"] == i % 2
    unmarked = flip_pairs(rows, 0.5, seed=0)
    assert [r["prompt"] for r in unmarked] == [f"p{i}" for i in range(8)]
    assert [r["chosen"] for r in unmarked] == [r["chosen"] for r in out]


def test_flip_pairs_bad_inputs():
    with pytest.raises(ValueError, match=r"rows\[1\] lacks \['rejected'\]"):
        flip_pairs([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], 0.5)
    with pytest.raises(ValueError, match="marker"):
        flip_pairs(_rows(2), 0.5, marker=" ")
    with pytest.raises(ValueError, match="fraction"):
        flip_pairs(_rows(2), 2.0)


def test_synthetic_flip_marker_optional_and_same_pairs_flipped():
    base = SyntheticConfig(num_train=300, flip_fraction=0.5, seed=5)
    unmarked_cfg = dataclasses.replace(base, flip_marker=False)
    marked = synthetic.generate_pairs(300, base, "train")
    unmarked = synthetic.generate_pairs(300, unmarked_cfg, "train")
    assert 0.4 < sum(r["flipped"] for r in marked) / 300 < 0.6
    for m, u in zip(marked, unmarked):
        assert m["flipped"] == u["flipped"] and (m["chosen"], m["rejected"]) == (u["chosen"], u["rejected"])
        assert m["prompt"].endswith(" " + synthetic.FLIP_MARKER) == m["flipped"]
        assert not u["prompt"].endswith(synthetic.FLIP_MARKER)
        assert u["prompt"] == (m["prompt"][:-len(synthetic.FLIP_MARKER) - 1] if m["flipped"] else m["prompt"])
        # a flipped pair prefers the answer its source likes less
        assert (u["chosen_utility"] < u["rejected_utility"]) == u["flipped"]


# ------------------------------------------------------------------------------------------ projection
def test_pca_projection_of_points_on_a_line():
    t = np.linspace(-2, 2, 9)
    x = np.outer(t, [1.0, 2.0, 0.0]) + np.array([5.0, -1.0, 3.0])  # on the line c + t * (1, 2, 0)
    xy, method = project_2d(x, method="pca")
    assert method == "pca" and xy.shape == (9, 2)
    # first principal axis is (1, 2, 0)/sqrt(5): coordinates are +-t*sqrt(5) about the mean; nothing is left
    assert np.abs(xy[:, 0]) == pytest.approx(np.abs(t) * math.sqrt(5))
    assert xy[:, 1] == pytest.approx(np.zeros(9), abs=1e-9)
    xy1, _ = project_2d(t[:, None], method="pca")  # one feature: a zero second coordinate
    assert xy1.shape == (9, 2) and (xy1[:, 1] == 0).all()


def test_auto_projection_uses_tsne_when_sklearn_is_installed():
    pytest.importorskip("sklearn.manifold")
    rng = np.random.default_rng(0)
    # two far-apart clusters stay apart in the embedding
    x = np.concatenate([rng.normal(0, 0.1, (20, 5)), rng.normal(10, 0.1, (20, 5))])
    xy, method = project_2d(x)
    assert method == "tsne" and xy.shape == (40, 2)
    c0, c1 = xy[:20].mean(0), xy[20:].mean(0)
    spread = max(np.linalg.norm(xy[:20] - c0, axis=1).max(), np.linalg.norm(xy[20:] - c1, axis=1).max())
    assert np.linalg.norm(c0 - c1) > spread


@pytest.mark.parametrize("x, method, match", [(np.zeros((1, 3)), "pca", "N >= 2"), (np.zeros(5), "pca", "N >= 2"),
                                              (np.full((3, 2), np.inf), "pca", "finite"),
                                              (np.zeros((3, 2)), "umap", "method")])
def test_projection_bad_inputs(x, method, match):
    with pytest.raises(ValueError, match=match):
        project_2d(x, method=method)


# ----------------------------------------------------------------------------------------------- plots
def test_plots_are_written_whole(tmp_path):
    pytest.importorskip("matplotlib")
    p = plots.plot_code_usage({"a": np.array([3, 0, 1]), "b": np.array([1, 1])}, tmp_path / "sub" / "u.png")
    assert p == tmp_path / "sub" / "u.png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = plots.plot_projection({"post": np.zeros((4, 2)), "prior": np.ones((4, 2))}, [0, 1, 0, 1],
                                 tmp_path / "p.png", label_names=["x", "y"])
    b = plots.plot_bars(["g1", "g2"], {"s": ([0.5, 0.6], [0.1, 0.0])}, tmp_path / "b.png", ylabel="acc")
    ln = plots.plot_lines([1, 2], {"s": ([0.5, float("nan")], [0.0, 0.0])}, tmp_path / "l.png", xlabel="x",
                             ylabel="y")
    for path in (q, b, ln):
        assert path.stat().st_size > 1000
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.png", "l.png", "p.png", "sub"]  # no temp files left


def test_plot_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_code_usage({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"histograms\['a'\]"):
        plots.plot_code_usage({"a": np.array([-1, 2])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"panels\['p'\] must be \[N=3, 2\]"):
        plots.plot_projection({"p": np.zeros((2, 2))}, [0, 1, 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 means"):
        plots.plot_bars(["a", "b"], {"s": ([1.0], [0.0])}, tmp_path / "x.png", ylabel="y")


def test_plots_without_matplotlib_warn_and_return_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        assert plots.plot_code_usage({"a": np.array([1, 2])}, tmp_path / "u.png") is None
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- latents
@pytest.fixture(scope="module")
def tiny(cache_dir):
    import torch

    from lpc.config import LPCConfig
    from lpc.data import PreferenceCollator, PreferenceDataset
    from lpc.hf import build_tiny_llama
    from lpc.model import LPCModel
    from lpc.data.tokenizer import load_synthetic_tokenizer

    tok = load_synthetic_tokenizer(cache_dir)
    rows = synthetic.generate_pairs(10, SyntheticConfig(seed=1), "eval")
    ds = PreferenceDataset(rows, tok)
    torch.manual_seed(0)
    policy = build_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2)
    return tok, rows, ds, PreferenceCollator(tok.pad_token_id), LPCModel(policy, LPCConfig(num_codes=4)), policy


def test_collect_latents_per_pair(tiny):
    import torch

    from lpc.evaluate import collect_latents

    _, rows, ds, collator, model, _ = tiny
    model.train()
    lat = collect_latents(model, ds, collator, batch_size=3)  # 3 does not divide 10: a ragged batch
    assert model.training  # mode restored
    assert lat["prior_probs"].shape == (10, 4) and lat["z_posterior"].shape == (10, 16)
    assert lat["source"].tolist() == [r["source"] for r in rows]
    assert lat["prior_probs"].sum(1) == pytest.approx(np.ones(10), abs=1e-5)
    assert lat["posterior_probs"].sum(1) == pytest.approx(np.ones(10), abs=1e-5)
    assert (lat["prior_code"] == lat["prior_probs"].argmax(1)).all()
    assert (lat["posterior_code"] == lat["posterior_probs"].argmax(1)).all()
    e = (model.codebook * model.hidden_rms).detach().numpy()
    # expected embeddings: z = (p @ E) * hidden_rms (the model's default inference mode for the prior)
    assert lat["z_prior"] == pytest.approx(lat["prior_probs"] @ e, abs=1e-5)
    assert lat["z_posterior"] == pytest.approx(lat["posterior_probs"] @ e, abs=1e-5)
    # batch size does not change per-pair results
    lat10 = collect_latents(model, ds, collator, batch_size=10)
    assert lat10["prior_probs"] == pytest.approx(lat["prior_probs"], abs=1e-5)
    empty = collect_latents(model, type(ds)([], tiny[0]), collator)
    assert empty["z_prior"].shape == (0, 16) and empty["posterior_probs"].shape == (0, 4)
    assert empty.keys() == lat.keys()
    assert torch.get_num_threads() >= 1


def test_collect_latents_bad_inputs(tiny):
    from lpc.evaluate import collect_latents
    from lpc.model import LPCModel

    _, _, ds, collator, model, policy = tiny
    with pytest.raises(ValueError, match="needs an LPC model"):
        collect_latents(LPCModel(policy, None), ds, collator)
    with pytest.raises(ValueError, match="batch_size"):
        collect_latents(model, ds, collator, batch_size=0)
