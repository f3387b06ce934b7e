"""The inference-time attractor layer of seed 001 (chapter 3, "The layer").

A frozen model gets a forward hook at one block: on the attention output (``site="attn"``, as the
seed says) or on the block's output, the residual stream (``site="residual"``, a variant). The hook
keeps a state of ``K`` attractor vectors ``A`` and strengths ``s`` per stream, which persists across
forward passes (generation steps, windows, documents) until :meth:`AttractorLayer.reset`.

At every forward pass ``t`` the hook does, in this order (chapter 3 states every coefficient):

1. **Feedback.** If a feedback vector ``f`` was prepared at pass ``t-1`` and the burn-in is over,
   add ``f`` to every position of the hooked activation.
2. **Similarity.** Pool the hooked activation *before* the feedback (masked mean over positions)
   into ``x`` and compute the cosine ``c_k = cos(A_k, x)``.
3. **Update.** Attractor ``k`` is *activated* when ``c_k >= activation_threshold`` (and the most
   similar attractor always is, when ``winner_always_activates``). Activated attractors are
   strengthened, ``s_k <- min(s_max, s_k + gain * c_k * (1 - s_k / s_max))``, and pulled towards the
   activation, ``A_k <- A_k + pull * (x - A_k)``; the rest decay, ``s_k <- (1 - decay) s_k``.
4. **Next feedback.** ``f = feedback_strength * sum_k g_k s_k max(c_k, 0) A_k`` with the *updated*
   state and this pass's similarity; ``g_k = 1`` without gating, ``g_k = [c_k >= gate_threshold]``
   with gating. It is added at pass ``t+1``.

Burn-in: no feedback while fewer than ``burn_in_passes`` passes have been seen, or while the largest
strength of a stream is below ``burn_in_strength``. Attractors are initialised at the first pass:
``init="tokens"`` (default) takes K distinct token activations of that pass at random (seeded),
``init="random"`` random Gaussian directions scaled to the norm of the pooled activation.
The model's weights are never modified; with ``feedback_strength = 0`` outputs are bit-identical.

Cost: the hook never synchronises with the host (no ``.item()``, no ``bool`` of a tensor, no Python
branch on a tensor's value): the burn-in is a multiplicative mask, and the state lives on the
device of the hooked activation (the GPU when the model is there), so a pass queues its work and
returns. Diagnostics (:attr:`AttractorLayer.record`) are kept as device tensors and read once, by
:meth:`AttractorLayer.diagnostics`, after the passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .errors import ParameterError
from .models import model_info, transformer_blocks
from .names import ATTRACTOR_INITS, ATTRACTOR_SITES
from .persistence import StoredMemory, load_memory, save_memory
from .serving import HookedMemory

MEMORY_KIND = "attractor_layer"


@dataclass(frozen=True)
class AttractorConfig:
    """Every coefficient of the attractor layer (chapter 3, table "Coefficients")."""

    n_attractors: int = 8
    layer: int = 15
    site: str = "attn"
    feedback_strength: float = 0.2
    gain: float = 0.2
    pull: float = 0.1
    decay: float = 0.05
    activation_threshold: float = 0.9
    winner_always_activates: bool = True
    s_max: float = 1.0
    gate_threshold: float | None = None
    burn_in_passes: int = 0
    burn_in_strength: float = 0.0
    init: str = "tokens"
    seed: int = 0

    def __post_init__(self):
        check = _checker(type(self).__name__)
        check(isinstance(self.n_attractors, int) and self.n_attractors >= 1, "n_attractors must be an integer >= 1")
        check(isinstance(self.layer, int), "layer must be an integer (negative counts from the end)")
        check(self.init in ATTRACTOR_INITS, f"init must be one of {ATTRACTOR_INITS}, got {self.init!r}")
        check(self.site in ATTRACTOR_SITES, f"site must be one of {ATTRACTOR_SITES}, got {self.site!r}")
        for name in ("feedback_strength", "gain", "pull", "decay", "s_max", "burn_in_strength"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value!r}")
        check(self.pull <= 1 and self.decay <= 1, "pull and decay must lie in [0, 1]")
        check(self.s_max > 0, "s_max must be > 0")
        check(isinstance(self.activation_threshold, (int, float)) and math.isfinite(self.activation_threshold),
              "activation_threshold must be a finite number (above 1: only the winner is activated)")
        check(self.gate_threshold is None or -1 <= self.gate_threshold <= 1, "gate_threshold must be None or in [-1, 1]")
        check(isinstance(self.burn_in_passes, int) and self.burn_in_passes >= 0, "burn_in_passes must be an integer >= 0")

    def with_(self, **changes) -> "AttractorConfig":
        """A copy with some coefficients changed (unknown names raise ParameterError) (chapter 3)."""
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ParameterError(f"unknown attractor coefficient(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def _checker(owner: str):
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ParameterError(f"{owner}: {message}")
    return check


class AttractorLayer(HookedMemory):
    """Attractor memory attached to a frozen model by a forward hook (chapter 3).

    Use as a context manager (``with AttractorLayer(model, config): ...``) or with
    :meth:`attach` / :meth:`detach`. :meth:`reset` clears the state; :meth:`save` writes the
    config and state to a memory file and :meth:`load` rebuilds the layer from it exactly.
    ``n_streams`` independent states can be kept, one per batch row (``reset(n_streams=B)``);
    with one stream, a batch is pooled into that stream.
    """

    def __init__(self, model: nn.Module, config: AttractorConfig | None = None, **coefficients):
        super().__init__(model)
        config = config or AttractorConfig()
        self.config = config.with_(**coefficients) if coefficients else config
        blocks = transformer_blocks(model)
        n = len(blocks)
        if not -n <= self.config.layer < n:
            raise ParameterError(f"AttractorConfig: layer {self.config.layer} out of range for a {n}-block model")
        self.block_index = self.config.layer % n
        block = blocks[self.block_index]
        if self.config.site == "attn":
            self.module = next((getattr(block, a) for a in ("self_attn", "attention", "attn") if hasattr(block, a)), None)
            if self.module is None:
                raise ParameterError(f"block {self.block_index}: no attention module found")
        else:
            self.module = block
        self.record: list[dict] | None = None  # set to [] to log one row of diagnostics per pass (device tensors)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, n_streams: int = 1) -> None:
        """Forget everything: no attractors, zero strengths, no pending feedback, pass count 0 (chapter 3)."""
        if n_streams < 1:
            raise ParameterError("n_streams must be >= 1")
        self.n_streams = n_streams
        self.attractors: torch.Tensor | None = None  # (R, K, d)
        self.strengths = torch.zeros(n_streams, self.config.n_attractors)
        self.feedback: torch.Tensor | None = None  # (R, d)
        self.similarity = torch.zeros(n_streams, self.config.n_attractors)
        self.passes = 0
        self.feedback_passes = torch.zeros((), dtype=torch.long)

    def _to_device(self, device: torch.device) -> None:
        """Keep the state where the hooked activations are (a device move, no host round trip)."""
        if self.strengths.device != device:
            self.strengths, self.similarity = self.strengths.to(device), self.similarity.to(device)
            self.feedback_passes = self.feedback_passes.to(device)
            self.attractors = None if self.attractors is None else self.attractors.to(device)
            self.feedback = None if self.feedback is None else self.feedback.to(device)

    def diagnostics(self) -> list[dict]:
        """The recorded rows as numbers (one host read for all passes; chapter 3)."""
        if not self.record:
            return []
        names = list(self.record[0])
        values = torch.stack([torch.stack([row[n].float() for n in names]) for row in self.record]).cpu().tolist()
        return [{**dict(zip(names, row)), "pass": i + 1} for i, row in enumerate(values)]

    def state_dict(self) -> dict:
        """The state as tensors (exact copy; chapter 3)."""
        state = {
            "strengths": self.strengths.clone(),
            "similarity": self.similarity.clone(),
            "passes": torch.tensor(self.passes),
            "feedback_passes": self.feedback_passes.clone(),
            "n_streams": torch.tensor(self.n_streams),
        }
        if self.attractors is not None:
            state["attractors"] = self.attractors.clone()
        if self.feedback is not None:
            state["feedback"] = self.feedback.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by :meth:`state_dict` (its K must match the config) (chapter 3)."""
        strengths = state["strengths"]
        if strengths.shape[-1] != self.config.n_attractors:
            raise ParameterError(f"state has {strengths.shape[-1]} attractors, config has {self.config.n_attractors}")
        self.n_streams = int(state["n_streams"])
        self.strengths = strengths.clone()
        self.similarity = state["similarity"].clone()
        self.passes = int(state["passes"])
        self.feedback_passes = state["feedback_passes"].clone()
        self.attractors = state["attractors"].clone() if "attractors" in state else None
        self.feedback = state["feedback"].clone() if "feedback" in state else None

    def save(self, path: Path | str) -> Path:
        """Write the config and state to a memory file for this model (exact round trip with :meth:`load`) (chapter 3)."""
        return save_memory(path, MEMORY_KIND, self.state_dict(), {"config": self.config.as_dict()}, model_info(self.model))

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "AttractorLayer":
        """A layer on ``model`` with the config and state written by :meth:`save`, not yet attached (chapter 3)."""
        def rebuild(stored: StoredMemory) -> "AttractorLayer":
            layer = cls(model, AttractorConfig(**stored.settings["config"]))
            layer.load_state_dict(stored.tensors)
            return layer

        return load_memory(path, MEMORY_KIND, model).rebuild(rebuild)

    # ------------------------------------------------------------------ hooks
    def hooks(self) -> list:
        """One forward hook at the chosen site; the state is kept across attach and detach (chapter 3)."""
        return [(self.module, "forward", self._hook)]

    def feedback_active(self) -> torch.Tensor:
        """Per stream: is the burn-in over (so that the pending feedback is applied) (chapter 3)?"""
        cfg = self.config
        ready = torch.full((self.n_streams,), self.passes >= cfg.burn_in_passes, device=self.strengths.device)
        if cfg.burn_in_strength > 0:
            ready &= self.strengths.max(dim=1).values >= cfg.burn_in_strength
        return ready

    @torch.no_grad()
    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        batch, length, width = hidden.shape
        streams = self.n_streams
        if streams not in (1, batch):
            raise ParameterError(f"attractor layer has {streams} streams but the batch has {batch} rows")
        self._to_device(hidden.device)
        changed = None
        # Python branches here test only configuration and pass counts, never a tensor's value.
        if self.feedback is not None and self.config.feedback_strength > 0:
            active = self.feedback_active()
            f = self.feedback * active[:, None].to(self.feedback.dtype)
            changed = hidden + f[:, None, :].to(hidden.dtype)
            self.feedback_passes = self.feedback_passes + active.any().long()
        # pooled activation of this pass (before the feedback), masked mean over positions
        h = hidden.detach().float()
        weights = self.token_mask(batch, length, h.device).to(h.dtype)
        if streams == 1:
            pooled = (h * weights[..., None]).sum(dim=(0, 1)) / weights.sum().clamp_min(1)
            pooled = pooled[None]
        else:
            pooled = (h * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1)
        if self.attractors is None:
            self.attractors = self._initial_attractors(h, weights, pooled)
        self._update(pooled)
        if changed is None:
            return None
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    def _initial_attractors(self, h: torch.Tensor, weights: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """K attractors per stream: token activations of the first pass, or random directions."""
        cfg = self.config
        generator = torch.Generator(device=h.device).manual_seed(cfg.seed)
        if cfg.init == "random":
            return random_attractors(pooled, cfg.n_attractors, generator)
        if self.n_streams == 1:
            h, weights = h.reshape(1, -1, h.shape[-1]), weights.reshape(1, -1)
        # Distinct positions where the pass has K of them (decided by its shape, not its values);
        # padded positions carry a vanishing weight, so they are drawn only once real tokens run out.
        enough = weights.shape[1] >= cfg.n_attractors
        picks = torch.multinomial(weights.clamp_min(0) + 1e-12, cfg.n_attractors, replacement=not enough,
                                  generator=generator)
        return torch.gather(h, 1, picks[..., None].expand(-1, -1, h.shape[-1])).clone()

    def feedback_weights(self) -> torch.Tensor:
        """Per stream and attractor, the weight ``g_k s_k max(c_k, 0)`` of ``A_k`` in the feedback (chapter 3).

        From the current strengths and the last pass's similarity; ``g_k`` is the gate (1 without gating).
        """
        cfg, c = self.config, self.similarity
        weight = self.strengths * c.clamp_min(0)
        if cfg.gate_threshold is not None:
            weight = weight * (c >= cfg.gate_threshold).to(weight.dtype)
        return weight

    def _update(self, x: torch.Tensor) -> None:
        """One update of the state from pooled activations ``x`` (R, d); vectorised over attractors."""
        cfg = self.config
        a = self.attractors
        c = torch.nn.functional.cosine_similarity(a, x[:, None, :], dim=-1)  # (R, K)
        activated = c >= cfg.activation_threshold
        if cfg.winner_always_activates:
            activated |= torch.nn.functional.one_hot(c.argmax(dim=1), cfg.n_attractors).bool()
        act = activated.to(a.dtype)
        grown = (self.strengths + cfg.gain * c.clamp_min(0) * (1 - self.strengths / cfg.s_max)).clamp(0, cfg.s_max)
        self.strengths = torch.where(activated, grown, (1 - cfg.decay) * self.strengths)
        self.attractors = a + cfg.pull * act[..., None] * (x[:, None, :] - a)
        self.similarity = c
        weight = self.feedback_weights()
        self.feedback = cfg.feedback_strength * torch.einsum("rk,rkd->rd", weight, self.attractors)
        self.passes += 1
        if self.record is not None:
            self.record.append({
                "max_similarity": c.max(dim=1).values.mean(),
                "strength_sum": self.strengths.sum(dim=1).mean(),
                "feedback_norm": self.feedback.norm(dim=-1).mean(),
                "activation_norm": x.norm(dim=-1).mean(),
                "n_activated": act.sum(dim=1).mean(),
                "several_activated": (act.sum(dim=1) > 1).float().mean(),
            })


def random_attractors(pooled: torch.Tensor, n_attractors: int, generator: torch.Generator) -> torch.Tensor:
    """``K`` random Gaussian directions per stream, scaled to the norm of the pooled activation (chapter 3).

    ``pooled`` is ``(R, d)``; returns ``(R, K, d)`` drawn from ``generator`` on ``pooled``'s device
    (``init="random"``).
    """
    shape = (pooled.shape[0], n_attractors, pooled.shape[-1])
    directions = torch.randn(shape, generator=generator, device=pooled.device)
    return directions / directions.norm(dim=-1, keepdim=True) * pooled.norm(dim=-1)[:, None, None]


# The two operating-point rules of chapter 3's plan (plans/03.yaml), by the name the plan gives them.
OPERATING_RULES = ("strongest within the band", "strongest acting within the band, whole and late")


def qualifying(candidates, band: float, rule: str):
    """Which rows of the development table qualify under an operating-point rule (chapter 3, section 3.2).

    ``candidates`` has one row per candidate with ``feedback`` (strength), ``configuration``
    ("ungated" or "gating + burn-in"), ``acts`` (its feedback changed the loss of at least one
    development window), ``dev change %`` (perplexity change over the whole development stream)
    and ``2nd half %`` (over its second half).

    - ``"strongest within the band"`` (the rule as first registered): the whole-stream change is
      within ``±band`` percent;
    - ``"strongest acting within the band, whole and late"`` (the rule the chapter uses now): the
      candidate acts, and its change is within ``±band`` over the whole stream and its second half.
    """
    if rule not in OPERATING_RULES:
        raise ParameterError(f"operating-point rule {rule!r}: expected one of {OPERATING_RULES}")
    if rule == OPERATING_RULES[0]:
        return candidates["dev change %"].abs() <= band
    within = (candidates[["dev change %", "2nd half %"]].abs() <= band).all(axis=1)
    return within & candidates["acts"].astype(bool)


def operating_point(candidates, band: float, rule: str):
    """The row of the development table that an operating-point rule picks (chapter 3, section 3.2).

    Both rules take the strongest qualifying feedback (:func:`qualifying`), the ungated candidate
    before a gated one of the same strength. With none qualifying, the rule as first registered
    takes the first row of the weakest strength, the rule used now the weakest ungated candidate.
    """
    qualified = candidates[qualifying(candidates, band, rule)]
    if len(qualified):
        strongest = qualified[qualified["feedback"] == qualified["feedback"].max()]
        return strongest.sort_values("configuration", key=lambda c: c != "ungated", kind="stable").iloc[0]
    fallback = candidates if rule == OPERATING_RULES[0] else candidates[candidates["configuration"] == "ungated"]
    return fallback.sort_values("feedback", kind="stable").iloc[0]
