"""Synthetic preference data with known ground truth: answers rendered from six observable attributes
(``Answer``), judged by sources or annotators whose utilities conflict (``SOURCE_WEIGHTS``, ``ANNOTATOR_WEIGHTS``;
``SyntheticConfig.preset``), with exact Bayes ceilings to compare against; the annotators preset can add held-out
users never seen in training (``generate_unseen_user_pairs``). Everything is a pure function of the seed (one
generator per split, seeded from ``(seed, split)``: independent, reproducible splits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from ..config import SyntheticConfig

ATTRIBUTES = ("length", "polite", "formal", "bullets", "hedge", "typo")
SOURCES = ("concise", "detailed", "formal", "casual")
# rows: sources; columns: ATTRIBUTES. Conflicts: 0 vs 1 on length (and bullets), 2 vs 3 on formal/hedge/polite.
SOURCE_WEIGHTS = np.array([
    # length polite formal bullets hedge  typo
    [-2.0,   1.0,   0.0,   -0.5,    0.0,  -1.5],   # concise
    [2.0,    0.0,   0.0,    1.0,    0.0,  -1.5],   # detailed
    [0.0,    0.5,   2.0,    0.0,   -1.0,  -1.5],   # formal
    [0.0,   -0.5,  -2.0,    0.0,    1.0,  -1.5],   # casual
])

ANNOTATORS = ("thorough", "brief", "formal", "casual", "warm", "blunt")
# rows: annotators; columns: ATTRIBUTES. Two factors each, in conflicting pairs (0/1 length, 2/3 formality,
# 4/5 politeness; bullets and hedging split them again), and every annotator dislikes typos.
ANNOTATOR_WEIGHTS = np.array([
    # length polite formal bullets hedge  typo
    [2.0,    0.0,   0.0,    1.0,    0.0,  -1.5],   # thorough
    [-2.0,   1.0,   0.0,    0.0,    0.0,  -1.5],   # brief
    [0.0,    0.0,   2.0,    0.0,   -1.0,  -1.5],   # formal
    [0.0,    0.0,  -2.0,    0.0,    1.0,  -1.5],   # casual
    [0.0,    2.0,   0.0,   -1.0,    0.0,  -1.5],   # warm
    [0.0,   -2.0,   0.0,    1.0,    0.0,  -1.5],   # blunt
])
# Dirichlet concentration of an unseen user's mixture over the annotators: below 1 a mixture leans towards a few
# annotators, so new users stay about as distinct as the annotators; at 1 and above they drift towards the
# annotators' mean, which one shared reward already serves
UNSEEN_USER_CONCENTRATION = 0.5

TOPICS = ("cats", "dogs", "rain", "music", "coffee", "trains", "gardens", "chess", "bread", "rivers", "stars",
          "bikes", "oceans", "books", "cities", "forests", "tea", "robots", "winter", "markets")
VERBS = ("are", "seem", "feel", "look", "stay", "become")
ADJECTIVES = ("calm", "bright", "useful", "strange", "old", "quick", "quiet", "warm", "complex", "simple",
              "popular", "rare")
FORMAL_CONNECTORS = ("indeed", "moreover", "furthermore", "therefore")
CASUAL_CONNECTORS = ("yeah", "like", "honestly", "anyway")
TYPOS = ("teh", "recieve", "definately", "seperate")
POLITE_PREFIX = ("thanks", "for", "asking", ",")
HEDGE_WORD = "maybe"
BULLET = "-"
FLIP_MARKER = "[flip]"
ANON_SOURCE = "someone"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_CLAUSES = 4


def source_hint(source: int) -> str:
    return f"user_{source}"


def lexicon() -> list[str]:
    """Every word the generator can emit (the tokenizer's vocabulary, minus special tokens)."""
    words = ["asks", ":", "tell", "me", "about", ".", "and", "they", HEDGE_WORD, BULLET, FLIP_MARKER, ANON_SOURCE]
    words += [source_hint(s) for s in range(max(len(SOURCES), len(ANNOTATORS)))]
    words += list(POLITE_PREFIX) + list(TOPICS) + list(VERBS) + list(ADJECTIVES)
    words += list(FORMAL_CONNECTORS) + list(CASUAL_CONNECTORS) + list(TYPOS)
    return list(dict.fromkeys(words))  # unique, in a fixed order


@dataclass(frozen=True)
class Answer:
    """The hidden attributes of one answer, each observable in its text (``render_answer``; ``parse_attributes``
    recovers them); ``vector`` feeds the utility ``u = w . a`` of a source or annotator:

    * ``length``: clauses ``"<connector> <topic|they> <verb> <adjective>"``, n in 1..4, value (n - 1) / 3
    * ``polite``: the answer opens with ``"thanks for asking ,"`` (0 / 1)
    * ``formal``: connectors ``indeed/moreover/...`` (1) vs ``yeah/like/...`` (0)
    * ``bullets``: clauses start with ``"-"`` (1) instead of being joined by ``"and"`` (0)
    * ``hedge``: ``"maybe"`` before the first clause (0 / 1)
    * ``typo``: one adjective replaced by a garbled word such as ``"teh"`` (0 / 1)
    """

    n_clauses: int
    polite: int
    formal: int
    bullets: int
    hedge: int
    typo: int

    def vector(self) -> np.ndarray:
        """``[len(ATTRIBUTES)]`` float64, in ``ATTRIBUTES`` order."""
        return np.array([(self.n_clauses - 1) / (MAX_CLAUSES - 1), self.polite, self.formal, self.bullets,
                         self.hedge, self.typo], dtype=np.float64)


def render_answer(a: Answer, topic: str, rng: np.random.Generator) -> str:
    """Token string for ``a`` about ``topic``; the free word choices (verbs, adjectives) come from ``rng``."""
    words: list[str] = list(POLITE_PREFIX) if a.polite else []
    if a.hedge:
        words.append(HEDGE_WORD)
    connectors = FORMAL_CONNECTORS if a.formal else CASUAL_CONNECTORS
    # one vectorised draw for all free word choices (indexing tuples beats rng.choice per word ~10x)
    pick = rng.integers(0, 1 << 30, size=3 * a.n_clauses + 2)
    clauses = []
    for i in range(a.n_clauses):
        # every clause opens with a connector, so formality is visible even in one-clause answers
        clauses.append([connectors[pick[3 * i] % len(connectors)], topic if i == 0 else "they",
                        VERBS[pick[3 * i + 1] % len(VERBS)], ADJECTIVES[pick[3 * i + 2] % len(ADJECTIVES)]])
    if a.typo:  # replace one adjective by a garbled word
        clauses[pick[-2] % a.n_clauses][-1] = TYPOS[pick[-1] % len(TYPOS)]
    for i, clause in enumerate(clauses):
        if a.bullets:
            words.append(BULLET)
        elif i > 0:
            words.append("and")
        words.extend(clause)
    words.append(".")
    return " ".join(words)


def parse_attributes(text: str) -> Answer:
    """Recover the hidden attributes from an answer's text (ground truth is observable)."""
    words = text.split()
    polite = int(words[:len(POLITE_PREFIX)] == list(POLITE_PREFIX))
    n_clauses = sum(w in VERBS for w in words)
    return Answer(n_clauses=n_clauses, polite=polite, formal=int(any(w in FORMAL_CONNECTORS for w in words)),
                  bullets=int(BULLET in words), hedge=int(HEDGE_WORD in words),
                  typo=int(any(w in TYPOS for w in words)))


def utility(source: int, answer: Answer, weights: np.ndarray = SOURCE_WEIGHTS) -> float:
    """``w_source . attributes`` (float), ``w`` a row of ``weights`` (``SOURCE_WEIGHTS`` or ``ANNOTATOR_WEIGHTS``)."""
    return weighted_utility(weights[source], answer)


def weighted_utility(w: np.ndarray, answer: Answer) -> float:
    """``w . attributes`` (float) for any weight vector ``w`` over ``ATTRIBUTES`` (an unseen user's, say)."""
    v = answer.vector()
    return float(sum(w[i] * v[i] for i in range(len(ATTRIBUTES))))  # plain floats: no tiny-matmul overhead


def source_names(cfg: SyntheticConfig) -> tuple[str, ...]:
    """The names of the preset's sources (``SOURCES``) or annotators (``ANNOTATORS``), by id."""
    return ANNOTATORS if cfg.preset == "annotators" else SOURCES


def _random_answer(rng: np.random.Generator) -> Answer:
    """Attributes i.i.d.: clauses uniform in 1..4, polite/formal/bullets/hedge 1/2, typo 0.3."""
    n, pol, form, bul, hed, typo = rng.random(6)
    return Answer(n_clauses=1 + int(n * MAX_CLAUSES), polite=int(pol < 0.5), formal=int(form < 0.5),
                  bullets=int(bul < 0.5), hedge=int(hed < 0.5), typo=int(typo < 0.3))


def _favourite_topics(source: int) -> Sequence[str]:
    per = len(TOPICS) // len(SOURCES)
    return TOPICS[source * per:(source + 1) * per]


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def generate_pairs(n: int, cfg: SyntheticConfig, split: str) -> list[dict]:
    """``n`` preference pairs of ``split`` (``"train"`` or ``"eval"``), a pure function of ``cfg.seed``.

    The ``sources`` preset: four sources (``SOURCES``) that agree that typos are bad and disagree elsewhere
    (*concise* vs *detailed* on length, *formal* vs *casual* on formality, hedging and politeness); a pair's label
    comes from its source's utilities (deterministic or Bradley-Terry). A prompt names its source with probability
    ``hint_prob`` and its topic leans towards the source's favourite topics, so the source is (mostly) inferable
    from the prompt: what LPC's prior ``p(z | x)`` has to learn, while the posterior can read it off the answers.

    Each row: ``prompt``, ``chosen``, ``rejected`` (strings), ``source`` (int), ``source_name``,
    ``chosen_utility``, ``rejected_utility`` (under the row's source), ``flipped`` (bool).

    Label noise: each *training* pair is flipped (chosen and rejected swapped) with probability
    ``cfg.flip_fraction``; with ``cfg.flip_marker`` (default True, the paper's protocol) its prompt also gets
    ``" [flip]"`` (the paper writes ``[FLIP]``; the word-level tokenizer's lexicon has the lower-case form).
    Without the marker the flip is invisible: plain label noise. Held-out pairs are never flipped.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.preset == "annotators":
        return generate_annotator_pairs(n, cfg, split)
    # independent streams per split: held-out pairs never depend on how many training pairs were drawn
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    rows = []
    for _ in range(n):
        u_src, u_bias, u_topic, u_hint = rng.random(4)
        source = int(u_src * len(SOURCES))
        topics = _favourite_topics(source) if u_bias < cfg.topic_bias else TOPICS
        topic = topics[int(u_topic * len(topics))]
        who = source_hint(source) if u_hint < cfg.hint_prob else ANON_SOURCE
        prompt = f"{who} asks : tell me about {topic} ."
        while True:
            a, b = _random_answer(rng), _random_answer(rng)
            ua, ub = utility(source, a), utility(source, b)
            if abs(ua - ub) >= cfg.min_gap:
                break
        if cfg.label_mode == "deterministic":
            a_wins = ua > ub
        else:
            a_wins = rng.random() < _sigmoid((ua - ub) / cfg.bt_temperature)
        win, lose = (a, b) if a_wins else (b, a)
        u_win, u_lose = (ua, ub) if a_wins else (ub, ua)
        row = {"prompt": prompt, "chosen": render_answer(win, topic, rng), "rejected": render_answer(lose, topic, rng),
               "source": source, "source_name": SOURCES[source], "chosen_utility": u_win,
               "rejected_utility": u_lose, "flipped": False}
        # the flip coin is drawn from the same stream as before the marker became optional, so a marked
        # and an unmarked run with the same seed and flip_fraction flip exactly the same pairs
        _maybe_flip(row, rng, cfg, split)
        rows.append(row)
    return rows


def _maybe_flip(row: dict, rng: np.random.Generator, cfg: SyntheticConfig, split: str) -> None:
    """Swap a training row's answers with probability ``flip_fraction`` (one coin from ``rng``), marking its
    prompt with ``[flip]`` when ``flip_marker``."""
    if split == "train" and cfg.flip_fraction > 0 and rng.random() < cfg.flip_fraction:
        marked = f"{row['prompt']} {FLIP_MARKER}" if cfg.flip_marker else row["prompt"]
        row.update(prompt=marked, chosen=row["rejected"], rejected=row["chosen"],
                   chosen_utility=row["rejected_utility"], rejected_utility=row["chosen_utility"], flipped=True)


def generate_annotator_pairs(n: int, cfg: SyntheticConfig, split: str) -> list[dict]:
    """``n`` pairs of the ``annotators`` preset; rows as ``generate_pairs``'s, ``source`` the annotator.

    Six annotators (``ANNOTATORS``) whose preferences are sparse mixtures of conflicting answer factors
    (``ANNOTATOR_WEIGHTS``); uniform topics, so nothing about the annotator is in the prompt unless ``hint_prob > 0``
    names them; labels drawn Bradley-Terry, ``P(a > b) = sigmoid((u_a - u_b) / bt_temperature)``, so the accuracy
    ceilings with and without the annotator are exact expectations (``annotator_ceilings``). Two answers with the
    same attributes (no preference to learn) are redrawn. ``user`` is the annotator's name and ``seen`` is True
    (the users of ``generate_unseen_user_pairs`` are not)."""
    rng = np.random.default_rng([cfg.seed, 2 if split == "train" else 3])
    rows = []
    for _ in range(n):
        u_who, u_topic, u_hint = rng.random(3)
        who = int(u_who * len(ANNOTATORS))
        topic = TOPICS[int(u_topic * len(TOPICS))]
        asker = source_hint(who) if u_hint < cfg.hint_prob else ANON_SOURCE
        row = _bradley_terry_pair(rng, ANNOTATOR_WEIGHTS[who], f"{asker} asks : tell me about {topic} .", topic, cfg)
        row.update(source=who, source_name=ANNOTATORS[who], user=ANNOTATORS[who], seen=True)
        _maybe_flip(row, rng, cfg, split)
        rows.append(row)
    return rows


def _bradley_terry_pair(rng: np.random.Generator, w: np.ndarray, prompt: str, topic: str,
                        cfg: SyntheticConfig) -> dict:
    """A row of two different random answers about ``topic``, labelled Bradley-Terry under the weights ``w``:
    ``prompt``, ``chosen``, ``rejected``, ``chosen_utility``, ``rejected_utility``, ``flipped`` (False)."""
    while True:
        a, b = _random_answer(rng), _random_answer(rng)
        if a != b:
            break
    ua, ub = weighted_utility(w, a), weighted_utility(w, b)
    a_wins = rng.random() < _sigmoid((ua - ub) / cfg.bt_temperature)
    (win, u_win), (lose, u_lose) = ((a, ua), (b, ub)) if a_wins else ((b, ub), (a, ua))
    return {"prompt": prompt, "chosen": render_answer(win, topic, rng), "rejected": render_answer(lose, topic, rng),
            "chosen_utility": u_win, "rejected_utility": u_lose, "flipped": False}


def unseen_user_names(cfg: SyntheticConfig) -> list[str]:
    """The user ids of ``cfg.num_unseen_users`` held-out users: ``unseen-0``, ``unseen-1``, ..."""
    return [f"unseen-{k}" for k in range(cfg.num_unseen_users)]


def unseen_user_mixtures(cfg: SyntheticConfig) -> np.ndarray:
    """``[num_unseen_users, len(ANNOTATORS)]``: each unseen user's mixture over the annotators, drawn from a
    Dirichlet of concentration ``UNSEEN_USER_CONCENTRATION`` (a generator of its own, seeded from ``cfg.seed``)."""
    rng = np.random.default_rng([cfg.seed, 4])
    return rng.dirichlet(np.full(len(ANNOTATORS), UNSEEN_USER_CONCENTRATION), size=cfg.num_unseen_users)


def unseen_user_weights(cfg: SyntheticConfig) -> np.ndarray:
    """``[num_unseen_users, len(ATTRIBUTES)]``: each unseen user's utility weights, its mixture of the annotators'
    (``unseen_user_mixtures @ ANNOTATOR_WEIGHTS``)."""
    return unseen_user_mixtures(cfg) @ ANNOTATOR_WEIGHTS


def generate_unseen_user_pairs(cfg: SyntheticConfig) -> list[dict]:
    """``cfg.unseen_user_pairs`` held-out pairs of each of ``cfg.num_unseen_users`` users never seen in training
    (``annotators`` preset; ``make_splits`` appends them to the held-out split). Rows as
    ``generate_annotator_pairs``'s, labelled Bradley-Terry under the user's ``unseen_user_weights``, with ``user``
    its ``unseen_user_names`` id, ``seen`` False, ``source`` -1 and ``source_name`` None (no annotator); the
    prompts never name the user. Never flipped."""
    rng = np.random.default_rng([cfg.seed, 5])
    rows = []
    for name, w in zip(unseen_user_names(cfg), unseen_user_weights(cfg)):
        for _ in range(cfg.unseen_user_pairs):
            topic = TOPICS[int(rng.random() * len(TOPICS))]
            row = _bradley_terry_pair(rng, w, f"{ANON_SOURCE} asks : tell me about {topic} .", topic, cfg)
            row.update(source=-1, source_name=None, user=name, seen=False)
            rows.append(row)
    return rows


def make_splits(cfg: Optional[SyntheticConfig] = None) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` for ``cfg`` (default ``SyntheticConfig()``); the held-out rows end with the
    unseen users' pairs (``generate_unseen_user_pairs``), if any."""
    cfg = cfg or SyntheticConfig()
    eval_rows = generate_pairs(cfg.num_eval, cfg, "eval")
    if cfg.num_unseen_users:
        eval_rows += generate_unseen_user_pairs(cfg)
    return generate_pairs(cfg.num_train, cfg, "train"), eval_rows


def corpus(seed: int = 0, n: int = 256) -> Iterator[str]:
    """Texts to train the tokenizer on: the whole lexicon once, then sample prompts and answers."""
    yield " ".join(lexicon())
    for row in generate_pairs(n, SyntheticConfig(seed=seed, hint_prob=0.5, flip_fraction=0.1), "train"):
        yield from (row["prompt"], row["chosen"], row["rejected"])


def _answer_space() -> list[tuple[Answer, float]]:
    """Every attribute combination with its probability under ``_random_answer``."""
    space = []
    for n, pol, form, bul, hed, typo in np.ndindex(MAX_CLAUSES, 2, 2, 2, 2, 2):
        p = (1 / MAX_CLAUSES) * 0.5 ** 4 * (0.3 if typo else 0.7)
        space.append((Answer(n + 1, pol, form, bul, hed, typo), p))
    return space


def _keep_probability(source: int, min_gap: float) -> float:
    """P(|u_s(a) - u_s(b)| >= min_gap) for two independent random answers (the resampling acceptance)."""
    space = _answer_space()
    u = np.array([utility(source, a) for a, _ in space])
    p = np.array([q for _, q in space])
    return float((p[:, None] * p[None, :] * (np.abs(u[:, None] - u[None, :]) >= min_gap)).sum())


def source_posterior(prompt: str, cfg: SyntheticConfig) -> np.ndarray:
    """``P(source | prompt)`` under the generator: exact from the hint, else from the topic alone."""
    words = prompt.split()
    for s in range(len(SOURCES)):
        if words[0] == source_hint(s):
            return np.eye(len(SOURCES))[s]
    topic = words[words.index("about") + 1]
    fav = np.array([topic in _favourite_topics(s) for s in range(len(SOURCES))], dtype=np.float64)
    per = len(TOPICS) // len(SOURCES)
    like = cfg.topic_bias * fav / per + (1 - cfg.topic_bias) / len(TOPICS)
    return like / like.sum()


def _win_probabilities(weights: np.ndarray, bt_temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """``(pair probability [S, S], P(row answer beats column answer | user) [S, S, U])`` over the answer space
    ``S`` of ``_answer_space``, for the ``U`` users whose utility weights are the rows of ``weights``; pairs of
    equal answers excluded (the generator redraws them)."""
    space = _answer_space()
    p = np.array([q for _, q in space])
    u = np.array([[weighted_utility(w, ans) for w in weights] for ans, _ in space])
    pair = p[:, None] * p[None, :]
    np.fill_diagonal(pair, 0.0)
    win = 1.0 / (1.0 + np.exp(-(u[:, None, :] - u[None, :, :]) / bt_temperature))
    return pair / pair.sum(), win


def _annotator_win_probabilities(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """``_win_probabilities`` of the six annotators (``[S, S, A]``)."""
    return _win_probabilities(ANNOTATOR_WEIGHTS, cfg.bt_temperature)


def _known_user_ceilings(pair: np.ndarray, win: np.ndarray) -> list[float]:
    """``E max(P_u, 1 - P_u)`` of each user ``u`` of ``_win_probabilities``: the accuracy of a predictor that
    knows the user."""
    return [float((pair * np.maximum(win[..., u], 1 - win[..., u])).sum()) for u in range(win.shape[-1])]


def user_ceilings(weights: np.ndarray, cfg: SyntheticConfig) -> list[float]:
    """The exact accuracy ceiling of each user whose utility weights are a row of ``weights`` (``[U,
    len(ATTRIBUTES)]``), for a predictor that knows the user, on pairs drawn like the annotators preset's."""
    return _known_user_ceilings(*_win_probabilities(np.asarray(weights, dtype=np.float64), cfg.bt_temperature))


def annotator_ceilings(cfg: SyntheticConfig) -> dict:
    """Exact accuracy ceilings of the ``annotators`` preset (expectations over the answer distribution):
    ``per_annotator`` (a predictor that knows the annotator: ``E max(P_a, 1 - P_a)``), their mean
    ``with_annotator``, ``prompt_only`` (one that does not: ``E max(P, 1 - P)`` with ``P`` the mean of
    ``P_a`` over the annotators, who are equally likely and independent of the pair), and ``per_user``: the
    known-user ceiling by user id, the annotators' and the unseen users' (``user_ceilings``)."""
    pair, win = _annotator_win_probabilities(cfg)
    per = _known_user_ceilings(pair, win)
    mean_win = win.mean(-1)
    unseen = user_ceilings(unseen_user_weights(cfg), cfg) if cfg.num_unseen_users else []
    return {"per_annotator": dict(zip(ANNOTATORS, per)), "with_annotator": float(np.mean(per)),
            "prompt_only": float((pair * np.maximum(mean_win, 1 - mean_win)).sum()),
            "per_user": dict(zip(ANNOTATORS + tuple(unseen_user_names(cfg)), per + unseen))}


def annotator_log_likelihoods(cfg: SyntheticConfig, newton_steps: int = 25) -> dict:
    """Expected log-likelihood of a label (nats per pair, exact over the answer distribution) of the
    ``annotators`` preset under three models: ``with_annotator`` (``log P_a``, the annotator known),
    ``mixture`` (``log mean_a P_a``: the true mixture, the annotator unknown) and ``best_linear`` (the best single
    Bradley-Terry model on the six attributes, ``P = sigmoid(w . (a - b))``, fitted by Newton's method on the
    exact expectation). ``mixture - best_linear`` is all that a latent chosen per pair, from that pair alone, can
    gain over one shared reward: what tells annotators apart lives in several pairs of the same annotator."""
    pair, win = _annotator_win_probabilities(cfg)
    p_mix = win.mean(-1)
    with_annotator = float((pair[..., None] * (win * np.log(win) + (1 - win) * np.log1p(-win))).sum()
                           / len(ANNOTATORS))
    mixture = float((pair * (p_mix * np.log(p_mix) + (1 - p_mix) * np.log1p(-p_mix))).sum())
    v = np.array([ans.vector() for ans, _ in _answer_space()], dtype=np.float64)
    x = (v[:, None, :] - v[None, :, :]).reshape(-1, v.shape[1])
    weight, target = pair.reshape(-1), p_mix.reshape(-1)
    w = np.zeros(v.shape[1])
    for _ in range(newton_steps):  # a concave objective: Newton from 0 converges in a few steps
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (weight * (target - p))
        hess = (x * (weight * p * (1 - p))[:, None]).T @ x
        w = w + np.linalg.solve(hess + 1e-12 * np.eye(len(w)), grad)
    s = x @ w
    best_linear = float((weight * (target * -np.logaddexp(0, -s) + (1 - target) * -np.logaddexp(0, s))).sum())
    return {"with_annotator": with_annotator, "mixture": mixture, "best_linear": best_linear}


def bayes_accuracy(rows: Sequence[dict], cfg: SyntheticConfig) -> float:
    """Accuracy of the Bayes-optimal predictor that knows the generator (the ceiling for any model).

    ``annotators`` preset: the predictor that knows the annotator when the prompt names them (else it weighs
    them equally) picks the answer it thinks more likely to win; its accuracy on ``rows`` (whose labels were
    drawn) estimates the exact ``annotator_ceilings``.

    For each pair it weighs the sources by ``P(s | prompt, {a, b}) ~ P(s | prompt) * 1[pair kept under s]
    / P(kept | s)`` (pairs are resampled until their utility gap reaches ``min_gap``) and picks the answer
    that wins under more of that weight (deterministic labels; for Bradley-Terry labels it uses the
    expected win probability). Flipped training rows count against it, as they would against a model.
    """
    if not rows:
        return 0.0
    if cfg.preset == "annotators":
        return _annotator_bayes_accuracy(rows, cfg)
    keep = np.array([_keep_probability(s, cfg.min_gap) for s in range(len(SOURCES))])
    correct = 0
    for row in rows:
        a, b = parse_attributes(row["chosen"]), parse_attributes(row["rejected"])
        ua = np.array([utility(s, a) for s in range(len(SOURCES))])
        ub = np.array([utility(s, b) for s in range(len(SOURCES))])
        weight = source_posterior(row["prompt"], cfg) * (np.abs(ua - ub) >= cfg.min_gap) / keep
        if cfg.label_mode == "deterministic":
            p_win = (ua > ub).astype(np.float64)
        else:
            p_win = 1.0 / (1.0 + np.exp(-(ua - ub) / cfg.bt_temperature))
        score = float((weight * p_win).sum() / weight.sum())
        correct += 1.0 if score > 0.5 else 0.5 if score == 0.5 else 0.0  # a tie: either answer, right half the time
    return correct / len(rows)


def _annotator_bayes_accuracy(rows: Sequence[dict], cfg: SyntheticConfig) -> float:
    correct = 0.0
    for row in rows:
        a, b = parse_attributes(row["chosen"]), parse_attributes(row["rejected"])
        gap = np.array([utility(s, a, ANNOTATOR_WEIGHTS) - utility(s, b, ANNOTATOR_WEIGHTS)
                        for s in range(len(ANNOTATORS))])
        p_win = 1.0 / (1.0 + np.exp(-gap / cfg.bt_temperature))
        words = row["prompt"].split()
        named = [s for s in range(len(ANNOTATORS)) if words[0] == source_hint(s)]
        score = float(p_win[named[0]] if named else p_win.mean())
        correct += 1.0 if score > 0.5 else 0.5 if score == 0.5 else 0.0
    return correct / len(rows)


def source_agreement(rows: Sequence[dict]) -> float:
    """Fraction of pairs whose label every source would agree with (the source-free part of the task)."""
    agree = 0
    for row in rows:
        a, b = parse_attributes(row["chosen"]), parse_attributes(row["rejected"])
        agree += all(utility(s, a) > utility(s, b) for s in range(len(SOURCES)))
    return agree / max(len(rows), 1)


__all__ = ["ATTRIBUTES", "SOURCES", "SOURCE_WEIGHTS", "ANNOTATORS", "ANNOTATOR_WEIGHTS", "annotator_ceilings",
           "source_names", "FLIP_MARKER", "Answer", "render_answer", "parse_attributes",
           "utility", "weighted_utility", "generate_pairs", "make_splits", "corpus", "lexicon", "source_agreement",
           "source_posterior", "bayes_accuracy", "SPECIAL_TOKENS", "UNSEEN_USER_CONCENTRATION",
           "generate_unseen_user_pairs", "unseen_user_names", "unseen_user_mixtures", "unseen_user_weights",
           "user_ceilings"]
