"""Scoring shared by the chapters: answer matching, token F1, bootstrap confidence intervals."""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = re.compile(r"[a-z0-9]+")


def first_word(text: str) -> str:
    """The first word of a generation, lower-cased, with whitespace and punctuation stripped (chapter 2).

    The offline model often starts its answer with a newline; that is not held against it.
    A word is a run of letters and digits, so "wolf-like" starts with "wolf" but "cowboy" is not "cow".
    """
    words = _WORD.findall(text.lower())
    return words[0] if words else ""


def normalise_answer(text: str) -> list[str]:
    """SQuAD-style normalisation into tokens: lower case, no punctuation or articles (chapters 3 and 4)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return [t for t in text.split() if t not in ("a", "an", "the")]


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD/LoCoMo token-level F1 between a prediction and a gold answer (chapters 3 and 4)."""
    pred, ref = normalise_answer(prediction), normalise_answer(gold)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(values, groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of ``values`` (all chapters).

    With ``groups`` (for example the run seed of each value), rows are resampled within each
    group, so that every resample keeps each seed's share of the data.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    groups = np.zeros(len(values), dtype=int) if groups is None else np.asarray(groups)
    means = np.zeros(n_boot)
    for group in np.unique(groups):
        members = values[groups == group]
        picks = rng.integers(0, len(members), size=(n_boot, len(members)))
        means += members[picks].sum(axis=1)
    means /= len(values)
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
