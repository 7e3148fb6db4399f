"""Committed results files (data/results/*.json) and the helpers that read them (utils.results).

The slow test re-runs the first seed of every results file with its script's ``run_one`` and compares each
number with the committed row within ``reproduction_tolerance`` (the file's tolerance for the metric, or two of
the key's own standard deviations over seeds where that is wider): the file is what the script produces.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from utils.results import RESULTS_DIR, diff_se, load_results, mean_se, per_seed, reproduction_tolerance, save_results

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(RESULTS_DIR.glob("*.json"))


def test_there_are_results_files():
    assert FILES, "no data/results/*.json"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_results_file_is_complete(path):
    res = json.loads(path.read_text())
    assert (ROOT / res["script"]).is_file()
    assert len(res["seeds"]) >= 5 and set(res["rows"]) == {str(s) for s in res["seeds"]}
    keys = set(res["rows"][str(res["seeds"][0])])
    for row in res["rows"].values():
        assert set(row) == keys and all(math.isfinite(v) for v in row.values())
    assert {k.split("/")[1] for k in keys} <= set(res["tolerance"]) | {"score", "length", "distinct"}
    assert res["machine"] and res["seconds"] > 0


def _script(res):
    spec = importlib.util.spec_from_file_location(Path(res["script"]).stem, ROOT / res["script"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_first_seed_reproduces_the_committed_row(path):
    res = json.loads(path.read_text())
    seed = res["seeds"][0]
    script = _script(res)
    arms = getattr(script, "REPRO_ARMS", None)  # a subset keeps make test short; None: every arm
    if arms is None:
        row, _ = script.run_one(seed)
    else:
        row, _ = script.run_one(seed, arms={a: script.ARMS[a] for a in arms})
    committed = {k: v for k, v in res["rows"][str(seed)].items() if k in row}
    assert set(row) == set(committed) and len(row) > 3
    off = {k: (row[k], v, reproduction_tolerance(res, k)) for k, v in committed.items()
           if abs(row[k] - v) > reproduction_tolerance(res, k)}
    assert not off, f"seed {seed} moved beyond the tolerance (now, committed, tolerance): {off}"


def test_reproduction_tolerance_is_the_wider_of_the_metric_and_the_spread():
    res = {"seeds": [0, 1, 2], "tolerance": {"score": 0.1},
           "rows": {"0": {"a/score": 1.0, "b/score": 1.0}, "1": {"a/score": 1.0, "b/score": 2.0},
                    "2": {"a/score": 1.01, "b/score": 3.0}}}
    assert reproduction_tolerance(res, "a/score") == 0.1  # a steady arm keeps the metric's tolerance
    assert reproduction_tolerance(res, "b/score") == pytest.approx(2.0)  # sd 1.0 over seeds, times two
    with pytest.raises(KeyError):
        reproduction_tolerance(res, "a/kl")  # a metric without a stated tolerance is an error, not a pass


def test_mean_se_and_paired_difference():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    d, dse = diff_se([2.0, 3.0, 5.0], [1.0, 2.0, 3.0])
    assert d == pytest.approx(4 / 3) and dse == pytest.approx(mean_se([1.0, 1.0, 2.0])[1])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mean_se([1.0])
    with pytest.raises(ValueError, match="paired"):
        diff_se([1.0, 2.0], [1.0])


def test_load_and_save_round_trip(tmp_path, monkeypatch):
    save_results(tmp_path / "x.json", script="tools/exp_x.py", seeds=[0, 1], rows={"0": {"a/score": 1.0},
                 "1": {"a/score": 3.0}}, tolerance={"score": 0.1}, machine="m", seconds=1.0)
    monkeypatch.setenv("PPO_RESULTS", str(tmp_path))
    res = load_results("x")
    assert per_seed(res, "a/score") == [1.0, 3.0]
    with pytest.raises(FileNotFoundError, match="tools/exp_nope.py"):
        load_results("nope")
    with pytest.raises(ValueError, match="non-finite"):
        save_results(tmp_path / "y.json", rows={"0": {"a/score": float("nan")}})
