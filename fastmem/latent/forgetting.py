"""The forgetting curve: retained-memory scores by lag, smoothed as the paper does (chapter 4).

A question's lag is the number of turns written after its earliest evidence; scores are averaged
in five lag buckets and fitted by a weighted non-increasing isotonic regression.
"""

from __future__ import annotations

import numpy as np

LAG_EDGES = (0, 32, 64, 128, 256)
LAG_LABELS = ("[0,32)", "[32,64)", "[64,128)", "[128,256)", "[256,inf)")


def lag_bucket(lag: int) -> int:
    """Index of the lag bucket [0,32), [32,64), [64,128), [128,256), [256,inf) (chapter 4)."""
    return int(np.searchsorted(LAG_EDGES, lag, side="right") - 1)


def isotonic_nonincreasing(values, weights=None) -> np.ndarray:
    """Weighted least-squares non-increasing fit (pool-adjacent-violators), the paper's smoothing (chapter 4).

    ``scipy.optimize.isotonic_regression`` fits the same curve but pools in another order, so its
    values differ in the last bit; this one is kept so that the published numbers stay exact.
    """
    y = np.asarray(values, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    blocks = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2, wt, c1 + c2])
    return np.concatenate([[m] * c for m, _, c in blocks]) if blocks else y


def forgetting_curve(retained, lags) -> dict:
    """Raw bucket means, counts and the weighted non-increasing isotonic fit of retained scores (chapter 4)."""
    retained, buckets = np.asarray(retained, float), np.array([lag_bucket(l) for l in lags])
    raw = np.array([retained[buckets == b].mean() if (buckets == b).any() else np.nan for b in range(len(LAG_EDGES))])
    counts = np.array([(buckets == b).sum() for b in range(len(LAG_EDGES))])
    ok = counts > 0
    fit = np.full(len(raw), np.nan)
    fit[ok] = isotonic_nonincreasing(raw[ok], counts[ok])
    return {"raw": raw, "fit": fit, "counts": counts, "mean_fit": float(np.nanmean(fit))}
