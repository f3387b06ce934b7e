"""Seed 000's experiment as written, and the Read/Plain trade-off of its memory (chapter 2).

The seed's task: invented words bound to one-token labels in two contexts ("In game A, blicket
means red"), read back by "Question: in game A, what is blicket? Answer:", asked without context
("Question: what is blicket? Answer:"), and its four memories (``both_top1``, ``context_gate``,
``raw_both_top1``, ``average``) with its single-step value and, beside it, chapter 1's iterated one.
The key projector is trained on game A / game B only, as the seed describes; its second table
writes and reads new context names with that projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import tasks
from ..report import estimate_text, number_text
from .memory import BindingMemory, KeyProjector, PromptStates, encode_bindings, retrieve, train_projector, write_memory
from .scoring import contains_any, exact_match, generate, score_columns, score_records

SEED_MODES = ("both_top1", "context_gate", "raw_both_top1", "average")
SEED_VALUES = ("single_step", "iterated")
# The seed's contexts: the projector's training pair, then the new names of its second table.
SEED_CONTEXTS = {"same game A/B": ("game A", "game B"), "new game C/D": ("game C", "game D"),
                 "new lab north/south": ("lab north", "lab south")}
# Seed 000's first table (frozen Pythia-70M), as published: Write, Read, Plain, Unrelated.
SEED_SAME_CONTEXT = {"both_top1": (1.000, 0.805, 0.008, 0.000), "context_gate": (1.000, 0.801, 0.000, 0.000),
                     "raw_both_top1": (1.000, 0.180, 0.031, 0.000), "average": (0.484, 0.309, 0.000, 0.000)}
# Seed 000's second table, as published: Read, Plain, Unrelated by (experiment, mode).
SEED_TRANSFER = {("same game A/B", "both_top1"): (0.805, 0.008, 0.000),
                 ("same game A/B", "context_gate"): (0.801, 0.000, 0.000),
                 ("new game C/D", "both_top1"): (0.602, 0.031, 0.000),
                 ("new game C/D", "context_gate"): (0.863, 0.000, 0.000),
                 ("new lab north/south", "both_top1"): (0.340, 0.023, 0.000),
                 ("new lab north/south", "context_gate"): (0.668, 0.000, 0.000)}
NO_MEMORY = "no memory"


def seed_row(mode: str, value_kind: str) -> str:
    """The row name of one memory of seed 000's task: its mode and value kind (chapter 2)."""
    return f"{mode} ({value_kind})"


def seed_projector(model: nn.Module, tokenizer, words: list[str], labels, layer: int, key_dim: int = 128,
                   steps: int = 300, seed: int = 0) -> KeyProjector:
    """The key projector as seed 000 trains it: by backprop on game A / game B bindings of ``words``
    with the seed's templates, never on evaluation words (chapter 2)."""
    bindings = tasks.make_bindings(words, SEED_CONTEXTS["same game A/B"], labels, seed)
    states = encode_bindings(model, tokenizer, bindings, [layer], tasks.Templates(), ("write", "read"),
                             keep_cache=False)
    return train_projector(states["read"].keys["symbol"][layer], states["write"].keys["symbol"][layer], key_dim,
                           steps, seed=seed)


@dataclass
class SeedTaskRun:
    """One seed's run of seed 000's task in one pair of contexts (chapter 2).

    ``records`` are :func:`~fastmem.binding.scoring.score_records` rows, one memory row per
    :func:`seed_row` and ``no memory``; ``memories`` holds the written memory of each value kind.
    """

    records: list[dict]
    bindings: list[tasks.Binding]
    states: dict[str, PromptStates]
    memories: dict[str, BindingMemory]


@torch.no_grad()
def seed_task_run(model: nn.Module, tokenizer, projector: KeyProjector, words: list[str], contexts: tuple[str, str],
                  labels, layer: int, alphas: dict[str, float], unrelated: PromptStates, unrelated_prompts: list[str],
                  unrelated_reference: list[str], experiment: str, seed: int, modes=SEED_MODES,
                  step: float = 4.0, n_steps: int = 5, max_new_tokens: int = 4) -> SeedTaskRun:
    """Write ``words`` bound in both ``contexts`` with the seed's templates, then read, ask without
    context and ask unrelated questions under every mode and value kind (chapter 2).

    ``alphas`` maps each value kind to the scale its value is added with; the seed adds its
    single-step value once (1.0). Every memory of every row is scored on the same prompts.
    """
    templates = tasks.Templates()
    bindings = tasks.make_bindings(words, contexts, labels, seed)
    states = encode_bindings(model, tokenizer, bindings, [layer], templates)
    reference = {"plain": generate(model, tokenizer, states["plain"], None, max_new_tokens),
                 "unrelated": unrelated_reference}
    memories = {kind: write_memory(model, tokenizer, states["write"], bindings, layer, kind, step, n_steps, projector)
                for kind in alphas}
    score = lambda memory, mode, alpha: score_columns(model, tokenizer, memory, mode, states, unrelated, bindings,
                                                      layer, projector, reference, labels, alpha,
                                                      max_new_tokens=max_new_tokens)
    empty = BindingMemory.empty(states["write"].answer.head_input.shape[1])
    records = score_records(seed, experiment, NO_MEMORY, score(empty, "both_top1", 1.0), bindings, unrelated_prompts)
    for kind, alpha in alphas.items():
        for mode in modes:
            records += score_records(seed, experiment, seed_row(mode, kind), score(memories[kind], mode, alpha),
                                     bindings, unrelated_prompts)
    return SeedTaskRun(records, bindings, states, memories)


@torch.no_grad()
def tradeoff_outcomes(model: nn.Module, tokenizer, run: SeedTaskRun, projector: KeyProjector, layer: int,
                      alphas: list[float], seed: int, max_new_tokens: int = 4) -> pd.DataFrame:
    """Per prompt, the seed's memory (``both_top1``) at every value scale in ``alphas``: its answer
    with the value and without, and its learned-key cosine with the entry it retrieves (chapter 2).

    A threshold on that cosine injects only above it, so a prompt below gives the memory-free
    answer: every threshold's Read and Plain any follow from these rows (:func:`tradeoff_curve`)
    without generating again. Read questions score the label; plain questions any stored label.
    """
    # Every memory of the run stores the same bindings, so the hits and the memory-free answers are shared.
    stored = [{b.label for b in run.bindings}] * len(run.bindings)
    hits = {"read": lambda texts: exact_match(texts, [b.label for b in run.bindings]),
            "plain": lambda texts: contains_any(texts, stored)}
    without = {column: hit(generate(model, tokenizer, run.states[column], None, max_new_tokens))
               for column, hit in hits.items()}
    rows = []
    for kind, memory in run.memories.items():
        for column, hit in hits.items():
            states = run.states[column]
            index, cosine = retrieve(projector(states.keys["symbol"][layer]), memory.learned_keys())
            for alpha in alphas:
                with_memory = hit(generate(model, tokenizer, states, alpha * memory.values[index], max_new_tokens))
                rows += [{"seed": seed, "value": kind, "alpha": alpha, "column": column, "unit": i,
                          "cosine": c, "with_memory": w, "without": o}
                         for i, (c, w, o) in enumerate(zip(cosine.tolist(), with_memory.tolist(),
                                                           without[column].tolist()))]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class TradeoffPoint:
    """One setting of the seed's memory on the Read/Plain trade-off (chapter 2)."""

    value: str
    alpha: float
    threshold: float
    read: float
    plain_any: float


def tradeoff_curve(outcomes: pd.DataFrame, thresholds) -> list[TradeoffPoint]:
    """Read and Plain any of every (value kind, scale, threshold), pooled over seeds and prompts (chapter 2).

    A threshold of -1 is the memory as the seed runs it (always injected).
    """
    points = []
    for (kind, alpha), group in outcomes.groupby(["value", "alpha"], sort=False):
        for threshold in thresholds:
            answered = np.where(group["cosine"] >= threshold, group["with_memory"], group["without"])
            rate = lambda column: float(answered[(group["column"] == column).to_numpy()].mean())
            points.append(TradeoffPoint(kind, float(alpha), float(threshold), rate("read"), rate("plain")))
    return points


def pareto_front(points: list[TradeoffPoint]) -> list[TradeoffPoint]:
    """The points no other point beats in both Read (higher) and Plain any (lower), by Plain any (chapter 2)."""
    front, best_read = [], -1.0
    for point in sorted(points, key=lambda p: (p.plain_any, -p.read)):
        if point.read > best_read:
            front.append(point)
            best_read = point.read
    return front


def seed_reading(points: list[TradeoffPoint], read_at_least: float, plain_at_most: float) -> str:
    """Where on the curve Read reaches ``read_at_least`` with Plain any at most ``plain_at_most``,
    in words: the value kinds and scales, or "nowhere" (chapter 2: the seed's reading)."""
    found = {}
    for p in points:
        if p.read >= read_at_least and p.plain_any <= plain_at_most:
            found.setdefault(p.value, set()).add(p.alpha)
    if not found:
        return "nowhere on the curve"
    names = {"single_step": "single-step value", "iterated": "iterated value"}
    return "; ".join(f"{names.get(kind, kind)} at scale {', '.join(f'{a:g}' for a in sorted(alphas))}"
                     for kind, alphas in found.items())


VALUE_NAMES = {"single_step": "single-step value (seed)", "iterated": "iterated value (chapter 1)"}


def tradeoff_figure(points: list[TradeoffPoint], operating_alphas: dict[str, float], seed_point: tuple[float, float],
                    title: str, model_label: str, param_set: str):
    """Read against Plain any for each value kind (chapter 2): the points no setting beats (a line),
    the memory always injected at each scale (dots), the scale the chapter runs (a ring) and the
    seed's own reading (a star); the caption names dots and rings, the legend the rest."""
    import matplotlib.pyplot as plt

    from ..plotting import label_figure

    fig, axis = plt.subplots(figsize=(6.4, 5.2))
    for (kind, name), colour in zip(VALUE_NAMES.items(), ("tab:orange", "tab:blue")):
        mine = [p for p in points if p.value == kind]
        if not mine:
            continue
        front = pareto_front(mine)
        axis.step([p.plain_any for p in front], [p.read for p in front], where="post", color=colour, label=name)
        always = [p for p in mine if p.threshold == min(q.threshold for q in mine)]
        axis.plot([p.plain_any for p in always], [p.read for p in always], "o", color=colour, alpha=0.6)
        chosen = [p for p in always if p.alpha == operating_alphas.get(kind)]
        axis.plot([p.plain_any for p in chosen], [p.read for p in chosen], "o", markersize=13, fillstyle="none",
                  color=colour)
    axis.plot([seed_point[0]], [seed_point[1]], "*", color="black", markersize=14,
              label="seed 000's reading (Pythia-70M)")
    axis.set(xlabel="Plain any: a stored label without context", ylabel="Read: the label in its context",
             xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    return label_figure(fig, title, model_label, param_set)


# Seed 000's columns and how this chapter counts them alike: Write, Read (the first word is the
# label), Plain (one of the word's own labels) and Unrelated (the retrieved entry's label).
SEED_COLUMNS = {"write": "Write", "read": "Read", "plain_own": "Plain", "unrelated_retrieved": "Unrelated"}


def seed_table(summary: dict, experiment: str, modes=SEED_MODES) -> pd.DataFrame:
    """Seed 000's first table with ours beside it: per mode, the seed's published row, then ours with
    each value kind, every rate with its 95% interval (chapter 2). ``summary`` is
    :func:`~fastmem.binding.scoring.rate_intervals` of the replication's records."""
    rows = []
    for mode in modes:
        rows.append({"row": f"{mode}: seed 000", **{title: number_text(number) for title, number
                                                     in zip(SEED_COLUMNS.values(), SEED_SAME_CONTEXT[mode])}})
        for kind in SEED_VALUES:
            key = (experiment, seed_row(mode, kind))
            rows.append({"row": f"{mode}: ours, {VALUE_NAMES[kind].split(' (')[0]}",
                         **{title: estimate_text(*summary[(*key, column)]) for column, title in SEED_COLUMNS.items()}})
    return pd.DataFrame(rows)


def transfer_table(summary: dict, modes=("both_top1", "context_gate")) -> pd.DataFrame:
    """Seed 000's context-generalisation table with ours beside it: Read and Plain (its counting) per
    experiment and mode, the seed's published numbers first (chapter 2)."""
    rows = []
    for experiment in SEED_CONTEXTS:
        for mode in modes:
            seed_read, seed_plain, _ = SEED_TRANSFER[(experiment, mode)]
            cell = lambda kind, column: estimate_text(*summary[(experiment, seed_row(mode, kind), column)])
            rows.append({"contexts": experiment, "memory": mode,
                         "seed 000: read / plain": f"{number_text(seed_read)} / {number_text(seed_plain)}",
                         "ours, single step: read": cell("single_step", "read"),
                         "ours, iterated: read": cell("iterated", "read"),
                         "ours, iterated: plain": cell("iterated", "plain_own")})
    return pd.DataFrame(rows)
