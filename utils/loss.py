"""The PPO clipped policy (actor) loss, per token, with its diagnostics.

    ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(log_probs_t - old_log_probs_t)
    loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t)

Ratio derived in notebooks/01_importance_ratio.ipynb, the clip in
notebooks/02_clipped_surrogate.ipynb, masking and aggregation in
notebooks/04_masked_token_loss.ipynb.
"""

from __future__ import annotations

import torch
from torch import nn

from utils.checks import check_clip_eps, check_finite, check_mask, check_same_shape
from utils.masking import masked_mean, masked_sum

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """Per-token PPO loss from ratios: -min(r A, clip(r) A), optionally dual-clipped. Shapes: any, same."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + eps_high) * advantages
    loss = -torch.min(surr1, surr2)  # the pessimistic (lower) bound on the objective
    if dual_clip is not None:
        # For A < 0 a huge ratio makes -r*A unbounded; cap the loss at -c*A (Ye et al. 2020, "dual-clip").
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss


def aggregate(loss: torch.Tensor, mask: torch.Tensor | None, agg: str = "seq-mean-token-mean",
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar.

    - "seq-mean-token-mean": mean over each sequence's tokens, then over sequences (the seed note, OpenRLHF's
      per-sample mode).
    - "token-mean": one mean over all kept tokens of the batch (verl's default, DeepSpeed-Chat).
    - "seq-mean-token-sum": sum over each sequence's tokens, mean over sequences.
    ``normalizer`` replaces the local count in the outer division (tokens for token-mean, sequences for the
    seq-mean modes): pass the whole batch's count when accumulating gradients over micro-batches.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if loss.dim() != 2:
        raise ValueError(f"per-token loss must be [B, T], got shape {list(loss.shape)}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    if agg == "token-mean":
        if normalizer is None:
            return masked_mean(loss, mask)
        return masked_sum(loss, mask) / normalizer
    per_seq = masked_mean(loss, mask, dim=-1) if agg == "seq-mean-token-mean" else masked_sum(loss, mask, dim=-1)
    if agg == "seq-mean-token-sum" and mask is not None and bool((mask.sum(-1) == 0).any()):
        # masked_mean raises for the other modes; a sum would silently count the row as a zero-loss sequence
        raise ValueError("action_mask has a row with no response token (empty mask); drop that sequence")
    return per_seq.mean() if normalizer is None else per_seq.sum() / normalizer


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped policy loss and its diagnostics.

    log_probs (with grad), old_log_probs, advantages, action_mask: [B, T] over response tokens.
    clip_eps is the lower clip eps_low; clip_eps_high (default: = clip_eps) the upper one ("clip-higher",
    DAPO); dual_clip: c > 1 caps the loss of A < 0 tokens at -c*A. Returns ``(loss, info)``; ``info``
    holds floats over the kept tokens: clip_frac (tokens where the clipped branch is taken, so their
    gradient is zero; dual-clipped tokens are counted in dual_clip_frac instead), approx_kl_k1 and approx_kl_k3 (estimates of KL(pi_old || pi_theta)), ratio_mean,
    ratio_min, ratio_max, and dual_clip_frac when dual_clip is set.
    """
    check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, action_mask=action_mask)
    clip_eps = check_clip_eps(clip_eps)
    if clip_eps_high is not None:
        clip_eps_high = check_clip_eps(clip_eps_high, "clip_eps_high")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c*A beyond the 1+eps clip), got {dual_clip!r}")
    # every position, masked ones too: an inf there would still turn the gradient into NaN (0 * inf)
    check_finite(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    if action_mask is not None:
        action_mask = check_mask(action_mask)

    log_ratio = log_probs - old_log_probs.detach()  # old policy is a constant: no gradient flows into it
    ratio = log_ratio.exp()  # pi_theta / pi_old, computed in log space (products of probs underflow)
    if not bool(torch.isfinite(ratio).all()):
        raise ValueError(
            f"ratio overflowed: max |log_probs - old_log_probs| = {float(log_ratio.detach().abs().max()):.1f}; "
            "the policy moved far from the rollout policy (or the log-probs are misaligned)"
        )
    adv = advantages.detach()
    per_token = clipped_surrogate(ratio, adv, clip_eps, clip_eps_high, dual_clip)
    loss = aggregate(per_token, action_mask, agg, normalizer)

    with torch.no_grad():
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        clipped = (ratio.clamp(1 - clip_eps, 1 + eps_high) * adv) < ratio * adv  # surr2 < surr1: min picks the clip
        keep = action_mask if action_mask is not None else torch.ones_like(ratio, dtype=torch.bool)
        r = ratio[keep]
        info = {
            "clip_frac": float(masked_mean(clipped.float(), keep)),
            "approx_kl_k1": float(masked_mean(-log_ratio, keep)),
            "approx_kl_k3": float(masked_mean(ratio - 1 - log_ratio, keep)),
            "ratio_mean": float(r.mean()),
            "ratio_min": float(r.min()),
            "ratio_max": float(r.max()),
        }
        if dual_clip is not None:
            info["dual_clip_frac"] = float(masked_mean(((adv < 0) & (-ratio * adv > -dual_clip * adv)).float(), keep))
    return loss, info


class PolicyLoss(nn.Module):
    """PPO policy loss as an ``nn.Module``: the seed note's class, with the ratio and the mask done right.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None)`` -> scalar loss;
    the diagnostics of the last call are in ``self.last_info``.
    """

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                 agg: str = "seq-mean-token-mean") -> None:
        super().__init__()
        self.clip_eps = check_clip_eps(clip_eps)
        self.clip_eps_high = None if clip_eps_high is None else check_clip_eps(clip_eps_high, "clip_eps_high")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
        self.dual_clip = dual_clip
        if agg not in AGG_MODES:
            raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
        self.agg = agg
        self.last_info: dict[str, float] = {}

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
        loss, self.last_info = policy_loss(
            log_probs, old_log_probs, advantages, action_mask, clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=self.agg, normalizer=normalizer,
        )
        return loss

    def extra_repr(self) -> str:
        return f"clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, agg={self.agg!r}"
