"""Make the workshop's learner copies of the exercise notebooks: solutions out, stubs in, outputs cleared.

    python tools/workshop.py            # notebooks/0[1-6]_*.ipynb -> build/workshop/

In every code cell, each block from ``### BEGIN SOLUTION`` to ``### END SOLUTION``
(markers included) becomes two lines at the block's indentation::

    # TODO: <hint>
    raise NotImplementedError("Exercise N.M: <hint>")

The hint is the text of a ``# HINT: ...`` line inside the block, or a generic one;
N.M comes from the cell's first line, ``# Exercise N.M (difficulty, ~minutes): title``.
All outputs and execution counts are cleared. ``build/workshop/README.md`` lists the
exercises: notebook, title line, checker. Exercise format: docs/conventions.md.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_GLOB = "0[1-6]_*.ipynb"
GENERIC_HINT = "write your solution here; the checker call below tests it"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SOLUTION = re.compile(  # one solution block, markers included; the marker's indentation is kept for the stub
    r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[ \t]*\n(?P<body>.*?)^[ \t]*### END SOLUTION[ \t]*(?:\n|\Z)",
    re.M | re.S,
)
EXERCISE = re.compile(r"^\s*#\s*Exercise\s+(?P<num>\d+(?:\.\d+)*)\b")
HINT = re.compile(r"^[ \t]*#[ \t]*HINT:[ \t]*(?P<hint>.*?)[ \t]*$", re.M)
CHECKER = re.compile(r"\b(?P<name>check_\w+)\s*\(")


@dataclass
class Exercise:
    """One exercise cell: its number, its first line, and the checker it calls (None if it calls none)."""

    number: str
    title: str
    checker: str | None


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _literal(text: str) -> str:
    """A double-quoted Python string literal for ``text``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exercise_info(source: str) -> Exercise | None:
    """The exercise a code cell holds (from its ``# Exercise N.M ...`` first line), or None if it has no solution."""
    if BEGIN not in source:
        return None
    first = source.lstrip("\n").splitlines()[0].strip()
    m = EXERCISE.match(first)
    checker = None
    after = source.rsplit(END, 1)[-1]  # the checker is called after the solution
    c = CHECKER.search(after) or CHECKER.search(source)
    if c:
        checker = c.group("name")
    return Exercise(m.group("num") if m else "?", first.lstrip("#").strip() if m else "(no '# Exercise' line)", checker)


def stub_source(source: str) -> str:
    """``source`` with every solution block replaced by a TODO line and a ``raise NotImplementedError`` stub."""
    info = exercise_info(source)
    if info is None:
        return source
    label = f"Exercise {info.number}" if info.number != "?" else "Exercise"

    def stub(m: re.Match) -> str:
        hint_match = HINT.search(m.group("body"))
        hint = hint_match.group("hint") if hint_match and hint_match.group("hint") else GENERIC_HINT
        ind = m.group("indent")
        ending = "\n" if m.group(0).endswith("\n") else ""
        return f"{ind}# TODO: {hint}\n{ind}raise NotImplementedError({_literal(f'{label}: {hint}')}){ending}"

    out = SOLUTION.sub(stub, source)
    if BEGIN in out or END in out:
        raise ValueError(f"unbalanced solution markers in the cell starting {source.splitlines()[0]!r}: "
                         f"every '{BEGIN}' needs an '{END}' after it")
    return out


def make_learner_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A learner's copy of a notebook: solutions replaced by stubs, outputs and execution counts cleared.

    Pure: ``nb`` is not modified. Cells without solution markers keep their source unchanged.
    """
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)  # timing metadata from a run
        src = _source(cell)
        new = stub_source(src)
        if new != src:
            cell.source = new
    return out


def exercises(nb: nbformat.NotebookNode) -> list[Exercise]:
    """The exercises of a notebook, in order."""
    found = [exercise_info(_source(c)) for c in nb.cells if c.cell_type == "code"]
    return [e for e in found if e is not None]


def readme(listing: list[tuple[str, list[Exercise]]]) -> str:
    """build/workshop/README.md: the exercises, one table row each."""
    lines = [
        "# Workshop: the exercises",
        "",
        "Learner copies of the notebooks, made by `make workshop` (`tools/workshop.py`): each solution is",
        "replaced by a `raise NotImplementedError(...)` stub with a hint; outputs are cleared. Write the",
        "function, run the cell: its checker (from `utils/checkers/`) prints a line starting with a",
        "check mark, or names the mistake. Run the notebooks in order; each stops at its first unsolved",
        "exercise. The solutions are in the notebooks in `notebooks/`.",
        "",
        "| notebook | exercise | checker |",
        "|---|---|---|",
    ]
    total = 0
    for name, exs in listing:
        for e in exs:
            checker = f"`{e.checker}`" if e.checker else "(none)"
            lines.append(f"| {name} | {e.title.replace('|', '/')} | {checker} |")
            total += 1
    if total == 0:
        lines.append("| (none yet) | | |")
    lines += ["", f"{total} exercises in {sum(1 for _, exs in listing if exs)} notebooks.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "notebooks", help="folder of the solution notebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "workshop", help="folder for the learner copies")
    args = ap.parse_args(argv)
    paths = sorted(args.src.glob(NOTEBOOK_GLOB))
    if not paths:
        print(f"no notebooks matching {NOTEBOOK_GLOB} in {args.src.name}/", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    listing = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        exs = exercises(nb)
        nbformat.write(make_learner_copy(nb), args.out / path.name)
        listing.append((path.name, exs))
        print(f"{path.name:40s} {len(exs)} exercise(s)")
    (args.out / "README.md").write_text(readme(listing), encoding="utf-8")
    n = sum(len(e) for _, e in listing)
    try:
        shown = args.out.resolve().relative_to(ROOT)
    except ValueError:
        shown = args.out.name
    print(f"{len(paths)} notebooks, {n} exercises -> {shown}/ (README.md lists them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
