"""The book (book/, built by `make site` with Sphinx + myst-nb), without and then with a browser.

Without a browser: every notebook has a page in the sidebar in order, with previous/next links; every
exercise's solution is folded behind a toggle; nothing would be fetched from another host; the build
needs no Node/npm; the workshop track page agrees with the learner copies that `make workshop` writes.

In a browser: Playwright drives a Chromium that is already on the machine (no `playwright install`):
$CHROMIUM, or `chromium` / `chromium-browser` / `google-chrome` on PATH, or Chrome/Chromium in
/Applications on macOS. Every request the pages make is recorded, and any that is not for the local
server is blocked and fails the test. Without a Chromium the test skips on a laptop with a message
saying how to get one, and FAILS on CI (CI=true), where `make ci-deps` installs Debian's.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


book_build = _load("book_build", ROOT / "book" / "build.py")
ppo_book = _load("ppo_book", ROOT / "book" / "_ext" / "ppo_book.py")
workshop = _load("workshop_tool", ROOT / "tools" / "workshop.py")


def _exercise_cells(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and ppo_book.BEGIN in "".join(c["source"])]


class _Page(HTMLParser):
    """The hrefs of <a> by class, <link rel> targets, and the <details> toggles of one page."""

    def __init__(self, text: str):
        super().__init__()
        self.a: list[dict] = []
        self.rel: dict[str, str] = {}
        self.details: list[str] = []
        self._in_details = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.a.append(attrs)
        elif tag == "link" and attrs.get("rel") in ("prev", "next"):
            self.rel[attrs["rel"]] = attrs["href"]
        elif tag == "details":
            self._in_details += 1
            self.details.append("")

    def handle_endtag(self, tag):
        if tag == "details":
            self._in_details -= 1

    def handle_data(self, data):
        if self._in_details:
            self.details[-1] += data

    def hrefs(self, cls: str) -> list[str]:
        return [a["href"] for a in self.a if cls in (a.get("class") or "").split()]


# ---------------------------------------------------------------- the build, without a browser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The book built from every notebook, with no npm or node reachable (an empty PATH)."""
    if not NOTEBOOKS:
        pytest.fail("no notebooks/[0-9]*.ipynb to build the book from")
    tmp = tmp_path_factory.mktemp("book")
    (tmp / "empty-bin").mkdir()
    return book_build.build(tmp / "site", env={**os.environ, "PATH": str(tmp / "empty-bin")})


def _page(site: Path, nb: Path) -> Path:
    return site / "notebooks" / (nb.stem + ".html")


def test_every_notebook_in_the_sidebar_in_order_with_prev_next(site):
    pages = [f"notebooks/{nb.stem}.html" for nb in NOTEBOOKS]
    index = _Page((site / "index.html").read_text(encoding="utf-8"))
    sidebar = [h for h in index.hrefs("reference") if h.startswith("notebooks/")]
    assert sidebar[: len(pages)] == pages, sidebar
    order = ["index.html", *pages, "workshop.html"]
    for i, page in enumerate(order):
        p = _Page((site / page).read_text(encoding="utf-8"))
        here = (site / page).parent
        resolve = lambda href: str((here / href).resolve().relative_to(site.resolve()))  # noqa: E731
        assert ("prev" in p.rel) == (i > 0) and ("next" in p.rel) == (i + 1 < len(order)), page
        if i > 0:
            assert resolve(p.rel["prev"]) == order[i - 1] and [resolve(h) for h in p.hrefs("left-prev")] == [order[i - 1]]
        if i + 1 < len(order):
            assert resolve(p.rel["next"]) == order[i + 1] and [resolve(h) for h in p.hrefs("right-next")] == [order[i + 1]]


def test_every_solution_is_folded_behind_a_toggle(site):
    total = 0
    for nb in NOTEBOOKS:
        cells = _exercise_cells(nb)
        html = _page(site, nb).read_text(encoding="utf-8")
        p = _Page(html)
        toggles = [d for d in p.details if ppo_book.SHOW in d]
        assert len(toggles) == sum(s.count(ppo_book.BEGIN) for s in cells), nb.name
        for cell, toggle in zip(cells, toggles):
            solution = next(code for code, is_sol in ppo_book.split_solutions(cell) if is_sol)
            last = [ln.strip() for ln in solution.splitlines() if ln.strip()][-1]
            assert last in toggle.replace("\n", ""), (nb.name, last)  # the solution's last line is inside the toggle
        assert "BEGIN SOLUTION" not in html and "END SOLUTION" not in html, nb.name
        total += len(toggles)
    assert total >= 1, "no exercise found to fold"


def test_split_solutions():
    src = "def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n\ncheck_f(f)\n"
    assert ppo_book.split_solutions(src) == [("def f(x):\n    '''doc'''", False), ("    return x", True), ("check_f(f)", False)]
    two = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nb = 2\n  ### BEGIN SOLUTION\n  c = 3\n  ### END SOLUTION\n"
    assert [s for _, s in ppo_book.split_solutions(two)] == [True, False, True]
    for bad in ("### BEGIN SOLUTION\nx", "x\n### END SOLUTION", "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"):
        with pytest.raises(ValueError, match="SOLUTION|marker"):
            ppo_book.split_solutions(bad)


def test_fold_keeps_outputs_on_the_last_piece_and_other_cells_alone():
    out = new_output("stream", name="stdout", text="ok\n")
    nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("x = 1"),
                             new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\ncheck(f)",
                                           execution_count=3, outputs=[out])])
    nb = json.loads(nbformat.writes(nb))
    assert ppo_book.fold_solutions(nb) == 1
    cells = nb["cells"]
    assert [c["source"] for c in cells[2:]] == ["def f():", "    return 1", "check(f)"]
    assert [c["metadata"].get("tags", []) for c in cells[2:]] == [[], ["hide-input"], []]
    assert cells[3]["metadata"]["mystnb"]["code_prompt_show"] == ppo_book.SHOW
    assert [len(c["outputs"]) for c in cells[2:]] == [0, 0, 1] and cells[4]["execution_count"] == 3
    assert "".join(cells[4]["outputs"][0]["text"]) == out["text"]
    assert len({c["id"] for c in cells}) == len(cells)


def test_site_has_offline_mathjax_and_nothing_remote(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert any((site / "_static" / "mathjax").rglob("*.woff"))
    assert ppo_book.external_references(site) == []
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "cdn.jsdelivr" not in text and "cdnjs" not in text and "unpkg.com" not in text, page.name


def test_scanner_catches_what_a_browser_would_fetch(tmp_path):
    """external_references must flag a CDN script, a remote stylesheet, a CSS url() and a dynamic import."""
    (tmp_path / "a.html").write_text(
        '<html><head><script src="https://cdn.example.org/x.js"></script>'
        '<link rel="stylesheet" href="//cdn.example.org/y.css"></head>'
        '<body><a href="https://example.org/read-more">fine: a link is not fetched</a>'
        '<script type="module">const m = await import("https://cdn.example.org/z.mjs");</script></body></html>')
    (tmp_path / "b.css").write_text('@font-face { src: url("https://fonts.example.org/f.woff2"); }')
    found = ppo_book.external_references(tmp_path)
    assert len(found) == 4, found
    assert not any("read-more" in f for f in found)


def test_build_fails_when_a_page_would_load_something_remote(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell('# 01 — Remote\n\n<img src="https://example.org/pic.png" alt="x">\n')])
    path = tmp_path / "01_remote.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(subprocess.CalledProcessError):
        book_build.build(tmp_path / "site", [path], capture=True)


# ---------------------------------------------------------------- the workshop track page

TRACK = ROOT / "book" / "workshop.md"
ROW = re.compile(r"^\| (?P<start>\d:\d\d)–(?P<end>\d:\d\d) \| (?P<nb>\d\d|—) \| (?P<what>[^|]+?) \| (?P<mode>\w+) \|$", re.M)
EXERCISE = re.compile(r"Exercise (\d+\.\d+)")


def _minutes(t: str) -> int:
    h, m = t.split(":")
    return 60 * int(h) + int(m)


@pytest.fixture(scope="module")
def learner_copies(tmp_path_factory) -> dict[str, list]:
    """{exercise number: [notebook name, estimate in minutes, stubbed cell source]} from `make workshop`'s output."""
    out = tmp_path_factory.mktemp("workshop")
    assert workshop.main(["--out", str(out)]) == 0
    found = {}
    for path in sorted(out.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            first = cell.source.lstrip("\n").splitlines()[0] if cell.source.strip() else ""
            m = re.match(r"#\s*Exercise (\d+\.\d+) \([^,]+, ~(\d+) min\)", first)
            if cell.cell_type == "code" and m:
                found[m.group(1)] = [path.name, int(m.group(2)), cell.source]
    return found


def test_workshop_track_is_three_contiguous_hours():
    rows = list(ROW.finditer(TRACK.read_text(encoding="utf-8")))
    assert rows, "no schedule rows in book/workshop.md"
    assert rows[0]["start"] == "0:00" and rows[-1]["end"] == "3:00"
    for a, b in zip(rows, rows[1:]):
        assert a["end"] == b["start"], (a.group(0), b.group(0))
    for r in rows:
        assert _minutes(r["end"]) > _minutes(r["start"]), r.group(0)
        assert r["mode"] in ("present", "exercise", "break"), r.group(0)


def test_workshop_track_names_the_learner_copies_exercises(learner_copies):
    text = TRACK.read_text(encoding="utf-8")
    rows = list(ROW.finditer(text))
    scheduled = {}
    for r in rows:
        for num in EXERCISE.findall(r["what"]):
            assert r["mode"] == "exercise", r.group(0)
            scheduled.setdefault(num, []).append(r)
    assigned = set(EXERCISE.findall(text.split("**Assigned after the session:**", 1)[1].split("\n\n", 1)[0]))
    named = set(EXERCISE.findall(text)) | set(re.findall(r"\b(\d\.\d)\b(?= (?:and \d\.\d )?in \[)", text))
    for num in named:
        assert num in learner_copies, f"the track names Exercise {num}, which no learner copy has"
    for num, (nb_name, estimate, source) in learner_copies.items():
        assert "NotImplementedError" in source and "BEGIN SOLUTION" not in source, f"{num} is not a stub in {nb_name}"
        assert (num in scheduled) != (num in assigned), f"Exercise {num} must be either scheduled or assigned, once"
        for r in scheduled.get(num, []):
            assert r["nb"] == nb_name[:2], f"Exercise {num} is in {nb_name}, the track puts it under {r['nb']}"
            slot = _minutes(r["end"]) - _minutes(r["start"])
            need = sum(learner_copies[n][1] for n in EXERCISE.findall(r["what"]))
            assert slot >= need, f"{r.group(0)}: {slot} min for exercises estimated at {need} min"


def test_workshop_track_sections_exist():
    for r in ROW.finditer(TRACK.read_text(encoding="utf-8")):
        for sec in re.findall(r"§(\d+)", r["what"]):
            nb = next((p for p in NOTEBOOKS if p.name.startswith(r["nb"] + "_")), None)
            assert nb is not None, r.group(0)
            headings = [c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown"]
            assert any(re.search(rf"^## {sec}\. ", h, re.M) for h in headings), f"{nb.name} has no section {sec}"


# ---------------------------------------------------------------- in a real browser

CHROMIUM_HINT = ("Install a Chromium: Debian/Ubuntu `sudo apt-get install chromium` (as CI does with "
                 "`make ci-deps`), macOS `brew install --cask chromium` (or use Google Chrome), or point "
                 "CHROMIUM=/path/to/chrome at one.")
MAC_APPS = ["/Applications/Chromium.app/Contents/MacOS/Chromium",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"]


def _find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return next((p for p in MAC_APPS if Path(p).exists()), None)


def _unavailable(why: str):
    if ON_CI:
        pytest.fail(f"BROWSER TEST CANNOT RUN ON CI: {why}. CI must install it (`make ci-deps`).", pytrace=False)
    pytest.skip(f"browser test skipped: {why}. {CHROMIUM_HINT}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def served(site):
    """The site over http on a free loopback port (stopped after the module)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser_page(served):
    """(page, requests): a Chromium page whose every request is recorded; non-local ones are blocked."""
    chromium = _find_chromium()
    if not chromium:
        _unavailable("no Chromium found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the `playwright` package is not installed (requirements-dev.txt)")
    origin = urlsplit(served).netloc
    requests: list[str] = []

    def route(r):
        url = urlsplit(r.request.url)
        (r.continue_() if url.scheme in ("data", "blob") or url.netloc == origin else r.abort())

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.on("request", lambda r: requests.append(r.url))
        context.on("websocket", lambda ws: requests.append(ws.url))
        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page, requests
        browser.close()


MATH_FACTS = """() => {
  const left = [];
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT, {acceptNode(n) {
    return n.parentElement.closest('pre, code, script, style, mjx-container, mjx-assistive-mml') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
  }});
  while (walker.nextNode()) {
    const t = walker.currentNode.nodeValue;
    if (/\\$\\$|\\\\\\(|\\\\\\[|\\\\begin\\{|\\\\frac/.test(t)) left.push(t.trim().slice(0, 80));
  }
  return {
    rendered: document.querySelectorAll('mjx-container').length,
    display: document.querySelectorAll('mjx-container[display="true"]').length,
    errors: document.querySelectorAll('mjx-merror').length,
    left: left,
  };
}"""


def _page_with_plot_and_math(site: Path) -> Path:
    for nb in NOTEBOOKS:
        html = _page(site, nb).read_text(encoding="utf-8")
        if re.search(r'class="cell_output[^"]*".*?<img [^>]*src="\.\./_images/', html, re.S) and "math notranslate" in html:
            return nb
    pytest.fail("no notebook page has both a plot and math to check in the browser")


@pytest.mark.browser  # skips on a laptop without a Chromium, FAILS on CI
def test_in_chromium(site, served, browser_page):
    """Open the book, follow the sidebar to a page, see math and a plot, go next/prev, open a solution, search."""
    page, requests = browser_page
    target = _page_with_plot_and_math(site)
    page.goto(served + "/index.html")
    sidebar = page.locator("nav.bd-docs-nav a.reference")
    assert [h for h in sidebar.evaluate_all("els => els.map(a => a.getAttribute('href'))") if h.startswith("notebooks/")] \
        == [f"notebooks/{nb.stem}.html" for nb in NOTEBOOKS]

    # follow the sidebar link, as a reader would; math is typeset by the local MathJax
    page.locator(f'nav.bd-docs-nav a[href="notebooks/{target.stem}.html"]').click()
    page.wait_for_url(f"**/notebooks/{target.stem}.html")
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise && "
                           "document.querySelectorAll('mjx-container').length > 0")
    page.evaluate("() => MathJax.startup.promise")
    math = page.evaluate(MATH_FACTS)
    assert math["rendered"] >= 1 and math["display"] >= 1 and math["errors"] == 0, math
    assert math["left"] == [], math["left"]
    plots = page.locator(".cell_output img")
    assert plots.count() >= 1
    assert plots.evaluate_all("els => els.every(i => i.complete && i.naturalWidth > 0)")
    page.locator("mjx-container[display=true]").first.scroll_into_view_if_needed()
    (ROOT / "build").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "build" / "site-screenshot.png"))

    # previous/next links at the foot of the page
    i = NOTEBOOKS.index(target)
    if i + 1 < len(NOTEBOOKS):
        page.locator("a.right-next").click()
        page.wait_for_url(f"**/notebooks/{NOTEBOOKS[i + 1].stem}.html")
        page.locator("a.left-prev").click()
        page.wait_for_url(f"**/notebooks/{target.stem}.html")

    # a solution: folded at first, shown after one click on its toggle
    with_solution = next(nb for nb in NOTEBOOKS if _exercise_cells(nb))
    page.goto(f"{served}/notebooks/{with_solution.stem}.html")
    toggle = page.locator("details.hide", has_text=ppo_book.SHOW).first
    code = toggle.locator(".cell_input pre")
    assert not code.is_visible()
    toggle.locator("summary").click()
    code.wait_for(state="visible")
    assert toggle.evaluate("d => d.open")
    page.wait_for_timeout(400)  # myst-nb fades the opened content in (0.3 s): screenshot it settled
    page.screenshot(path=str(ROOT / "build" / "site-solution-screenshot.png"))

    # search, from the search field of the page
    page.keyboard.press("Control+k")
    box = page.locator("input[name=q]:visible").first
    box.fill("advantages")
    box.press("Enter")
    page.wait_for_url("**/search.html?q=advantages*")
    hits = page.locator("#search-results li a")
    hits.first.wait_for()
    assert any("05_token_advantages" in h for h in hits.evaluate_all("els => els.map(a => a.href)"))

    # every request went to the local server
    origin = urlsplit(served).netloc
    remote = sorted({u for u in requests if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != origin})
    assert remote == [], f"requests left the machine: {remote}"
    assert any(u.endswith(".woff") for u in requests), "MathJax's fonts were not loaded (locally)"

    # the recorder itself: a remote fetch planted in the page is seen, and blocked before it leaves
    n = len(requests)
    got = page.evaluate("() => fetch('https://example.org/planted.js').then(() => 'fetched', () => 'blocked')")
    assert got == "blocked" and "https://example.org/planted.js" in requests[n:], (got, requests[n:])
