"""The binding memory served inside the model's own forward pass, as a deployed memory would be
(chapter 2, "Cost"; chapter 5, the benchmark of every memory).

On a pass over a prompt (more than one token), a hook on block ``layer`` reads the prompt's states;
retrieval is one matrix product with the keys projected at write time; a hook on the output head
adds ``alpha`` times the chosen value at the prompt's last position, the pass that produces the
first generated token. Later one-token passes are left alone. With a :class:`~fastmem.binding.ContextGate`
the memory is the selective one of chapter 2: it injects only when some token of the prompt
carries a stored context and the word key is close enough to a stored key of that context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ParameterError
from ..models import transformer_blocks
from ..serving import HookedMemory
from .memory import BindingMemory, KeyProjector, PromptStates, retrieve_among
from .selection import ContextGate, gate_scores_of


@dataclass
class GateReading:
    """For each prompt, 1.0 where the gate finds a stored context, a stored word of it, and where it
    opens (both), with the entry they point to (chapter 2: why a served memory opens)."""

    context: torch.Tensor
    word: torch.Tensor
    opened: torch.Tensor
    entry: torch.Tensor


class ServedBinding(HookedMemory):
    """A binding memory attached to a frozen model by hooks (chapters 2 and 5).

    ``key_position``: the prompt position whose state is the word key (an index into the pass's
    positions, as chapter 2's prompts have it); ``None``: the memory does not know where the word
    is, so every real token of the prompt is a candidate key and the best-matching one is taken,
    as a memory serving arbitrary text must. Without ``projector`` the raw states are the keys.
    ``gate``: the selective memory (needs the projector). The memory keeps no state between
    prompts: :meth:`reset` has nothing to clear. ``injected`` counts the prompts that received a value
(a tensor; ``int(served.injected)`` reads it).
    """

    def __init__(self, model: nn.Module, memory: BindingMemory, layer: int, projector: KeyProjector | None = None,
                 *, gate: ContextGate | None = None, key_position: int | None = -1, alpha: float = 1.0):
        super().__init__(model)
        if gate is not None and projector is None:
            raise ParameterError("the gated memory needs the learned key projector")
        self.memory, self.layer, self.projector, self.gate = memory, layer, projector, gate
        self.key_position, self.alpha = key_position, alpha
        self.keys = None  # normalised once here, never on a read
        if len(memory):
            keys = memory.learned_keys() if projector is not None else memory.symbol_states
            self.keys = nn.functional.normalize(keys, dim=-1)
        self.injected = torch.zeros((), dtype=torch.long)  # a tensor: counting never waits for the device
        self._pending: torch.Tensor | None = None

    def reset(self, n_streams: int = 1) -> None:
        """Nothing to forget: every prompt is read on its own (chapters 2 and 5)."""
        self._pending = None

    def hooks(self) -> list:
        """A read hook on block ``layer``, an injection hook on the output head; none for an empty memory (chapters 2, 5)."""
        if self.keys is None:
            return []
        return [(transformer_blocks(self.model)[self.layer], "forward", self._read),
                (self.model.get_output_embeddings(), "pre", self._inject)]

    @torch.no_grad()
    def values_for(self, hidden: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The value each prompt receives and the entry chosen (-1: nothing), from the block's
        states ``hidden`` (prompts x positions x width) and which positions are real tokens (chapters 2, 5)."""
        context_score, word_score, index = self.scores(hidden, real)
        miss = self._missed(context_score, word_score)
        values = self.memory.values[index].masked_fill(miss[:, None], 0.0)
        return values, index.masked_fill(miss, -1)

    def _missed(self, context_score: torch.Tensor | None, word_score: torch.Tensor) -> torch.Tensor:
        """Prompts that get nothing: no usable word key, or, with a gate, the gate shut (chapters 2, 5)."""
        miss = ~torch.isfinite(word_score)
        if self.gate is not None:
            miss = miss | self.gate.closed(context_score, word_score)
        return miss

    @torch.no_grad()
    def scores(self, hidden: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Per prompt: the context score (None without a gate), the word score and the entry they
        point to, before the gate's thresholds are applied (chapters 2, 5: why the memory opens)."""
        if self.key_position is None:
            candidates, candidate_real = hidden, real
        else:
            candidates, candidate_real = hidden[:, [self.key_position]], real[:, [self.key_position]]
        queries = candidates if self.projector is None else self.projector(candidates)
        if self.gate is None:
            index, word_score = retrieve_among(queries, self.keys, None, candidate_real, keys_normalised=True)
            return None, word_score, index
        return gate_scores_of(self.memory, hidden, real, queries, self.gate.centre, candidate_real,
                              keys_normalised=True)

    @torch.no_grad()
    def opens(self, states: PromptStates) -> GateReading:
        """Why the memory would or would not inject into each prompt of ``states``, from the block's
        states its read hook would see (chapter 2: false openings on unrelated text)."""
        hidden, real = states.tokens[self.layer], states.token_mask
        context_score, word_score, index = self.scores(hidden, real)
        opened = ~self._missed(context_score, word_score)
        context = (torch.ones_like(word_score, dtype=torch.bool) if self.gate is None
                   else context_score >= self.gate.context_threshold)
        word = torch.isfinite(word_score) & (word_score >= (-torch.inf if self.gate is None
                                                            else self.gate.word_threshold))
        return GateReading(context.float(), word.float(), opened.float(), index)

    def _read(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1:
            real = self.token_mask(hidden.shape[0], hidden.shape[1], hidden.device)
            values, index = self.values_for(hidden, real)
            self._pending = values.to(hidden.dtype)
            self.injected = self.injected + (index >= 0).sum()

    def _inject(self, module, args):
        if self._pending is None:
            return None
        hidden = args[0].clone()
        hidden[:, -1] += self.alpha * self._pending
        self._pending = None
        return (hidden, *args[1:])


@contextlib.contextmanager
def attached(model: nn.Module, memory: BindingMemory, projector: KeyProjector | None, layer: int,
             key_position: int, alpha: float = 1.0):
    """Serve the ungated memory (top-1, the key at ``key_position``) for a ``with`` block (chapter 2: cost)."""
    with ServedBinding(model, memory, layer, projector, key_position=key_position, alpha=alpha):
        yield
