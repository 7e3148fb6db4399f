"""The rendered book (tools/site.py): built from the notebooks, then looked at in headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium
chromium-driver``); without them it FAILS with that message rather than skipping, because CI installs
them. It drives ChromeDriver through the W3C WebDriver HTTP protocol with the standard library only
(no selenium), serves the site on a loopback port, and saves build/site-screenshot.png.
"""

from __future__ import annotations

import base64
import functools
import glob
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]

# tools/site.py, loaded by path: its name would clash with the standard library's `site` module
_spec = importlib.util.spec_from_file_location("book_site", ROOT / "tools" / "site.py")
book_site = importlib.util.module_from_spec(_spec)
sys.modules["book_site"] = book_site  # dataclasses look their module up there
_spec.loader.exec_module(book_site)

# SITE_NOTEBOOKS (a glob) lets a developer point the test at other notebooks
NOTEBOOKS = sorted(Path(p) for p in glob.glob(os.environ.get("SITE_NOTEBOOKS", str(ROOT / "notebooks" / "[0-9]*.ipynb"))))
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"


# ---------------------------------------------------------------- the build, without a browser


class _Links(HTMLParser):
    """The attributes of every <a> in a page."""

    def __init__(self, text: str):
        super().__init__()
        self.links: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs))


def _rel(page: Path, rel: str) -> list[str]:
    return [a.get("href") for a in _Links(page.read_text(encoding="utf-8")).links if a.get("rel") == rel]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The book built from every notebook that exists now."""
    if not NOTEBOOKS:
        pytest.fail("no notebooks/[0-9]*.ipynb to build the site from")
    out = tmp_path_factory.mktemp("book") / "site"
    book_site.build(NOTEBOOKS, out)
    return out


def test_every_notebook_has_a_page_and_an_index_row(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    meta = json.loads((site / "book.json").read_text(encoding="utf-8"))
    assert [m["notebook"] for m in meta] == [p.name for p in NOTEBOOKS]
    for m in meta:
        assert (site / m["page"]).is_file()
        assert f'href="{m["page"]}"' in index
        assert m["title"] and m["minutes"] >= 1
    # every page links back to the index (top and bottom), and to its neighbours: none before the first,
    # none after the last
    pages = [m["page"] for m in meta]
    for i, page in enumerate(pages):
        hrefs = [a.get("href") for a in _Links((site / page).read_text(encoding="utf-8")).links]
        assert hrefs.count("index.html") == 2, page
        assert _rel(site / page, "prev") == ([pages[i - 1]] * 2 if i > 0 else [])
        assert _rel(site / page, "next") == ([pages[i + 1]] * 2 if i + 1 < len(pages) else [])


def test_site_has_katex_and_nothing_remote(site):
    assert (site / "katex" / "katex.min.js").is_file() and (site / "katex" / "contrib" / "auto-render.min.js").is_file()
    assert any((site / "katex" / "fonts").glob("*.woff2"))
    assert book_site.external_references(site) == []
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "cdnjs" not in text and "cdn.jsdelivr" not in text and "require.js" not in text, page.name


def test_scanner_catches_what_a_browser_would_fetch(tmp_path):
    """external_references must flag a CDN script, a remote stylesheet, a CSS url() and a dynamic import."""
    (tmp_path / "a.html").write_text(
        '<html><head><script src="https://cdn.example.org/x.js"></script>'
        '<link rel="stylesheet" href="//cdn.example.org/y.css"></head>'
        '<body><a href="https://example.org/read-more">fine: a link is not fetched</a>'
        '<script type="module">const m = await import("https://cdn.example.org/z.mjs");</script></body></html>')
    (tmp_path / "b.css").write_text('@font-face { src: url("https://fonts.example.org/f.woff2"); }')
    found = book_site.external_references(tmp_path)
    assert len(found) == 4, found
    assert not any("read-more" in f for f in found)


def test_build_is_idempotent(tmp_path):
    nbs = []
    for p in NOTEBOOKS[:2]:  # copies: a notebook re-executed meanwhile must not change the inputs between builds
        nbs.append(tmp_path / p.name)
        shutil.copyfile(p, nbs[-1])
    book_site.build(nbs, tmp_path / "one")
    book_site.build(nbs, tmp_path / "two")
    book_site.build(nbs, tmp_path / "two")  # over an existing build
    assert _tree_digest(tmp_path / "one") == _tree_digest(tmp_path / "two")


def test_title_blurb_and_reading_time_from_a_handmade_notebook(tmp_path):
    nb = new_notebook()
    prose = " ".join(["word"] * 390)
    nb.cells = [
        new_markdown_cell("# 07 — A made-up notebook\n\n**The question:** what does `x` do? One line.\n\n" + prose),
        new_code_cell("a = 1\n\nb = 2\nprint(a + b)\n"),  # 3 non-blank lines
        new_markdown_cell("## Later\n\n" + " ".join(["w"] * 8)),
    ]
    e = book_site.describe(tmp_path / "07_made_up.ipynb", nb)
    assert e.title == "07 — A made-up notebook" and e.short_title == "A made-up notebook"
    assert e.blurb == "**The question:** what does `x` do? One line."
    assert e.code_lines == 3
    # words are tokens with a letter or digit ("#" and "—" are not words): 4 in the heading, 8 in the
    # question, 390 of prose, 1 in "## Later", 8 w's
    assert e.words == 4 + 8 + 390 + 1 + 8
    # 411 words / 200 + 3 lines / 10 = 2.355 -> 3 minutes
    assert e.minutes == 3
    assert book_site.inline_markdown(e.blurb) == "<strong>The question:</strong> what does <code>x</code> do? One line."


def test_blurb_markdown_leaves_code_and_math_alone():
    """A ``*`` inside `code` or $math$ is not emphasis (notebook 02's blurb has `-min(r*A, clip(...)*A)`)."""
    got = book_site.inline_markdown("`-min(r*A, c*A)` is *the* loss, $a*b < c$ & <b>")
    assert got == "<code>-min(r*A, c*A)</code> is <em>the</em> loss, $a*b &lt; c$ &amp; &lt;b&gt;"


def test_plots_are_embedded_pngs(tmp_path):
    """A notebook whose output is a PNG gets an <img src="data:image/png;base64,...">, not a file link."""
    png = base64.b64encode(bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )).decode()
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# 01 — Pic\n\nA $1\\times1$ image."), new_code_cell("show()", execution_count=1)]
    nb.cells[1].outputs = [new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]
    path = tmp_path / "01_pic.ipynb"
    nbformat.write(nb, path)
    book_site.build([path], tmp_path / "site")
    page = (tmp_path / "site" / "01_pic.html").read_text(encoding="utf-8")
    assert f'src="data:image/png;base64,{png}' in page


# ---------------------------------------------------------------- in a real browser


class WebDriver:
    """The few W3C WebDriver commands the test needs, spoken to ChromeDriver over loopback HTTP."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element key

    def __init__(self, chromium: str, chromedriver: str, profile: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen([chromedriver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,2000",
                "--hide-scrollbars", "--force-device-scale-factor=1"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.read().decode(errors='replace')[:500]}") from None

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        el = self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]
        self.cmd("POST", f"/element/{el}/click", {})

    def wait_for(self, script: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {script}")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def served(site):
    """The site over http on a free loopback port (stopped after the module)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through ChromeDriver. Fails (does not skip) when they are missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if not p]
        pytest.fail(f"BROWSER TEST NEEDS SYSTEM PACKAGES: {', '.join(missing)} not found on PATH. "
                    f"Install them with `{INSTALL_HINT}` (CI does this in `make setup`).", pytrace=False)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    driver = WebDriver(chromium, chromedriver, profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# Text a reader sees outside code and rendered math: no "$$" or "\begin{" may be left there.
RAW_MATH_LEFT = """
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode(n) {
  return n.parentElement.closest('pre, code, script, style, .katex') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
}});
const left = [];
while (walker.nextNode()) {
  const t = walker.currentNode.nodeValue;
  if (t.includes('$$') || t.includes('\\\\begin{')) left.push(t.trim().slice(0, 80));
}
return left;
"""

PAGE_FACTS = """
const imgs = [...document.querySelectorAll('.jp-OutputArea-output img')];
return {
  title: document.title,
  plots: imgs.length,
  plots_drawn: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
  katex: document.querySelectorAll('.katex').length,
  katex_display: document.querySelectorAll('.katex-display').length,
  katex_errors: document.querySelectorAll('.katex-error').length,
  katex_font: document.fonts.check('16px KaTeX_Main'),
  next: !!document.querySelector('a[rel=next]'),
  up: !!document.querySelector('a.up[href="index.html"]'),
};
"""


def _page_with_plot_and_math(site: Path) -> str:
    """The first page that has both an embedded PNG and display math: the one the test follows."""
    for meta in json.loads((site / "book.json").read_text(encoding="utf-8")):
        text = (site / meta["page"]).read_text(encoding="utf-8")
        if 'src="data:image/png' in text and "$$" in text:
            return meta["page"]
    pytest.fail("no notebook page has both a plot (embedded PNG) and display math ($$) to check in the browser")


@pytest.mark.browser  # needs Debian chromium + chromium-driver; FAILS (never skips) without them
def test_in_headless_chromium(site, served, browser):
    """Open the index, follow a link to a notebook page, and see its math and plots rendered; screenshot it."""
    target = _page_with_plot_and_math(site)
    browser.get(served + "/index.html")
    browser.wait_for("return document.readyState === 'complete' && document.body.dataset.math === 'rendered'")
    rows = browser.js("return [...document.querySelectorAll('td.title a')].map(a => a.getAttribute('href'))")
    assert rows == [m["page"] for m in json.loads((site / "book.json").read_text(encoding="utf-8"))]
    assert browser.js(RAW_MATH_LEFT) == []
    browser.screenshot(ROOT / "build" / "site-index-screenshot.png")

    browser.click(f'td.title a[href="{target}"]')  # follow the link, as a reader would
    browser.wait_for(f"return location.pathname.endsWith('/{target}') && document.readyState === 'complete' "
                     "&& document.body.dataset.math === 'rendered'")
    browser.wait_for("return document.fonts.status === 'loaded'")
    facts = browser.js(PAGE_FACTS)
    assert facts["plots"] >= 1 and facts["plots_drawn"] == facts["plots"], facts
    assert facts["katex"] >= 1 and facts["katex_display"] >= 1, facts
    assert facts["katex_errors"] == 0, facts
    assert facts["katex_font"] and facts["up"], facts
    assert browser.js(RAW_MATH_LEFT) == []
    # no request left the machine: every resource the page loaded came from our server or was inline
    hosts = browser.js("return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).host))]")
    assert set(hosts) <= {served.split("//")[1]}, hosts

    browser.js("const m = document.querySelector('.katex-display'); m.scrollIntoView({block: 'start'}); window.scrollBy(0, -80);")
    browser.screenshot(ROOT / "build" / "site-screenshot.png")
    assert (ROOT / "build" / "site-screenshot.png").stat().st_size > 10_000
