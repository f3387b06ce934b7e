"""The verdict engine: each rule on known inputs, every chapter's verdicts recomputed from its plan, and
registered rules that can only change through a recorded deviation."""

import datetime
import subprocess

import pytest
import yaml

from fastmem import stats, verdicts
from fastmem.book import ROOT, glued_values
from fastmem.verdicts import COLLAPSED, TRUE_BY_CONSTRUCTION, UNDERPOWERED, decide_rule

from conftest import executed_ci_notebook

HOLDS, PARTLY, DOES_NOT_HOLD, INCONCLUSIVE = stats.HOLDS, stats.PARTLY, stats.DOES_NOT_HOLD, stats.INCONCLUSIVE
PLANS = verdicts.all_plans()


# ---------------------------------------------------------------------------- each rule on known inputs
@pytest.mark.parametrize("low, high, expected", [(1.2, 2.0, HOLDS), (0.2, 0.6, PARTLY), (-0.2, 0.5, DOES_NOT_HOLD),
                                                 (-0.5, 1.5, INCONCLUSIVE), (0.5, 0.5, INCONCLUSIVE)])
def test_effect_rule(low, high, expected):
    assert decide_rule({"kind": "effect", "low": "lo", "high": "hi", "claimed": 1.0}, {"lo": low, "hi": high}) == expected


def test_a_comparison_counts_only_when_its_paired_test_agrees():
    rule = {"kind": "effect", "low": 0.2, "high": 0.6, "claimed": 1.0, "p": "p"}
    assert decide_rule(rule, {"p": 0.01}) == PARTLY
    assert decide_rule(rule, {"p": 0.2}) == INCONCLUSIVE


def test_underpowered_when_the_detectable_effect_exceeds_the_claim():
    rule = {"kind": "effect", "low": -0.1, "high": 0.1, "claimed": 0.05, "detectable": "mde"}
    assert decide_rule(rule, {"mde": 0.14}) == UNDERPOWERED
    assert decide_rule({**rule, "claimed": 0.5}, {"mde": 0.14}) == DOES_NOT_HOLD
    counted = {"kind": "effect", "low": 1.0, "high": 5.0, "claimed": 3.3, "changed": "n", "needed": "k"}
    assert decide_rule(counted, {"n": 3, "k": 6}) == UNDERPOWERED
    assert decide_rule(counted, {"n": 6, "k": 6}) == HOLDS


def test_a_null_without_a_detected_positive_control_is_inconclusive():
    rule = {"kind": "effect", "low": -0.1, "high": 0.1, "claimed": 0.5, "control": "control"}
    assert decide_rule(rule, {"control": "yes"}) == DOES_NOT_HOLD
    assert decide_rule(rule, {"control": "no"}) == INCONCLUSIVE
    assert decide_rule(rule, {"control": False}) == INCONCLUSIVE


def test_a_control_can_be_required_for_a_holds_too():
    preserved = {"kind": "within", "low": -0.2, "high": 0.3, "band": 1.0, "control": "seen",
                 "control_demotes": [HOLDS]}
    assert decide_rule(preserved, {"seen": "yes"}) == HOLDS
    assert decide_rule(preserved, {"seen": "no"}) == INCONCLUSIVE
    assert decide_rule({**preserved, "low": 1.5, "high": 3.0}, {"seen": "no"}) == DOES_NOT_HOLD
    either = {"kind": "effect", "low": 0.1, "high": 0.3, "claimed": 0.2, "control": "seen",
              "control_demotes": [HOLDS, DOES_NOT_HOLD]}
    assert decide_rule(either, {"seen": "no"}) == INCONCLUSIVE
    assert decide_rule({**either, "low": -0.3, "high": -0.1}, {"seen": "no"}) == INCONCLUSIVE
    assert decide_rule(either, {"seen": "yes"}) == HOLDS


@pytest.mark.parametrize("low, high, expected", [(-0.5, 0.5, HOLDS), (1.5, 3.0, DOES_NOT_HOLD), (0.5, 1.5, PARTLY),
                                                 (-2.0, 2.0, INCONCLUSIVE)])
def test_within_rule(low, high, expected):
    assert decide_rule({"kind": "within", "low": low, "high": high, "band": 1.0}, {}) == expected


def test_within_holds_by_identity_and_never_on_a_single_point():
    assert decide_rule({"kind": "within", "low": 0.0, "high": 0.0, "band": 1.0, "identical": "same"},
                       {"same": True}) == HOLDS
    assert decide_rule({"kind": "within", "low": 0.0, "high": 0.0, "band": 1.0}, {}) == INCONCLUSIVE


def test_bounds_and_floors():
    assert decide_rule({"kind": "at_most", "value": "err", "limit": 1e-4}, {"err": 3e-6}) == HOLDS
    assert decide_rule({"kind": "at_most", "value": "err", "limit": 1e-4}, {"err": 3e-3}) == DOES_NOT_HOLD
    assert decide_rule({"kind": "at_least", "low": 0.4, "high": 0.6, "floor": 0.5}, {}) == INCONCLUSIVE
    reaches = {"kind": "reaches", "low": "lo", "high": "hi", "claimed": 0.805,
               "floor": {"endpoint": "none", "plus": 0.1}}
    assert decide_rule(reaches, {"lo": 0.15, "hi": 0.5, "none": 0.0}) == PARTLY
    assert decide_rule(reaches, {"lo": 0.05, "hi": 0.5, "none": 0.0}) == DOES_NOT_HOLD


def test_by_construction_is_not_a_finding_unless_its_check_fails():
    assert decide_rule({"kind": "by_construction"}, {}) == TRUE_BY_CONSTRUCTION
    assert decide_rule({"kind": "by_construction", "check": "ok"}, {"ok": "yes"}) == TRUE_BY_CONSTRUCTION
    assert decide_rule({"kind": "by_construction", "check": "ok"}, {"ok": "no"}) == DOES_NOT_HOLD


def test_all_and_first():
    holds = {"kind": "at_most", "value": 1.0, "limit": 2.0}
    fails = {"kind": "at_most", "value": 3.0, "limit": 2.0}
    not_run = {"kind": "at_most", "value": "missing", "limit": 2.0}
    assert decide_rule({"kind": "all", "of": [holds, holds]}, {}) == HOLDS
    assert decide_rule({"kind": "all", "of": [holds, not_run]}, {}) == PARTLY
    assert decide_rule({"kind": "all", "of": [fails, fails]}, {}) == DOES_NOT_HOLD
    first = {"kind": "first", "of": [holds, fails], "order": [DOES_NOT_HOLD, INCONCLUSIVE], "otherwise": HOLDS}
    assert decide_rule(first, {}) == DOES_NOT_HOLD


def test_grid_holds_where_some_point_holds_and_fails_only_where_every_point_fails():
    rule = {"kind": "grid", "points": "grid", "member": {"kind": "within", "low": "low_{point}",
                                                          "high": "high_{point}", "band": 1.0}}
    inside, outside, wide = (-0.5, 0.5), (2.0, 3.0), (-2.0, 2.0)

    def glued(*intervals):
        values = {"grid": " ".join(f"s{i}" for i in range(len(intervals)))}
        for i, (low, high) in enumerate(intervals):
            values.update({f"low_s{i}": low, f"high_s{i}": high})
        return values

    assert verdicts.grid_verdicts(rule, glued(inside, outside)) == {"s0": HOLDS, "s1": DOES_NOT_HOLD}
    assert decide_rule(rule, glued(inside, outside)) == HOLDS
    assert decide_rule(rule, glued(outside, outside)) == DOES_NOT_HOLD
    assert decide_rule(rule, glued(outside, wide)) == INCONCLUSIVE
    assert decide_rule(rule, glued()) == INCONCLUSIVE
    with pytest.raises(verdicts.MissingEndpoint):
        decide_rule(rule, {"grid": "s0"})


@pytest.mark.parametrize("low, high", [(1.2, 2.0), (-0.2, 0.5), (-0.5, 1.5)])
def test_a_collapsed_method_is_inconclusive_whatever_its_interval(low, high):
    rule = {"kind": "effect", "low": low, "high": high, "claimed": 1.0, "collapsed": "constant"}
    plain = {key: value for key, value in rule.items() if key != "collapsed"}
    assert decide_rule(rule, {"constant": "yes"}) == COLLAPSED
    assert decide_rule(rule, {"constant": True}) == COLLAPSED
    assert decide_rule(rule, {"constant": "no"}) == decide_rule(plain, {})
    controlled = {**rule, "control": "control", "p": 0.01}
    assert decide_rule(controlled, {"constant": "yes", "control": "no"}) == COLLAPSED
    assert COLLAPSED in verdicts.MEASURED
    with pytest.raises(verdicts.MissingEndpoint):
        decide_rule(rule, {})


def test_all_members_collapsed_is_collapsed_and_mixed_members_follow_verdict_all():
    holds = {"kind": "at_most", "value": 1.0, "limit": 2.0}
    fails = {"kind": "at_most", "value": 3.0, "limit": 2.0}
    collapsed = {**holds, "collapsed": "c"}
    underpowered = {"kind": "effect", "low": -0.1, "high": 0.1, "claimed": 0.05, "detectable": 0.14}
    glued = {"c": "yes"}
    assert decide_rule(collapsed, glued) == COLLAPSED
    assert decide_rule({"kind": "all", "of": [collapsed, collapsed]}, glued) == COLLAPSED
    assert decide_rule({"kind": "all", "of": [collapsed, holds]}, glued) == stats.verdict_all([INCONCLUSIVE, HOLDS])
    assert decide_rule({"kind": "all", "of": [collapsed, holds]}, glued) == PARTLY
    assert decide_rule({"kind": "all", "of": [collapsed, fails]}, glued) == DOES_NOT_HOLD
    assert decide_rule({"kind": "all", "of": [collapsed, underpowered]}, glued) == INCONCLUSIVE
    assert decide_rule({"kind": "all", "of": [holds, holds], "collapsed": "c"}, glued) == COLLAPSED
    assert decide_rule({"kind": "all", "of": [collapsed, collapsed]}, {"c": "no"}) == HOLDS


def test_a_missing_endpoint_is_an_error_not_a_verdict():
    with pytest.raises(verdicts.MissingEndpoint):
        decide_rule({"kind": "at_most", "value": "never_glued", "limit": 1.0}, {})


def test_tally_counts_by_construction_apart():
    rule = verdicts.Rule(since=datetime.date(2026, 12, 3), spec={"kind": "by_construction"}, threshold="")
    claim = verdicts.Claim(id="x", seed="000", text="", claimed="", glue="x", section="x", ours="", endpoint="",
                           unit="", interval="", choice="", sample="", rules=(rule,))
    decided = [verdicts.Verdict(claim, HOLDS), verdicts.Verdict(claim, DOES_NOT_HOLD),
               verdicts.Verdict(claim, TRUE_BY_CONSTRUCTION)]
    text = verdicts.tally_text(decided)
    assert text.startswith("Of the 2 measured claims of the seeds, 1 holds and 1 does not hold.")
    assert "1 more are true by construction" in text
    collapsed = verdicts.tally_text([verdicts.Verdict(claim, COLLAPSED), verdicts.Verdict(claim, COLLAPSED)])
    assert collapsed.startswith("Of the 2 measured claims of the seeds, 2 are inconclusive because the methods "
                                "collapsed")


# ---------------------------------------------------------------------------- the plans
def test_every_chapter_has_a_plan_with_dated_rules():
    assert [plan.notebook for plan in PLANS] == [f"notebooks/{p.name}" for p in sorted((ROOT / "notebooks").glob("0*.ipynb"))]
    for plan in PLANS:
        assert plan.claims, plan.chapter
        for claim in plan.claims:
            assert [rule.since for rule in claim.rules] == sorted(rule.since for rule in claim.rules), claim.id


def _first_committed(path) -> dict | None:
    relative = path.relative_to(ROOT)
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout (a mutation-test copy): the history cannot be read")
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", str(relative)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    if not added:
        return None  # not committed yet: nothing is registered
    shown = subprocess.run(["git", "show", f"{added[-1]}:{relative}"], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    return yaml.safe_load(shown.stdout)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.chapter)
def test_registered_rules_change_only_through_a_deviation(plan):
    path = verdicts.PLANS / f"{plan.chapter}.yaml"
    registered = _first_committed(path)
    if registered is None:
        pytest.skip(f"{path.name} is not committed yet")
    assert not verdicts.history_violations(registered, yaml.safe_load(path.read_text()))


def test_history_check_catches_a_rewritten_rule():
    rule = {"since": "2026-12-03", "threshold": "within ±1%", "rule": {"kind": "within", "low": 0, "high": 0, "band": 1}}
    registered = {"claims": [{"id": "ppl", "rules": [rule]}]}
    rewritten = {"claims": [{"id": "ppl", "rules": [{**rule, "threshold": "within ±2%"}]}]}
    deviated = {"claims": [{"id": "ppl", "rules": [rule, {**rule, "since": "2026-12-04", "reason": "why"}]}]}
    unexplained = {"claims": [{"id": "ppl", "rules": [rule, {**rule, "since": "2026-12-04"}]}]}
    assert verdicts.history_violations(registered, rewritten)
    assert verdicts.history_violations(registered, {"claims": []})
    assert verdicts.history_violations(registered, unexplained)
    assert not verdicts.history_violations(registered, deviated)


# ---------------------------------------------------------------------------- every verdict recomputed
def _mismatches(plan, notebook) -> list[str]:
    glued = glued_values(notebook)
    return [f"{d.claim.id}: glued {glued.get(d.claim.glue)!r}, plan gives {d.verdict!r}"
            for d in verdicts.decide_plan(plan, glued) if glued.get(d.claim.glue) != d.verdict]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.chapter)
def test_committed_chapter_verdicts_follow_from_the_plan(plan):
    assert not _mismatches(plan, ROOT / plan.notebook)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.chapter)
def test_ci_chapter_verdicts_follow_from_the_plan(plan):
    assert not _mismatches(plan, executed_ci_notebook(plan.notebook.split("/")[-1]))


def test_endpoints_keep_exactly_what_the_page_glues(capsys):
    endpoints = verdicts.Endpoints()
    endpoints.glue("share", 0.25)
    endpoints.glue("control", "yes")
    assert endpoints == {"share": 0.25, "control": "yes"}
    assert decide_rule({"kind": "at_most", "value": "share", "limit": 0.5, "control": "control"}, endpoints) == HOLDS
