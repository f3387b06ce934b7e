"""Capacity: thousands of stored bindings written in shared passes, values computed on first
retrieval, and Read as the memory grows (chapter 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import tasks
from .. import value as fv
from ..errors import ParameterError
from ..models import model_info
from .memory import BindingMemory, KeyProjector, PromptStates, check_context_key, context_span, key_prefix, memory_values
from .selection import ContextGate, select_values
from .scoring import exact_match, generate


@torch.no_grad()
def write_pool(model: nn.Module, tokenizer, bindings: list[tasks.Binding],
               templates: list[tasks.Templates], layer: int, value_kind: str = "iterated",
               step: float = 4.0, n_steps: int = 5, batch_size: int = 256, context_key: str = "whole") -> "Pool":
    """Write many bindings at a fraction of :func:`encode_bindings`' cost (chapter 2: capacity).

    The same keys, context states (``context_key``, as :func:`write_memory` takes it) and (once
    computed, :meth:`Pool.compute_values`) values as :func:`write_memory` on
    :func:`encode_bindings`' write states, to float tolerance (a unit test checks it), from fewer
    token passes: statements that share a template and a context share the text before the word
    (at least up to the end of the context), which runs once, gives the context state and whose
    cache every statement of the group continues from; the rest is batched by length, so that no
    padding is computed. A value costs a few passes through the output head over the whole
    vocabulary, so it is computed when its entry is first retrieved. Decoder-only models; the
    word must follow the context in the statement.
    """
    if model.config.is_encoder_decoder:
        raise ParameterError("write_pool serves decoder-only models; use encode_bindings and write_memory")
    check_context_key(context_key)
    groups: dict[tuple, list[int]] = {}
    word_offsets, context_spans = [], {}
    for i, (binding, template) in enumerate(zip(bindings, templates)):
        prompt = tasks.write_prompt(binding, template)
        full = tokenizer.encode(prompt)
        start_text, end_text = context_span(prompt, binding.context)
        through_context = tokenizer.encode(end_text)
        # The context state pools the tokens after before_context: the whole phrase, or its last token.
        before_context = (through_context[:-1] if context_key == "last_token" or start_text is None
                          else tokenizer.encode(start_text))
        through_word = tokenizer.encode(key_prefix(prompt, binding.word))
        before_word = tokenizer.encode(prompt[:prompt.index(binding.word, len(end_text))]
                                       .rstrip()) if binding.word in prompt else []
        if any(full[:len(head)] != head for head in (before_context, through_context, through_word)):
            raise ParameterError(f"key prefixes of {prompt!r} do not tokenise as its prefixes")
        # Share all the text before the word where it tokenises as a prefix, else up to the context.
        shared = before_word if before_word and full[:len(before_word)] == before_word else through_context
        if len(through_word) <= len(shared) or len(shared) < len(through_context):
            raise ParameterError(f"write_pool needs the word after the context: {prompt!r}")
        word_offsets.append(len(through_word) - len(shared) - 1)
        context_spans[tuple(shared)] = (len(before_context), len(through_context))
        groups.setdefault((tuple(shared), len(full)), []).append(i)
    width = model.config.hidden_size
    symbol, context, head_input = (torch.zeros(len(bindings), width) for _ in range(3))
    lengths = torch.zeros(len(bindings), dtype=torch.long)
    for (shared, length), members in groups.items():
        prefix_ids = torch.tensor([shared])
        prefix = model(input_ids=prefix_ids, use_cache=True, output_hidden_states=True)
        first, end = context_spans[shared]
        context[members] = prefix.hidden_states[layer + 1][0, first:end].mean(dim=0)
        lengths[members] = end - first
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
                           model_info(model), context_lengths=None if context_key == "last_token" else lengths)
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
    writing. One record per (size, mode, probed binding), with ``unit`` "seed:i" and ``item``
    "seed:word" (a probed word's bindings in both contexts, resampled together).
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
            records += [{"seed": seed, "unit": f"{seed}:{i}", "item": f"{seed}:{probe[i].word}", "entries": size,
                         "mode": mode, "read": h, "retrieval": r}
                        for i, (h, r) in enumerate(zip(hits.tolist(), retrieved.tolist()))]
    return records
