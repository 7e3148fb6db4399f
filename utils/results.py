"""Experiments over seeds whose runs do not fit a notebook's minute: save them once, load them in the notebook.

A results file ``data/results/<name>.json`` is written by ``tools/exp_<name>.py`` and holds::

    {"script": "tools/exp_<name>.py", "policy": ..., "seeds": [0, 1, ...],
     "rows": {"<seed>": {"<arm>/<metric>": value, ...}},      # one row of final numbers per seed
     "curves": {"<seed>": {"<arm>/<metric>": [per update]}},  # for the plots
     "tolerance": {"<metric>": abs_tol}, "machine": ..., "seconds": ...}

``tests/test_results.py`` re-runs the first seed and compares it with the committed row within
``reproduction_tolerance`` (the file's ``tolerance``, widened to the key's own spread over seeds). ``$PPO_RESULTS`` points the loader at another folder (``make robust`` writes results for
the second model there). Used from notebooks/06_actor_update.ipynb on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

from utils.models import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "data" / "results"
RESULTS_ENV = "PPO_RESULTS"
REPRO_SPREADS = 2.0  # a re-run of one seed may land this many of the key's seed-to-seed standard deviations away


def results_dir() -> Path:
    """``$PPO_RESULTS`` if set, else ``data/results``."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def load_results(name: str) -> dict:
    """The results file ``<results_dir>/<name>.json``; a clear error says which script writes it."""
    path = results_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file {name}.json in {path.parent.name}/: run tools/exp_{name}.py to write it")
    return json.loads(path.read_text())


def machine() -> str:
    """One line naming the machine: CPU architecture, core count, OS, torch version."""
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def save_results(path: Path, **fields) -> None:
    """Write a results file (keys as in the module docstring), checking that every value is finite."""
    for seed, row in fields.get("rows", {}).items():
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"seed {seed}: non-finite results for {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1))


def per_seed(results: dict, key: str) -> list[float]:
    """The values of ``"<arm>/<metric>"`` over the file's seeds, in seed order."""
    return [results["rows"][str(s)][key] for s in results["seeds"]]


def reproduction_tolerance(results: dict, key: str) -> float:
    """How far a re-run of one seed may land from its committed value of ``"<arm>/<metric>"``.

    The larger of the file's tolerance for the metric and REPRO_SPREADS standard deviations of the key over the
    committed seeds. On the machine that wrote the file a re-run is exact; on another CPU float sums round
    differently, and in a chaotic arm (no clip) the sampled tokens can part ways during the run. Then a seed's
    number moves by a share of that arm's own spread: measured 0.33 of it for ``eps_none/distinct`` of
    actor_update.json on one host, four times the metric's tolerance there (0.087 against 0.06).
    """
    metric = key.split("/")[1]
    return max(results["tolerance"][metric], REPRO_SPREADS * statistics.stdev(per_seed(results, key)))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)) of per-seed values."""
    if len(values) < 2:
        raise ValueError(f"a standard error needs at least 2 seeds, got {len(values)}")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def diff_se(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and its standard error, paired by seed (same seed = same first rollout)."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds needed: {len(a)} vs {len(b)} values")
    return mean_se([x - y for x, y in zip(a, b)])
