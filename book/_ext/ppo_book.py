"""The book's two project-specific pieces, as a Sphinx extension (loaded by book/conf.py).

1. Solutions folded behind a toggle. An exercise cell (docs/conventions.md) holds its solution between
   ``### BEGIN SOLUTION`` and ``### END SOLUTION``. When Sphinx reads a notebook, each such cell is shown as
   the code before the solution, the solution folded in a ``<details>`` ("Show solution", myst-nb's
   ``hide-input``), and the code after it with the cell's outputs. The notebook file is not changed.
2. Nothing remote. After the build, every HTML and CSS file is scanned for anything a browser would fetch
   from another host (a CDN script, a remote stylesheet or font); the build fails if there is one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*$")
SHOW, HIDE = "Show solution", "Hide solution"


def split_solutions(source: str) -> list[tuple[str, bool]]:
    """``source`` cut at the solution markers: [(code, is_solution), ...], markers dropped, blank pieces left out."""
    pieces: list[tuple[str, bool]] = []
    lines: list[str] = []
    inside = False
    for line in source.splitlines():
        m = _MARKER.match(line)
        if m is None:
            lines.append(line)
            continue
        if (m.group(1) == "BEGIN") == inside:
            raise ValueError(f"unbalanced solution markers: {line.strip()!r} where the previous marker was not closed/opened")
        pieces.append(("\n".join(lines), inside))
        lines, inside = [], not inside
    if inside:
        raise ValueError("a '### BEGIN SOLUTION' has no '### END SOLUTION'")
    pieces.append(("\n".join(lines), inside))
    return [(code.strip("\n"), sol) for code, sol in pieces if code.strip()]


def fold_solutions(nb: dict) -> int:
    """Split every exercise cell of the notebook ``nb`` (JSON dict, changed in place); returns how many were split."""
    cells, folded = [], 0
    for cell in nb.get("cells", []):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if cell.get("cell_type") != "code" or BEGIN not in src:
            cells.append(cell)
            continue
        pieces = split_solutions(src)
        folded += 1
        for k, (code, is_solution) in enumerate(pieces):
            last = k == len(pieces) - 1
            meta = json.loads(json.dumps(cell.get("metadata", {})))
            if is_solution:
                meta["tags"] = [*meta.get("tags", []), "hide-input"]
                meta["mystnb"] = {**meta.get("mystnb", {}), "code_prompt_show": SHOW, "code_prompt_hide": HIDE}
            piece = {
                "cell_type": "code",
                "metadata": meta,
                "source": code,
                "execution_count": cell.get("execution_count") if last else None,
                "outputs": cell.get("outputs", []) if last else [],
            }
            if "id" in cell:
                piece["id"] = f"{cell['id']}-{k}"
            cells.append(piece)
    nb["cells"] = cells
    return folded


def _fold_on_read(app, docname: str, source: list[str]) -> None:
    if not app.env.doc2path(docname).suffix == ".ipynb":
        return
    nb = json.loads(source[0])
    if fold_solutions(nb):
        source[0] = json.dumps(nb)


# Anything a browser would fetch from another host: src/href of loading tags, CSS url()/@import,
# and URLs inside <script> bodies (e.g. a dynamic import). Links a reader clicks (<a href>) are fine.
_REMOTE = r"(?:https?:)?//"
EXTERNAL_PATTERNS = [
    re.compile(rf"<(?:script|link|img|iframe|source|video|audio|embed|object|track|input)\b[^>]*?\s(?:src|href|srcset|data)\s*=\s*[\"']?\s*{_REMOTE}", re.I),
    re.compile(rf"url\(\s*[\"']?\s*{_REMOTE}", re.I),
    re.compile(rf"@import\s+[\"']?\s*(?:url\()?\s*[\"']?{_REMOTE}", re.I),
]
_SCRIPT_BODY = re.compile(r"<script\b[^>]*>(.*?)</script>", re.I | re.S)
_IN_SCRIPT = re.compile(r"[\"'`]\s*" + _REMOTE + r"[\w.-]+", re.I)


def external_references(site: Path) -> list[str]:
    """Every place in the site's HTML/CSS that would make a browser fetch from another host."""
    found = []
    for f in sorted(Path(site).rglob("*")):
        if f.suffix not in (".html", ".css"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        chunks = [(text, EXTERNAL_PATTERNS)]
        if f.suffix == ".html":
            chunks += [(m.group(1), [_IN_SCRIPT]) for m in _SCRIPT_BODY.finditer(text)]
        for chunk, pats in chunks:
            for pat in pats:
                for m in pat.finditer(chunk):
                    found.append(f"{f.relative_to(site)}: {chunk[max(0, m.start() - 20): m.end() + 40]!r}")
    return found


def _check_offline(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    found = external_references(Path(app.outdir))
    if found:
        raise RuntimeError("the book would load from another host:\n  " + "\n  ".join(found[:20]))


def setup(app):
    app.connect("source-read", _fold_on_read)
    # after sphinx-mathjax-offline copies MathJax (also on build-finished, registered earlier)
    app.connect("build-finished", _check_offline, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
