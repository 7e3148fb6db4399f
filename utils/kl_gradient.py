"""The gradient of a KL term in the loss, exactly and as the sampled estimators give it.

At one position the policy is pi = softmax(z) over V tokens and the reference pi_ref = softmax(z_ref).
With d_j = log pi_j - log pi_ref_j, the true gradient of KL(pi || pi_ref) = sum_j pi_j d_j is

    dKL/dz_j = pi_j * (d_j - KL)                                   (``exact_kl_grad``)

A trainer never sums over the vocabulary: it samples x ~ pi_old (= pi before the first step), puts an
estimator k(x) in the loss and lets autograd differentiate it. Since d/dz log pi(x) = e_x - pi, each
estimator's gradient is c(x) * (e_x - pi) for a scalar c(x); its expectation over x ~ pi is

    k1 = d_x                    c = 1                 E = 0            (no pull toward pi_ref at all)
    k2 = d_x^2 / 2              c = d_x               E = exact
    k3 = e^{-d_x} - 1 + d_x     c = 1 - pi_ref/pi     E = pi - pi_ref  (the gradient of KL(pi_ref || pi))

and with the importance ratio r = pi / sg(pi_old) multiplied in (value 1 on policy, gradient r * (e_x - pi)):

    k1 * r                      c = 1 + d_x           E = exact
    k3 * r                      c = d_x               E = exact (the same per-sample gradient as k2)
    k2 * r                      c = d_x + d_x^2 / 2   E = exact + a bias

verl's "k3+" keeps k3's value and k2's gradient (straight-through): c = d_x, exact in expectation.
Sources, read at these commits: Zhang et al., "On the Design of KL-Regularized Policy Gradient Algorithms for
LLM Reasoning", arXiv 2505.17508 (k3 in the loss is the unnormalised reverse-direction term; the off-policy
weight GRPO's KL term is missing); verl ``verl/trainer/ppo/core_algos.py`` @ 1dda039b, ``kl_penalty``
lines 2187-2212 (``backward_score - backward_score.detach() + forward_score.detach()``, added in PR #2953,
commit b8dc5377); TRL ``trl/trainer/grpo_trainer.py`` @ f2cd5771 lines 3069-3076 (``per_token_kl * coef_1``
when ``use_bias_correction_kl``; ``coef_1`` = exp(log pi - log pi_old) carries the gradient).

Derived in notebooks/14_kl_gradient.ipynb.
"""

from __future__ import annotations

import math

import torch

from utils.checks import check_finite

LOSS_ESTIMATORS = ("k1", "k2", "k3", "k1*r", "k2*r", "k3*r", "k3+")


def _check_logits(logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    if logits.dim() != 1 or ref_logits.shape != logits.shape:
        raise ValueError(f"logits and ref_logits must both be [V], got {list(logits.shape)} and {list(ref_logits.shape)}")
    check_finite(logits=logits, ref_logits=ref_logits)


def kl_exact(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """KL(softmax(logits) || softmax(ref_logits)) summed over the vocabulary, in float64. [V], [V] -> float."""
    _check_logits(logits, ref_logits)
    logp, logq = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum())


def exact_kl_grad(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """d KL(pi || pi_ref) / d logits = pi * (log pi - log pi_ref - KL), float64. [V], [V] -> [V]."""
    _check_logits(logits, ref_logits)
    logp, logq = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    p = logp.exp()
    d = logp - logq
    return p * (d - (p * d).sum())


def reverse_kl_grad(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """d KL(pi_ref || pi) / d logits = pi - pi_ref, float64: what k3 in the loss follows on average. [V] -> [V]."""
    _check_logits(logits, ref_logits)
    return logits.double().softmax(-1) - ref_logits.double().softmax(-1)


def estimator_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-sample loss term of a KL estimator as a trainer writes it; differentiable in ``log_probs``. [N] -> [N].

    ``*r`` multiplies by r = exp(log_probs - sg(log_probs)) (value 1, gradient r * d log pi): the on-policy
    case of TRL's ``use_bias_correction_kl``. "k3+" is verl's straight-through: k3's value, k2's gradient.
    """
    if estimator not in LOSS_ESTIMATORS:
        raise ValueError(f"estimator must be one of {LOSS_ESTIMATORS}, got {estimator!r}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(f"shape mismatch: log_probs{list(log_probs.shape)} vs ref_log_probs{list(ref_log_probs.shape)}")
    d = log_probs - ref_log_probs  # log pi(x) - log pi_ref(x)
    k = {"k1": d, "k2": 0.5 * d**2, "k3": torch.expm1(-d) + d}
    base = estimator.rstrip("*r+")
    if estimator.endswith("*r"):
        return k[base] * torch.exp(log_probs - log_probs.detach())
    if estimator == "k3+":
        return k["k2"] - k["k2"].detach() + k["k3"].detach()
    return k[base]


def expected_kl_grad(logits: torch.Tensor, ref_logits: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_{x ~ pi}[d estimator_loss(x) / d logits], exactly: the sum over all V tokens weighted by pi. [V] -> [V].

    Autograd differentiates each token's loss as written; no sampling, so no noise (float64).
    """
    _check_logits(logits, ref_logits)
    z = logits.detach().double().requires_grad_(True)
    logp = z.log_softmax(-1)  # [V], every token's log pi
    weights = logp.detach().exp()  # pi(x): the sampling distribution, a constant
    per_token = estimator_loss(logp, ref_logits.detach().double().log_softmax(-1), estimator)  # [V]
    (weights * per_token).sum().backward()
    return z.grad


def sampled_kl_grad(logits: torch.Tensor, ref_logits: torch.Tensor, estimator: str, n: int,
                    generator: torch.Generator | None = None, method: str = "chain",
                    chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over ``n`` samples x ~ softmax(logits) of d estimator_loss(x) / d logits.

    Autograd differentiates the loss as written. method "autograd": through the softmax too, on one copy of
    the logits per sample (slow, memory n x V). "chain" (default): autograd gives c(x) = d loss / d log pi(x)
    and the softmax's chain rule d log pi(x) / d logits = e_x - pi finishes it, with the per-coordinate
    variance from scatter sums (the same numbers, V times less work). float64. Returns ([V], [V]).
    """
    _check_logits(logits, ref_logits)
    if estimator not in LOSS_ESTIMATORS:
        raise ValueError(f"estimator must be one of {LOSS_ESTIMATORS}, got {estimator!r}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an int >= 2 (a standard error needs two samples), got {n!r}")
    if method not in ("chain", "autograd"):
        raise ValueError(f"method must be 'chain' or 'autograd', got {method!r}")
    z, zr = logits.detach().double(), ref_logits.detach().double()
    p, logq = z.softmax(-1), zr.log_softmax(-1)
    x = torch.multinomial(p, n, replacement=True, generator=generator)  # [n] tokens from pi
    if method == "autograd":
        total, total_sq = torch.zeros_like(z), torch.zeros_like(z)
        for xs in x.split(chunk):
            zc = z.expand(len(xs), -1).clone().requires_grad_(True)  # one copy per sample: per-sample gradients
            logp = zc.log_softmax(-1).gather(-1, xs[:, None]).squeeze(-1)  # [c]
            estimator_loss(logp, logq[xs], estimator).sum().backward()
            total += zc.grad.sum(0)
            total_sq += zc.grad.pow(2).sum(0)
    else:
        logp = z.log_softmax(-1)[x].clone().requires_grad_(True)  # [n] log pi(x_i), a leaf
        estimator_loss(logp, logq[x], estimator).sum().backward()
        c = logp.grad  # [n]: d loss_i / d log pi(x_i)
        # g_i = c_i * (e_{x_i} - pi): sum_i g_i and sum_i g_i^2, coordinate by coordinate
        at_x = torch.zeros_like(z).scatter_add_(0, x, c)  # sum of c_i over samples with x_i = j
        at_x_sq = torch.zeros_like(z).scatter_add_(0, x, c**2)
        total = at_x - c.sum() * p
        total_sq = at_x_sq - 2 * p * at_x_sq + p**2 * (c**2).sum()
    mean = total / n
    var = (total_sq / n - mean**2).clamp(min=0) * n / (n - 1)
    return mean, (var / n).sqrt()


def bias_summary(mean: torch.Tensor, se: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How far a sampled mean gradient is from ``target``, against its own noise. [V] each -> dict of floats.

    rel_error: ||mean - target|| / ||target||; noise: sqrt(sum se^2) / ||target|| (what rel_error would be
    for an unbiased estimator, on average); rel_bias: sqrt(max(rel_error^2 - noise^2, 0)), the noise taken
    out; chi2: ||mean - target||^2 / sum se^2 (about 1 when unbiased, >> 1 when biased).
    """
    if not (mean.shape == se.shape == target.shape):
        raise ValueError(f"shape mismatch: mean{list(mean.shape)}, se{list(se.shape)}, target{list(target.shape)}")
    norm = float(target.norm())
    if norm == 0:
        raise ValueError("target gradient is 0 (pi == pi_ref?): a relative error is undefined")
    err2, noise2 = float((mean - target).pow(2).sum()), float(se.pow(2).sum())
    return {
        "rel_error": math.sqrt(err2) / norm, "noise": math.sqrt(noise2) / norm,
        "rel_bias": math.sqrt(max(err2 - noise2, 0.0)) / norm, "chi2": err2 / noise2 if noise2 > 0 else math.inf,
    }
