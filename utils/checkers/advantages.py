"""Checkers for notebook 05's exercises: the KL estimators k1, k2, k3, and GAE.

The references here are loops, one entry at a time, written apart from ``utils.kl`` and
``utils.advantages`` so that these checkers do not lean on the code they check.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, gen, passed, run

KL_FORMULAS = {
    "k1": "log_probs - ref_log_probs",
    "k2": "0.5 * (log_probs - ref_log_probs)**2",
    "k3": "exp(ref_log_probs - log_probs) - 1 - (ref_log_probs - log_probs)",
}


def kl_loop(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref), one entry at a time (Schulman, "Approximating KL")."""
    out = torch.empty(log_probs.shape, dtype=torch.float64)
    for i, (lp, ref) in enumerate(zip(log_probs.reshape(-1).tolist(), ref_log_probs.reshape(-1).tolist())):
        log_r = ref - lp  # log(pi_ref / pi) for a token sampled from pi
        out.view(-1)[i] = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]
    return out


def k1(lp, ref):
    return lp - ref


def k2(lp, ref):
    return 0.5 * (lp - ref) ** 2


def k3(lp, ref):
    return (ref - lp).exp() - 1 - (ref - lp)


def k3_without_minus_one(lp, ref):
    return (ref - lp).exp() - (ref - lp)


def k2_without_half(lp, ref):
    return (lp - ref) ** 2


def ratio_minus_one(lp, ref):
    return (lp - ref).exp() - 1


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
NUMBERS = " (got {got}, expected {expected})"


def kl_mistakes(estimator: str) -> list[Mistake]:
    """The known wrong answers for one estimator: another estimator, swapped arguments, a dropped constant."""
    def swapped(lp, ref):
        return ESTIMATORS[estimator](ref, lp)

    mistakes = [
        Mistake(f"{other} instead of {estimator}: you computed {KL_FORMULAS[other]} = {{got}}; "
                f"{estimator} = {KL_FORMULAS[estimator]} = {{expected}}", ESTIMATORS[other])
        for other in ESTIMATORS if other != estimator
    ]
    if estimator != "k2":  # k2 is symmetric in its arguments: swapping them is no mistake
        mistakes.append(Mistake(f"you swapped log_probs and ref_log_probs{NUMBERS}; {estimator} = "
                                f"{KL_FORMULAS[estimator]}, with the samples drawn from pi", swapped))
    return mistakes + [
        Mistake("you dropped the -1 in k3 = r - 1 - log r" + NUMBERS + "; without it the estimate is 1 where "
                "pi = pi_ref", k3_without_minus_one),
        Mistake("you dropped the 1/2 in k2 = 0.5 * (log r)^2" + NUMBERS, k2_without_half),
        Mistake(f"you computed exp(log_probs - ref_log_probs) - 1 (got {{got}}); {estimator} = "
                f"{KL_FORMULAS[estimator]} = {{expected}}", ratio_minus_one),
    ]


def check_kl(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], estimator: str = "k3") -> None:
    """Check ``fn(log_probs, ref_log_probs)`` -> a per-token estimate of KL(pi || pi_ref) (notebook 05).

    estimator: "k1" = log_probs - ref_log_probs; "k2" = 0.5 (log_probs - ref_log_probs)^2;
    "k3" = exp(ref_log_probs - log_probs) - 1 - (ref_log_probs - log_probs), never negative.
    """
    if estimator not in KL_FORMULAS:
        raise ValueError(f"estimator must be one of {sorted(KL_FORMULAS)}, got {estimator!r}")
    g = gen(7)
    ref_a = -5 * torch.rand(3, 8, generator=g)
    ref_b = -5 * torch.rand(2, 2, 5, generator=g)
    same = -3 * torch.rand(2, 4, generator=g)
    log2 = math.log(2)
    by_hand = {"k1": [log2, -log2], "k2": [log2**2 / 2] * 2, "k3": [log2 - 0.5, 1 - log2]}
    cases = [
        Case("hand-worked: pi = [0.5, 0.25], pi_ref = [0.25, 0.5]",
             (torch.tensor([0.5, 0.25]).log(), torch.tensor([0.25, 0.5]).log()),
             expected=torch.tensor(by_hand[estimator])),
        Case("pi = pi_ref: every estimate is 0", (same, same.clone()), expected=torch.zeros(2, 4)),
        Case("random [3, 8]", (ref_a + 0.5 * torch.randn(3, 8, generator=g), ref_a)),
        Case("random [2, 2, 5], large differences", (ref_b + 2 * torch.randn(2, 2, 5, generator=g), ref_b)),
    ]

    def reference(lp, ref):
        return kl_loop(lp, ref, estimator)

    run("check_kl", fn, cases, reference, kl_mistakes(estimator),
        shape_hint=" (the estimate is per token: do not average here)")
    passed(f"check_kl[{estimator}]", len(cases))


# ----------------------------------------------------------------------------- GAE


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE one entry at a time: delta_t = r_t + gamma V_(t+1) - V_t (V_T = 0), A_t = delta_t + gamma lam A_(t+1)."""
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            v_next = float(values[b, t + 1]) if t + 1 < T else 0.0
            running = float(rewards[b, t]) + gamma * v_next - float(values[b, t]) + gamma * lam * running
            out[b, t] = running
    return out


def _next_values(v: torch.Tensor) -> torch.Tensor:
    """V_(t+1) for every t, with V_T = 0 after the last token."""
    return torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1).double()


def _on_last(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B] -> [B, T] with ``x`` in the last column, 0 elsewhere."""
    out = torch.zeros(x.shape[0], T, dtype=torch.float64)
    out[:, -1] = x
    return out


# Each mistake is written through the right loop where it can be: a changed input gives the same numbers.

def reset_accumulator(r, v, gamma, lam):
    return gae_loop(r, v, gamma, 0.0)  # lam = 0 gives A_t = delta_t: nothing carried from t+1


def gamma_not_gamma_lam(r, v, gamma, lam):
    return gae_loop(r, v, gamma, 1.0)  # accumulates A_(t+1) with gamma alone


def forward_in_time(r, v, gamma, lam):
    B, T = r.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for t in range(T):  # the bug: t runs forward, so A_t collects the past, not the future
            v_next = float(v[b, t + 1]) if t + 1 < T else 0.0
            running = float(r[b, t]) + gamma * v_next - float(v[b, t]) + gamma * lam * running
            out[b, t] = running
    return out


def returned_returns(r, v, gamma, lam):
    return gae_loop(r, v, gamma, lam) + v


def rolled_values(r, v, gamma, lam):
    return gae_loop(r + _on_last(gamma * v[:, 0], r.shape[1]), v, gamma, lam)  # torch.roll: V_T = V_0


def repeated_last_value(r, v, gamma, lam):
    return gae_loop(r + _on_last(gamma * v[:, -1], r.shape[1]), v, gamma, lam)  # V_T = V_(T-1)


def no_gamma_on_next_value(r, v, gamma, lam):
    return gae_loop(r + (1 - gamma) * _next_values(v), v, gamma, lam)  # delta_t = r_t + V_(t+1) - V_t


def swapped_gamma_lam(r, v, gamma, lam):
    return gae_loop(r, v, lam, gamma)


AT = " (expected {expected}, got {got} at index {index})"
GAE_MISTAKES = [
    Mistake("you reset the GAE accumulator: your advantages equal the one-step TD errors "
            "delta_t = r_t + gamma V_(t+1) - V_t; A_t = delta_t + gamma*lam*A_(t+1)" + AT, reset_accumulator),
    Mistake("you used gamma instead of gamma*lam to accumulate A_(t+1) (gamma={gamma}, lam={lam}); with gamma alone "
            "it is the Monte-Carlo return minus V" + AT, gamma_not_gamma_lam),
    Mistake("you ran the recursion forward in time; GAE accumulates from the last token backwards" + AT,
            forward_in_time),
    Mistake("you returned the returns A + V, not the advantages A" + AT, returned_returns),
    Mistake("at the last token the value after it must be 0; you used values[:, 0] (torch.roll wraps around)" + AT,
            rolled_values),
    Mistake("at the last token the value after it must be 0; you bootstrapped with V_(T-1)" + AT,
            repeated_last_value),
    Mistake("you forgot gamma on V_(t+1) in the TD error delta_t = r_t + gamma V_(t+1) - V_t" + AT,
            no_gamma_on_next_value),
    Mistake("you swapped gamma and lam (gamma={gamma}, lam={lam})" + AT, swapped_gamma_lam),
]


def gae_fields(d: Diff) -> dict:
    return {"gamma": d.case.args[2], "lam": d.case.args[3]}


def check_gae(fn: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> None:
    """Check ``fn(rewards [B, T], values [B, T], gamma, lam) -> advantages [B, T]`` (notebook 05).

    delta_t = r_t + gamma V_{t+1} - V_t with V_T = 0 after the last token; A_t = delta_t + gamma lam A_{t+1}.
    """
    g = gen(8)
    cases = [
        Case("hand-worked: rewards [0, 0, 1], values 0.5, gamma=lam=1 -> A = 0.5 each",
             (torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), 1.0, 1.0),
             expected=torch.full((1, 3), 0.5)),
        Case("hand-worked: rewards [1, 0, 2], values 0, gamma=0.5, lam=0.8 -> A = [1.32, 0.8, 2]",
             (torch.tensor([[1.0, 0.0, 2.0]]), torch.zeros(1, 3), 0.5, 0.8),
             expected=torch.tensor([[1.32, 0.8, 2.0]])),
        Case("random B=3, T=6, gamma=0.9, lam=0.8", (torch.randn(3, 6, generator=g),
                                                     torch.randn(3, 6, generator=g), 0.9, 0.8)),
        Case("random B=2, T=5, gamma=1, lam=0.95 (the usual RLHF setting)",
             (torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), 1.0, 0.95)),
        Case("T=1: A = r - V", (torch.randn(2, 1, generator=g), torch.randn(2, 1, generator=g), 0.9, 0.8)),
    ]
    run("check_gae", fn, cases, gae_loop, GAE_MISTAKES, fields=gae_fields,
        shape_hint=" = [B, T]: one advantage per token")
    passed("check_gae", len(cases))
