"""`make workshop` (tools/workshop.py): stubs replace exactly the solutions, outputs are cleared, and each
real learner copy runs up to its first exercise and stops there with the stub's NotImplementedError."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from workshop import GENERIC_HINT, exercises, main, make_learner_copy, readme  # noqa: E402

EXERCISE_CELL = '''# Exercise 2.1 (easy, ~5 min): the per-token clipped loss
def clipped_loss(ratio, advantages, clip_eps):
    """-min(r*A, clip(r, 1-eps, 1+eps)*A), elementwise."""
    ### BEGIN SOLUTION
    # HINT: clamp the ratio, then take the smaller of the two products
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    ### END SOLUTION

check_clipped_loss(clipped_loss)'''

EXPECTED_STUB = '''# Exercise 2.1 (easy, ~5 min): the per-token clipped loss
def clipped_loss(ratio, advantages, clip_eps):
    """-min(r*A, clip(r, 1-eps, 1+eps)*A), elementwise."""
    # TODO: clamp the ratio, then take the smaller of the two products
    raise NotImplementedError("Exercise 2.1: clamp the ratio, then take the smaller of the two products")

check_clipped_loss(clipped_loss)'''


def executed(cell, count):
    """A code cell as it looks after a run: a count and an output."""
    cell.execution_count = count
    cell.outputs = [new_output("stream", name="stdout", text="ran\n")]
    return cell


def synthetic(*sources: str) -> nbformat.NotebookNode:
    cells = [new_markdown_cell("# A title\nThe question.")]
    cells += [executed(new_code_cell(s), i + 1) for i, s in enumerate(sources)]
    return new_notebook(cells=cells)


def test_stub_replaces_exactly_the_solution_with_the_hint():
    nb = synthetic("import torch", EXERCISE_CELL)
    out = make_learner_copy(nb)
    assert out.cells[2].source == EXPECTED_STUB
    assert out.cells[1].source == "import torch"
    assert out.cells[0] == nb.cells[0]  # markdown untouched


def test_generic_hint_and_deeper_indentation_and_two_blocks():
    src = (
        "# Exercise 5.2 (medium, ~10 min): two parts\n"
        "def f(x):\n"
        "    if x:\n"
        "        ### BEGIN SOLUTION\n"
        "        y = x + 1\n"
        "        return y\n"
        "        ### END SOLUTION\n"
        "    ### BEGIN SOLUTION\n"
        "    return 0\n"
        "    ### END SOLUTION\n"
        "\n"
        "check_gae(f)"
    )
    out = make_learner_copy(synthetic(src)).cells[1].source
    assert out == (
        "# Exercise 5.2 (medium, ~10 min): two parts\n"
        "def f(x):\n"
        "    if x:\n"
        f"        # TODO: {GENERIC_HINT}\n"
        f'        raise NotImplementedError("Exercise 5.2: {GENERIC_HINT}")\n'
        f"    # TODO: {GENERIC_HINT}\n"
        f'    raise NotImplementedError("Exercise 5.2: {GENERIC_HINT}")\n'
        "\n"
        "check_gae(f)"
    )


def test_top_level_solution_and_quotes_in_hint_make_valid_python():
    src = ('# Exercise 1.1 (easy, ~2 min): a ratio\n'
           '### BEGIN SOLUTION\n'
           '# HINT: use "exp" of a difference \\ not a quotient\n'
           'ratio = (lp - old).exp()\n'
           '### END SOLUTION')
    out = make_learner_copy(synthetic(src)).cells[1].source
    assert "ratio =" not in out and "BEGIN" not in out
    with pytest.raises(NotImplementedError) as err:
        exec(compile(out, "<cell>", "exec"), {})
    assert str(err.value) == 'Exercise 1.1: use "exp" of a difference \\ not a quotient'


def test_stubbed_exercise_raises_when_run():
    out = make_learner_copy(synthetic(EXERCISE_CELL)).cells[1].source
    called = []
    env = {"check_clipped_loss": lambda fn: called.append(fn) or fn(1.0, 1.0, 0.2)}
    with pytest.raises(NotImplementedError, match="Exercise 2.1"):
        exec(compile(out, "<cell>", "exec"), env)
    assert called, "the checker call after the solution must survive"


def test_outputs_and_counts_cleared_and_input_not_modified():
    nb = synthetic("x = 1", EXERCISE_CELL)
    before = nbformat.writes(nb)
    out = make_learner_copy(nb)
    assert nbformat.writes(nb) == before  # pure
    for cell in out.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_without_exercises_is_unchanged_except_outputs():
    nb = synthetic("import torch", "print(torch.ones(2))")
    out = make_learner_copy(nb)
    assert [c.source for c in out.cells] == [c.source for c in nb.cells]
    assert [c.cell_type for c in out.cells] == [c.cell_type for c in nb.cells]
    assert all(c.outputs == [] and c.execution_count is None for c in out.cells if c.cell_type == "code")
    assert out.metadata == nb.metadata
    assert exercises(nb) == []


def test_unbalanced_markers_raise():
    with pytest.raises(ValueError, match="unbalanced"):
        make_learner_copy(synthetic("# Exercise 1.1 (easy): x\n### BEGIN SOLUTION\nx = 1\n"))


def test_exercise_listing_and_readme():
    nb = synthetic("import torch", EXERCISE_CELL)
    exs = exercises(nb)
    assert [(e.number, e.title, e.checker) for e in exs] == [
        ("2.1", "Exercise 2.1 (easy, ~5 min): the per-token clipped loss", "check_clipped_loss")]
    text = readme([("02_clipped_surrogate.ipynb", exs)])
    assert "| 02_clipped_surrogate.ipynb | Exercise 2.1 (easy, ~5 min): the per-token clipped loss | " \
           "`check_clipped_loss` |" in text


def test_main_writes_copies_and_readme(tmp_path, capsys):
    src, out = tmp_path / "nb", tmp_path / "out"
    src.mkdir()
    nbformat.write(synthetic(EXERCISE_CELL), src / "02_clip.ipynb")
    nbformat.write(synthetic("x = 1"), src / "00_map.ipynb")  # not an exercise notebook: skipped
    assert main(["--src", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["02_clip.ipynb", "README.md"]
    learner = nbformat.read(out / "02_clip.ipynb", as_version=4)
    assert learner.cells[1].source == EXPECTED_STUB
    assert "check_clipped_loss" in (out / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "1 notebooks, 1 exercises" in printed and str(tmp_path) not in printed  # no machine path printed


# ----------------------------------------------------------------------------- the real notebooks

REAL = sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb"))
WITH_EXERCISES = [p for p in REAL if exercises(nbformat.read(p, as_version=4))]
SKIP_NONE = pytest.param(None, marks=pytest.mark.skip(reason="no notebook in notebooks/0[1-6]_*.ipynb has an "
                                                              "exercise yet (no '### BEGIN SOLUTION' cell)"))
REAL_PARAMS = [pytest.param(p, id=p.stem) for p in WITH_EXERCISES] or [SKIP_NONE]


def _solution_lines(source: str) -> list[str]:
    """The lines inside solution blocks that appear nowhere else in the cell (the code a learner must write)."""
    inside, lines, outside = False, [], []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("### BEGIN SOLUTION"):
            inside = True
        elif s.startswith("### END SOLUTION"):
            inside = False
        elif s and not s.startswith("#"):
            (lines if inside else outside).append(s)
    return [s for s in lines if s not in outside]


@pytest.mark.parametrize("path", REAL_PARAMS)
def test_learner_copy_has_no_solution_code(path):
    nb = nbformat.read(path, as_version=4)
    learner = make_learner_copy(nb)
    assert len(learner.cells) == len(nb.cells)
    for cell, copy_ in zip(nb.cells, learner.cells):
        if cell.cell_type != "code":
            assert copy_.source == cell.source
            continue
        assert "### BEGIN SOLUTION" not in copy_.source and "### END SOLUTION" not in copy_.source
        stub_lines = {s.strip() for s in copy_.source.splitlines()}
        leaked = [s for s in _solution_lines(cell.source) if s in stub_lines]
        assert not leaked, f"solution code left in the learner copy: {leaked}"
        assert copy_.outputs == [] and copy_.execution_count is None


@pytest.mark.slow
@pytest.mark.parametrize("path", REAL_PARAMS)
def test_learner_copy_runs_until_its_first_stub(path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    learner = make_learner_copy(nbformat.read(path, as_version=4))
    first = next(i for i, c in enumerate(learner.cells) if c.cell_type == "code" and "NotImplementedError(" in c.source)
    client = NotebookClient(learner, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})  # cwd = notebooks/, as in `make book`
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err.value))  # drop the traceback's colour codes
    assert "NotImplementedError" in text and "Exercise" in text, (
        f"the learner copy failed before its first stub (cell {first}):\n{text[-1500:]}")
    errored = [i for i, c in enumerate(learner.cells) if c.cell_type == "code"
               and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert errored == [first], f"expected the first stub (cell {first}) to be the first error, got cells {errored}"
    before = [c for c in learner.cells[:first] if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in before), "a cell before the first exercise did not run"
