"""tools/bench.py: the --tiny smoke run writes every key with positive, finite values; its log-prob fix is exact."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(obj, path=""):
    """Every int/float leaf of a JSON object, with its path (bools are verdicts, not measurements)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_custom_backward_logprobs_match_a_loop(bench):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.double)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.double)
    a = logits.clone().requires_grad_(True)
    out = bench.custom_backward_logprobs(a, labels)
    (out * weights).sum().backward()
    for b in range(2):
        for t in range(5):
            z = logits[b, t]
            p = torch.exp(z - torch.logsumexp(z, 0))
            assert math.isclose(out[b, t].item(), (z[labels[b, t]] - torch.logsumexp(z, 0)).item(), abs_tol=1e-12)
            onehot = torch.zeros(11, dtype=torch.double)
            onehot[labels[b, t]] = 1.0
            assert torch.allclose(a.grad[b, t], weights[b, t] * (onehot - p), atol=1e-12)  # d log p_y / dz = 1[y] - p
    assert torch.allclose(bench.naive_logprobs(logits, labels), out.detach(), atol=1e-12)


def test_tiny_run_writes_positive_finite_numbers(bench, tmp_path):
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"00_fake.ipynb": 1.5}))
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--threads", "1", "--out", str(out), "--timings", str(timings)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert {"meta", "targets", "logprobs", "logprobs_summary", "machinery", "notebooks", "verdicts", "seconds"} <= set(report)
    assert report["meta"]["tiny"] is True
    assert {r["mode"] for r in report["logprobs"]} == {"forward", "forward+backward"}
    for row in report["logprobs"]:
        assert row["V"] == 50_257
        for name in ("naive", "efficient", "custom_backward"):
            assert {"peak_bytes", "median_s", "q1_s", "q3_s", "min_s", "max_abs_err"} <= set(row[name])
            assert row[name]["max_abs_err"] < 1e-4
        assert row["naive"]["peak_bytes"] >= row["logits_bytes"]  # the full log-softmax copy, at least
    for key in ("efficient_peak_ratio", "efficient_time_ratio", "custom_backward_peak_ratio"):
        assert all(key in r for r in report["logprobs"])
    for row in report["machinery"]:
        assert {"bare", "machinery", "machinery_custom_backward", "policy_loss_only", "overhead"} <= set(row)
    assert report["notebooks"]["seconds"] == {"00_fake.ipynb": 1.5}
    assert all(isinstance(v, bool) for v in report["verdicts"].values())
    skip = {"/meta/load_average_1min", "/notebooks/seconds/00_fake.ipynb"}
    signed = ("overhead", "overhead_custom_backward", "logprob_backward", "policy_loss_checks_and_diagnostics", "rest")
    # (a ratio minus 1, or a difference of two timings: may be negative)
    for path, value in _numbers(report):
        assert math.isfinite(value), path
        if path not in skip and not path.endswith(signed) and not path.endswith("/max_abs_err"):
            assert value > 0, path


def test_missing_timings_are_reported_not_invented(bench, tmp_path):
    times, source = bench.notebook_times(False, tmp_path / "absent.json")
    assert times == {} and "not measured" in source
