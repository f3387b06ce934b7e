"""Every mutant of ``make mutants`` still applies to today's code (the full check is ``make mutants``)."""

import pytest

from mutants import MUTANTS, ROOT, apply


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_still_applies(mutant, tmp_path):
    copy = tmp_path / mutant.path
    copy.parent.mkdir(parents=True)
    copy.write_text((ROOT / mutant.path).read_text())
    apply(mutant, tmp_path)
    assert copy.read_text() != (ROOT / mutant.path).read_text()
