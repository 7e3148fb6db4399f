"""utils agrees with OpenRLHF's own code (openrlhf==0.11.2, imported through utils.trainers), values and gradients.

Compared: ``PolicyLoss`` (token-level and per-sample, dual clip, asymmetric clip, global normalisers),
``compute_approx_kl`` (k1/k2/k3) and ``masked_mean``. The intentional differences are tested as such: OpenRLHF
clamps the log-ratio to [-20, 20] before ``exp`` (loss.py L187) and every KL estimate to [-10, 10]
(models/utils.py L113); an empty mask gives it NaN, where utils raises ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch

import utils
from utils import trainers
from utils.kl import KL_ESTIMATORS

olf_loss, olf_utils = trainers.openrlhf_loss(), trainers.openrlhf_utils()


def _batch(B, T, seed, spread=0.3, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-2.0 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = log_probs.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[0] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    return log_probs, old, adv, mask


def _value_and_grad(loss, x):
    return loss.detach(), torch.autograd.grad(loss, x)[0]


SHAPES = [(1, 4, 0), (4, 9, 1), (8, 33, 2)]
CLIPS = [(0.2, None), (0.2, 0.28), (0.1, 0.3)]  # (low, high): symmetric, DAPO's clip-higher, wide asymmetric


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("token_level,agg", [(True, "token-mean"), (False, "seq-mean-token-mean")])
@pytest.mark.parametrize("low,high", CLIPS)
@pytest.mark.parametrize("dual_clip", [None, 3.0, 1.5])
def test_policy_loss_matches(B, T, seed, token_level, agg, low, high, dual_clip):
    log_probs, old, adv, mask = _batch(B, T, seed, spread=0.6)  # wide ratios: both clips and the dual clip bite
    theirs_fn = olf_loss.PolicyLoss(clip_eps_low=low, clip_eps_high=low if high is None else high,
                                    dual_clip=dual_clip, token_level_loss=token_level)
    theirs, clip_ratio, ppo_kl, *_ = theirs_fn(log_probs, old, adv, mask)
    ours, info = utils.policy_loss(log_probs, old, adv, mask, clip_eps=low, clip_eps_high=high, dual_clip=dual_clip, agg=agg)
    v_t, g_t = _value_and_grad(theirs, log_probs)
    v_o, g_o = _value_and_grad(ours, log_probs)
    rtol = 1e-10 if token_level else 1e-7  # per sample, OpenRLHF divides by (tokens + 1e-8): relative 1e-8 / tokens
    torch.testing.assert_close(v_o, v_t, atol=1e-12, rtol=rtol)
    torch.testing.assert_close(g_o, g_t, atol=1e-12, rtol=rtol)
    assert abs(float(ppo_kl) - info["approx_kl_k1"]) < 1e-12


@pytest.mark.parametrize("low,high", CLIPS)
def test_clip_ratio_metric_counts_the_same_tokens(low, high):
    """OpenRLHF's clip_ratio is the fraction of tokens with surr2 < surr1, our clip_frac (no dual clip)."""
    log_probs, old, adv, mask = _batch(8, 16, 3, spread=0.6)
    _, clip_ratio, *_ = olf_loss.PolicyLoss(low, low if high is None else high)(log_probs, old, adv, mask)
    _, info = utils.policy_loss(log_probs, old, adv, mask, clip_eps=low, clip_eps_high=high, agg="token-mean")
    assert 0.05 < info["clip_frac"] < 0.95 and abs(float(clip_ratio) - info["clip_frac"]) < 1e-6  # ours counts in float32


@pytest.mark.parametrize("token_level,agg", [(True, "token-mean"), (False, "seq-mean-token-mean")])
def test_global_normalisers_match_our_normalizer(token_level, agg):
    """batch_num_tokens / global_batch_size (dp_size 1) divide like our ``normalizer``: micro-batches sum to the batch."""
    log_probs, old, adv, mask = _batch(6, 10, 4)
    count = float(mask.sum()) if token_level else float(mask.shape[0])
    kw = {"batch_num_tokens": count} if token_level else {"global_batch_size": count}
    parts_theirs, parts_ours = [], []
    for rows in (slice(0, 2), slice(2, 6)):  # two micro-batches of one batch
        fn = olf_loss.PolicyLoss(token_level_loss=token_level)
        parts_theirs.append(fn(log_probs[rows], old[rows], adv[rows], mask[rows], **kw)[0])
        parts_ours.append(utils.policy_loss(log_probs[rows], old[rows], adv[rows], mask[rows], agg=agg, normalizer=count)[0])
    whole, _ = utils.policy_loss(log_probs, old, adv, mask, agg=agg)
    torch.testing.assert_close(sum(parts_ours), sum(parts_theirs), atol=1e-12, rtol=1e-7)
    torch.testing.assert_close(sum(parts_ours), whole, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_compute_approx_kl_matches(estimator, seed):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-2.0 + torch.randn(5, 12, generator=g)).requires_grad_()
    ref = log_probs.detach() + 0.5 * torch.randn(5, 12, generator=g)  # |log-ratio| well inside the +-10 clamp
    theirs = olf_utils.compute_approx_kl(log_probs, ref, kl_estimator=estimator)
    ours = utils.kl_estimate(log_probs, ref, estimator)
    assert theirs.dtype == ours.dtype == torch.float32
    v_t, g_t = _value_and_grad(theirs.sum(), log_probs)
    v_o, g_o = _value_and_grad(ours.sum(), log_probs)
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_o, g_t, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dim", [None, -1])
def test_masked_mean_matches(dim):
    x, _, _, mask = _batch(5, 7, 6)
    torch.testing.assert_close(utils.masked_mean(x.detach(), mask, dim=dim), olf_utils.masked_mean(x.detach(), mask, dim=dim),
                               atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- where the numbers part ways, on purpose


def test_log_ratio_clamp_at_20():
    """Below |log r| = 20 the clamp does nothing; above it OpenRLHF's ratio stops at e^20 with zero gradient,
    ours keeps growing (and raises only when exp overflows, past about 88 in fp32)."""
    lp = torch.zeros(1, 1, requires_grad=True)
    neg = -torch.ones(1, 1)
    for log_ratio, agree in [(19.0, True), (30.0, False)]:
        old = torch.full((1, 1), -log_ratio)
        v_t, g_t = _value_and_grad(olf_loss.PolicyLoss()(lp, old, neg)[0], lp)
        v_o, g_o = _value_and_grad(utils.policy_loss(lp, old, neg)[0], lp)
        if agree:
            torch.testing.assert_close(v_o, v_t, rtol=1e-6, atol=0)
            torch.testing.assert_close(g_o, g_t, rtol=1e-6, atol=0)
        else:
            assert float(v_t) == pytest.approx(float(torch.tensor(20.0).exp()), rel=1e-6) and float(g_t) == 0.0
            assert float(v_o) == pytest.approx(float(torch.tensor(30.0).exp()), rel=1e-6) and float(g_o) > 1e12
    with pytest.raises(ValueError, match="overflow"):
        utils.policy_loss(lp, torch.full((1, 1), -100.0), neg)
    assert torch.isfinite(olf_loss.PolicyLoss()(lp, torch.full((1, 1), -100.0), neg)[0])


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_clamp_at_10_on_every_estimator(estimator):
    """OpenRLHF clamps k1, k2 and k3 alike to [-10, 10]; ours returns the value itself."""
    log_ratio = torch.tensor([-15.0, -5.0, 0.5, 5.0, 15.0])  # log pi - log pi_ref
    theirs = olf_utils.compute_approx_kl(log_ratio, torch.zeros(5), kl_estimator=estimator)
    ours = utils.kl_estimate(log_ratio, torch.zeros(5), estimator)
    inside = ours.abs() < 10
    torch.testing.assert_close(ours[inside], theirs[inside], atol=1e-5, rtol=1e-6)
    assert bool((~inside).any()) and torch.equal(theirs[~inside], ours[~inside].clamp(-10, 10))


def test_empty_mask_nan_vs_value_error():
    log_probs, old, adv, mask = _batch(3, 5, 7)
    empty = torch.zeros_like(mask)
    assert torch.isnan(olf_utils.masked_mean(adv, empty))
    assert torch.isnan(olf_loss.PolicyLoss()(log_probs, old, adv, empty)[0])
    with pytest.raises(ValueError, match="empty"):
        utils.masked_mean(adv, empty)
    with pytest.raises(ValueError, match="empty"):
        utils.policy_loss(log_probs, old, adv, empty)


def test_empty_row_per_sample_mode_drops_it():
    """OpenRLHF's per-sample mode leaves a fully masked row out (aggregate_loss, loss.py L34-38): the mean of
    the other rows. Ours raises rather than guess."""
    log_probs, old, adv, mask = _batch(4, 6, 8, empty_row=True)
    theirs = olf_loss.PolicyLoss(token_level_loss=False)(log_probs, old, adv, mask)[0]
    rest, _ = utils.policy_loss(log_probs[1:], old[1:], adv[1:], mask[1:], agg="seq-mean-token-mean")
    torch.testing.assert_close(theirs, rest, atol=1e-12, rtol=1e-7)
    with pytest.raises(ValueError):
        utils.policy_loss(log_probs, old, adv, mask, agg="seq-mean-token-mean")
