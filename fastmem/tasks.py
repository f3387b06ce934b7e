"""The binding task as data: invented words, contexts, labels and prompt templates (chapters 1 and 2).

Everything a reader may want to change is an argument: pass your own contexts, templates and
labels to :func:`make_bindings` and the prompt functions without editing this module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LABELS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple",
    "cat", "dog", "horse", "bird", "fish", "cow", "pig", "bear", "wolf", "fox",
)
CONTEXTS = {
    "train": ("game A", "game B"),
    "new_cd": ("game C", "game D"),
    "north_south": ("lab north", "lab south"),
}
ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kl", "m", "n", "p", "pl", "pr",
          "s", "sk", "sl", "sn", "t", "tr", "v", "w", "z")
NUCLEI = ("a", "e", "i", "o", "u", "ee", "oo", "ai", "ou")
CODAS = ("", "b", "ck", "d", "g", "k", "m", "n", "p", "sh", "t", "x", "zz")


@dataclass(frozen=True)
class Templates:
    """Prompt templates with ``{word}``, ``{context}`` and ``{label}`` fields (chapter 2).

    ``write`` is the statement that teaches a binding, cut just before the label when it serves as
    a prompt; ``read`` asks for it with its context, ``plain`` without, and ``unrelated`` prompts
    mention no invented word.
    """

    write: str = "In {context}, {word} means {label}"
    read: str = "Question: in {context}, what is {word}? Answer:"
    plain: str = "Question: what is {word}? Answer:"
    unrelated: tuple[str, ...] = (
        "Question: what colour is the sky? Answer:",
        "Question: what animal barks? Answer:",
        "Question: what is the capital of France? Answer:",
        "Question: what do bees make? Answer:",
        "Question: what colour is grass? Answer:",
        "Question: what animal says moo? Answer:",
        "Question: what is frozen water called? Answer:",
        "Question: what colour is snow? Answer:",
        "Question: what animal has a trunk? Answer:",
        "Question: what do cows drink? Answer:",
        "Question: what is the opposite of hot? Answer:",
        "Question: what colour is a banana? Answer:",
        "Question: what animal lives in a hive? Answer:",
        "Question: what is two plus two? Answer:",
        "Question: what do we breathe? Answer:",
        "Question: what colour is coal? Answer:",
        "Question: what animal purrs? Answer:",
        "Question: what falls from clouds? Answer:",
        "Question: what is the largest ocean? Answer:",
        "Question: what colour is blood? Answer:",
        "Question: what animal hoots at night? Answer:",
        "Question: what season follows winter? Answer:",
        "Question: what do you read? Answer:",
        "Question: what colour is an orange? Answer:",
    )


@dataclass(frozen=True)
class Binding:
    """One fact to remember: in ``context``, the invented ``word`` means ``label``."""

    word: str
    context: str
    label: str


def nonce_words(count: int, seed: int, syllables: tuple[int, ...] = (2,)) -> list[str]:
    """``count`` distinct pronounceable invented words, reproducible from ``seed`` (chapter 2)."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(
            rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS)
            for _ in range(rng.choice(syllables))
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_bindings(words, contexts, labels, seed: int) -> list[Binding]:
    """Bind every word to a different label in each context, so the contexts conflict (chapter 2)."""
    if len(labels) < len(contexts):
        raise ValueError(f"need at least as many labels ({len(labels)}) as contexts ({len(contexts)})")
    rng = random.Random(seed)
    bindings = []
    for word in words:
        chosen = rng.sample(list(labels), len(contexts))
        bindings.extend(Binding(word, context, label) for context, label in zip(contexts, chosen))
    return bindings


def write_prompt(binding: Binding, templates: Templates = Templates()) -> str:
    """The write statement up to (not including) the label: the answer position is its end (chapter 1)."""
    marker = "\x00"
    text = templates.write.format(word=binding.word, context=binding.context, label=marker)
    return text.split(marker)[0].rstrip()


def read_prompt(binding: Binding, templates: Templates = Templates()) -> str:
    """The question that asks for ``binding`` with its context cue (chapter 1)."""
    return templates.read.format(word=binding.word, context=binding.context)


def plain_prompt(binding: Binding, templates: Templates = Templates()) -> str:
    """The question without a context cue (chapter 2)."""
    return templates.plain.format(word=binding.word)


def single_token_labels(tokenizer, labels=LABELS) -> tuple[str, ...]:
    """Labels that the tokenizer encodes, after a space, as exactly one token (chapter 1)."""
    return tuple(label for label in labels if len(tokenizer.encode(" " + label, add_special_tokens=False)) == 1)


def label_token_ids(tokenizer, labels) -> list[int]:
    """The single token id of ``" " + label`` for each label (chapter 1)."""
    ids = [tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    bad = [label for label, toks in zip(labels, ids) if len(toks) != 1]
    if bad:
        raise ValueError(f"labels are not single tokens for this tokenizer: {bad}")
    return [toks[0] for toks in ids]
