"""The PPO clipped policy (actor) loss, per token, with its diagnostics.

    ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(log_probs_t - old_log_probs_t)
    loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t)

Ratio derived in notebooks/01_importance_ratio.ipynb, the clip in
notebooks/02_clipped_surrogate.ipynb, masking and aggregation in
notebooks/04_masked_token_loss.ipynb.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.checks import check_clip_eps, check_finite, check_float, check_mask, check_same_dtype, check_same_shape
from utils.masking import masked_mean, masked_sum

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
# Every reduction the trainers name (notebooks/11_groups_and_aggregation.ipynb derives them): verl's ``loss_agg_mode``
# (verl/trainer/ppo/core_algos.py ``agg_loss`` at 1dda039b) and TRL's ``loss_type`` (trl/trainer/grpo_trainer.py
# ``_compute_loss`` at f2cd5771), each TRL name mapped to the verl mode it computes.
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
TRL_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                  "dapo": "token-mean"}
AGGREGATIONS = VERL_AGG_MODES + tuple(TRL_LOSS_TYPES)


def _check_agg(agg: str) -> str:
    """The one check of an aggregation name (aggregate, PolicyLoss and utils.ppo.ActorConfig use it)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    return agg


def _check_clip_args(
    clip_eps: float | None, clip_eps_high: float | None, dual_clip: float | None
) -> tuple[float | None, float | None, float | None]:
    """The one check of the clip settings (policy_loss, PolicyLoss and utils.ppo.ActorConfig use it).

    clip_eps and clip_eps_high in (0, 1), dual_clip > 1; clip_eps=None (no clip) leaves the other two None.
    Returns them as floats (None stays None).
    """
    if clip_eps is None:
        if clip_eps_high is not None or dual_clip is not None:
            raise ValueError("clip_eps=None (no clip) leaves nothing for clip_eps_high or dual_clip to modify")
        return None, None, None
    clip_eps = check_clip_eps(clip_eps)
    if clip_eps_high is not None:
        clip_eps_high = check_clip_eps(clip_eps_high, "clip_eps_high")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c*A beyond the 1+eps clip), got {dual_clip!r}")
    return clip_eps, clip_eps_high, dual_clip


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
              normalizer: float | None = None, horizon: int | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar.

    - "seq-mean-token-mean": mean over each sequence's tokens, then over sequences (the seed note, OpenRLHF's
      per-sample mode).
    - "token-mean": one mean over all kept tokens of the batch (verl's default, DeepSpeed-Chat).
    - "seq-mean-token-sum": sum over each sequence's tokens, mean over sequences.
    - "token-sum": the sum over all kept tokens (no division; ``normalizer`` is refused).
    - "seq-mean-token-sum-norm": seq-mean-token-sum / ``horizon`` (a constant; default T = loss.shape[-1], as
      verl's ``loss_scale_factor=None``; TRL's dr_grpo uses ``max_completion_length``: pass it).
    - TRL's names (``TRL_LOSS_TYPES``): "grpo" = seq-mean-token-mean, "bnpo" and "dapo" = token-mean (TRL divides
      dapo by the global ``num_items_in_batch``, bnpo by the micro-batch's count), "dr_grpo" =
      seq-mean-token-sum-norm.
    ``normalizer`` replaces the local count in the outer division (tokens for the token-mean modes, sequences for
    the seq-mean modes): pass the whole batch's count (``global_normalizer``) when accumulating gradients over
    micro-batches, like verl's ``batch_num_tokens`` / ``global_batch_size`` and TRL's ``num_items_in_batch``.
    """
    _check_agg(agg)
    if loss.dim() != 2:
        raise ValueError(f"per-token loss must be [B, T], got shape {list(loss.shape)}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    agg = TRL_LOSS_TYPES.get(agg, agg)
    if agg == "token-sum":
        if normalizer is not None:
            raise ValueError("token-sum divides by nothing: normalizer must be None")
        return masked_sum(loss, mask)
    if agg == "seq-mean-token-sum-norm":
        horizon = loss.shape[-1] if horizon is None else horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1 (the constant length the token sums are divided by), got {horizon!r}")
        return aggregate(loss, mask, "seq-mean-token-sum", normalizer) / horizon
    if horizon is not None:
        raise ValueError(f"horizon is only used by seq-mean-token-sum-norm / dr_grpo, not {agg!r}")
    if agg == "token-mean":
        if normalizer is None:
            return masked_mean(loss, mask)
        return masked_sum(loss, mask) / normalizer
    per_seq = masked_mean(loss, mask, dim=-1) if agg == "seq-mean-token-mean" else masked_sum(loss, mask, dim=-1)
    if agg == "seq-mean-token-sum" and mask is not None and bool((mask.sum(-1) == 0).any()):
        # masked_mean raises for the other modes; a sum would silently count the row as a zero-loss sequence
        raise ValueError("action_mask has a row with no response token (empty mask); drop that sequence")
    return per_seq.mean() if normalizer is None else per_seq.sum() / normalizer


def global_normalizer(masks: torch.Tensor | list[torch.Tensor], agg: str) -> float | None:
    """The count ``aggregate`` must divide by so that micro-batches add up to the whole batch's loss.

    masks: the whole batch's action_mask [B, T], or the list of its micro-batches' masks. Returns the number of
    kept tokens (token-mean, bnpo, dapo), the number of sequences (the seq-mean modes, grpo, dr_grpo), or None
    (token-sum divides by nothing).
    """
    _check_agg(agg)
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    if not masks or any(m.dim() != 2 for m in masks):
        raise ValueError("masks must be one [B, T] mask or a non-empty list of them")
    mode = TRL_LOSS_TYPES.get(agg, agg)
    if mode == "token-sum":
        return None
    count = sum(float(m.bool().sum()) for m in masks) if mode == "token-mean" else float(sum(m.shape[0] for m in masks))
    if count == 0:
        raise ValueError("the masks keep no token: there is nothing to normalise by")
    return count


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped policy loss and its diagnostics.

    log_probs (with grad), old_log_probs, advantages, action_mask: [B, T] over response tokens; the first three
    floating point, log_probs and old_log_probs in one dtype (a mix such as fp16 with fp32 is refused).
    clip_eps is the lower clip eps_low; clip_eps_high (default: = clip_eps) the upper one ("clip-higher",
    DAPO); ``clip_eps=None`` switches the clip off (the plain importance-weighted surrogate -r*A, the control
    of notebooks/07_what_epsilon_does.ipynb; clip_eps_high and dual_clip must then be None);
    dual_clip: c > 1 caps the loss of A < 0 tokens at -c*A. Returns ``(loss, info)``; ``info``
    holds floats over the kept tokens: clip_frac (tokens where the clipped branch is taken, so their
    gradient is zero; dual-clipped tokens are counted in dual_clip_frac instead), approx_kl_k1 and approx_kl_k3 (estimates of KL(pi_old || pi_theta)), ratio_mean,
    ratio_min, ratio_max, and dual_clip_frac when dual_clip is set.
    """
    check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, action_mask=action_mask)
    check_float(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    check_same_dtype(log_probs=log_probs, old_log_probs=old_log_probs)
    clip_eps, clip_eps_high, dual_clip = _check_clip_args(clip_eps, clip_eps_high, dual_clip)
    if clip_eps is None:  # no clip at all: clamping at +-inf is the identity
        clip_eps = clip_eps_high = float("inf")
    if action_mask is not None:
        action_mask = check_mask(action_mask)

    log_ratio = log_probs - old_log_probs.detach()  # old policy is a constant: no gradient flows into it
    ratio = log_ratio.exp()  # pi_theta / pi_old, computed in log space (products of probs underflow)
    adv = advantages.detach()
    per_token = clipped_surrogate(ratio, adv, clip_eps, clip_eps_high, dual_clip)
    loss = aggregate(per_token, action_mask, agg, normalizer)

    with torch.no_grad():  # the diagnostics and the finite check in one stack, read back with one .tolist()
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        clipped = (ratio.clamp(1 - clip_eps, 1 + eps_high) * adv) < ratio * adv  # surr2 < surr1: min picks the clip
        rows = [clipped, log_ratio, ratio, adv]  # [B, T] each; their means over the kept tokens are reported
        if dual_clip is not None:
            rows.append((adv < 0) & (-ratio * adv > -dual_clip * adv))  # where the dual clip caps the loss
        stats = torch.stack(rows)  # [k, B, T]
        stats = stats.to(torch.promote_types(stats.dtype, torch.float32))  # bf16 diagnostics summed in fp32
        kept = stats.flatten(1) if action_mask is None else stats[:, action_mask]  # [k, n]
        n = kept.shape[1]
        # every position, masked ones too (an inf there would still turn the gradient into NaN: 0 * inf): a NaN or
        # inf in log_ratio, ratio or adv makes the sum non-finite (log_ratio is finite when both log-probs are; finite
        # values overflow the sum only beyond 3e38, where the loss itself would)
        vals = torch.cat([kept.sum(1) / n, torch.stack([*torch.aminmax(kept[2]), stats.sum()])]).tolist()
    if not math.isfinite(vals[-1]):
        check_finite(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)  # names the culprit
        raise ValueError(
            f"ratio overflowed: max |log_probs - old_log_probs| = {float(log_ratio.detach().abs().max()):.1f}; "
            "the policy moved far from the rollout policy (or the log-probs are misaligned)"
        )
    k = len(rows)
    info = {"clip_frac": vals[0], "approx_kl_k1": 0.0 - vals[1],  # k1 = mean(-log r); 0.0 - x, so a ratio of 1 gives 0.0, not -0.0
            "approx_kl_k3": vals[2] - 1 - vals[1],  # mean(r - 1 - log r) = mean(r) - 1 + k1, exactly
            "ratio_mean": vals[2], "ratio_min": vals[k], "ratio_max": vals[k + 1]}
    if dual_clip is not None:
        info["dual_clip_frac"] = vals[4]
    return loss, info


class PolicyLoss(nn.Module):
    """PPO policy loss as an ``nn.Module``: the seed note's class, with the ratio and the mask done right.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None)`` -> scalar loss;
    the diagnostics of the last call are in ``self.last_info``.
    """

    def __init__(self, clip_eps: float | None = 0.2, clip_eps_high: float | None = None,
                 dual_clip: float | None = None, agg: str = "seq-mean-token-mean") -> None:
        super().__init__()
        self.clip_eps, self.clip_eps_high, self.dual_clip = _check_clip_args(clip_eps, clip_eps_high, dual_clip)
        self.agg = _check_agg(agg)
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
