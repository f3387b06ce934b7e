"""Shared fixtures: models are loaded once per session; executed CI notebooks are reused."""

from pathlib import Path

import pytest

from fastmem.book import ROOT, execute, resolve_parameters
from fastmem.models import load_model

CI_BUILD = ROOT / "_build" / "ci"


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_neox():
    return load_model("tiny-gpt-neox")


@pytest.fixture(scope="session")
def tiny_t5():
    return load_model("tiny-t5")


def executed_ci_notebook(name: str) -> Path:
    """The chapter executed with params/ci (as `make test` leaves it), executing it if missing.

    The runner writes a chapter's file only once every cell has run, so a file found here is complete.
    """
    output = CI_BUILD / name
    if not output.is_file():
        notebook = ROOT / "notebooks" / name
        execute(notebook, output, resolve_parameters(notebook, "ci")[0])
    return output
