"""The one-shot binding memory of seed 000: keys, values, retrieval and injection (chapter 2).

Write: the key is the hidden state at the last token of the invented word in the write statement,
at a chosen block; the value is chapter 1's correction at the statement's answer position.
Read: the question's key retrieves the top-1 stored key by cosine similarity (one matrix
product); the retrieved value is added to the state entering the output head at the answer
position, and the model then generates greedily. The model's weights are never touched.
Retrieval keys are projected and normalised once, when the memory is written.

The selective memory (mode ``gated``) injects only when the prompt carries a stored context
(some token's centred hidden state is close to a stored context state) and a stored word (the
projected word key is close to a stored key), with thresholds fitted on held-out training words;
the word is then retrieved among the entries of the inferred context only.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import tasks
from . import value as fv
from .benchmark import timing_ratio
from .errors import ParameterError
from .evaluation import first_word
from .models import ModelInfo, model_info, transformer_blocks
from .names import VALUE_KINDS
from .persistence import load_memory, save_memory

MEMORY_KIND = "binding"
MODES = ("both_top1", "context_gate", "raw_both_top1", "average", "gated", "grace")


@dataclass
class PromptStates:
    """Hidden states at key tokens (``keys[name][block]``, one row per prompt) and answer states (chapter 2).

    ``tokens[block]`` holds every token's state (prompts x positions x width, left-padded) and
    ``token_mask`` marks the real tokens: the gate looks for a stored context anywhere in the prompt.
    """

    keys: dict[str, dict[int, torch.Tensor]]
    answer: fv.AnswerStates
    prefill: list[tuple[dict, object]] = field(default_factory=list)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None

    def subset(self, rows: int) -> "PromptStates":
        """The first ``rows`` prompts' keys and token states; answer states and caches are kept whole (chapter 2)."""
        return PromptStates({name: {layer: k[:rows] for layer, k in per.items()} for name, per in self.keys.items()},
                            self.answer, self.prefill, {layer: t[:rows] for layer, t in self.tokens.items()},
                            None if self.token_mask is None else self.token_mask[:rows])


def key_prefix(prompt: str, anchor: str | None = None) -> str:
    """The text whose last token holds a key: the prompt up to the end of ``anchor`` (chapter 2).

    ``anchor`` is the invented word for symbol keys, the context phrase for context keys. When it
    is None or absent (a question without that cue), the prompt up to its first question mark.
    """
    if anchor is not None and anchor in prompt:
        end = prompt.index(anchor) + len(anchor)
        return prompt[:end]
    return prompt.split("?")[0] if "?" in prompt else prompt


@torch.no_grad()
def prompt_states(model: nn.Module, tokenizer, prompts: list[str], prefixes: dict[str, list[str]],
                  layers: list[int], batch_size: int = 64, progress: bool = False,
                  keep_cache: bool = False) -> PromptStates:
    """One batched forward pass per chunk: block outputs at each prefix's last token, and answer states.

    ``prefixes`` maps a key name ("symbol", "context") to one prefix per prompt; ``layers`` index
    the blocks (0 = first block's output). A prefix must tokenise as a prefix of its prompt, which
    holds for the templates here; a mismatch raises rather than guessing (chapter 2).
    With ``keep_cache`` the prompts' key-value caches are kept, so that :func:`generate` can
    continue from them under any injection without running the prompts again: the injection
    changes only the head input at the answer position, which no cached key or value depends on.
    """
    keys = {name: {layer: [] for layer in layers} for name in prefixes}
    answers, prefill, tokens, masks = [], [], {layer: [] for layer in layers}, []
    for start in tqdm(range(0, len(prompts), batch_size), desc="forward passes", disable=not progress):
        chunk = prompts[start:start + batch_size]
        batch = fv.encode_prompts(model, tokenizer, chunk)
        out, answer = fv.forward_with_answer_states(model, batch, output_hidden_states=True, use_cache=keep_cache)
        answers.append(answer)
        if keep_cache:
            prefill.append((batch, out.past_key_values))
        width = batch["input_ids"].shape[1]
        rows = torch.arange(len(chunk))
        masks.append(batch["attention_mask"].bool())
        for layer in layers:
            tokens[layer].append(out.hidden_states[layer + 1])
        for name, texts in prefixes.items():
            positions = []
            for prompt, prefix in zip(chunk, texts[start:start + batch_size]):
                full, head = tokenizer.encode(prompt), tokenizer.encode(prefix)
                if full[: len(head)] != head:
                    raise ParameterError(f"key prefix {prefix!r} does not tokenise as a prefix of {prompt!r}")
                positions.append(width - len(full) + len(head) - 1)
            for layer in layers:
                keys[name][layer].append(out.hidden_states[layer + 1][rows, torch.tensor(positions)])
    longest = max(m.shape[1] for m in masks)
    left_pad = lambda t: nn.functional.pad(t, (0, 0, longest - t.shape[1], 0)) if t.dim() == 3 else \
        nn.functional.pad(t, (longest - t.shape[1], 0))
    return PromptStates({name: {layer: torch.cat(parts) for layer, parts in per_layer.items()}
                         for name, per_layer in keys.items()}, fv.concat_states(answers), prefill,
                        {layer: torch.cat([left_pad(t) for t in parts]) for layer, parts in tokens.items()},
                        torch.cat([left_pad(m) for m in masks]))


class KeyProjector(nn.Module):
    """A linear map from hidden states to retrieval keys, trained by backprop on cached states (chapter 2)."""

    def __init__(self, width: int, key_dim: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(width, key_dim, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(key_dim, width, generator=generator) / width ** 0.5)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        centred = states / states.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return nn.functional.normalize(self.linear(centred * self.scale), dim=-1)


def train_projector(queries: torch.Tensor, stored: torch.Tensor, key_dim: int = 128, steps: int = 300,
                    lr: float = 3e-3, temperature: float = 0.05, seed: int = 0) -> KeyProjector:
    """Contrastive (InfoNCE) training: query i must retrieve stored key i among all others (chapter 2).

    ``queries`` and ``stored`` are cached frozen hidden states of TRAINING bindings only: row i of
    each is the same (word, context). The same word in the other context is among the negatives,
    which is what teaches the projector to keep conflicting contexts apart. The LM stays frozen.
    """
    torch.manual_seed(seed)
    projector = KeyProjector(queries.shape[1], key_dim, seed)
    optimiser = torch.optim.Adam(projector.parameters(), lr=lr)
    targets = torch.arange(len(queries))
    for _ in range(steps):
        logits = projector(queries) @ projector(stored).T / temperature
        loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    projector.requires_grad_(False)
    return projector


@dataclass
class BindingMemory:
    """Stored bindings: raw key states, context states and values, with what they were written from (chapter 2).

    Raw states are kept for the raw-key baseline and the gate; ``retrieval_keys`` are the learned
    keys, projected and normalised once at write time (:meth:`project`), never on each read.
    :func:`write_memory` also records the block the keys were read at, the value kind and the
    model, which :meth:`save` writes to a memory file and :meth:`load` checks.
    """

    symbol_states: torch.Tensor
    context_states: torch.Tensor
    values: torch.Tensor
    bindings: list[tasks.Binding] = field(default_factory=list)
    layer: int | None = None
    value_kind: str | None = None
    model: ModelInfo | None = None
    retrieval_keys: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.bindings)

    @torch.no_grad()
    def project(self, projector: "KeyProjector") -> "BindingMemory":
        """Compute the learned retrieval keys of every stored entry, once (chapter 2)."""
        self.retrieval_keys = nn.functional.normalize(projector(self.symbol_states), dim=-1)
        return self

    def learned_keys(self) -> torch.Tensor:
        """The retrieval keys computed by :meth:`project`; a memory without them cannot serve learned modes (chapter 2)."""
        if self.retrieval_keys is None:
            raise ParameterError("this memory has no retrieval keys: call memory.project(projector) once after writing")
        return self.retrieval_keys

    def head(self, size: int) -> "BindingMemory":
        """The memory of the first ``size`` entries (chapter 2: capacity)."""
        keys = None if self.retrieval_keys is None else self.retrieval_keys[:size]
        return BindingMemory(self.symbol_states[:size], self.context_states[:size], self.values[:size],
                             self.bindings[:size], self.layer, self.value_kind, self.model, keys)

    def followed_by(self, other: "BindingMemory") -> "BindingMemory":
        """This memory's entries, then ``other``'s, without retrieval keys: project the result once (chapter 2: capacity)."""
        return BindingMemory(torch.cat([self.symbol_states, other.symbol_states]),
                             torch.cat([self.context_states, other.context_states]),
                             torch.cat([self.values, other.values]), self.bindings + other.bindings,
                             self.layer, self.value_kind, self.model)

    @classmethod
    def empty(cls, width: int) -> "BindingMemory":
        return cls(torch.zeros(0, width), torch.zeros(0, width), torch.zeros(0, width), [])

    def save(self, path: Path | str) -> Path:
        """Write the memory to a memory file, bit-exact and with its model (chapter 2)."""
        if self.model is None:
            raise ParameterError("BindingMemory.save: this memory does not record its model (write_memory records it): "
                                 "set memory.model = fastmem.models.model_info(model) first")
        tensors = {"symbol_states": self.symbol_states, "context_states": self.context_states, "values": self.values}
        if self.retrieval_keys is not None:
            tensors["retrieval_keys"] = self.retrieval_keys
        settings = {"bindings": [asdict(b) for b in self.bindings], "layer": self.layer, "value_kind": self.value_kind}
        return save_memory(path, MEMORY_KIND, tensors, settings, self.model)

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "BindingMemory":
        """The memory saved by :meth:`save`, checked to belong to ``model`` (chapter 2)."""
        return load_memory(path, MEMORY_KIND, model).rebuild(lambda stored: cls(
            stored.tensors["symbol_states"], stored.tensors["context_states"], stored.tensors["values"],
            [tasks.Binding(**b) for b in stored.settings["bindings"]], stored.settings["layer"],
            stored.settings["value_kind"], model_info(model), stored.tensors.get("retrieval_keys")))


def retrieve(queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 cosine retrieval for every query as one matrix product (chapter 2).

    ``allowed`` (queries x entries, bool) restricts each query to some entries (the oracle
    context gate). Returns the index and the similarity of the best entry per query.
    """
    similarity = nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(keys, dim=-1).T
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, -torch.inf)
    best, index = similarity.max(dim=-1)
    return index, best


def memory_values(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor, kind: str,
                  step: float, n_steps: int) -> torch.Tensor:
    """The stored value from the write statement's head input at its answer position (chapter 2).

    Chapter 1's iterated value, or the seed's single step.
    """
    if kind == "iterated":
        return fv.iterated_value(model, head_input, targets, step, n_steps)
    if kind == "single_step":
        return fv.memory_value(model, head_input, targets)
    raise ParameterError(f"unknown value kind {kind!r}: use one of {VALUE_KINDS}")


@torch.no_grad()
def write_memory(model: nn.Module, tokenizer, write: PromptStates, bindings: list[tasks.Binding], layer: int,
                 value_kind: str = "iterated", step: float = 4.0, n_steps: int = 5,
                 projector: KeyProjector | None = None) -> BindingMemory:
    """Write every binding from its write statement's states (chapter 2); no gradient, no weight change.

    It runs with autograd off: no gradient is taken, of the weights or of anything else.

    With ``projector`` the retrieval keys are projected here, once.
    """
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    values = memory_values(model, write.answer.head_input, targets, value_kind, step, n_steps)
    memory = BindingMemory(write.keys["symbol"][layer], write.keys["context"][layer], values, list(bindings),
                           layer, value_kind, model_info(model))
    return memory if projector is None else memory.project(projector)


@torch.no_grad()
def write_pool(model: nn.Module, tokenizer, bindings: list[tasks.Binding],
               templates: list[tasks.Templates], layer: int, value_kind: str = "iterated",
               step: float = 4.0, n_steps: int = 5, batch_size: int = 256) -> "Pool":
    """Write many bindings at a fraction of :func:`encode_bindings`' cost (chapter 2: capacity).

    The same keys, context states and (once computed, :meth:`Pool.compute_values`) values as
    :func:`write_memory` on :func:`encode_bindings`' write states, to float tolerance (a unit
    test checks it), from fewer token passes: statements that share a template
    and a context share the text before the word (at least up to the end of the context), which
    runs once and whose cache every statement of the group continues from; the rest is batched by length, so that no
    padding is computed. A value costs a few passes through the output head over the whole
    vocabulary, so it is computed when its entry is first retrieved. Decoder-only models; the
    word must follow the context in the statement.
    """
    if model.config.is_encoder_decoder:
        raise ParameterError("write_pool serves decoder-only models; use encode_bindings and write_memory")
    groups: dict[tuple, list[int]] = {}
    word_offsets, context_ends = [], {}
    for i, (binding, template) in enumerate(zip(bindings, templates)):
        prompt = tasks.write_prompt(binding, template)
        full = tokenizer.encode(prompt)
        through_context = tokenizer.encode(key_prefix(prompt, binding.context))
        through_word = tokenizer.encode(key_prefix(prompt, binding.word))
        before_word = tokenizer.encode(prompt[:prompt.index(binding.word, len(key_prefix(prompt, binding.context)))]
                                       .rstrip()) if binding.word in prompt else []
        if full[:len(through_context)] != through_context or full[:len(through_word)] != through_word:
            raise ParameterError(f"key prefixes of {prompt!r} do not tokenise as its prefixes")
        # Share all the text before the word where it tokenises as a prefix, else up to the context.
        shared = before_word if before_word and full[:len(before_word)] == before_word else through_context
        if len(through_word) <= len(shared) or len(shared) < len(through_context):
            raise ParameterError(f"write_pool needs the word after the context: {prompt!r}")
        word_offsets.append(len(through_word) - len(shared) - 1)
        context_ends[tuple(shared)] = len(through_context) - 1
        groups.setdefault((tuple(shared), len(full)), []).append(i)
    width = model.config.hidden_size
    symbol, context, head_input = (torch.zeros(len(bindings), width) for _ in range(3))
    for (shared, length), members in groups.items():
        prefix_ids = torch.tensor([shared])
        prefix = model(input_ids=prefix_ids, use_cache=True, output_hidden_states=True)
        context[members] = prefix.hidden_states[layer + 1][0, context_ends[shared]]
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            suffix = torch.tensor([tokenizer.encode(tasks.write_prompt(bindings[i], templates[i]))[len(shared):]
                                   for i in rows])
            cache = copy.deepcopy(prefix.past_key_values)
            cache.batch_repeat_interleave(len(rows))
            batch = {"input_ids": suffix, "attention_mask": torch.ones(len(rows), length, dtype=torch.long),
                     "position_ids": torch.arange(len(shared), length).expand(len(rows), -1)}
            out, answer = fv.forward_with_answer_states(model, batch, past_key_values=cache, use_cache=True,
                                                        output_hidden_states=True)
            offsets = torch.tensor([word_offsets[i] for i in rows])
            symbol[rows] = out.hidden_states[layer + 1][torch.arange(len(rows)), offsets]
            head_input[rows] = answer.head_input
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    memory = BindingMemory(symbol, context, torch.zeros(len(bindings), width), list(bindings), layer, value_kind,
                           model_info(model))
    return Pool(memory, head_input, targets, torch.zeros(len(bindings), dtype=torch.bool), step, n_steps)


@dataclass
class Pool:
    """Bindings written by :func:`write_pool`, whose values are computed on first retrieval (chapter 2).

    ``memory.values`` holds the values of the rows marked in ``computed`` and zeros elsewhere;
    :meth:`compute_values` fills rows in from the write statements' head inputs, exactly as
    :func:`write_memory` would have computed them.
    """

    memory: BindingMemory
    head_input: torch.Tensor
    targets: torch.Tensor
    computed: torch.Tensor
    step: float
    n_steps: int

    def __len__(self) -> int:
        return len(self.memory)

    @torch.no_grad()
    def compute_values(self, model: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the values of ``rows`` (default: all) not computed yet; returns those rows' values (chapter 2)."""
        rows = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.long).unique()
        missing = rows[~self.computed[rows]]
        if len(missing):
            self.memory.values[missing] = memory_values(model, self.head_input[missing], self.targets[missing],
                                                        self.memory.value_kind, self.step, self.n_steps)
            self.computed[missing] = True
        return self.memory.values[rows]


@dataclass
class ContextGate:
    """When the selective memory may inject, fitted on held-out training words (chapter 2).

    ``centre`` is the mean hidden state of training prompts' tokens; a stored context is present
    when some token of the prompt, centred, has cosine at least ``context_threshold`` with a
    stored (centred) context state; a stored word is present when the projected word key has
    cosine at least ``word_threshold`` with a retrieval key of the inferred context.
    """

    centre: torch.Tensor
    context_threshold: float
    word_threshold: float


def context_presence(query: PromptStates, memory: BindingMemory, layer: int, centre: torch.Tensor) -> torch.Tensor:
    """For every prompt and stored entry, the best cosine of any prompt token with the entry's context state (chapter 2).

    Found from the forward pass alone: no context string of the prompt is used.
    """
    tokens = nn.functional.normalize(query.tokens[layer] - centre, dim=-1)
    stored = nn.functional.normalize(memory.context_states - centre, dim=-1)
    similarity = torch.einsum("ptd,ed->pte", tokens, stored)
    return similarity.masked_fill(~query.token_mask[:, :, None], -torch.inf).max(dim=1).values


def gate_scores(memory: BindingMemory, query: PromptStates, layer: int, projector: KeyProjector,
                centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context score, word score and chosen entry of every prompt for the selective memory (chapter 2).

    The inferred context is the stored context with the highest presence; the word is retrieved
    among that context's entries by the learned keys.
    """
    presence = context_presence(query, memory, layer, centre)
    context_score, best_entry = presence.max(dim=-1)
    contexts = [b.context for b in memory.bindings]
    allowed = torch.tensor([[c == contexts[e] for c in contexts] for e in best_entry.tolist()], dtype=torch.bool)
    index, word_score = retrieve(projector(query.keys["symbol"][layer]), memory.learned_keys(), allowed)
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


def token_centre(states: list[PromptStates], layer: int) -> torch.Tensor:
    """Mean hidden state over the real tokens of training prompts: the gate's centre (chapter 2)."""
    return torch.cat([s.tokens[layer][s.token_mask] for s in states]).mean(dim=0)


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
        miss = (context_score < gate.context_threshold) | (best < gate.word_threshold)
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


CAPACITY_MODES = ("both_top1", "gated", "raw_both_top1")


def capacity_records(model: nn.Module, tokenizer, probe: list[tasks.Binding], probe_read: PromptStates,
                     probe_memory: BindingMemory, pool: Pool, projector: KeyProjector, gate: ContextGate,
                     layer: int, sizes: list[int], alpha: float = 1.0, max_new_tokens: int = 3, seed: int = 0,
                     modes: tuple[str, ...] = CAPACITY_MODES) -> list[dict]:
    """Read and retrieval of the probed bindings as the memory grows (chapter 2: capacity).

    The memory of N entries is the probed bindings (written first) followed by the pool, projected
    once with this seed's projector. At each size, the probed bindings stored so far are read in
    each mode; a pool entry's value is computed the first time a read retrieves it
    (:meth:`Pool.compute_values`), which gives the same generations as computing every value when
    writing. One record per (size, mode, probed binding), with ``unit`` "seed:i".
    """
    full_memory = probe_memory.followed_by(pool.memory).project(projector)
    offset, records = len(probe_memory), []
    for size in sizes:
        n_probe = min(size, len(probe))
        query = probe_read.subset(n_probe)
        for mode in modes:
            _, index = select_values(full_memory.head(size), mode, query, layer, projector, gate=gate)
            from_pool = (index[index >= offset] - offset).unique()
            if len(from_pool):
                full_memory.values[offset + from_pool] = pool.compute_values(model, from_pool)
            values, index = select_values(full_memory.head(size), mode, query, layer, projector, gate=gate)
            padded = torch.zeros(len(probe_read.keys["symbol"][layer]), values.shape[1])
            padded[:n_probe] = values
            texts = generate(model, tokenizer, probe_read, alpha * padded, max_new_tokens)[:n_probe]
            hits = exact_match(texts, [b.label for b in probe[:n_probe]])
            retrieved = (index == torch.arange(n_probe)).float()
            records += [{"seed": seed, "unit": f"{seed}:{i}", "entries": size, "mode": mode, "read": h,
                         "retrieval": r} for i, (h, r) in enumerate(zip(hits.tolist(), retrieved.tolist()))]
    return records


def encode_bindings(model: nn.Module, tokenizer, bindings: list[tasks.Binding], layers: list[int],
                    templates: tasks.Templates | list[tasks.Templates] = tasks.Templates(),
                    kinds=("write", "read", "plain"), keep_cache: bool = True) -> dict[str, PromptStates]:
    """States of each binding's write statement, read question and contextless question (chapter 2).

    ``templates`` is one :class:`tasks.Templates` for all bindings or one per binding.
    """
    prompt_of = {"write": tasks.write_prompt, "read": tasks.read_prompt, "plain": tasks.plain_prompt}
    per_binding = templates if isinstance(templates, list) else [templates] * len(bindings)
    states = {}
    for kind in kinds:
        prompts = [prompt_of[kind](b, t) for b, t in zip(bindings, per_binding)]
        prefixes = {"symbol": [key_prefix(p, b.word) for p, b in zip(prompts, bindings)],
                    "context": [key_prefix(p, b.context) for p, b in zip(prompts, bindings)]}
        states[kind] = prompt_states(model, tokenizer, prompts, prefixes, layers, keep_cache=keep_cache)
    return states


def encode_unrelated(model: nn.Module, tokenizer, prompts: list[str], layers: list[int]) -> PromptStates:
    """States of prompts that name no invented word; their keys sit before the question mark (chapter 2)."""
    prefixes = [key_prefix(p) for p in prompts]
    return prompt_states(model, tokenizer, prompts, {"symbol": prefixes, "context": prefixes}, layers, keep_cache=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, states: PromptStates, injections: torch.Tensor | None = None,
             max_new_tokens: int = 3, forced_first: torch.Tensor | None = None) -> list[str]:
    """Greedy continuations of prompts prefilled by :func:`prompt_states` with ``keep_cache``.

    ``injections[i]`` is added to the head input at prompt i's answer position, the forward pass
    that produces the first generated token; later tokens are generated plainly. Without
    injections this is plain greedy decoding (chapter 2). Where ``forced_first[i] >= 0`` it is
    prompt i's first token instead (the kNN-LM-style copy baseline).
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
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=past, use_cache=True)
            finished = torch.stack(tokens).eq(tokenizer.eos_token_id).any(dim=0)
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
           "unrelated_changed", "write_token", "read_token")


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
    ``write_token``/``read_token``: the first generated token is the label's token.
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
    seeds is resampled as one.
    """
    records = []
    for column, values in scores.items():
        units = ([f"q:{p}" for p in unrelated_prompts] if column.startswith("unrelated")
                 else [f"{seed}:{b.word}:{b.context}" for b in bindings])
        records += [{"seed": seed, "experiment": experiment, "row": row, "column": column, "unit": unit,
                     "score": value} for unit, value in zip(units, values.tolist())]
    return records


def paired_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``queries`` with row i of ``keys`` (chapter 2: does a read reach its entry)."""
    return (nn.functional.normalize(queries, dim=-1) * nn.functional.normalize(keys, dim=-1)).sum(dim=-1)


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
             step: float = 4.0, n_steps: int = 5, seed: int = 0) -> SeedFit:
    """Train the key projector on training words, then fit every threshold on calibration words (chapter 2).

    ``train`` and ``calibration`` are (bindings, templates); ``unrelated_fit`` holds the
    calibration unrelated questions. The gate's centre is the mean token state of the training
    prompts; the gate, the learned-key threshold and GRACE's initial radius all use
    :func:`separating_threshold` on calibration read, plain and unrelated questions.
    """
    train_states = encode_bindings(model, tokenizer, train[0], [layer], train[1], ("write", "read"), keep_cache=False)
    projector = train_projector(train_states["read"].keys["symbol"][layer], train_states["write"].keys["symbol"][layer],
                                key_dim, projector_steps, seed=seed)
    states = encode_bindings(model, tokenizer, calibration[0], [layer], calibration[1], keep_cache=False)
    memory = write_memory(model, tokenizer, states["write"], calibration[0], layer, value_kind, step, n_steps,
                          projector)
    centre = token_centre([train_states["write"], train_states["read"]], layer)
    gate = fit_gate(memory, states["read"], states["plain"], unrelated_fit, layer, projector, centre)
    threshold = calibrate_threshold(projector, memory, states["read"], states["plain"], unrelated_fit, layer)
    grace_threshold = fit_grace_threshold(memory, states["read"], states["plain"], unrelated_fit, layer,
                                          calibration[0])
    return SeedFit(projector, gate, threshold, grace_threshold)


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


def calibrate_threshold(projector: KeyProjector, memory: BindingMemory, read: PromptStates, plain: PromptStates,
                        unrelated: PromptStates, layer: int) -> float:
    """The learned-key cosine threshold that best separates read questions from plain and unrelated ones.

    Fitted on held-out TRAINING words only (:func:`separating_threshold`) (chapter 2).
    """
    best = {name: retrieve(projector(s.keys["symbol"][layer]), memory.learned_keys())[1]
            for name, s in (("read", read), ("plain", plain), ("unrelated", unrelated))}
    return separating_threshold(best["read"], torch.cat([best["plain"], best["unrelated"]]))


def synthetic_memory(entries: int, width: int, key_dim: int, seed: int) -> BindingMemory:
    """A memory of ``entries`` random retrieval keys for timing (chapter 2: cost).

    Retrieval cost depends on the number and size of keys, not their content; the raw states and
    values are one shared random row each (an expanded view), so a million entries fit in memory.
    """
    generator = torch.Generator().manual_seed(seed)
    row = lambda scale: (scale * torch.randn(1, width, generator=generator)).expand(entries, width)
    keys = nn.functional.normalize(torch.randn(entries, key_dim, generator=generator), dim=-1)
    return BindingMemory(row(1.0), row(1.0), row(0.01), [tasks.Binding("w", "c", "red")] * entries,
                         retrieval_keys=keys)


@contextlib.contextmanager
def attached(model: nn.Module, memory: BindingMemory, projector: KeyProjector | None, layer: int,
             key_position: int, alpha: float = 1.0):
    """Serve the memory inside the model's own forward pass, as a deployed memory would (chapter 2).

    On the prompt's forward pass a hook on block ``layer`` reads the key at ``key_position``, one
    matrix product with the keys projected at write time retrieves the top-1 entry, and a hook on the head adds ``alpha`` times its value
    at the answer position. Later (one-token) passes are left alone. Weights are never touched.
    """
    if len(memory) == 0:
        yield
        return
    keys = nn.functional.normalize(memory.symbol_states, dim=-1) if projector is None else memory.learned_keys()
    pending: dict[str, torch.Tensor] = {}

    def read_key(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1:
            query = hidden[:, key_position]
            query = query if projector is None else projector(query)
            pending["value"] = memory.values[(nn.functional.normalize(query, dim=-1) @ keys.T).argmax(dim=-1)]

    def inject(module, args):
        if "value" not in pending:
            return None
        hidden = args[0].clone()
        hidden[:, -1] += alpha * pending.pop("value")
        return (hidden, *args[1:])

    handles = [transformer_blocks(model)[layer].register_forward_hook(read_key),
               model.get_output_embeddings().register_forward_pre_hook(inject)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def busy_pause(seconds: float) -> None:
    """Keep the thread busy for ``seconds`` (chapter 2: the cost's positive control).

    Unlike ``time.sleep``, which wakes up late by a scheduler tick and so pauses for more than
    asked, a busy wait costs what it says, like the compute it stands for.
    """
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@contextlib.contextmanager
def slowed(model: nn.Module, seconds: float):
    """Add a pause of ``seconds`` to every forward pass of ``model`` (chapter 2: the cost's positive control).

    A known slowdown that the overhead measurement must detect, so that a ratio near 1 means
    "no measurable overhead" rather than "a measurement too noisy to see one". The pause is
    :func:`busy_pause`, which keeps the thread working as a real slowdown would.
    """
    handle = model.register_forward_pre_hook(lambda module, args: busy_pause(seconds))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def measure_overhead(model: nn.Module, batch: dict, memories: dict, projector: KeyProjector | None, layer: int,
                     key_position: int, alpha: float = 1.0, new_tokens: int = 32, repeats: int = 15,
                     control_slowdown: float = 0.05, n_boot: int = 2000) -> dict:
    """Time per generated token with each memory served, against the plain model (chapter 2: cost).

    Every repetition times the plain model, a positive control (the plain model slowed by
    ``control_slowdown`` of its own step time, :func:`slowed`) and each memory back to back, in
    an order that rotates from one repetition to the next, so that all see the same machine load.
    The pause is calibrated on the median of three plain runs after a warm-up. Each variant's
    ratio to the plain model is :func:`fastmem.benchmark.timing_ratio` (median of the
    per-repetition ratios, bootstrap over repetitions), returned as ratios: ``{name: (ratio, low,
    high)}`` with the keys "control" and each key of ``memories``, plus "plain_s" and "seconds"
    (median seconds per token per variant).
    """
    def per_token(context) -> float:
        with context:
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return (time.perf_counter() - start) / new_tokens

    plain = contextlib.nullcontext
    per_token(plain())
    pause = control_slowdown * sorted(per_token(plain()) for _ in range(3))[1]
    variants = {"plain": plain, "control": lambda: slowed(model, pause),
                **{n: (lambda m=m: attached(model, m, projector, layer, key_position, alpha))
                   for n, m in memories.items()}}
    names = list(variants)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            times[name].append(per_token(variants[name]()))
    result = {"plain_s": float(torch.tensor(times["plain"]).median()),
              "seconds": {name: sorted(t)[len(t) // 2] for name, t in times.items()}}
    for name in names[1:]:
        summary = timing_ratio(times["plain"], times[name], n_boot)
        result[name] = tuple(1 + summary[key] / 100 for key in ("overhead_pct", "low", "high"))
    return result


def retrieval_flops(entries: int, width: int, key_dim: int) -> int:
    """Multiply-adds x 2 the memory adds per prompt: the query's projection and one dot product per stored key (chapter 2)."""
    return 2 * (width * key_dim + entries * key_dim)


def forward_flops_per_token(model: nn.Module) -> int:
    """About 2 x the parameters a generated token's forward pass multiplies by (chapter 2: cost).

    The input embedding is a lookup, so it counts only where the output head reuses it (tied weights).
    """
    head = model.get_output_embeddings().weight
    lookup = model.get_input_embeddings().weight
    counted = sum(p.numel() for p in model.parameters() if p is not lookup or p is head)
    return 2 * counted
