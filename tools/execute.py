"""Execute notebooks top to bottom, each on a fresh kernel, and check their hygiene.

    python tools/execute.py notebooks/*.ipynb --inplace --html build/html

One line per notebook with its time. Fails (exit 1) if a cell raises, if the
outputs show a machine path, or if execution counts are not 1..N. Timings go to
build/timings.json (``make bench`` reads them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"/(root|home|tmp|work|Users)/")


def hygiene_problems(nb) -> list[str]:
    """What a reader should not see in a committed notebook: errors, machine paths, out-of-order counts."""
    problems = []
    counts = [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]
    if counts != list(range(1, len(counts) + 1)):
        problems.append(f"execution counts are {counts}, not 1..{len(counts)}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o.get("ename") for o in outputs if o.get("output_type") == "error"]
    if errors:
        problems.append(f"error outputs: {errors}")
    text = json.dumps([{k: v for k, v in o.items() if k != "data" or "image/png" not in v} for o in outputs])
    m = MACHINE_PATH.search(text)
    if m:
        problems.append(f"an output shows a machine path: ...{text[max(0, m.start() - 60): m.end() + 40]}...")
    return problems


def execute(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run one notebook on a fresh kernel, working directory = its folder. Returns (notebook, seconds)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - t0


def to_html(nb, out: Path) -> None:
    """Write a standalone HTML copy of an executed notebook."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    out.write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--inplace", action="store_true", help="write the executed notebook back")
    ap.add_argument("--html", type=Path, help="folder for HTML copies")
    ap.add_argument("--timings", type=Path, default=ROOT / "build" / "timings.json")
    args = ap.parse_args(argv)
    timings, failed = {}, False
    for path in sorted(args.notebooks):
        try:
            nb, secs = execute(path)
        except Exception as err:  # a cell raised: show which, keep going so every failure is listed
            print(f"FAIL {path.name}: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}", flush=True)
            failed = True
            continue
        problems = hygiene_problems(nb)
        timings[path.name] = round(secs, 1)
        print(f"{'ok  ' if not problems else 'FAIL'} {path.name:40s} {secs:6.1f} s", flush=True)
        for p in problems:
            print(f"     {p}")
        failed |= bool(problems)
        if args.inplace:
            nbformat.write(nb, path)
        if args.html:
            args.html.mkdir(parents=True, exist_ok=True)
            to_html(nb, args.html / (path.stem + ".html"))
    args.timings.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.timings.read_text()) if args.timings.exists() else {}
    args.timings.write_text(json.dumps({**old, **timings}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
