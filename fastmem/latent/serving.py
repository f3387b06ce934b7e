"""A trained latent adapter served inside the frozen model's own forward pass (chapters 4 and 5).

Chapter 4 writes conversation turns into the bank and asks questions through
:class:`~fastmem.latent.backbones.DecoderOnlyBackbone`. Served, the same adapter becomes an
inference-time memory over any text the model reads, the form chapter 5's benchmark needs:

- **write**: the states after ``write_block`` blocks of every real token a pass reads are written
  into the stream's bank as consecutive turns of at most ``turn_tokens`` tokens (one-token turns
  during generation), with the adapter's own gradient-free write rule;
- **read**: the residual term ``adapter.residual(h, bank)`` is added to the states entering block
  ``inject_block``, exactly as the backbone adds it when the adapter is trained.

A pass reads the bank as the earlier passes left it, and its own tokens are written when the pass
ends, so no position ever sees text after it. An empty bank adds exactly nothing (the residual
reads have no bias), so the first pass after :meth:`ServedAdapter.reset` is the plain model's.
Writing selects each row's real tokens and cuts them into turns on the host, so on a GPU a pass
waits for the device once, when it ends; the read never does. Residual-injection methods only
(M.2, M.4, M.5, M.6): the prefix and key-value methods change the sequence the model attends
over, which a hook on a plain forward pass cannot do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ParameterError
from ..models import transformer_blocks
from ..serving import HookedMemory
from .adapters import LatentAdapter


class ServedAdapter(HookedMemory):
    """A trained residual-read adapter and one bank per stream, attached by hooks (chapters 4 and 5).

    ``write_block`` and ``inject_block`` are those the adapter was trained with (chapter 4's
    backbone: turns are the states after ``write_block`` blocks; reads enter block ``inject_block``).
    ``reset(n_streams=B)`` keeps one bank per batch row; with one stream a batch shares it.
    """

    def __init__(self, model: nn.Module, adapter: LatentAdapter, *, write_block: int, inject_block: int,
                 turn_tokens: int = 64):
        super().__init__(model)
        if adapter.injection != "residual":
            raise ParameterError(f"{adapter.method}: only residual reads (m2, m4, m5, m6) can be served by hooks")
        blocks = transformer_blocks(model)
        for name, value in (("write_block", write_block), ("inject_block", inject_block)):
            if not isinstance(value, int) or not 1 <= value < len(blocks):
                raise ParameterError(f"{name} must be a block index in [1, {len(blocks) - 1}], got {value!r}")
        if turn_tokens < 1:
            raise ParameterError(f"turn_tokens must be >= 1, got {turn_tokens!r}")
        self.adapter, self.turn_tokens = adapter, turn_tokens
        self.write_module, self.read_module = blocks[write_block - 1], blocks[inject_block]
        self._written: torch.Tensor | None = None
        self.reset()

    def reset(self, n_streams: int = 1) -> None:
        """Empty banks, one per stream (chapters 4 and 5)."""
        if n_streams < 1:
            raise ParameterError("n_streams must be >= 1")
        self.banks = self.adapter.empty_bank().expand(n_streams, -1, -1).clone()
        self.turns_written = 0
        self._written = None

    def hooks(self) -> list:
        """Write states at ``write_block``, read before ``inject_block``, commit the write when the pass ends (chapters 4, 5)."""
        return [(self.write_module, "forward", self._keep_written),
                (self.read_module, "pre_kwargs", self._read),
                (self.model, "forward", self._commit)]

    def _keep_written(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self._written = hidden.detach()

    def _read(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        streams = self.banks.shape[0]
        if streams not in (1, hidden.shape[0]):
            raise ParameterError(f"served adapter has {streams} banks but the batch has {hidden.shape[0]} rows")
        bank = self.banks if streams == hidden.shape[0] else self.banks[0]
        changed = hidden + self.adapter.residual(hidden, bank.to(hidden.dtype)).to(hidden.dtype)
        if args:
            return (changed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": changed}

    @torch.no_grad()
    def _commit(self, module, args, output):
        if self._written is None:
            return
        hidden, self._written = self._written, None
        real = self.token_mask(hidden.shape[0], hidden.shape[1], hidden.device)
        shared = self.banks.shape[0] == 1
        for row in range(hidden.shape[0]):
            states = hidden[row][real[row]]
            stream = 0 if shared else row
            for start in range(0, len(states), self.turn_tokens):
                self.banks[stream] = self.adapter.write(self.banks[stream], states[start:start + self.turn_tokens])
                self.turns_written += 1
