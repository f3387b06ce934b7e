"""Instruments that say why a read does or does not learn (chapter 4, "Why the first read could not learn").

Before a null is called a budget limit, three questions are measured:

- **is the information in the bank?** :func:`probe_bank` trains a small attention probe to name a
  written fact's answer from the bank alone, on held-out facts: an upper bound for any read of
  that bank (:func:`effective_rows` says how many rows a conversation really occupies);
- **does gradient reach the read?** :func:`read_gradient` measures, at initialisation and after
  a few steps, how much of the read's gradient reaches the weights that decide *what* is read,
  and how large the read's contribution to the residual stream is beside the stream itself;
- **can the answer be generated at all?** ``backbone.can_generate`` checks every answer against
  the decoding rule (:meth:`~fastmem.latent.backbones.DecoderOnlyBackbone.barred`).

:func:`constant_agreement` and :func:`modal_share` are the collapse checks: how often a method's
answers equal a given constant, or its own most common answer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .adapters import LatentAdapter, _rms
from .training import train_until_plateau


def effective_rows(bank: torch.Tensor) -> float:
    """How many rows hold the bank's content: the participation ratio of the row norms (chapter 4).

    Equal to the number of rows when all are equally full, 1 when one row holds everything, 0
    for an empty bank.
    """
    norms = bank.norm(dim=-1)
    if not bool(norms.any()):
        return 0.0  # an empty bank holds nothing
    share = norms / norms.sum()
    return float(1.0 / share.pow(2).sum())


@dataclass(frozen=True)
class ProbeResult:
    """A bank probe's held-out accuracy beside chance (chapter 4)."""

    accuracy: float
    chance: float
    n_train: int
    n_test: int


class _AttentionProbe(nn.Module):
    """Four learned queries attend over the normalised rows; a linear layer names the class."""

    def __init__(self, width: int, n_classes: int):
        super().__init__()
        self.query = nn.Linear(width, 4, bias=False)
        self.out = nn.Linear(4 * width, n_classes)

    def forward(self, banks: torch.Tensor) -> torch.Tensor:
        rows = _rms(banks)
        att = torch.softmax(self.query(rows) / math.sqrt(rows.shape[-1]), dim=1)  # (n, rows, heads)
        pooled = torch.einsum("nrh,nrd->nhd", att, rows).flatten(1)
        return self.out(pooled)


def probe_bank(train_banks: torch.Tensor, train_labels: np.ndarray, test_banks: torch.Tensor,
               test_labels: np.ndarray, *, n_classes: int, epochs: int = 60, lr: float = 3e-3,
               seed: int = 0) -> ProbeResult:
    """Train a probe to name each bank's written answer; its accuracy on held-out banks (chapter 4).

    The probe (four learned queries attending over the RMS-normalised rows, then a linear layer)
    is trained with Adam on full batches; chance is the most frequent training label's share
    of the test labels. The global random state is restored afterwards.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        probe = _AttentionProbe(train_banks.shape[-1], n_classes).to(train_banks.device)
        opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
        y = torch.as_tensor(train_labels, dtype=torch.long, device=train_banks.device)
        for _ in range(epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(probe(train_banks), y).backward()
            opt.step()
        with torch.no_grad():
            predicted = probe(test_banks).argmax(-1).cpu().numpy()
    finally:
        torch.random.set_rng_state(state)
    majority = np.bincount(train_labels, minlength=n_classes).argmax()
    return ProbeResult(float((predicted == test_labels).mean()), float((test_labels == majority).mean()),
                       len(train_labels), len(test_labels))


@dataclass(frozen=True)
class ReadGradient:
    """Where a read's gradient goes and how large its output is, at one moment of training (chapter 4).

    ``retrieval_share``: the gradient norm of the weights that choose and transform what is read
    (everything but the gate and the output scale) over the whole read's gradient norm;
    ``contribution``: the read's RMS over the residual stream's RMS where it is added.
    """

    step: int
    retrieval_share: float
    contribution: float
    loss: float


def _read_state(adapter: LatentAdapter, backbone, batch, banks: torch.Tensor, step: int) -> ReadGradient:
    adapter.zero_grad()
    loss = backbone.loss(adapter, banks, batch)
    loss.backward()
    grads = {name: p.grad.norm() if p.grad is not None else torch.zeros(())
             for name, p in adapter.named_parameters() if p.requires_grad}
    total = torch.sqrt(sum(g.pow(2) for g in grads.values()))
    retrieval = torch.sqrt(sum(g.pow(2) for name, g in grads.items() if name not in ("gate", "log_scale")))
    adapter.zero_grad()
    with torch.no_grad():
        h = batch.cached
        read = adapter.residual(h, banks)[batch.valid]
        contribution = read.pow(2).mean().sqrt() / h[batch.valid].pow(2).mean().sqrt()
    return ReadGradient(step, float(retrieval / total.clamp_min(1e-30)), float(contribution), loss.item())


def read_gradient(adapter: LatentAdapter, backbone, batch, banks: list[torch.Tensor], *, steps: int,
                  **train) -> tuple[ReadGradient, ReadGradient]:
    """The read's gradient and contribution at initialisation and after ``steps`` steps (chapter 4).

    Residual reads only (M.2, M.4, M.5, M.6), on a decoder-only backbone. ``batch``: teacher-forcing
    questions, ``banks[i]`` the bank question ``i`` reads; ``train``:
    :func:`~fastmem.latent.training.train_until_plateau`'s settings but the step counts (it trains
    the adapter in place on the same questions, and keeps the trained state only if it lowered the
    loss on them).
    """
    stacked = torch.stack(banks)
    before = _read_state(adapter, backbone, batch, stacked, 0)
    train_until_plateau(adapter, backbone, batch, banks, [batch], banks, max_steps=steps, eval_every=steps,
                        patience=1, **train)
    return before, _read_state(adapter, backbone, batch, stacked, steps)


def _plain(answer: str) -> str:
    return " ".join(answer.lower().split())


def constant_agreement(predictions: list[str], constant: str) -> float:
    """The share of answers equal to ``constant`` (case and spacing ignored): the collapse check (chapter 4)."""
    return float(np.mean([_plain(p) == _plain(constant) for p in predictions])) if predictions else 0.0


def modal_share(predictions: list[str]) -> float:
    """The share of answers equal to the most common one (case and spacing ignored; chapter 4).

    A method whose share is near 1 gives every question the same answer: it has collapsed.
    """
    if not predictions:
        return 0.0
    return Counter(map(_plain, predictions)).most_common(1)[0][1] / len(predictions)
