"""Build the book: stage book/ and the notebooks into one Sphinx source folder, then run Sphinx.

    python book/build.py                  # -> build/site/ (what `make site` runs)
    python book/build.py OUT NB.ipynb ... # chosen notebooks into another folder (the tests)

Sphinx reads one source folder, and the notebooks live in notebooks/ beside book/; a symlink would
break the links between notebooks (MyST resolves it to a path outside the source folder), so both are
copied into build/book-src/ first (a few MB, well under a second). Nothing is executed: the
notebooks are rendered with the outputs they were committed with (book/conf.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def build(out: Path, notebooks: list[Path] | None = None, env: dict | None = None, capture: bool = False) -> Path:
    """Render ``notebooks`` (default: notebooks/[0-9]*.ipynb) with book/ into ``out`` (replaced whole).

    Sources are staged in ``<out>-src/``. ``env``: the environment for Sphinx; ``capture``: keep its output
    (raises CalledProcessError on a warning or a failed check either way).
    """
    notebooks = sorted(notebooks or (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if not notebooks:
        raise SystemExit("book: no notebooks to render")
    out = Path(out).resolve()
    stage = out.parent / (out.name + "-src")
    for d in (out, stage):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(BOOK, stage, ignore=shutil.ignore_patterns("__pycache__", "build.py"))
    (stage / "notebooks").mkdir()
    for nb in notebooks:
        shutil.copyfile(nb, stage / "notebooks" / Path(nb).name)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-W", "--keep-going",
           "-d", str(stage / ".doctrees"), str(stage), str(out)]
    subprocess.run(cmd, check=True, env=env, capture_output=capture)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        build(Path(args[0]) if args else ROOT / "build" / "site", [Path(a) for a in args[1:]] or None)
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
