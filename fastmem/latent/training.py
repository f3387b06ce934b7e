"""Training a latent-memory adapter's read side on a frozen backbone (chapter 4)."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch

from .adapters import LatentAdapter


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_adapter(adapter: LatentAdapter, backbone, groups: list[dict], *, epochs: float, lr: float,
                  weight_decay: float, warmup_steps: int, batch_size: int, grad_accum: int,
                  clip: float = 1.0, seed: int = 0, window: int = 8, progress: bool = True) -> list[float]:
    """Train the adapter only (chapter 4): AdamW, linear warm-up then cosine, gradient clipping.

    ``groups``: one per training conversation, ``{"batch": QuestionBatch (teacher forcing),
    "bank": bank after the whole conversation}``; in the ablation ``"bank_before_window"`` and
    ``"window_states"`` (the states of the turns re-written with gradient) replace ``"bank"``.
    Writes carry no gradient, so with frozen write projections the banks are fixed inputs. In the
    ablation (``adapter.train_write``) the last ``window`` turns are re-written with gradient every
    step onto the detached bank before them: truncated back-propagation over ``window`` turns.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches = []
    n_epochs = max(1, math.ceil(epochs))
    for epoch in range(n_epochs):
        epoch_batches = []
        for gi, g in enumerate(groups):
            order = rng.permutation(len(g["batch"]))
            epoch_batches += [(gi, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        rng.shuffle(epoch_batches)
        if epoch == n_epochs - 1 and epochs < n_epochs:
            epoch_batches = epoch_batches[: max(1, round(len(epoch_batches) * (epochs - epoch)))]
        batches += epoch_batches
    total = max(1, len(batches) // grad_accum)
    params = adapter.read_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup_steps))
    losses = []
    bar = tqdm(range(total), desc=f"train {adapter.method} {adapter.rows} rows", disable=not progress,
               file=sys.stdout, mininterval=10, leave=False)
    adapter.train()
    for step in bar:
        opt.zero_grad()
        acc = 0.0
        for gi, idx in batches[step * grad_accum:(step + 1) * grad_accum]:
            g = groups[gi]
            bank = g.get("bank")
            if adapter.train_write:
                bank = g["bank_before_window"]
                for z in g["window_states"][-window:]:
                    bank = adapter.write(bank, z)
            loss = backbone.loss(adapter, bank, g["batch"].subset(idx)) / grad_accum
            loss.backward()
            acc += loss.item()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(acc)
        bar.set_postfix(loss=f"{acc:.3f}", refresh=False)
    adapter.eval()
    return losses


def _stack(banks: list[torch.Tensor], idx) -> torch.Tensor:
    return torch.stack([banks[i] for i in idx])


def validation_loss(adapter: LatentAdapter, backbone, batches: list, banks: list[torch.Tensor]) -> float:
    """Mean teacher-forced loss over prepared chunks, each question with its own bank (chapter 4)."""
    total, start = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            idx = range(start, start + len(batch))
            total += backbone.loss(adapter, _stack(banks, idx), batch).item() * len(batch)
            start += len(batch)
    return total / max(1, start)


def train_until_plateau(adapter: LatentAdapter, backbone, batch, banks: list[torch.Tensor], valid_batches: list,
                        valid_banks: list[torch.Tensor], *, lr: float, weight_decay: float, batch_size: int,
                        max_steps: int, eval_every: int, patience: int, warmup_steps: int, clip: float = 1.0,
                        seed: int = 0) -> dict:
    """Train the read side until the validation loss stops improving; keep the best state (chapter 4).

    ``batch``: all training questions (teacher forcing), ``banks[i]`` the bank question ``i`` is
    asked with; ``valid_batches``/``valid_banks`` the same for a held-out conversation. AdamW with a
    linear warm-up, then a constant rate; the validation loss is measured before training and
    every ``eval_every`` steps, and training stops after ``patience`` measurements without a new
    best or at ``max_steps``. Returns the training losses, the validation curve ``[(step, loss)]``,
    the best step and the steps run.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = adapter.read_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    adapter.eval()
    best = validation_loss(adapter, backbone, valid_batches, valid_banks)
    curve, best_step, best_state, waited = [(0, best)], 0, copy.deepcopy(adapter.state_dict()), 0
    losses, order = [], np.array([], dtype=int)
    step = 0
    while step < max_steps and waited < patience:
        adapter.train()
        for _ in range(eval_every):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(batch))])
            idx, order = order[:batch_size], order[batch_size:]
            opt.zero_grad()
            loss = backbone.loss(adapter, _stack(banks, idx), batch.subset(idx))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        adapter.eval()
        current = validation_loss(adapter, backbone, valid_batches, valid_banks)
        curve.append((step, current))
        if current < best:
            best, best_step, best_state, waited = current, step, copy.deepcopy(adapter.state_dict()), 0
        else:
            waited += 1
    adapter.load_state_dict(best_state)
    return {"train_losses": losses, "valid_curve": curve, "best_step": best_step, "steps": step,
            "best_valid_loss": best}
