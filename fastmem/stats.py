"""Intervals, exact tests and verdict rules: the book's one statistics module (all chapters).

Every interval and test in the book comes from here, and so does every verdict. A verdict is one
of :data:`VERDICTS`; the rule that decides it is written in the docstring of the function that
returns it, before any number is seen. "inconclusive" is a first-class outcome: it is what a test
too small or too weak to tell the claim from its absence must return.

Resampling units matter. Rows that share a seed, or a prompt asked under several seeds, are not
independent: :func:`cluster_bootstrap_ci` resamples seeds and then prompts (or questions), and
:func:`bootstrap_ci` resamples rows only within each stratum, for designs where the strata are fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

HOLDS, PARTLY, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "partly", "does not hold", "inconclusive"
VERDICTS = (HOLDS, PARTLY, DOES_NOT_HOLD, INCONCLUSIVE)


# ---------------------------------------------------------------------------- bootstrap intervals
def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))


def bootstrap_ci(values, strata=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of ``values``, rows resampled within strata (all chapters).

    Without ``strata`` every row is an independent unit. With ``strata`` (for example the run seed
    of each row) rows are resampled within each stratum, which keeps every stratum's share of the
    data: right when the strata are fixed by design, wrong when they are a sample themselves (then
    use :func:`cluster_bootstrap_ci`).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    strata = np.zeros(len(values), dtype=int) if strata is None else np.asarray(strata)
    means = np.zeros(n_boot)
    for stratum in np.unique(strata):
        members = values[strata == stratum]
        picks = rng.integers(0, len(members), size=(n_boot, len(members)))
        means += members[picks].sum(axis=1)
    means /= len(values)
    return (float(values.mean()), *_percentiles(means, level))


def _codes(labels) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1


def cluster_weights(clusters, units=None, n_boot: int = 2000, seed: int = 0, fixed_clusters: bool = False
                    ) -> np.ndarray:
    """Bootstrap weights ``(n_boot, rows)`` that resample clusters, then units (all chapters).

    Each replicate draws the clusters (seeds) with replacement; with ``fixed_clusters`` every
    cluster is kept once instead (the right design with only 2-3 seeds, which a bootstrap cannot
    treat as a sample: the interval is then over units, for these seeds). Units (prompts, questions) are then
    drawn with replacement as well: within each drawn cluster when every unit belongs to one
    cluster (nested design, one fresh draw per copy of the cluster), or once per replicate and
    shared by all clusters when the same unit appears under several clusters (crossed design: the
    same prompt asked under every seed counts once, not once per seed). A row's weight is the
    product of its cluster's and its unit's counts. Without ``units`` rows are the units.
    """
    clusters, n_clusters = _codes(clusters)
    rows = len(clusters)
    units, n_units = _codes(np.arange(rows) if units is None else units)
    rng = np.random.default_rng(seed)
    cluster_count = (np.ones((n_boot, n_clusters), dtype=int) if fixed_clusters else
                     rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=n_boot))
    unit_clusters = [np.unique(clusters[units == u]) for u in range(n_units)]
    nested = all(len(c) == 1 for c in unit_clusters)
    unit_count = np.zeros((n_boot, n_units))
    if nested:
        owner = np.array([c[0] for c in unit_clusters])
        for c in range(n_clusters):
            members = np.flatnonzero(owner == c)
            if members.size:
                # k copies of a cluster, each with its own draw of n units = one draw of k * n units
                draws = cluster_count[:, c] * members.size
                unit_count[:, members] = np.stack([rng.multinomial(d, np.full(members.size, 1 / members.size))
                                                   for d in draws])
        return unit_count[:, units]
    unit_count = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_boot)
    return cluster_count[:, clusters] * unit_count[:, units]


def cluster_bootstrap_ci(values, clusters, units=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                         fixed_clusters: bool = False) -> tuple[float, float, float]:
    """Mean and percentile interval resampling clusters (seeds), then units (prompts; all chapters).

    See :func:`cluster_weights` for the resampling. For a paired comparison pass the per-row
    differences: the pairing is kept because both members of a pair share one row.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    weights = cluster_weights(clusters, units, n_boot, seed, fixed_clusters)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = weights @ values / weights.sum(axis=1)
    return (float(values.mean()), *_percentiles(means, level))


def paired_change(plain, other, relative: bool, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                  clusters=None, units=None, fixed_clusters: bool = False) -> dict:
    """Change of a mean (``other - plain``), absolute or in percent of the plain mean, with a paired
    bootstrap interval (chapters 3 and 4).

    Items are resampled as pairs, so both conditions see the same resample. Without ``clusters``
    items are independent; with ``clusters`` (and ``units``) the resampling is that of
    :func:`cluster_weights`.
    """
    plain, other = np.asarray(plain, float), np.asarray(other, float)
    if clusters is None:
        picks = np.random.default_rng(seed).integers(0, len(plain), size=(n_boot, len(plain)))
        p, o = plain[picks].mean(1), other[picks].mean(1)
    else:
        weights = cluster_weights(clusters, units, n_boot, seed, fixed_clusters)
        total = weights.sum(axis=1)
        p, o = weights @ plain / total, weights @ other / total
    return _change(plain, other, p, o, relative, level)


def _change(plain: np.ndarray, other: np.ndarray, plain_boot: np.ndarray, other_boot: np.ndarray, relative: bool,
            level: float) -> dict:
    """The change of the mean and its percentile interval from resampled means of both conditions."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            boot = 100 * (other_boot - plain_boot) / plain_boot
            point = 100 * (other.mean() - plain.mean()) / plain.mean()
        else:
            boot, point = other_boot - plain_boot, other.mean() - plain.mean()
    low, high = _percentiles(boot, level)
    return {"plain": float(plain.mean()), "memory": float(other.mean()), "change": float(point),
            "low": low, "high": high}


def block_bootstrap_change(plain, other, relative: bool, block_length: int | None = None, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict:
    """Change of a mean over a sequence of windows that share state, with a moving block bootstrap (chapters 3, 5).

    Consecutive windows of one stream are not independent when a memory carries state from one to
    the next, so an iid bootstrap over windows is too narrow. Blocks of ``block_length``
    consecutive windows are resampled with the pair (plain, other) kept together
    (``arch.bootstrap.MovingBlockBootstrap``). Without ``block_length`` it is chosen from the
    per-window differences by Politis and White's rule (``arch.bootstrap.optimal_block_length``),
    which depends on the dependence of the series, not on the result. Returns the keys of
    :func:`paired_change` and ``block_length``.
    """
    from arch.bootstrap import MovingBlockBootstrap, optimal_block_length

    plain, other = np.asarray(plain, float), np.asarray(other, float)
    if block_length is None:
        optimal = optimal_block_length(other - plain)["circular"].iloc[0]
        block_length = int(min(len(plain), max(1, np.ceil(optimal)))) if np.isfinite(optimal) else 1

    bootstrap = MovingBlockBootstrap(block_length, plain, other, seed=np.random.default_rng(seed))
    means = bootstrap.apply(lambda p, o: np.array([p.mean(), o.mean()]), n_boot)
    return {**_change(plain, other, means[:, 0], means[:, 1], relative, level), "block_length": int(block_length)}


def paired_bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n_items: int, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of any statistic of paired items (chapter 3: perplexity ratios, timing medians).

    ``statistic`` receives an ``(n_boot, n_items)`` matrix of resampled item indices (pairs stay
    together because both members are indexed by one row) and returns one value per resample.
    """
    picks = np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))
    return _percentiles(np.asarray(statistic(picks), dtype=float), level)


# ---------------------------------------------------------------------------- closed-form intervals
def mean_or_nan(values) -> float:
    """Mean of ``values``; NaN, without a warning, when there are none (chapter 4: empty lag buckets)."""
    return float(np.mean(values)) if np.size(values) else float("nan")


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval (chapter 4: over training seeds); the interval is NaN with one value."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = scipy_stats.t.ppf(1 - (1 - level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a share such as the flip share (chapter 1); (0, 1) with no trials."""
    if trials == 0:
        return (0.0, 1.0)
    interval = scipy_stats.binomtest(int(successes), int(trials)).proportion_ci(level, method="wilson")
    return (float(interval.low), float(interval.high))


def share_ci(share: float, trials: int, level: float = 0.95) -> tuple[float, float, float]:
    """A share of ``trials`` and its Wilson interval, as (share, low, high) (chapter 1: flip shares)."""
    return (float(share), *wilson_interval(int(round(share * trials)), trials, level))


# ---------------------------------------------------------------------------- exact paired tests
def sign_test(plain, other) -> dict:
    """Exact two-sided sign test of paired scores (chapters 2-4); for 0/1 outcomes this is McNemar's exact test.

    Ties are dropped; the number of items where ``other`` is better is binomial(n_changed, 1/2)
    under no effect. Returns the counts and ``p_value``.
    """
    diff = np.asarray(other, float) - np.asarray(plain, float)
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    p_value = 1.0 if better + worse == 0 else float(scipy_stats.binomtest(better, better + worse).pvalue)
    return {"better": better, "worse": worse, "unchanged": int((diff == 0).sum()), "p_value": p_value}


@dataclass(frozen=True)
class PairedDifference:
    """The per-item difference ``other - plain`` of two conditions on the same items (all chapters).

    ``difference`` is the mean with its bootstrap interval (``low``, ``high``), resampled as the
    design asks; ``p_value`` is the exact paired test (McNemar's on 0/1 outcomes, the sign test
    otherwise); ``detectable`` is the smallest true difference this interval detects with 80% power.
    """

    plain: float
    other: float
    difference: float
    low: float
    high: float
    p_value: float
    better: int
    worse: int
    detectable: float


def paired_difference(plain, other, clusters=None, units=None, n_boot: int = 2000, seed: int = 0,
                      fixed_clusters: bool = False) -> PairedDifference:
    """Two conditions compared on the same items: difference, interval, exact paired test (all chapters).

    The interval resamples the per-item differences (pairs stay together) with
    :func:`cluster_bootstrap_ci` when ``clusters`` are given, else items independently.
    """
    plain, other = np.asarray(plain, float), np.asarray(other, float)
    diff = other - plain
    if clusters is None:
        _, low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    else:
        _, low, high = cluster_bootstrap_ci(diff, clusters, units, n_boot, seed, fixed_clusters=fixed_clusters)
    test = sign_test(plain, other)
    return PairedDifference(plain=float(plain.mean()), other=float(other.mean()), difference=float(diff.mean()),
                            low=low, high=high, p_value=test["p_value"], better=test["better"],
                            worse=test["worse"], detectable=minimum_detectable_effect(low, high))


def permutation_test(plain, other, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired permutation test on the mean difference (chapters 2-4).

    Under no effect each pair's sign is exchangeable; exact when ``2**n <= n_resamples``.
    """
    diff = np.asarray(other, float) - np.asarray(plain, float)
    if not np.any(diff):
        return 1.0
    result = scipy_stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                                          alternative="two-sided", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def sign_test_detectable_changes(alpha: float = 0.05) -> int:
    """Fewest changed items, all in one direction, with which :func:`sign_test` can reach ``p < alpha`` (chapters 2-4)."""
    changed = 1
    while 2 * 0.5 ** changed >= alpha:
        changed += 1
    return changed


def minimum_detectable_effect(low: float, high: float, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true effect a test with this interval detects with probability ``power`` (all chapters).

    The interval's half-width gives the standard error, ``se = (high - low) / (2 z_level)``, and the
    detectable effect is ``(z_level + z_power) se``: about 1.43 half-widths at 95% and 80% power.
    """
    z_level = scipy_stats.norm.ppf(1 - (1 - level) / 2)
    return float((z_level + scipy_stats.norm.ppf(power)) * (high - low) / (2 * z_level))


# ---------------------------------------------------------------------------- verdict rules
def verdict_effect(low: float, high: float, claimed: float, null: float = 0.0) -> str:
    """Verdict on a claimed effect from its interval ``[low, high]`` (all chapters).

    The claim is an effect of size ``claimed`` away from ``null`` (either sign).
    - holds: the interval excludes ``null`` on the claimed side and does not exclude ``claimed``
      (it reaches the claimed size or lies beyond it);
    - partly: the interval excludes ``null`` on the claimed side but lies short of ``claimed``
      (a real effect, smaller than claimed);
    - does not hold: the interval excludes ``claimed`` and does not exclude ``null`` on the claimed
      side (the test could have seen the claimed effect, and did not);
    - inconclusive: the interval holds both ``null`` and ``claimed`` (too wide to tell), or is NaN.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    sign = 1.0 if claimed >= null else -1.0
    # Flip to the case claimed > null, so "beyond" means larger.
    lo, hi = sorted((sign * (low - null), sign * (high - null)))
    size = sign * (claimed - null)
    excludes_null, reaches_claim = lo > 0, hi >= size
    if excludes_null:
        return HOLDS if reaches_claim else PARTLY
    return INCONCLUSIVE if reaches_claim else DOES_NOT_HOLD


def verdict_reaches(interval: tuple[float, float, float], claimed: float, floor: float) -> str:
    """Verdict on "the score reaches ``claimed``", higher being better (chapter 2: recall).

    ``interval`` is (mean, low, high); ``floor`` is the level that means "no effect" (for example
    no memory plus a margin).
    - holds: ``high >= claimed`` and ``low > floor`` (the claimed level is not excluded, and the
      score is clearly above the floor);
    - partly: ``low > floor`` but ``high < claimed`` (clearly above the floor, clearly short of the claim);
    - does not hold: ``low <= floor`` and ``high < claimed``;
    - inconclusive: ``low <= floor`` and ``high >= claimed`` (the interval spans both), or NaN.
    """
    _, low, high = interval
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    above_floor, reaches_claim = low > floor, high >= claimed
    if above_floor:
        return HOLDS if reaches_claim else PARTLY
    return INCONCLUSIVE if reaches_claim else DOES_NOT_HOLD


def verdict_below(worse: tuple[float, float, float], better: tuple[float, float, float]) -> str:
    """Verdict on "``worse`` scores below ``better``", from two (mean, low, high) intervals (chapter 2).

    - holds: the intervals separate (``worse.high < better.low``);
    - partly: they overlap but the mean of ``worse`` is below that of ``better``;
    - does not hold: the whole interval of ``worse`` lies at or above the mean of ``better``;
    - inconclusive: otherwise (the mean of ``worse`` is not below, but the intervals cannot exclude it).
    """
    if worse[2] < better[1]:
        return HOLDS
    if worse[0] < better[0]:
        return PARTLY
    return DOES_NOT_HOLD if worse[1] >= better[0] else INCONCLUSIVE


def verdict_within(low: float, high: float, band: float) -> str:
    """Verdict on "the change is negligible" (equivalence within ``±band``; chapter 3: perplexity).

    - holds: the interval lies inside ``[-band, band]``;
    - does not hold: the interval lies wholly outside it (``low > band`` or ``high < -band``);
    - inconclusive: the interval reaches past both edges (too wide to tell), or is NaN;
    - partly: otherwise (the interval crosses one edge).
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if -band <= low and high <= band:
        return HOLDS
    if low > band or high < -band:
        return DOES_NOT_HOLD
    return INCONCLUSIVE if low < -band and high > band else PARTLY


def verdict_at_most(low: float, high: float, limit: float) -> str:
    """Verdict on "the value is at most ``limit``" (chapter 3: compute overhead).

    - holds: ``high <= limit``; does not hold: ``low > limit``;
    - inconclusive: the interval contains ``limit``, or is NaN.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if high <= limit:
        return HOLDS
    return DOES_NOT_HOLD if low > limit else INCONCLUSIVE


def verdict_with_control(verdict: str, control_passed: bool, demotes=(DOES_NOT_HOLD,)) -> str:
    """A verdict after its positive control (all chapters): a null ("does not hold") whose positive
    control failed, so that the test could not have found the effect, becomes "inconclusive";
    every other verdict is returned unchanged. ``demotes`` names other verdicts a failed control
    voids (chapter 5: a "preserved" measure holds only if the benchmark can see a change).
    """
    return INCONCLUSIVE if verdict in demotes and not control_passed else verdict


def verdict_all(verdicts, complete: bool = True) -> str:
    """One verdict on a claim about every member of a set, from the members' verdicts (chapter 4).

    - holds: every member holds (and the set is ``complete``; if only some members were tested,
      "holds" becomes "partly");
    - partly: at least one member holds or partly holds, but not all hold;
    - does not hold: no member holds or partly holds, and at least one does not hold;
    - inconclusive: every member is inconclusive, or there is no member.
    """
    verdicts = list(verdicts)
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS if complete else PARTLY
    if any(v in (HOLDS, PARTLY) for v in verdicts):
        return PARTLY
    return DOES_NOT_HOLD if DOES_NOT_HOLD in verdicts else INCONCLUSIVE


def verdict_at_least(low: float, high: float, floor: float) -> str:
    """Verdict on "the value is at least ``floor``" (chapter 3: failure modes), the mirror of :func:`verdict_at_most`.

    - holds: ``low >= floor``; does not hold: ``high < floor``;
    - inconclusive: the interval contains ``floor``, or is NaN.
    """
    return verdict_at_most(-high, -low, -floor)
