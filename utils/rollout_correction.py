"""Three policies: correcting the gap between the rollout engine's log-probs and the trainer's.

The engine that samples (vLLM, SGLang, here: ``generate`` under bf16 or with top-p) reports
log pi_rollout(token). The trainer recomputes log pi_old(token) with the same weights in its own
precision and kernels. They differ, so the tokens were *not* drawn from pi_old. Per token, with
``old_log_probs`` = log pi_old and ``rollout_log_probs`` = log pi_rollout:

    w_t   = pi_old / pi_rollout = exp(old_log_probs - rollout_log_probs)   (a constant: no gradient)

    TIS   loss_t <- sg(min(w_t, C)) * loss_t                 truncated importance sampling
    MIS   loss_t <- sg(w_t) * 1[lo <= w_t <= hi] * loss_t    masked IS (IcePop): tokens outside are dropped
    seq   the same with one weight per sequence, W = exp(sum_t log w_t) (TRL) or its geometric mean
          exp(mean_t log w_t) (OpenRLHF's seq-mask-tis filter)

Where the trainers write it (read at the commits named):
- verl ``verl/trainer/ppo/rollout_corr_helper.py`` @ 1dda039b: ``log_ratio = old_log_prob - rollout_log_prob``
  (line 849); TIS ``raw_rollout_is_weights.clamp(max=rollout_is_threshold_upper)`` (line 596, default C = 2.0);
  IcePop keeps weights in [lower, upper] and zeroes the rest (lines 599-604); ``.detach()`` (line 625);
  the loss multiplies ``pg_losses * rollout_is_weights`` (``verl/trainer/ppo/core_algos.py`` line 1365).
  Both arrived with PR #2953 (commit b8dc5377).
- OpenRLHF ``openrlhf/models/loss.py`` @ 3c3be623, ``PolicyLoss.forward`` lines 197-218:
  ``rollout_log_ratio = old_log_probs - rollout_log_probs``; "tis" clamps to [low, high] (line 216),
  "icepop" multiplies by ``w * 1[low <= w <= high]`` (lines 202-205), "seq-mask-tis" filters sequences on
  the geometric mean and weights tokens by w untruncated (lines 209-213).
- TRL ``trl/trainer/grpo_trainer.py`` @ f2cd5771, lines 2579-2620: ``old_per_token_logps -
  sampling_per_token_logps``; modes token_truncate / token_mask / sequence_truncate / sequence_mask, the
  sequence level summing the log-ratio (line 2585); the loss multiplies by it (line 3118).

Derived in notebooks/13_three_policies.ipynb.
"""

from __future__ import annotations

import math

import torch

from utils.checks import check_finite, check_mask, check_same_shape

LEVELS = ("token", "sequence", "geometric")
_SAFETY = 20.0  # |log w| is clamped here before exp (verl's SAFETY_BOUND): exp(20) ~ 5e8, never inf


def _check(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    check_same_shape(old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs, action_mask=action_mask)
    check_finite(old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs)
    if old_log_probs.dim() != 2:
        raise ValueError(f"log-probs must be [B, T], got shape {list(old_log_probs.shape)}")
    mask = check_mask(action_mask)
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("action_mask has a row with no kept token: that sequence has no weight")
    return mask


def _up(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 (a half-precision exp is coarse); float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def log_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
                level: str = "token") -> torch.Tensor:
    """log(pi_old / pi_rollout) per token, or per sequence broadcast to its tokens. [B, T] -> [B, T] (float32 for half inputs).

    level "token": log w_t; "sequence": sum_t log w_t (the product of token weights, TRL's sequence_*);
    "geometric": mean_t log w_t (the geometric mean, OpenRLHF's seq-mask-tis filter). 0 on masked positions.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    mask = _check(old_log_probs, rollout_log_probs, action_mask)
    lw = torch.where(mask, _up(old_log_probs) - _up(rollout_log_probs), 0.0)  # [B, T]
    if level == "sequence":
        lw = lw.sum(-1, keepdim=True).expand_as(lw)
    elif level == "geometric":
        lw = (lw.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(lw)
    return torch.where(mask, lw, 0.0)


def tis_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
                cap: float = 2.0, floor: float | None = None, level: str = "token") -> torch.Tensor:
    """Truncated importance weights sg(min(w, cap)) (and max(., floor) if given). [B, T] -> [B, T], 0 off the mask.

    ``cap`` is verl's ``rollout_is_threshold`` (default 2.0); a ``floor`` gives OpenRLHF's two-sided
    clamp [low, high] and TRL's ``*_truncate`` with ``clip_min``. The result carries no gradient.
    """
    _check_positive("cap", cap)
    _check_positive("floor", floor, allow_none=True)
    if floor is not None and floor > cap:
        raise ValueError(f"floor ({floor}) must be <= cap ({cap})")
    lw = log_weights(old_log_probs, rollout_log_probs, action_mask, level)
    w = lw.clamp(-_SAFETY, _SAFETY).exp().clamp(min=floor, max=cap)
    return torch.where(action_mask.bool(), w, 0.0).detach()


def mis_keep(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
             low: float = 0.5, high: float = 2.0, level: str = "token") -> torch.Tensor:
    """Bool [B, T]: kept tokens whose weight (token, sequence or geometric level) lies in [low, high].

    At a sequence level one token out of bounds drops its whole sequence (the mask is per sequence).
    """
    _check_positive("low", low)
    _check_positive("high", high)
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    lw = log_weights(old_log_probs, rollout_log_probs, action_mask, level)
    inside = (lw >= math.log(low)) & (lw <= math.log(high))  # compare in log space: no overflow
    return inside & action_mask.bool()


def mis_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
                low: float = 0.5, high: float = 2.0, level: str = "token") -> torch.Tensor:
    """IcePop / masked IS: sg(w) where w lies in [low, high], else 0. [B, T] -> [B, T], no gradient.

    Token level is OpenRLHF's "icepop" and TRL's token_mask; sequence level is TRL's sequence_mask.
    """
    keep = mis_keep(old_log_probs, rollout_log_probs, action_mask, low, high, level)
    lw = log_weights(old_log_probs, rollout_log_probs, action_mask, level)
    return torch.where(keep, lw.clamp(-_SAFETY, _SAFETY).exp(), 0.0).detach()


def mismatch_stats(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, action_mask: torch.Tensor,
                   band: float = 0.1) -> dict[str, float]:
    """How far pi_rollout is from pi_old on the kept tokens: a dict of floats.

    w_min / w_max / w_mean of the token weights; frac_outside: share with w outside [1 - band, 1 + band]
    (trl#6789 reports this for band 0.1); kl_k1 / kl_k3: estimates of KL(pi_rollout || pi_old) from these
    tokens (sampled from pi_rollout), mean per token; max_abs_log_w.
    """
    if not 0 < band < 1:
        raise ValueError(f"band must lie in (0, 1), got {band!r}")
    mask = _check(old_log_probs, rollout_log_probs, action_mask)
    lw = (_up(old_log_probs) - _up(rollout_log_probs))[mask]  # log w over kept tokens
    w = lw.clamp(-_SAFETY, _SAFETY).exp()
    return {
        "w_min": float(w.min()), "w_max": float(w.max()), "w_mean": float(w.mean()),
        "frac_outside": float(((w < 1 - band) | (w > 1 + band)).float().mean()),
        "kl_k1": float((-lw).mean()),  # log pi_rollout - log pi_old, x ~ pi_rollout
        "kl_k3": float((torch.expm1(lw) - lw).mean()),  # (w - 1) - log w
        "max_abs_log_w": float(lw.abs().max()),
    }
