"""Print the speed and memory ratios that matter for the actor update, and write build/bench.json.

    python tools/bench.py               # the full run (a few minutes on 2 cores)
    python tools/bench.py --tiny        # a smoke test at tiny sizes (seconds)
    python tools/bench.py --notebooks   # also execute every notebook (fresh kernels) to time it

Three sections, each a ratio with its target:

1. log-probs at GPT-2's vocabulary (V = 50,257, random logits), forward under no_grad and
   forward+backward, three variants measured on the same logits:
   ``naive`` = ``log_softmax(logits, -1).gather(...)``; ``chunked_autograd`` = a logsumexp loop over
   slices of rows left to autograd (the trap notebook 08 shows: its backward allocates a zero-filled
   [N, V] gradient per chunk; measured up to TRAP_MAX_ROWS rows with backward, where it is already slow);
   ``utils`` = utils.logprobs_from_logits (chunked forward, hand-written backward).
   *Extra* peak memory (utils.profiling.peak_memory): the most bytes alive at once beyond the inputs
   (logits and labels exist before the call), and for forward+backward also beyond the one [N, V]
   gradient that any method must return. Targets: utils extra <= 1/4 of naive's extra, and time
   ratio utils / naive <= 1.
2. machinery overhead on the bundled small GPT-2: sequence_logprobs + policy_loss + backward against
   a bare forward (same tokens, same logits_to_keep) + cross-entropy + backward. Target: <= 5 %.
   Printed with what stands in the way: the log-prob head against F.cross_entropy on the same
   logits, and policy_loss's input checks and diagnostics.
3. notebook times: build/timings.json (written by tools/execute.py, e.g. by ``make book``),
   or, with --notebooks, by executing them now (nothing is written back into the notebooks).
"""

from __future__ import annotations

import os

# Threads that spin while they wait (OpenMP's default) wait on peers that a busy shared machine has
# descheduled: code made of many small ops (a chunk loop) then slows 10-70x while one big op barely
# does, which distorts exactly the ratios measured here. Sleeping waiters keep the ratios honest.
# Must be set before torch loads its OpenMP runtime; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.metadata as md
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `utils` imports without the editable install too

from utils.logprobs import logprobs_from_logits, response_logits, sequence_logprobs  # noqa: E402
from utils.loss import aggregate, clipped_surrogate, policy_loss  # noqa: E402
from utils.profiling import Timing, format_bytes, peak_memory, time_interleaved  # noqa: E402

GPT2_VOCAB = 50_257
TARGETS = {"logprob_extra_ratio_max": 0.25, "logprob_time_ratio_max": 1.0, "machinery_overhead_max": 0.05}
TRAP_MAX_ROWS = 512  # chunked_autograd's backward costs ~ (number of chunks) x N x V: skip it beyond this


# --------------------------------------------------------------------------- log-probs
def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax over the whole vocabulary, then pick the label: a full [..., V] copy. [..., V], [...] -> [...]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def chunked_autograd_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The trap of notebook 08: z[y] - logsumexp(z) over slices of rows, differentiated by autograd. [..., V], [...] -> [...].

    The chunk rule of utils/logprobs.py without its floor of 2**18 logits per chunk: at V = 50,257 the floor
    is 6 rows, which binds only at 40 rows or fewer (--tiny), and leaving it out keeps the trap chunked at tiny
    sizes and test vocabularies. Forward keeps one chunk of temporaries; backward gives every slice its own
    SliceBackward node, which returns a zero-filled gradient of the whole [N, V] input.
    """
    V = logits.shape[-1]
    flat, y = logits.reshape(-1, V), labels.reshape(-1)  # [N, V], [N]
    step = max(1, min(math.ceil(flat.shape[0] / 8), 2**22 // V))
    out = []
    for i in range(0, flat.shape[0], step):
        rows = flat[i : i + step]  # a slice: autograd will scatter its gradient into a full [N, V] of zeros
        out.append(rows.gather(-1, y[i : i + step, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1))
    return torch.cat(out).reshape(labels.shape)


LOGPROB_VARIANTS = {"naive": naive_logprobs, "chunked_autograd": chunked_autograd_logprobs, "utils": logprobs_from_logits}


def _summary(t: Timing) -> dict:
    return {"median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "min_s": t.min, "n": len(t.times)}


def bench_logprobs(B: int, T: int, V: int, backward: bool, repeats: int, trap: bool = True) -> dict:
    """Extra peak memory, time and error of each log-prob variant on the same random logits [B, T, V]."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    logits_bytes = logits.numel() * logits.element_size()
    row = {"B": B, "T": T, "V": V, "mode": "forward+backward" if backward else "forward", "logits_bytes": logits_bytes}
    variants = {k: fn for k, fn in LOGPROB_VARIANTS.items()
                if k != "chunked_autograd" or (trap and (not backward or B * T <= TRAP_MAX_ROWS))}
    weights = torch.randn(B, T, generator=gen)  # an upstream gradient that is not all ones
    ref = logits.double().requires_grad_(backward)
    ref_out = naive_logprobs(ref, labels)
    if backward:
        (ref_out * weights.double()).sum().backward()
    x = logits.detach().clone().requires_grad_(backward)
    calls = {}
    for name, fn in variants.items():
        def call(fn=fn):
            with torch.set_grad_enabled(backward):
                out = fn(x, labels)
                if backward:
                    out.sum().backward()
                    x.grad = None  # every call allocates its gradient afresh
        calls[name] = call
    peaks = {name: peak_memory(call) for name, call in calls.items()}  # also the warm-up calls
    times = time_interleaved(calls, repeats=repeats, warmup=0)  # in turns: load bursts hit all variants
    floor = logits_bytes if backward else 0  # the gradient any method must return is not "extra"
    for name, fn in variants.items():
        with torch.set_grad_enabled(backward):
            out = fn(x, labels)
            entry = {"peak_bytes": peaks[name], "extra_bytes": peaks[name] - floor,
                     "max_abs_err": float((out.detach().double() - ref_out.detach()).abs().max())}
            if backward:
                (out * weights).sum().backward()
                entry["max_abs_grad_err"] = float((x.grad.double() - ref.grad).abs().max())
                x.grad = None
        row[name] = {**entry, **_summary(times[name])}
    for name in variants:
        if name != "naive":
            row[f"{name}_peak_ratio"] = row[name]["peak_bytes"] / row["naive"]["peak_bytes"]
            row[f"{name}_extra_ratio"] = row[name]["extra_bytes"] / row["naive"]["extra_bytes"]
            row[f"{name}_time_ratio"] = row[name]["median_s"] / row["naive"]["median_s"]
    return row


# --------------------------------------------------------------------------- machinery overhead
def bench_machinery(model, B: int, P: int, R: int, repeats: int) -> dict:
    """Time of sequence_logprobs + policy_loss + backward against a bare forward + CE + backward, same tokens."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, P + R), generator=gen)  # [B, P + R]
    attn = torch.ones_like(ids)
    old = (torch.randn(B, R, generator=gen) * 0.1 - math.log(V)).detach()  # plausible old log-probs
    adv = torch.randn(B, R, generator=gen)
    mask = torch.ones(B, R, dtype=torch.bool)

    def bare():  # what a reader would write with no PPO: logits of the response positions, CE, backward
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=R + 1, use_cache=False).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, V), ids[:, P:].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    def machinery():
        log_probs = sequence_logprobs(model, ids, attn, P)  # [B, R]
        loss, _ = policy_loss(log_probs, old, adv, mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    # the pieces that differ, timed alone on fixed logits / log-probs
    with torch.no_grad():
        fixed_logits = response_logits(model, ids, attn, P)  # [B, R, V]
    z = fixed_logits.clone().requires_grad_(True)

    def head_utils():  # the log-prob head of `machinery`, forward + backward
        logprobs_from_logits(z, ids[:, P:]).mean().backward()
        z.grad = None

    def head_cross_entropy():  # the head of `bare`
        F.cross_entropy(z.reshape(-1, V), ids[:, P:].reshape(-1)).backward()
        z.grad = None

    lp = fixed_logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1).requires_grad_(True)

    def loss_only():
        policy_loss(lp, old, adv, mask)

    def loss_math_only():  # the same loss without input checks and diagnostics
        aggregate(clipped_surrogate((lp - old).exp(), adv, 0.2), mask)

    fns = {"bare": bare, "machinery": machinery, "head_utils": head_utils, "head_cross_entropy": head_cross_entropy,
           "policy_loss_only": loss_only, "loss_math_only": loss_math_only}
    for fn in fns.values():
        fn()  # warm-up
    timings = time_interleaved(fns, repeats=repeats, warmup=0)  # in turns: load bursts hit all alike
    row = {"B": B, "prompt_len": P, "response_len": R, "vocab": V}
    for name, t in timings.items():
        row[name] = _summary(t)
    med = {name: row[name]["median_s"] for name in fns}
    bare_s = med["bare"]
    row["overhead"] = med["machinery"] / bare_s - 1
    row["policy_loss_share"] = med["policy_loss_only"] / bare_s
    row["loss_math_share"] = med["loss_math_only"] / bare_s
    # what stands in the way of the target, as shares of the bare step (differences of medians: may be negative)
    head = (med["head_utils"] - med["head_cross_entropy"]) / bare_s
    checks = (med["policy_loss_only"] - med["loss_math_only"]) / bare_s
    row["attribution"] = {"logprob_head_vs_cross_entropy": head, "policy_loss_checks_and_diagnostics": checks,
                          "rest": row["overhead"] - head - checks}
    return row


# --------------------------------------------------------------------------- notebooks
def notebook_times(execute: bool, timings_file: Path) -> tuple[dict, str]:
    """Seconds per notebook: executed now (``execute``), else read from ``timings_file`` if it exists."""
    if execute:
        notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "timings.json"
            proc = subprocess.run([sys.executable, str(ROOT / "tools" / "execute.py"), *notebooks, "--timings", str(out)],
                                  cwd=ROOT, capture_output=True, text=True)
            print(proc.stdout, end="")
            times = json.loads(out.read_text()) if out.exists() else {}
        return times, "executed by tools/bench.py --notebooks" + ("" if proc.returncode == 0 else " (some failed)")
    if timings_file.exists():
        return json.loads(timings_file.read_text()), f"read from {timings_file.relative_to(ROOT) if timings_file.is_relative_to(ROOT) else timings_file.name}"
    return {}, "not measured: run `make book` (writes build/timings.json) or pass --notebooks"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and few repeats: a smoke test of a few seconds")
    ap.add_argument("--notebooks", action="store_true", help="execute every notebook now to time it")
    ap.add_argument("--no-trap", action="store_true", help="skip the chunked_autograd variant (the slow trap)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, as the notebooks)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench.json")
    ap.add_argument("--timings", type=Path, default=ROOT / "build" / "timings.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.tiny:
        lp_sizes = {"forward": [(1, 16)], "forward+backward": [(1, 16)]}
        mach_sizes, mach_repeats, lp_repeats = [(1, 4, 8)], 2, 2
    else:
        lp_sizes = {"forward": [(1, 128), (1, 512), (1, 2048), (4, 512)],
                    "forward+backward": [(1, 128), (1, 512), (1, 2048), (4, 512)]}
        mach_sizes, mach_repeats, lp_repeats = [(1, 4, 24), (16, 4, 64)], 21, 5

    report: dict = {
        "meta": {"torch": md.version("torch"), "transformers": md.version("transformers"), "threads": args.threads,
                 "cpu_count": os.cpu_count(), "machine": platform.machine(), "tiny": args.tiny,
                 "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                 "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "targets": TARGETS,
        "definitions": {
            "extra_bytes": "peak bytes alive at once beyond the inputs (logits, labels); with backward, also beyond "
                           "the one [N, V] gradient any method must return (= peak - logits_bytes)",
            "extra_ratio": "extra_bytes of the variant / extra_bytes of naive (target <= 1/4)",
            "time_ratio": "median time of the variant / naive's, timed in turns (target <= 1)",
            "overhead": "machinery median / bare median - 1 (target <= 5 %)",
        },
    }

    print(f"== log-probs at V = {GPT2_VOCAB:,} (random logits), ratios to naive. extra = peak beyond the inputs "
          "(and, with backward, beyond the [N, V] gradient itself), in units of the logits' size ==")
    print(f"{'':33s} | {'naive':^14s} | {'utils':^30s} | {'chunked_autograd':^17s}")
    print(f"{'mode':16s} {'B':>1s} {'T':>4s} {'logits':>9s} | {'extra':>5s} {'time':>8s} | {'extra':>5s} {'time':>8s} "
          f"{'x-ratio':>7s} {'t-ratio':>7s} | {'extra':>5s} {'x-rat':>5s} {'t-rat':>5s}")
    report["logprobs"] = []
    for mode, sizes in lp_sizes.items():
        for B, T in sizes:
            row = bench_logprobs(B, T, GPT2_VOCAB, mode == "forward+backward", lp_repeats, trap=not args.no_trap)
            report["logprobs"].append(row)
            x = lambda name: row[name]["extra_bytes"] / row["logits_bytes"]  # noqa: E731
            ms = lambda name: f"{row[name]['median_s'] * 1e3:6.1f}ms"  # noqa: E731
            trap = (f"{x('chunked_autograd'):5.3f} {row['chunked_autograd_extra_ratio']:5.3f} "
                    f"{row['chunked_autograd_time_ratio']:5.2f}" if "chunked_autograd" in row else f"{'(skipped)':^17s}")
            print(f"{mode:16s} {B:1d} {T:4d} {format_bytes(row['logits_bytes']):>9s} | {x('naive'):5.3f} {ms('naive')} | "
                  f"{x('utils'):5.3f} {ms('utils')} {row['utils_extra_ratio']:7.4f} {row['utils_time_ratio']:7.2f} | {trap}",
                  flush=True)
    print("extra: in units of the logits' size; x-ratio, t-ratio: extra memory and median time relative to naive's "
          "(targets for utils: x-ratio <= 0.25, t-ratio <= 1)")
    rows = report["logprobs"]
    summary = {}
    for mode in lp_sizes:
        mine = [r for r in rows if r["mode"] == mode]
        for name in ("utils", "chunked_autograd"):
            have = [r for r in mine if name in r]
            if have:
                summary[f"{mode}/{name}/max_extra_ratio"] = max(r[f"{name}_extra_ratio"] for r in have)
                summary[f"{mode}/{name}/max_time_ratio"] = max(r[f"{name}_time_ratio"] for r in have)
    report["logprobs_summary"] = summary

    from utils.models import load_policy

    model, _ = load_policy()
    print("\n== machinery overhead on the small GPT-2: sequence_logprobs + policy_loss + backward "
          "vs bare forward + cross-entropy + backward, same tokens ==")
    report["machinery"] = []
    for B, P, R in mach_sizes:
        row = bench_machinery(model, B, P, R, mach_repeats)
        report["machinery"].append(row)
        ms = lambda name: row[name]["median_s"] * 1e3  # noqa: E731
        print(f"B={B:2d} response={R:3d} tokens: bare {ms('bare'):7.2f} ms | machinery {ms('machinery'):7.2f} ms "
              f"(overhead {row['overhead']:+.1%}) | log-prob head fwd+bwd {ms('head_utils'):.2f} ms vs cross-entropy "
              f"{ms('head_cross_entropy'):.2f} ms | policy_loss {ms('policy_loss_only'):.2f} ms, its math alone "
              f"{ms('loss_math_only'):.2f} ms", flush=True)
        a = row["attribution"]
        print(f"      overhead, as shares of the bare step: log-prob head vs cross-entropy "
              f"{a['logprob_head_vs_cross_entropy']:+.1%}, policy_loss checks + diagnostics "
              f"{a['policy_loss_checks_and_diagnostics']:+.1%}, the rest (position ids, shape and label checks, "
              f"the loss's backward; timing noise) {a['rest']:+.1%}", flush=True)

    print("\n== notebook times (s) ==")
    times, source = notebook_times(args.notebooks, args.timings)
    report["notebooks"] = {"seconds": times, "source": source}
    for name, secs in sorted(times.items()):
        print(f"{name:40s} {secs:6.1f}")
    print(f"({source})")

    report["verdicts"] = {
        "forward_extra_ratio_ok": summary["forward/utils/max_extra_ratio"] <= TARGETS["logprob_extra_ratio_max"],
        "forward_time_ratio_ok": summary["forward/utils/max_time_ratio"] <= TARGETS["logprob_time_ratio_max"],
        "backward_extra_ratio_ok": summary["forward+backward/utils/max_extra_ratio"] <= TARGETS["logprob_extra_ratio_max"],
        "backward_time_ratio_ok": summary["forward+backward/utils/max_time_ratio"] <= TARGETS["logprob_time_ratio_max"],
        "machinery_overhead_ok": max(r["overhead"] for r in report["machinery"]) <= TARGETS["machinery_overhead_max"],
    }
    report["seconds"] = time.perf_counter() - t_start
    print("\n== verdicts ==")
    for k, v in report["verdicts"].items():
        print(f"{k:28s} {'yes' if v else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out.name} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
