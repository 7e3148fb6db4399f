"""tools/bench.py: its log-prob variants against a loop, its extra-memory accounting by hand, and the --tiny run's keys."""

import importlib.util
import itertools
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


def _loop_reference(logits, labels, weights):
    """log p(label) and d(sum w * log p)/d logits, one row at a time from the definition."""
    values, grads = torch.empty(labels.shape, dtype=torch.double), torch.empty_like(logits)
    for idx in itertools.product(*(range(n) for n in labels.shape)):
        z = logits[idx]
        lse = torch.log(torch.exp(z - z.max()).sum()) + z.max()
        values[idx] = z[labels[idx]] - lse
        onehot = torch.zeros_like(z)
        onehot[labels[idx]] = 1.0
        grads[idx] = weights[idx] * (onehot - torch.exp(z - lse))  # d log p_y / dz = 1[v = y] - p_v
    return values, grads


@pytest.mark.parametrize("variant", ["naive", "chunked_autograd", "utils", "cross_entropy", "trl", "openrlhf"])
def test_every_variant_matches_a_loop_in_value_and_gradient(bench, variant):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=g, dtype=torch.double)  # 18 rows: chunks of 3, so several chunks
    labels = torch.randint(0, 11, (2, 9), generator=g)
    weights = torch.randn(2, 9, generator=g, dtype=torch.double)
    values, grads = _loop_reference(logits, labels, weights)
    a = logits.clone().requires_grad_(True)
    if variant not in bench.LOGPROB_VARIANTS:
        pytest.skip(f"{variant} is not installed: {bench.MISSING_PEERS.get(variant)}")
    out = bench.LOGPROB_VARIANTS[variant](a, labels)
    (out * weights).sum().backward()
    assert out.shape == labels.shape
    assert torch.allclose(out.detach().double(), values, atol=1e-6)  # utils computes in fp32
    assert torch.allclose(a.grad.double(), grads, atol=1e-6)


def test_the_trap_really_slices(bench):
    # the contrast variant must build one SliceBackward per chunk, as notebook 08 describes
    x = torch.randn(16, 7, requires_grad=True)
    out = bench.chunked_autograd_logprobs(x, torch.zeros(16, dtype=torch.long))
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    assert sum(type(n).__name__ == "SliceBackward0" for n in seen) == 8  # 16 rows, chunks of ceil(16 / 8) = 2


def test_extra_memory_by_hand(bench):
    # forward: naive's extra is its [N, V] log-softmax output (plus the [N] result); with backward the
    # [N, V] gradient is subtracted, leaving the saved log-softmax and the gather's zero-filled gradient
    fwd = bench.bench_logprobs(1000, 1, 16, backward=False, repeats=1)
    bwd = bench.bench_logprobs(1000, 1, 16, backward=True, repeats=1)
    n_bytes = 16 * 1000 * 4
    assert fwd["logits_bytes"] == bwd["logits_bytes"] == n_bytes
    assert n_bytes <= fwd["naive"]["extra_bytes"] <= n_bytes + 1024
    assert 2 * n_bytes <= bwd["naive"]["extra_bytes"] <= 2 * n_bytes + 1024
    assert bwd["naive"]["peak_bytes"] == bwd["naive"]["extra_bytes"] + n_bytes
    assert 0 < bwd["utils"]["extra_bytes"] <= 1024  # its softmax buffer becomes the gradient: a few numbers per row
    assert n_bytes <= fwd["utils"]["extra_bytes"] <= n_bytes + 1024  # forward below 8M logits: one fused call
    # the trap: 2 rows per chunk, 8 zero-filled [N, V] gradients summed; the running sum and the newest alive
    assert bwd["chunked_autograd"]["extra_bytes"] >= n_bytes
    assert bwd["extra_vs_naive"] == (bwd["utils"]["extra_bytes"] + 1) / (bwd["naive"]["extra_bytes"] + 1)
    assert bwd["best_peer"] in bench.PEERS and {"median_s", "q1_s", "q3_s"} <= set(bwd["ratio_to_best_peer"])


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
    assert {"meta", "targets", "definitions", "logprobs", "logprobs_summary", "machinery", "notebooks", "verdicts",
            "seconds"} <= set(report)
    assert report["meta"]["tiny"] is True
    assert {r["mode"] for r in report["logprobs"]} == {"forward", "forward+backward"}
    for row in report["logprobs"]:
        assert row["V"] == 50_257
        for name in ("naive", "chunked_autograd", "utils", *report["meta"]["peers"]):
            assert {"peak_bytes", "extra_bytes", "median_s", "q1_s", "q3_s", "min_s", "max_abs_err"} <= set(row[name])
            assert row[name]["max_abs_err"] < 1e-4
            if row["mode"] == "forward+backward":
                assert row[name]["max_abs_grad_err"] < 1e-6
                assert row[name]["extra_bytes"] == row[name]["peak_bytes"] - row["logits_bytes"]
            else:
                assert row[name]["extra_bytes"] == row[name]["peak_bytes"]
        assert row["naive"]["peak_bytes"] >= row["logits_bytes"]  # the full log-softmax copy, at least
        assert {"floor", "best_peer", "ratio_to_best_peer", "floor_ratio", "extra_vs_naive"} <= set(row)
        assert ({"autograd_sum", "autograd_sum_over_floor"} <= set(row)) == (row["mode"] == "forward+backward")
        assert row["best_peer"] in report["meta"]["peers"] and row["best_peer"] != "chunked_autograd"
    assert set(report["logprobs_summary"]) >= {"forward/max_ratio_to_best_peer", "forward+backward/max_floor_ratio"}
    for row in report["machinery"]:
        assert {"heap", "bare", "machinery", "head_utils", "head_cross_entropy", "policy_loss_only", "loss_math_only",
                "overhead", "overhead_per_round", "attribution", "page_faults_per_step"} <= set(row)
        a = row["attribution"]
        assert math.isclose(sum(a.values()), row["overhead"], abs_tol=1e-12)  # the pieces add up to the overhead
        q = row["overhead_per_round"]
        assert q["q1"] <= q["median"] <= q["q3"]
        assert all(v is None or v >= 0 for v in row["page_faults_per_step"].values())
    # measured with malloc as it comes, then (where mallopt exists, as on this Linux) with the heap kept
    heaps = [r["heap"] for r in report["machinery"]]
    assert heaps == ["as it comes"] + (["kept"] if report["meta"]["heap_kept"] else [])
    assert report["notebooks"]["seconds"] == {"00_fake.ipynb": 1.5}
    assert set(report["verdicts"]) == {"forward_at_least_as_fast_as_every_peer", "backward_at_least_as_fast_as_every_peer",
                                       "backward_within_floor_target", "memory_lead_kept", "machinery_overhead_ok"}
    assert all(isinstance(v, bool) for v in report["verdicts"].values())
    skip = {"/meta/load_average_1min", "/notebooks/seconds/00_fake.ipynb"}
    signed = ("overhead", "logprob_head_vs_cross_entropy", "policy_loss_checks_and_diagnostics", "rest")
    # (a ratio minus 1, or a difference of two timings: may be negative; a count of page faults may be 0)
    for path, value in _numbers(report):
        assert math.isfinite(value), path
        if (path not in skip and not path.endswith(signed) and "/overhead_per_round/" not in path
                and "/page_faults_per_step/" not in path and not path.endswith(("/max_abs_err", "/max_abs_grad_err"))):
            assert value > 0, path


def test_no_trap_skips_the_slow_variant(bench):
    row = bench.bench_logprobs(100, 1, 4, backward=True, repeats=1, trap=False)
    assert "chunked_autograd" not in row and "utils" in row and "naive" in row
    big = bench.bench_logprobs(16, 1, bench.TRAP_MAX_ROWS + 1, backward=True, repeats=1)  # too many rows for the trap
    assert "chunked_autograd" not in big


def test_missing_timings_are_reported_not_invented(bench, tmp_path):
    times, source = bench.notebook_times(False, tmp_path / "absent.json")
    assert times == {} and "not measured" in source


def test_keep_heap_and_page_faults(bench):
    import sys

    kept = bench.keep_heap()
    assert isinstance(kept, bool)
    if sys.platform.startswith("linux"):
        import ctypes

        assert kept is bool(hasattr(ctypes.CDLL(None), "mallopt"))  # glibc has it (musl does not)
    none = bench.minor_faults_per_call(lambda: None)
    assert none is None or none >= 0
    if none is not None:
        import mmap

        def touch_fresh_pages():  # 64 MiB straight from the OS, one byte written per page, handed back
            m = mmap.mmap(-1, 64 << 20)  # not through malloc: a heap that keeps freed memory could serve a tensor
            for offset in range(0, len(m), mmap.PAGESIZE):  # without a fault (it did once, after keep_heap)
                m[offset] = 1
            m.close()

        faults = bench.minor_faults_per_call(touch_fresh_pages, calls=3)
        assert faults >= 0.5 * (64 << 20) / mmap.PAGESIZE / 512  # at least half its 2 MiB huge pages, if the kernel uses them
