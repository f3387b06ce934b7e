"""The binding memory itself: prompt states, keys, the key projector, stored values, writing and saving (chapter 2).

Write: the key is the hidden state at the last token of the invented word in the write statement,
at a chosen block; the value is chapter 1's correction at the statement's answer position.
Retrieval keys are projected and normalised once, when the memory is written. The context state
the selective gate looks for is, by default, the mean state over the whole context phrase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import tasks
from .. import value as fv
from ..errors import ParameterError
from ..models import ModelInfo, model_info
from ..names import VALUE_KINDS
from ..persistence import load_memory, save_memory


MEMORY_KIND = "binding"
# The stored context state: the mean over the whole context phrase, or its last token's state.
CONTEXT_KEYS = ("whole", "last_token")


def check_context_key(context_key: str) -> None:
    """Refuse a context key that is not one of :data:`CONTEXT_KEYS` (chapter 2)."""
    if context_key not in CONTEXT_KEYS:
        raise ParameterError(f"unknown context key {context_key!r}: use one of {CONTEXT_KEYS}")


@dataclass
class PromptStates:
    """Hidden states at key tokens (``keys[name][block]``, one row per prompt) and answer states (chapter 2).

    ``tokens[block]`` holds every token's state (prompts x positions x width, left-padded) and
    ``token_mask`` marks the real tokens: the gate looks for a stored context anywhere in the prompt.
    ``lengths[name]`` is the number of tokens pooled into each prompt's key ``name``, for keys
    pooled over a span (:func:`prompt_states`' ``spans``).
    """

    keys: dict[str, dict[int, torch.Tensor]]
    answer: fv.AnswerStates
    prefill: list[tuple[dict, object]] = field(default_factory=list)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)

    def subset(self, rows: int) -> "PromptStates":
        """The first ``rows`` prompts' keys and token states; answer states and caches are kept whole (chapter 2)."""
        return PromptStates({name: {layer: k[:rows] for layer, k in per.items()} for name, per in self.keys.items()},
                            self.answer, self.prefill, {layer: t[:rows] for layer, t in self.tokens.items()},
                            None if self.token_mask is None else self.token_mask[:rows],
                            {name: n[:rows] for name, n in self.lengths.items()})


def key_prefix(prompt: str, anchor: str | None = None) -> str:
    """The text whose last token holds a key: the prompt up to the end of ``anchor`` (chapter 2).

    ``anchor`` is the invented word for symbol keys, the context phrase for context keys. When it
    is None or absent (a question without that cue), the prompt up to its first question mark.
    """
    if anchor is not None and anchor in prompt:
        end = prompt.index(anchor) + len(anchor)
        return prompt[:end]
    return prompt.split("?")[0] if "?" in prompt else prompt


def context_span(prompt: str, context: str) -> tuple[str | None, str]:
    """The (start, end) prefixes whose tokens in between are the context phrase of ``prompt`` (chapter 2).

    The start is the text before the phrase, without its trailing space (which the phrase's first
    token carries); the end is :func:`key_prefix`. A prompt without the phrase gets start None: its
    key is the last token of :func:`key_prefix` alone, as for a last-token key.
    """
    end = key_prefix(prompt, context)
    return (prompt[:prompt.index(context)].rstrip() if context in prompt else None), end


def _prefix_length(tokenizer, full: list[int], prompt: str, prefix: str) -> int:
    """How many of the prompt's tokens ``prefix`` covers; it must tokenise as a prefix of the prompt (chapter 2)."""
    head = tokenizer.encode(prefix)
    if full[: len(head)] != head:
        raise ParameterError(f"key prefix {prefix!r} does not tokenise as a prefix of {prompt!r}")
    return len(head)


@torch.no_grad()
def prompt_states(model: nn.Module, tokenizer, prompts: list[str], prefixes: dict[str, list[str]],
                  layers: list[int], batch_size: int = 64, progress: bool = False,
                  keep_cache: bool = False, spans: dict[str, list[tuple[str | None, str]]] | None = None
                  ) -> PromptStates:
    """One batched forward pass per chunk: block outputs at each prefix's last token, and answer states.

    ``prefixes`` maps a key name ("symbol", "context") to one prefix per prompt; ``layers`` index
    the blocks (0 = first block's output). ``spans`` maps a key name ("context_whole") to one
    (start, end) pair of prefixes per prompt: that key is the MEAN of the block's states over the
    tokens after the start's last token through the end's last token (start None: the end's last
    token alone), and ``lengths[name]`` counts them. A prefix must tokenise as a prefix of its
    prompt, which holds for the templates here; a mismatch raises rather than guessing (chapter 2).
    With ``keep_cache`` the prompts' key-value caches are kept, so that :func:`~fastmem.binding.scoring.generate` can
    continue from them under any injection without running the prompts again: the injection
    changes only the head input at the answer position, which no cached key or value depends on.
    """
    spans = spans or {}
    if set(spans) & set(prefixes):
        raise ParameterError(f"key names {sorted(set(spans) & set(prefixes))} are both prefixes and spans")
    # A last-token key is a span of one token: one code path reads both.
    spans = {**{name: [(None, prefix) for prefix in texts] for name, texts in prefixes.items()}, **spans}
    keys = {name: {layer: [] for layer in layers} for name in spans}
    counts = {name: [] for name in spans}
    answers, prefill, tokens, masks = [], [], {layer: [] for layer in layers}, []
    for start in tqdm(range(0, len(prompts), batch_size), desc="forward passes", disable=not progress):
        chunk = prompts[start:start + batch_size]
        batch = fv.encode_prompts(model, tokenizer, chunk)
        out, answer = fv.forward_with_answer_states(model, batch, output_hidden_states=True, use_cache=keep_cache)
        answers.append(answer)
        if keep_cache:
            prefill.append((batch, out.past_key_values))
        width = batch["input_ids"].shape[1]
        masks.append(batch["attention_mask"].bool())
        for layer in layers:
            tokens[layer].append(out.hidden_states[layer + 1])
        encoded = [tokenizer.encode(prompt) for prompt in chunk]
        for name, pairs in spans.items():
            pooled = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, (prompt, full, (first, last)) in enumerate(zip(chunk, encoded, pairs[start:start + batch_size])):
                end = _prefix_length(tokenizer, full, prompt, last)
                begin = end - 1 if first is None else _prefix_length(tokenizer, full, prompt, first)
                if begin >= end:
                    raise ParameterError(f"the span from {first!r} to {last!r} of {prompt!r} holds no token")
                # Left padding: the prompt's tokens are the last len(full) positions.
                pooled[row, width - len(full) + begin:width - len(full) + end] = True
            count = pooled.sum(dim=1)
            counts[name].append(count)
            for layer in layers:
                hidden = out.hidden_states[layer + 1]
                # where, not a product: a padded position's state may not be finite.
                total = torch.where(pooled.to(hidden.device)[..., None], hidden, 0).sum(dim=1)
                keys[name][layer].append(total / count.to(hidden.device, hidden.dtype)[:, None])
    longest = max(m.shape[1] for m in masks)
    left_pad = lambda t: nn.functional.pad(t, (0, 0, longest - t.shape[1], 0)) if t.dim() == 3 else \
        nn.functional.pad(t, (longest - t.shape[1], 0))
    return PromptStates({name: {layer: torch.cat(parts) for layer, parts in per_layer.items()}
                         for name, per_layer in keys.items()}, fv.concat_states(answers), prefill,
                        {layer: torch.cat([left_pad(t) for t in parts]) for layer, parts in tokens.items()},
                        torch.cat([left_pad(m) for m in masks]),
                        {name: torch.cat(counts[name]) for name in spans if name not in prefixes})


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
    ``context_lengths`` counts the tokens each context state is the mean of (None: one token for
    every entry, last-token states); the gate compares it with means over as many prompt tokens.
    """

    symbol_states: torch.Tensor
    context_states: torch.Tensor
    values: torch.Tensor
    bindings: list[tasks.Binding] = field(default_factory=list)
    layer: int | None = None
    value_kind: str | None = None
    model: ModelInfo | None = None
    retrieval_keys: torch.Tensor | None = None
    context_lengths: torch.Tensor | None = None

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

    def context_ids(self) -> torch.Tensor:
        """One integer per entry naming its context, equal for entries of the same context (chapter 2: the gate)."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(b.context, len(ids)) for b in self.bindings], dtype=torch.long)

    def head(self, size: int) -> "BindingMemory":
        """The memory of the first ``size`` entries (chapter 2: capacity)."""
        keys = None if self.retrieval_keys is None else self.retrieval_keys[:size]
        lengths = None if self.context_lengths is None else self.context_lengths[:size]
        return BindingMemory(self.symbol_states[:size], self.context_states[:size], self.values[:size],
                             self.bindings[:size], self.layer, self.value_kind, self.model, keys, lengths)

    def lengths_or_ones(self) -> torch.Tensor:
        """Tokens pooled into each entry's context state, one where none are recorded (chapter 2: the gate)."""
        return (torch.ones(len(self.context_states), dtype=torch.long) if self.context_lengths is None
                else self.context_lengths)

    def followed_by(self, other: "BindingMemory") -> "BindingMemory":
        """This memory's entries, then ``other``'s, without retrieval keys: project the result once (chapter 2: capacity)."""
        lengths = None if self.context_lengths is None and other.context_lengths is None else \
            torch.cat([self.lengths_or_ones(), other.lengths_or_ones()])
        return BindingMemory(torch.cat([self.symbol_states, other.symbol_states]),
                             torch.cat([self.context_states, other.context_states]),
                             torch.cat([self.values, other.values]), self.bindings + other.bindings,
                             self.layer, self.value_kind, self.model, context_lengths=lengths)

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
        if self.context_lengths is not None:
            tensors["context_lengths"] = self.context_lengths
        settings = {"bindings": [asdict(b) for b in self.bindings], "layer": self.layer, "value_kind": self.value_kind}
        return save_memory(path, MEMORY_KIND, tensors, settings, self.model)

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "BindingMemory":
        """The memory saved by :meth:`save`, checked to belong to ``model`` (chapter 2).

        A file written before context lengths were recorded holds last-token context states: None.
        """
        return load_memory(path, MEMORY_KIND, model).rebuild(lambda stored: cls(
            stored.tensors["symbol_states"], stored.tensors["context_states"], stored.tensors["values"],
            [tasks.Binding(**b) for b in stored.settings["bindings"]], stored.settings["layer"],
            stored.settings["value_kind"], model_info(model), stored.tensors.get("retrieval_keys"),
            stored.tensors.get("context_lengths")))


def retrieve(queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None = None,
             keys_normalised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 cosine retrieval for every query as one matrix product (chapter 2).

    ``allowed`` (queries x entries, bool) restricts each query to some entries (the oracle
    context gate). ``keys_normalised``: the keys already have unit norm (normalised once, as a
    served memory keeps them), so they are not normalised again on every read. Returns the index
    and the similarity of the best entry per query.
    """
    keys = keys if keys_normalised else nn.functional.normalize(keys, dim=-1)
    similarity = nn.functional.normalize(queries, dim=-1) @ keys.T
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, -torch.inf)
    best, index = similarity.max(dim=-1)
    return index, best


def retrieve_among(candidates: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None = None,
                   candidate_mask: torch.Tensor | None = None, keys_normalised: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieve` when each query has several candidate vectors, ``candidates`` (queries x
    candidates x width): per query, the entry and similarity of its best-matching candidate
    (chapters 2, 5: a served memory that does not know where the word is tries every token).

    ``allowed`` (queries x entries) as in :func:`retrieve`; ``candidate_mask`` (queries x
    candidates) marks the candidates that may be used; a query with none gets similarity ``-inf``.
    """
    n_queries, n_candidates = candidates.shape[:2]
    index, similarity = retrieve(candidates.flatten(0, 1), keys,
                                 None if allowed is None else allowed.repeat_interleave(n_candidates, dim=0),
                                 keys_normalised)
    similarity = similarity.view(n_queries, n_candidates)
    if candidate_mask is not None:
        similarity = similarity.masked_fill(~candidate_mask, -torch.inf)
    best, choice = similarity.max(dim=1)
    return index.view(n_queries, n_candidates).gather(1, choice[:, None]).squeeze(1), best


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
                 projector: KeyProjector | None = None, context_key: str = "whole") -> BindingMemory:
    """Write every binding from its write statement's states (chapter 2); no gradient, no weight change.

    It runs with autograd off: no gradient is taken, of the weights or of anything else.

    With ``projector`` the retrieval keys are projected here, once. ``context_key`` is the
    context state the gate looks for: "whole", the mean state over the whole context phrase
    (``write.keys["context_whole"]``, from :func:`encode_bindings`), or "last_token", the state
    at its last token, which contexts that end in the same word ("Alice's notes", "Bob's notes")
    share almost exactly.
    """
    check_context_key(context_key)
    name = "context_whole" if context_key == "whole" else "context"
    if name not in write.keys:
        raise ParameterError(f"the write states have no {name!r} key: encode them with encode_bindings")
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    values = memory_values(model, write.answer.head_input, targets, value_kind, step, n_steps)
    memory = BindingMemory(write.keys["symbol"][layer], write.keys[name][layer], values, list(bindings),
                           layer, value_kind, model_info(model), context_lengths=write.lengths.get(name))
    return memory if projector is None else memory.project(projector)


def encode_bindings(model: nn.Module, tokenizer, bindings: list[tasks.Binding], layers: list[int],
                    templates: tasks.Templates | list[tasks.Templates] = tasks.Templates(),
                    kinds=("write", "read", "plain"), keep_cache: bool = True) -> dict[str, PromptStates]:
    """States of each binding's write statement, read question and contextless question (chapter 2).

    ``templates`` is one :class:`tasks.Templates` for all bindings or one per binding. Keys:
    "symbol" and "context" (last tokens of the word and of the context phrase), and
    "context_whole", the mean over the context phrase (:func:`context_span`).
    """
    prompt_of = {"write": tasks.write_prompt, "read": tasks.read_prompt, "plain": tasks.plain_prompt}
    per_binding = templates if isinstance(templates, list) else [templates] * len(bindings)
    states = {}
    for kind in kinds:
        prompts = [prompt_of[kind](b, t) for b, t in zip(bindings, per_binding)]
        prefixes = {"symbol": [key_prefix(p, b.word) for p, b in zip(prompts, bindings)],
                    "context": [key_prefix(p, b.context) for p, b in zip(prompts, bindings)]}
        spans = {"context_whole": [context_span(p, b.context) for p, b in zip(prompts, bindings)]}
        states[kind] = prompt_states(model, tokenizer, prompts, prefixes, layers, keep_cache=keep_cache, spans=spans)
    return states


def encode_unrelated(model: nn.Module, tokenizer, prompts: list[str], layers: list[int]) -> PromptStates:
    """States of prompts that name no invented word; their keys sit before the question mark (chapter 2)."""
    prefixes = [key_prefix(p) for p in prompts]
    return prompt_states(model, tokenizer, prompts, {"symbol": prefixes, "context": prefixes}, layers, keep_cache=True)


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
