"""Plant hand-written bugs (mutants) in the core utils modules and see whether their tests notice.

    nice -n 15 .venv/bin/python tools/mutants.py --module loss   # one module's mutants against tests/test_loss.py
    nice -n 15 .venv/bin/python tools/mutants.py                 # all six modules
    .venv/bin/python tools/mutants.py --list                     # what would be planted, nothing run
    .venv/bin/python tools/mutants.py --module ppo --name EMA    # only the mutants whose name holds "EMA"

Measured on 2026-12-03 (``nice -n 15 .venv/bin/python tools/mutants.py``, all six modules, 3.5 min on 2 cores),
killed / run, equivalent mutants left out:

    loss        27 / 27    masking     11 / 11    advantages  18 / 18
    kl          10 / 10    logprobs    21 / 21    ppo         18 / 18    (+1 equivalent in kl)
    all        105 / 105 = 100 %

(Earlier that day, before policy_loss's stacked diagnostics and the sliced backward: 102 / 102; on 2026-12-02, 96 / 96.)
The first pass of this set (before the tests added with it) killed 87 of 96: the survivors were closed by new
tests in the mirrored files (masks with a 0.5 entry, a mask whose shape does not fit ``dim``, ``kl_from_logits``'s
direction and temperature, gae's stop-gradient on the values, the clipped gradient that ``step()`` sees, no
gradient accumulation across epochs, the EMA baseline on a constant score, the ratio against pi_old on a policy
that has drifted from the reference). One mutant is equivalent and says why (``Mutant.equivalent``).

Each mutant is one or more textual replacements in one ``utils/<module>.py``, each of which must occur
exactly once in the file as it is now (a mutant whose text is gone, because the module changed, is
reported as stale and counted nowhere). The replacements are applied to a temporary copy of the repository
(``utils/``, ``tests/``, ``pyproject.toml``, and a link to ``data/``), and only the mirrored test file,
``tests/test_<module>.py``, runs against it, with a per-mutant timeout. A mutant is killed when that file
fails (or times out, or crashes the process); it survives when every test passes. The test file first runs on
the unmutated copy, and a module whose tests fail there is not counted. It runs under ``nice``; the machine
is shared.

One module's runs share one worker process (``--worker``): torch and transformers are imported once, and
``utils`` and the tests are dropped from ``sys.modules`` and imported afresh from the mutated file for every
run (a check that the copy, not the installed package, was imported is part of each run). On a loaded machine
that cut a run from about a minute to a few seconds. ``--fresh`` runs each in its own Python process instead,
to confirm a result (it agreed on the equivalent kl mutant, the bf16 backward and the EMA mutant).

Why not mutmut or cosmic-ray: both install from PyPI (mutmut 3.8.1, cosmic-ray 8.7.0), but mutmut 3.8.1 on
utils/kl.py alone made 69 mutants, took over an hour on two shared cores, timed 13 out and found "no tests"
for 30 (its per-test coverage map does not see them); hand-planted mutants are the mistakes
that matter here (an inverted ratio, a max for a min, a mask not applied), and a few dozen run in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    """A planted bug: ``(old, new)`` replacements in ``utils/<module>.py``, and what it breaks, in words."""

    module: str
    name: str
    edits: list[tuple[str, str]]
    equivalent: str | None = None  # why no test can tell it from the original, when that was shown


def m(module: str, name: str, *edits: tuple[str, str], equivalent: str | None = None) -> Mutant:
    return Mutant(module, name, list(edits), equivalent)


MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- loss
    m("loss", "inverted ratio", ("ratio = log_ratio.exp()", "ratio = (-log_ratio).exp()")),
    m("loss", "max for min", ("loss = -torch.min(surr1, surr2)", "loss = -torch.max(surr1, surr2)")),
    m("loss", "no clip", ("surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + eps_high) * advantages",
                          "surr2 = ratio * advantages")),
    m("loss", "clip_eps_high ignored in the loss",
      ("    eps_high = clip_eps if clip_eps_high is None else clip_eps_high\n    surr1",
       "    eps_high = clip_eps\n    surr1")),
    m("loss", "symmetric clip from eps_high", ("ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)",
                                               "ratio.clamp(1.0 - eps_high, 1.0 + eps_high)")),
    m("loss", "dual clip on A > 0", ("torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)",
                                     "torch.where(advantages > 0, torch.min(loss, -dual_clip * advantages), loss)")),
    m("loss", "dual clip never applied",
      ("torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)", "loss")),
    m("loss", "dual_clip <= 1 accepted", ("if dual_clip is not None and not dual_clip > 1.0:\n        raise",
                                          "if dual_clip is not None and not dual_clip > 0.0:\n        raise")),
    m("loss", "token-mean ignores normalizer", ("return masked_sum(loss, mask) / normalizer",
                                                "return masked_mean(loss, mask)")),
    m("loss", "seq-mean normalizer divides the mean", ("per_seq.sum() / normalizer", "per_seq.mean() / normalizer")),
    m("loss", "seq-mean-token-sum averages", (
        'masked_mean(loss, mask, dim=-1) if agg == "seq-mean-token-mean" else masked_sum(loss, mask, dim=-1)',
        "masked_mean(loss, mask, dim=-1)")),
    m("loss", "normalizer <= 0 accepted", ("if normalizer is not None and not normalizer > 0:",
                                           "if normalizer is not None and not normalizer > -1e9:")),
    m("loss", "non-finite inputs accepted",
      ("check_finite(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)", "pass")),
    m("loss", "ratio overflow not caught", ("stats.sum()])]).tolist()", "stats[[0, 1, 3]].sum()])]).tolist()")),
    m("loss", "inf advantages on masked tokens accepted", ("stats.sum()])]).tolist()", "kept.sum()])]).tolist()")),
    m("loss", "dual_clip_frac is clip_frac", ('info["dual_clip_frac"] = vals[4]', 'info["dual_clip_frac"] = vals[0]')),
    m("loss", "clip_frac counts ties", ("* adv) < ratio * adv", "* adv) <= ratio * adv")),
    m("loss", "approx_kl_k1 sign", ('"approx_kl_k1": 0.0 - vals[1]', '"approx_kl_k1": vals[1]')),
    m("loss", "approx_kl_k3 sign", ('"approx_kl_k3": vals[2] - 1 - vals[1]', '"approx_kl_k3": vals[2] - 1 + vals[1]')),
    m("loss", "ratio_max is the mean", ('"ratio_min": vals[k], "ratio_max": vals[k + 1]}', '"ratio_min": vals[k], "ratio_max": vals[2]}')),
    m("loss", "diagnostics over masked tokens too",
      ("kept = stats.flatten(1) if action_mask is None else", "kept = stats.flatten(1) if True else")),
    m("loss", "mask not validated", ("        action_mask = check_mask(action_mask)\n", "        pass\n")),
    m("loss", "mask not applied in the loss", ("loss = aggregate(per_token, action_mask, agg, normalizer)",
                                               "loss = aggregate(per_token, None, agg, normalizer)")),
    m("loss", "no stop-gradient on old_log_probs", ("log_ratio = log_probs - old_log_probs.detach()",
                                                    "log_ratio = log_probs - old_log_probs")),
    m("loss", "no stop-gradient on advantages", ("    adv = advantages.detach()\n", "    adv = advantages\n")),
    m("loss", "seq-mean over the batch axis", (
        'masked_mean(loss, mask, dim=-1) if agg == "seq-mean-token-mean"', 'masked_mean(loss, mask, dim=0) if agg == "seq-mean-token-mean"')),
    m("loss", "PolicyLoss drops clip_eps_high", ("clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip",
                                                 "clip_eps_high=None, dual_clip=self.dual_clip")),
    # ---------------------------------------------------------------- masking
    m("masking", "multiply by the mask (NaN leaks)",
      ("kept = torch.where(mask, tensor, 0)", "kept = tensor * mask")),
    m("masking", "only an all-empty mask raises", ("if not bool(count.all()):", "if not bool(count.any()):")),
    m("masking", "non-0/1 mask accepted", ("if not bool(((mask == 0) | (mask == 1)).all()):",
                                           "if not bool(((mask == 0) | (mask == 1)).any()):")),
    m("masking", "masked_sum ignores dim", ("    return kept.sum() if dim is None else kept.sum(dim)",
                                            "    return kept.sum()")),
    m("masking", "mask=None ignores dim", ("        return tensor.mean() if dim is None else tensor.mean(dim)",
                                           "        return tensor.mean()")),
    m("masking", "masked_mean shape unchecked",
      ("    check_same_shape(tensor=tensor, mask=mask)\n    mask = _as_bool(mask)\n    count", "    mask = _as_bool(mask)\n    count")),
    m("masking", "EOS not kept", ("after_eos = (is_eos.cumsum(-1) - is_eos) > 0", "after_eos = is_eos.cumsum(-1) > 0")),
    m("masking", "attention_mask ignored", ("mask &= attention_mask[:, prompt_len:].bool()", "pass")),
    m("masking", "prompt_len 0 accepted", ("if not 0 < prompt_len < input_ids.shape[-1]:",
                                           "if not 0 <= prompt_len < input_ids.shape[-1]:")),
    m("masking", "masked_mean counts over all dims", ("count = mask.sum() if dim is None else mask.sum(dim)",
                                                      "count = mask.sum()")),
    m("masking", "response starts one token early", ("resp = input_ids[:, prompt_len:]  # [B, R]",
                                                     "resp = input_ids[:, prompt_len - 1 : -1]  # [B, R]")),
    # ---------------------------------------------------------------- advantages
    m("advantages", "score at position -1", ("rewards[rows, last] += score", "rewards[rows, -1] += score")),
    m("advantages", "KL penalty added", ("torch.where(mask, -kl_coef * kl, zero)", "torch.where(mask, kl_coef * kl, zero)")),
    m("advantages", "KL penalty on masked tokens", ("torch.where(mask, -kl_coef * kl, zero)", "-kl_coef * kl")),
    m("advantages", "last kept = count - 1", ("return torch.where(mask, positions, -1).max(-1).values",
                                              "return mask.long().sum(-1) - 1")),
    m("advantages", "gamma for gamma*lam", ("adv_t = delta + gamma * lam * next_adv", "adv_t = delta + gamma * next_adv")),
    m("advantages", "masked steps not skipped (A)", ("next_adv = torch.where(keep, adv_t, next_adv)", "next_adv = adv_t")),
    m("advantages", "masked steps not skipped (V)", ("next_value = torch.where(keep, values[:, t], next_value)",
                                                     "next_value = values[:, t]")),
    m("advantages", "returns not masked", ("returns = torch.where(mask, advantages + values, 0.0)",
                                           "returns = advantages + values")),
    m("advantages", "biased variance", ("* n / (n - 1)", "")),
    m("advantages", "shift_mean inverted", ("if not shift_mean:", "if shift_mean:")),
    m("advantages", "whiten of one value allowed", ("if n < 2:", "if n < 1:")),
    m("advantages", "gamma > 1 accepted", ("0.0 <= value <= 1.0", "0.0 <= value")),
    m("advantages", "returns_to_go uses lam = gamma", ("gae(rewards, torch.zeros_like(rewards), gamma, 1.0, action_mask)",
                                                       "gae(rewards, torch.zeros_like(rewards), gamma, gamma, action_mask)")),
    m("advantages", "kl_coef = 0 refused", ("math.isfinite(value) and value >= 0)", "math.isfinite(value) and value > 0)")),
    m("advantages", "GAE bootstrap without gamma", ("delta = rewards[:, t] + gamma * next_value - values[:, t]",
                                                    "delta = rewards[:, t] + next_value - values[:, t]")),
    m("advantages", "GAE bootstraps from the last position's value", (
        "next_value = rewards.new_zeros(B)  # V after", "next_value = values[:, -1].clone()  # V after")),
    m("advantages", "whitening without the mean", ("out = (x - mean) * torch.rsqrt(var + eps)",
                                                   "out = x * torch.rsqrt(var + eps)")),
    m("advantages", "no stop-gradient on values", ("    values = values.detach()\n", "    pass\n")),
    # ---------------------------------------------------------------- kl
    m("kl", "log-ratio reversed", ("    log_ratio = log_probs - ref_log_probs  #", "    log_ratio = ref_log_probs - log_probs  #")),
    m("kl", "k2 without the 1/2", ("return 0.5 * log_ratio.pow(2)", "return log_ratio.pow(2)")),
    m("kl", "k3 of the reversed ratio", ("kl = torch.expm1(-log_ratio) + log_ratio", "kl = torch.expm1(log_ratio) - log_ratio")),
    m("kl", "k3 with exp - 1 (cancels)", ("kl = torch.expm1(-log_ratio) + log_ratio",
                                          "kl = torch.exp(-log_ratio) - 1 + log_ratio")),
    m("kl", "half precision kept (equivalent)", ("        log_probs = log_probs.float()", "        log_probs = log_probs"),
      equivalent="ref_log_probs is still upcast, and type promotion upcasts log_probs in the subtraction "
                 "(bf16/fp16 -> fp32 is exact), so every output is bit-identical"),
    m("kl", "k3 overflow not caught", ("if not bool(torch.isfinite(kl).all()):", "if False:")),
    m("kl", "non-finite inputs accepted", ("check_finite(log_probs=log_probs, ref_log_probs=ref_log_probs)", "pass")),
    m("kl", "unknown estimator accepted", ("if estimator not in KL_ESTIMATORS:", "if False:")),
    m("kl", "exact KL reversed", ("(logp.exp() * (logp - logq))", "(logq.exp() * (logq - logp))")),
    m("kl", "exact KL ignores the temperature", ("logp = (logits.float() / temperature).log_softmax(-1)",
                                                 "logp = logits.float().log_softmax(-1)")),
    m("kl", "shapes not checked (broadcast)", ("    check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)\n",
                                               "    pass\n")),
    # ---------------------------------------------------------------- logprobs
    m("logprobs", "forward ignores the temperature", ("        return torch.div(rows, tau, out=out)",
                                                      "        return torch.div(rows, 1.0, out=out)")),
    m("logprobs", "bf16 forward ignores the temperature", ("return out.copy_(rows).div_(tau)", "return out.copy_(rows)")),
    m("logprobs", "fp32 backward sign", ("grad.exp_().mul_(-g)", "grad.exp_().mul_(g)")),
    m("logprobs", "one-call backward sign", ("_scale_rows_(grad, -g)  # softmax", "_scale_rows_(grad, g)  # softmax")),
    m("logprobs", "bf16 backward garbage", ("(flat[s].float() / tau - lse[s, None]).exp_().mul_(-g[s])",
                                            "(flat[s].float() / tau - lse[s, None]).exp_().mul_(12345.0)")),
    m("logprobs", "label gradient doubled", ("grad.scatter_add_(-1, labels[:, None], g.to(grad.dtype))",
                                             "grad.scatter_add_(-1, labels[:, None], (2 * g).to(grad.dtype))")),
    m("logprobs", "one-call label gradient missing", ("grad.scatter_add_(-1, labels[:, None], g)  # + g", "pass  #")),
    m("logprobs", "label == V accepted", ("if lo < 0 or hi >= V:", "if lo < 0 or hi > V:")),
    m("logprobs", "a slice skipped when scaling small gradients", ("    for i in range(0, N, step):\n        x[i",
                                                                 "    for i in range(0, N, step + 1):\n        x[i")),
    m("logprobs", "second backward allowed", ("grad, ctx.probs = ctx.probs, None", "grad = ctx.probs")),
    m("logprobs", "no underflow fallback", ("if not float(p.min()) >= _TINY:", "if False:")),
    m("logprobs", "a row skipped between chunks", ("    for i in range(0, N, step):\n        buf = work",
                                                   "    for i in range(0, N, step + 1):\n        buf = work")),
    m("logprobs", "entropy sign", ("out.append(-(logp.exp() * logp).sum(-1))", "out.append((logp.exp() * logp).sum(-1))")),
    m("logprobs", "positions from 1", ("(attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
                                       "attention_mask.long().cumsum(-1).clamp(min=0)")),
    m("logprobs", "no shift by one", ("torch.arange(prompt_len - 1, T - 1,", "torch.arange(prompt_len, T,")),
    m("logprobs", "non-finite logits accepted", ('raise ValueError("logits hold NaN or inf: the log-probabilities are not finite")',
                                                 "pass")),
    m("logprobs", "backward misses the 1/temperature", ("g = g if tau == 1.0 else g / tau", "g = g")),
    m("logprobs", "backward softmax at temperature 1", ("torch.add(-lse[:, None], flat, alpha=1 / tau, out=grad)",
                                                        "torch.add(-lse[:, None], flat, alpha=1.0, out=grad)")),
    m("logprobs", "entropy ignores the temperature", ("rows = flat[i : i + step] / tau", "rows = flat[i : i + step]")),
    m("logprobs", "labels shifted by one", ("logprobs_from_logits(logits, input_ids[:, prompt_len:], temperature)",
                                            "logprobs_from_logits(logits, input_ids[:, prompt_len - 1 : -1], temperature)")),
    m("logprobs", "positions ignore the padding", ("position_ids=position_ids_from_mask(attention_mask),",
                                                   "position_ids=None,")),
    # ---------------------------------------------------------------- ppo
    m("ppo", "KL loss term always acts", ("if cfg.kl_loss_coef > 0:", "if True:"),
      ("loss = pg_loss + cfg.kl_loss_coef * kl_loss", "loss = pg_loss + kl_loss")),
    m("ppo", "no gradient clipping", ('max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")',
                                      'max_norm = float("inf")')),
    m("ppo", "dropout on in the update", ("policy.train(cfg.dropout_in_update)", "policy.train(True)")),
    m("ppo", "EMA weights swapped", ("cfg.baseline_decay * baseline + (1.0 - cfg.baseline_decay) * score",
                                     "(1.0 - cfg.baseline_decay) * baseline + cfg.baseline_decay * score")),
    m("ppo", "baseline not subtracted", ("torch.where(action_mask, float(baseline), 0.0)", "torch.where(action_mask, 0.0, 0.0)")),
    m("ppo", "old log-probs at T = 1", (
        "old_log_probs = sequence_logprobs(policy, input_ids, attention_mask, prompt_len, cfg.temperature)",
        "old_log_probs = sequence_logprobs(policy, input_ids, attention_mask, prompt_len)")),
    m("ppo", "gradients accumulate over epochs", ("optimizer.zero_grad(set_to_none=True)", "pass")),
    m("ppo", "ratio against the reference", ("log_probs, rollout.old_log_probs, rollout.advantages",
                                             "log_probs, rollout.ref_log_probs, rollout.advantages")),
    m("ppo", "whitening never applied", ("if cfg.whiten_advantages:", "if False:")),
    m("ppo", "train not seeded", ("    set_seed(cfg.seed)\n", "    pass\n")),
    m("ppo", "old log-probs recomputed every epoch (ratio always 1)", ("log_probs, rollout.old_log_probs, rollout.advantages",
                                                                      "log_probs, log_probs.detach(), rollout.advantages")),
    m("ppo", "KL loss term subtracted", ("loss = pg_loss + cfg.kl_loss_coef * kl_loss", "loss = pg_loss - cfg.kl_loss_coef * kl_loss")),
    m("ppo", "per-update row is the last epoch", ("return {k: sum(e[k] for e in epochs) / len(epochs) for k in epochs[0] if k != \"epoch\"}",
                                                  "return {k: epochs[-1][k] for k in epochs[0] if k != \"epoch\"}")),
    m("ppo", "new log-probs at T = 1", ("logprobs_from_logits(logits, rollout.input_ids[:, rollout.prompt_len:], cfg.temperature)",
                                        "logprobs_from_logits(logits, rollout.input_ids[:, rollout.prompt_len:])")),
    m("ppo", "entropy at T = 1", ("entropy_from_logits(logits.detach(), cfg.temperature)", "entropy_from_logits(logits.detach())")),
    m("ppo", "reference log-probs from the policy", (
        "ref_log_probs = sequence_logprobs(ref, input_ids, attention_mask, prompt_len, cfg.temperature)",
        "ref_log_probs = sequence_logprobs(policy, input_ids, attention_mask, prompt_len, cfg.temperature)")),
    m("ppo", "update_end measured against the rollout's policy after the update", (
        "        old_logits = _logits(policy, ro)\n        epochs = actor_update(policy, optimizer, ro, cfg)\n",
        "        epochs = actor_update(policy, optimizer, ro, cfg)\n        old_logits = _logits(policy, ro)\n")),
    m("ppo", "the KL-in-loss term uses the reward's estimator", (
        "kl_estimate(log_probs, rollout.ref_log_probs, cfg.kl_loss_estimator)", "kl_estimate(log_probs, rollout.ref_log_probs, cfg.kl_estimator)")),
]
MODULES = ("loss", "masking", "advantages", "kl", "logprobs", "ppo")


def mutate(text: str, mutant: Mutant) -> str | None:
    """``text`` with the mutant's replacements, or None when one of them does not occur exactly once."""
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    return text


def scratch_copy() -> Path:
    """A temporary copy of what the tests need: utils/, tests/, pyproject.toml, and data/ as a link."""
    tmp = Path(tempfile.mkdtemp(prefix="mutants-"))
    for name in ("utils", "tests"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    (tmp / "data").symlink_to(ROOT / "data")
    return tmp


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]


def run_tests(copy: Path, test_file: str, timeout: float) -> tuple[str, float]:
    """Run one test file in a fresh process in the copy (``python -m pytest`` puts the copy first on sys.path)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, test_file]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start


class _Timeout(BaseException):
    """Raised by the alarm in the worker; a BaseException so that no test's ``except Exception`` swallows it."""


def worker(spec_path: Path) -> int:
    """Run many mutants of one module in one process: torch and transformers are imported once (on a loaded
    machine that import is most of a short test file's time), while ``utils`` and the tests are dropped from
    ``sys.modules`` and re-imported from the mutated file for every run. Writes one JSON line per run."""
    import importlib
    import signal

    import pytest
    import torch  # noqa: F401  (the heavy imports, kept across runs)
    import transformers  # noqa: F401

    spec = json.loads(spec_path.read_text())
    copy, path = Path(spec["copy"]), Path(spec["copy"]) / spec["path"]
    os.chdir(copy)
    sys.path.insert(0, str(copy))
    original = path.read_text()

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    with open(spec["results"], "a") as out:
        for item in spec["runs"]:
            for name in list(sys.modules):
                if name.split(".")[0] in ("utils", "tests") or name.startswith("test_") or name == "conftest":
                    del sys.modules[name]
            path.write_text(original if item["text"] is None else item["text"])
            importlib.invalidate_caches()
            start, status = time.perf_counter(), None
            signal.alarm(int(spec["timeout"]))
            try:
                rc = pytest.main([*PYTEST_ARGS, spec["test_file"]])
                status = "passed" if rc == 0 else "failed"
            except _Timeout:
                status = "timeout"
            finally:
                signal.alarm(0)
                path.write_text(original)
            if status == "timeout":
                pass
            elif not str(Path(sys.modules["utils"].__file__).resolve()).startswith(str(copy.resolve())):
                status = "not the copy"  # the installed utils was imported: the run means nothing
            out.write(json.dumps({"name": item["name"], "status": status,
                                  "seconds": round(time.perf_counter() - start, 1)}) + "\n")
            out.flush()
    return 0


def run_module(copy: Path, module: str, runs: list[dict], timeout: float, fresh: bool) -> Iterator[tuple[str, tuple[str, float]]]:
    """Status and seconds of each run ({"name", "text"}; text None = the unmutated file), in one worker process
    (restarted after a crash, which counts as a kill) or, with ``fresh``, one process per run."""
    path = copy / "utils" / f"{module}.py"
    test_file = f"tests/test_{module}.py"
    done: dict[str, tuple[str, float]] = {}
    if fresh:
        original = path.read_text()
        for item in runs:
            path.write_text(original if item["text"] is None else item["text"])
            try:
                done[item["name"]] = run_tests(copy, test_file, timeout)
            finally:
                path.write_text(original)
            yield item["name"], done[item["name"]]
        return
    results = copy / f"results-{module}.jsonl"
    todo = list(runs)
    while todo:
        spec = copy / f"spec-{module}.json"
        spec.write_text(json.dumps({"copy": str(copy), "path": f"utils/{module}.py", "test_file": test_file,
                                    "runs": todo, "timeout": timeout, "results": str(results)}))
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], cwd=copy,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = 0
        while True:
            finished = proc.poll() is not None
            lines = results.read_text().splitlines() if results.exists() else []
            for line in lines[seen:]:
                row = json.loads(line)
                done[row["name"]] = (row["status"], row["seconds"])
                yield row["name"], done[row["name"]]
            seen = len(lines)
            if finished:
                break
            time.sleep(1.0)
        results.unlink(missing_ok=True)
        todo = [r for r in todo if r["name"] not in done]
        if todo:  # the worker died on this one (a crash is a kill): record it, go on with the rest
            done[todo[0]["name"]] = ("failed", 0.0)
            yield todo[0]["name"], done[todo[0]["name"]]
            todo = todo[1:]


def imports_the_copy(copy: Path) -> bool:
    """The mutated copy, not the installed (editable) utils, is what the tests import."""
    out = subprocess.run([sys.executable, "-c", "import utils; print(utils.__file__)"], cwd=copy,
                         capture_output=True, text=True)
    return Path(out.stdout.strip()).resolve().is_relative_to(copy.resolve())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=MODULES, help="only these modules (repeatable)")
    ap.add_argument("--name", help="only mutants whose name contains this text")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    ap.add_argument("--fresh", action="store_true", help="a fresh Python process per run (slower; the default "
                    "runs one module's mutants in one process, re-importing utils and the tests for each)")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether they apply; run nothing")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    modules = args.module or list(MODULES)
    chosen = [mu for mu in MUTANTS if mu.module in modules and (args.name is None or args.name in mu.name)]
    if args.list:
        for mu in chosen:
            ok = mutate((ROOT / "utils" / f"{mu.module}.py").read_text(), mu) is not None
            print(f"{mu.module:11s} {'applies' if ok else 'STALE  '}  {mu.name}")
        return 0
    try:
        os.nice(10)
    except OSError:
        pass
    copy = scratch_copy()
    results: dict[str, list[dict]] = {}
    try:
        if not imports_the_copy(copy):
            print("the tests would import the installed utils, not the copy: cannot mutate", file=sys.stderr)
            return 2
        for module in modules:
            original = (copy / "utils" / f"{module}.py").read_text()
            rows = results.setdefault(module, [])
            runs = [{"name": "(unmutated)", "text": None}]
            for mu in (x for x in chosen if x.module == module):
                text = mutate(original, mu)
                if text is None:
                    rows.append({"mutant": mu.name, "result": "stale"})
                    print(f"   stale     {mu.name} (its text is no longer in utils/{module}.py)", flush=True)
                else:
                    runs.append({"name": mu.name, "text": text})
            equivalent = {mu.name: mu.equivalent for mu in chosen if mu.module == module and mu.equivalent}
            for name, (status, secs) in run_module(copy, module, runs, args.timeout, args.fresh):
                if name == "(unmutated)":
                    print(f"== {module}: tests/test_{module}.py on the unmutated copy {status} in {secs:.0f} s", flush=True)
                    if status != "passed":
                        print(f"   tests/test_{module}.py must pass before mutants mean anything; "
                              f"the results for {module} are not counted", flush=True)
                        rows.append({"mutant": "(unmutated)", "result": "baseline " + status})
                    continue
                result = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed (timeout)"}.get(status, status)
                if result == "SURVIVED" and name in equivalent:
                    result = "equivalent"
                rows.append({"mutant": name, "result": result, "seconds": secs})
                print(f"   {result:9s} {name} ({secs:.0f} s)", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    total_k = total_n = 0
    print("\nmodule       killed / run (equivalent ones left out)   survivors")
    for module, rows in results.items():
        if any(r["mutant"] == "(unmutated)" for r in rows):
            print(f"{module:12s}   (its tests failed unmutated: not counted)")
            continue
        run_rows = [r for r in rows if r["result"] not in ("stale", "equivalent")]
        killed = sum(r["result"].startswith("killed") for r in run_rows)
        total_k, total_n = total_k + killed, total_n + len(run_rows)
        n_eq = sum(r["result"] == "equivalent" for r in rows)
        survivors = ", ".join(r["mutant"] for r in run_rows if not r["result"].startswith("killed")) or "-"
        rate = f"{100 * killed / len(run_rows):3.0f} %" if run_rows else "  - "
        print(f"{module:12s} {killed:3d} / {len(run_rows):3d} = {rate}  (+{n_eq} equivalent)   {survivors}")
    if total_n:
        print(f"{'all':12s} {total_k:3d} / {total_n:3d} = {100 * total_k / total_n:3.0f} %")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "killed": total_k, "run": total_n}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
