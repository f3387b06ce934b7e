"""Book plumbing: run labels, glued results and the notebook runner (book page "Re-running a chapter").

Chapters record headline numbers with ``myst_nb.glue(name, value, display=False)``;
:func:`glued_values` reads them back from an executed notebook, and ``python -m fastmem.book``
executes chapters with a parameter set, ending any failure with one clear line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import nbformat
import yaml

from .errors import ModelFolderError, ParameterError, missing_model_folder
from .names import is_model_folder_name
from .parameters import check_names, check_parameters, parameters_cell_values

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
PARAMS_DIR = ROOT / "params"
FAILED_DIR = ROOT / "_build" / "failed"
LOG_DIR = ROOT / "_build" / "logs"


def run_label(model_label: str, param_set: str) -> str:
    """The line every figure and table carries: which model and parameter set produced it."""
    return f"model: {model_label} · parameters: {param_set}"


def glued_values(path: Path | str) -> dict:
    """Every value glued in an executed notebook, by name, as Python literals where possible."""
    values = {}
    for cell in nbformat.read(str(path), as_version=4).cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            text = next((v for k, v in output["data"].items() if k.endswith("text/plain")), None)
            try:
                values[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                values[name] = text
    return values


def chapter_notebooks() -> list[Path]:
    """The chapters, in order (``notebooks/NN_*.ipynb``)."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameter_sets() -> list[str]:
    """The names ``--params`` accepts besides a YAML file: ``default`` and every folder under ``params/``."""
    return ["default", *sorted(p.name for p in PARAMS_DIR.iterdir() if p.is_dir())]


def parameter_file(notebook: Path, param_set: str) -> Path | None:
    """``params/<set>/NN.yaml`` for a chapter, or None for the notebook's own defaults."""
    if param_set == "default":
        return None
    path = PARAMS_DIR / param_set / f"{notebook.name[:2]}.yaml"
    return path if path.is_file() else None


def read_parameters(path: Path | str) -> dict:
    """Parameters from a YAML file, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"parameter file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParameterError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter names to values")
    return params


def recorded_minutes(notebook: Path) -> float:
    """How long the notebook's last recorded execution took (papermill's metadata), 0 if never executed."""
    return _minutes(nbformat.read(str(notebook), as_version=4).metadata)


def _minutes(metadata: dict) -> float:
    return (metadata.get("papermill", {}).get("duration") or 0.0) / 60


def longest_first(notebooks: list[Path]) -> list[Path]:
    """The order in which ``--jobs`` starts chapters: longest last recorded run first, so no long one starts last."""
    return sorted(notebooks, key=lambda notebook: -recorded_minutes(notebook))


def notebook_parameters(notebook: Path) -> dict:
    """The names and default values of a notebook's ``parameters`` cell (empty if it has none)."""
    for cell in nbformat.read(str(notebook), as_version=4).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return parameters_cell_values(cell.source)
    return {}


def resolve_parameters(notebook: Path, params: str) -> tuple[dict, str]:
    """The checked parameters to inject into ``notebook`` and the run's label, before any kernel starts.

    ``params`` is ``default``, a set under ``params/`` or a YAML file. Unknown set names, parameter
    names the notebook does not have and values its chapter does not allow each end with one line.
    """
    if not notebook.is_file():
        raise ParameterError(f"notebook not found: {notebook}")
    if params.endswith((".yaml", ".yml")):
        given, param_set = read_parameters(params), Path(params).stem
    elif params in parameter_sets():
        path = parameter_file(notebook, params)
        if params != "default" and path is None:
            raise ParameterError(f"parameter set '{params}' has no file for {notebook.name} "
                                 f"(expected {PARAMS_DIR.name}/{params}/{notebook.name[:2]}.yaml)")
        given, param_set = (read_parameters(path) if path else {}), params
    else:
        raise ParameterError(f"unknown parameter set '{params}': use one of {', '.join(parameter_sets())} "
                             "or a YAML file")
    defaults = notebook_parameters(notebook)
    if given and not defaults:
        raise ParameterError(f"{notebook.name} has no parameters cell, so it takes no parameters")
    check_names(given, defaults, notebook.name)
    given = {name: _model_folder_from_here(value) if name.endswith("model_name") else value
             for name, value in given.items()}
    if param_set != "default":
        given.setdefault("param_set", param_set)
    check_parameters(notebook.name[:2], {**defaults, **given})
    return given, param_set


def _model_folder_from_here(value):
    """A model given as a local folder, found from where the runner was called (not from the notebook's
    folder, where the kernel runs) and checked before any kernel starts; other names pass unchanged."""
    if not (isinstance(value, str) and is_model_folder_name(value)):
        return value
    folder = Path(value).expanduser().absolute()
    if not folder.exists():
        raise missing_model_folder(value, folder)
    return str(folder)


def execute(notebook: Path, output: Path, parameters: dict | None = None) -> Path:
    """Execute ``notebook`` with papermill (kernel ``python3``) into ``output``, which appears only on success.

    The run writes to a hidden file beside ``output`` and renames it into place when every cell
    has run, so an interrupted or failed run never touches ``output`` (the committed chapter, in
    place) and never leaves a file that looks complete. A failed run's copy is kept under
    ``_build/failed/`` for inspection.
    """
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial{output.suffix}")
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters=dict(parameters or {}), kernel_name="python3",
            cwd=str(notebook.parent), progress_bar=False,
        )
    except BaseException as error:
        from papermill.exceptions import PapermillExecutionError

        if isinstance(error, PapermillExecutionError) and partial.is_file():
            FAILED_DIR.mkdir(parents=True, exist_ok=True)
            os.replace(partial, FAILED_DIR / output.name)
        partial.unlink(missing_ok=True)
        raise
    _record_run(partial, parameters)
    os.replace(partial, output)
    return output


def run_record(parameters: dict | None = None) -> dict:
    """Where and with what a chapter was executed: the book's status page reads it from each chapter."""
    import platform
    from datetime import datetime, timezone
    from importlib.metadata import version

    import torch

    return {
        "param_set": (parameters or {}).get("param_set", "default"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "threads": os.environ.get("OMP_NUM_THREADS", "not set"),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in ("fastmem", "torch", "transformers", "numpy", "scipy")},
    }


NOT_RECORDED = "not recorded"


def run_status(notebook: Path | str) -> dict[str, str]:
    """One row of the book's status page: how a committed notebook was last executed, as display text.

    Reads the notebook's own metadata (:func:`run_record` and papermill's duration); a field the
    notebook does not carry reads ``not recorded``, so a chapter committed without a run record shows.
    """
    metadata = nbformat.read(str(notebook), as_version=4).metadata
    record, minutes = metadata.get("fastmem", {}), _minutes(metadata)
    packages = record.get("packages", {})
    versions = ([f"Python {record['python']}"] if "python" in record else []) + [
        f"{name} {version}" for name, version in packages.items()]
    return {
        "run_time": f"{minutes:.1f} min" if minutes else NOT_RECORDED,
        "date": record["finished"][:10] if "finished" in record else NOT_RECORDED,  # the ISO date part
        "param_set": record.get("param_set", NOT_RECORDED),
        "threads": record.get("threads", NOT_RECORDED),
        "machine": record.get("machine", NOT_RECORDED),
        "versions": ", ".join(versions) or NOT_RECORDED,
    }


def _record_run(path: Path, parameters: dict | None) -> None:
    nb = nbformat.read(str(path), as_version=4)
    nb.metadata["fastmem"] = run_record(parameters)
    nbformat.write(nb, str(path))


def _one_line(error: BaseException) -> str:
    """The last line of a papermill traceback names the exception; that is what the reader needs."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        return f"{error.ename}: {error.evalue} (the executed copy is in {FAILED_DIR.relative_to(ROOT)}/)"
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's standard error, which the kernel inherits, to ``path`` while a chapter runs.

    The kernel logs its own start, interrupts and shutdown there; the reader's terminal keeps the
    runner's lines only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("w") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _run_one(notebook: Path, parameters: dict, param_set: str, out: str | None) -> str | None:
    """Execute one chapter; None on success, else the one line that says what went wrong."""
    output = Path(out) / notebook.name if out else notebook
    print(f"executing {notebook.relative_to(ROOT) if notebook.is_relative_to(ROOT) else notebook} "
          f"with parameters '{param_set}' -> {output}", flush=True)
    started = time.perf_counter()
    try:
        with _stderr_to(LOG_DIR / f"{notebook.stem}.log"):
            execute(notebook, output, parameters)
    except KeyboardInterrupt:
        # Ctrl-C while the kernel starts kills it, and the client's orphaned task reports that death
        # through asyncio's logger when it is collected, after this line: the reader pressed Ctrl-C,
        # so the one line below says all there is.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return f"interrupted: {notebook.name} not written"
    except Exception as error:  # noqa: BLE001 - every failure ends as one line naming the chapter
        return f"error in {notebook}: {_one_line(error)}"
    print(f"done {notebook.name} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmem.book", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="chapters to run (default: all)")
    parser.add_argument("--params", default="default",
                        help="'default' (the notebook's own values), a set under params/ (ci, paper) or a YAML file")
    parser.add_argument("--out", default=None, help="folder for executed copies (default: in place)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="chapters executed at once (each kernel should then use fewer threads: OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 1
    # Absolute paths before anything runs: papermill changes the working directory while it executes.
    notebooks = [Path(n).resolve() for n in args.notebooks] or chapter_notebooks()
    if args.jobs > 1:
        notebooks = longest_first(notebooks)
    params = str(Path(args.params).resolve()) if args.params.endswith((".yaml", ".yml")) else args.params
    out = str(Path(args.out).resolve()) if args.out else None
    runs = []
    for notebook in notebooks:  # every chapter's parameters are checked before the first kernel starts
        try:
            runs.append((notebook, *resolve_parameters(notebook, params), out))
        except (ParameterError, ModelFolderError) as error:
            print(f"error in {notebook}: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    try:
        if args.jobs == 1:
            for run in runs:
                error = _run_one(*run)
                if error:
                    print(error, file=sys.stderr)
                    return 130 if error.startswith("interrupted") else 1
            return 0
        from concurrent.futures import ProcessPoolExecutor

        # Processes, not threads: the working directory papermill sets is shared by every thread of a process.
        with ProcessPoolExecutor(args.jobs) as pool:
            errors = [e for e in pool.map(_run_one, *zip(*runs)) if e]
    except KeyboardInterrupt:
        print("interrupted: the chapters that had not finished were not written", file=sys.stderr)
        return 130
    for error in errors:
        print(error, file=sys.stderr)
    return 130 if any(e.startswith("interrupted") for e in errors) else 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
