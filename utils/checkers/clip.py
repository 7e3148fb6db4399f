"""Checker for notebook 02's exercise: the per-token clipped loss -min(r A, clip(r, 1-eps, 1+eps) A)."""

from __future__ import annotations

from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, fmt, gen, passed, run


def reference(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def max_for_min(r, a, eps):
    return -torch.max(r * a, r.clamp(1 - eps, 1 + eps) * a)


def objective_not_loss(r, a, eps):
    return torch.min(r * a, r.clamp(1 - eps, 1 + eps) * a)


def clip_without_min(r, a, eps):
    return -r.clamp(1 - eps, 1 + eps) * a


def never_clipped(r, a, eps):
    return -r * a


def fixed_eps(r, a, eps):
    return -torch.min(r * a, r.clamp(0.8, 1.2) * a)


def clipped_the_product(r, a, eps):
    return -torch.min(r * a, (r * a).clamp(1 - eps, 1 + eps))


def max_and_sign(r, a, eps):
    return torch.max(r * a, r.clamp(1 - eps, 1 + eps) * a)


AT = "at r={r}, A={A}, eps={eps} ({side})"
MISTAKES = [
    Mistake("you used max instead of min: " + AT + " the loss is -min(r*A, clip(r)*A) = {expected}, you got {got}; "
            "PPO takes the pessimistic (smaller) objective", max_for_min),
    Mistake("you returned the objective min(r*A, clip(r)*A), not the loss: the sign is flipped (" + AT +
            " expected {expected}, got {got}); the loss to minimise is -min(...)", objective_not_loss),
    Mistake("you clipped without the min: " + AT + " the min keeps the unclipped r*A, so the loss is {expected}; "
            "you got {got}", clip_without_min),
    Mistake("you never clipped: your loss is -r*A everywhere; " + AT + " expected {expected}, got {got}",
            never_clipped),
    Mistake("you ignored clip_eps: your loss matches clip_eps=0.2, but this case passes clip_eps={eps} (" + AT +
            " expected {expected}, got {got})", fixed_eps),
    Mistake("you clipped r*A instead of r: clip the ratio, then multiply by A (" + AT +
            " expected {expected}, got {got})", clipped_the_product),
    Mistake("you returned max(r*A, clip(r)*A): the sign is flipped and max should be min (" + AT +
            " expected {expected}, got {got})", max_and_sign),
]


def side(r: float, a: float, eps: float) -> str:
    """Where a (ratio, advantage) pair sits in the notebook's case table, in words."""
    if a == 0:
        return "A = 0"
    band = "r < 1-eps" if r < 1 - eps else "r > 1+eps" if r > 1 + eps else "r inside [1-eps, 1+eps]"
    return f"A {'>' if a > 0 else '<'} 0 and {band}"


def fields(d: Diff) -> dict:
    r, a, eps = d.at(0), d.at(1), d.case.args[2]
    return {"r": fmt(r), "A": fmt(a), "eps": eps, "side": side(r, a, eps)}


def check_clipped_loss(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Check ``fn(ratio, advantages, clip_eps) -> -min(r A, clip(r, 1-eps, 1+eps) A)`` elementwise (notebook 02)."""
    g = gen(2)
    cases = [
        Case("hand-worked table, eps=0.2: r in {0.5, 0.9, 1, 1.1, 1.5}, A = +1 then -1",
             (torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5] * 2), torch.tensor([1.0] * 5 + [-1.0] * 5), 0.2),
             expected=torch.tensor([-0.5, -0.9, -1.0, -1.1, -1.2, 0.8, 0.9, 1.0, 1.1, 1.5])),
        Case("eps=0.1: r in {0.85, 0.95, 1.05, 1.15}, A = +2 then -2",
             (torch.tensor([0.85, 0.95, 1.05, 1.15] * 2), torch.tensor([2.0] * 4 + [-2.0] * 4), 0.1),
             expected=torch.tensor([-1.7, -1.9, -2.1, -2.2, 1.8, 1.9, 2.1, 2.3])),
        Case("random [3, 7], eps=0.2", ((0.4 * torch.randn(3, 7, generator=g)).exp(),
                                        torch.randn(3, 7, generator=g), 0.2)),
        Case("random [2, 3, 4], eps=0.3, some A = 0",
             ((0.5 * torch.randn(2, 3, 4, generator=g)).exp(),
              torch.randn(2, 3, 4, generator=g) * (torch.rand(2, 3, 4, generator=g) > 0.2), 0.3)),
    ]
    run("check_clipped_loss", fn, cases, reference, MISTAKES, fields=fields,
        shape_hint=" (the loss is per token, elementwise: do not average here)")
    passed("check_clipped_loss", len(cases))
