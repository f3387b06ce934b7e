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
}
# Context pairs of different styles (games, places, times, people, sources, activities): chapter 2
# trains the key projector and the gate on the first three and evaluates on all of them.
CONTEXT_PAIRS = (
    ("game A", "game B"), ("the morning", "the evening"), ("Paris", "Tokyo"),
    ("chess", "poker"), ("Alice's notes", "Bob's notes"), ("the old book", "the new book"),
)
# Unseen pairs whose two names end in the same word, built for chapter 2's test of context keys (a
# key read at the context's last token cannot tell them apart); no name holds a label word.
SHARED_LAST_WORD_PAIRS = (("Tom's list", "Mary's list"), ("the north tower", "the south tower"),
                          ("summer camp", "winter camp"))
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
        "Question: what is the capital of Italy? Answer:",
        "Question: how many legs does a spider have? Answer:",
        "Question: what is the opposite of up? Answer:",
        "Question: what do plants need to grow? Answer:",
        "Question: what is the tallest animal? Answer:",
        "Question: what is the capital of Japan? Answer:",
        "Question: how many days are in a week? Answer:",
        "Question: what do you use to write? Answer:",
        "Question: what is the colour of the sun? Answer:",
        "Question: what animal gives us wool? Answer:",
        "Question: what is the first month of the year? Answer:",
        "Question: what metal is a coin made of? Answer:",
        "Question: what do fish live in? Answer:",
        "Question: what is the largest planet? Answer:",
        "Question: what animal is known for its stripes? Answer:",
        "Question: what do you wear on your feet? Answer:",
        "Question: what is the sound a cat makes? Answer:",
        "Question: what is the boiling point of water? Answer:",
        "Question: what colour is a ripe tomato? Answer:",
        "Question: what do birds build? Answer:",
        "Question: what is the capital of Spain? Answer:",
        "Question: what instrument has black and white keys? Answer:",
        "Question: what animal carries its home on its back? Answer:",
        "Question: what is the main language of Brazil? Answer:",
        "Question: what do you call a baby dog? Answer:",
        "Question: what shape has three sides? Answer:",
        "Question: what is the opposite of big? Answer:",
        "Question: what do you call a person who flies planes? Answer:",
        "Question: what colour are leaves in spring? Answer:",
        "Question: what fruit keeps the doctor away? Answer:",
        "Question: what is the capital of Germany? Answer:",
        "Question: how many hours are in a day? Answer:",
        "Question: what do you use to cut paper? Answer:",
        "Question: what animal is the king of the jungle? Answer:",
        "Question: what is the colour of milk? Answer:",
        "Question: what sport uses a racket? Answer:",
        "Question: what is the opposite of day? Answer:",
        "Question: what gas do plants breathe in? Answer:",
        "Question: what do bakers make? Answer:",
        "Question: what is the name of our star? Answer:",
    )


# Template families (chapter 2): every write template names the context and the word before the
# label; read templates ask in several word orders, one with the context after the word. The
# projector and gate train on the first two of each family; the others are unseen templates.
WRITE_TEMPLATES = (
    "In {context}, {word} means {label}",
    "In {context}, the word {word} stands for {label}",
    "Note about {context}: {word} is the name for {label}",
    "Remember that in {context} a {word} is a {label}",
)
READ_TEMPLATES = (
    "Question: in {context}, what is {word}? Answer:",
    "Question: what does {word} mean in {context}? Answer:",
    "Question: thinking of {context}, what is a {word}? Answer:",
    "Question: in {context}, what does the word {word} stand for? Answer:",
)
PLAIN_TEMPLATES = (
    "Question: what is {word}? Answer:",
    "Question: what does {word} mean? Answer:",
    "Question: what is a {word}? Answer:",
    "Question: what does the word {word} stand for? Answer:",
)


def template_family(indices) -> list["Templates"]:
    """The :class:`Templates` of the family members ``indices`` (write i, read i, plain i; chapter 2)."""
    return [Templates(write=WRITE_TEMPLATES[i], read=READ_TEMPLATES[i], plain=PLAIN_TEMPLATES[i]) for i in indices]


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


def make_family_bindings(words, context_pairs, labels, seed: int) -> list[Binding]:
    """Word i is bound in both contexts of pair ``i % len(context_pairs)`` (chapter 2)."""
    bindings = []
    for index, word in enumerate(words):
        bindings.extend(make_bindings([word], context_pairs[index % len(context_pairs)], labels, seed * 100_003 + index))
    return bindings


def templates_for(bindings: list[Binding], family: list["Templates"]) -> list["Templates"]:
    """One member of ``family`` per binding, rotating over the distinct words in order (chapter 2)."""
    order: dict[str, int] = {}
    for b in bindings:
        order.setdefault(b.word, len(order))
    return [family[order[b.word] % len(family)] for b in bindings]


def family_bindings(words, context_pairs, family: list["Templates"], labels, seed: int
                    ) -> tuple[list[Binding], list["Templates"]]:
    """Bindings of :func:`make_family_bindings` and one template of ``family`` each (chapter 2)."""
    bindings = make_family_bindings(words, context_pairs, labels, seed)
    return bindings, templates_for(bindings, family)


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
