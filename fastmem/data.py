"""Vendored data sets, checked against recorded checksums (book page "Data and licences").

The repository ships LoCoMo, WikiText-2 and chapter 3's recall probes under ``data/`` with their
licences; ``data/SHA256SUMS`` records each file's checksum, and every loader verifies it before
returning anything. This is the one reader per data set: LoCoMo's turns and questions (with the
one rule for missing evidence, :func:`locomo_questions`) are read here for chapters 3 and 4.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DataError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL_ANSWER = "Not mentioned in the conversation"


def data_file(relative: str, data_dir: Path | str = DATA_DIR) -> Path:
    """Path of a vendored file after checking it exists and matches ``SHA256SUMS`` (all chapters)."""
    data_dir = Path(data_dir)
    path = data_dir / relative
    expected = _recorded_checksums(data_dir).get(relative)
    if expected is None:
        raise DataError(f"{relative}: no checksum recorded in {data_dir / 'SHA256SUMS'}")
    if not path.is_file():
        raise DataError(f"data file missing: {path} (restore it with `git checkout -- data/`)")
    stat = path.stat()
    actual = _sha256(path, stat.st_mtime_ns, stat.st_size)
    if actual != expected:
        raise DataError(
            f"data file corrupt: {path} has sha256 {actual[:12]}..., expected {expected[:12]}... "
            "(restore it with `git checkout -- data/`)"
        )
    return path


def load_locomo(data_dir: Path | str = DATA_DIR) -> list[dict]:
    """The ten LoCoMo conversations with their questions (chapters 3 and 4)."""
    return json.loads(data_file("locomo/locomo10.json", data_dir).read_text(encoding="utf-8"))


def locomo_turns(conversation: dict) -> list[tuple[str, int, str]]:
    """One LoCoMo conversation's turns in order, as (dia_id, session number, "Speaker: text") (chapters 3 and 4)."""
    sessions = conversation["conversation"]
    numbers = sorted(int(key.split("_")[1]) for key, value in sessions.items()
                     if key.startswith("session_") and isinstance(value, list))
    return [(turn["dia_id"], number, f"{turn['speaker']}: {turn['text']}")
            for number in numbers for turn in sessions[f"session_{number}"]]


def locomo_questions(conversation: dict, turns: list[tuple[str, int, str]], *,
                     complete_evidence: bool = False) -> list[dict]:
    """The questions of one LoCoMo conversation about ``turns``, in the data's order (chapters 3 and 4).

    The one rule for evidence: an evidence id is valid if, stripped of spaces, it is the
    ``dia_id`` of one of ``turns``. Every question records ``evidence``, the indices into ``turns``
    of its valid ids (in the order of the ids), and ``missing_evidence``, how many ids are not
    valid (LoCoMo has a few malformed ids, and ``turns`` may be a conversation's first turns only).
    A question with no valid evidence is excluded: nothing in ``turns`` supports it. A caller that
    needs all of a question's evidence (chapter 3 puts it into the prompt) passes
    ``complete_evidence=True``, which also excludes every question with a missing id.

    Each question also has ``answer`` (adversarial questions, category 5, have no gold answer:
    theirs is :data:`ADVERSARIAL_ANSWER`), ``category``, ``lag`` (a question is asked after all of
    ``turns``, so its lag is ``len(turns) - min(evidence)``) and the conversation's ``sample_id``.
    """
    index = {dia_id: i for i, (dia_id, _, _) in enumerate(turns)}
    questions = []
    for qa in conversation["qa"]:
        ids = [e.strip() for e in qa.get("evidence", [])]
        evidence = [index[e] for e in ids if e in index]
        missing = len(ids) - len(evidence)
        if not evidence or (complete_evidence and missing):
            continue
        answer = qa.get("answer")
        answer = ADVERSARIAL_ANSWER if answer is None or qa["category"] == 5 else str(answer)
        questions.append({"question": qa["question"], "answer": answer, "category": int(qa["category"]),
                          "evidence": evidence, "missing_evidence": missing, "lag": len(turns) - min(evidence),
                          "sample_id": conversation["sample_id"]})
    return questions


@dataclass
class Conversation:
    """One LoCoMo conversation as a flat list of turns and its questions (chapters 3 and 4)."""

    sample_id: str
    turns: list[str]
    session_of_turn: list[int]
    questions: list[dict] = field(default_factory=list)

    @property
    def n_sessions(self) -> int:
        """Number of sessions in the conversation (chapter 4)."""
        return max(self.session_of_turn) if self.session_of_turn else 0

    def session_ends(self) -> list[int]:
        """Number of turns written after each session 1..n_sessions (chapter 4, accumulation table)."""
        ends, count = [], 0
        for s in range(1, self.n_sessions + 1):
            count += sum(1 for x in self.session_of_turn if x == s)
            ends.append(count)
        return ends


def locomo_conversations(data: list[dict], max_turns: int = 0, *,
                         complete_evidence: bool = False) -> list[Conversation]:
    """Flatten LoCoMo into turns ("Speaker: text") and their questions (chapters 3 and 4).

    ``max_turns`` > 0 keeps only each conversation's first turns, and so only the questions with
    evidence among them; which questions are kept is :func:`locomo_questions`'s rule.
    """
    out = []
    for conversation in data:
        turns = locomo_turns(conversation)[:max_turns] if max_turns else locomo_turns(conversation)
        out.append(Conversation(conversation["sample_id"], [text for _, _, text in turns],
                                [session for _, session, _ in turns],
                                locomo_questions(conversation, turns, complete_evidence=complete_evidence)))
    return out


def sample_questions(convs: list[Conversation], n: int | None, seed: int) -> list[dict]:
    """A fixed random sample of ``n`` questions, spread evenly over ``convs`` (all when None; chapter 4)."""
    rng = np.random.default_rng(seed)
    if n is None:
        return [q for c in convs for q in c.questions]
    per = [n // len(convs) + (i < n % len(convs)) for i in range(len(convs))]
    chosen = []
    for c, k in zip(convs, per):
        idx = rng.permutation(len(c.questions))[: min(k, len(c.questions))]
        chosen += [c.questions[i] for i in sorted(idx)]
    return chosen


def locomo_items(data: list[dict], n_items: int, categories=(4,), seed: int = 0) -> list[dict]:
    """Short comprehension items from LoCoMo (chapter 3, measurement 4), drawn at random (seeded).

    An item is a question of ``categories`` whose evidence turns all exist, with those turns as
    ``evidence_text`` ("Speaker: text" lines, in the order of the evidence ids) for the prompt.
    """
    pool = [{**q, "evidence_text": "\n".join(c.turns[i] for i in q["evidence"])}
            for c in locomo_conversations(data, complete_evidence=True)
            for q in c.questions if q["category"] in categories]
    random.Random(seed).shuffle(pool)
    return pool[:n_items]


@dataclass(frozen=True)
class RecallProbe:
    """Facts stated at the start, a long writing task, then questions about the facts (chapter 3)."""

    facts: str
    topic: str
    questions: tuple[tuple[str, str], ...]


def load_recall_probes(data_dir: Path | str = DATA_DIR) -> tuple[RecallProbe, ...]:
    """Chapter 3's long-generation recall probes, in the file's order (invented facts; chapter 3)."""
    probes = json.loads(data_file("probes/long_recall.json", data_dir).read_text(encoding="utf-8"))
    return tuple(RecallProbe(p["facts"], p["topic"], tuple((q["question"], q["answer"]) for q in p["questions"]))
                 for p in probes)


def load_wikitext(split: str = "test", data_dir: Path | str = DATA_DIR) -> str:
    """The raw WikiText-2 text of ``split`` ('test' or 'valid') as one string (chapter 3)."""
    if split not in ("test", "valid"):
        raise DataError(f"WikiText-2 split must be 'test' or 'valid' (the train split is not vendored), got {split!r}")
    return data_file(f"wikitext-2/{split}.txt", data_dir).read_text(encoding="utf-8")


WIKITEXT_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" ,", ","), (" ;", ";"), (" :", ":"),
                  (" 's", "'s"), ("( ", "("), (" )", ")"))


def unrelated_texts(n_turns: int, n_sentences: int, seed: int = 0, data_dir: Path | str = DATA_DIR,
                    words: tuple[int, int] = (6, 40)) -> list[str]:
    """Text that names no invented word, as a deployed memory meets it: ``n_turns`` LoCoMo conversation
    turns, then ``n_sentences`` WikiText-2 test sentences, drawn reproducibly from ``seed`` (chapter 2:
    the served gate's false openings).

    Only pieces of ``words`` (at least, at most) words are drawn; WikiText sentences with an
    unknown-word marker are skipped and its tokenisation (" @-@ ", " ,") is joined back into plain text.
    """
    rng = random.Random(seed)
    fits = lambda text: words[0] <= len(text.split()) <= words[1]
    turns = [text for conversation in load_locomo(data_dir) for _, _, text in locomo_turns(conversation)]
    sentences = []
    for line in load_wikitext("test", data_dir).splitlines():
        if not line.strip() or line.strip().startswith("="):
            continue
        for sentence in line.strip().split(" . "):
            if "<unk>" in sentence:
                continue
            for old, new in WIKITEXT_JOINS:
                sentence = sentence.replace(old, new)
            sentences.append(sentence.rstrip(" .") + ".")
    turns, sentences = [t for t in turns if fits(t)], [s for s in sentences if fits(s)]
    if n_turns > len(turns) or n_sentences > len(sentences):
        raise DataError(f"asked for {n_turns} turns and {n_sentences} sentences; "
                        f"{len(turns)} and {len(sentences)} fit {words[0]}-{words[1]} words")
    return rng.sample(turns, n_turns) + rng.sample(sentences, n_sentences)


@lru_cache(maxsize=None)
def _recorded_checksums(data_dir: Path) -> dict[str, str]:
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"checksum list missing: {sums}")
    pairs = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    return {name.strip(): digest for digest, name in pairs}


@lru_cache(maxsize=None)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """Checksum of ``path``; the modification time and size key the cache so an edit is seen."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
