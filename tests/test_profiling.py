"""utils.profiling: timing statistics by hand, peak memory against allocations of known size."""

import gc
import sys
import time

import pytest
import torch

from utils.profiling import (Timing, format_bytes, format_seconds, peak_memories, peak_memory, peak_rss_delta, rss_method, time_fn,
                             time_interleaved)

MB4 = 1000 * 1000 * 4  # bytes of a float32 [1000, 1000] tensor


def test_timing_quartiles_by_hand():
    t = Timing((5.0, 1.0, 4.0, 2.0, 3.0))  # sorted 1..5; inclusive quartiles sit on data points
    assert (t.min, t.q1, t.median, t.q3, t.iqr) == (1.0, 2.0, 3.0, 4.0, 2.0)
    one = Timing((0.25,))
    assert (one.q1, one.median, one.q3, one.iqr) == (0.25, 0.25, 0.25, 0.0)
    assert "n=5" in str(t) and "3.00 s" in str(t)
    with pytest.raises(ValueError, match="times"):
        Timing(())


def test_time_fn_counts_calls_and_measures_sleep():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    t = time_fn(fn, repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3  # warm-up calls are made but not recorded
    assert t.min >= 0.009 and t.median < 1.0
    with pytest.raises(ValueError, match="repeats"):
        time_fn(fn, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_fn(fn, warmup=-1)


def test_time_interleaved_takes_turns():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.005))}
    out = time_interleaved(fns, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then strict turns
    assert set(out) == {"a", "b"} and len(out["a"].times) == len(out["b"].times) == 3
    assert out["b"].min >= 0.004 > out["a"].median
    import gc

    seen = []
    time_interleaved({"gc": lambda: seen.append(gc.isenabled())}, repeats=2, warmup=1)
    assert seen == [True, False, False] and gc.isenabled()  # off during the timed rounds only (as timeit)
    with pytest.raises(ValueError, match="fns"):
        time_interleaved({})
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(fns, repeats=0)


def test_format_helpers():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert format_seconds(2.5) == "2.50 s" and format_seconds(0.0123) == "12.3 ms" and format_seconds(5e-6) == "5 us"


def test_peak_memory_one_tensor_is_its_size():
    assert peak_memory(lambda: torch.ones(1000, 1000)) == MB4


def test_peak_memory_sums_live_tensors_and_forgets_freed_ones():
    def two_alive():
        a = torch.ones(1000, 1000)
        b = torch.ones(1000, 1000)
        return a, b

    def one_after_another():
        a = torch.ones(1000, 1000)
        del a  # freed before the next allocation: the peak is the larger one alone
        return torch.ones(2000, 1000)

    assert peak_memory(two_alive) == 2 * MB4
    assert peak_memory(one_after_another) == 2 * MB4


def test_peak_memory_counts_temporaries_inside_a_call():
    x = torch.randn(300, 1000)

    def sum_of_exp():  # exp materialises a [300, 1000] temporary, freed before the call returns
        return float(x.exp().sum())

    peak = peak_memory(sum_of_exp)  # the temporary + a few bytes for the 0-d sum (and its partial sums)
    assert x.numel() * 4 < peak <= x.numel() * 4 + 64


def test_peak_memory_ignores_tensors_made_before_and_is_repeatable():
    x = torch.randn(1000, 1000)
    box = [x]
    del x
    assert peak_memory(lambda: box.clear()) == 0  # freeing an older tensor is not negative memory
    y = torch.randn(500, 1000)
    runs = {peak_memory(lambda: torch.log_softmax(y, -1)) for _ in range(3)}
    assert runs == {500 * 1000 * 4}  # exact and the same every time


def test_peak_memories_under_one_profiler_match_one_profiler_each():
    y = torch.randn(500, 1000)
    held = []
    calls = {
        "big": lambda: torch.ones(2000, 1000),                 # returned, then dropped before the next call
        "none": lambda: None,                                   # allocates nothing
        "small": lambda: torch.ones(1000, 1000),                # its peak is its own, not the big call's
        "keeps": lambda: held.append(torch.ones(1000, 1000)),   # still alive after the call...
        "log_softmax": lambda: torch.log_softmax(y, -1),        # ...which does not count against the next one
    }
    together = peak_memories(calls)
    assert list(together) == list(calls)
    assert together == {"big": 2 * MB4, "none": 0, "small": MB4, "keeps": MB4, "log_softmax": 500 * 1000 * 4}
    held.clear()
    assert together == {name: peak_memory(fn) for name, fn in calls.items()}
    seen = []
    peak_memories({"a": lambda: seen.append(gc.isenabled())})
    assert seen == [False] and gc.isenabled()  # off during the calls (a collection would lower the total), on after


def test_peak_memory_stops_profiler_on_error():
    def boom():
        torch.ones(10)
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        peak_memory(boom)
    assert peak_memory(lambda: torch.ones(1000, 1000)) == MB4  # a second profiler starts fine


def test_peak_rss_delta_sees_a_touched_buffer():
    # b"x" * n writes every page, so the OS must back it; bytes(n) might be lazily zeroed pages.
    n = 200 * 2**20
    big = peak_rss_delta(f"n = {n}", "buf = b'x' * n")
    # setup's own peak (a 300 MiB temporary) is forgotten: only what stmt adds counts
    small = peak_rss_delta("tmp = b'x' * (300 * 2**20)\ndel tmp", "buf = b'x' * 1024")
    assert n <= big <= n + 10 * 2**20
    assert small < 5 * 2**20
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        peak_rss_delta("pass", "1 / 0")


MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child's ru_maxrss semantics below are Linux's")
def test_peak_rss_delta_off_linux_falls_back_to_ru_maxrss(monkeypatch):
    # Pretend to be macOS: the parent picks the ru_maxrss probe, the child (really Linux) reports KiB.
    import resource

    monkeypatch.setattr(sys, "platform", "darwin")
    assert rss_method() == "ru_maxrss"
    # A Linux child inherits this process's peak, so only what stmt adds above it is seen: allocate past it.
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = inherited + 100 * MIB
    got = peak_rss_delta(f"n = {n}", "buf = b'x' * n")
    assert 100 * MIB <= got <= n + 10 * MIB  # a lower bound of the true n, and it sees the part above the old peak
    assert peak_rss_delta("pass", "buf = b'x' * 1024") < 5 * MIB
    # the child that believes it is macOS reads ru_maxrss as bytes (macOS's unit), so it reports 1/1024 of the KiB
    as_bytes = peak_rss_delta(f"import sys\nsys.platform = 'darwin'\nn = {n}", "buf = b'x' * n")
    assert as_bytes <= got / 1024 + 2048
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        peak_rss_delta("pass", "1 / 0")


def test_peak_rss_delta_says_when_the_platform_cannot_measure(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    assert rss_method() is None
    with pytest.raises(RuntimeError, match="win32"):
        peak_rss_delta("pass", "buf = b'x' * 1024")
    monkeypatch.setattr(sys, "platform", "linux")
    assert rss_method() == "VmHWM"


def test_time_interleaved_shuffles_the_order_per_round():
    seen = []
    fns = {k: (lambda k=k: seen.append(k)) for k in "abcd"}
    out = time_interleaved(fns, repeats=6, warmup=0, shuffle=0)
    rounds = [seen[i : i + 4] for i in range(0, 24, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every function once per round
    assert len({tuple(r) for r in rounds}) > 1  # not the same order every round
    assert all(len(t.times) == 6 for t in out.values())
    seen.clear()
    time_interleaved(fns, repeats=2, warmup=0)
    assert seen == list("abcdabcd")  # without a seed: the given order


def test_top_ops_finds_the_expensive_operator():
    import torch

    from utils.profiling import top_ops

    x = torch.randn(512, 512)
    got = top_ops(lambda: (x @ x, x + 1), k=2)
    assert len(got) == 2 and got[0][0] in ("aten::mm", "aten::matmul")  # a matmul beats one addition
    assert all(count >= 1 and ms >= 0 for _, count, ms in got)
    with pytest.raises(ValueError, match="k must be"):
        top_ops(lambda: None, k=0)
