"""Shared fixtures: models are loaded once per session; executed CI notebooks are reused."""

from pathlib import Path

import pytest

from fastmem.book import ROOT, execute, parameter_file, read_parameters
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
    """The chapter executed with params/ci (as `make test` leaves it), executing it if missing."""
    output = CI_BUILD / name
    if not output.is_file():
        notebook = ROOT / "notebooks" / name
        execute(notebook, output, read_parameters(parameter_file(notebook, "ci")), "ci")
    return output
