"""Per-token estimates of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

With ``log_ratio = log_probs - ref_log_probs = log pi(x) - log pi_ref(x)`` and x ~ pi
(Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):

    k1 = log_ratio                              unbiased, high variance, negative on some samples
    k2 = 0.5 * log_ratio**2                     biased (low bias when pi is close to pi_ref), always >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio        unbiased and always >= 0 ((r - 1) - log r with r = pi_ref/pi)

These are the estimators of OpenRLHF ``compute_approx_kl`` and verl ``kl_penalty``
(k3 is verl's "low_var_kl"); see docs/anchors.md section 4. Both trainers clamp: verl only
k3, to [-10, 10] (verl/trainer/ppo/core_algos.py L2241-2244 at 1dda039b), OpenRLHF every
estimator, to [-10, 10] (openrlhf/models/utils.py L95 at 3c3be623). This module does not
clamp, and raises instead when a value overflows.

Derived in notebooks/05_token_advantages.ipynb.
"""

from __future__ import annotations

import torch

from utils.checks import check_finite, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_estimator(estimator: str, name: str = "estimator") -> str:
    """The one check of an estimator name (kl_estimate, and utils.ppo.ActorConfig's kl_estimator, kl_loss_estimator)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{name} must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return estimator


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions at each position, summed over the vocabulary.

    logits, ref_logits: [..., V] (e.g. [B, R, V] from ``utils.logprobs.response_logits``), divided by
    ``temperature`` before the softmax. Returns [...], >= 0. With a 4,096-token vocabulary this is cheap,
    and it has none of the sampling noise of k1/k3 on one token: averaged over sampled prefixes it
    estimates the sequence KL with the lower variance (notebooks/07_what_epsilon_does.ipynb uses it).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"shape mismatch: logits{list(logits.shape)} vs ref_logits{list(ref_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_finite(logits=logits, ref_logits=ref_logits)
    logp = (logits.float() / temperature).log_softmax(-1)
    logq = (ref_logits.float() / temperature).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: rounding can give -1e-9


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) for tokens sampled from pi.

    log_probs, ref_log_probs: [...] (e.g. [B, T]), log pi and log pi_ref of the same sampled tokens.
    Returns [...], same shape. Its mean over samples estimates the KL; a single k1 value can be
    negative. Half-precision inputs are computed in float32 (exp of a bf16 log-ratio is coarse).
    """
    _check_estimator(estimator)
    check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    check_finite(log_probs=log_probs, ref_log_probs=ref_log_probs)
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    if ref_log_probs.dtype in (torch.float16, torch.bfloat16):
        ref_log_probs = ref_log_probs.float()
    log_ratio = log_probs - ref_log_probs  # log pi/pi_ref: the sign matters, KL(pi || pi_ref) with x ~ pi
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    # k3: expm1 keeps the small-|log_ratio| case exact where exp(x) - 1 would cancel
    kl = torch.expm1(-log_ratio) + log_ratio
    if not bool(torch.isfinite(kl).all()):
        raise ValueError(
            f"k3 overflowed: min log_probs - ref_log_probs = {float(log_ratio.min()):.1f}, so exp(-log_ratio) is inf; "
            "the policy is very far from the reference on some token"
        )
    return kl
