"""Cost: the memory served inside the model's forward pass (:mod:`~fastmem.binding.serving`), timed
against the plain model beside a positive control, and counted in FLOPs (chapter 2).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn

from ..benchmark import timing_ratio
from .memory import KeyProjector
from .serving import attached


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
    seconds = {name: float(np.median(t)) for name, t in times.items()}  # the median timing_ratio uses
    result = {"plain_s": seconds["plain"], "seconds": seconds}
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
