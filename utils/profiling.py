"""Wall-clock time and peak CPU memory of a call: the numbers notebook 08 and ``make bench`` report.

- ``time_fn(fn, repeats, warmup) -> Timing``: seconds per call, with the spread
  (median, quartiles, min) over repeats, because one timing on a shared machine
  is one sample of noise. ``time_interleaved({name: fn}, ...)`` times several
  functions in turns, so that a burst of load on the machine hits them alike:
  use it whenever the answer is a ratio of two timings.
- ``peak_memory(fn) -> int``: the largest number of bytes that ``fn()`` had
  allocated (and not yet freed) at any moment, above what was live before it.
  Read from the CPU allocator's own bookkeeping through ``torch.profiler``
  (``profile_memory=True``): every allocation and free made through PyTorch's
  CPU allocator is an event carrying the running total of bytes allocated since
  profiling began, and the peak is the largest running total. Exact to the
  byte and repeatable; it counts tensors (and temporaries inside kernels that
  use the allocator), not Python objects or memory outside PyTorch.
  ``peak_memories({name: fn})`` measures several calls at once: one garbage collection and one profiler for all.
- ``peak_rss_delta(setup, stmt)``: the cross-check, from outside. Runs ``setup``
  in a fresh Python, resets the kernel's peak-RSS mark, runs ``stmt`` and
  returns how far the peak resident set (``VmHWM``) rose above the resident set
  before ``stmt``. It sees everything the operating system sees, but it is
  coarse: the C library keeps some freed memory for reuse, so runs can differ
  by megabytes, and each call pays for a new interpreter (about 2 s with
  torch). ``rss_method()`` says how it measures on this platform: ``"VmHWM"``
  on Linux (exact up to pages); ``"ru_maxrss"`` elsewhere with the
  ``resource`` module (macOS, the BSDs), the rise of
  ``getrusage().ru_maxrss`` during ``stmt``, a lower bound (that peak cannot
  be reset, so what ``stmt`` allocates below an earlier peak of the process
  is not seen; on Linux, where ``ru_maxrss`` is inherited from the parent
  across fork and exec, it is no use at all); ``None`` on Windows, where
  ``peak_rss_delta`` raises.

Derived in notebooks/08_making_it_fast.ipynb.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator



@dataclass(frozen=True)
class Timing:
    """Seconds taken by each repeat of a call; summarise with the median and IQR, or the min."""

    times: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("times is empty: a Timing needs at least one measurement")

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        """Fastest repeat: the one least disturbed by other work on the machine."""
        return min(self.times)

    @property
    def q1(self) -> float:
        """First quartile (seconds); equals the median for a single repeat."""
        return _quartiles(self.times)[0]

    @property
    def q3(self) -> float:
        """Third quartile (seconds); equals the median for a single repeat."""
        return _quartiles(self.times)[2]

    @property
    def iqr(self) -> float:
        """Interquartile range q3 - q1 (seconds): the spread of the middle half of the repeats."""
        return self.q3 - self.q1

    def __str__(self) -> str:
        return (f"{format_seconds(self.median)} (IQR {format_seconds(self.q1)}-{format_seconds(self.q3)}, "
                f"min {format_seconds(self.min)}, n={len(self.times)})")


def _quartiles(xs: tuple[float, ...]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def format_seconds(s: float) -> str:
    """Seconds as a short string in s, ms or us."""
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def format_bytes(n: float) -> str:
    """Bytes as a short string in B, KiB, MiB or GiB (powers of 1024)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the Timing.

    The warm-up pays one-off costs (first-touch of memory, lazy initialisation)
    that a steady training loop does not pay on every step.
    """
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    gc.collect()  # so a collection triggered by earlier garbage does not land inside one repeat
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     shuffle: int | None = None) -> dict[str, Timing]:
    """Time several functions in turns (a, b, a, b, ...); return one Timing per name.

    Each function gets ``warmup`` untimed calls first. Interleaving makes the
    ratio of two medians robust to load that comes and goes on a shared machine.
    ``shuffle``: a seed; each round then runs the functions in a fresh random order, so that no
    function always follows the same one (a call can run slower or faster after a particular
    neighbour: sleeping threads, caches). Round k of every Timing is still the same round.
    The garbage collector is off while the rounds run (as in ``timeit``).
    """
    if not fns:
        raise ValueError("fns is empty: nothing to time")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(shuffle)
    was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land in whichever call happens to run then
    try:
        for _ in range(repeats):
            if shuffle is not None:
                rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


@contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 briefly: the profiler's C++ library prints a line on start and stop."""
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _profiled(fn: Callable[[], object], **options) -> "torch.profiler.profile":
    """Run ``fn`` once under ``torch.profiler`` (CPU activity, plus ``options``), quietly; return the profiler."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], **options)
    with _quiet_stderr_fd():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    return prof


def top_ops(fn: Callable[[], object], k: int = 3) -> list[tuple[str, int, float]]:
    """The ``k`` aten operators with the most self CPU time in one call of ``fn``: (name, calls, milliseconds).

    Runs ``fn`` once under ``torch.profiler`` (warm it up first: a first call pays one-off costs).
    "Self" time excludes the operators an operator calls, so the list shows where the work is done.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    prof = _profiled(fn)
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in ops[:k]]


def _walk(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn()`` through PyTorch's CPU allocator, above what was live before it.

    Counts every tensor ``fn`` creates, including those it returns (they are
    live when it ends) and the temporaries freed inside it; frees of tensors
    created before the call do not lower the count. Runs ``fn`` once, under
    ``torch.profiler`` with ``profile_memory=True`` (which slows the call, so
    time it separately with ``time_fn``), after one garbage collection and with
    the collector off (as ``peak_memories``). Each allocation event records the
    allocator's running total (``total_allocated``); the answer is the largest
    total minus the total before the first event. The event tree is the same
    record ``torch.profiler``'s ``export_memory_timeline`` reads.
    """
    return peak_memories({"fn": fn})["fn"]


def peak_memories(calls: dict[str, Callable[[], object]]) -> dict[str, int]:
    """``peak_memory`` of each call, one after another under one profiler: {name: peak bytes}.

    The fixed costs (a full garbage collection first, ~0.3 s with torch loaded, and the profiler's start and stop)
    are paid once, not per call; the garbage collector stays off while the calls run. Each call runs inside its
    own ``record_function`` scope, and the allocations under that scope are its own. Whatever a call returns is
    dropped before the next one starts.
    """
    from torch.profiler import record_function

    names = list(calls)
    tags = {f"peak_memory[{i}]": name for i, name in enumerate(names)}

    def run_all() -> None:
        for tag, name in tags.items():
            with record_function(tag):
                calls[name]()

    gc.collect()  # once (it takes ~0.3 s with torch loaded), then off: a collection inside a call would free older
    enabled = gc.isenabled()  # tensors there and lower the running total that the peak is read from
    gc.disable()
    try:
        prof = _profiled(run_all, profile_memory=True)
    finally:
        if enabled:
            gc.enable()
    peaks = dict.fromkeys(names, 0)
    for scope in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        if scope.name not in tags:
            continue
        allocs = [n for n in _walk(scope.children) if type(n.extra_fields).__name__ == "_ExtraFields_Allocation"
                  and n.extra_fields.device.type == "cpu"]
        if allocs:
            first = min(allocs, key=lambda n: n.start_time_ns).extra_fields
            before = first.total_allocated - first.alloc_size  # the running total just before the call's first allocation
            peaks[tags[scope.name]] = max(0, max(n.extra_fields.total_allocated for n in allocs) - before)
    return peaks


_RSS_PROBE_VMHWM = """
def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
{setup}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak RSS) to the current RSS, forgetting setup's own peak
_r0 = _status("VmRSS")
{stmt}
print("RSS_DELTA_KIB", _status("VmHWM") - _r0)
"""


# Off Linux: the rise of the process's own peak during stmt. ru_maxrss is in bytes on macOS, in KiB elsewhere.
_RSS_PROBE_MAXRSS = """
import resource as _resource
import sys as _sys
def _peak_bytes():
    return _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * (1 if _sys.platform == "darwin" else 1024)
{setup}
_p0 = _peak_bytes()
{stmt}
print("RSS_DELTA_KIB", (_peak_bytes() - _p0) // 1024)
"""


def rss_method() -> str | None:
    """How ``peak_rss_delta`` measures here: "VmHWM" (Linux, exact), "ru_maxrss" (a lower bound), or None."""
    if sys.platform.startswith("linux"):
        return "VmHWM"
    if sys.platform == "win32":  # no resource module, no /proc
        return None
    return "ru_maxrss"


def peak_rss_delta(setup: str, stmt: str, timeout: float = 300.0) -> int:
    """Bytes by which a fresh process's peak resident memory rises while it runs ``stmt`` after ``setup``.

    setup, stmt: Python source (each a block of statements at top level).
    ``setup`` should create and touch the inputs; the answer is the peak RSS
    during ``stmt`` minus the RSS just before it (Linux ``/proc/self/status``,
    in KiB, returned in bytes). Off Linux it returns the rise of the child's
    ``ru_maxrss`` during ``stmt`` instead, a lower bound (``rss_method()``).
    Raises ``RuntimeError`` with the child's stderr if the child fails, and on
    platforms with neither (Windows).
    """
    method = rss_method()
    if method is None:
        raise RuntimeError(f"peak_rss_delta cannot read a process's peak memory on {sys.platform!r} "
                           "(it needs Linux's /proc/self/status or the resource module)")
    probe = _RSS_PROBE_VMHWM if method == "VmHWM" else _RSS_PROBE_MAXRSS
    code = probe.format(setup=setup, stmt=stmt)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RSS_DELTA_KIB "):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"the measuring process failed (exit {out.returncode}): {out.stderr.strip()[-800:]}")
