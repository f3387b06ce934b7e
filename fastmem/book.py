"""Book plumbing: run labels, glued results and the notebook runner (book page "Re-running a chapter").

Chapters record headline numbers with ``myst_nb.glue(name, value, display=False)``;
:func:`glued_values` reads them back from an executed notebook, and ``python -m fastmem.book``
executes chapters with a parameter set, ending any failure with one clear line.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import nbformat
import yaml

from .errors import ParameterError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
PARAMS_DIR = ROOT / "params"


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


def execute(notebook: Path, output: Path, parameters: dict | None = None, param_set: str = "default") -> Path:
    """Execute ``notebook`` with papermill (kernel ``python3``) into ``output``."""
    import papermill

    parameters = dict(parameters or {})
    if param_set != "default":
        parameters.setdefault("param_set", param_set)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name="python3",
        cwd=str(notebook.parent), progress_bar=False,
    )
    return output


def _one_line(error: BaseException) -> str:
    """The last line of a papermill traceback names the exception; that is what the reader needs."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        return f"{error.ename}: {error.evalue}"
    return f"{type(error).__name__}: {error}"


def _run_one(notebook: Path, params: str, out: str | None) -> str | None:
    """Execute one chapter; None on success, else the one line that says what went wrong."""
    try:
        if not notebook.is_file():
            raise ParameterError(f"notebook not found: {notebook}")
        if params.endswith((".yaml", ".yml")):
            parameters, param_set = read_parameters(params), Path(params).stem
        else:
            path = parameter_file(notebook, params)
            parameters, param_set = (read_parameters(path) if path else {}), params
        output = Path(out) / notebook.name if out else notebook
        print(f"executing {notebook} with parameters '{param_set}' -> {output}", flush=True)
        execute(notebook.resolve(), output.resolve(), parameters, param_set)
    except Exception as error:  # noqa: BLE001 - every failure ends as one line naming the chapter
        return f"error in {notebook}: {_one_line(error)}"
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
    # Absolute paths before anything runs: papermill changes the working directory while it executes.
    notebooks = [Path(n).resolve() for n in args.notebooks] or chapter_notebooks()
    params = str(Path(args.params).resolve()) if args.params.endswith((".yaml", ".yml")) else args.params
    out = str(Path(args.out).resolve()) if args.out else None
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 1
    if args.jobs == 1:
        for notebook in notebooks:
            error = _run_one(notebook, params, out)
            if error:
                print(error, file=sys.stderr)
                return 1
        return 0
    from concurrent.futures import ProcessPoolExecutor

    # Processes, not threads: the working directory papermill sets is shared by every thread of a process.
    with ProcessPoolExecutor(args.jobs) as pool:
        errors = [e for e in pool.map(_run_one, notebooks, [params] * len(notebooks), [out] * len(notebooks)) if e]
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
