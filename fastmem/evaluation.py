"""Scoring shared by the chapters: answer matching, token F1, BM25 retrieval, repetition of
generated text, bootstrap confidence intervals."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
from nltk.stem import PorterStemmer

from .errors import ParameterError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = re.compile(r"[a-z0-9]+")
_WORD_ENDED = re.compile(r"[a-z0-9]+[^a-z0-9]")
_LOCOMO_STOPWORDS = re.compile(r"\b(a|an|the|and)\b")
_STEMMER = PorterStemmer()


def first_word(text: str) -> str:
    """The first word of a generation, lower-cased, with whitespace and punctuation stripped (chapter 2).

    The offline model often starts its answer with a newline; that is not held against it.
    A word is a run of letters and digits, so "wolf-like" starts with "wolf" but "cowboy" is not "cow".
    """
    words = _WORD.findall(text.lower())
    return words[0] if words else ""


def first_word_complete(text: str) -> bool:
    """True once ``text`` holds its whole first word, ended by a character that is not part of it,
    so that no continuation can change :func:`first_word` (chapter 2: generation stops there)."""
    return _WORD_ENDED.search(text.lower()) is not None


def normalise_answer(text: str) -> list[str]:
    """SQuAD-style normalisation into tokens: lower case, no punctuation or articles (chapter 3's recall probes)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return [t for t in text.split() if t not in ("a", "an", "the")]


def locomo_tokens(text: str) -> list[str]:
    """LoCoMo's official answer normalisation, then Porter stems (chapters 3 and 4).

    As ``task_eval/evaluation.py`` of the LoCoMo release: commas dropped, lower case, punctuation
    removed, the words "a", "an", "the" and "and" removed, each remaining word stemmed (NLTK's
    Porter stemmer), so that "hiking" matches "hike" and "Paris, France" matches "paris france".
    """
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return [_STEMMER.stem(word) for word in _LOCOMO_STOPWORDS.sub(" ", text).split()]


def token_f1(prediction: str, gold: str) -> float:
    """LoCoMo's token F1 between a prediction and a gold answer, on :func:`locomo_tokens` (chapters 3 and 4).

    As the official scorer, an empty prediction or gold answer scores 0.
    """
    pred, ref = locomo_tokens(prediction), locomo_tokens(gold)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction: str, gold, category: int) -> float:
    """The official LoCoMo score of one answer by question category (chapters 3 and 4).

    Category 1 (several answers): the gold answer and the prediction are split at commas, and each
    gold part takes its best-matching predicted part; category 3: only the gold answer before the
    first ";" counts; category 5 (adversarial): 1 if the prediction says "no information available"
    or "not mentioned"; every other category (2, 4, and the book's own invented facts): :func:`token_f1`.
    """
    gold = str(gold)
    if category == 5:
        said = prediction.lower()
        return float("no information available" in said or "not mentioned" in said)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        parts = [p.strip() for p in prediction.split(",")]
        return float(np.mean([max(token_f1(p, g.strip()) for p in parts) for g in gold.split(",")]))
    return token_f1(prediction, gold)


def answer_f1(predictions: list[str], questions: list[dict]) -> np.ndarray:
    """The official LoCoMo score (:func:`locomo_f1`) of each prediction against its question (chapters 3 and 4)."""
    if len(predictions) != len(questions):
        raise ParameterError(f"{len(predictions)} predictions for {len(questions)} questions")
    return np.array([locomo_f1(p, q["answer"], q.get("category", 0)) for p, q in zip(predictions, questions)])


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
