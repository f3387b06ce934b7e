"""The memory value: the forward-derived output correction and how to inject it (chapter 1).

For logits ``z = U h + b`` at the state ``h`` that enters the output head, the cross-entropy of a
target ``y`` has gradient ``dCE/dh = U^T (p - e_y)``, so ``-dCE/dh = U[y] - U^T p``: the seed's
value, with ``U`` the OUTPUT embedding (equal to the input embedding only when they are tied).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ParameterError
from .models import final_norm, output_embedding, transformer_blocks

HEAD_SITES = ("post_norm", "pre_norm")  # where a value enters the head: after or before the final norm


@dataclass
class AnswerStates:
    """States at the answer position of a batch of prompts (chapter 1).

    ``residual``: the last block's output (before the final norm); ``head_input``: what enters the
    output head (after the final norm); ``logits``: the model's next-token logits there.
    """

    residual: torch.Tensor
    head_input: torch.Tensor
    logits: torch.Tensor


def encode_prompts(model: nn.Module, tokenizer, prompts: list[str]) -> dict:
    """Tokenise ``prompts`` so that the answer position is the last one of every row (chapter 1).

    Decoder-only models get left padding and matching position ids; encoder-decoder models read
    the prompt in the encoder and answer at the first decoder position.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer.encode(p, add_special_tokens=model.config.is_encoder_decoder) for p in prompts]
    width = max(len(r) for r in rows)
    left = not model.config.is_encoder_decoder
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if left:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        start = model.config.decoder_start_token_id
        batch["decoder_input_ids"] = torch.full((len(rows), 1), start, dtype=torch.long)
    return batch


def forward_with_answer_states(model: nn.Module, batch: dict, **kwargs):
    """Run the model once and capture the residual and head input at the last position (chapters 1, 2)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, args):
            captured[key] = args[0][:, -1, :].detach().clone()
        return hook

    handles = [
        final_norm(model).register_forward_pre_hook(keep("residual")),
        model.get_output_embeddings().register_forward_pre_hook(keep("head_input")),
    ]
    if not model.config.is_encoder_decoder:
        kwargs.setdefault("logits_to_keep", 1)
    try:
        out = model(**batch, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, AnswerStates(captured["residual"], captured["head_input"], out.logits[:, -1, :])


def concat_states(parts: list[AnswerStates]) -> AnswerStates:
    """Join answer states of consecutive batches (chapters 1 and 2)."""
    return AnswerStates(*(torch.cat([getattr(p, f) for p in parts]) for f in ("residual", "head_input", "logits")))


@torch.no_grad()
def answer_states(model: nn.Module, tokenizer, prompts: list[str], batch_size: int = 64) -> AnswerStates:
    """Residual, head input and logits at the answer position of each prompt, batched (chapter 1)."""
    parts = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(model, tokenizer, prompts[start:start + batch_size])
        parts.append(forward_with_answer_states(model, batch)[1])
    return concat_states(parts)


def head_logits(model: nn.Module, head_input: torch.Tensor) -> torch.Tensor:
    """Logits ``U h + b`` from states that enter the output head (chapter 1)."""
    return model.get_output_embeddings()(head_input)


def head_input_from_residual(model: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """Apply the final norm (and T5's output rescaling, where the model has it) (chapter 1)."""
    state = final_norm(model)(residual)
    if getattr(model.config, "scale_decoder_outputs", False) and model.config.is_encoder_decoder:
        state = state * model.config.d_model ** -0.5
    return state


def memory_value(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor,
                 embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's value ``E[y] - sum_t p(t|h) E[t]`` for each row (chapter 1).

    ``embedding`` defaults to the output embedding ``U`` (the true ``-dCE/dh``); pass the input
    embedding to get the seed's formula read literally for an untied model.
    """
    matrix = output_embedding(model) if embedding is None else embedding
    probs = torch.softmax(head_logits(model, head_input).float(), dim=-1)
    return matrix[targets] - probs @ matrix


def autograd_value(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-dCE/dh`` by autograd through the output head, for checking :func:`memory_value` (chapter 1)."""
    state = head_input.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(head_logits(model, state), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, state)
    return -grad


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of each row's target among its scores (chapter 1)."""
    target_scores = scores.gather(1, targets[:, None])
    return (scores > target_scores).sum(dim=1)


def check_alphas(alphas) -> list[float]:
    """Validate an alpha grid parameter: a non-empty list of finite numbers (chapter 1)."""
    values = alphas if isinstance(alphas, (list, tuple)) else [alphas]
    if not values or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in values):
        raise ParameterError(f"alpha must be a number or a list of numbers, got {alphas!r}")
    if not all(torch.isfinite(torch.tensor(float(a))) for a in values):
        raise ParameterError(f"alpha must be finite, got {alphas!r}")
    return [float(a) for a in values]


def sweep_head(model: nn.Module, states: AnswerStates, values: torch.Tensor, targets: torch.Tensor,
               alphas: list[float], site: str) -> dict[str, torch.Tensor]:
    """Inject ``alpha * value`` at the answer position for every alpha, without re-running the model.

    Only the answer position changes, and nothing but the final norm and the head lies after the
    injection sites, so the effect is exact from cached states (chapter 1; a test checks this
    against real forward hooks). Returns ``log_p_target`` and ``argmax`` per (alpha, prompt).
    """
    if site not in HEAD_SITES:
        raise ParameterError(f"unknown injection site {site!r}: use one of {HEAD_SITES}")
    log_p, argmax = [], []
    with torch.no_grad():
        for alpha in alphas:
            if site == "post_norm":
                head_input = states.head_input + alpha * values
            else:
                head_input = head_input_from_residual(model, states.residual + alpha * values)
            log_probs = torch.log_softmax(head_logits(model, head_input).float(), dim=-1)
            log_p.append(log_probs.gather(1, targets[:, None]).squeeze(1))
            argmax.append(log_probs.argmax(dim=-1))
    return {"log_p_target": torch.stack(log_p), "argmax": torch.stack(argmax)}


@contextlib.contextmanager
def injected(model: nn.Module, site, vectors: torch.Tensor):
    """Add ``vectors[i]`` at the last position of row ``i`` while the block runs (chapters 1 and 2).

    ``site`` is ``"post_norm"`` (the state entering the head), ``"pre_norm"`` (the residual stream
    before the final norm) or an int ``L`` (the residual stream after block ``L``). The weights
    are never touched: the addition happens in a forward hook that is removed on exit.
    """
    def add_to_last(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, -1, :] += vectors.to(hidden.dtype)
        return hidden

    if site == "post_norm":
        handle = model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: (add_to_last(args[0]), *args[1:]))
    elif site == "pre_norm":
        handle = final_norm(model).register_forward_pre_hook(
            lambda module, args: (add_to_last(args[0]), *args[1:]))
    elif isinstance(site, int) and not isinstance(site, bool):
        def after_block(module, args, output):
            if isinstance(output, tuple):
                return (add_to_last(output[0]), *output[1:])
            return add_to_last(output)
        handle = transformer_blocks(model)[site].register_forward_hook(after_block)
    else:
        raise ParameterError(f"unknown injection site {site!r}: use one of {HEAD_SITES} or a block index")
    try:
        yield
    finally:
        handle.remove()


def _state_to_head_input(model: nn.Module, site: str):
    if site not in HEAD_SITES:
        raise ParameterError(f"unknown injection site {site!r}: use one of {HEAD_SITES}")
    return (lambda state: state) if site == "post_norm" else (lambda state: head_input_from_residual(model, state))


@torch.no_grad()
def iterated_value(model: nn.Module, state: torch.Tensor, targets: torch.Tensor, step: float,
                   n_steps: int, site: str = "post_norm") -> torch.Tensor:
    """Take ``n_steps`` closed-form steps ``state += step * value(state)``, recomputing p each time.

    Only the norm and the head are re-run, never the model: the value stays forward-derived.
    Returns the total displacement, the value to store (chapter 1).
    """
    to_head = _state_to_head_input(model, site)
    moved = state.clone()
    for _ in range(n_steps):
        moved = moved + step * memory_value(model, to_head(moved), targets)
    return moved - state


@torch.no_grad()
def top_k_value(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """``U[y]`` minus the p-weighted mean of the ``k`` most probable tokens' rows (chapter 1)."""
    matrix = output_embedding(model)
    probs = torch.softmax(head_logits(model, head_input).float(), dim=-1)
    top_p, top_ids = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True)
    return matrix[targets] - torch.einsum("nk,nkd->nd", weights, matrix[top_ids])


@torch.no_grad()
def min_norm_value(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor,
                   margin: float = 1.0, max_steps: int = 50) -> torch.Tensor:
    """The smallest step found that makes the target the argmax by ``margin`` logits (chapter 1).

    A DeepFool-style iteration on the linear head: move along ``U[y] - U[t]`` for the strongest
    rival ``t`` just far enough to pass it, until no rival is within ``margin``.
    """
    matrix = output_embedding(model)
    moved = head_input.clone()
    rows = torch.arange(len(targets))
    for _ in range(max_steps):
        logits = head_logits(model, moved).float()
        target_logit = logits[rows, targets]
        logits[rows, targets] = -torch.inf
        rival_logit, rival = logits.max(dim=-1)
        gap = margin - (target_logit - rival_logit)
        active = gap > 0
        if not active.any():
            break
        direction = matrix[targets] - matrix[rival]
        scale = (gap.clamp(min=0) + 1e-4) / (direction * direction).sum(dim=-1)
        moved = moved + (active * scale)[:, None] * direction
    return moved - head_input


def smallest_alpha_reaching(alphas: list[float], shares, level: float = 0.5) -> float | None:
    """The smallest step size whose flip share reaches ``level``, or None if none does (chapter 1)."""
    reached = [a for a, share in zip(alphas, list(shares)) if share >= level]
    return min(reached) if reached else None


@torch.no_grad()
def sweep_forward(model: nn.Module, tokenizer, prompts: list[str], values: torch.Tensor, targets: torch.Tensor,
                  alphas: list[float], site, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Like :func:`sweep_head`, but with real forward passes and :func:`injected` hooks.

    Needed where blocks lie after the injection site (an int ``site``: after that block) (chapter 1).
    """
    log_p, argmax = [], []
    for alpha in alphas:
        alpha_log_p, alpha_argmax = [], []
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            batch = encode_prompts(model, tokenizer, prompts[rows])
            with injected(model, site, alpha * values[rows]):
                log_probs = torch.log_softmax(model(**batch).logits[:, -1, :].float(), dim=-1)
            alpha_log_p.append(log_probs.gather(1, targets[rows, None]).squeeze(1))
            alpha_argmax.append(log_probs.argmax(dim=-1))
        log_p.append(torch.cat(alpha_log_p))
        argmax.append(torch.cat(alpha_argmax))
    return {"log_p_target": torch.stack(log_p), "argmax": torch.stack(argmax)}
