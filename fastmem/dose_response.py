"""The attractor layer's claims against its feedback strength (chapter 3, section 3.6 "Dose-response").

A claim that depends on a setting is judged over a registered grid of that setting, not at one
operating point: every strength of the grid is run in both configurations the seed describes (the
layer as first described, "ungated", and its revision with gating + burn-in), each endpoint is
measured at each point with its interval, and the plan's ``grid`` rules
(:func:`fastmem.verdicts.grid_verdicts`) say where each claim holds. This module names the points,
writes the verdicts by strength in words and draws the curves.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from .attractors import AttractorConfig
from .errors import ParameterError

CONFIGURATIONS = ("ungated", "gating + burn-in")
_SHORT = {"ungated": "ungated", "gating + burn-in": "gated"}
_COLOUR = {"ungated": "tab:blue", "gating + burn-in": "tab:orange"}  # the same in every panel


@dataclass(frozen=True)
class GridPoint:
    """One point of the strength grid: a configuration of the layer at one feedback strength (chapter 3)."""

    configuration: str
    strength: float
    config: AttractorConfig

    @property
    def name(self) -> str:
        """The point's name in glued endpoint names, e.g. ``ungated_0p5`` (chapter 3)."""
        return f"{_SHORT[self.configuration]}_{self.strength:g}".replace(".", "p")


def strength_grid(ungated: AttractorConfig, gated: AttractorConfig, strengths) -> list[GridPoint]:
    """Every strength in both configurations, ungated first, strengths ascending (chapter 3, section 3.6)."""
    strengths = sorted(float(s) for s in strengths)
    if not strengths or len(set(strengths)) < len(strengths) or strengths[0] <= 0:
        raise ParameterError(f"strengths must be distinct positive numbers, got {strengths}")
    return [GridPoint(name, s, base.with_(feedback_strength=s))
            for name, base in zip(CONFIGURATIONS, (ungated, gated)) for s in strengths]


def points_text(points: list[GridPoint]) -> str:
    """The glued list of point names that a plan's ``grid`` rule reads (chapter 3)."""
    return " ".join(p.name for p in points)


def verdicts_by_strength(per_point: dict[str, str], points: list[GridPoint]) -> str:
    """Where a claim holds, in words: "holds at 0.2, 0.5; does not hold at 1, 2, 4" (chapter 3, section 3.6).

    ``per_point`` is :func:`fastmem.verdicts.grid_verdicts` of the claim's rule; verdicts are listed in
    the order they first occur along the grid.
    """
    strength = {p.name: p.strength for p in points}
    groups: dict[str, list[str]] = {}
    for name, verdict in per_point.items():
        groups.setdefault(verdict, []).append(f"{strength[name]:g}")
    return "; ".join(f"{verdict} at {', '.join(values)}" for verdict, values in groups.items())


@dataclass(frozen=True)
class Curve:
    """One endpoint of one configuration against strength: change and interval per point (chapter 3)."""

    endpoint: str
    configuration: str
    strengths: tuple[float, ...]
    change: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def curve_figure(panels: list[tuple[str, list[Curve], float, tuple[float, float] | None]]):
    """The dose-response figure: one panel per endpoint, each curve with its 95% intervals (chapter 3).

    A panel is ``(y label, curves, claimed value, band)``: the seed's claimed value is drawn as a
    dashed line and ``band`` (or ``None``) as a shaded range, e.g. the ±1% of "perplexity unchanged".
    Strengths are on a log axis; the y axis always contains the intervals, the claim and zero.
    """
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 2.7 * len(panels)), sharex=True)
    for ax, (ylabel, curves, claimed, band) in zip(np.atleast_1d(axes), panels):
        if band is not None:
            ax.axhspan(*band, color="0.85", label="within the claim's band")
        ax.axhline(0, color="black", linewidth=0.8)
        claim = f"{claimed:+g}%" if claimed else "0%"
        ax.axhline(claimed, color="tab:red", linestyle="--", label=f"seed's claim ({claim})")
        for curve in curves:
            offset = 0.97 if curve.configuration == CONFIGURATIONS[0] else 1.03
            x = np.array(curve.strengths) * offset  # side by side, so that intervals do not hide each other
            change, low, high = (np.array(v, float) for v in (curve.change, curve.low, curve.high))
            # a percentile interval need not contain its estimate (the perplexity interval weighs
            # windows equally, the estimate tokens): a bar never points backwards
            bars = [np.clip(change - low, 0, None), np.clip(high - change, 0, None)]
            ax.errorbar(x, change, yerr=bars, marker="o", capsize=3, color=_COLOUR[curve.configuration],
                        label=curve.configuration)
        ax.set_xscale("log")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="best")
    strengths = sorted({s for _, curves, _, _ in panels for c in curves for s in c.strengths})
    last = np.atleast_1d(axes)[-1]
    last.set_xticks(strengths, [f"{s:g}" for s in strengths])
    last.minorticks_off()
    last.set_xlabel("feedback strength β (log scale)")
    return fig
