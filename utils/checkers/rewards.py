"""Checker for notebook 06's exercise: per-token rewards, -kl_coef * kl plus the score on the last kept token.

The reference is a loop written apart from ``utils.advantages.token_rewards``.
"""

from __future__ import annotations

from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, gen, passed, run


def rewards_loop(score: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards one entry at a time: -kl_coef * kl where kept, 0 elsewhere, + score on the last kept."""
    B, T = kl.shape
    mask = action_mask.bool()
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = -kl_coef * float(kl[b, t])
        last = max(t for t in range(T) if mask[b, t])
        out[b, last] += float(score[b])
    return out


def _last_kept(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool().long().sum(-1) - 1  # right-padded rows, as in every case below


def _with_score_at(penalty: torch.Tensor, score: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    out = penalty.double().clone()
    out[torch.arange(len(score)), where] += score.double()
    return out


def _masked_penalty(kl, mask, kl_coef):
    return torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))


def unmasked_penalty(score, kl, mask, kl_coef):
    return _with_score_at(-kl_coef * kl, score, _last_kept(mask))


def penalty_added(score, kl, mask, kl_coef):
    return _with_score_at(-_masked_penalty(kl, mask, kl_coef), score, _last_kept(mask))


def forgot_kl_coef(score, kl, mask, kl_coef):
    return _with_score_at(_masked_penalty(kl, mask, 1.0), score, _last_kept(mask))


def score_at_last_position(score, kl, mask, kl_coef):
    return _with_score_at(_masked_penalty(kl, mask, kl_coef), score, torch.full_like(_last_kept(mask), kl.shape[1] - 1))


def score_at_first_token(score, kl, mask, kl_coef):
    return _with_score_at(_masked_penalty(kl, mask, kl_coef), score, torch.zeros_like(_last_kept(mask)))


def score_one_past(score, kl, mask, kl_coef):
    return _with_score_at(_masked_penalty(kl, mask, kl_coef), score, _last_kept(mask) + 1)  # IndexError on full rows


def score_on_every_kept_token(score, kl, mask, kl_coef):
    return _masked_penalty(kl, mask, kl_coef).double() + score.double()[:, None] * mask.double()


def score_overwrote_penalty(score, kl, mask, kl_coef):
    out = _masked_penalty(kl, mask, kl_coef).double()
    out[torch.arange(len(score)), _last_kept(mask)] = score.double()
    return out


AT = (" (expected {expected}, got {got} at index {index}; row {row} keeps tokens 0..{last} of T = {T})")
MISTAKES = [
    Mistake("you did not zero the KL penalty on masked-out tokens (they are padding, not actions)" + AT,
            unmasked_penalty),
    Mistake("the KL penalty is added; it must be subtracted: -kl_coef * kl" + AT, penalty_added),
    Mistake("you forgot kl_coef: the penalty is -kl_coef * kl" + AT, forgot_kl_coef),
    Mistake("score placed at the last position instead of the last kept token" + AT, score_at_last_position),
    Mistake("score placed at the first token instead of the last kept token" + AT, score_at_first_token),
    Mistake("off by one: you placed the score at index mask.sum() (one past the last kept token); the last kept "
            "token is at mask.sum() - 1" + AT, score_one_past),
    Mistake("you added the score to every kept token; it goes on the last kept token only" + AT,
            score_on_every_kept_token),
    Mistake("you overwrote the last kept token's KL penalty with the score; add the score to it" + AT,
            score_overwrote_penalty),
]


def fields(d: Diff) -> dict:
    row = d.index[0]
    return {"row": row, "last": int(d.case.args[2][row].bool().sum()) - 1, "T": d.case.args[1].shape[1]}


def right_padded(lengths: list[int], T: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def check_token_rewards(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Check ``fn(score [B], kl [B, T], action_mask [B, T], kl_coef) -> rewards [B, T]`` (notebook 06).

    rewards = -kl_coef * kl on kept tokens, 0 elsewhere, plus each row's score on its last kept token.
    """
    g = gen(9)
    cases = [
        Case("hand-worked: score [1, -0.5], rows keep 3 and 2 of 4 tokens, kl_coef=0.1",
             (torch.tensor([1.0, -0.5]), torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]),
              right_padded([3, 2], 4), 0.1),
             expected=torch.tensor([[-0.01, -0.02, 0.97, 0.0], [-0.05, -0.56, 0.0, 0.0]])),
        Case("random B=3, T=6, rows keep 6, 2, 4 tokens, kl_coef=0.05",
             (torch.randn(3, generator=g), torch.rand(3, 6, generator=g), right_padded([6, 2, 4], 6), 0.05)),
        Case("random B=2, T=5, rows keep 1, 3 tokens, kl_coef=0.2, float mask",
             (torch.randn(2, generator=g), torch.randn(2, 5, generator=g).abs(),
              right_padded([1, 3], 5, torch.float32), 0.2)),
        Case("random B=3, T=4, rows keep 3, 2, 1 tokens, kl_coef=0.5, negative kl estimates (k1)",
             (torch.randn(3, generator=g), torch.randn(3, 4, generator=g), right_padded([3, 2, 1], 4), 0.5)),
    ]
    run("check_token_rewards", fn, cases, rewards_loop, MISTAKES, fields=fields,
        shape_hint=" = [B, T]: one reward per token")
    passed("check_token_rewards", len(cases))
