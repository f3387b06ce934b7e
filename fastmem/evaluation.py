"""Scoring shared by the chapters: answer matching, token F1, BM25 retrieval, repetition of
generated text, bootstrap confidence intervals."""

from __future__ import annotations

import math
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


def answer_f1(predictions: list[str], questions: list[dict]) -> np.ndarray:
    """SQuAD/LoCoMo token F1 of each prediction against its gold answer (chapter 4)."""
    return np.array([token_f1(p, q["answer"]) for p, q in zip(predictions, questions)])


def bm25_top_k(query: str, docs: list[str], k: int, k1: float = 1.5, b: float = 0.75) -> list[int]:
    """Indices of the ``k`` best BM25 matches of ``query`` among ``docs``, in turn order (chapter 4)."""
    toks = [normalise_answer(d) for d in docs]
    n, avg = len(toks), max(1e-9, sum(map(len, toks)) / max(1, len(toks)))
    df: dict[str, int] = {}
    for t in toks:
        for w in set(t):
            df[w] = df.get(w, 0) + 1
    scores = np.zeros(n)
    for w in set(normalise_answer(query)):
        if w not in df:
            continue
        idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
        for i, t in enumerate(toks):
            tf = t.count(w)
            if tf:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
    top = np.argsort(-scores, kind="stable")[:k]
    return sorted(int(i) for i in top)


def _ngrams(tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_rate(tokens, n: int = 4) -> float:
    """Share of the n-grams of a sequence that already occurred earlier in it (0: none repeats; chapter 3)."""
    grams = _ngrams(list(tokens), n)
    if not grams:
        return float("nan")
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def distinct_n(tokens, n: int = 2) -> float:
    """Distinct-n: unique n-grams over all n-grams (1: no n-gram repeats; chapter 3)."""
    grams = _ngrams(list(tokens), n)
    return len(set(grams)) / len(grams) if grams else float("nan")
