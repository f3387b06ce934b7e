"""A memory served inside a frozen model's own forward pass: hooks that attach and detach (chapters 2-5).

Every memory of the book can be served this way, which is what lets one benchmark
(:func:`fastmem.benchmark.run_suite`) score them all: the attractor layer of chapter 3
(:class:`fastmem.attractors.AttractorLayer`), the binding memory of chapter 2
(:class:`fastmem.binding.ServedBinding`) and a trained latent adapter of chapter 4
(:class:`fastmem.latent.ServedAdapter`). A served memory registers its hooks on :meth:`~HookedMemory.attach`,
removes them on :meth:`~HookedMemory.detach` (the model is then exactly the plain model again) and
is also a context manager. The weights are never touched.
"""

from __future__ import annotations

import torch
from torch import nn


class HookedMemory:
    """Base of a memory served through forward hooks (chapters 2-5).

    A subclass lists its hooks in :meth:`hooks` as ``(module, kind, function)`` with ``kind`` one of
    ``"forward"``, ``"pre"`` (a forward pre-hook) or ``"pre_kwargs"`` (a pre-hook that also
    receives the keyword arguments). The base also records the attention mask of every call of the
    model, so that a hook can tell real tokens from left padding (:meth:`token_mask`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list = []
        self._mask: torch.Tensor | None = None

    def hooks(self) -> list[tuple[nn.Module, str, object]]:
        """The hooks this memory needs, registered in this order after the mask's (chapters 2-5)."""
        raise NotImplementedError

    def attach(self):
        """Register the hooks (idempotent); the memory's state is kept (chapters 2-5)."""
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            for module, kind, function in self.hooks():
                if kind == "forward":
                    self._handles.append(module.register_forward_hook(function))
                elif kind == "pre":
                    self._handles.append(module.register_forward_pre_hook(function))
                else:
                    self._handles.append(module.register_forward_pre_hook(function, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks; the model is then exactly the plain model again (chapters 2-5)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def token_mask(self, batch: int, length: int, device) -> torch.Tensor:
        """Which of this pass's ``length`` positions hold real tokens, ``(batch, length)`` bool (chapters 2-5).

        From the model call's attention mask (its last ``length`` columns: with a key-value cache
        the mask also covers the past); every position when the call had none.
        """
        if self._mask is not None and self._mask.shape[0] == batch:
            return self._mask[:, -length:].to(device=device, dtype=torch.bool)
        return torch.ones(batch, length, dtype=torch.bool, device=device)
