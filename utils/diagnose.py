"""Read an actor update's diagnostics and name the likely cause of what looks wrong, in plain words.

    findings = diagnose(history)                      # per-epoch dicts of actor_update, or per-update dicts of train
    findings = diagnose(history, rollout=ro)          # the Rollout narrows the cause (padding, masks, rewards)

Each check reads numbers that an actor update already logs (the ratio at the first epoch, approx_kl,
clip_frac, the mean k1 to the reference, NaNs, gradient norms, the loss against the advantage) and
knows what a healthy run gives:

- the ratio at epoch 0 is 1: |log r| <= 1e-6 measured when the rollout and the update score the same
  tokens with the same fp32 code (the two code paths of utils.ppo differ by 9.5e-7). Scoring under bf16
  gives |log r| up to a few 1e-2 on a few hundred tokens, so ``precision="bf16"`` allows 0.1. Beyond
  that the update's log-probs are not the rollout's: dropout, temperature, stale or misaligned log-probs;
- the sampled tokens' mean surprisal equals the policy's mean entropy (E_{a~pi}[-log pi(a)] = H(pi)):
  a gap of over 1 nat on at least 64 tokens means the log-probs score other tokens than the ones sampled
  there (an off-by-one shift), or the tokens came from another distribution (temperature, top-k/top-p);
- the mean k1 to the reference estimates KL(pi || pi_ref) >= 0, so a mean below 0 that persists means the
  tokens were not sampled from the pi that scored them;
- with ratio 1 at epoch 0 the loss is minus the mean advantage, so the loss follows the score; and the
  clip, once most tokens are clipped, shrinks the gradient.

Silent (no findings) on a healthy run; ``notes=True`` adds remarks on things that look odd but are
expected (clip fraction 0 with one epoch). Thresholds were measured on the small GPT-2 over seeds and
sit far from both the healthy and the buggy values.

Derived in notebooks/10_pitfall_lab.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

TOLERANCE = {"fp32": 1e-5, "bf16": 0.1}
"""Largest |log r| at epoch 0 that counts as "ratio 1": fp32 same-code scoring gives <= 1e-6, bf16 a few 1e-2."""
NUMERIC_BAND = 0.1
"""Below this |log r| a mismatch is numerics (precision, kernels, batch shapes), above it a different policy."""
MISALIGNED_LOG_RATIO = 3.0
"""|log r| above this (ratio > 20 or < 0.05) at epoch 0: the two sides score different tokens."""
SYSTEMATIC_K1 = 0.1
"""approx_kl_k1 at epoch 0 above this: every token moved the same way (temperature, another model), not noise."""
SURPRISAL_GAP = 1.0
"""|mean surprisal - mean entropy| above this (nats) on >= SURPRISAL_MIN_TOKENS tokens: tokens and scores disagree."""
SURPRISAL_MIN_TOKENS = 64

CAUSES = {
    "dropout": "dropout is on in the update (train() mode), so every forward pass is a different policy",
    "temperature": "the update scores at another temperature than the one that sampled (pi is softmax(logits / tau))",
    "stale_logprobs": "the old log-probs come from another policy version (stale) or another model",
    "misaligned": "the log-probs score other tokens: an off-by-one shift (logits at t scoring token t) or a slice "
                  "that does not start at prompt_len - 1",
    "position_ids": "left padding without position ids: padded rows get shifted positions",
    "numerics": "numerics: bf16/fp16 scoring, other kernels or batch shapes (an inference engine); expected at "
                "~1e-3 in bf16, so use a tolerance (or rollout importance sampling), it is not a bug in the loss",
    "sampling_settings": "the tokens were not sampled from the distribution that scores them: top-k/top-p, "
                         "min_new_tokens (EOS suppressed) or a lower temperature at sampling, full softmax at scoring",
    "empty_mask": "a masked mean over an empty mask (0/0): a response whose action mask keeps no token",
    "overflow": "an overflow: exp of a large log-ratio, or fp16 logits",
    "score_lost": "the score never reaches the loss: it sits on a pad (position -1 of a response that ended "
                  "early) or another masked position",
    "advantage_normalisation": "the advantages were normalised within each response (over its own tokens: a "
                               "batch of one, or the wrong axis), which erases the score",
    "local_normaliser": "token-mean with each rank (or micro-batch) dividing by its own token count",
    "optimistic_bound": "the clipped tokens still pull: -max instead of -min (the optimistic bound), or the clip "
                        "applied to the wrong term",
    "old_recomputed": "pi_old is recomputed every epoch (old = log_probs.detach()), so the ratio is always 1 and "
                      "the clip never acts (fine with one epoch, wrong when K > 1)",
    "kl_only_in_reward": "the KL enters only the reward: at batch size 1 its pull is weak and noisy; add a KL "
                         "term to the loss (kl_loss_coef), raise kl_coef or lower the learning rate",
}
"""Every cause a finding can name, in plain words."""


@dataclass(frozen=True)
class Finding:
    """One symptom and its likely causes (most likely first, keys of ``CAUSES``)."""

    code: str
    """short id of the symptom, e.g. "ratio_at_start\""""
    severity: str
    """"bug", "warning" or "note" (expected, not a bug)"""
    message: str
    """the symptom with its numbers, then the likely cause in plain words"""
    causes: tuple[str, ...] = field(default_factory=tuple)
    """candidate causes, most likely first"""

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


def _is_epoch_list(x: Any) -> bool:
    return isinstance(x, Sequence) and len(x) > 0 and all(isinstance(e, Mapping) and "epoch" in e for e in x)


def _split(history: Any) -> tuple[list[list[Mapping]], list[Mapping]]:
    """(per-update lists of epoch dicts, per-update dicts of train) from any accepted form."""
    if isinstance(history, Mapping):
        history = [history]
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)) or len(history) == 0:
        raise ValueError("history must be a non-empty list of diagnostics dicts (actor_update's epochs or train's updates)")
    if _is_epoch_list(history):
        return [list(history)], []
    if all(_is_epoch_list(h) for h in history):
        return [list(h) for h in history], []
    if all(isinstance(h, Mapping) for h in history):
        return [], list(history)
    raise ValueError("history must be actor_update's list of epoch dicts, a list of such lists, or train's list of dicts")


def _numbers(d: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _max_abs_log_ratio(e: Mapping) -> float:
    lo, hi = float(e.get("ratio_min", 1.0)), float(e.get("ratio_max", 1.0))
    if not (lo > 0 and math.isfinite(lo) and math.isfinite(hi)):
        return math.inf
    return max(abs(math.log(lo)), abs(math.log(hi)))


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def _rollout_facts(rollout: Any) -> dict[str, Any]:
    """What a Rollout tells about the cause: left padding, empty rows, reward on masked positions, surprisal."""
    if rollout is None:
        return {}
    mask = rollout.action_mask.bool()
    facts: dict[str, Any] = {
        "left_padding": bool((rollout.attention_mask[:, : rollout.prompt_len] == 0).any()),
        "empty_rows": int((~mask.any(-1)).sum()),
        "kept_tokens": int(mask.sum()),
    }
    off_mask = torch.where(mask, 0.0, rollout.rewards.double().abs())
    facts["reward_off_mask"] = float(off_mask.sum())
    if facts["kept_tokens"] > 0:
        facts["surprisal"] = float(-rollout.old_log_probs.double()[mask].mean())
    rows_with_tokens = mask.any(-1)
    if int(rows_with_tokens.sum()) >= 2:
        per_row_reward = torch.where(mask, rollout.rewards.double(), 0.0).sum(-1)[rows_with_tokens]
        adv_row_mean = (torch.where(mask, rollout.advantages.double(), 0.0).sum(-1)[rows_with_tokens]
                        / mask.sum(-1)[rows_with_tokens])
        facts["rewards_differ"] = float(per_row_reward.max() - per_row_reward.min()) > 1e-6
        facts["adv_row_means_zero"] = float(adv_row_mean.abs().max()) < 1e-6
    return facts


def _ratio_causes(x: float, k1: float, facts: Mapping, config: Any) -> list[str]:
    if x > MISALIGNED_LOG_RATIO:
        order = ["misaligned", "stale_logprobs", "temperature", "dropout"]
    elif k1 >= SYSTEMATIC_K1:
        order = ["temperature", "stale_logprobs", "misaligned", "dropout"]
    else:
        order = ["dropout", "temperature", "stale_logprobs", "misaligned"]
    if facts.get("left_padding") and x <= MISALIGNED_LOG_RATIO:
        order.insert(0, "position_ids")
    if config is not None and getattr(config, "dropout_in_update", False):
        order = ["dropout"] + [c for c in order if c != "dropout"]
    return order


def _check_epochs(updates: list[list[Mapping]], facts: Mapping, tol: float, precision: str, config: Any,
                  notes: bool) -> list[Finding]:
    out: list[Finding] = []
    first = updates[0]
    e0 = first[0]
    # --- the ratio at the first epoch ---
    worst = max(updates, key=lambda u: _max_abs_log_ratio(u[0]))
    x, k1 = _max_abs_log_ratio(worst[0]), float(worst[0].get("approx_kl_k1", 0.0))
    if math.isfinite(x) and x > tol:
        where = f"ratio in [{worst[0]['ratio_min']:.4g}, {worst[0]['ratio_max']:.4g}] at epoch 0 (max |log r| = {x:.2g}, " \
                f"approx_kl_k1 = {k1:.2g}); with the rollout's own weights it must be 1 (|log r| <= {tol:g} in {precision})"
        if x <= NUMERIC_BAND:
            out.append(Finding("ratio_at_start", "warning", f"{where}. Likely {CAUSES['numerics']}.", ("numerics",)))
        else:
            causes = _ratio_causes(x, k1, facts, config)
            out.append(Finding("ratio_at_start", "bug",
                               f"{where}: the update's log-probs are not the rollout's. Likely {CAUSES[causes[0]]}; "
                               f"else {', '.join(causes[1:])}.", tuple(causes)))
    # --- the ratio never leaves 1 although the weights move ---
    for u in updates:
        if len(u) >= 2 and all(_max_abs_log_ratio(e) <= TOLERANCE["fp32"] for e in u) and float(u[0].get("grad_norm", 0.0)) > 0 \
                and float(u[0].get("policy_loss", 0.0)) != 0.0:
            out.append(Finding("ratio_frozen", "bug",
                               f"the ratio is 1 in all {len(u)} epochs although the gradient is not 0 "
                               f"(grad_norm {float(u[0]['grad_norm']):.3g} at epoch 0): {CAUSES['old_recomputed']}.",
                               ("old_recomputed",)))
            break
    # --- surprisal of the sampled tokens against the entropy ---
    if "surprisal" in facts and "entropy" in e0 and facts.get("kept_tokens", 0) >= SURPRISAL_MIN_TOKENS:
        gap = facts["surprisal"] - float(e0["entropy"])
        if gap > SURPRISAL_GAP:
            out.append(Finding("surprisal_gap", "bug",
                               f"the sampled tokens' mean surprisal ({facts['surprisal']:.2f} nats) exceeds the "
                               f"policy's mean entropy ({float(e0['entropy']):.2f}) by {gap:.2f} nats; for tokens "
                               f"sampled from pi the two are equal. Likely {CAUSES['misaligned']}.", ("misaligned",)))
        elif gap < -SURPRISAL_GAP:
            out.append(Finding("surprisal_gap", "bug",
                               f"the sampled tokens' mean surprisal ({facts['surprisal']:.2f} nats) is {-gap:.2f} nats "
                               f"below the policy's mean entropy ({float(e0['entropy']):.2f}): the tokens are likelier "
                               f"than samples of pi would be. Likely {CAUSES['sampling_settings']}.",
                               ("sampling_settings", "temperature")))
    # --- every advantage 0 ---
    if float(e0.get("grad_norm", 1.0)) < 1e-8 and abs(float(e0.get("policy_loss", 1.0))) < 1e-8:
        if facts.get("rewards_differ") and facts.get("adv_row_means_zero"):
            out.append(Finding("zero_signal", "bug",
                               "the loss and the gradient are exactly 0 at epoch 0 although the responses' rewards "
                               f"differ, and every response's advantages average 0. Likely {CAUSES['advantage_normalisation']}.",
                               ("advantage_normalisation",)))
        else:
            out.append(Finding("zero_signal", "warning",
                               "the loss and the gradient are exactly 0 at epoch 0: every advantage is 0. Expected if "
                               f"every response scored the same (a group of equal scores); otherwise "
                               f"{CAUSES['advantage_normalisation']}, or {CAUSES['score_lost']}.",
                               ("advantage_normalisation", "score_lost")))
    # --- the clip does not stop the growth ---
    for u in updates:
        if len(u) < 4 or not all("grad_norm" in e and "clip_frac" in e and "approx_kl_k3" in e for e in u):
            continue
        g0, g1 = float(u[0]["grad_norm"]), float(u[-1]["grad_norm"])
        kl = [float(e["approx_kl_k3"]) for e in u]
        steps = [b - a for a, b in zip(kl, kl[1:])]
        half = len(steps) // 2
        accelerating = sum(steps[half:]) / (len(steps) - half) > 1.2 * sum(steps[:half]) / max(half, 1)
        if float(u[-1]["clip_frac"]) >= 0.3 and g1 > 1.2 * g0 and accelerating:
            out.append(Finding("clip_not_holding", "bug",
                               f"{float(u[-1]['clip_frac']):.0%} of the tokens are past the clip at the last epoch, yet "
                               f"the gradient norm grew from {g0:.3g} to {g1:.3g} and approx_kl accelerates "
                               f"({kl[0]:.3g} -> {kl[-1]:.3g}); with -min a clipped token has no gradient, so the norm "
                               f"shrinks. Likely {CAUSES['optimistic_bound']}.", ("optimistic_bound",)))
            break
    # --- expected things that look odd ---
    if notes and all(len(u) == 1 for u in updates) and all(float(u[0].get("clip_frac", 1.0)) == 0.0 for u in updates):
        out.append(Finding("clip_zero_one_epoch", "note",
                           "clip_frac is 0 with one epoch per rollout: the only step has ratio 1, so nothing can clip. "
                           "Expected, not a bug.", ()))
    return out


def _check_updates(rows: list[Mapping], facts: Mapping) -> list[Finding]:
    out: list[Finding] = []
    # --- a negative mean k1 to the reference that persists ---
    k1 = [float(r["kl_ref_k1_mean"]) for r in rows if "kl_ref_k1_mean" in r and float(r["kl_ref_k1_mean"]) != 0.0]
    if len(k1) >= 3:
        m, se = _mean_se(k1)
        neg = sum(x < 0 for x in k1) / len(k1)
        if neg >= 0.75 and m + 2 * se < 0:
            out.append(Finding("negative_kl", "bug",
                               f"the mean k1 to the reference is negative in {neg:.0%} of {len(k1)} updates (mean "
                               f"{m:.3g} +- {se:.2g} nats/token); it estimates KL(pi || pi_ref) >= 0 when the tokens are "
                               f"sampled from pi. Likely {CAUSES['sampling_settings']}.",
                               ("sampling_settings", "temperature")))
    # --- the loss does not follow the advantage ---
    pairs = [(float(r["advantage"]), float(r["policy_loss"])) for r in rows if "advantage" in r and "policy_loss" in r]
    if len(pairs) >= 5:
        a = [p[0] for p in pairs]
        ma = sum(a) / len(a)
        var_a = sum((x - ma) ** 2 for x in a) / len(a)
        if var_a > 0.1**2:
            ml = sum(-p[1] for p in pairs) / len(pairs)
            slope = sum((p[0] - ma) * (-p[1] - ml) for p in pairs) / len(pairs) / var_a
            if slope < 0.3:
                causes = ["score_lost", "advantage_normalisation"] if facts.get("reward_off_mask", 0) > 0 \
                    else ["advantage_normalisation", "score_lost"]
                out.append(Finding("score_not_in_loss", "bug",
                                   f"the loss does not follow the advantage (score - b): slope of -loss on it "
                                   f"{slope:.2f} over {len(pairs)} updates, where ratio 1 makes it about 1. Likely "
                                   f"{CAUSES[causes[0]]}; or {CAUSES[causes[1]]}.", tuple(causes)))
    # --- the KL to the reference climbs without end ---
    kls = [float(r["kl_ref_k1_mean"]) for r in rows if "kl_ref_k1_mean" in r]
    kl_in_loss = any(abs(float(r.get("kl_loss", 0.0))) > 0 for r in rows)
    if len(kls) >= 12 and not kl_in_loss:
        n3 = len(kls) // 3
        mid, last = kls[n3: 2 * n3], kls[len(kls) - n3:]
        (m_mid, se_mid), (m_last, se_last) = _mean_se(mid), _mean_se(last)
        if m_last - m_mid > 2 * math.hypot(se_mid, se_last) and m_last > 1.25 * max(m_mid, 1e-6):
            out.append(Finding("kl_climbs", "warning",
                               f"the KL to the reference keeps climbing ({m_mid:.3g} -> {m_last:.3g} nats/token from the "
                               f"middle to the last third of {len(kls)} updates), with no KL term in the loss. Likely "
                               f"{CAUSES['kl_only_in_reward']}.", ("kl_only_in_reward",)))
    return out


def _check_any(records: Iterable[Mapping], facts: Mapping) -> list[Finding]:
    out: list[Finding] = []
    records = list(records)
    # --- NaN or inf anywhere ---
    for i, r in enumerate(records):
        bad = [k for k, v in _numbers(r).items() if not math.isfinite(v)]
        if bad:
            ratio_blown = not math.isfinite(_max_abs_log_ratio(r)) or _max_abs_log_ratio(r) > 50
            causes = ["overflow", "empty_mask"] if ratio_blown else ["empty_mask", "overflow"]
            if facts.get("empty_rows"):
                causes = ["empty_mask", "overflow"]
            out.append(Finding("non_finite", "bug",
                               f"NaN or inf in {', '.join(bad)} (first in record {i}); after that step every weight is "
                               f"NaN. Likely {CAUSES[causes[0]]}; or {CAUSES[causes[1]]}.", tuple(causes)))
            break
    if facts.get("empty_rows") and not out:
        out.append(Finding("empty_rows", "bug",
                           f"{facts['empty_rows']} response(s) keep no token in the action mask: "
                           f"{CAUSES['empty_mask']}. Build the mask with response_mask (it keeps the EOS) or drop the row.",
                           ("empty_mask",)))
    # --- reward on masked positions ---
    if facts.get("reward_off_mask", 0) > 0:
        out.append(Finding("score_on_masked", "bug",
                           f"the rewards hold {facts['reward_off_mask']:.3g} (absolute sum) on masked positions: "
                           f"{CAUSES['score_lost']}. Put the score on each row's last kept token.", ("score_lost",)))
    # --- loss normalisation across ranks / micro-batches ---
    for r in records:
        tokens = r.get("rank_tokens")
        if tokens is None or len(tokens) < 2:
            continue
        agg = r.get("agg", "token-mean")
        if r.get("normalizer") is None and agg in ("token-mean", "bnpo") and min(tokens) > 0 and max(tokens) != min(tokens):
            out.append(Finding("local_normaliser", "bug",
                               f"{len(tokens)} ranks or micro-batches hold {list(tokens)} kept tokens and each divides "
                               f"by its own count: a token where there are {min(tokens)} weighs "
                               f"{max(tokens) / min(tokens):.3g}x one where there are {max(tokens)}. Likely "
                               f"{CAUSES['local_normaliser']}; divide every token sum by the global count "
                               f"(utils.global_normalizer; / world size when the ranks' gradients are averaged).",
                               ("local_normaliser",)))
            break
    return out


def diagnose(history: Sequence[Mapping] | Sequence[Sequence[Mapping]] | Mapping, *, rollout: Any = None,
             precision: str = "fp32", config: Any = None, notes: bool = False) -> list[Finding]:
    """Name the likely cause of each symptom in an update's diagnostics; [] for a healthy run.

    history: ``utils.ppo.actor_update``'s list of per-epoch dicts, a list of such lists (several updates),
    or ``utils.ppo.train``'s list of per-update dicts. Any dict may also carry ``rank_tokens`` (kept tokens
    per rank or micro-batch), ``normalizer`` (what each divided by; None = its own count) and ``agg``.
    rollout: the ``utils.ppo.Rollout`` (any batch size) the epochs were run on, for the checks that need
    its tensors (left padding, empty rows, rewards on masked positions, surprisal of the sampled tokens).
    precision: "fp32" or "bf16", the scoring precision, which sets the epoch-0 ratio tolerance
    (``TOLERANCE``). config: the ``ActorConfig``, if known (its ``dropout_in_update`` confirms dropout).
    notes: also report expected behaviours that look like bugs. Returns a list of ``Finding``.
    """
    if precision not in TOLERANCE:
        raise ValueError(f"precision must be one of {tuple(TOLERANCE)}, got {precision!r}")
    updates, rows = _split(history)
    facts = _rollout_facts(rollout)
    records = [e for u in updates for e in u] + rows
    findings = _check_any(records, facts)
    if any(f.code == "non_finite" for f in findings):
        return findings  # after a NaN the other numbers say nothing
    if updates:
        findings += _check_epochs(updates, facts, TOLERANCE[precision], precision, config, notes)
    if rows:
        findings += _check_updates(rows, facts)
    return findings


def report(findings: Sequence[Finding]) -> str:
    """The findings as lines of text ("healthy: no findings" when there are none)."""
    return "\n".join(str(f) for f in findings) if findings else "healthy: no findings"


# ``utils.diagnose`` is this function once the package exports it, so the module's names ride along on it:
# ``utils.diagnose.report``, ``utils.diagnose.CAUSES``, ``utils.diagnose.TOLERANCE``, ``utils.diagnose.Finding``.
diagnose.report = report  # type: ignore[attr-defined]
diagnose.CAUSES = CAUSES  # type: ignore[attr-defined]
diagnose.TOLERANCE = TOLERANCE  # type: ignore[attr-defined]
diagnose.Finding = Finding  # type: ignore[attr-defined]
