"""Data with users (issue 30, items 1 and 2): user ids from files and named datasets, the annotators preset's users
and its held-out unseen users with their exact ceilings (checked against an enumeration written here), the user
index in every batch layout, the user-grouped sampler, and short training runs with ``--pairs-per-user``."""

from __future__ import annotations

import itertools
import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from lpc.builders import build_sampler
from lpc.config import BATCH_LAYOUTS, ConfigError, SyntheticConfig, TrainConfig
from lpc.data import (DataError, EpochSampler, PreferenceCollator, PreferenceDataset, TokenizedPair,
                      UserGroupedSampler, assign_user_ids, load_preference_rows, synthetic)
from lpc.train import backbone_passes, train
from tests.helpers.fake_tokenizer import WhitespaceTokenizer as _Tok
from tests.helpers.runs import assert_same_metrics, read_jsonl

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, threads=1, progress=False, num_codes=4)


def _row(prompt, **extra):
    return {"prompt": prompt, "chosen": "yes", "rejected": "no", **extra}


# ------------------------------------------------------------------------------------------- loading
def test_user_ids_from_jsonl_strings_ints_missing_and_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    raw = [_row("a", user="ann"), _row("b", user=7), _row("c"), _row("d", user=""), _row("e", user="  "),
           _row("f", user=None), _row("g", user="bob"), _row("h", user=1.5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    rows, stats = load_preference_rows(path)
    assert [r["user"] for r in rows] == ["ann", 7, None, None, None, None, "bob"]
    assert dict(stats.skipped) == {"non-string content": 1}  # the float id
    # required (what --posterior context will ask for): rows without an id are skipped and counted
    rows, stats = load_preference_rows(path, require_user=True)
    assert [r["prompt"] for r in rows] == ["a", "b", "g"]
    assert dict(stats.skipped) == {"no user": 4, "non-string content": 1}
    assert "4 no user" in stats.summary() and "8 rows, 3 used, 5 skipped" in stats.summary()
    with pytest.raises(DataError, match=r"d\.jsonl:3: no user: no 'user'.*strict"):
        load_preference_rows(path, require_user=True, strict=True)
    # another column
    path.write_text(json.dumps(_row("a", annotator=3, user="x")) + "\n")
    assert load_preference_rows(path, user_field="annotator")[0][0]["user"] == 3


def test_user_ids_from_parquet_and_a_named_dataset(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    strings = [_row("a", user="u2"), _row("b", user=None), _row("c", user="u1")]
    pq.write_table(pa.Table.from_pylist(strings), tmp_path / "s.parquet")
    ints = [_row("a", worker=12), _row("b", worker=None), _row("c", worker=5)]
    pq.write_table(pa.Table.from_pylist(ints), tmp_path / "i.parquet")
    assert [r["user"] for r in load_preference_rows(tmp_path / "s.parquet")[0]] == ["u2", None, "u1"]
    rows, stats = load_preference_rows(tmp_path / "i.parquet", user_field="worker", require_user=True)
    assert [r["user"] for r in rows] == [12, 5] and dict(stats.skipped) == {"no user": 1}

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: [_row("a", user="z"), _row("b")]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows, stats = load_preference_rows("someorg/prefs", require_user=True)
    assert [r["user"] for r in rows] == ["z"] and dict(stats.skipped) == {"no user": 1}


def test_user_indices_are_dense_and_shared_by_train_and_held_out():
    train_rows = [{"user": 1000}, {"user": None}, {"user": 3}]
    eval_rows = [{"user": 3}, {"user": 42}, {}]
    assert assign_user_ids(train_rows, eval_rows) == ["3", "42", "1000"]  # ints by value, not their text
    assert [r["user"] for r in train_rows + eval_rows] == [2, -1, 0, 0, 1, -1]
    mixed = [{"user": "b"}, {"user": 7}, {"user": "7"}, {"user": "a"}]
    assert assign_user_ids(mixed) == ["7", "a", "b"] and [r["user"] for r in mixed] == [2, 0, 0, 1]
    none = [{"user": None}, {}]
    assert assign_user_ids(none) is None and [r["user"] for r in none] == [-1, -1]


# ------------------------------------------------------------------------------------------ synthetic
def test_annotators_preset_writes_the_annotator_as_the_user():
    cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry", num_train=60, num_eval=20, seed=3)
    train_rows, eval_rows = synthetic.make_splits(cfg)
    for r in train_rows + eval_rows:
        assert r["user"] == synthetic.ANNOTATORS[r["source"]] and r["seen"] is True
    # the sources preset (the default data) has no users
    assert all("user" not in r for r in synthetic.make_splits(SyntheticConfig(num_train=20, num_eval=5))[0])


def test_unseen_users_are_held_out_and_labelled_by_their_own_weights():
    base = SyntheticConfig(preset="annotators", label_mode="bradley_terry", num_train=40, num_eval=30, seed=2)
    cfg = SyntheticConfig(**{**vars(base), "num_unseen_users": 3, "unseen_user_pairs": 10})
    train_rows, eval_rows = synthetic.make_splits(cfg)
    plain_train, plain_eval = synthetic.make_splits(base)
    # the seen users' pairs do not move when unseen users are added; theirs follow the held-out pairs
    assert train_rows == plain_train and eval_rows[:30] == plain_eval
    unseen = eval_rows[30:]
    assert [r["user"] for r in unseen] == [f"unseen-{k}" for k in range(3) for _ in range(10)]
    assert all(not r["seen"] and r["source"] == -1 and not r["flipped"] for r in unseen)
    assert all(r["prompt"].startswith("someone asks") for r in unseen)
    assert not {r["user"] for r in unseen} & {r["user"] for r in train_rows}
    mixtures = synthetic.unseen_user_mixtures(cfg)
    assert mixtures.shape == (3, 6) and np.allclose(mixtures.sum(1), 1) and (mixtures >= 0).all()
    assert len({tuple(m) for m in mixtures}) == 3
    weights = mixtures @ synthetic.ANNOTATOR_WEIGHTS
    for r in unseen:  # the recorded utilities are the user's own weights on the answers' attributes
        w = weights[int(r["user"].split("-")[1])]
        for side in ("chosen", "rejected"):
            want = float(w @ synthetic.parse_attributes(r[side]).vector())
            assert r[f"{side}_utility"] == pytest.approx(want, abs=1e-12)
    again = synthetic.make_splits(cfg)[1]
    assert again == eval_rows  # a pure function of the seed
    other = SyntheticConfig(**{**vars(cfg), "seed": 4})
    assert not np.allclose(synthetic.unseen_user_mixtures(other), mixtures)
    with pytest.raises(ValueError, match="annotators preset"):
        SyntheticConfig(num_unseen_users=1)


def _enumerated_ceiling(w, temperature):
    """E max(P, 1 - P) over pairs of two different random answers, P = sigmoid(w . (a - b) / T), enumerated here:
    clauses 1..4 uniform, polite / formal / bullets / hedge fair coins, a typo with probability 0.3."""
    answers = []
    for n, pol, form, bul, hed, typo in itertools.product(range(1, 5), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1)):
        prob = 0.25 * 0.5 ** 4 * (0.3 if typo else 0.7)
        answers.append((np.array([(n - 1) / 3, pol, form, bul, hed, typo], dtype=float), prob))
    total = weight = 0.0
    for (va, pa), (vb, pb) in itertools.product(answers, answers):
        if np.array_equal(va, vb):
            continue
        p = 1 / (1 + np.exp(-float(w @ (va - vb)) / temperature))
        total += pa * pb * max(p, 1 - p)
        weight += pa * pb
    return total / weight


def test_unseen_user_ceilings_match_an_enumeration_and_a_sample():
    cfg = SyntheticConfig(preset="annotators", label_mode="bradley_terry", num_train=0, num_eval=0, seed=1,
                          num_unseen_users=4, unseen_user_pairs=750)
    weights = synthetic.unseen_user_weights(cfg)
    ceilings = synthetic.annotator_ceilings(cfg)
    per_user = ceilings["per_user"]
    assert list(per_user) == list(synthetic.ANNOTATORS) + [f"unseen-{k}" for k in range(4)]
    for k, w in enumerate(weights):
        assert per_user[f"unseen-{k}"] == pytest.approx(_enumerated_ceiling(w, cfg.bt_temperature), abs=1e-12)
    first = synthetic.ANNOTATORS[0]
    assert per_user[first] == ceilings["per_annotator"][first] == pytest.approx(
        _enumerated_ceiling(synthetic.ANNOTATOR_WEIGHTS[0], cfg.bt_temperature), abs=1e-12)
    # the generated labels: a predictor that knows each user's weights is right at the rate of its ceiling
    rows = synthetic.generate_unseen_user_pairs(cfg)
    correct = []
    for r in rows:
        w = weights[int(r["user"].split("-")[1])]
        chosen, rejected = (synthetic.parse_attributes(r[side]).vector() for side in ("chosen", "rejected"))
        gap = w @ (chosen - rejected)
        correct.append(1.0 if gap > 0 else 0.5 if gap == 0 else 0.0)
    mean, se = np.mean(correct), np.std(correct) / np.sqrt(len(correct))
    assert abs(mean - np.mean([per_user[f"unseen-{k}"] for k in range(4)])) < 4 * se


# ----------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_collated_batches_carry_the_user_index_in_every_layout(layout):
    rows = [_row("p q", user="b"), _row("r", user=None), _row("s t u", user="a")]
    names = assign_user_ids(rows)
    ds = PreferenceDataset(rows, _Tok(), max_length=16, user_names=names)
    assert ds.user_names == ["a", "b"] and ds.users == [1, -1, 0]
    batch = PreferenceCollator(0, layout)([ds[2], ds[0], ds[1]])
    assert batch["user"].tolist() == [0, 1, -1] and batch["user"].dtype == batch["index"].dtype
    pairs = [TokenizedPair([1, 5], [6, 2], [7, 2], source=0), TokenizedPair([1], [8, 2], [9, 2], 0, user=4)]
    assert PreferenceCollator(0, layout)(pairs)["user"].tolist() == [-1, 4]
    # raw ids are indexed for the dataset alone
    raw = PreferenceDataset([_row("p", user="z"), _row("q", user="a"), _row("r")], _Tok())
    assert raw.user_names == ["a", "z"] and raw.users == [1, 0, -1]
    with pytest.raises(ValueError, match="assign_user_ids"):
        PreferenceDataset([_row("p", user=1.5)], _Tok())


def _users(counts):
    """A user index per pair: ``counts[u]`` pairs of user u, interleaved, and a pair without a user every 5th."""
    out = []
    left = list(counts)
    while any(left):
        for u, n in enumerate(left):
            if n:
                out.append(u)
                left[u] -= 1
        out.append(-1)
    return out


def test_user_grouped_sampler_batches_are_whole_users():
    users = _users([9, 8, 5, 3, 1])  # with m = 2: 4 + 4 + 2 + 1 + 0 groups = 11: 2 batches of 4 groups
    s = UserGroupedSampler(users, batch_size=8, pairs_per_user=2, seed=3)
    assert s.batches_per_epoch == 2 and isinstance(s, EpochSampler)
    for epoch in range(4):
        order = s.order(epoch)
        assert len(order) == 16 and len(set(order)) == 16  # no pair twice in an epoch
        groups = [order[i:i + 2] for i in range(0, 16, 2)]
        for g in groups:
            assert users[g[0]] == users[g[1]] >= 0
        assert users.index(4) not in order  # one pair: fewer than m, never drawn
    assert s.order(0) != s.order(1)
    # every pair with enough company is drawn in some epoch
    drawn = {i for e in range(30) for i in s.order(e)}
    assert drawn == {i for i, u in enumerate(users) if u in (0, 1, 2, 3)}


def test_user_grouped_sampler_is_a_pure_function_of_seed_and_epoch_and_resumes():
    users = _users([12, 10, 7, 7, 4])
    s = UserGroupedSampler(users, batch_size=8, pairs_per_user=4, seed=5)
    got = [s.next_indices() for _ in range(3 * s.batches_per_epoch + 1)]
    n = s.batches_per_epoch
    for e in range(3):
        order = UserGroupedSampler(users, 8, 4, seed=5).order(e)
        assert got[e * n:(e + 1) * n] == [order[i * 8:(i + 1) * 8] for i in range(n)]
    assert UserGroupedSampler(users, 8, 4, seed=6).order(0) != s.order(0)
    t = UserGroupedSampler(users, 8, 4, seed=5)
    for _ in range(n + 1):
        t.next_indices()
    state = json.loads(json.dumps(t.state_dict()))
    assert state["pairs_per_user"] == 4
    u = UserGroupedSampler(users, 8, 4, seed=5)
    u.load_state_dict(state)
    assert [u.next_indices() for _ in range(n)] == got[n + 1:2 * n + 1]
    with pytest.raises(ValueError, match="pairs_per_user=4, this run has 2"):
        UserGroupedSampler(users, 8, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="pairs_per_user=0, this run has 4"):
        u.load_state_dict(EpochSampler(len(users), 8, 5).state_dict())
    with pytest.raises(ValueError, match="multiple of pairs_per_user"):
        UserGroupedSampler(users, 6, 4, seed=0)
    with pytest.raises(ValueError, match="fewer than the 3 of one batch"):
        UserGroupedSampler(_users([4, 4, 3]), 12, 4, seed=0)


@pytest.mark.parametrize("world_size, accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_every_rank_and_micro_batch_gets_whole_users(world_size, accum):
    m, batch_size = 2, 16
    users = _users([11, 9, 9, 8, 6, 5, 3])
    pairs = [TokenizedPair([1], [5, 2], [6, 2], 0, index=i, user=u) for i, u in enumerate(users)]
    s = UserGroupedSampler(users, batch_size, m, seed=1)
    mb = batch_size // (world_size * accum)
    for _ in range(5):
        indices = s.next_indices()
        seen = []
        for rank in range(world_size):
            tr = SimpleNamespace(dist=SimpleNamespace(rank=rank, world_size=world_size),
                                 cfg=SimpleNamespace(max_tokens_per_batch=None), collator=PreferenceCollator(0),
                                 train_set=pairs)
            for j in range(accum):
                (first, group), = backbone_passes(tr, indices, j, mb)  # what train_step runs
                seen += group
                assert len(group) % m == 0
                for g in range(0, len(group), m):  # whole groups of one user each
                    assert len({users[i] for i in group[g:g + m]}) == 1
        assert seen == indices


def test_pairs_per_user_settings_are_checked():
    with pytest.raises(ConfigError, match="pairs_per_user: must divide the 6 pairs") as exc:
        TrainConfig(batch_size=6, pairs_per_user=4)
    assert exc.value.flag == "--pairs-per-user"
    with pytest.raises(ConfigError, match="pairs_per_user: must divide the 2 pairs of a micro-batch"):
        TrainConfig(batch_size=8, gradient_accumulation_steps=4, pairs_per_user=4)
    with pytest.raises(ConfigError, match="unseen_users"):
        TrainConfig(unseen_users=2)
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "source": 0, "user": i % 2} for i in range(16)]
    ds = PreferenceDataset(rows, _Tok(), user_names=["x", "y"])
    cfg = TrainConfig(batch_size=8, pairs_per_user=4)
    notes = []
    assert isinstance(build_sampler(cfg, ds, 2, notes), UserGroupedSampler)
    assert notes == ["data: 2 users (--user-field user) in the training pairs, 0 training pairs without one",
                     "batches: 2 groups of 4 pairs of one user (--pairs-per-user); 2 batches per epoch"]
    with pytest.raises(ConfigError, match="pairs_per_user: must divide the 2 pairs of each process's micro-batch"):
        build_sampler(cfg, ds, 4, [])
    plain = PreferenceDataset([{**r, "user": -1} for r in rows], _Tok())
    with pytest.raises(ConfigError, match="no user ids"):
        build_sampler(cfg, plain, 1, [])
    notes = []
    assert type(build_sampler(TrainConfig(batch_size=8), plain, 1, notes)) is EpochSampler and notes == []


# ------------------------------------------------------------------------------------------ training
def test_training_with_pairs_per_user_runs_and_resumes(tmp_path, cache_dir):
    base = dict(steps=4, batch_size=8, synthetic="annotators", pairs_per_user=4, num_train=64, eval_size=16,
                unseen_users=2, lr=3e-3, warmup_steps=1, save_every=2, keep_checkpoints=0, cache_dir=cache_dir,
                **TINY)
    summary = train(TrainConfig(output_dir=str(tmp_path / "full"), **base))
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    assert summary["eval"]["num_pairs"] == 16 + 2 * 64  # the seen users' held-out pairs and the unseen users'
    step2 = tmp_path / "full" / "checkpoints" / "step-00000002"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["data"]["pairs_per_user"] == 4 and state["data"]["position"] == 2
    # resumed from step 2: the same batches, so the same metrics
    train(TrainConfig(output_dir=str(tmp_path / "part"), resume=str(step2), **base))
    assert_same_metrics(read_jsonl(tmp_path / "part" / "metrics.jsonl"), full[2:])
