"""Which value a query receives: top-1 retrieval, the selective gate, the GRACE-style codebook and the
thresholds, all fitted on held-out training words (chapter 2).

The selective memory (mode ``gated``) injects only when the prompt carries a stored context (some
run of the prompt's tokens, as long as the stored context phrase, has a centred mean hidden state
close to the stored context state) and a stored word (the projected word key is close to a stored
key); the word is then retrieved among the inferred context's entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import tasks
from ..errors import ParameterError
from .memory import (BindingMemory, KeyProjector, PromptStates, encode_bindings, retrieve, retrieve_among,
                     train_projector, write_memory)


MODES = ("both_top1", "context_gate", "raw_both_top1", "average", "gated", "grace")


@dataclass
class ContextGate:
    """When the selective memory may inject, fitted on held-out training words (chapter 2).

    ``centre`` is the mean hidden state of training prompts' tokens; a stored context is present
    when some window of the prompt's tokens (as many as the entry's context state pools), its mean
    centred, has cosine at least ``context_threshold`` with a stored (centred) context state; a
    stored word is present when the projected word key has cosine at least ``word_threshold`` with
    a retrieval key of the inferred context.
    """

    centre: torch.Tensor
    context_threshold: float
    word_threshold: float

    def closed(self, context_score: torch.Tensor, word_score: torch.Tensor) -> torch.Tensor:
        """Where the gate stays shut: no stored context present, or no stored word of it (chapters 2, 5)."""
        return (context_score < self.context_threshold) | (word_score < self.word_threshold)


def context_presence(query: PromptStates, memory: BindingMemory, layer: int, centre: torch.Tensor) -> torch.Tensor:
    """For every prompt and stored entry, the best cosine of any window of prompt tokens with the entry's
    context state (chapter 2).

    Found from the forward pass alone: no context string of the prompt is used.
    """
    return presence_scores(query.tokens[layer], query.token_mask, memory.context_states, centre,
                           memory.context_lengths)


def presence_scores(tokens: torch.Tensor, token_mask: torch.Tensor, context_states: torch.Tensor,
                    centre: torch.Tensor, context_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``(prompts, entries)``: :func:`context_presence` on bare tensors, as a served memory sees them (chapters 2, 5).

    An entry whose context state is the mean of L tokens (``context_lengths``; None: 1 for every
    entry) is compared with the means of every L consecutive real tokens (``token_mask``) of each
    prompt's states ``tokens`` (prompts x positions x width): the best cosine of a centred window
    mean with the centred stored state; ``-inf`` where no window of L real tokens fits. A prompt's
    first token is never part of a window (:func:`after_first_token`).
    """
    token_mask = after_first_token(token_mask)
    if context_lengths is None:
        return _best_cosine(tokens, token_mask, context_states, centre)
    dtype = torch.promote_types(tokens.dtype, centre.dtype)
    scores = torch.full((len(tokens), len(context_states)), -torch.inf, dtype=dtype, device=tokens.device)
    for length in context_lengths.unique().tolist():
        entries = (context_lengths == length).nonzero().squeeze(1).to(tokens.device)
        if length > tokens.shape[1]:
            continue  # no window that long: the entry stays at -inf
        windows, fits = (tokens, token_mask) if length == 1 else _window_means(tokens, token_mask, length)
        scores[:, entries] = _best_cosine(windows, fits, context_states[entries.to(context_states.device)], centre)
    return scores


def _best_cosine(candidates: torch.Tensor, usable: torch.Tensor, stored: torch.Tensor, centre: torch.Tensor
                ) -> torch.Tensor:
    """``(prompts, entries)``: the best cosine of any usable centred candidate state (prompts x
    candidates x width) with each centred stored state (chapter 2: the gate)."""
    candidates = nn.functional.normalize(candidates - centre, dim=-1)
    stored = nn.functional.normalize(stored - centre, dim=-1)
    similarity = torch.einsum("ptd,ed->pte", candidates, stored)
    return similarity.masked_fill(~usable[:, :, None], -torch.inf).max(dim=1).values


def _window_means(tokens: torch.Tensor, token_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean state of every ``length`` consecutive positions (prompts x windows x width) and
    whether each window lies entirely on real tokens (chapter 2: the gate).

    One cumulative sum gives every window; it runs in float64 because a few tokens' states are
    orders of magnitude larger than the rest, and a float32 running sum would lose the small ones.
    Padded positions are zeroed first: their states may not be finite and would spread along the sum.
    """
    real = token_mask[..., None]
    summed = nn.functional.pad(torch.where(real, tokens, 0).double().cumsum(dim=1), (0, 0, 1, 0))
    counts = nn.functional.pad(token_mask.long().cumsum(dim=1), (1, 0))
    means = ((summed[:, length:] - summed[:, :-length]) / length).to(tokens.dtype)
    return means, counts[:, length:] - counts[:, :-length] == length


def gate_scores(memory: BindingMemory, query: PromptStates, layer: int, projector: KeyProjector,
                centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context score, word score and chosen entry of every prompt for the selective memory (chapter 2).

    The inferred context is the stored context with the highest presence; the word is retrieved
    among that context's entries by the learned keys.
    """
    return gate_scores_of(memory, query.tokens[layer], query.token_mask,
                          projector(query.keys["symbol"][layer])[:, None], centre)


def gate_scores_of(memory: BindingMemory, tokens: torch.Tensor, token_mask: torch.Tensor, word_keys: torch.Tensor,
                   centre: torch.Tensor, word_mask: torch.Tensor | None = None, keys_normalised: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gate_scores` on bare tensors, as a served memory sees them (chapters 2, 5).

    ``tokens`` (prompts x positions x width, real tokens marked by ``token_mask``) are searched for
    a stored context; ``word_keys`` (prompts x candidates x key_dim) are projected candidate word
    keys, one per prompt where the word's position is known, every token otherwise (``word_mask``
    marks the usable ones): the best-matching candidate is the word key (:func:`retrieve_among`).
    """
    context_score, best_entry = presence_scores(tokens, token_mask, memory.context_states, centre,
                                                memory.context_lengths).max(dim=-1)
    contexts = memory.context_ids()
    allowed = contexts[None, :] == contexts[best_entry][:, None]
    index, word_score = retrieve_among(word_keys, memory.learned_keys(), allowed, word_mask, keys_normalised)
    return context_score, word_score, index


def separating_threshold(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """The cosine cut that maximises (positives accepted) - (negatives accepted); the middle of the best range (chapter 2)."""
    candidates = torch.linspace(-1, 1, 801)
    accept = lambda scores: (scores[None, :] >= candidates[:, None]).float().mean(dim=1)
    margin = accept(positives) - accept(negatives)
    best = candidates[margin == margin.max()]
    return float((best.min() + best.max()) / 2)


@torch.no_grad()
def fit_gate(memory: BindingMemory, read: PromptStates, plain: PromptStates, unrelated: PromptStates, layer: int,
             projector: KeyProjector, centre: torch.Tensor) -> ContextGate:
    """Fit the gate's two thresholds on held-out TRAINING words, never on evaluation words (chapter 2).

    Context: read questions (context named) against plain and unrelated questions (none named).
    Word: read questions against unrelated questions (no stored word).
    """
    scores = {name: gate_scores(memory, states, layer, projector, centre)
              for name, states in (("read", read), ("plain", plain), ("unrelated", unrelated))}
    context_threshold = separating_threshold(scores["read"][0], torch.cat([scores["plain"][0], scores["unrelated"][0]]))
    word_threshold = separating_threshold(scores["read"][1], scores["unrelated"][1])
    return ContextGate(centre, context_threshold, word_threshold)


@dataclass
class Codebook:
    """A GRACE-style codebook, the baseline of chapter 2: raw word keys, one deferral radius per entry, replacements.

    A query whose raw key has cosine at least ``thresholds[e]`` with entry ``e`` (its nearest) gets
    its head input at the answer position *replaced* by ``replacements[e]`` (the write statement's
    head input moved by the stored value); otherwise the model is left alone.
    """

    keys: torch.Tensor
    thresholds: torch.Tensor
    replacements: torch.Tensor


def grace_codebook(memory: BindingMemory, write: PromptStates, initial_threshold: float) -> Codebook:
    """Build the codebook; as in GRACE, an entry's radius shrinks so that it does not reach a conflicting entry (chapter 2).

    A conflicting entry is one with another label: the radius ends halfway to the nearest one.
    """
    thresholds = grace_radii(memory.symbol_states, [b.label for b in memory.bindings], initial_threshold)
    return Codebook(memory.symbol_states, thresholds, write.answer.head_input + memory.values)


def grace_radii(codebook_keys: torch.Tensor, labels: list[str], initial_threshold: float) -> torch.Tensor:
    """Each entry's deferral radius (a cosine) after GRACE's conflict rule (chapter 2).

    An entry's radius starts at ``initial_threshold`` and shrinks so that it ends halfway to the
    nearest entry with another label: the larger of the two cosines.
    """
    keys = nn.functional.normalize(codebook_keys, dim=-1)
    conflict = torch.tensor([[a != b for b in labels] for a in labels], dtype=torch.bool)
    nearest_conflict = (keys @ keys.T).masked_fill(~conflict, -1.0).max(dim=-1).values
    return torch.maximum(torch.full_like(nearest_conflict, initial_threshold), (1 + nearest_conflict) / 2)


@torch.no_grad()
def fit_grace_threshold(memory: BindingMemory, read: PromptStates, plain: PromptStates, unrelated: PromptStates,
                        layer: int, bindings: list[tasks.Binding]) -> float:
    """The codebook's initial radius, chosen on held-out TRAINING words by the gate's rule (chapter 2).

    Every candidate radius is scored after GRACE's conflict rule has shrunk it (:func:`grace_radii`):
    a query counts as accepted when its cosine with its nearest entry reaches that entry's radius.
    Positives are read questions whose nearest entry is their own binding; negatives are plain and
    unrelated questions and read questions that would get another entry. The radius is the middle
    of the range that maximises (positives accepted) - (negatives accepted), as in
    :func:`separating_threshold`; shrunk radii that no positive reaches leave it at that range's middle.
    """
    floor = grace_radii(memory.symbol_states, [b.label for b in memory.bindings], -1.0)
    own = {(b.word, b.context): i for i, b in enumerate(memory.bindings)}

    def reachable(states):
        index, best = retrieve(states.keys["symbol"][layer], memory.symbol_states)
        return best.masked_fill(best < floor[index], -2.0), index

    read_scores, read_index = reachable(read)
    right = torch.tensor([own.get((b.word, b.context), -2) == i for b, i in zip(bindings, read_index.tolist())])
    negatives = torch.cat([read_scores[~right], reachable(plain)[0], reachable(unrelated)[0]])
    return separating_threshold(read_scores[right], negatives)


def after_first_token(token_mask: torch.Tensor) -> torch.Tensor:
    """``token_mask`` (prompts x positions, left-padded) without each prompt's first real token (chapter 2: the gate).

    The first token's state is a different object: in SmolLM2-135M at block 20 its norm is about
    20,000 against about 230 for the others. Averaged in, it alone sets the gate's centre, every
    centred state then points the same way and every presence cosine lands near 0.998; compared
    as a candidate, it matches nothing stored. The gate leaves it out of both.
    """
    first = token_mask.long().argmax(dim=1)
    kept = token_mask.clone()
    kept[torch.arange(len(kept), device=kept.device), first] = False
    return kept


def token_centre(states: list[PromptStates], layer: int) -> torch.Tensor:
    """Mean hidden state over the real tokens of training prompts, each prompt's first token left
    out (:func:`after_first_token`): the gate's centre (chapter 2)."""
    return torch.cat([s.tokens[layer][after_first_token(s.token_mask)] for s in states]).mean(dim=0)


@torch.no_grad()
def select_values(memory: BindingMemory, mode: str, query: PromptStates, layer: int,
                  projector: KeyProjector | None = None, query_contexts: list[str | None] | None = None,
                  threshold: float | None = None, gate: ContextGate | None = None, codebook: Codebook | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The value each query receives under ``mode``, and the entry retrieved (-1: nothing) (chapter 2).

    ``both_top1``: learned keys, all contexts in one memory. ``context_gate``: an oracle told the
    context each prompt names (``query_contexts``; None for a prompt that names none, which is
    then not restricted) and nothing else. ``raw_both_top1``: raw hidden states as keys.
    ``average``: the retrieved word's values averaged over its contexts. ``gated``: the selective
    memory (:class:`ContextGate`). ``grace``: the codebook baseline (:class:`Codebook`); its value
    is what turns the query's head input into the replacement. Below ``threshold`` (learned-key
    cosine) nothing is injected.
    """
    if mode not in MODES:
        raise ParameterError(f"unknown memory mode {mode!r}: use one of {MODES}")
    symbol = query.keys["symbol"][layer]
    n, width = len(symbol), memory.values.shape[1]
    if len(memory) == 0:
        return torch.zeros(n, width), torch.full((n,), -1)
    if mode == "grace":
        if codebook is None:
            raise ParameterError("mode 'grace' needs a Codebook (grace_codebook)")
        index, best = retrieve(symbol, codebook.keys)
        miss = best < codebook.thresholds[index]
        values = codebook.replacements[index] - query.answer.head_input
        values[miss] = 0
        return values, index.masked_fill(miss, -1)
    if mode != "raw_both_top1" and projector is None:
        raise ParameterError(f"mode {mode!r} needs the learned key projector")
    if mode == "gated":
        if gate is None:
            raise ParameterError("mode 'gated' needs a ContextGate fitted on training words (fit_gate)")
        context_score, best, index = gate_scores(memory, query, layer, projector, gate.centre)
        miss = gate.closed(context_score, best)
    else:
        allowed = None
        if mode == "context_gate":
            if query_contexts is None:
                raise ParameterError("context_gate needs the contexts the prompts name (it is an oracle)")
            stored = [b.context for b in memory.bindings]
            allowed = torch.tensor([[c is None or c == s for s in stored] for c in query_contexts], dtype=torch.bool)
        keys, queries = ((memory.symbol_states, symbol) if mode == "raw_both_top1"
                         else (memory.learned_keys(), projector(symbol)))
        index, best = retrieve(queries, keys, allowed)
        miss = best < threshold if threshold is not None else torch.zeros(n, dtype=torch.bool)
    values = memory.values[index].clone()
    if mode == "average":
        words = [b.word for b in memory.bindings]
        for row, entry in enumerate(index.tolist()):
            same = [i for i, w in enumerate(words) if w == words[entry]]
            values[row] = memory.values[same].mean(dim=0)
    values[miss] = 0
    return values, index.masked_fill(miss, -1)


@dataclass
class SeedFit:
    """What one seed fits on its training and calibration words, never on evaluation words (chapter 2)."""

    projector: KeyProjector
    gate: ContextGate
    threshold: float
    grace_threshold: float


def fit_seed(model: nn.Module, tokenizer, train: tuple[list[tasks.Binding], list[tasks.Templates]],
             calibration: tuple[list[tasks.Binding], list[tasks.Templates]], unrelated_fit: PromptStates,
             layer: int, key_dim: int = 128, projector_steps: int = 300, value_kind: str = "iterated",
             step: float = 4.0, n_steps: int = 5, seed: int = 0, context_key: str = "whole") -> SeedFit:
    """Train the key projector on training words, then fit every threshold on calibration words (chapter 2).

    ``train`` and ``calibration`` are (bindings, templates); ``unrelated_fit`` holds the
    calibration unrelated questions. The gate's centre is the mean token state of the training
    prompts; the gate, the learned-key threshold and GRACE's initial radius all use
    :func:`separating_threshold` on calibration read, plain and unrelated questions. The
    calibration memory stores ``context_key``'s context states (:func:`write_memory`), so the
    gate's context threshold holds for memories written with the same key.
    """
    train_states = encode_bindings(model, tokenizer, train[0], [layer], train[1], ("write", "read"), keep_cache=False)
    projector = train_projector(train_states["read"].keys["symbol"][layer], train_states["write"].keys["symbol"][layer],
                                key_dim, projector_steps, seed=seed)
    states = encode_bindings(model, tokenizer, calibration[0], [layer], calibration[1], keep_cache=False)
    memory = write_memory(model, tokenizer, states["write"], calibration[0], layer, value_kind, step, n_steps,
                          projector, context_key)
    centre = token_centre([train_states["write"], train_states["read"]], layer)
    gate = fit_gate(memory, states["read"], states["plain"], unrelated_fit, layer, projector, centre)
    threshold = calibrate_threshold(projector, memory, states["read"], states["plain"], unrelated_fit, layer)
    grace_threshold = fit_grace_threshold(memory, states["read"], states["plain"], unrelated_fit, layer,
                                          calibration[0])
    return SeedFit(projector, gate, threshold, grace_threshold)


def calibrate_threshold(projector: KeyProjector, memory: BindingMemory, read: PromptStates, plain: PromptStates,
                        unrelated: PromptStates, layer: int) -> float:
    """The learned-key cosine threshold that best separates read questions from plain and unrelated ones.

    Fitted on held-out TRAINING words only (:func:`separating_threshold`) (chapter 2).
    """
    best = {name: retrieve(projector(s.keys["symbol"][layer]), memory.learned_keys())[1]
            for name, s in (("read", read), ("plain", plain), ("unrelated", unrelated))}
    return separating_threshold(best["read"], torch.cat([best["plain"], best["unrelated"]]))
