"""Chapter 3, section 3.6: the seed's three failure modes, each with a positive control that shows the
test can fire.

The seed names three ways the attractor layer (:mod:`fastmem.attractors`) fails, and each test here
comes with a reference built so that the failure is there by construction:

- **Too many attractors -> unstable.** The statistic is the *churn* of the state: how far the
  normalised feedback direction (:func:`state_direction`) turns from one pass to the next
  (:func:`stream_effect`), compared between two layers by :func:`churn_ratio`. The direction is
  normalised over the attractors, so a layer with more attractors does not churn more merely
  because its summed feedback is larger. Control: :class:`UnstableLayer`, whose attractors are
  redrawn at random before every update.
- **Heavy decay -> stateless.** The statistic is the cosine between the feedback after a history
  and a fresh layer's after the last window alone (``fresh_cosine`` of :func:`stream_effect`),
  placed by :func:`stateless_share` between a no-decay layer (0) and :class:`StatelessLayer` (1),
  which is reset before every pass.
- **Snap-back.** :func:`topic_switch` follows the state while the layer reads topic A, then topic B
  (then, optionally, A again); :func:`snap_back` counts the tracks that cross to B and, of those,
  the ones that return nearer A. Control: a text that returns to A, read by a layer that follows
  its input (``windows_return``).

The reference layers are controls by construction, never results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import stats
from .attractors import AttractorConfig, AttractorLayer, random_attractors
from .errors import ParameterError
from .report import interval_text

# Fewer passes than this and the moving-block bootstrap has no room for blocks: pairs of passes are resampled.
MIN_BLOCK_PASSES = 8


@dataclass(frozen=True)
class Ratio:
    """A ratio with its 95% bootstrap interval (chapter 3, section 3.6)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class SnapBack:
    """Snap-back counts over article pairs (chapter 3, section 3.6).

    ``n_crossed``: pairs whose state crossed to topic B after the switch; ``n_snapped``: of those,
    the pairs whose state returned nearer topic A on a later pass; ``share = n_snapped / n_crossed``
    (NaN when none crossed) with its Wilson interval ``low``, ``high`` ((0, 1) when none crossed).
    """

    n_pairs: int
    n_crossed: int
    n_snapped: int
    share: float
    low: float
    high: float


# ---------------------------------------------------------------------------- state and reference layers
def state_direction(layer: AttractorLayer) -> torch.Tensor:
    """Where a layer's state points: ``sum_k w_k A_k / sum_k w_k`` per stream, shape (R, d) (chapter 3, section 3.6).

    ``w_k`` are the feedback's weights (:meth:`AttractorLayer.feedback_weights`: ``s_k max(c_k, 0)``,
    gated when configured), so this is the feedback's direction normalised over the attractors: it
    does not grow with their number. Zero where every weight is zero. The layer must have read a pass.
    """
    if layer.attractors is None:
        raise ParameterError("state_direction: the layer has not read anything yet")
    weight = layer.feedback_weights()
    return torch.einsum("rk,rkd->rd", weight, layer.attractors) / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)


class StatelessLayer(AttractorLayer):
    """Control by construction, never a result: reset at the start of every pass (chapter 3, section 3.6).

    Nothing is kept across passes, not even the pending feedback (so it never changes the model's
    output): its feedback after reading window ``j`` is a fresh layer's after window ``j`` alone.
    It is the "stateless" reference of :func:`stateless_share`.
    """

    def _hook(self, module, args, output):
        self.reset(self.n_streams)
        return super()._hook(module, args, output)


class UnstableLayer(AttractorLayer):
    """Control by construction, never a result: attractors redrawn before every update (chapter 3, section 3.6).

    The draw is :func:`fastmem.attractors.random_attractors` (as ``init="random"``: directions scaled to
    the pooled activation's norm) from one generator seeded with ``config.seed`` that advances pass by
    pass (:meth:`reset` seeds it again), so the state direction churns whatever the input.
    """

    def reset(self, n_streams: int = 1) -> None:
        super().reset(n_streams)
        self.generator: torch.Generator | None = None

    def _update(self, x: torch.Tensor) -> None:
        if self.generator is None or self.generator.device.type != x.device.type:
            self.generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
        self.attractors = random_attractors(x, self.config.n_attractors, self.generator)
        super()._update(x)


# ---------------------------------------------------------------------------- effects on a stream of windows
def _log_probs(model, x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(x).logits.float(), -1)


@torch.no_grad()
def plain_log_probabilities(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities of the plain model, one tensor per window (chapter 3, section 3.6)."""
    return [_log_probs(model, x) for x in windows]


def _turn(vectors: torch.Tensor) -> np.ndarray:
    """``1 - cos`` between consecutive rows of ``vectors`` (T, ..., d), averaged over the middle axes."""
    cosine = torch.cosine_similarity(vectors[1:], vectors[:-1], dim=-1)
    return (1 - cosine).reshape(len(cosine), -1).mean(dim=1).cpu().numpy()


@torch.no_grad()
def stream_effect(model, config: AttractorConfig, windows: list[torch.Tensor], *, fresh: bool = False,
                  plain_log_probs: list[torch.Tensor] | None = None, layer_class=AttractorLayer) -> dict:
    """How a layer reading ``windows`` in order (one forward pass each) changes the model (chapter 3, section 3.6).

    The layer is ``layer_class(model, config)`` (:class:`StatelessLayer` and :class:`UnstableLayer`
    are the controls). Per window after the first (the first pass has no feedback yet), against the
    plain model on the same window: ``kl``, the mean KL divergence of the next-token distribution
    (nats per token); ``answer_changes``, the share of positions whose greedy next token changes;
    ``nll``, the mean next-token loss with the layer, and ``plain_nll`` without. Per pass after the
    first, of the first stream: ``churn``, ``1 - cos`` between this pass's :func:`state_direction`
    and the last one's (0 for a state that holds still), and ``drift``, the mean over attractors of
    ``1 - cos(A_k(t), A_k(t-1))``. Per pass: ``several_active``, 1 when more than one attractor was
    active. ``feedback_ratio``: size of the last feedback over the pooled activation. With
    ``fresh``, ``fresh_cosine`` per window after the first: the cosine between the feedback the
    layer prepares after reading windows ``0..j`` and the one a fresh layer (``layer_class``
    again) prepares after reading window ``j`` alone (1 when nothing of the history is kept).
    ``plain_log_probs``: the plain model's :func:`plain_log_probabilities` of ``windows``, computed
    here when not given (pass them to share one plain run between configurations).
    """
    layer = layer_class(model, config)
    layer.record = []
    rows = {"kl": [], "answer_changes": [], "nll": [], "plain_nll": [], "feedback": []}
    directions, attractors = [], []
    plain = plain_log_probs if plain_log_probs is not None else plain_log_probabilities(model, windows)
    with layer:
        for x, reference in zip(windows, plain):
            log_p = _log_probs(model, x)
            rows["kl"].append((reference.exp() * (reference - log_p)).sum(-1).mean().item())
            rows["answer_changes"].append((log_p.argmax(-1) != reference.argmax(-1)).float().mean().item())
            for name, values in (("nll", log_p), ("plain_nll", reference)):
                rows[name].append(-values[0, :-1].gather(-1, x[0, 1:, None]).mean().item())
            rows["feedback"].append(layer.feedback[0].clone())
            directions.append(state_direction(layer)[0])
            attractors.append(layer.attractors[0].clone())
    record = layer.diagnostics()
    result = {name: np.array(values[1:]) for name, values in rows.items() if name != "feedback"}
    result["churn"] = _turn(torch.stack(directions))
    result["drift"] = _turn(torch.stack(attractors))
    result["several_active"] = np.array([r["several_activated"] for r in record])
    result["feedback_ratio"] = record[-1]["feedback_norm"] / record[-1]["activation_norm"]
    if fresh:
        cosines = []
        for x, remembered in zip(windows[1:], rows["feedback"][1:]):
            new = layer_class(model, config)
            with new:
                model(x)
            cosines.append(torch.cosine_similarity(remembered, new.feedback[0], 0).item())
        result["fresh_cosine"] = np.array(cosines)
    return result


def effect_summary(effect: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """One row of chapter 3's failure-mode tables from a :func:`stream_effect` result (chapter 3, section 3.6).

    ``several active``: share of passes with more than one active attractor; ``KL`` and ``answer
    changes``: means over windows with percentile bootstrap intervals over windows
    (:func:`fastmem.stats.bootstrap_ci`); ``loss change %``: change of the mean next-token loss.
    """
    kl = stats.bootstrap_ci(effect["kl"], n_boot=n_boot, seed=seed)
    answers = stats.bootstrap_ci(effect["answer_changes"], n_boot=n_boot, seed=seed)
    return {
        "several active": float(effect["several_active"].mean()),
        "KL": kl[0],
        "KL 95% CI": interval_text(kl[1], kl[2], 1, scientific=True),
        "answer changes": answers[0],
        "changes 95% CI": interval_text(answers[1], answers[2]),
        "loss change %": float(100 * (effect["nll"].mean() / effect["plain_nll"].mean() - 1)),
    }


# ---------------------------------------------------------------------------- instability and decay statistics
def churn_ratio(large: dict, small: dict, n_boot: int = 2000, seed: int = 0) -> Ratio:
    """Mean churn of stream effect ``large`` over that of ``small``, with a 95% interval (chapter 3, section 3.6).

    Both are :func:`stream_effect` results on the same windows, so their passes are paired. Passes
    share the layer's state, so the interval is a moving-block bootstrap over passes
    (:func:`fastmem.stats.block_bootstrap_change`, block length by Politis and White's rule); with
    fewer than :data:`MIN_BLOCK_PASSES` passes, pairs of passes are resampled one by one
    (:func:`fastmem.stats.paired_bootstrap`).
    """
    big, base = np.asarray(large["churn"], float), np.asarray(small["churn"], float)
    if big.shape != base.shape or big.size == 0:
        raise ParameterError(f"churn_ratio: churn of {big.size} and {base.size} passes; need the same windows")
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(big.mean() / base.mean())
        if big.size < MIN_BLOCK_PASSES:
            low, high = stats.paired_bootstrap(lambda picks: big[picks].mean(1) / base[picks].mean(1), big.size,
                                               n_boot, seed)
        else:
            change = stats.block_bootstrap_change(base, big, relative=True, n_boot=n_boot, seed=seed)
            low, high = 1 + change["low"] / 100, 1 + change["high"] / 100
    return Ratio(value, low, high)


def stateless_share(heavy, none, stateless, n_boot: int = 2000, seed: int = 0) -> Ratio:
    """Where heavy decay's fresh cosine lies between two references, with an interval (chapter 3, section 3.6).

    ``(mean(heavy) - mean(none)) / (mean(stateless) - mean(none))``: 0 at the no-decay layer's
    ``fresh_cosine``, 1 at :class:`StatelessLayer`'s. The three arrays are paired by window and
    resampled together (:func:`fastmem.stats.paired_bootstrap`). NaN, with a NaN interval, when the
    two references coincide.
    """
    heavy, none, stateless = (np.asarray(a, float) for a in (heavy, none, stateless))
    if not heavy.shape == none.shape == stateless.shape:
        raise ParameterError("stateless_share: the three fresh cosines must be paired by window")

    def share(picks):
        base = none[picks].mean(-1)
        return (heavy[picks].mean(-1) - base) / (stateless[picks].mean(-1) - base)

    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(share(np.arange(heavy.size)))
        if not np.isfinite(value):
            return Ratio(float("nan"), float("nan"), float("nan"))
        low, high = stats.paired_bootstrap(share, heavy.size, n_boot, seed)
    return Ratio(value, low, high)


# ---------------------------------------------------------------------------- topic switch and snap-back
@torch.no_grad()
def topic_switch(model, config: AttractorConfig, windows_a: list[torch.Tensor], windows_b: list[torch.Tensor],
                 windows_return: list[torch.Tensor] | None = None, *, layer_class=AttractorLayer) -> np.ndarray:
    """Where the layer's state points while it reads topic A, then topic B (chapter 3, section 3.6).

    The state's :func:`state_direction` is projected on the axis between the two topics' mean
    activations at the layer's site (plain model, windows A and B): +1 at topic A's mean, -1 at
    topic B's. One value per pass, A's passes first. With ``windows_return`` (more of topic A) the
    layer reads them after B and their passes follow: a return built into the text, the positive
    control of :func:`snap_back`. The layer is ``layer_class(model, config)``.
    """
    layer = layer_class(model, config)
    means = []
    for windows in (windows_a, windows_b):
        captured = []
        hook = layer.module.register_forward_hook(
            lambda module, args, output: captured.append(
                (output[0] if isinstance(output, tuple) else output).float().mean((0, 1))))
        for x in windows:
            model(x)
        hook.remove()
        means.append(torch.stack(captured).mean(0))
    centre, axis = (means[0] + means[1]) / 2, (means[0] - means[1]) / 2
    positions = []
    with layer:
        for x in [*windows_a, *windows_b, *(windows_return or [])]:
            model(x)
            positions.append(((state_direction(layer)[0] - centre) @ axis / (axis @ axis)).item())
    return np.array(positions)


def switch_summary(positions, n_before: int) -> dict:
    """Lag and snap-back of a :func:`topic_switch` track switching after pass ``n_before`` (chapter 3, section 3.6).

    ``lag``: passes after the switch until the state is first nearer topic B (position < 0);
    ``n_after + 1`` when it never is (censored). ``old_share``: share of the passes after the
    switch on which the state is nearer topic A. ``crossed``: 1 if the state was ever nearer B after
    the switch. ``snapped``: 1 if, after first crossing to B, the state returns nearer A on a later pass.
    """
    after = np.asarray(positions, float)[n_before:]
    crossed = np.flatnonzero(after < 0)
    lag = int(crossed[0]) + 1 if crossed.size else len(after) + 1
    snapped = bool(crossed.size and (after[crossed[0]:] > 0).any())
    return {"lag": lag, "old_share": float((after > 0).mean()), "snapped": float(snapped),
            "crossed": float(crossed.size > 0)}


def snap_back(tracks: list[np.ndarray], n_before: int) -> SnapBack:
    """Of the article pairs whose state crossed to topic B, the share that returned to A (chapter 3, section 3.6).

    ``tracks``: one :func:`topic_switch` track per pair, the switch after pass ``n_before``. A pair
    that never crossed cannot show a snap-back and is left out of the share (counted in ``n_pairs``
    only); the interval is Wilson's (:func:`fastmem.stats.wilson_interval`).
    """
    summaries = [switch_summary(track, n_before) for track in tracks]
    crossed = int(sum(s["crossed"] for s in summaries))
    snapped = int(sum(s["snapped"] for s in summaries))
    low, high = stats.wilson_interval(snapped, crossed)
    return SnapBack(n_pairs=len(tracks), n_crossed=crossed, n_snapped=snapped,
                    share=snapped / crossed if crossed else float("nan"), low=low, high=high)
