"""The statistics module against known values, and every verdict rule with one case per outcome."""

import numpy as np
import pytest

from fastmem import stats
from fastmem.stats import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, PARTLY


# ---------------------------------------------------------------------------- intervals
def test_t_interval_matches_the_textbook_case():
    # 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445
    mean, low, high = stats.t_interval([1, 2, 3, 4, 5])
    half = 2.776445 * np.sqrt(2.5) / np.sqrt(5)
    assert mean == 3
    assert low == pytest.approx(3 - half, abs=1e-5) and high == pytest.approx(3 + half, abs=1e-5)
    assert np.isnan(stats.t_interval([0.4])[1])


@pytest.mark.parametrize("successes, trials, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605)])
def test_wilson_interval_matches_newcombe_1998(successes, trials, low, high):
    interval = stats.wilson_interval(successes, trials)
    assert interval == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_edges():
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    assert stats.wilson_interval(0, 10)[0] == 0.0
    assert stats.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_bootstrap_width_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(size=400)
    mean, low, high = stats.bootstrap_ci(values)
    expected = 2 * 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low < mean < high
    assert high - low == pytest.approx(expected, rel=0.12)


def test_stratified_bootstrap_keeps_each_stratum_share():
    # Two strata with different means: resampling within strata cannot move the mean by mixing them.
    values = np.r_[np.zeros(50), np.ones(50)]
    strata = np.r_[np.zeros(50), np.ones(50)]
    mean, low, high = stats.bootstrap_ci(values, strata)
    assert (mean, low, high) == (0.5, 0.5, 0.5)
    _, low_rows, high_rows = stats.bootstrap_ci(values)
    assert high_rows - low_rows > 0.1


def test_cluster_bootstrap_is_wider_than_rows_when_seeds_differ():
    # Three seeds whose means differ a lot, 40 prompts each: the seed is the unit that varies.
    rng = np.random.default_rng(0)
    seeds = np.repeat([0, 1, 2], 40)
    values = np.array([0.2, 0.5, 0.8])[seeds] + rng.normal(scale=0.05, size=120)
    prompts = np.tile(np.arange(40), 3)
    _, row_low, row_high = stats.bootstrap_ci(values)
    _, low, high = stats.cluster_bootstrap_ci(values, seeds, prompts)
    assert high - low > 3 * (row_high - row_low)


def test_crossed_prompts_count_once_not_once_per_seed():
    # The same 12 prompts under 3 seeds with no seed effect: the interval is that of 12 prompts, not 36 rows.
    prompt_effect = np.random.default_rng(2).normal(size=12)
    values = np.tile(prompt_effect, 3)
    seeds, prompts = np.repeat([0, 1, 2], 12), np.tile(np.arange(12), 3)
    _, low, high = stats.cluster_bootstrap_ci(values, seeds, prompts, n_boot=4000)
    _, naive_low, naive_high = stats.bootstrap_ci(values, n_boot=4000)
    width_12 = 2 * 1.96 * prompt_effect.std(ddof=1) / np.sqrt(12)
    assert high - low == pytest.approx(width_12, rel=0.2)
    assert high - low > 1.4 * (naive_high - naive_low)


def test_nested_cluster_weights_sum_to_the_sample_size():
    seeds = np.repeat([0, 1, 2], [5, 7, 9])
    weights = stats.cluster_weights(seeds, np.arange(21), n_boot=50)
    # Every replicate holds three clusters; each drawn copy brings its own draw of its units.
    sizes = np.array([5, 7, 9])
    for row in weights:
        assert row.sum() in {a + b + c for a in sizes for b in sizes for c in sizes}


def test_paired_change_keeps_pairs_together():
    plain = np.random.default_rng(3).normal(size=50)
    other = plain + 0.1  # a constant shift: every resample sees exactly +0.1
    change = stats.paired_change(plain, other, relative=False)
    assert change["low"] == pytest.approx(0.1) and change["high"] == pytest.approx(0.1)
    unpaired = stats.bootstrap_ci(other - plain[::-1])
    assert unpaired[2] - unpaired[1] > 0.1


def test_paired_change_with_clusters_is_wider_than_items():
    rng = np.random.default_rng(4)
    seeds = np.repeat([0, 1, 2], 30)
    plain = rng.normal(size=90)
    other = plain + np.array([0.0, 0.3, 0.6])[seeds]
    items = stats.paired_change(plain, other, relative=False)
    clustered = stats.paired_change(plain, other, relative=False, clusters=seeds, units=np.tile(np.arange(30), 3))
    assert clustered["high"] - clustered["low"] > 2 * (items["high"] - items["low"])


def test_fixed_seeds_resample_units_only():
    # Two seeds far apart: resampling seeds spreads the interval over both means; fixed seeds do not.
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 100), rng.normal(5, 1, 100)])
    seeds, units = np.repeat([0, 1], 100), np.arange(200)
    _, low, high = stats.cluster_bootstrap_ci(values, seeds, units)
    _, fixed_low, fixed_high = stats.cluster_bootstrap_ci(values, seeds, units, fixed_clusters=True)
    assert fixed_high - fixed_low < 0.25 * (high - low)
    # With seeds fixed, the interval is the stratified bootstrap's: each seed's share is kept.
    expected = 2 * 1.96 * np.sqrt((values[:100].var() + values[100:].var()) / 2 / 200)
    assert fixed_high - fixed_low == pytest.approx(expected, rel=0.15)


def test_block_bootstrap_is_wider_than_iid_for_dependent_windows():
    rng = np.random.default_rng(0)
    carried = np.zeros(600)
    for i in range(1, 600):
        carried[i] = 0.9 * carried[i - 1] + rng.normal()
    plain = 5 + 0.1 * rng.normal(size=600)
    other = plain + 0.1 * carried
    iid = stats.paired_change(plain, other, relative=True)
    block = stats.block_bootstrap_change(plain, other, relative=True)
    assert block["change"] == pytest.approx(iid["change"])
    assert block["block_length"] > 5
    assert block["high"] - block["low"] > 2 * (iid["high"] - iid["low"])
    one = stats.block_bootstrap_change(plain, other, relative=True, block_length=1)
    assert one["high"] - one["low"] == pytest.approx(iid["high"] - iid["low"], rel=0.15)


def test_paired_difference_is_mcnemars_exact_test_on_binary_outcomes():
    # Worked example: 10 items right only with the memory, 2 only without; exact McNemar
    # p = 2 * P(X <= 2 | n = 12, 1/2) = 2 * (1 + 12 + 66) / 4096 = 0.03857.
    plain = np.array([0] * 10 + [1] * 2 + [1] * 20 + [0] * 8)
    other = np.array([1] * 10 + [0] * 2 + [1] * 20 + [0] * 8)
    result = stats.paired_difference(plain, other)
    assert result.p_value == pytest.approx(2 * 79 / 4096)
    assert (result.better, result.worse) == (10, 2)
    assert result.difference == pytest.approx(8 / 40)
    assert result.low < result.difference < result.high
    assert result.detectable == pytest.approx(stats.minimum_detectable_effect(result.low, result.high))
    from statsmodels.stats.contingency_tables import mcnemar
    assert result.p_value == pytest.approx(mcnemar([[20, 2], [10, 8]], exact=True).pvalue)


def test_paired_bootstrap_of_a_ratio():
    nll_plain, nll_other = np.full(20, 10.0), np.full(20, 11.0)
    low, high = stats.paired_bootstrap(lambda picks: nll_other[picks].sum(1) / nll_plain[picks].sum(1), 20)
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)


# ---------------------------------------------------------------------------- exact tests
def test_sign_test_known_values():
    # 4 of 4 changed answers better: p = 2 / 16; 5 of 5: p = 2 / 32.
    assert stats.sign_test([0, 0, 0, 0, 1], [1, 1, 1, 1, 1])["p_value"] == pytest.approx(0.125)
    result = stats.sign_test(np.zeros(18), np.r_[np.ones(5), np.zeros(13)])
    assert result == {"better": 5, "worse": 0, "unchanged": 13, "p_value": pytest.approx(0.0625)}
    assert stats.sign_test([1, 1], [1, 1])["p_value"] == 1.0


def test_sign_test_detectable_changes():
    assert stats.sign_test_detectable_changes(0.05) == 6  # 2 / 2**6 = 0.031; 2 / 2**5 = 0.0625


def test_permutation_test_exact_case():
    # Differences 1, 2, 3, 4: only all-positive and all-negative signs reach |mean| 2.5, so p = 2 / 16.
    assert stats.permutation_test(np.zeros(4), [1, 2, 3, 4]) == pytest.approx(0.125)
    assert stats.permutation_test([1, 2], [1, 2]) == 1.0


def test_minimum_detectable_effect_is_about_1_43_half_widths():
    assert stats.minimum_detectable_effect(-1.0, 1.0) == pytest.approx((1.959964 + 0.841621) / 1.959964, abs=1e-4)


# ---------------------------------------------------------------------------- verdict rules
@pytest.mark.parametrize("low, high, expected", [
    (0.5, 1.5, HOLDS),           # excludes 0, reaches the claimed 1.0
    (1.2, 1.6, HOLDS),           # beyond the claim
    (0.1, 0.6, PARTLY),          # real but smaller than claimed
    (-0.2, 0.4, DOES_NOT_HOLD),  # excludes the claim, cannot exclude zero
    (-0.9, -0.2, DOES_NOT_HOLD),  # the other direction
    (-0.5, 1.5, INCONCLUSIVE),   # holds both zero and the claim
    (float("nan"), float("nan"), INCONCLUSIVE),
])
def test_verdict_effect(low, high, expected):
    assert stats.verdict_effect(low, high, claimed=1.0) == expected


def test_verdict_effect_for_a_claimed_drop():
    assert stats.verdict_effect(-100.0, -70.0, claimed=-80.0) == HOLDS
    assert stats.verdict_effect(-30.0, -5.0, claimed=-80.0) == PARTLY
    assert stats.verdict_effect(-100.0, 10.0, claimed=-80.0) == INCONCLUSIVE
    assert stats.verdict_effect(-20.0, 10.0, claimed=-80.0) == DOES_NOT_HOLD


@pytest.mark.parametrize("interval, expected", [
    ((0.80, 0.73, 0.86), HOLDS), ((0.50, 0.40, 0.60), PARTLY),
    ((0.05, 0.00, 0.10), DOES_NOT_HOLD), ((0.50, 0.05, 0.90), INCONCLUSIVE),
])
def test_verdict_reaches(interval, expected):
    assert stats.verdict_reaches(interval, claimed=0.805, floor=0.1) == expected


@pytest.mark.parametrize("worse, expected", [
    ((0.49, 0.41, 0.58), HOLDS), ((0.70, 0.60, 0.78), PARTLY),
    ((0.90, 0.85, 0.95), DOES_NOT_HOLD), ((0.82, 0.60, 0.95), INCONCLUSIVE),
])
def test_verdict_below(worse, expected):
    assert stats.verdict_below(worse, (0.80, 0.73, 0.86)) == expected


@pytest.mark.parametrize("low, high, expected", [
    (0.0, 0.5, HOLDS), (0.5, 1.5, PARTLY), (1.2, 2.0, DOES_NOT_HOLD), (-1.5, 1.5, INCONCLUSIVE),
])
def test_verdict_within(low, high, expected):
    assert stats.verdict_within(low, high, band=1.0) == expected


@pytest.mark.parametrize("low, high, expected", [
    (-2.5, 5.1, HOLDS), (14.0, 20.0, DOES_NOT_HOLD), (5.0, 20.0, INCONCLUSIVE),
])
def test_verdict_at_most(low, high, expected):
    assert stats.verdict_at_most(low, high, limit=13.0) == expected


def test_every_rule_returns_a_known_verdict():
    outcomes = {stats.verdict_effect(a, b, 1.0) for a, b in [(0.5, 1.5), (0.1, 0.6), (-0.2, 0.4), (-1, 2)]}
    assert outcomes == set(stats.VERDICTS)


@pytest.mark.parametrize("verdict, passed, expected", [
    (DOES_NOT_HOLD, False, INCONCLUSIVE), (DOES_NOT_HOLD, True, DOES_NOT_HOLD), (HOLDS, False, HOLDS),
    (PARTLY, False, PARTLY), (INCONCLUSIVE, True, INCONCLUSIVE),
])
def test_verdict_with_control(verdict, passed, expected):
    assert stats.verdict_with_control(verdict, passed) == expected


def test_a_failed_control_can_void_a_holds_where_the_rule_says_so():
    assert stats.verdict_with_control(HOLDS, False, demotes=(HOLDS,)) == INCONCLUSIVE
    assert stats.verdict_with_control(HOLDS, True, demotes=(HOLDS,)) == HOLDS
    assert stats.verdict_with_control(DOES_NOT_HOLD, False, demotes=(HOLDS,)) == DOES_NOT_HOLD


@pytest.mark.parametrize("verdicts, complete, expected", [
    ([HOLDS, HOLDS], True, HOLDS), ([HOLDS, HOLDS], False, PARTLY), ([HOLDS, DOES_NOT_HOLD], True, PARTLY),
    ([PARTLY, INCONCLUSIVE], True, PARTLY), ([DOES_NOT_HOLD, INCONCLUSIVE], True, DOES_NOT_HOLD),
    ([INCONCLUSIVE, INCONCLUSIVE], True, INCONCLUSIVE), ([], True, INCONCLUSIVE),
])
def test_verdict_all(verdicts, complete, expected):
    assert stats.verdict_all(verdicts, complete) == expected


def test_verdict_at_least_mirrors_at_most():
    assert stats.verdict_at_least(2.1, 3.0, 2.0) == "holds"
    assert stats.verdict_at_least(2.0, 3.0, 2.0) == "holds"
    assert stats.verdict_at_least(1.0, 1.9, 2.0) == "does not hold"
    assert stats.verdict_at_least(1.5, 2.5, 2.0) == "inconclusive"
    assert stats.verdict_at_least(float("nan"), 2.5, 2.0) == "inconclusive"


def test_mean_or_nan_is_nan_only_without_values():
    assert stats.mean_or_nan([1, 2, 6]) == 3
    assert np.isnan(stats.mean_or_nan(np.array([])))


def test_share_ci_is_the_wilson_interval_of_the_counted_successes():
    share, low, high = stats.share_ci(81 / 263, 263)
    assert share == pytest.approx(81 / 263)
    assert (low, high) == pytest.approx(stats.wilson_interval(81, 263))
