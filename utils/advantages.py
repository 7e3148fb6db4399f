"""Per-token rewards, returns and advantages for sampled responses.

    r_t    = -kl_coef * KL_t                     on every response token
             + score                              on the row's last kept (real) response token
    delta_t = r_t + gamma * V_{t+1} - V_t         (V after the last kept token is 0)
    A_t     = delta_t + gamma * lam * A_{t+1}     (GAE, Schulman et al. 2016, arXiv:1506.02438)
    G_t     = A_t + V_t                           (the returns a critic would regress on)

Masked positions (padding after EOS, or holes in the mask) are skipped, as in verl's
``compute_gae_advantage_return``: V and A of the next *kept* token carry over them,
and their outputs are 0. See docs/anchors.md sections 4-6.

Derived in notebooks/05_token_advantages.ipynb.
"""

from __future__ import annotations

import math

import torch

from utils.checks import check_finite, check_same_shape
from utils.masking import _as_bool, masked_mean


def _check_mask_2d(action_mask: torch.Tensor, like: torch.Tensor, name: str = "action_mask") -> torch.Tensor:
    """Validate a [B, T] 0/1 mask shaped like ``like``; return it as bool."""
    check_same_shape(**{name: action_mask, "rewards/kl": like})
    return _as_bool(action_mask, name)


def _check_discount(value: float, name: str) -> float:
    """The one check of a discount or decay in [0, 1] (gae, and utils.ppo.ActorConfig's gamma, lam, baseline_decay)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def _check_coef(value: float, name: str) -> float:
    """The one check of a KL coefficient: a finite number >= 0 (token_rewards, and utils.ppo.ActorConfig)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def last_kept_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true entry of each row: [B, T] -> [B] (long). Raises on a row with none."""
    mask = action_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, T], got shape {list(mask.shape)}")
    empty = ~mask.any(-1)
    if bool(empty.any()):
        raise ValueError(f"action_mask has {int(empty.sum())} row(s) with no kept token: no place for the score")
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(-1).values  # the largest kept position, not position -1


def token_rewards(score: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on kept tokens, plus ``score`` on each row's last kept token.

    score: [B] (one number per response, e.g. from a reward model); kl: [B, T] per-token KL
    estimates against the reference; action_mask: [B, T]. Returns rewards [B, T], 0 where masked.
    The score goes on the last *kept* token (the EOS or the last token before the length limit),
    never on position -1, which in a padded batch can be a pad.
    """
    if kl.dim() != 2:
        raise ValueError(f"kl must be [B, T], got shape {list(kl.shape)}")
    if score.dim() != 1 or score.shape[0] != kl.shape[0]:
        raise ValueError(f"score must be [B] = [{kl.shape[0]}] (one per row of kl), got shape {list(score.shape)}")
    _check_coef(kl_coef, "kl_coef")
    mask = _check_mask_2d(action_mask, kl)
    check_finite(score=score, kl=kl)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(mask, -kl_coef * kl, zero)  # [B, T]
    last = last_kept_index(mask)  # [B]
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 1.0,
    action_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, one reverse scan over tokens (vectorised over the batch).

    rewards, values, action_mask: [B, T]. Returns ``(advantages, returns)``, both [B, T], with
    returns = advantages + values, and 0 at masked positions. The value after each row's last
    kept token is 0 (the response ended), so no gamma * V crosses the EOS boundary; masked
    positions in between are skipped. lam = 1: A_t = G_t - V_t (Monte Carlo); lam = 0: A_t = delta_t.
    """
    check_same_shape(rewards=rewards, values=values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {list(rewards.shape)}")
    gamma, lam = _check_discount(gamma, "gamma"), _check_discount(lam, "lam")
    check_finite(rewards=rewards, values=values)
    B, T = rewards.shape
    mask = torch.ones_like(rewards, dtype=torch.bool) if action_mask is None else _check_mask_2d(action_mask, rewards)
    values = values.detach()
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)  # V after the last kept token: the episode is over
    next_adv = rewards.new_zeros(B)
    for t in reversed(range(T)):
        keep = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B] one-step TD residual
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(keep, adv_t, 0.0)
        next_adv = torch.where(keep, adv_t, next_adv)  # a masked step is skipped: carry both through
        next_value = torch.where(keep, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def returns_to_go(rewards: torch.Tensor, gamma: float = 1.0, action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over kept tokens: [B, T] -> [B, T] (0 where masked).

    The same as ``gae`` with values = 0 and lam = 1.
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), gamma, 1.0, action_mask)
    return advantages


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with one mean and variance over all kept entries (scalars).

    x, mask: same shape (e.g. [B, T]). Follows verl ``masked_whiten`` and TRL ``masked_whiten``:
    unbiased (n - 1) variance, ``eps`` inside the square root; OpenRLHF uses the biased (n)
    variance. ``shift_mean=False`` adds the mean back (only rescales). Masked entries are
    returned as 0. Raises ``ValueError`` when fewer than 2 entries are kept: the variance of one
    number is undefined (``torch.std`` of one element is NaN). When all kept entries are equal
    the result is all zeros: no entry is better than another.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    else:
        check_same_shape(x=x, mask=mask)
        mask = _as_bool(mask)
    n = int(mask.sum())
    if n < 2:
        raise ValueError(
            f"whiten needs at least 2 kept entries, got {n}: the variance of a single value is undefined "
            "(one response of one token, or whitening per token); whiten over a batch of responses, or skip it"
        )
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    check_finite(x=torch.where(mask, x, 0.0))
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)  # unbiased, as verl/TRL
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)
