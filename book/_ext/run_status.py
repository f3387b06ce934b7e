"""Sphinx directive ``run-status``: a table of how each chapter's committed notebook was last executed.

The rows are read at build time from the notebooks' own metadata (:func:`fastmem.book.run_status`),
so the status page always describes the notebooks the book renders; nothing is typed or generated
into the repository. Usage in MyST, with a glob relative to the page::

    ```{run-status} ../notebooks/[0-9][0-9]_*.ipynb
    ```
"""

from glob import glob
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

from fastmem.book import run_status

COLUMNS = ["Chapter", "Last run (UTC)", "Parameter set", "Machine, threads, versions"]


class RunStatus(SphinxDirective):
    required_arguments = 1

    def run(self):
        page_dir = Path(self.env.doc2path(self.env.docname)).parent
        notebooks = sorted(Path(p).resolve() for p in glob(str(page_dir / self.arguments[0])))
        if not notebooks:
            raise self.error(f"run-status: no notebook matches {self.arguments[0]}")
        table = nodes.table()
        group = nodes.tgroup(cols=len(COLUMNS))
        table += group
        group.extend(nodes.colspec(colwidth=1) for _ in COLUMNS)
        group += nodes.thead("", self._row([[title] for title in COLUMNS]))
        body = nodes.tbody()
        for notebook in notebooks:
            # Re-read this page whenever a chapter is re-executed and committed.
            self.env.note_dependency(str(notebook))
            status = run_status(notebook)
            # Related fields share a column, a line each, so the table fits the text column.
            body += self._row([[self._chapter_link(notebook)], [status["date"], status["run_time"]],
                               [status["param_set"]],
                               [status["machine"], f"threads: {status['threads']}", status["versions"]]])
        group += body
        return [table]

    def _chapter_link(self, notebook: Path) -> nodes.Node:
        """A link titled with the chapter's own heading (resolved by Sphinx, as ``{doc}`` does)."""
        docname = self.env.path2doc(str(notebook))
        if docname is None:  # a notebook outside the book: name its file
            return nodes.literal(text=notebook.name)
        link = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/" + docname,
                                     refdoc=self.env.docname, refexplicit=False, refwarn=True)
        link += nodes.inline(text=docname)
        return link

    @staticmethod
    def _row(cells: list[list]) -> nodes.row:
        """A table row; each cell is a list of lines (text or nodes), one paragraph each."""
        row = nodes.row()
        for lines in cells:
            entry = nodes.entry()
            entry.extend(nodes.paragraph("", "", line if isinstance(line, nodes.Node) else nodes.Text(line))
                         for line in lines)
            row += entry
        return row


def setup(app):
    app.add_directive("run-status", RunStatus)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
