"""Registered analysis plans and the one engine that turns them into verdicts (all chapters, landing page).

Each chapter's plan is data, ``plans/NN.yaml``, written before the chapter's numbers are seen: for
every claim of the seeds that the chapter judges, the claim as the landing page states it, the
seed, the claimed effect, the endpoint (the glued names the rule reads), the rule and its
thresholds, the unit of analysis and interval method, how any operating point is chosen, the
sample size and the smallest effect it can detect. A claim's ``rules`` list is its history: the
first entry is the rule as first registered; every later entry is a deviation, with the date it
was made and why. The engine decides every rule of the list from the chapter's glued values, so a
chapter can show its verdict under the registered rule beside the one it now uses.

No verdict is typed or decided in a notebook: a chapter glues its endpoints, then calls
:func:`decide_plan` and glues what it returns; ``tests/test_verdicts.py`` recomputes every verdict
of every executed chapter from the plan and the glued endpoints and fails on any mismatch.

A rule is a mapping with a ``kind`` (one of :data:`RULE_KINDS`) and its arguments. An argument
that names a quantity is a number, a glued name, or ``{endpoint: name, plus: offset}``. Options
common to every kind, applied in this order:

- ``detectable`` (a glued smallest detectable effect) with the rule's ``claimed`` and ``null``:
  when the test cannot detect the claimed effect the verdict is "inconclusive (underpowered)",
  whatever the interval says; ``changed`` with ``needed`` does the same for an exact test that
  cannot reach significance with fewer changed items than it needs;
- ``p`` (a glued exact paired test's p-value) with ``alpha``: an effect found by the interval
  ("holds" or "partly") counts only if the paired test agrees, else "inconclusive";
- ``control`` (a glued flag: did the positive control detect its built-in effect?): a
  "does not hold" becomes "inconclusive" when it did not; ``control_demotes`` (a list of
  verdicts, default ``["does not hold"]``) names the verdicts a failed control makes
  "inconclusive" instead, for rules where the control must also back a "holds" (chapter 5: a
  benchmark that cannot see a change cannot show that nothing changed; chapter 4: seed 002's
  registered rule needed the control for either answer);
- ``collapsed`` (a glued flag: did the method's answers collapse to a constant?): the verdict is
  "inconclusive (collapsed)" whatever the numbers say, since a method that gives every
  question the same answer has not been tested at reading (chapter 4).

A claim that depends on a setting is judged over a registered grid (kind ``grid``, chapter 3): its
``member`` rule is decided at each point of the grid, with ``{point}`` in every endpoint name
replaced by the point's name (the glued text ``points`` lists them, space-separated), and the claim
"holds" where it holds at some point: :func:`grid_verdicts` gives the verdict at each point.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastmem import stats

PLANS = Path(__file__).resolve().parent.parent / "plans"
TRUE_BY_CONSTRUCTION = "true by construction"
UNDERPOWERED = "inconclusive (underpowered)"
COLLAPSED = "inconclusive (collapsed)"
SEEDS = ("000", "001", "002", "003")
MEASURED = (stats.HOLDS, stats.PARTLY, stats.DOES_NOT_HOLD, stats.INCONCLUSIVE, UNDERPOWERED, COLLAPSED)
VERDICTS = (*MEASURED, TRUE_BY_CONSTRUCTION)


# ---------------------------------------------------------------------------- the plan as data
@dataclass(frozen=True)
class Rule:
    """One version of a claim's rule: the registered one, or a deviation from it (all chapters)."""

    since: datetime.date
    spec: dict
    threshold: str
    reason: str = ""
    commit: str = ""


@dataclass(frozen=True)
class Claim:
    """One claim of a seed that a chapter judges, with its rule's history (all chapters)."""

    id: str
    seed: str
    text: str
    claimed: str
    glue: str
    section: str
    ours: str
    endpoint: str
    unit: str
    interval: str
    choice: str
    sample: str
    rules: tuple[Rule, ...]

    @property
    def rule(self) -> Rule:
        """The rule the verdict now rests on: the last of the history."""
        return self.rules[-1]

    @property
    def by_seed(self) -> bool:
        """True for a seed's claim; false for a hypothesis of the chapter's own (seed "—")."""
        return self.seed in SEEDS

    @property
    def deviates(self) -> bool:
        """True when the rule now used is not the one first registered."""
        return len(self.rules) > 1


@dataclass(frozen=True)
class Plan:
    """A chapter's registered analysis plan (``plans/NN.yaml``)."""

    chapter: str
    notebook: str
    title: str
    registered: datetime.date
    claims: tuple[Claim, ...]
    exploratory: tuple[str, ...] = ()

    def claim(self, claim_id: str) -> Claim:
        return next(c for c in self.claims if c.id == claim_id)


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict under the rule now used, and under every rule of its history."""

    claim: Claim
    verdict: str
    history: tuple[str, ...] = field(default=())
    ours: str = ""

    @property
    def changed_by_deviation(self) -> bool:
        """True when the first registered rule gives another verdict than the rule now used."""
        return bool(self.history) and self.history[0] != self.verdict


def _date(value) -> datetime.date:
    return value if isinstance(value, datetime.date) else datetime.date.fromisoformat(str(value))


def _rule(entry: dict) -> Rule:
    spec = dict(entry["rule"])
    if spec.get("kind") not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {spec.get('kind')!r}; expected one of {sorted(RULE_KINDS)}")
    return Rule(since=_date(entry["since"]), spec=spec, threshold=str(entry["threshold"]),
                reason=str(entry.get("reason", "")), commit=str(entry.get("commit", "")))


def read_plan(path: Path | str) -> Plan:
    """A plan file as a :class:`Plan`; a later rule without a reason is an error (all chapters)."""
    data = yaml.safe_load(Path(path).read_text())
    claims = []
    for item in data["claims"]:
        rules = tuple(_rule(entry) for entry in item["rules"])
        for later in rules[1:]:
            if not later.reason:
                raise ValueError(f"{path}: claim {item['id']}: a deviation (rule since {later.since}) "
                                 "needs a reason")
        claims.append(Claim(id=str(item["id"]), seed=str(item["seed"]), text=str(item["claim"]),
                            claimed=str(item["claimed"]), glue=str(item["glue"]),
                            section=str(item["section"]), ours=str(item.get("ours", "")),
                            endpoint=str(item["endpoint"]), unit=str(item["unit"]),
                            interval=str(item["interval"]), choice=str(item["choice"]),
                            sample=str(item["sample"]), rules=rules))
    return Plan(chapter=str(data["chapter"]), notebook=str(data["notebook"]), title=str(data["title"]),
                registered=_date(data["registered"]), claims=tuple(claims),
                exploratory=tuple(str(x) for x in data.get("exploratory", ())))


def load_plan(chapter: str) -> Plan:
    """The plan of chapter ``chapter`` ("01" to "05") from ``plans/`` (all chapters)."""
    return read_plan(PLANS / f"{chapter}.yaml")


def all_plans() -> list[Plan]:
    """Every chapter's plan, in chapter order (landing page, tests)."""
    return [read_plan(path) for path in sorted(PLANS.glob("[0-9][0-9].yaml"))]


def history_violations(registered: dict, current: dict) -> list[str]:
    """Where a plan rewrote its registered history instead of adding a deviation (all chapters; tests).

    ``registered`` is the plan file as first committed and ``current`` as it is now, both as read
    from YAML. Every claim registered must still be there, and its rule entries as registered must
    be unchanged and in place; a change is allowed only as a further entry with a date and a reason.
    """
    problems = []
    now = {claim["id"]: claim for claim in current.get("claims", [])}
    for claim in registered.get("claims", []):
        if claim["id"] not in now:
            problems.append(f"claim {claim['id']} was registered and is gone")
            continue
        first, later = claim["rules"], now[claim["id"]]["rules"]
        if later[:len(first)] != first:
            problems.append(f"claim {claim['id']}: a registered rule was rewritten; add a deviation instead")
        for entry in later[len(first):]:
            if not entry.get("reason") or not entry.get("since"):
                problems.append(f"claim {claim['id']}: a deviation needs its date and reason")
    return problems


# ---------------------------------------------------------------------------- reading endpoints
class MissingEndpoint(KeyError):
    """A rule names a glued value that the chapter did not glue."""


def _value(argument, glued: dict):
    if isinstance(argument, dict):
        return _value(argument["endpoint"], glued) + float(argument.get("plus", 0.0))
    if isinstance(argument, str):
        if argument not in glued:
            raise MissingEndpoint(argument)
        value = glued[argument]
        if isinstance(value, str) and value in ("yes", "no"):
            return value == "yes"
        return value
    return argument


def _number(argument, glued: dict) -> float:
    value = _value(argument, glued)
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------- the rules
def _interval(spec: dict, glued: dict) -> tuple[float, float]:
    return _number(spec["low"], glued), _number(spec["high"], glued)


def _effect(spec, glued):
    low, high = _interval(spec, glued)
    if low >= high:  # a single point: a degenerate bootstrap, not certainty
        return stats.INCONCLUSIVE
    return stats.verdict_effect(low, high, _number(spec["claimed"], glued), _number(spec.get("null", 0.0), glued))


def _within(spec, glued):
    low, high = _interval(spec, glued)
    if spec.get("identical") is not None and _value(spec["identical"], glued):
        return stats.HOLDS
    if low >= high:
        return stats.INCONCLUSIVE
    return stats.verdict_within(low, high, _number(spec["band"], glued))


def _at_most(spec, glued):
    low, high = _interval(spec, glued) if "low" in spec else (_number(spec["value"], glued),) * 2
    return stats.verdict_at_most(low, high, _number(spec["limit"], glued))


def _at_least(spec, glued):
    low, high = _interval(spec, glued) if "low" in spec else (_number(spec["value"], glued),) * 2
    return stats.verdict_at_least(low, high, _number(spec["floor"], glued))


def _reaches(spec, glued):
    interval = (float("nan"), *_interval(spec, glued))
    return stats.verdict_reaches(interval, _number(spec["claimed"], glued), _number(spec["floor"], glued))


def _below(spec, glued):
    """Chapter 2's earlier comparison rule: ``worse`` below ``better`` by their separate intervals.

    Kept only to decide the rules registered before paired tests (:func:`fastmem.stats.verdict_below`);
    a plan's current rule for two conditions on the same items is ``effect`` with ``p``.
    """
    def triple(side):
        return tuple(_number(spec[side][part], glued) for part in ("mean", "low", "high"))
    return stats.verdict_below(triple("worse"), triple("better"))


def _by_construction(spec, glued):
    # The construction is still checked where the chapter checks it: a failed check is a finding.
    if "check" in spec and not _value(spec["check"], glued):
        return stats.DOES_NOT_HOLD
    return TRUE_BY_CONSTRUCTION


def _all(spec, glued):
    members, complete = [], True
    for member in spec["of"]:
        try:
            members.append(decide_rule(member, glued))
        except MissingEndpoint:
            complete = False  # a member not run in this parameter set
    if not members:
        return stats.INCONCLUSIVE
    plain = [stats.INCONCLUSIVE if v in (UNDERPOWERED, COLLAPSED) else v for v in members]
    verdict = stats.verdict_all(plain, complete and bool(spec.get("complete", True)))
    for reason in (UNDERPOWERED, COLLAPSED):
        if verdict == stats.INCONCLUSIVE and all(v == reason for v in members):
            return reason
    return verdict


def _filled(value, point: str):
    if isinstance(value, str):
        return value.replace("{point}", point)
    if isinstance(value, dict):
        return {key: _filled(item, point) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, point) for item in value]
    return value


def grid_verdicts(spec: dict, glued: dict) -> dict[str, str]:
    """The verdict of a ``grid`` rule's member at each point of its grid, in the grid's order (chapter 3)."""
    points = str(_value(spec["points"], glued)).split()
    return {point: decide_rule(_filled(spec["member"], point), glued) for point in points}


def _grid(spec, glued):
    """Is there a point of the grid where the claim holds? Holds (or holds partly) at some point; does
    not hold where it fails at every point; otherwise open, for the reason shared by the open points."""
    found = list(grid_verdicts(spec, glued).values())
    for verdict in (stats.HOLDS, stats.PARTLY):
        if verdict in found:
            return verdict
    still_open = [v for v in found if v != stats.DOES_NOT_HOLD]
    if found and not still_open:
        return stats.DOES_NOT_HOLD
    for reason in (UNDERPOWERED, COLLAPSED):
        if still_open and all(v == reason for v in still_open):
            return reason
    return stats.INCONCLUSIVE


def _first(spec, glued):
    """The first of several verdicts found in a fixed order of severity (for example "quiet on every prompt set")."""
    members = [decide_rule(member, glued) for member in spec["of"]]
    return next((v for v in spec["order"] if v in members), spec["otherwise"])


RULE_KINDS = {"effect": _effect, "within": _within, "at_most": _at_most, "at_least": _at_least,
              "reaches": _reaches, "below": _below, "by_construction": _by_construction, "all": _all, "first": _first,
              "grid": _grid}


def _underpowered(spec: dict, glued: dict) -> bool:
    if "detectable" in spec:
        size = abs(_number(spec["claimed"], glued) - _number(spec.get("null", 0.0), glued))
        detectable = _number(spec["detectable"], glued)
        if not math.isfinite(detectable) or detectable > size:
            return True
    if "changed" in spec and _number(spec["changed"], glued) < _number(spec["needed"], glued):
        return True
    return False


def decide_rule(spec: dict, glued: dict) -> str:
    """The verdict of one rule on a chapter's glued values (all chapters; rule kinds in the module docstring)."""
    if "collapsed" in spec and _value(spec["collapsed"], glued):
        return COLLAPSED  # a method that answers everything alike was not tested at all
    if spec["kind"] not in ("by_construction", "all", "first", "grid") and _underpowered(spec, glued):
        return UNDERPOWERED
    verdict = RULE_KINDS[spec["kind"]](spec, glued)
    if verdict in (stats.HOLDS, stats.PARTLY) and "p" in spec:
        if not _number(spec["p"], glued) < float(spec.get("alpha", 0.05)):
            verdict = stats.INCONCLUSIVE
    if "control" in spec:
        demotes = tuple(spec.get("control_demotes", [stats.DOES_NOT_HOLD]))
        verdict = stats.verdict_with_control(verdict, bool(_value(spec["control"], glued)), demotes)
    return verdict


class Endpoints(dict):
    """The values a chapter glues, kept by name for its plan's rules (all chapters).

    ``endpoints.glue(name, value)`` glues the value for the page and keeps it, so the engine
    decides on exactly what the page shows: pass ``endpoints`` to :func:`decide_and_glue`.
    """

    def glue(self, name: str, value, display: bool = False) -> None:
        from myst_nb import glue

        self[name] = value
        glue(name, value, display=display)


def decide_and_glue(plan: Plan, glued: dict) -> list[Verdict]:
    """Decide a chapter's plan and glue each verdict under its claim's ``glue`` name (all chapters).

    ``glued`` holds every value the plan's rules read, exactly as the chapter glued them: the
    recompute test decides again from the glued values and fails where the two differ.
    """
    from myst_nb import glue

    decided = decide_plan(plan, glued)
    for verdict in decided:
        glue(verdict.claim.glue, verdict.verdict, display=False)
    return decided


def ours_text(claim: Claim, glued: dict) -> str:
    """The claim's "Ours" cell: its template filled with the glued values ("" when one is missing)."""
    try:
        return claim.ours.format_map(glued)
    except (KeyError, ValueError, TypeError):
        return "not run in this parameter set"


def decide(claim: Claim, glued: dict) -> Verdict:
    """A claim's verdict under its current rule and under every rule of its history (all chapters)."""
    history = tuple(decide_rule(rule.spec, glued) for rule in claim.rules)
    return Verdict(claim=claim, verdict=history[-1], history=history if claim.deviates else (),
                   ours=ours_text(claim, glued))


def decide_plan(plan: Plan, glued: dict) -> list[Verdict]:
    """Every claim of a chapter's plan decided on its glued values, in the plan's order (all chapters)."""
    return [decide(claim, glued) for claim in plan.claims]


# ---------------------------------------------------------------------------- what a chapter shows
def verdict_table(verdicts: list[Verdict], caption: str, uuid: str):
    """The chapter's verdict table: claim, seed's claimed effect, rule, ours, verdict (all chapters)."""
    import pandas as pd

    from fastmem import report

    frame = pd.DataFrame([{"seed": v.claim.seed, "claim": v.claim.text, "claimed": v.claim.claimed,
                           "rule": v.claim.rule.threshold, "ours": v.ours,
                           "verdict": v.verdict + (" †" if v.claim.deviates else "")}
                          for v in verdicts])
    return report.html_table(frame, uuid, caption)


def deviation_rows(verdicts: list[Verdict]) -> list[dict]:
    """One row per deviation: old rule, new rule, when, why, verdict under each (all chapters)."""
    rows = []
    for v in verdicts:
        for old, new, old_verdict, new_verdict in zip(v.claim.rules, v.claim.rules[1:], v.history, v.history[1:]):
            rows.append({"claim": v.claim.text, "registered rule": f"{old.threshold} (from {old.since})",
                         "verdict then": old_verdict, "new rule": f"{new.threshold} (from {new.since})",
                         "why": new.reason, "verdict now": new_verdict})
    return rows


def deviations_table(verdicts: list[Verdict], caption: str, uuid: str):
    """The chapter's "Deviations from the plan" table, or a sentence saying there are none (all chapters)."""
    import pandas as pd
    from IPython.display import Markdown

    from fastmem import report

    rows = deviation_rows(verdicts)
    if not rows:
        return Markdown("No rule of this chapter's plan was changed after its registration.")
    return report.html_table(pd.DataFrame(rows), uuid, caption)


def tally(verdicts: list[Verdict]) -> Counter:
    """How many claims each verdict has (landing page)."""
    return Counter(v.verdict for v in verdicts)


_PHRASES = {stats.HOLDS: ("holds", "hold"), stats.PARTLY: ("holds partly", "hold partly"),
            stats.DOES_NOT_HOLD: ("does not hold", "do not hold"),
            stats.INCONCLUSIVE: ("is inconclusive", "are inconclusive"),
            UNDERPOWERED: ("is inconclusive because the test is underpowered",
                           "are inconclusive because their tests are underpowered"),
            COLLAPSED: ("is inconclusive because the method collapsed to a constant answer",
                        "are inconclusive because the methods collapsed to a constant answer")}


def tally_text(verdicts: list[Verdict]) -> str:
    """The landing page's first finding: the verdicts counted, by-construction ones apart (landing page)."""
    counts = tally(verdicts)
    measured = sum(n for verdict, n in counts.items() if verdict != TRUE_BY_CONSTRUCTION)
    parts = [f"{counts[v]} {_PHRASES[v][counts[v] != 1]}" for v in MEASURED if counts[v]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"Of the {measured} measured claims of the seeds, {listed}."
    if counts[TRUE_BY_CONSTRUCTION]:
        text += (f" {counts[TRUE_BY_CONSTRUCTION]} more are true by construction and are not counted as "
                 "findings.")
    deviating = [v for v in verdicts if v.claim.deviates]
    if deviating:
        changed = sum(v.changed_by_deviation for v in deviating)
        text += (f" {len(deviating)} verdicts rest on a rule changed after it was first written (marked †); "
                 f"{changed} of them would read otherwise under the rule first written, and each chapter "
                 "shows both.")
    return text
