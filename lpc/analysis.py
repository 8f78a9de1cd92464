"""Statistics of LPC runs in numpy (no scikit-learn needed): NMI and ARI of two labelings, code histograms and
perplexity, few-shot accuracy from per-code margins, label-noise injection (``flip_pairs``) and 2-D projections
(``project_2d``: t-SNE with scikit-learn, PCA otherwise). The latents a model assigns: ``lpc.evaluate.collect_latents``.
"""

from __future__ import annotations

import importlib.util
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["normalized_mutual_information", "adjusted_rand_index", "few_shot_accuracy", "code_histogram",
           "perplexity", "entropy", "flip_mask", "flip_pairs", "project_2d", "mean_std", "as_labels"]


# --------------------------------------------------------------------------------------------- metrics
def as_labels(x, name: str) -> np.ndarray:
    """``x`` as a 1-D numpy array of labels (``ValueError`` naming ``name`` otherwise)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {arr.shape}")
    return arr


def entropy(p) -> float:
    """Shannon entropy in nats of a probability vector (``0 log 0 = 0``)."""
    p = _probability_vector(p, "p")
    nz = p > 0
    return float(-(p[nz] * np.log(p[nz])).sum())


def contingency_table(a, b, metric: str) -> np.ndarray:
    """``[A, B]`` float64 counts of the items labelled ``(i, j)`` by two labelings (labels numbered in sorted
    order); ``metric`` names the caller in the errors.

    Raises:
        ValueError: ``a`` or ``b`` is not 1-D, they differ in length, or they are empty.
    """
    a, b = as_labels(a, "a"), as_labels(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must label the same items: got lengths {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"a and b must not be empty: {metric} of zero items is undefined")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    ai, bi = ai.reshape(-1), bi.reshape(-1)  # numpy 2 keeps the input shape on return_inverse
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1.0)
    return table


def normalized_mutual_information(a, b) -> float:
    """NMI between two labelings of the same items, ``I(a; b) / ((H(a) + H(b)) / 2)``, in [0, 1].

    Labels can be any hashable values (ints, strings); only the partition they induce matters, so NMI is
    invariant to renaming labels. The arithmetic-mean normalisation is scikit-learn's default
    (``normalized_mutual_info_score(..., average_method="arithmetic")``) and the degenerate cases follow it:

    * both labelings constant (one cluster each): ``1.0``, the partitions are identical;
    * exactly one labeling constant: ``0.0``, it carries no information about the other;
    * fewer than one item: ``ValueError`` (NMI is undefined for no items).

    Raises:
        ValueError: ``a`` or ``b`` is not 1-D, they differ in length, or they are empty.
    """
    joint = contingency_table(a, b, "NMI")
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    ha, hb = entropy(pa), entropy(pb)
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    # MI <= min(H) <= mean(H) in exact arithmetic; clip the last-ulp excess of identical labelings
    return float(min(max(mi / (0.5 * (ha + hb)), 0.0), 1.0))


def adjusted_rand_index(a, b) -> float:
    """ARI between two labelings of the same items (Hubert & Arabie; scikit-learn's ``adjusted_rand_score``):
    1 for identical partitions, about 0 for independent ones, negative below chance.

    Raises:
        ValueError: ``a`` or ``b`` is not 1-D, they differ in length, or they are empty.
    """
    table = contingency_table(a, b, "ARI")

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([a.shape[0]]))
    expected = rows * cols / total if total else 0.0
    top = 0.5 * (rows + cols)
    if top == expected:  # both partitions trivial in the same way (one cluster, or all singletons): identical
        return 1.0
    return float((index - expected) / (top - expected))


def few_shot_accuracy(margin_by_code, source, shots: int, *, draws: int = 20, seed: int = 0,
                      log_prior=None) -> float:
    """Accuracy when an annotator's code is inferred from ``shots`` of their labelled pairs.

    For each annotator (``source [N]``, ids >= 0) and each of ``draws`` random draws: ``shots`` of their pairs
    are the support, the rest the queries; the code is ``argmax_k log_prior[k] + sum_support log sigmoid(m_ik)``
    (``m = margin_by_code [N, K]``: the reward margin of pair i with z = E[k]; sigmoid of it is the model's
    probability of the observed label under code k), and the queries are scored with that code's margins.
    Returns the mean over annotators and draws of the query accuracy. ``shots = 0`` uses ``log_prior`` alone
    (uniform when ``None``).

    Raises:
        ValueError: bad shapes, ``shots`` < 0, or an annotator with fewer than ``shots + 1`` pairs.
    """
    m = np.asarray(margin_by_code, dtype=np.float64)
    src = as_labels(source, "source")
    if m.ndim != 2 or m.shape[0] != src.shape[0]:
        raise ValueError(f"margin_by_code must be [N, K] with N = len(source) = {src.shape[0]}, got {m.shape}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an int >= 0, got {shots!r}")
    prior = np.zeros(m.shape[1]) if log_prior is None else np.asarray(log_prior, dtype=np.float64)
    loglik = -np.logaddexp(0.0, -m)  # log sigmoid(m), stable
    rng = np.random.default_rng(seed)
    accs = []
    for a in sorted(set(src.tolist()) - {-1}):
        idx = np.flatnonzero(src == a)
        if idx.size <= shots:
            raise ValueError(f"annotator {a} has {idx.size} pairs: too few for {shots} shots and a query")
        for _ in range(draws if shots else 1):
            perm = rng.permutation(idx)
            support, query = perm[:shots], perm[shots:]
            code = int(np.argmax(prior + loglik[support].sum(0)))
            accs.append(float((m[query, code] > 0).mean()))
    return float(np.mean(accs))


def code_histogram(codes, num_codes: int) -> np.ndarray:
    """``[num_codes]`` int64 counts of each code in ``codes`` (ints in ``[0, num_codes)``).

    Raises:
        ValueError: ``num_codes`` < 1, ``codes`` not 1-D integers, or a code outside ``[0, num_codes)``.
    """
    if isinstance(num_codes, bool) or not isinstance(num_codes, (int, np.integer)) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    arr = as_labels(codes, "codes")
    if arr.size == 0:
        return np.zeros(int(num_codes), dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"codes must lie in [0, num_codes={num_codes}), got values in [{lo}, {hi}]")
    return np.bincount(arr.astype(np.int64), minlength=int(num_codes)).astype(np.int64)


def _probability_vector(p, name: str) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D probability vector, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    total = float(arr.sum())
    if abs(total - 1.0) > 1e-6 * max(arr.size, 1) + 1e-9:
        raise ValueError(f"{name} must sum to 1 (got {total:.6g}); normalise counts with p = h / h.sum()")
    return arr


def perplexity(p) -> float:
    """``exp(H(p))`` of a probability vector: the effective number of codes used, 1..K (K for uniform).

    Raises:
        ValueError: ``p`` is not a finite, non-negative 1-D vector summing to 1 (within 1e-6 per entry).
    """
    return float(np.exp(entropy(p)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)`` of ``values``; std is 0.0 for a single value and NaN for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


# ------------------------------------------------------------------------------------------ label noise
def flip_mask(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``[n]`` bool: exactly ``round(fraction * n)`` rows chosen uniformly at random (seeded).

    An exact count (not one coin per row) makes the realised flip rate equal the requested one, so the
    noise levels of a sweep differ by what they say.

    Raises:
        ValueError: ``n`` < 0 or ``fraction`` outside [0, 1].
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(float(fraction) * n))
    mask = np.zeros(int(n), dtype=bool)
    mask[np.random.default_rng(seed).permutation(int(n))[:k]] = True
    return mask


def flip_pairs(rows: Sequence[Mapping], fraction: float, *, marker: Optional[str] = None,
               seed: int = 0) -> list[dict]:
    """Copies of ``rows`` with chosen/rejected swapped on a ``flip_mask(len(rows), fraction, seed)`` subset.

    Flipped rows get ``flipped=True`` and, when ``marker`` is given, ``prompt + " " + marker`` (the paper's
    protocol appends ``[FLIP]`` to flipped prompts; our synthetic tokenizer knows ``[flip]``). Per-row
    ``chosen_utility``/``rejected_utility`` are swapped with their answers when present. The input rows are
    not modified.

    Raises:
        ValueError: a row lacks ``prompt``, ``chosen`` or ``rejected``; ``fraction`` outside [0, 1];
            ``marker`` empty.
    """
    if marker is not None and not str(marker).strip():
        raise ValueError("marker must be a non-empty string or None")
    mask = flip_mask(len(rows), fraction, seed)
    out = []
    for i, (row, flip) in enumerate(zip(rows, mask)):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing}")
        new = dict(row)
        new["flipped"] = bool(flip) or bool(row.get("flipped", False))
        if flip:
            new["chosen"], new["rejected"] = row["rejected"], row["chosen"]
            if "chosen_utility" in row and "rejected_utility" in row:
                new["chosen_utility"], new["rejected_utility"] = row["rejected_utility"], row["chosen_utility"]
            if marker is not None:
                new["prompt"] = f"{row['prompt']} {marker}"
        out.append(new)
    return out


# ------------------------------------------------------------------------------------------ projection
def _pca_2d(x: np.ndarray) -> np.ndarray:
    centered = x - x.mean(0, keepdims=True)
    # SVD of the centred data: the right singular vectors are the principal axes
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    xy = centered @ vt[:2].T
    if xy.shape[1] < 2:  # one feature: pad a zero second coordinate
        xy = np.concatenate([xy, np.zeros((xy.shape[0], 2 - xy.shape[1]))], axis=1)
    return xy


def project_2d(x, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``[N, D] -> ([N, 2], method_used)``: t-SNE (scikit-learn) or PCA (numpy SVD).

    ``method="auto"`` uses t-SNE when scikit-learn is importable and there are enough points for its
    perplexity (N > 5), else PCA; ``"tsne"`` requires scikit-learn; ``"pca"`` always works.

    Raises:
        ValueError: ``x`` not 2-D with at least 2 rows and 1 column, not finite, or unknown ``method``.
        ImportError: ``method="tsne"`` without scikit-learn.
    """
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"method must be 'auto', 'tsne' or 'pca', got {method!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"x must be [N >= 2, D >= 1], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    use_tsne = method == "tsne"
    if method == "auto":
        use_tsne = importlib.util.find_spec("sklearn") is not None and x.shape[0] > 5
    if use_tsne:
        from sklearn.manifold import TSNE

        # sklearn requires perplexity < N; 30 is its default, smaller for tiny sets
        perp = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
        xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
        return np.asarray(xy, dtype=np.float64), "tsne"
    return _pca_2d(x), "pca"
