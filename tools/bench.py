"""Print the speed and memory ratios that matter for the actor update, and write build/bench.json.

    python tools/bench.py               # the full run (a few minutes on 2 cores)
    python tools/bench.py --tiny        # a smoke test at tiny sizes (seconds)
    python tools/bench.py --notebooks   # also execute every notebook (fresh kernels) to time it

Three sections, each a ratio with its target:

1. log-probs at GPT-2's vocabulary (V = 50,257, random logits): utils.logprobs_from_logits
   (chunked logsumexp) against the naive ``log_softmax(logits, -1).gather(...)``. Extra peak
   memory (utils.profiling.peak_memory) and time, forward under no_grad and forward+backward.
   Target: efficient / naive peak <= 1/4 and time ratio <= 1. The "custom backward" column is
   the fix derived in notebooks/08_making_it_fast.ipynb (a torch.autograd.Function that writes
   the gradient chunk by chunk into one buffer), measured the same way.
2. machinery overhead on the bundled small GPT-2: sequence_logprobs + policy_loss + backward
   against a bare forward (same tokens, same logits_to_keep) + cross-entropy + backward.
   Target: <= 5 %.
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
import statistics
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
TARGETS = {"logprob_peak_ratio_max": 0.25, "logprob_time_ratio_max": 1.0, "machinery_overhead_max": 0.05}


# --------------------------------------------------------------------------- log-probs
def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax over the whole vocabulary, then pick the label: a full [..., V] copy. [..., V], [...] -> [...]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


class _LogProbsCustomBackward(torch.autograd.Function):
    """The fix derived in notebook 08: logsumexp by chunks forward; backward writes onehot - softmax into one buffer."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)  # [N, V], [N]
        lse = torch.cat([torch.logsumexp(rows, dim=-1) for rows in flat.split(chunk)])  # [N]
        ctx.save_for_backward(flat, y, lse)
        ctx.chunk, ctx.shape = chunk, logits.shape
        return (flat.gather(-1, y[:, None]).squeeze(-1) - lse).reshape(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, y, lse = ctx.saved_tensors
        g = grad_out.reshape(-1)  # [N]
        grad = torch.empty_like(flat)  # the one [N, V] tensor any method must return
        for i in range(0, flat.shape[0], ctx.chunk):
            s = slice(i, i + ctx.chunk)
            torch.sub(flat[s], lse[s, None], out=grad[s]).exp_().mul_(-g[s, None])  # -g * softmax, in place
        grad.scatter_add_(-1, y[:, None], g[:, None])  # + g at the label
        return grad.reshape(ctx.shape), None, None


def custom_backward_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Chunked log-probs with a hand-written backward (notebook 08). [..., V], [...] -> [...]."""
    n, V = labels.numel(), logits.shape[-1]
    chunk = max(1, min(math.ceil(n / 16), 2**22 // V))  # the same chunk rule as utils/logprobs.py
    return _LogProbsCustomBackward.apply(logits, labels, chunk)


LOGPROB_VARIANTS = {"naive": naive_logprobs, "efficient": logprobs_from_logits, "custom_backward": custom_backward_logprobs}


def _summary(t: Timing) -> dict:
    return {"median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "min_s": t.min, "n": len(t.times)}


def bench_logprobs(B: int, T: int, V: int, backward: bool, repeats: int) -> dict:
    """Peak extra memory and time of each log-prob variant on the same random logits [B, T, V]."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    row = {"B": B, "T": T, "V": V, "mode": "forward+backward" if backward else "forward",
           "logits_bytes": logits.numel() * logits.element_size()}
    ref = naive_logprobs(logits.double(), labels)
    x = logits.detach().clone().requires_grad_(backward)
    calls = {}
    for name, fn in LOGPROB_VARIANTS.items():
        def call(fn=fn):
            with torch.set_grad_enabled(backward):
                out = fn(x, labels)
                if backward:
                    out.sum().backward()
                    x.grad = None  # every call allocates its gradient afresh
        calls[name] = call
    peaks = {name: peak_memory(call) for name, call in calls.items()}  # also the warm-up calls
    times = time_interleaved(calls, repeats=repeats, warmup=0)  # in turns: load bursts hit all variants
    for name, fn in LOGPROB_VARIANTS.items():
        with torch.no_grad():
            err = float((fn(logits, labels).double() - ref).abs().max())
        row[name] = {"peak_bytes": peaks[name], "max_abs_err": err, **_summary(times[name])}
    for name in ("efficient", "custom_backward"):
        row[f"{name}_peak_ratio"] = row[name]["peak_bytes"] / row["naive"]["peak_bytes"]
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

    def machinery_custom_backward():  # the same with notebook 08's log-prob backward
        log_probs = custom_backward_logprobs(response_logits(model, ids, attn, P), ids[:, P:])
        loss, _ = policy_loss(log_probs, old, adv, mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    lp = sequence_logprobs(model, ids, attn, P).detach().requires_grad_(True)

    def loss_only():
        policy_loss(lp, old, adv, mask)

    def loss_math_only():  # the same loss without input checks and diagnostics
        aggregate(clipped_surrogate((lp - old).exp(), adv, 0.2), mask)

    fns = {"bare": bare, "machinery": machinery, "machinery_custom_backward": machinery_custom_backward,
           "policy_loss_only": loss_only, "loss_math_only": loss_math_only}
    for fn in fns.values():
        fn()  # warm-up
    timings = time_interleaved(fns, repeats=repeats, warmup=0)  # in turns: load bursts hit all alike
    row = {"B": B, "prompt_len": P, "response_len": R, "vocab": V}
    for name, t in timings.items():
        row[name] = _summary(t)
    bare_s = row["bare"]["median_s"]
    row["overhead"] = row["machinery"]["median_s"] / bare_s - 1
    row["overhead_custom_backward"] = row["machinery_custom_backward"]["median_s"] / bare_s - 1
    row["policy_loss_share"] = row["policy_loss_only"]["median_s"] / bare_s
    row["loss_math_share"] = row["loss_math_only"]["median_s"] / bare_s
    # what stands in the way of the target, as shares of the bare step
    row["attribution"] = {
        "logprob_backward": (row["machinery"]["median_s"] - row["machinery_custom_backward"]["median_s"]) / bare_s,
        "policy_loss_checks_and_diagnostics": (row["policy_loss_only"]["median_s"] - row["loss_math_only"]["median_s"]) / bare_s,
        "rest": row["overhead_custom_backward"] - (row["policy_loss_only"]["median_s"] - row["loss_math_only"]["median_s"]) / bare_s,
    }
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
def _fmt_ratio(x: float) -> str:
    return f"{x:5.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and few repeats: a smoke test of a few seconds")
    ap.add_argument("--notebooks", action="store_true", help="execute every notebook now to time it")
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
                    "forward+backward": [(1, 128), (1, 512), (4, 512)]}
        mach_sizes, mach_repeats, lp_repeats = [(1, 4, 24), (16, 4, 64)], 15, 3

    report: dict = {
        "meta": {"torch": md.version("torch"), "transformers": md.version("transformers"), "threads": args.threads,
                 "cpu_count": os.cpu_count(), "machine": platform.machine(), "tiny": args.tiny,
                 "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                 "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "targets": TARGETS,
    }

    print(f"== log-probs at V = {GPT2_VOCAB:,} (random logits): extra peak memory and time, ratio to naive ==")
    print(f"{'mode':17s} {'B':>2s} {'T':>5s} {'logits':>10s} | {'naive peak':>10s} {'eff. peak':>10s} {'ratio':>5s} "
          f"{'time':>5s} | {'custom bwd':>10s} {'ratio':>5s} {'time':>5s}")
    report["logprobs"] = []
    for mode, sizes in lp_sizes.items():
        for B, T in sizes:
            row = bench_logprobs(B, T, GPT2_VOCAB, mode == "forward+backward", lp_repeats)
            report["logprobs"].append(row)
            print(f"{mode:17s} {B:2d} {T:5d} {format_bytes(row['logits_bytes']):>10s} | "
                  f"{format_bytes(row['naive']['peak_bytes']):>10s} {format_bytes(row['efficient']['peak_bytes']):>10s} "
                  f"{_fmt_ratio(row['efficient_peak_ratio'])} {_fmt_ratio(row['efficient_time_ratio'])} | "
                  f"{format_bytes(row['custom_backward']['peak_bytes']):>10s} {_fmt_ratio(row['custom_backward_peak_ratio'])} "
                  f"{_fmt_ratio(row['custom_backward_time_ratio'])}", flush=True)
    rows = report["logprobs"]
    summary = {}
    for mode in lp_sizes:
        mine = [r for r in rows if r["mode"] == mode]
        for name in ("efficient", "custom_backward"):
            summary[f"{mode}/{name}/max_peak_ratio"] = max(r[f"{name}_peak_ratio"] for r in mine)
            summary[f"{mode}/{name}/max_time_ratio"] = max(r[f"{name}_time_ratio"] for r in mine)
    report["logprobs_summary"] = summary

    from utils.models import load_policy

    model, _ = load_policy()
    print("\n== machinery overhead on the small GPT-2: sequence_logprobs + policy_loss + backward vs bare forward + CE + backward ==")
    report["machinery"] = []
    for B, P, R in mach_sizes:
        row = bench_machinery(model, B, P, R, mach_repeats)
        report["machinery"].append(row)
        print(f"B={B:2d} response={R:3d} tokens: bare {row['bare']['median_s'] * 1e3:7.2f} ms | machinery "
              f"{row['machinery']['median_s'] * 1e3:7.2f} ms ({row['overhead']:+.1%}) | with notebook 08's log-prob backward "
              f"{row['machinery_custom_backward']['median_s'] * 1e3:7.2f} ms ({row['overhead_custom_backward']:+.1%}) | "
              f"policy_loss alone {row['policy_loss_only']['median_s'] * 1e3:.2f} ms ({row['policy_loss_share']:.1%} of bare; "
              f"its math without checks and diagnostics {row['loss_math_share']:.1%})",
              flush=True)
        a = row["attribution"]
        print(f"      overhead, as shares of the bare step: chunked log-prob backward {a['logprob_backward']:+.1%}, "
              f"policy_loss checks + diagnostics {a['policy_loss_checks_and_diagnostics']:+.1%}, "
              f"the rest (log-prob forward, position ids, label checks; timing noise) {a['rest']:+.1%}", flush=True)

    print("\n== notebook times (s) ==")
    times, source = notebook_times(args.notebooks, args.timings)
    report["notebooks"] = {"seconds": times, "source": source}
    for name, secs in sorted(times.items()):
        print(f"{name:40s} {secs:6.1f}")
    print(f"({source})")

    report["verdicts"] = {
        "forward_peak_ratio_ok": summary["forward/efficient/max_peak_ratio"] <= TARGETS["logprob_peak_ratio_max"],
        "forward_time_ratio_ok": summary["forward/efficient/max_time_ratio"] <= TARGETS["logprob_time_ratio_max"],
        "backward_peak_ratio_ok": summary["forward+backward/efficient/max_peak_ratio"] <= TARGETS["logprob_peak_ratio_max"],
        "backward_time_ratio_ok": summary["forward+backward/efficient/max_time_ratio"] <= TARGETS["logprob_time_ratio_max"],
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
