"""Build the rendered book: a static HTML site from the executed notebooks, viewable offline.

    python tools/site.py                      # notebooks/[0-9]*.ipynb -> build/site/
    python tools/site.py --out DIR NB.ipynb…  # chosen notebooks into another folder

Writes ``index.html`` (the map of the series: title, what each notebook teaches, reading time),
one page per notebook (nbconvert's lab template, with previous/next links), the notebook CSS
once in ``static/``, and KaTeX (math rendered in the browser) in ``katex/``. Plots are the PNGs
embedded in the notebook outputs. Nothing is fetched when a page is viewed: the build fails if
a page or stylesheet would load anything from another host.

KaTeX comes from the npm registry package ``katex`` (pinned below, checked against its sha512
integrity) and is cached in ``build/cache/``: the first build runs ``npm pack`` once; later
builds need no network. Offline, put the tarball there yourself or point ``KATEX_TARBALL`` at it.
The notebooks are not executed here: ``make book`` runs ``tools/execute.py`` first.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "cache"

KATEX_VERSION = "0.19.1"
KATEX_INTEGRITY = "sha512-jG8uKntjSEcm2EpQOh0XturpPuuC9r3Sq5HLHdsFdWZT27E672SF19QEi+of0/YeOy15lDgRhKvr5614uRrEfA=="
KATEX_FILES = re.compile(r"^package/(dist/(katex\.min\.(js|css)|contrib/auto-render\.min\.js|fonts/[\w.-]+)|LICENSE)$")

WORDS_PER_MIN = 200  # prose, read carefully
CODE_LINES_PER_MIN = 10  # code, read and understood (6 s a line)

# Anything a browser would fetch from another host: src/href of loading tags, CSS url()/@import,
# and URLs inside <script> bodies (e.g. a dynamic import). Links a reader clicks (<a href>) are fine.
_REMOTE = r"(?:https?:)?//"
EXTERNAL_PATTERNS = [
    re.compile(rf"<(?:script|link|img|iframe|source|video|audio|embed|object|track|input)\b[^>]*?\s(?:src|href|srcset|data)\s*=\s*[\"']?\s*{_REMOTE}", re.I),
    re.compile(rf"url\(\s*[\"']?\s*{_REMOTE}", re.I),
    re.compile(rf"@import\s+[\"']?\s*(?:url\()?\s*[\"']?{_REMOTE}", re.I),
]
_SCRIPT_BODY = re.compile(r"<script\b[^>]*>(.*?)</script>", re.I | re.S)
_STYLE_BODY = re.compile(r"<style\b[^>]*>(.*?)</style>", re.I | re.S)


# ---------------------------------------------------------------- KaTeX from the npm registry


def _integrity_ok(data: bytes) -> bool:
    algo, _, want = KATEX_INTEGRITY.partition("-")
    return base64.b64encode(hashlib.new(algo, data).digest()).decode() == want


def katex_tarball() -> Path:
    """Path of the verified ``katex-<version>.tgz``: from KATEX_TARBALL, the cache, or ``npm pack``."""
    given = os.environ.get("KATEX_TARBALL")
    path = Path(given) if given else CACHE / f"katex-{KATEX_VERSION}.tgz"
    if not path.exists():
        if given:
            raise SystemExit(f"site: KATEX_TARBALL={given} does not exist")
        if shutil.which("npm") is None:
            raise SystemExit(
                f"site: KaTeX {KATEX_VERSION} is not cached in build/cache/ and npm is not installed.\n"
                f"      Install Node.js/npm, or run `npm pack katex@{KATEX_VERSION}` on a machine with the npm "
                "registry and copy the .tgz into build/cache/ (or set KATEX_TARBALL)."
            )
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"site: fetching katex@{KATEX_VERSION} from the npm registry (once; cached in build/cache/)", flush=True)
        proc = subprocess.run(
            ["npm", "pack", f"katex@{KATEX_VERSION}", "--pack-destination", str(CACHE), "--silent"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not path.exists():
            raise SystemExit(f"site: `npm pack katex@{KATEX_VERSION}` failed:\n{proc.stderr.strip()}")
    if not _integrity_ok(path.read_bytes()):
        raise SystemExit(f"site: {path.name} does not match the pinned integrity {KATEX_INTEGRITY[:20]}...; delete it and rebuild")
    return path


def install_katex(dest: Path) -> None:
    """Copy KaTeX's minified JS/CSS, auto-render, fonts and licence into ``dest``."""
    with tarfile.open(katex_tarball(), "r:gz") as tar:
        for member in tar.getmembers():
            m = KATEX_FILES.match(member.name)
            if not (m and member.isfile()):
                continue
            rel = Path(member.name).relative_to("package")
            rel = rel.relative_to("dist") if rel.parts[0] == "dist" else rel
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    if not (dest / "katex.min.js").exists() or not (dest / "contrib" / "auto-render.min.js").exists():
        raise SystemExit("site: the KaTeX tarball lacks dist/katex.min.js or dist/contrib/auto-render.min.js")


# ---------------------------------------------------------------- what a notebook is about


@dataclass
class Entry:
    """One notebook of the series, as the index shows it."""

    path: Path
    page: str  # file name of its HTML page
    title: str
    blurb: str  # one line on what it teaches (markdown, inline)
    words: int
    code_lines: int

    @property
    def short_title(self) -> str:
        """The title without its leading number ("03 — Token log-probs" -> "Token log-probs")."""
        return re.sub(r"^\s*\d+\s*[—–:.-]?\s*", "", self.title) or self.title

    @property
    def minutes(self) -> int:
        return max(1, math.ceil(self.words / WORDS_PER_MIN + self.code_lines / CODE_LINES_PER_MIN))


def _first_sentences(text: str, limit: int = 450) -> str:
    """The paragraph, or as many whole sentences of it as fit in ``limit`` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = max((m.end() for m in re.finditer(r"[.?!](?=\s)", text[: limit + 1])), default=0)
    return text[:cut] if cut > 40 else text[:limit].rsplit(" ", 1)[0] + " …"


def describe(path: Path, nb) -> Entry:
    """Title (first ``#`` heading) and blurb (first paragraph after it) of the first markdown cell."""
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    first = md[0] if md else ""
    title, blurb = path.stem, ""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", first) if p.strip()]
    for p in paragraphs:
        h = re.match(r"#+\s+(.*)", p)
        if h and title == path.stem:
            title = h.group(1).strip()
            rest = p[h.end():].strip()  # a paragraph that starts right under the heading line
            if rest:
                blurb = rest
                break
            continue
        if not p.startswith(("#", ">", "|", "-", "*", "```", "$$")) or p.startswith("**"):
            blurb = p
            break
    words = sum(len(re.findall(r"\S*\w\S*", s)) for s in md)  # tokens with a letter or digit
    code_lines = sum(1 for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines() if line.strip())
    return Entry(path, path.stem + ".html", title, _first_sentences(blurb), words, code_lines)


def inline_markdown(text: str) -> str:
    """The few inline markdown forms a blurb uses (`code`, **bold**, *em*, [link](url)) as HTML.

    Code spans and $math$ are cut out first, so a ``*`` inside them is never read as emphasis.
    """
    out = []
    for i, part in enumerate(re.split(r"(`[^`]+`|\$[^$]+\$)", text)):
        if i % 2:  # a code span or inline math, kept verbatim (math is rendered by KaTeX in the page)
            out.append(f"<code>{html.escape(part[1:-1], quote=False)}</code>" if part.startswith("`") else html.escape(part, quote=False))
            continue
        part = html.escape(part, quote=False)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"\1", part)  # keep the words; the row links to the page
        out.append(part)
    return "".join(out)


# ---------------------------------------------------------------- pages

KATEX_HEAD = """
<link rel="stylesheet" href="{root}katex/katex.min.css">
<script defer src="{root}katex/katex.min.js"></script>
<script defer src="{root}katex/contrib/auto-render.min.js"></script>
<script>
document.addEventListener("DOMContentLoaded", function () {{
  renderMathInElement(document.body, {{
    delimiters: [
      {{left: "$$", right: "$$", display: true}},
      {{left: "\\\\[", right: "\\\\]", display: true}},
      {{left: "\\\\begin{{equation}}", right: "\\\\end{{equation}}", display: true}},
      {{left: "\\\\begin{{equation*}}", right: "\\\\end{{equation*}}", display: true}},
      {{left: "\\\\begin{{align}}", right: "\\\\end{{align}}", display: true}},
      {{left: "\\\\begin{{align*}}", right: "\\\\end{{align*}}", display: true}},
      {{left: "\\\\begin{{aligned}}", right: "\\\\end{{aligned}}", display: true}},
      {{left: "\\\\begin{{gather}}", right: "\\\\end{{gather}}", display: true}},
      {{left: "$", right: "$", display: false}},
      {{left: "\\\\(", right: "\\\\)", display: false}}
    ],
    ignoredTags: ["script", "noscript", "style", "textarea", "pre", "code", "option"],
    throwOnError: false
  }});
  document.body.setAttribute("data-math", "rendered");
}});
</script>
"""

SITE_CSS = """
.book-nav { display: flex; justify-content: space-between; align-items: center; gap: 1em;
  max-width: 1100px; margin: 0 auto; padding: 0.6em 1.2em; font: 14px/1.4 system-ui, sans-serif; }
.book-nav a { color: #1a5fb4; text-decoration: none; }
.book-nav a:hover { text-decoration: underline; }
.book-nav .up { font-weight: 600; }
.book-nav span.none { color: #999; }
header.book-nav { border-bottom: 1px solid #ddd; }
footer.book-nav { border-top: 1px solid #ddd; margin-top: 2em; }
body.book-index { font: 16px/1.55 system-ui, sans-serif; color: #222; max-width: 980px; margin: 0 auto; padding: 1.5em; }
.book-index h1 { font-size: 1.9em; margin-bottom: 0.2em; }
.book-index table { border-collapse: collapse; width: 100%; margin-top: 1em; }
.book-index th, .book-index td { text-align: left; vertical-align: top; padding: 0.55em 0.7em; border-bottom: 1px solid #e3e3e3; }
.book-index th { font-size: 0.85em; text-transform: uppercase; letter-spacing: 0.04em; color: #666; }
.book-index td.num, .book-index td.time { white-space: nowrap; color: #555; }
.book-index td.title a { font-weight: 600; color: #1a5fb4; text-decoration: none; }
.book-index td.title a:hover { text-decoration: underline; }
.book-index code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; font-size: 0.92em; }
.book-index .total { color: #555; margin-top: 1em; }
"""

PAGE_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block notebook_css -%}
<link rel="stylesheet" href="static/notebook.css">
<link rel="stylesheet" href="static/site.css">
{%- endblock notebook_css -%}
{%- block html_head_js_mathjax -%}{{ resources.book.katex_head }}{%- endblock html_head_js_mathjax -%}
{%- block body_header -%}
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
{{ resources.book.nav_top }}
<main>
{%- endblock body_header -%}
{%- block body_footer -%}
</main>
{{ resources.book.nav_bottom }}
</body>
{%- endblock body_footer -%}
"""

# The lab template's own small inline rules (hidden anchor links and collapsers, output font), kept once.
LAB_EXTRA_CSS = """
* { -webkit-print-color-adjust: exact; }
a.anchor-link { display: none; }
.jp-InputArea { overflow: hidden; }
.jp-InputArea-editor { overflow: hidden; }
.cm-editor.cm-s-jupyter .highlight pre { padding: var(--jp-code-padding) 4px; margin: 0; font-family: inherit;
  font-size: inherit; line-height: inherit; color: inherit; }
.jp-OutputArea-output pre { line-height: inherit; font-family: inherit; }
.jp-RenderedText pre { color: var(--jp-content-font-color1); font-size: var(--jp-code-font-size); }
.jp-Collapser { display: none; }
main { max-width: 1100px; margin: 0 auto; }
"""


def nav(entries: list[Entry], i: int, where: str) -> str:
    """Previous / index / next links for page ``i``."""
    def link(j: int, arrow: str) -> str:
        if not 0 <= j < len(entries):
            return '<span class="none"></span>'
        e = entries[j]
        label = f"← {html.escape(e.title)}" if arrow == "prev" else f"{html.escape(e.title)} →"
        return f'<a class="{arrow}" rel="{arrow}" href="{e.page}">{label}</a>'

    tag = "header" if where == "top" else "footer"
    return (f'<{tag} class="book-nav">{link(i - 1, "prev")}'
            f'<a class="up" href="index.html">Contents</a>{link(i + 1, "next")}</{tag}>')


def notebook_css() -> str:
    """The lab template's stylesheets (layout + light theme), concatenated once for every page."""
    from nbconvert.exporters.templateexporter import TemplateExporter

    for base in TemplateExporter().template_paths:
        static = Path(base) / "lab" / "static"
        if (static / "index.css").exists():
            return "\n".join((static / n).read_text(encoding="utf-8") for n in ("index.css", "theme-light.css")) + LAB_EXTRA_CSS
    raise SystemExit("site: nbconvert's lab template (lab/static/index.css) was not found")


def render_pages(entries: list[Entry], notebooks: list, out: Path) -> None:
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"book.html.j2": PAGE_TEMPLATE})], template_file="book.html.j2")
    exporter.embed_images = True  # images a markdown cell links to become data: URIs too
    for i, (entry, nb) in enumerate(zip(entries, notebooks)):
        resources = {
            "metadata": {"name": entry.title, "path": str(entry.path.parent)},
            "book": {"katex_head": KATEX_HEAD.format(root=""), "nav_top": nav(entries, i, "top"),
                     "nav_bottom": nav(entries, i, "bottom")},
        }
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        (out / entry.page).write_text(body, encoding="utf-8")


def render_index(entries: list[Entry], out: Path, title: str) -> None:
    rows = "\n".join(
        f'<tr><td class="num">{html.escape(e.path.stem.split("_")[0])}</td>'
        f'<td class="title"><a href="{e.page}">{html.escape(e.short_title)}</a><br>{inline_markdown(e.blurb)}</td>'
        f'<td class="time">~{e.minutes} min</td></tr>'
        for e in entries
    )
    total = sum(e.minutes for e in entries)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="static/site.css">
{KATEX_HEAD.format(root="")}
</head>
<body class="book-index">
<h1>{html.escape(title)}</h1>
<p>The notebooks in reading order. Each page is the executed notebook: code, outputs and plots as they ran.
Reading time is estimated from the prose ({WORDS_PER_MIN} words a minute) and the code
({CODE_LINES_PER_MIN} lines a minute); running and doing the exercises takes longer.</p>
<table>
<thead><tr><th>#</th><th>Notebook and what it teaches</th><th>Reading</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="total">{len(entries)} notebooks, about {total} minutes of reading in all.</p>
</body>
</html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")


# ---------------------------------------------------------------- checks


def external_references(site: Path) -> list[str]:
    """Every place in the site's HTML/CSS that would make a browser fetch from another host."""
    found = []
    for f in sorted(site.rglob("*")):
        if f.suffix not in (".html", ".css"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        chunks = [text]
        if f.suffix == ".html":
            chunks += [m.group(1) for m in _SCRIPT_BODY.finditer(text) if re.search(_REMOTE + r"\w", m.group(1))]
        for n, chunk in enumerate(chunks):
            pats = EXTERNAL_PATTERNS if n == 0 else [re.compile(r"[\"'`]\s*" + _REMOTE + r"[\w.-]+", re.I)]
            for pat in pats:
                for m in pat.finditer(chunk):
                    found.append(f"{f.relative_to(site)}: {chunk[max(0, m.start() - 20): m.end() + 40]!r}")
    return found


def unexecuted(nb) -> bool:
    return any(c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None for c in nb.cells)


# ---------------------------------------------------------------- main


def build(notebook_paths: list[Path], out: Path, title: str = "The PPO actor loss, from ratio to RLHF update") -> list[Entry]:
    """Build the site for ``notebook_paths`` into ``out`` (replaced whole). Returns the index entries."""
    paths = sorted(notebook_paths, key=lambda p: p.name)
    if not paths:
        raise SystemExit("site: no notebooks given")
    notebooks = [nbformat.read(p, as_version=4) for p in paths]
    for p, nb in zip(paths, notebooks):
        if unexecuted(nb):
            print(f"site: warning: {p.name} has code cells that were not executed (run tools/execute.py first)", flush=True)
    entries = [describe(p, nb) for p, nb in zip(paths, notebooks)]

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=out.parent))
    try:
        (tmp / "static").mkdir()
        (tmp / "static" / "notebook.css").write_text(notebook_css(), encoding="utf-8")
        (tmp / "static" / "site.css").write_text(SITE_CSS, encoding="utf-8")
        install_katex(tmp / "katex")
        render_pages(entries, notebooks, tmp)
        render_index(entries, tmp, title)
        (tmp / "book.json").write_text(json.dumps(
            [{"notebook": e.path.name, "page": e.page, "title": e.title, "blurb": e.blurb, "words": e.words,
              "code_lines": e.code_lines, "minutes": e.minutes} for e in entries], indent=1) + "\n", encoding="utf-8")
        problems = external_references(tmp)
        if problems:
            raise SystemExit("site: these would be fetched from another host (the site must work offline):\n  "
                             + "\n  ".join(problems))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "site")
    ap.add_argument("--fetch", action="store_true", help="only fetch and verify KaTeX into build/cache/ (for `make setup`)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.fetch:
        print(f"site: KaTeX {KATEX_VERSION} ready ({katex_tarball().name}, integrity checked)")
        return 0
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    entries = build(paths, args.out)
    try:
        shown = args.out.resolve().relative_to(ROOT)
    except ValueError:
        shown = args.out
    print(f"site: {len(entries)} pages + index in {shown}/ ({time.perf_counter() - t0:.1f} s); "
          f"open {shown}/index.html", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
