"""Checkers for notebook 04's exercises: the masked mean, and the masked PPO policy loss built on it."""

from __future__ import annotations

from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, check_grad, gen, passed, run, short
from utils.loss import policy_loss as utils_policy_loss
from utils.masking import masked_mean as utils_masked_mean


def masked_mean_reference(x, mask, dim=None):
    return utils_masked_mean(x, mask, dim)


def _msum(x, mask, dim):
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def divided_by_all(x, mask, dim=None):
    return _msum(x, mask, dim) / (mask.numel() if dim is None else x.shape[dim])


def ignored_mask(x, mask, dim=None):
    return x.mean() if dim is None else x.mean(dim)


def masked_sum(x, mask, dim=None):
    return _msum(x, mask, dim)


def mean_of_row_means(x, mask, dim=None):
    return utils_masked_mean(x, mask, -1).mean() if dim is None else utils_masked_mean(x, mask, dim)


def divided_by_whole_count(x, mask, dim=None):
    return _msum(x, mask, dim) / mask.sum()


MASKED_MEAN_MISTAKES = [
    Mistake("you divided by the number of all tokens ({n_all}), not the kept ones ({n_kept}): expected {expected}, "
            "got {got}", divided_by_all),
    Mistake("you ignored the mask: that is the mean over all entries; expected {expected}, got {got}", ignored_mask),
    Mistake("you returned the masked sum, not the mean: divide by the number of kept entries ({n_kept}); "
            "expected {expected}, got {got}", masked_sum),
    Mistake("with dim=None you averaged the per-row means ({got}); dim=None is one mean over all kept entries "
            "({expected}), which weighs long rows more", mean_of_row_means),
    Mistake("with dim={dim} you divided each slice's sum by the kept count of the whole mask ({n_whole}); "
            "divide by each slice's own count ({n_kept})", divided_by_whole_count),
]


def masked_mean_fields(d: Diff) -> dict:
    x, mask = d.case.args[0], d.case.args[1].bool()
    dim = d.case.args[2] if len(d.case.args) > 2 else None
    if dim is None:
        n_all, n_kept = mask.numel(), int(mask.sum())
    else:
        n_all, n_kept = x.shape[dim], int(mask.sum(dim)[d.index])
    return {"n_all": n_all, "n_kept": n_kept, "dim": dim, "n_whole": int(mask.sum())}


def _must_raise_on_empty(fn: Callable, case: Case) -> None:
    """An empty mask (or, with dim=-1, an empty row) must raise ValueError, not return a number."""
    args, kwargs = case.fresh()
    try:
        out = fn(*args, **kwargs)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as err:
        raise AssertionError(f"check_masked_mean (case '{case.name}'): your masked_mean raised {type(err).__name__} "
                             f"({err}); raise ValueError on an empty mask, naming the problem") from err
    where = "on an empty mask" if len(case.args) == 2 else "when a row keeps no entry (dim=-1)"
    if isinstance(out, torch.Tensor) and out.is_floating_point() and bool(torch.isnan(out).any()):
        what = f"returns nan {where}"
    elif isinstance(out, torch.Tensor):
        what = f"returns {short(out)} {where} (a clamp or +eps on the count hides it: the loss silently becomes 0)"
    else:
        what = f"returns {out!r} {where}"
    raise AssertionError(f"check_masked_mean (case '{case.name}'): your masked_mean {what} instead of raising "
                         "ValueError; check the kept count (mask.sum(dim) == 0) and raise ValueError")


def check_masked_mean(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(tensor, mask, dim=None)``: mean over kept entries; ``ValueError`` on an empty mask (notebook 04).

    dim=None gives one mean over all kept entries (a scalar); dim=-1 one mean per row. With dim=-1 a row
    that keeps nothing is an empty mask too (its mean is 0/0) and must raise ``ValueError``.
    """
    g = gen(5)
    x_hand = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m_hand = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 6])[:, None]  # [4, 9] right-padded rows
    cases = [
        Case("hand-worked, dim left out: (1+2+4)/3", (x_hand, m_hand), expected=torch.tensor(7 / 3)),
        Case("hand-worked, dim=-1: [(1+2)/2, 4/1]", (x_hand, m_hand, -1), expected=torch.tensor([1.5, 4.0])),
        Case("random [4, 9], bool mask, dim=None", (torch.randn(4, 9, generator=g),
                                                    torch.rand(4, 9, generator=g) > 0.4, None)),
        Case("random [4, 9], rows keep 9, 4, 1, 6 tokens, float mask, dim=-1",
             (torch.randn(4, 9, generator=g), rows.float(), -1)),
        Case("random [2, 3, 5], dim=-1", (torch.randn(2, 3, 5, generator=g),
                                          torch.ones(2, 3, 5, dtype=torch.bool).tril(), -1)),
        Case("random [4, 9], rows keep 9, 4, 1, 6 tokens, dim=0", (torch.randn(4, 9, generator=g), rows, 0)),
    ]
    run("check_masked_mean", fn, cases, masked_mean_reference, MASKED_MEAN_MISTAKES, fields=masked_mean_fields,
        shape_hint=" (dim=None reduces everything to a scalar; dim=d removes dimension d only)")
    empty = [
        Case("empty mask, dim=None", (torch.randn(2, 4, generator=g), torch.zeros(2, 4, dtype=torch.bool))),
        Case("row 1 of the mask is empty, dim=-1", (torch.randn(3, 4, generator=g),
                                                    torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), -1)),
    ]
    for case in empty:
        _must_raise_on_empty(fn, case)
    passed("check_masked_mean", len(cases) + len(empty))


# ----------------------------------------------------------------------------- the policy loss


def policy_loss_reference(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.2):
    return utils_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps=clip_eps)[0]


def _per_token(lp, old, adv, eps):
    r = (lp - old).exp()
    return -torch.min(r * adv, r.clamp(1 - eps, 1 + eps) * adv)


def _seq_mean(loss, mask):
    m = mask.double()
    return ((loss * m).sum(-1) / m.sum(-1)).mean()


def inverted_ratio(lp, old, adv, mask, clip_eps=0.2):
    return _seq_mean(_per_token(old.double(), lp.double(), adv.double(), clip_eps), mask)


def max_for_min(lp, old, adv, mask, clip_eps=0.2):
    r = (lp.double() - old.double()).exp()
    return _seq_mean(-torch.max(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv), mask)


def sign_flipped(lp, old, adv, mask, clip_eps=0.2):
    return -_seq_mean(_per_token(lp.double(), old.double(), adv.double(), clip_eps), mask)


def never_clipped(lp, old, adv, mask, clip_eps=0.2):
    return _seq_mean(-(lp.double() - old.double()).exp() * adv, mask)


def fixed_eps(lp, old, adv, mask, clip_eps=0.2):
    return _seq_mean(_per_token(lp.double(), old.double(), adv.double(), 0.2), mask)


def token_mean(lp, old, adv, mask, clip_eps=0.2):
    m = mask.double()
    return (_per_token(lp.double(), old.double(), adv.double(), clip_eps) * m).sum() / m.sum()


def divided_by_length(lp, old, adv, mask, clip_eps=0.2):
    m = mask.double()
    return ((_per_token(lp.double(), old.double(), adv.double(), clip_eps) * m).sum(-1) / mask.shape[-1]).mean()


def ignored_action_mask(lp, old, adv, mask, clip_eps=0.2):
    return _per_token(lp.double(), old.double(), adv.double(), clip_eps).mean()


AS_NUMBERS = " (expected {expected}, got {got})"
POLICY_LOSS_MISTAKES = [
    Mistake("your ratio is inverted: use exp(log_probs - old_log_probs), pi_theta/pi_old, not pi_old/pi_theta"
            + AS_NUMBERS, inverted_ratio),
    Mistake("you used max instead of min in -min(r*A, clip(r)*A)" + AS_NUMBERS, max_for_min),
    Mistake("the sign is flipped: the loss is -min(r*A, clip(r)*A), not +min(...)" + AS_NUMBERS, sign_flipped),
    Mistake("you never clipped the ratio" + AS_NUMBERS, never_clipped),
    Mistake("you ignored clip_eps (your loss matches clip_eps=0.2)" + AS_NUMBERS, fixed_eps),
    Mistake("you averaged over all kept tokens of the batch at once (token-mean); this exercise asks for the mean "
            "over each sequence's kept tokens, then over sequences (rows of different lengths weigh differently)"
            + AS_NUMBERS, token_mean),
    Mistake("you divided by the number of all tokens (T per row), not the kept ones" + AS_NUMBERS, divided_by_length),
    Mistake("you ignored action_mask: padding and prompt tokens entered the mean" + AS_NUMBERS, ignored_action_mask),
]


def check_policy_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.2) -> scalar`` (notebook 04).

    The loss is -min(r A, clip(r) A) per token, averaged over each sequence's kept tokens, then over
    sequences; its gradient w.r.t. log_probs must match too.
    """
    g = gen(6)
    # hand-worked: row 0 keeps 3 tokens (r = 1, 1.5, 0.5 with A = 1, -1, 1), row 1 keeps 1 (r = 1.2, A = 2);
    # masked-out slots hold a large ratio and advantage, so a missing mask shows.
    # Row 0: losses -1, 1.5, -0.5 -> mean 0; row 1: -min(2.4, 2.4) = -2.4; the mean over rows is -1.2.
    old_h = torch.full((2, 4), -2.0)
    lp_h = old_h + torch.tensor([[1.0, 1.5, 0.5, 7.4], [1.2, 7.4, 7.4, 7.4]]).log()
    adv_h = torch.tensor([[1.0, -1.0, 1.0, 5.0], [2.0, 5.0, 5.0, 5.0]])
    mask_h = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)

    def random_case(label: str, B: int, T: int, lengths: list[int], spread: float, eps: float | None,
                    mask_dtype: torch.dtype = torch.bool) -> Case:
        old = -4 * torch.rand(B, T, generator=g)
        lp = old + spread * torch.randn(B, T, generator=g)
        adv = torch.randn(B, T, generator=g)
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(mask_dtype)
        return Case(label, (lp, old, adv, mask) if eps is None else (lp, old, adv, mask, eps))

    cases = [
        Case("hand-worked: row means 0 and -2.4, so -1.2, eps=0.2", (lp_h, old_h, adv_h, mask_h, 0.2),
             expected=torch.tensor(-1.2)),
        random_case("random B=3, T=6, rows keep 6, 3, 1 tokens, clip_eps left at its default", 3, 6, [6, 3, 1],
                    0.3, None),
        random_case("random B=4, T=5, rows keep 2, 5, 4, 1 tokens, eps=0.1, float mask", 4, 5, [2, 5, 4, 1], 0.3,
                    0.1, torch.float32),
        random_case("random B=2, T=7, rows keep 7, 4 tokens, eps=0.3, ratios far outside the band", 2, 7, [7, 4],
                    0.8, 0.3),
    ]
    run("check_policy_loss", fn, cases, policy_loss_reference, POLICY_LOSS_MISTAKES,
        shape_hint=" = a scalar (0-dim tensor): reduce over tokens and sequences")
    check_grad("check_policy_loss", fn, cases[1], 0, policy_loss_reference, "log_probs")
    passed("check_policy_loss", len(cases))
