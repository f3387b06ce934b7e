"""The built book in a real browser: every page of `_toc.yml`, opened in Chromium as a reader opens it.

The committed notebooks are rendered (not executed) into a temporary folder, served on localhost
and loaded one page per test, so a failure names the page and the elements at fault; the build's
warnings fail a test of their own. The checks themselves are tested first on small local pages:
one clean, one breaking every rule, one whose download link is stale.
"""

import functools
import http.server
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from fastmem.book import ROOT

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling Google services, which a closed
# network refuses; none of that is the book's doing, so it must not reach the console checks.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = "install Debian's Chromium with `apt-get install -y chromium` (.ci/run does this)"
TOLERANCE_PX = 2  # sub-pixel rounding of widths
EXAMPLES = 5  # elements named per kind of problem; the count covers the rest

# Runs in the page once it has loaded and MathJax has typeset: [kind, the element's text start] pairs.
CHECKS_JS = """() => {
  const found = [];
  const start = el => (el.innerText || el.textContent || el.getAttribute('src') || el.outerHTML)
    .trim().replace(/\\s+/g, ' ').slice(0, 60);
  const article = document.querySelector('.bd-article') || document.querySelector('article') || document.body;
  const style = getComputedStyle(article);
  const column = article.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  for (const img of document.images)
    if (img.naturalWidth === 0) found.push(['image did not load', img.getAttribute('src')]);
  // Visible prose only: a code block may show glue syntax on purpose, a reader's text may not.
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode());) {
    const at = node.data.indexOf('{glue');
    if (at >= 0 && !node.parentElement.closest('pre, code'))
      found.push(['{glue placeholder in the text', node.data.slice(at, at + 60)]);
  }
  for (const fig of article.querySelectorAll('figure')) {
    const caption = fig.querySelector('figcaption');
    if (!caption || !caption.innerText.trim())
      found.push(['figure without caption', start(fig.querySelector('img') || fig)]);
  }
  for (const img of article.querySelectorAll('.cell_output img')) {
    const caption = img.closest('figure') && img.closest('figure').querySelector('figcaption');
    if (!caption) found.push(['output image outside a captioned figure', img.getAttribute('src')]);
  }
  // A hidden (folded) element has scrollWidth 0: what a reader sees on opening the page is checked.
  for (const el of article.querySelectorAll('table, pre'))
    if (el.scrollWidth > column + %(tolerance)d)
      found.push([`${el.tagName === 'TABLE' ? 'table' : 'code block'} wider than its column`,
                  `${el.scrollWidth} px > ${Math.round(column)} px: ${start(el)}`]);
  for (const math of article.querySelectorAll('.math'))
    if (!math.querySelector('mjx-container')) found.push(['math not rendered', start(math)]);
  for (const glued of article.querySelectorAll('.pasted-text, .pasted-inline'))
    if (!glued.innerText.trim()) found.push(['glued value empty', start(glued.parentElement)]);
  const download = document.querySelector('.dropdown-download-buttons a[href*="_sources/"]');
  if (!download) found.push(['no download button for the page source', location.pathname]);
  return {found, download: download && download.href};
}""" % {"tolerance": TOLERANCE_PX}


def toc_pages() -> list[str]:
    """Every page of the book, as its path in the built site (``book/intro.html``), in toc order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())

    def files(entries):
        for entry in entries:
            if "file" in entry:
                yield entry["file"]
            yield from files(entry.get("chapters", []) + entry.get("sections", []))

    return [f"{page}.html" for page in [toc["root"], *files(toc.get("parts", []) + toc.get("chapters", []))]]


def page_problems(browser, url: str) -> dict[str, list[str]]:
    """What a reader would meet on the page at ``url``: problems by kind, each naming its element."""
    problems = defaultdict(list)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda message: message.type == "error"
            and problems["console error"].append(f"{message.text[:200]} ({message.location.get('url')})"))
    page.on("pageerror", lambda error: problems["console error"].append(str(error)[:200]))
    page.on("requestfailed", lambda request: problems["failed request"].append(f"{request.url} ({request.failure})"))
    page.on("response", lambda response: response.status >= 400
            and problems["failed request"].append(f"{response.url} (HTTP {response.status})"))
    try:
        page.goto(url, wait_until="load")
        page.wait_for_load_state("networkidle")
        # MathJax typesets after load; startup.promise resolves when the page's math is done.
        page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
        result = page.evaluate(CHECKS_JS)
        for kind, element in result["found"]:
            problems[kind].append(element)
        if result["download"]:
            status = page.request.get(result["download"]).status
            if status != 200:
                problems["download button broken"].append(f"{result['download']} (HTTP {status})")
    finally:
        page.close()
    return dict(problems)


def describe(problems: dict[str, list[str]]) -> str:
    return "\n".join(f"  {kind} ({len(items)}): " + " | ".join(items[:EXAMPLES])
                     + (f" | ... {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")
                     for kind, items in problems.items())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports failed requests itself
        pass


@pytest.fixture(scope="session")
def serve():
    """Serve a folder on localhost for the session; returns its base URL."""
    servers = []

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(_QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright; a missing browser fails every test here, in CI and locally."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[test]'", pytrace=False)
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as error:  # noqa: BLE001 - any launch failure means the same thing to the reader
        reason, chromium = str(error).splitlines()[0], None
    if chromium is None:  # failed outside the except block, so the message is one line, not a chain
        playwright.stop()
        pytest.fail(f"cannot start Chromium at {CHROMIUM} ({reason}): {INSTALL_HINT}", pytrace=False)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> tuple[Path, str]:
    """The committed book rendered as `make html` does, into a temporary folder: its HTML and its warnings.

    About 10 s: nothing is executed. Warnings do not stop the build, so every page is still checked.
    """
    out = tmp_path_factory.mktemp("book")
    started = time.perf_counter()
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--nitpick",
                            "--path-output", str(out)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"jupyter-book build failed:\n{(build.stdout + build.stderr)[-3000:]}", pytrace=False)
    print(f"book built in {time.perf_counter() - started:.0f} s")
    return out / "_build" / "html", build.stderr


@pytest.fixture(scope="session")
def book_url(built_book, serve):
    return serve(built_book[0])


PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6364f8ffff3f0005fe02fea7d6a5"
                        "2c0000000049454e44ae426082")
# An empty icon, or Chromium asks the server for /favicon.ico.
CLEAN_PAGE = """<html><head><link rel="icon" href="data:,"><script src="mathjax/tex-svg.js" defer></script></head><body>
<article class="bd-article" style="width: 400px; padding: 0 10px">
<div class="dropdown-download-buttons"><a href="_sources/clean.md">.md</a></div>
<p>The value is <span class="pasted-text">0.42</span>, and <span class="math">\\(x^2\\)</span>.</p>
<pre>short()</pre><pre>{glue:text}`in a code block is fine`</pre>
<table><tr><td>narrow</td></tr></table>
<div class="cell_output"><figure><img src="dot.png" alt="a dot"><figcaption>Figure 1. A dot.</figcaption></figure></div>
</article></body></html>"""
BROKEN_PAGE = """<html><head><script>console.error("boom")</script></head><body>
<article class="bd-article" style="width: 400px; padding: 0 10px">
<p>The value is {glue:text}`forgotten` and <span class="pasted-text"></span>;
math <span class="math">\\(x^2\\)</span>.</p>
<pre>%(long)s</pre>
<table><tr><td>%(long)s</td></tr></table>
<figure><img src="dot.png" alt="no caption"></figure>
<div class="cell_output"><img src="dot.png" alt="bare output"></div>
<img src="missing.png" alt="gone">
</article></body></html>""" % {"long": "x" * 200}
STALE_DOWNLOAD_PAGE = """<html><head><link rel="icon" href="data:,"></head><body><article class="bd-article">
<div class="dropdown-download-buttons"><a href="_sources/gone.md">.md</a></div><p>Text.</p>
</article></body></html>"""


@pytest.fixture(scope="session")
def fixture_url(tmp_path_factory, serve):
    folder = tmp_path_factory.mktemp("pages")
    (folder / "clean.html").write_text(CLEAN_PAGE)
    (folder / "broken.html").write_text(BROKEN_PAGE)
    (folder / "stale.html").write_text(STALE_DOWNLOAD_PAGE)
    (folder / "dot.png").write_bytes(PNG_1PX)
    (folder / "_sources").mkdir()
    (folder / "_sources" / "clean.md").write_text("# Clean\n")
    (folder / "mathjax").symlink_to(ROOT / "book" / "_static" / "mathjax")
    return serve(folder)


def test_checks_pass_a_clean_page(browser, fixture_url):
    assert page_problems(browser, f"{fixture_url}/clean.html") == {}


def test_checks_catch_every_broken_rule(browser, fixture_url):
    problems = page_problems(browser, f"{fixture_url}/broken.html")
    assert problems.keys() == {
        "console error", "failed request", "image did not load", "{glue placeholder in the text",
        "glued value empty", "figure without caption", "output image outside a captioned figure",
        "code block wider than its column", "table wider than its column", "math not rendered",
        "no download button for the page source"}, describe(problems)
    assert any(message.startswith("boom") for message in problems["console error"])  # events arrive in any order
    assert problems["{glue placeholder in the text"] == ["{glue:text}`forgotten` and "]
    assert problems["figure without caption"] == ["dot.png"]
    assert int(problems["code block wider than its column"][0].split()[0]) > 400


def test_checks_catch_a_download_button_whose_file_is_missing(browser, fixture_url):
    problems = page_problems(browser, f"{fixture_url}/stale.html")
    assert problems == {"download button broken": [f"{fixture_url}/_sources/gone.md (HTTP 404)"]}


def test_book_builds_without_a_warning(built_book):
    # Jupyter Book colours its log even into a pipe; the escapes would garble the message.
    warnings = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in built_book[1].splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)


@pytest.mark.parametrize("page", toc_pages())
def test_page_reads_cleanly_in_a_browser(browser, book_url, page):
    problems = page_problems(browser, f"{book_url}/{page}")
    assert not problems, f"{page}:\n{describe(problems)}"
