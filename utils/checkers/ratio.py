"""Checker for notebook 01's exercise: the importance ratio pi_theta / pi_old from log-probs."""

from __future__ import annotations

from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, check_grad, fmt, gen, passed, run


def reference(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    return (log_probs - old_log_probs).exp()


def inverted(log_probs, old_log_probs):
    return (old_log_probs - log_probs).exp()


def log_ratio(log_probs, old_log_probs):
    return log_probs - old_log_probs


def divided_log_probs(log_probs, old_log_probs):
    return log_probs / old_log_probs


def subtracted_probs(log_probs, old_log_probs):
    return log_probs.exp() - old_log_probs.exp()


def exp_then_divide(log_probs, old_log_probs):
    return log_probs.exp() / old_log_probs.exp()


def inverted_exp_then_divide(log_probs, old_log_probs):
    return old_log_probs.exp() / log_probs.exp()


MISTAKES = [
    Mistake("your ratio is inverted: got {got} where pi/pi_old = {expected}; "
            "the ratio is pi_theta/pi_old = exp(log_probs - old_log_probs)", inverted),
    Mistake("you returned the log-ratio log_probs - old_log_probs ({got}); the ratio is its exp, {expected}",
            log_ratio),
    Mistake("you divided the log-probs ({got}); probabilities divide, so log-probs subtract: "
            "exp(log_probs - old_log_probs) = {expected}", divided_log_probs),
    Mistake("you subtracted the probabilities ({got}); the ratio divides them: {expected}", subtracted_probs),
    Mistake("you computed exp(log_probs) / exp(old_log_probs): at log-prob {log_prob} both exps underflow to 0 "
            "in float32 and give {got}; compute exp(log_probs - old_log_probs) = {expected} instead",
            exp_then_divide),
    Mistake("your ratio is inverted and computed as exp(old)/exp(new), which underflows: got {got} where "
            "pi/pi_old = {expected}", inverted_exp_then_divide),
]


def fields(d: Diff) -> dict:
    return {"log_prob": fmt(d.at(0))}


def check_ratio(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(log_probs, old_log_probs) -> pi_theta / pi_old`` elementwise (notebook 01)."""
    g = gen(1)
    old_a = -5 * torch.rand(4, 6, generator=g)
    old_b = -5 * torch.rand(2, 3, 5, generator=g)
    cases = [
        Case("hand-worked: pi/pi_old = 2, 0.5, 1",
             (torch.tensor([0.5, 0.2, 0.9]).log(), torch.tensor([0.25, 0.4, 0.9]).log()),
             expected=torch.tensor([2.0, 0.5, 1.0])),
        Case("random [4, 6]", (old_a + 0.3 * torch.randn(4, 6, generator=g), old_a)),
        Case("random [2, 3, 5]", (old_b + 0.5 * torch.randn(2, 3, 5, generator=g), old_b)),
        Case("rare tokens: log-probs near -150",
             (torch.tensor([-149.0, -151.5, -160.0]), torch.tensor([-150.0, -151.0, -160.0])),
             expected=torch.tensor([1.0, -0.5, 0.0]).double().exp()),
    ]
    run("check_ratio", fn, cases, reference, MISTAKES, fields=fields,
        shape_hint=" (the ratio is elementwise: one per token)")
    check_grad("check_ratio", fn, cases[1], 0, reference, "log_probs")
    passed("check_ratio", len(cases))
