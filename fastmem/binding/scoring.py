"""Reading with the memory and scoring what the model says: generation with an injected value, the
chapter's columns (Write, Read, Plain, Unrelated, retrieval, forced choice) and the in-context
baseline (chapter 2).
"""

from __future__ import annotations


import pandas as pd
import torch
from torch import nn

from .. import stats, tasks
from .. import value as fv
from ..errors import ParameterError
from ..evaluation import first_word, first_word_complete
from .memory import BindingMemory, KeyProjector, PromptStates, prompt_states
from .selection import Codebook, ContextGate, select_values


@torch.no_grad()
def generate(model: nn.Module, tokenizer, states: PromptStates, injections: torch.Tensor | None = None,
             max_new_tokens: int = 3, forced_first: torch.Tensor | None = None) -> list[str]:
    """Greedy continuations of prompts prefilled by :func:`prompt_states` with ``keep_cache``.

    ``injections[i]`` is added to the head input at prompt i's answer position, the forward pass
    that produces the first generated token; later tokens are generated plainly. Without
    injections this is plain greedy decoding (chapter 2). Where ``forced_first[i] >= 0`` it is
    prompt i's first token instead (the kNN-LM-style copy baseline). The chapter scores only the
    first word, so a batch stops once every continuation holds a whole first word (a word and
    what ends it): no later token can change it, and the rest of the budget would cost passes.
    """
    if not states.prefill:
        raise ParameterError("generate needs prompt states computed with keep_cache=True")
    head_input = states.answer.head_input
    if injections is not None:
        head_input = head_input + injections
    first_tokens = fv.head_logits(model, head_input).argmax(dim=-1)
    if forced_first is not None:
        first_tokens = torch.where(forced_first >= 0, forced_first, first_tokens)
    texts, start = [], 0
    for batch, past in states.prefill:
        rows = len(batch["input_ids"])
        prompt_length = past.get_seq_length()
        tokens = [first_tokens[start:start + rows]]
        mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
        for _ in range(max_new_tokens - 1):
            finished = torch.stack(tokens).eq(tokenizer.eos_token_id).any(dim=0)
            so_far = tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True)
            if all(done or first_word_complete(text) for done, text in zip(finished.tolist(), so_far)):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=past, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(dim=-1).masked_fill(finished, tokenizer.eos_token_id))
        added = past.get_seq_length() - prompt_length
        if added:
            past.crop(-added)
        texts.extend(tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True))
        start += rows
    return texts


def exact_match(generations: list[str], labels: list[str]) -> torch.Tensor:
    """1.0 where the first generated word is the label, else 0.0 (chapter 2)."""
    return torch.tensor([float(first_word(g) == label.lower()) for g, label in zip(generations, labels)])


def contains_any(generations: list[str], label_sets: list[set[str]]) -> torch.Tensor:
    """1.0 where the first generated word is any of the stored labels: a false recall (chapter 2)."""
    return torch.tensor([float(first_word(g) in {l.lower() for l in labels}) for g, labels in zip(generations, label_sets)])


def changed(generations: list[str], reference: list[str]) -> torch.Tensor:
    """1.0 where the first generated word differs from the model's without memory (chapter 2: locality)."""
    return torch.tensor([float(first_word(a) != first_word(b)) for a, b in zip(generations, reference)])


def forced_choice(model: nn.Module, tokenizer, head_input: torch.Tensor, labels: list[str], choices: list[str]
                  ) -> torch.Tensor:
    """1.0 where, among ``choices``, the model ranks the label's token highest at the answer position (chapter 2).

    Scores the memory's content, not the answer's format: a newline or "The" cannot make it miss.
    """
    choice_ids = torch.tensor(tasks.label_token_ids(tokenizer, choices))
    picked = fv.head_logits(model, head_input)[:, choice_ids].argmax(dim=-1)
    return torch.tensor([float(choices[i] == label) for i, label in zip(picked.tolist(), labels)])


COPY_MODE = "knn_copy"


COLUMNS = ("write", "read", "read_forced", "retrieval", "plain_any", "plain_changed", "unrelated_any",
           "unrelated_changed", "write_token", "read_token", "plain_own", "unrelated_retrieved")


def score_columns(model: nn.Module, tokenizer, memory: BindingMemory, mode: str, states: dict[str, PromptStates],
                  unrelated: PromptStates, bindings: list[tasks.Binding], layer: int, projector: KeyProjector | None,
                  reference: dict[str, list[str]], choices: list[str], alpha: float = 1.0,
                  threshold: float | None = None, gate: ContextGate | None = None,
                  max_new_tokens: int = 3, codebook: Codebook | None = None) -> dict[str, torch.Tensor]:
    """Per-prompt scores of every column for one memory row (chapter 2); see :data:`COLUMNS`.

    ``write``/``read``: the first generated word is the label. ``read_forced``: among ``choices``
    the label ranks highest. ``retrieval``: the read question retrieves its own entry.
    ``plain_any``/``unrelated_any``: a contextless / unrelated question answers with ANY stored
    label; ``plain_changed``/``unrelated_changed``: its first word differs from the model's without
    memory (``reference``: the memory-free generations, keys "plain" and "unrelated").
    ``write_token``/``read_token``: the first generated token is the label's token (a label token
    the model then continues into a longer word, " catched", counts here and not in ``read``).
    ``plain_own``/``unrelated_retrieved``: seed 000's narrower counting, a contextless question
    answers with one of its word's own labels / an unrelated question with the retrieved entry's label.
    The oracle ``context_gate`` is told the context each prompt names: the binding's for write and
    read, none for plain and unrelated questions. Mode :data:`COPY_MODE` is the kNN-LM-style
    baseline: ``both_top1`` retrieval, and the retrieved entry's label token is copied as the
    first generated token (a kNN distribution with all its weight on one entry) instead of adding a value.
    """
    stored_labels = {b.label for b in memory.bindings}
    labels = [b.label for b in bindings]
    targets = torch.tensor(tasks.label_token_ids(tokenizer, labels))
    named = {"write": [b.context for b in bindings], "read": [b.context for b in bindings],
             "plain": [None] * len(bindings), "unrelated": [None] * len(unrelated.keys["symbol"][layer])}
    scores = {}
    for column in ("write", "read", "plain", "unrelated"):
        column_states = unrelated if column == "unrelated" else states[column]
        copy = mode == COPY_MODE
        values, index = select_values(memory, "both_top1" if copy else mode, column_states, layer, projector,
                                      named[column], threshold, gate, codebook)
        if copy:
            values = torch.zeros_like(values)
            stored_ids = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in memory.bindings]))
            copied = torch.where(index >= 0, stored_ids[index.clamp(min=0)], -1)
        texts = generate(model, tokenizer, column_states, alpha * values, max_new_tokens, copied if copy else None)
        head_input = column_states.answer.head_input + alpha * values
        if column in ("write", "read"):
            scores[column] = exact_match(texts, labels)
            first = copied if copy else fv.head_logits(model, head_input).argmax(dim=-1)
            scores[f"{column}_token"] = (first == targets).float()
        else:
            scores[f"{column}_any"] = contains_any(texts, [stored_labels] * len(texts))
            scores[f"{column}_changed"] = changed(texts, reference[column])
        if column == "plain":
            own = {}
            for b in memory.bindings:
                own.setdefault(b.word, set()).add(b.label)
            scores["plain_own"] = contains_any(texts, [own.get(b.word, set()) for b in bindings])
        if column == "unrelated":
            retrieved = [{memory.bindings[i].label} if i >= 0 else set() for i in index.tolist()]
            scores["unrelated_retrieved"] = contains_any(texts, retrieved)
        if column == "read":
            scores["read_forced"] = (torch.tensor([float(memory.bindings[i].label == l) for i, l in zip(index.tolist(), labels)])
                                     if copy else forced_choice(model, tokenizer, head_input, labels, choices))
            entry = {(b.word, b.context): i for i, b in enumerate(memory.bindings)}
            scores["retrieval"] = torch.tensor([float(entry.get((b.word, b.context), -2) == i)
                                                for b, i in zip(bindings, index.tolist())])
    return {column: scores[column] for column in COLUMNS}


def score_records(seed: int, experiment: str, row: str, scores: dict[str, torch.Tensor],
                  bindings: list[tasks.Binding], unrelated_prompts: list[str]) -> list[dict]:
    """One record per scored prompt of one memory row, for the cluster bootstrap (chapter 2).

    A binding's prompts are units of their seed ("seed:word:context"); an unrelated question is
    one unit whatever the seed ("q:question"), so that the same question asked under several
    seeds is resampled as one. ``item`` is what an interval resamples: a word with its prompts in
    both contexts ("seed:word"), which are not independent of each other, or an unrelated question.
    """
    records = []
    for column, values in scores.items():
        if column.startswith("unrelated"):
            units = items = [f"q:{p}" for p in unrelated_prompts]
        else:
            units = [f"{seed}:{b.word}:{b.context}" for b in bindings]
            items = [f"{seed}:{b.word}" for b in bindings]
        records += [{"seed": seed, "experiment": experiment, "row": row, "column": column, "unit": unit,
                     "item": item, "score": value} for unit, item, value in zip(units, items, values.tolist())]
    return records


def rate_intervals(scores: pd.DataFrame, n_boot: int = 2000, seeds_fixed: bool = True) -> dict:
    """Every rate of chapter 2 with its 95% interval, by (experiment, row, column): (mean, low, high).

    With ``seeds_fixed`` (the chapter's design: two or three seeds cannot stand for a population
    of seeds) the interval keeps every seed and resamples items, a word with both of its prompts
    or an unrelated question (:func:`fastmem.stats.cluster_bootstrap_ci` with ``fixed_clusters``).
    Without it, the interval the chapter used before: seeds resampled, then prompts.
    """
    summary = {}
    for key, group in scores.groupby(["experiment", "row", "column"], sort=False):
        units = group["item"] if seeds_fixed else group["unit"]
        summary[key] = stats.cluster_bootstrap_ci(group["score"].to_numpy(), group["seed"].to_numpy(),
                                                  units.to_numpy(), n_boot, seed=0, fixed_clusters=seeds_fixed)
    return summary


def paired_rows(scores: pd.DataFrame, experiment: str, column: str, rows: list[str]) -> pd.DataFrame:
    """Two or more memory rows scored on the same prompts, one line per prompt (chapter 2: paired tests).

    Columns: ``seed``, ``unit``, ``item`` and one score column per row, aligned on the prompt, so
    that :func:`fastmem.stats.paired_difference` compares the rows item by item.
    """
    chosen = scores[(scores["experiment"] == experiment) & (scores["column"] == column)
                    & scores["row"].isin(rows)]
    wide = chosen.pivot_table(index=["seed", "unit", "item"], columns="row", values="score").reset_index()
    missing = [row for row in rows if row not in wide.columns]
    if missing:
        raise KeyError(f"rows not scored in {experiment!r}, {column!r}: {missing}")
    return wide.dropna(subset=rows)


def paired_comparisons(scores: pd.DataFrame, comparisons: dict[str, tuple[str, str, str, float]], column: str = "read",
                       n_boot: int = 2000) -> dict[str, stats.PairedDifference]:
    """Each named comparison ``(experiment, first row, second row, weight)``: the per-prompt difference
    second minus weight x first on the same prompts, items resampled with the seeds fixed, and the
    exact paired test (chapter 2)."""
    compared = {}
    for name, (experiment, first, second, weight) in comparisons.items():
        paired = paired_rows(scores, experiment, column, [first, second])
        compared[name] = stats.paired_difference(weight * paired[first], paired[second], paired["seed"],
                                                 paired["item"], n_boot, fixed_clusters=True)
    return compared


def paired_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``queries`` with row i of ``keys`` (chapter 2: does a read reach its entry)."""
    return (nn.functional.normalize(queries, dim=-1) * nn.functional.normalize(keys, dim=-1)).sum(dim=-1)


def in_context_scores(model: nn.Module, tokenizer, bindings: list[tasks.Binding], templates: list[tasks.Templates],
                      examples: list[tasks.Binding], choices: list[str], max_new_tokens: int = 3
                      ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The in-context baseline's Read and forced-choice Read (chapter 2), with its prompts and continuations.

    Each prompt holds ``examples`` as worked examples, then both statements about the word, then
    its read question (:func:`in_context_prompts`).
    """
    prompts = in_context_prompts(bindings, bindings, templates, examples)
    states = prompt_states(model, tokenizer, prompts, {}, [], keep_cache=True)
    texts = generate(model, tokenizer, states, None, max_new_tokens)
    truth = [b.label for b in bindings]
    scores = {"read": exact_match(texts, truth),
              "read_forced": forced_choice(model, tokenizer, states.answer.head_input, truth, choices)}
    return scores, prompts, texts


def in_context_prompts(bindings: list[tasks.Binding], all_bindings: list[tasks.Binding],
                       templates: tasks.Templates | list[tasks.Templates] = tasks.Templates(),
                       examples: list[tasks.Binding] = ()) -> list[str]:
    """The in-context baseline: worked examples, every write statement about the word, then the question (chapter 2).

    A worked example is a statement about another word, its question and the answer, one per
    line: it shows the model the answer format, so that format is not what the baseline misses.
    """
    per_binding = templates if isinstance(templates, list) else [templates] * len(all_bindings)
    template_of = {(b.word, b.context): t for b, t in zip(all_bindings, per_binding)}
    statements: dict[str, list[str]] = {}
    for b in all_bindings:
        statements.setdefault(b.word, []).append(template_of[(b.word, b.context)].write.format(
            word=b.word, context=b.context, label=b.label))
    first = per_binding[0]
    shown = "".join(f"{first.write.format(word=e.word, context=e.context, label=e.label)}. "
                    f"{tasks.read_prompt(e, first)} {e.label}\n" for e in examples)
    return [shown + ". ".join(statements[b.word]) + ". " + tasks.read_prompt(b, template_of[(b.word, b.context)])
            for b in bindings]
