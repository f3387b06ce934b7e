"""Chapter 4's experiment: when a question is asked, which bank it reads, the controls (chapter 4).

The protocol: a question is asked right after the session that holds its latest evidence turn,
with the bank written up to then (:func:`asking_points`). Every trained adapter answers each test
question with its own conversation's bank, with another test conversation's bank after as many
sessions (the wrong-bank control), with a bank holding only its evidence turns (the oracle bank),
with the bank after the whole conversation (the paper's condition) and with an empty bank.
:func:`run_latent_experiment` is the loop, with an optional curriculum of invented facts
(:mod:`~fastmem.latent.curriculum`) before the conversations' questions; :func:`text_contexts`
builds the text baselines' prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import Conversation
from ..evaluation import answer_f1, bm25_top_k
from ..models import model_info
from ..stats import paired_change, paired_difference
from .adapters import LatentAdapter, shared_features
from .backbones import hidden_rms
from .devices import resolve_device
from .training import train_until_plateau

CONDITIONS = ("own", "wrong", "oracle", "paper", "zero")


def asking_points(questions: list[dict], convs: dict[str, Conversation], partner: dict[str, str]) -> list[dict]:
    """Each question with where it is asked and which bank is the wrong one (chapter 4).

    ``asked_at``: turns written when it is asked, the end of the session holding its latest
    evidence turn (kept when already set, as for synthetic facts); ``sessions``: sessions written
    by then; ``wrong_id``/``wrong_at``: the partner conversation and its turns written after as
    many sessions (all of them if it has fewer); ``lag``: turns written since the earliest evidence.
    """
    out = []
    for q in questions:
        conv = convs[q["sample_id"]]
        asked_at = q.get("asked_at") or conv.session_ends()[conv.session_of_turn[max(q["evidence"])] - 1]
        sessions = conv.session_of_turn[asked_at - 1]
        other = convs[partner[q["sample_id"]]]
        wrong_at = other.session_ends()[min(sessions, other.n_sessions) - 1]
        out.append({**q, "asked_at": asked_at, "sessions": sessions, "wrong_id": other.sample_id,
                    "wrong_at": wrong_at, "lag": asked_at - min(q["evidence"])})
    return out


def text_contexts(kind: str, questions: list[dict], convs: dict[str, Conversation], *, k: int = 3,
                  tokenizer=None, context_tokens: int = 256) -> list[str]:
    """The text a baseline puts before each question (chapter 4), from the turns written when it is asked.

    ``bm25``: the ``k`` best whole turns by BM25; ``oracle``: the question's evidence turns;
    ``long``: the last ``context_tokens`` tokens of the conversation so far.
    """
    out = []
    for q in questions:
        turns = convs[q["sample_id"]].turns[: q["asked_at"]]
        if kind == "bm25":
            text = "\n".join(turns[i] for i in bm25_top_k(q["question"], turns, k))
        elif kind == "oracle":
            text = "\n".join(turns[i] for i in sorted(set(q["evidence"])))
        elif kind == "long":
            ids = tokenizer.encode("\n".join(turns), add_special_tokens=False)[-context_tokens:]
            text = tokenizer.decode(ids)
        else:
            raise ValueError(f"unknown text context {kind!r}: use bm25, oracle or long")
        out.append(text + "\n")
    return out


def prepare_chunks(backbone, questions: list[dict], prefix: str, *, answers: bool = False, contexts=None,
                   chunk: int = 16, context_tokens: int = 512) -> list:
    """Questions prepared in chunks of ``chunk``, each prompt preceded by ``prefix`` (+ its context; chapter 4)."""
    texts = [prefix + (contexts[i] if contexts else "") for i in range(len(questions))]
    return [backbone.prepare([q["question"] for q in questions[s:s + chunk]],
                             [q["answer"] for q in questions[s:s + chunk]] if answers else None,
                             contexts=texts[s:s + chunk] if any(texts) else None, context_tokens=context_tokens)
            for s in range(0, len(questions), chunk)]


def _by_chunk(chunks: list, banks: list | None, answer) -> list:
    """``answer(batch, bank)`` for each chunk, question ``i`` reading ``banks[i]`` (no bank: ``None``)."""
    out, start = [], 0
    for batch in chunks:
        out.append(answer(batch, None if banks is None else torch.stack(banks[start:start + len(batch)])))
        start += len(batch)
    return out


def answer_chunks(backbone, adapter, chunks: list, banks: list | None, max_new_tokens: int) -> list[str]:
    """Greedy answers, question ``i`` reading ``banks[i]`` (no bank: ``None``; chapter 4)."""
    answers = _by_chunk(chunks, banks, lambda batch, bank: backbone.generate(adapter, bank, batch, max_new_tokens))
    return [a for chunk in answers for a in chunk]


def encode_conversations(backbone, convs, cache: dict | None = None) -> dict[str, list[torch.Tensor]]:
    """Each conversation's turn states, every distinct turn text encoded once (chapter 4)."""
    cache = {} if cache is None else cache
    # by length, so that a batch pads its turns to a similar length (padding is masked)
    new = sorted({t for c in convs for t in c.turns} - set(cache), key=lambda t: (len(t), t))
    cache.update(zip(new, backbone.encode_turns(new)))
    return {c.sample_id: [cache[t] for t in c.turns] for c in convs}


def _banks(adapter: LatentAdapter, features: dict, needed: dict[str, set]) -> dict:
    banks = {}
    for sid, points in needed.items():
        _, snaps = adapter.write_turns(adapter.empty_bank(), snapshots=points, features=features[sid])
        banks.update({(sid, p): b for p, b in snaps.items()})
    return banks


def _oracle_bank(adapter: LatentAdapter, features: list, evidence) -> torch.Tensor:
    bank, _ = adapter.write_turns(adapter.empty_bank(), features=[features[i] for i in sorted(set(evidence))])
    return bank


def prepare_questions(backbone, train_questions: list[dict], valid_questions: list[dict],
                      test_questions: list[dict], prefix: str = "", chunk: int = 16) -> dict:
    """Training, validation and test questions prepared once for many runs (chapter 4).

    ``test_forced``: the test questions with their answers, for the teacher-forced loss.
    """
    return {"train": prepare_chunks(backbone, train_questions, prefix, answers=True, chunk=max(1, len(train_questions))),
            "valid": prepare_chunks(backbone, valid_questions, prefix, answers=True, chunk=chunk),
            "test": prepare_chunks(backbone, test_questions, prefix, chunk=chunk),
            "test_forced": prepare_chunks(backbone, test_questions, prefix, answers=True, chunk=chunk)}


@dataclass
class Curriculum:
    """Invented facts a read is trained on before the conversations' questions (chapter 4).

    ``states``: each curriculum conversation's turn states (:func:`encode_conversations`);
    ``prepared``: :func:`prepare_questions`' ``train`` and ``valid`` parts for its questions;
    at most ``steps`` optimiser steps at rate ``lr``, the validation loss measured every
    ``eval_every`` steps and training stopped after ``patience`` measurements without a new best.
    """

    train: list[dict]
    valid: list[dict]
    states: dict
    prepared: dict
    steps: int
    lr: float
    eval_every: int
    patience: int


def _answer_nll(backbone, adapter, chunks: list, banks: list) -> np.ndarray:
    losses = _by_chunk(chunks, banks, lambda batch, bank: backbone.answer_nll(adapter, bank, batch).cpu())
    return torch.cat(losses).numpy()


def _features(backbone, states: dict, sids, seed: int, design: str, centre) -> dict:
    return {sid: shared_features(backbone.width, states[sid], seed, design, centre) for sid in sids}


def _pretrain(adapter, backbone, curriculum: Curriculum, features: dict, seed: int, train: dict, device) -> dict:
    """Train the read on the curriculum's facts, each question with its conversation's whole bank.

    ``features``: the curriculum conversations' write projections for this adapter's seed and design.
    """
    banks = {sid: adapter.write_turns(adapter.empty_bank(), features=f)[0] for sid, f in features.items()}
    prepared = {part: [b.to(device) for b in curriculum.prepared[part]] for part in ("train", "valid")}
    settings = {**train, "max_steps": curriculum.steps, "eval_every": curriculum.eval_every,
                "patience": curriculum.patience}
    return train_until_plateau(adapter, backbone, prepared["train"][0],
                               [banks[q["sample_id"]] for q in curriculum.train], prepared["valid"],
                               [banks[q["sample_id"]] for q in curriculum.valid], lr=curriculum.lr, seed=seed,
                               **settings)


def run_latent_experiment(backbone, convs: dict[str, Conversation], train_questions: list[dict],
                          valid_questions: list[dict], test_questions: list[dict], *, methods, rows: int, gammas,
                          seeds, lr: float, train: dict, max_new_tokens: int, prefix: str = "", slot_top_k: int = 8,
                          states: dict | None = None, prepared: dict | None = None,
                          conditions=CONDITIONS, design: str = "paper", centre: torch.Tensor | None = None,
                          curriculum: Curriculum | None = None, device="auto") -> list[dict]:
    """Train one adapter per (seed, gamma, method) and answer the test questions under each condition (chapter 4).

    Questions come from :func:`asking_points`: training and validation questions read their own
    bank where they are asked; test questions are answered under ``conditions`` (a subset of
    :data:`CONDITIONS`). ``train`` holds :func:`~fastmem.latent.training.train_until_plateau`'s
    settings but ``lr``; ``states`` (:func:`encode_conversations`) and ``prepared``
    (:func:`prepare_questions`, with the same ``prefix``) are computed here when not given.
    ``design`` and ``centre`` are the adapters' (:data:`~fastmem.latent.adapters.DESIGNS`); with a
    ``curriculum`` each adapter first learns to read its invented facts.
    ``device`` (``"auto"``: CUDA when present, else the CPU): the backbone's model, the given
    states and batches, every adapter and every bank are put there; only the final answers leave it.
    Returns one row per run: ``method``, ``gamma``, ``seed``, ``device``, ``training`` (curves,
    steps; ``curriculum``: the same for the curriculum), ``adapter`` (trained, recording its model
    so that ``adapter.save`` works), and by condition ``preds``, ``f1`` and ``nll`` (the
    teacher-forced loss, nats per answer token) per test question.
    """
    device = resolve_device(device)
    backbone.to(device)
    states = encode_conversations(backbone, convs.values()) if states is None else {
        sid: [z.to(device) for z in turns] for sid, turns in states.items()}
    prepared = prepared or prepare_questions(backbone, train_questions, valid_questions, test_questions, prefix)
    prepared = {part: [batch.to(device) for batch in batches] for part, batches in prepared.items()}
    backbone_model = model_info(backbone.model)
    scale = hidden_rms(prepared["valid"][0])
    keys = {"own": lambda q: (q["sample_id"], q["asked_at"]), "wrong": lambda q: (q["wrong_id"], q["wrong_at"]),
            "paper": lambda q: (q["sample_id"], len(convs[q["sample_id"]].turns))}
    needed: dict[str, set] = {}
    for q in train_questions + valid_questions:
        needed.setdefault(q["sample_id"], set()).add(q["asked_at"])
    for q in test_questions:
        needed.setdefault(q["sample_id"], set())  # the oracle bank writes from its features
        for name in set(conditions) & set(keys):
            sid, point = keys[name](q)
            needed.setdefault(sid, set()).add(point)
    if curriculum is not None:
        lesson_ids = {q["sample_id"] for q in curriculum.train + curriculum.valid}
        lesson_states = {sid: [z.to(device) for z in curriculum.states[sid]] for sid in lesson_ids}
    runs = []
    for seed in seeds:
        features = _features(backbone, states, needed, seed, design, centre)
        # the curriculum's banks differ by method and capacity, its write projections only by seed
        lesson_features = None if curriculum is None else _features(
            backbone, lesson_states, lesson_ids, seed, design, centre)
        for gamma in gammas:
            for method in methods:
                adapter = LatentAdapter(method, backbone.width, rows, gamma=gamma, top_k=slot_top_k, seed=seed,
                                        hidden_rms=scale, model=backbone_model, design=design, centre=centre,
                                        device=device)
                pretrained = None if curriculum is None else _pretrain(
                    adapter, backbone, curriculum, lesson_features, seed, train, device)
                banks = _banks(adapter, features, needed)
                info = train_until_plateau(
                    adapter, backbone, prepared["train"][0], [banks[keys["own"](q)] for q in train_questions],
                    prepared["valid"], [banks[keys["own"](q)] for q in valid_questions], lr=lr, seed=seed, **train)
                preds, nll = {}, {}
                for name in conditions:
                    if name == "zero":
                        bank_list = [adapter.empty_bank()] * len(test_questions)
                    elif name == "oracle":
                        bank_list = [_oracle_bank(adapter, features[q["sample_id"]], q["evidence"])
                                     for q in test_questions]
                    else:
                        bank_list = [banks[keys[name](q)] for q in test_questions]
                    preds[name] = answer_chunks(backbone, adapter, prepared["test"], bank_list, max_new_tokens)
                    nll[name] = _answer_nll(backbone, adapter, prepared["test_forced"], bank_list)
                runs.append({"method": method, "gamma": gamma, "seed": seed, "device": str(device),
                             "training": info, "curriculum": pretrained, "adapter": adapter, "preds": preds,
                             "f1": {name: answer_f1(p, test_questions) for name, p in preds.items()},
                             "nll": nll})
    return runs


def paired_endpoint(runs: list[dict], better: str, worse: str, keep=None, measure: str = "f1") -> dict:
    """``F1[better] - F1[worse]`` over runs that differ only by seed, paired per question (chapter 4).

    ``measure="logprob"`` compares the teacher-forced log-probability of the gold answer (nats per
    answer token, the negated ``nll``) instead of F1: the sensitive endpoint.

    The chapter has two or three seeds, too few for a bootstrap to treat as a sample, so the seeds
    are held fixed: each question's difference is averaged over the seeds' runs, and the 95%
    interval resamples questions (:func:`fastmem.stats.paired_difference`); the interval is over
    questions, for these seeds. The exact paired test is the sign test over questions
    (``p_value``, with ``better`` and ``worse`` counts of questions), and ``detectable`` is the
    smallest difference the interval detects with 80% power. ``low_seeds_resampled`` and
    ``high_seeds_resampled`` are the interval of the chapter's first design (seeds resampled,
    then questions: :func:`fastmem.stats.paired_change` with ``clusters`` = seed), which its
    registered rules read. ``keep``: a mask of the questions to use.
    """
    def values(run, condition):
        return run["f1"][condition] if measure == "f1" else -run["nll"][condition]

    keep = np.ones(len(runs[0]["f1"][better]), bool) if keep is None else np.asarray(keep, bool)
    worse_f1 = np.stack([values(r, worse)[keep] for r in runs])  # (seed, question)
    better_f1 = np.stack([values(r, better)[keep] for r in runs])
    fixed = paired_difference(worse_f1.mean(0), better_f1.mean(0))
    seeds = np.repeat([r["seed"] for r in runs], int(keep.sum()))
    units = np.tile(np.flatnonzero(keep), len(runs))
    resampled = paired_change(worse_f1.ravel(), better_f1.ravel(), relative=False, clusters=seeds, units=units)
    return {"plain": fixed.plain, "memory": fixed.other, "change": fixed.difference, "low": fixed.low,
            "high": fixed.high, "p_value": fixed.p_value, "better": fixed.better, "worse": fixed.worse,
            "detectable": fixed.detectable, "low_seeds_resampled": resampled["low"],
            "high_seeds_resampled": resampled["high"]}
