"""The pipeline's contracts: parameters cells, glued headline numbers, one-line errors."""

import math
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from fastmem import book
from fastmem.book import (ROOT, chapter_notebooks, glued_values, notebook_parameters, parameter_file, parameter_sets,
                          read_parameters, resolve_parameters)
from fastmem.errors import ParameterError
from fastmem.parameters import chapter_rules, check_parameters

from conftest import executed_ci_notebook

CHAPTER_1 = "01_value_derivation.ipynb"


@pytest.mark.parametrize("notebook", chapter_notebooks(), ids=lambda p: p.name)
def test_committed_chapter_follows_the_conventions(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "param_set = \"default\"" in code[0].source
    for line in code[0].source.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, literal = line.partition("=")
            compile(literal.strip(), "parameter", "eval")
            assert all(ch not in literal for ch in "()"), f"parameters must be literals: {line}"
    assert nb.metadata.kernelspec.name == "python3"
    assert any(c.get("outputs") for c in code), "committed without outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert glued_values(notebook), "no glued results"


def test_chapter_1_headline_numbers_on_ci_parameters():
    values = glued_values(executed_ci_notebook(CHAPTER_1))
    assert values["value_grad_max_abs_err"] < 1e-4
    assert -1 <= values["value_input_vs_output_cosine"] <= 1
    for site in ("post_norm", "pre_norm"):
        assert 0 <= values[f"flip_share_best_{site}"] <= 1
        assert values[f"alpha_flip50_{site}"] == "not reached" or values[f"alpha_flip50_{site}"] > 0
    assert values["value_remedy_chosen"].startswith("iterated")
    assert values["value_flip_share_best"] >= 0.9
    assert values["value_flip_share_best"] >= values["value_flip_share_single_step_read"] + 0.3
    assert values["value_target_rank_median"] > 10


def test_chapter_1_chooses_the_single_step_on_write_prompts_and_estimates_it_on_read_questions():
    values = glued_values(executed_ci_notebook(CHAPTER_1))
    site = values["value_single_step_site"]
    assert values["value_single_step_best_share"] == max(values["flip_share_best_post_norm"],
                                                         values["flip_share_best_pre_norm"])
    assert values["value_single_step_best_share"] == values[f"flip_share_best_{site}"]
    assert values["value_single_step_low"] <= values["value_single_step_share"] <= values["value_single_step_high"]
    # the earlier rules' Wilson interval on the best of the grid is still glued, so the plan can decide them
    assert values["value_single_step_best_low"] <= values["value_single_step_best_share"] <= values["value_single_step_best_high"]
    assert values["value_control_detected"] in ("yes", "no")


def test_committed_chapter_1_matches_the_issue_contract():
    values = glued_values(ROOT / "notebooks" / CHAPTER_1)
    assert values["value_grad_max_abs_err"] < 1e-4
    assert not math.isnan(values["value_input_vs_output_cosine"])
    assert {"alpha_flip50_post_norm", "alpha_flip50_pre_norm", "value_flip_share_best"} <= values.keys()


def _run_chapter(tmp_path, params: dict):
    params_file = tmp_path / "bad.yaml"
    params_file.write_text("".join(f"{k}: {v}\n" for k, v in params.items()))
    return subprocess.run(
        [sys.executable, "-m", "fastmem.book", str(ROOT / "notebooks" / CHAPTER_1),
         "--params", str(params_file), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("params, expected", [
    ({"model_name": "pythia-70m"}, "HubUnreachableError: EleutherAI/pythia-70m is not in the local cache"),
])
def test_a_failing_kernel_ends_with_one_clear_line(tmp_path, monkeypatch, params, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _run_chapter(tmp_path, params)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error in")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("notebook", [nb for nb in chapter_notebooks() if parameter_file(nb, "paper")], ids=lambda p: p.name)
def test_paper_parameters_stop_at_the_clear_offline_error(tmp_path, monkeypatch, notebook):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_name = read_parameters(parameter_file(notebook, "paper"))["model_name"]
    result = subprocess.run([sys.executable, "-m", "fastmem.book", str(notebook), "--params", "paper", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error in")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "HubUnreachableError" in errors[0] and model_name.split("-")[0] in errors[0].lower()


def test_missing_parameter_file_and_notebook_are_clear(tmp_path):
    with pytest.raises(ParameterError, match="not found"):
        read_parameters(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParameterError, match="mapping"):
        read_parameters(tmp_path / "list.yaml")
    result = subprocess.run([sys.executable, "-m", "fastmem.book", str(tmp_path / "nope.ipynb")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "notebook not found" in result.stderr


def test_glued_values_reads_what_myst_nb_writes(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("from myst_nb import glue\nglue('x', 0.25, display=False)\n"
                                              "glue('name', 'iterated', display=False)"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    from fastmem.book import execute
    out = tmp_path / "out.ipynb"
    path = tmp_path / "in.ipynb"
    nbformat.write(nb, str(path))
    execute(path, out)
    assert glued_values(out) == {"x": 0.25, "name": "iterated"}


def test_parallel_chapters_land_in_the_relative_out_folder(tmp_path):
    """--jobs runs chapters at once; each must be written where --out says, relative to the caller."""
    (tmp_path / "chapters").mkdir()
    names = ("a", "b", "c", "d")
    for name, seconds in zip(names, (0.5, 3, 0.5, 0.5)):  # chapters that overlap in time
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})"))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, str(tmp_path / "chapters" / f"{name}.ipynb"))
    result = subprocess.run([sys.executable, "-m", "fastmem.book", *(f"chapters/{n}.ipynb" for n in names),
                             "--out", "executed", "--jobs", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "executed").iterdir()) == [f"{n}.ipynb" for n in names]
    assert not (tmp_path / "chapters" / "executed").exists()



# ---------------------------------------------------------------------------- the runner's guards
def _runner(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastmem.book", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _only_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("params", ["nosuchset", "CI"])
def test_an_unknown_parameter_set_ends_at_once_listing_the_sets(tmp_path, params):
    result = _runner(ROOT / "notebooks" / CHAPTER_1, "--params", params, "--out", tmp_path)
    line = _only_line(result)
    assert result.returncode == 1 and f"unknown parameter set '{params}'" in line
    assert all(name in line for name in ("default", "ci", "paper"))
    # No kernel started: the runner announces each chapter it executes.
    assert "executing" not in result.stdout and not list(tmp_path.iterdir())


@pytest.mark.parametrize("params, expected", [
    ({"n_wrods": 12}, "unknown parameter for 01_value_derivation.ipynb: n_wrods (did you mean n_words?)"),
    ({"n_words": 0}, "parameter n_words = 0 is not allowed: an integer >= 1"),
    ({"n_words": -5}, "parameter n_words = -5 is not allowed: an integer >= 1"),
    ({"n_words": "'12'"}, "parameter n_words = '12' is not allowed: an integer >= 1"),
    ({"alphas": "[]"}, "parameter alphas = [] is not allowed: a non-empty list, each a finite number"),
    ({"model_name": "no-such-model"}, "parameter model_name = 'no-such-model' is not allowed: one of smollm2-135m"),
    ({"model_name": "./does/not/exist"}, "ModelFolderError: model folder './does/not/exist' does not exist"),
])
def test_bad_parameters_end_before_any_kernel_with_one_line(tmp_path, params, expected):
    params_file = tmp_path / "bad.yaml"
    params_file.write_text("".join(f"{k}: {v}\n" for k, v in params.items()))
    result = _runner(ROOT / "notebooks" / CHAPTER_1, "--params", params_file, "--out", tmp_path / "out")
    line = _only_line(result)
    assert result.returncode == 1 and expected in line, line
    assert "executing" not in result.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("notebook", chapter_notebooks(), ids=lambda p: p.name)
def test_every_parameter_is_declared_and_every_set_is_allowed(notebook):
    declared = chapter_rules(notebook.name[:2])
    assert set(notebook_parameters(notebook)) == set(declared)
    check_parameters(notebook.name[:2], notebook_parameters(notebook))
    for param_set in parameter_sets():
        if param_set == "default" or parameter_file(notebook, param_set):
            resolve_parameters(notebook, param_set)


def test_each_chapter_checks_its_parameters_right_after_the_parameters_cell():
    for notebook in chapter_notebooks():
        code = [c for c in nbformat.read(str(notebook), as_version=4).cells if c.cell_type == "code"]
        assert f'check_parameters("{notebook.name[:2]}", globals())' in code[1].source, notebook.name


def _write_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(sources[0], metadata={"tags": ["parameters"]}))
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources[1:]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_a_failed_run_leaves_the_target_untouched(tmp_path):
    notebook = _write_notebook(tmp_path / "chapter.ipynb", "n = 1", "raise ValueError('n is too small')")
    before = notebook.read_bytes()
    result = _runner(notebook)  # in place, as `make book` runs
    line = _only_line(result)
    assert result.returncode == 1 and "ValueError: n is too small" in line
    assert notebook.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chapter.ipynb"]
    result = _runner(notebook, "--out", tmp_path / "out")
    assert result.returncode == 1 and not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "with --out"])
def test_ctrl_c_ends_with_one_line_and_writes_nothing(tmp_path, in_place):
    started = tmp_path.parent / f"{tmp_path.name}.started"  # outside the folder checked below
    notebook = _write_notebook(tmp_path / "chapter.ipynb", "n = 1",
                               f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(60)")
    before = notebook.read_bytes()
    args = [sys.executable, "-m", "fastmem.book", str(notebook)] + ([] if in_place else ["--out", str(tmp_path / "out")])
    # A shell's background job starts with Ctrl-C ignored, and children inherit that: give the runner
    # the default disposition a reader's terminal gives it.
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:  # the kernel is inside the sleeping cell
        time.sleep(0.1)
    assert started.exists(), "the chapter never reached its sleeping cell"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted"), stderr[-2000:]
    assert notebook.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["chapter.ipynb"]


def test_parallel_runs_start_with_the_longest_recorded_chapters(tmp_path):
    from fastmem.book import longest_first

    names = {"short": 5.0, "never": None, "long": 600.0}
    for name, duration in names.items():
        notebook = _write_notebook(tmp_path / f"{name}.ipynb", "n = 1")
        if duration is not None:
            nb = nbformat.read(str(notebook), as_version=4)
            nb.metadata["papermill"] = {"duration": duration}
            nbformat.write(nb, str(notebook))
    notebooks = [tmp_path / f"{n}.ipynb" for n in names]
    assert [n.stem for n in longest_first(notebooks)] == ["long", "short", "never"]
    # The order of the workers' "executing" lines is a race between processes, so the run itself is
    # checked only for writing every chapter.
    result = _runner(*notebooks, "--out", tmp_path / "out", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.ipynb")) == ["long.ipynb", "never.ipynb", "short.ipynb"]


def test_an_executed_chapter_records_where_and_with_what_it_ran(tmp_path):
    from fastmem.book import execute

    notebook = _write_notebook(tmp_path / "chapter.ipynb", "param_set = 'default'\nn = 1")
    out = execute(notebook, tmp_path / "out" / "chapter.ipynb", {"param_set": "mine", "n": 2})
    record = nbformat.read(str(out), as_version=4).metadata["fastmem"]
    assert record["param_set"] == "mine" and record["python"].startswith("3.")
    assert {"torch", "transformers", "fastmem"} <= record["packages"].keys()


def test_a_relative_model_folder_is_found_from_where_the_runner_was_called(tmp_path, monkeypatch):
    # The kernel runs in the notebook's folder, so the runner passes the folder on as an absolute path.
    (tmp_path / "my-model").mkdir()
    (tmp_path / "set.yaml").write_text("model_name: ./my-model\n")
    monkeypatch.chdir(tmp_path)
    given, _ = book.resolve_parameters(ROOT / "notebooks" / CHAPTER_1, str(tmp_path / "set.yaml"))
    assert given["model_name"] == str(tmp_path / "my-model")


def test_the_runner_checks_parameters_without_importing_torch():
    # Checking a parameter set must not wait for torch: bad input ends in a fraction of a second.
    code = "import sys, fastmem.book; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("delay", [0.0, 0.5, 1.0, 1.5, 2.0])
def test_ctrl_c_while_the_kernel_starts_ends_with_one_line(tmp_path, delay):
    # Whatever moment of the kernel's start Ctrl-C hits (it may kill the kernel half-started), the
    # reader sees one line and nothing is written.
    notebook = _write_notebook(tmp_path / "chapter.ipynb", "n = 1", "import time\ntime.sleep(60)")
    before = notebook.read_bytes()
    process = subprocess.Popen([sys.executable, "-m", "fastmem.book", str(notebook)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("executing"):
            break
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130 and lines == ["interrupted: chapter.ipynb not written"], stderr[-2000:]
    assert notebook.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["chapter.ipynb"]
