"""Sphinx directives ``verdict-tally`` and ``verdict-table``: the landing page's verdicts, built from the plans.

Every chapter's registered plan (``plans/NN.yaml``) is decided at build time by
:mod:`fastmem.verdicts` on the values the committed, executed chapter glued, so the landing page
can only show what the engine computes from what the chapters measured; nothing is typed here.
Usage in MyST::

    ```{verdict-tally}
    ```

    ```{verdict-table}
    ```
"""

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

from fastmem import verdicts
from fastmem.book import ROOT, glued_values

HEADER = ("Seed: claim", "Rule", "Verdict", "Ours", "Where")


def decided_claims(directive: SphinxDirective) -> list[tuple[verdicts.Plan, verdicts.Verdict]]:
    """Every seed claim of every plan, decided on its chapter's committed glued values.

    A chapter's own hypotheses (no seed makes them) stay in the chapter. The page is rebuilt when a
    chapter or a plan changes.
    """
    rows = []
    for plan in verdicts.all_plans():
        notebook = ROOT / plan.notebook
        directive.env.note_dependency(str(notebook))
        directive.env.note_dependency(str(verdicts.PLANS / f"{plan.chapter}.yaml"))
        try:
            decided_plan = verdicts.decide_plan(plan, glued_values(notebook))
        except verdicts.MissingEndpoint as missing:
            raise directive.error(f"{plan.notebook} glues no value {missing}, which plans/{plan.chapter}.yaml "
                                  "reads: execute the chapter with its plan") from None
        rows += [(plan, decided) for decided in decided_plan if decided.claim.by_seed]
    return rows


class _MystDirective(SphinxDirective):
    """A directive whose output is MyST text, parsed as if it were written in the page."""

    def _parse(self, lines: list[str]) -> list:
        holder = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.env.docname), self.content_offset, holder)
        return list(holder.children)


class VerdictTally(_MystDirective):
    """The first finding of the landing page: the verdicts counted."""

    def run(self):
        decided = [v for _, v in decided_claims(self)]
        return self._parse([verdicts.tally_text(decided)])


class VerdictTable(_MystDirective):
    """One row per seed claim: the claim, its rule in words, verdict, our number, link to the deciding section."""

    def run(self):
        lines = ["```{list-table} " + self.arguments[0] if self.arguments else "```{list-table}",
                 ":header-rows: 1", ":widths: 30 24 14 22 10", ":name: table-landing-verdicts", ""]
        lines += [f"* - {HEADER[0]}"] + [f"  - {title}" for title in HEADER[1:]]
        by_construction = []
        for plan, decided in decided_claims(self):
            if decided.verdict == verdicts.TRUE_BY_CONSTRUCTION:
                by_construction.append((plan, decided))
                continue
            lines += self._row(plan, decided)
        lines.append("```")
        if by_construction:
            lines += ["", "Claims that are true by construction, not empirical findings:", ""]
            lines += [f"- Seed {d.claim.seed}, {d.claim.text}: {d.claim.rule.threshold} "
                      f"({{ref}}`Ch. {int(plan.chapter)} <{d.claim.section}>`)." for plan, d in by_construction]
        return self._parse(lines)

    final_argument_whitespace = True
    optional_arguments = 1

    @staticmethod
    def _row(plan: verdicts.Plan, decided: verdicts.Verdict) -> list[str]:
        claim = decided.claim
        mark = " †" if claim.deviates else ""
        return [f"* - {claim.seed}: {claim.text}", f"  - {claim.rule.threshold}",
                f"  - **{decided.verdict}**{mark}", f"  - {decided.ours}",
                f"  - {{ref}}`Ch. {int(plan.chapter)} <{claim.section}>`"]


def setup(app):
    app.add_directive("verdict-tally", VerdictTally)
    app.add_directive("verdict-table", VerdictTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

