"""The ratio family: PPO's clipped token ratio and the actor losses built from it since, each a few named lines.

Every objective maps per-token tensors [B, T] over response tokens to a per-token loss [B, T], which
``utils.loss.aggregate`` reduces to a scalar (any verl ``loss_agg_mode`` or TRL ``loss_type``). With
r_t = pi_theta / pi_old (token ratio), s = exp(mean_t log r_t) (sequence ratio), A the advantage and
sg() the stop-gradient:

    ppo          -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)              eps_low = eps_high
    clip_higher  the same with eps_high > eps_low (DAPO: 0.2 / 0.28)
    delta        -min(min(r_t, delta) A, clip(r_t) A)   (TRL's two-sided GRPO; = dual-clip with c = delta)
    gspo         -min(s A, clip(s) A) at every token, written sg(s) * pi_t / sg(pi_t) so d/dlog pi_t = s
    cispo        -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A log pi_t    (eps_low=None: no lower bound)
    gmpo         -A_seq exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -eps_low, eps_high)))
    reinforce    -A log pi_t  (no ratio: the on-policy gradient every ratio reproduces at r = 1)

Sources, read at verl ``1dda039b`` (verl/trainer/ppo/core_algos.py), TRL ``f2cd5771``
(trl/trainer/grpo_trainer.py, ``GRPOTrainer._compute_loss``) and OpenRLHF ``3c3be623``
(openrlhf/models/loss.py, ``PolicyLoss``); each entry of ``OBJECTIVES`` names its own.

API (stable; other notebooks import it):
    per_token_loss(name, log_probs, old_log_probs, advantages, action_mask, clip_eps=None, clip_eps_high=None,
                   delta=None) -> [B, T]
    objective_loss(name, log_probs, old_log_probs, advantages, action_mask, ..., agg=None, normalizer=None,
                   horizon=None) -> (scalar loss, info dict of floats)
    ObjectiveLoss(name, clip_eps=None, clip_eps_high=None, delta=None, agg=None)  # nn.Module, like PolicyLoss
None for a setting means the objective's default (``OBJECTIVES[name]``).

Derived in notebooks/12_ratio_family.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from utils.checks import check_finite, check_mask, check_same_shape
from utils.loss import AGGREGATIONS, aggregate
from utils.masking import masked_mean


@dataclass(frozen=True)
class Objective:
    """One member of the family: its formula, where a trainer writes it, and its default settings."""

    name: str
    formula: str
    source: str
    ratio: str  # "token", "sequence" or "none"
    agg: str  # the aggregation its trainer uses by default
    clip_eps: float | None  # eps_low (log-space for gmpo; None for cispo = no lower bound)
    clip_eps_high: float | None  # eps_high
    delta: float | None = None


OBJECTIVES: dict[str, Objective] = {
    "ppo": Objective(
        "ppo", "-min(r A, clip(r, 1-eps, 1+eps) A)",
        "verl/trainer/ppo/core_algos.py L1333-1353 (compute_policy_loss_vanilla, without the dual clip) @1dda039b; "
        "openrlhf/models/loss.py L166-186 (PolicyLoss, policy_loss_type='ppo') @3c3be623; "
        "trl/trainer/grpo_trainer.py L3084-3091 (_compute_loss) @f2cd5771",
        "token", "token-mean", 0.2, 0.2),
    "clip_higher": Objective(
        "clip_higher", "-min(r A, clip(r, 1-eps_low, 1+eps_high) A), eps_high > eps_low",
        "verl core_algos.py L1322 (clip_ratio_high) and L1347-1349 @1dda039b; trl grpo_trainer.py L3084 "
        "(epsilon_high; grpo_config.py: DAPO recommends 0.28) @f2cd5771; openrlhf loss.py L182 (clip_eps_high) @3c3be623",
        "token", "token-mean", 0.2, 0.28),
    "delta": Objective(
        "delta", "-min(min(r, delta) A, clip(r, 1-eps, 1+eps) A)",
        "trl/trainer/grpo_trainer.py L3086-3087 (_compute_loss, args.delta: INTELLECT-2's two-sided clip) @f2cd5771; "
        "equal to verl's dual clip, core_algos.py L1355-1361 (clip_ratio_c, default 3.0) @1dda039b",
        "token", "seq-mean-token-mean", 0.2, 0.2, 3.0),
    "gspo": Objective(
        "gspo", "-min(s A, clip(s, 1-eps_low, 1+eps_high) A), s = exp(mean_t log r_t), d/dlog pi_t = s",
        "verl/trainer/ppo/core_algos.py L1584-1597 (compute_policy_loss_gspo) @1dda039b; openrlhf loss.py L170-177 "
        "(policy_loss_type='gspo') @3c3be623; trl grpo_trainer.py L3057-3059 (importance_sampling_level='sequence') "
        "@f2cd5771; eps 3e-4 / 4e-4 from verl docs/ascend_tutorial/.../gspo_optimization_practice.md (the paper's values)",
        "sequence", "seq-mean-token-mean", 3e-4, 4e-4),
    "cispo": Objective(
        "cispo", "-sg(clip(r, 1-eps_low, 1+eps_high)) A log pi",
        "verl/trainer/ppo/core_algos.py L2078-2083 (compute_policy_loss_cispo; eps from examples/cispo_trainer/"
        "README.md: low 10 = unbounded, high 0.2) @1dda039b; trl grpo_trainer.py L3080-3082 (loss_type='cispo' clamps "
        "r at max=epsilon_high, an absolute bound: TRL's 5.0 is clip_eps_high=4.0 here) @f2cd5771",
        "token", "token-mean", None, 0.2),
    "gmpo": Objective(
        "gmpo", "-A_seq exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -eps_low, eps_high)))",
        "verl/trainer/ppo/core_algos.py L1976-1987 (compute_policy_loss_geo_mean; eps 0.4 / 0.4 in log space from "
        "examples/gmpo_trainer/README.md) @1dda039b",
        "sequence", "seq-mean-token-mean", 0.4, 0.4),
    "reinforce": Objective(
        "reinforce", "-A log pi",
        "verl/trainer/ppo/core_algos.py L2391 (compute_policy_loss_reinforce, without rollout weights) @1dda039b",
        "none", "token-mean", None, None),
}


# ----------------------------------------------------------------------------- the ratios

def token_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """log r_t = log pi_theta - log pi_old, old detached; raises if exp() would overflow. Shapes [B, T]."""
    log_ratio = log_probs - old_log_probs.detach()
    if float(log_ratio.detach().abs().max()) > 80.0:  # exp(88) overflows float32
        raise ValueError(
            f"ratio overflowed: max |log_probs - old_log_probs| = {float(log_ratio.detach().abs().max()):.1f}; "
            "the policy moved far from the rollout policy (or the log-probs are misaligned)"
        )
    return log_ratio


def sequence_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log s_i at every token [B, T]: value mean_t log r_t of its row, gradient d/dlog pi_t = 1.

    Written as sg(log s_i) + log pi_t - sg(log pi_t) (verl's form): each token gets the row's ratio as its
    weight. Needs a kept token in every row.
    """
    log_s = masked_mean(token_log_ratio(log_probs, old_log_probs), action_mask, dim=-1)  # [B]
    return log_probs - log_probs.detach() + log_s.detach()[:, None]  # New (vs PPO): one ratio per sequence


# ----------------------------------------------------------------------------- the per-token losses

def ppo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   clip_eps: float = 0.2, clip_eps_high: float | None = None,
                   delta: float | None = None) -> torch.Tensor:
    """PPO's clipped loss per token [B, T]; clip_eps_high > clip_eps is clip-higher, delta caps r (TRL)."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = token_log_ratio(log_probs, old_log_probs).exp()
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)  # New (delta): the unclipped branch is capped too, so -r A < 0 stays bounded
    return -torch.min(ratio * advantages, clipped * advantages)


def gspo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    action_mask: torch.Tensor, clip_eps: float = 3e-4, clip_eps_high: float | None = 4e-4) -> torch.Tensor:
    """GSPO per token [B, T]: PPO's clip on the sequence ratio s = exp(mean_t log r_t) of each row."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    s = sequence_log_ratio(log_probs, old_log_probs, action_mask).exp()  # New: s in place of r_t
    return -torch.min(s * advantages, s.clamp(1 - clip_eps, 1 + eps_high) * advantages)


def cispo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     clip_eps: float | None = None, clip_eps_high: float = 0.2) -> torch.Tensor:
    """CISPO per token [B, T]: -sg(clip(r)) A log pi. The clip caps the weight; it never zeroes a gradient."""
    ratio = token_log_ratio(log_probs, old_log_probs).exp()
    low = None if clip_eps is None else 1 - clip_eps
    weight = ratio.clamp(min=low, max=1 + clip_eps_high).detach()  # New: clip the weight, then stop its gradient
    return -weight * advantages * log_probs  # New: log pi carries the gradient, not r


def gmpo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    action_mask: torch.Tensor, clip_eps: float = 0.4, clip_eps_high: float | None = 0.4) -> torch.Tensor:
    """GMPO: one loss per sequence, -A_seq * geometric mean of the token-clipped ratios, repeated on each token [B, T].

    The clip acts on log r_t (bounds -clip_eps, +clip_eps_high in log space), pessimistically for the sign of A.
    A_seq is the row's mean advantage (GMPO assumes one advantage per sequence). With "seq-mean-token-mean"
    the aggregate is verl's mean over sequences.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_r = token_log_ratio(log_probs, old_log_probs)
    sgn = torch.sign(advantages)
    log_r_clip = log_r.clamp(-clip_eps, eps_high)
    log_r_pess = sgn * torch.min(sgn * log_r, sgn * log_r_clip)  # New: PPO's pessimism, in log space
    ratio_seq = masked_mean(log_r_pess, action_mask, dim=-1).exp()  # New: geometric mean over the row's tokens
    adv_seq = masked_mean(advantages, action_mask, dim=-1)
    return (-adv_seq * ratio_seq)[:, None].expand_as(log_probs)


def reinforce_token_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Plain REINFORCE per token [B, T]: -A log pi (no ratio, no clip)."""
    return -advantages * log_probs


# ----------------------------------------------------------------------------- one entry point

def _settings(name: str, clip_eps, clip_eps_high, delta) -> tuple:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    obj = OBJECTIVES[name]
    low = obj.clip_eps if clip_eps is None else clip_eps
    high = obj.clip_eps_high if clip_eps_high is None else clip_eps_high
    dlt = obj.delta if delta is None else delta
    for label, v in (("clip_eps", low), ("clip_eps_high", high)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{label} must be a finite number > 0, got {v!r}")
        if label == "clip_eps" and name != "cispo" and not v < 1:
            raise ValueError(f"clip_eps must lie in (0, 1) for {name} (the lower bound 1 - eps must stay > 0), got {v!r}")
    if delta is not None and name != "delta":
        raise ValueError(f"delta is the 'delta' objective's setting, not {name!r}'s")
    if name == "delta" and not (isinstance(dlt, (int, float)) and dlt > 1 + high):
        raise ValueError(f"delta must be > 1 + clip_eps_high = {1 + high} (it caps ratios above the clip), got {dlt!r}")
    return obj, low, high, dlt


def per_token_loss(name: str, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   action_mask: torch.Tensor | None = None, clip_eps: float | None = None,
                   clip_eps_high: float | None = None, delta: float | None = None) -> torch.Tensor:
    """The per-token loss [B, T] of objective ``name`` (a key of ``OBJECTIVES``); None settings = its defaults."""
    obj, low, high, dlt = _settings(name, clip_eps, clip_eps_high, delta)
    check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, action_mask=action_mask)
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, T], got shape {list(log_probs.shape)}")
    check_finite(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    if action_mask is None:
        action_mask = torch.ones_like(log_probs, dtype=torch.bool)
    action_mask = check_mask(action_mask)
    adv = advantages.detach()
    if name in ("ppo", "clip_higher", "delta"):
        return ppo_token_loss(log_probs, old_log_probs, adv, low, high, dlt if name == "delta" else None)
    if name == "gspo":
        return gspo_token_loss(log_probs, old_log_probs, adv, action_mask, low, high)
    if name == "cispo":
        return cispo_token_loss(log_probs, old_log_probs, adv, low, high)
    if name == "gmpo":
        return gmpo_token_loss(log_probs, old_log_probs, adv, action_mask, low, high)
    return reinforce_token_loss(log_probs, adv)


def objective_loss(name: str, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   action_mask: torch.Tensor | None = None, clip_eps: float | None = None,
                   clip_eps_high: float | None = None, delta: float | None = None, agg: str | None = None,
                   normalizer: float | None = None, horizon: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss of objective ``name`` aggregated by ``agg`` (default: its trainer's), and its diagnostics.

    log_probs (with grad), old_log_probs, advantages, action_mask: [B, T]. ``normalizer`` / ``horizon`` go to
    ``utils.loss.aggregate`` (the global count under micro-batching). ``info`` holds floats over the kept tokens:
    clip_frac (tokens where the clip is active: gradient zeroed for ppo/clip_higher/delta/gspo/gmpo, weight
    capped for cispo), ratio_mean / ratio_min / ratio_max (of the ratio the objective uses: r_t, or s per
    token for gspo), approx_kl_k1 and approx_kl_k3 (KL(pi_old || pi_theta) from the token ratios).
    """
    obj, low, high, dlt = _settings(name, clip_eps, clip_eps_high, delta)
    agg = obj.agg if agg is None else agg
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    per_token = per_token_loss(name, log_probs, old_log_probs, advantages, action_mask, clip_eps, clip_eps_high, delta)
    keep = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else check_mask(action_mask)
    loss = aggregate(per_token, keep, agg, normalizer, horizon)
    with torch.no_grad():
        log_r = log_probs.detach() - old_log_probs.detach()
        r = log_r.exp()
        adv = advantages.detach()
        if obj.ratio == "sequence" and name == "gspo":
            used = sequence_log_ratio(log_probs.detach(), old_log_probs, keep).exp()
        else:
            used = r
        if name == "gspo":
            clipped = (used.clamp(1 - low, 1 + high) * adv) < used * adv
        elif name == "gmpo":
            clipped = ((adv > 0) & (log_r > high)) | ((adv < 0) & (log_r < -low))
        elif name == "cispo":
            clipped = (r > 1 + high) | ((r < 1 - low) if low is not None else torch.zeros_like(keep))
        elif name == "reinforce":
            clipped = torch.zeros_like(keep)
        else:
            clipped = (r.clamp(1 - low, 1 + high) * adv) < r * adv
            if name == "delta":
                clipped |= (adv < 0) & (r > dlt)
        u = used[keep]
        info = {
            "clip_frac": float(masked_mean(clipped.float(), keep)),
            "ratio_mean": float(u.mean()), "ratio_min": float(u.min()), "ratio_max": float(u.max()),
            "approx_kl_k1": float(masked_mean(-log_r, keep)),
            "approx_kl_k3": float(masked_mean(r - 1 - log_r, keep)),
        }
    return loss, info


class ObjectiveLoss(nn.Module):
    """Any member of the family as an ``nn.Module`` (drop-in for ``utils.PolicyLoss``).

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, normalizer=None)`` -> scalar loss;
    the diagnostics of the last call are in ``self.last_info``.
    """

    def __init__(self, name: str = "ppo", clip_eps: float | None = None, clip_eps_high: float | None = None,
                 delta: float | None = None, agg: str | None = None, horizon: int | None = None) -> None:
        super().__init__()
        obj, *_ = _settings(name, clip_eps, clip_eps_high, delta)  # validates now, not at the first call
        self.name, self.clip_eps, self.clip_eps_high, self.delta = name, clip_eps, clip_eps_high, delta
        self.agg = obj.agg if agg is None else agg
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        self.horizon = horizon
        self.last_info: dict[str, float] = {}

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
        loss, self.last_info = objective_loss(
            self.name, log_probs, old_log_probs, advantages, action_mask, self.clip_eps, self.clip_eps_high,
            self.delta, self.agg, normalizer, self.horizon,
        )
        return loss

    def extra_repr(self) -> str:
        return f"{self.name!r}, clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, agg={self.agg!r}"
