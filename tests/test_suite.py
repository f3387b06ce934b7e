"""Chapter 5: the minimal benchmark run on every memory, each served inside the forward pass."""

import numpy as np

from fastmem.benchmark import answer_changes
from fastmem.book import ROOT, execute, glued_values, resolve_parameters
from fastmem.verdicts import TRUE_BY_CONSTRUCTION, VERDICTS

from conftest import executed_ci_notebook

CHAPTER_5 = "05_suite.ipynb"
MEMORIES = ("attractor", "binding_gated", "binding_top1", "latent")


def test_answer_changes_count_changed_texts_beside_the_sign_test_of_f1():
    plain = {"answers": ["Paris", "red", "in May", "two"], "f1": np.array([1.0, 0.0, 0.5, 0.0])}
    other = {"answers": ["Paris", "blue", "May", "three"], "f1": np.array([1.0, 1.0, 0.5, 0.0])}
    moved = answer_changes(plain, other)
    # three texts changed; one of them for the better, two with the same F1 (ties: not in the sign test)
    assert moved == {"better": 1, "worse": 0, "unchanged": 3, "p_value": 1.0, "changed": 3}


def test_chapter_5_on_ci_parameters():
    values = glued_values(executed_ci_notebook(CHAPTER_5))
    n = values["suite_n_comprehension"]
    for memory in MEMORIES:
        assert values[f"suite_verdict_{memory}"] in VERDICTS, memory
        assert 0 <= values[f"suite_changed_{memory}"] <= n, memory
        assert values[f"suite_ppl_{memory}"].endswith("]"), memory
        assert isinstance(values[f"suite_ppl_block_length_{memory}"], int), memory
    # the binding memory never acts where perplexity scores: its losses are bit-identical, true by construction
    for memory in ("binding_gated", "binding_top1"):
        assert values[f"suite_ppl_identical_{memory}"] == "yes", memory
        assert values[f"suite_verdict_{memory}"] == TRUE_BY_CONSTRUCTION, memory
    assert values["suite_control_detected"] in ("yes", "no")
    # the served binding memory acts where it is built to: a path cut would leave reads at the plain level
    assert values["suite_binding_read_gated"] >= values["suite_binding_read_plain"] + 0.3
    # the gate keeps the memory out of text it stores nothing for
    assert values["suite_changed_binding_top1"] >= values["suite_changed_binding_gated"] + 1


def test_chapter_5_runs_unmodified_on_the_paper_architecture(tmp_path):
    """params/paper/05.yaml names Pythia-70M (hub only): its GPT-NeoX code paths, on random weights."""
    notebook = ROOT / "notebooks" / CHAPTER_5
    parameters = {**resolve_parameters(notebook, "ci")[0], "model_name": "tiny-gpt-neox", "attractor_layer": 1,
                  "binding_layer": 1, "write_block": 1, "inject_block": 1, "key_dim": 16,
                  "param_set": "tiny-paper-architecture"}
    values = glued_values(execute(notebook, tmp_path / notebook.name, parameters))
    for memory in MEMORIES:
        assert values[f"suite_verdict_{memory}"] in VERDICTS, memory
