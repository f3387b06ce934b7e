"""The book's status page: every committed chapter carries its run record, and the table shows it."""

import re
import subprocess
import sys

import nbformat
import pytest

from fastmem.book import NOT_RECORDED, ROOT, chapter_notebooks, run_status

RECORD = {"param_set": "ci", "finished": "2026-01-02T03:04:05+00:00", "machine": "x86_64, 2 CPU cores, no GPU",
          "threads": "1", "python": "3.11.7", "packages": {"numpy": "2.4.6", "torch": "2.13.0+cpu"}}


@pytest.mark.parametrize("notebook", chapter_notebooks(), ids=lambda p: p.name)
def test_committed_chapter_records_its_run(notebook):
    missing = [field for field, value in run_status(notebook).items() if value == NOT_RECORDED]
    assert not missing, (f"{notebook.name} has no {', '.join(missing)} in its metadata: "
                         "execute it with `python -m fastmem.book` before committing")


def test_status_table_shows_each_record_and_marks_a_missing_one(tmp_path):
    recorded = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Recorded chapter")])
    recorded.metadata.update(fastmem=RECORD, papermill={"duration": 90.0})
    nbformat.write(recorded, tmp_path / "01_recorded.ipynb")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Bare chapter")]),
                   tmp_path / "02_bare.ipynb")
    (tmp_path / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\n"
        "extensions = ['myst_nb', 'run_status']\nnb_execution_mode = 'off'\n")
    (tmp_path / "index.md").write_text("# Status\n\n```{run-status} [0-9][0-9]_*.ipynb\n```\n\n"
                                       "```{toctree}\n01_recorded\n02_bare\n```\n")
    build = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", str(tmp_path),
                            str(tmp_path / "_html")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    html = (tmp_path / "_html" / "index.html").read_text()
    cells = r"<t[dh][^>]*>(.*?)</t[dh]>"
    rows = [[" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in re.findall(cells, row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S)]
    assert rows == [
        ["Chapter", "Last run (UTC)", "Parameter set", "Machine, threads, versions"],
        ["Recorded chapter", "2026-01-02 1.5 min", "ci",
         "x86_64, 2 CPU cores, no GPU threads: 1 Python 3.11.7, numpy 2.4.6, torch 2.13.0+cpu"],
        ["Bare chapter", f"{NOT_RECORDED} {NOT_RECORDED}", NOT_RECORDED,
         f"{NOT_RECORDED} threads: {NOT_RECORDED} {NOT_RECORDED}"],
    ]
    assert 'href="01_recorded.html"' in html
