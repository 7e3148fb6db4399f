"""Tests for utils/loss.py: the PPO clipped policy loss, its aggregation and its diagnostics.

The references here are independent: per-element Python loops over floats (``math.exp``, ``min``,
``max``), losses and gradients worked by hand, and properties checked with hypothesis.
Everything runs in float64 so the loops and the tensor code can be compared to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.loss import AGG_MODES, PolicyLoss, aggregate, clipped_surrogate, policy_loss


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """float64 in this module only (the loops are in Python floats); restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- helpers (the naive references)

def naive_token_loss(r: float, a: float, eps_low: float, eps_high: float, dual: float | None) -> float:
    """-min(r*a, clip(r, 1-eps_low, 1+eps_high)*a), optionally capped at -dual*a for a < 0, on floats."""
    clipped_r = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
    loss = -min(r * a, clipped_r * a)
    if dual is not None and a < 0:
        loss = min(loss, -dual * a)
    return loss


def naive_policy_loss(lp, olp, adv, mask, eps_low=0.2, eps_high=None, dual=None, agg="seq-mean-token-mean",
                      normalizer=None) -> float:
    """The whole policy loss with Python loops over rows and tokens (lists of lists of floats)."""
    eps_high = eps_low if eps_high is None else eps_high
    B, T = len(lp), len(lp[0])
    per_tok = [[naive_token_loss(math.exp(lp[b][t] - olp[b][t]), adv[b][t], eps_low, eps_high, dual)
                for t in range(T)] for b in range(B)]
    keep = [[bool(mask[b][t]) for t in range(T)] for b in range(B)]
    if agg == "token-mean":
        total = sum(per_tok[b][t] for b in range(B) for t in range(T) if keep[b][t])
        count = sum(keep[b][t] for b in range(B) for t in range(T))
        return total / (count if normalizer is None else normalizer)
    per_seq = []
    for b in range(B):
        s = sum(per_tok[b][t] for t in range(T) if keep[b][t])
        n = sum(keep[b])
        per_seq.append(s / n if agg == "seq-mean-token-mean" else s)
    return sum(per_seq) / (B if normalizer is None else normalizer)


def random_batch(B: int, T: int, seed: int, spread: float = 0.3, p_keep: float = 0.7):
    """log_probs, old_log_probs, advantages [B, T] and a mask with at least one kept token per row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4 - 0.05  # log-probs in (-4.05, -0.05)
    new = old + spread * torch.randn(B, T, generator=g)  # ratios around 1, some outside the band
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < p_keep
    mask[:, 0] = True  # no empty row: the seq-mean modes need one kept token per row
    return new, old, adv, mask


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


# ----------------------------------------------------------------------------- against naive loops

@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 5), (4, 16)])
@pytest.mark.parametrize("eps_high,dual", [(None, None), (0.28, None), (None, 3.0), (0.28, 2.0)])
def test_policy_loss_matches_loops(agg, B, T, eps_high, dual):
    new, old, adv, mask = random_batch(B, T, seed=B * 100 + T, spread=0.8)  # wide spread: every branch occurs
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, dual_clip=dual, agg=agg)
    ref = naive_policy_loss(*as_lists(new, old, adv, mask), eps_low=0.2, eps_high=eps_high, dual=dual, agg=agg)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_without_mask_equals_all_ones_mask(agg):
    new, old, adv, _ = random_batch(3, 6, seed=7)
    ones = torch.ones(3, 6, dtype=torch.bool)
    a, _ = policy_loss(new, old, adv, None, agg=agg)
    b, _ = policy_loss(new, old, adv, ones, agg=agg)
    ref = naive_policy_loss(*as_lists(new, old, adv, ones), agg=agg)
    assert a.item() == pytest.approx(ref, rel=1e-12)
    assert b.item() == pytest.approx(ref, rel=1e-12)


def test_clipped_surrogate_matches_loops_elementwise():
    g = torch.Generator().manual_seed(0)
    r = torch.exp(0.7 * torch.randn(200, generator=g))
    a = torch.randn(200, generator=g)
    for eps_high, dual in [(None, None), (0.28, None), (0.1, 3.0)]:
        got = clipped_surrogate(r, a, 0.2, eps_high, dual)
        eh = 0.2 if eps_high is None else eps_high
        ref = torch.tensor([naive_token_loss(ri, ai, 0.2, eh, dual) for ri, ai in zip(r.tolist(), a.tolist())])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_matches_loops(agg):
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(4, 5, generator=g)
    mask = torch.rand(4, 5, generator=g) < 0.6
    mask[:, 0] = True
    L, M = loss.tolist(), mask.tolist()
    if agg == "token-mean":
        kept = [L[b][t] for b in range(4) for t in range(5) if M[b][t]]
        ref = sum(kept) / len(kept)
        ref_norm = sum(kept) / 40.0
    else:
        rows = []
        for b in range(4):
            kept = [L[b][t] for t in range(5) if M[b][t]]
            rows.append(sum(kept) / len(kept) if agg == "seq-mean-token-mean" else sum(kept))
        ref, ref_norm = sum(rows) / 4, sum(rows) / 40.0
    assert aggregate(loss, mask, agg).item() == pytest.approx(ref, rel=1e-12)
    assert aggregate(loss, mask, agg, normalizer=40.0).item() == pytest.approx(ref_norm, rel=1e-12)


def test_diagnostics_match_loops():
    new, old, adv, mask = random_batch(3, 8, seed=11, spread=0.5)
    _, info = policy_loss(new, old, adv, mask, clip_eps=0.2, dual_clip=2.0)
    lp, olp, A, M = as_lists(new, old, adv, mask)
    kept = [(math.exp(lp[b][t] - olp[b][t]), lp[b][t] - olp[b][t], A[b][t])
            for b in range(3) for t in range(8) if M[b][t]]
    n = len(kept)
    # clipped branch taken: clip(r)*A < r*A (strictly), i.e. the min picks the clipped term
    clipped = [min(max(r, 0.8), 1.2) * a < r * a for r, _, a in kept]
    assert info["clip_frac"] == pytest.approx(sum(clipped) / n)
    assert info["approx_kl_k1"] == pytest.approx(sum(-lr for _, lr, _ in kept) / n)
    assert info["approx_kl_k3"] == pytest.approx(sum(r - 1 - lr for r, lr, _ in kept) / n)
    assert info["ratio_mean"] == pytest.approx(sum(r for r, _, _ in kept) / n)
    assert info["ratio_min"] == pytest.approx(min(r for r, _, _ in kept))
    assert info["ratio_max"] == pytest.approx(max(r for r, _, _ in kept))
    assert info["dual_clip_frac"] == pytest.approx(sum(a < 0 and r > 2.0 for r, _, a in kept) / n)
    assert 0 < info["clip_frac"] < 1  # this batch has both kinds of token, so the check above means something


def test_dual_clip_frac_only_with_dual_clip():
    new, old, adv, mask = random_batch(2, 4, seed=1)
    _, info = policy_loss(new, old, adv, mask)
    assert "dual_clip_frac" not in info
    assert {"clip_frac", "approx_kl_k1", "approx_kl_k3", "ratio_mean", "ratio_min", "ratio_max"} <= set(info)


# ----------------------------------------------------------------------------- hand-worked cases

# (ratio, advantage, dual_clip, loss by hand, d loss / d log_prob by hand), eps = 0.2
# d loss/d logp = -A * dr/dlogp = -A*r on the unclipped branch, 0 on a clipped (constant) branch.
HAND_CASES = [
    (1.1, 2.0, None, -2.2, -2.2),    # A>0, inside the band: -r*A; descent raises logp
    (1.5, 2.0, None, -2.4, 0.0),     # A>0, above 1+eps: clipped at -(1.2)(2); no gradient
    (0.5, 2.0, None, -1.0, -1.0),    # A>0, below 1-eps: min keeps r*A = 1.0; gradient flows (recover)
    (0.9, -2.0, None, 1.8, 1.8),     # A<0, inside the band: -r*A = 1.8; descent lowers logp
    (0.5, -2.0, None, 1.6, 0.0),     # A<0, below 1-eps: min picks (0.8)(-2) = -1.6; no gradient
    (1.5, -2.0, None, 3.0, 3.0),     # A<0, above 1+eps: min keeps r*A = -3; gradient flows (push down)
    (10.0, -2.0, None, 20.0, 20.0),  # A<0, huge ratio: the loss grows like r*|A| without dual clip
    (10.0, -2.0, 3.0, 6.0, 0.0),     # dual clip c=3: capped at c*|A| = 6; no gradient
    (2.0, -2.0, 3.0, 4.0, 4.0),      # dual clip c=3 but r < c: not capped
    (10.0, 2.0, 3.0, -2.4, 0.0),     # dual clip never touches A>0
]


@pytest.mark.parametrize("r,a,dual,loss_ref,grad_ref", HAND_CASES)
def test_hand_worked_single_token(r, a, dual, loss_ref, grad_ref):
    old = torch.tensor([[-1.3]])
    logp = (old + math.log(r)).requires_grad_()
    loss, info = policy_loss(logp, old, torch.tensor([[a]]), clip_eps=0.2, dual_clip=dual)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref, abs=1e-12)
    assert info["ratio_mean"] == pytest.approx(r)
    if grad_ref == 0.0:
        assert logp.grad.item() == 0.0  # exactly zero, not just small: the clamp is flat there
    else:
        assert logp.grad.item() == pytest.approx(grad_ref, rel=1e-12)


def test_hand_worked_batch_all_agg_modes():
    # ratios and advantages chosen so every per-token loss is a round number
    r = torch.tensor([[1.0, 1.5, 0.5], [0.9, 2.0, 1.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # per token: -min(rA, clip(r)A):
    #   row 0: -1.0 | -min(3.0, 2.4) = -2.4 | -min(-0.5, -0.8) = 0.8
    #   row 1:  0.9 | -min(6.0, 3.6) = -3.6 | (masked)
    old = torch.full((2, 3), -2.0)
    lp = old + r.log()
    row0, row1 = (-1.0 - 2.4 + 0.8), (0.9 - 3.6)
    expect = {
        "seq-mean-token-mean": (row0 / 3 + row1 / 2) / 2,
        "token-mean": (row0 + row1) / 5,
        "seq-mean-token-sum": (row0 + row1) / 2,
    }
    for agg, ref in expect.items():
        loss, info = policy_loss(lp, old, adv, mask, agg=agg)
        assert loss.item() == pytest.approx(ref, abs=1e-12), agg
    # clipped tokens among the 5 kept: (0,1) A>0 r>1.2, (0,2) A<0 r<0.8, (1,1) A>0 r>1.2
    assert info["clip_frac"] == pytest.approx(3 / 5)


def test_gradient_exactly_zero_where_clipped_and_nonzero_elsewhere():
    # the six cases: r below / inside / above the band, times the sign of A
    ratios = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.zeros(1, 6) - 1.0
    logp = (old + ratios.log()).requires_grad_()
    loss, info = policy_loss(logp, old, adv[None], agg="token-mean")
    loss.backward()
    zero = (logp.grad[0] == 0).tolist()
    # clipped (zero gradient): A>0 & r>1+eps, A<0 & r<1-eps; everything else gets a gradient
    assert zero == [False, False, True, True, False, False]
    assert info["clip_frac"] == pytest.approx(2 / 6)
    # sign of the descent step on logp: up for A>0, down for A<0 (where not clipped)
    step = (-logp.grad[0]).tolist()
    assert step[0] > 0 and step[1] > 0 and step[4] < 0 and step[5] < 0


def test_ratio_is_pi_over_pi_old_not_inverted():
    """The seed note writes pi_old/pi; the code (and utils) must compute pi/pi_old."""
    old = torch.tensor([[math.log(0.2)]])
    logp = torch.tensor([[math.log(0.3)]], requires_grad=True)  # the new policy likes the token more
    loss, info = policy_loss(logp, old, torch.tensor([[1.0]]), clip_eps=0.9)  # wide band: no clipping here
    assert info["ratio_mean"] == pytest.approx(0.3 / 0.2)  # > 1, where pi_old/pi would be 0.667
    loss.backward()
    grad_utils = logp.grad.item()
    # the inverted ratio's surrogate, by hand: loss = -(pi_old/pi)*A = -exp(old - logp)*A
    logp2 = logp.detach().clone().requires_grad_()
    (-(old - logp2).exp() * 1.0).sum().backward()
    assert grad_utils == pytest.approx(-1.5)  # d(-rA)/dlogp = -rA: descent raises logp (A > 0)
    assert logp2.grad.item() == pytest.approx(+0.2 / 0.3)  # inverted: descent lowers logp
    assert math.copysign(1, grad_utils) != math.copysign(1, logp2.grad.item())


def test_no_gradient_into_old_log_probs_or_advantages():
    new, old, adv, mask = random_batch(2, 5, seed=5)
    new.requires_grad_()
    old.requires_grad_()
    adv.requires_grad_()
    loss, _ = policy_loss(new, old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert new.grad is not None and bool(new.grad.abs().sum() > 0)


def test_old_log_probs_from_the_same_graph_are_detached():
    # old log-probs computed from the same parameters without no_grad: if they were not detached
    # the ratio would be exp(f(theta) - f(theta)) = 1 identically and the gradient would vanish.
    theta = torch.tensor([[0.3, -0.2, 0.5]], requires_grad=True)
    logp = torch.log_softmax(theta, -1)
    adv = torch.tensor([[1.0, -0.5, 2.0]])
    loss, _ = policy_loss(logp, logp, adv, agg="token-mean")  # same tensor, still attached to theta
    (g_utils,) = torch.autograd.grad(loss, theta)
    logp_ref = torch.log_softmax(theta, -1)
    loss_ref = -(torch.exp(logp_ref - logp_ref.detach()) * adv).mean()
    (g_ref,) = torch.autograd.grad(loss_ref, theta)
    torch.testing.assert_close(g_utils, g_ref)
    assert bool(g_utils.abs().sum() > 0)


# ----------------------------------------------------------------------------- properties (hypothesis)

shapes = st.tuples(st.integers(1, 4), st.integers(1, 9))
seeds = st.integers(0, 10_000)
eps_values = st.floats(0.05, 0.5)


@FAST
@given(shape=shapes, seed=seeds, agg=st.sampled_from(AGG_MODES))
def test_ratio_one_gives_minus_masked_mean_advantage(shape, seed, agg):
    B, T = shape
    _, old, adv, mask = random_batch(B, T, seed)
    lp = old.clone().requires_grad_()
    loss, info = policy_loss(lp, old, adv, mask, agg=agg)
    A, M = adv.tolist(), mask.tolist()
    rows = [[A[b][t] for t in range(T) if M[b][t]] for b in range(B)]
    if agg == "token-mean":
        ref = -sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    elif agg == "seq-mean-token-mean":
        ref = -sum(sum(r) / len(r) for r in rows) / B
    else:
        ref = -sum(sum(r) for r in rows) / B
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert info["clip_frac"] == 0.0 and info["ratio_mean"] == 1.0
    assert info["approx_kl_k1"] == 0.0 and info["approx_kl_k3"] == 0.0
    # at r = 1 the gradient is the plain policy gradient: -A (times the aggregation weight) on kept tokens
    loss.backward()
    assert bool((lp.grad[~mask] == 0).all())
    assert bool((torch.sign(lp.grad[mask]) == -torch.sign(adv[mask])).all())


@FAST
@given(shape=shapes, seed=seeds, eps=eps_values, eps_high=st.one_of(st.none(), eps_values),
       dual=st.one_of(st.none(), st.floats(1.5, 5.0)))
def test_diagnostics_in_range_and_clip_frac_counts_zero_gradients(shape, seed, eps, eps_high, dual):
    B, T = shape
    new, old, adv, mask = random_batch(B, T, seed, spread=0.5)
    lp = new.clone().requires_grad_()
    loss, info = policy_loss(lp, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual,
                             agg="token-mean")
    assert 0.0 <= info["clip_frac"] <= 1.0
    assert info["ratio_min"] <= info["ratio_mean"] <= info["ratio_max"]
    assert info["approx_kl_k3"] >= 0.0  # r - 1 - log r >= 0 for every token
    if dual is not None:
        assert 0.0 <= info["dual_clip_frac"] <= 1.0
    loss.backward()
    # a kept token has zero gradient exactly when it is clipped (or dual-clipped); random A is never 0
    zero_grad = float((lp.grad[mask] == 0).double().mean())
    expected = info["clip_frac"] + (info["dual_clip_frac"] if dual is not None else 0.0)
    assert zero_grad == pytest.approx(expected)


@FAST
@given(shape=shapes, seed=seeds, agg=st.sampled_from(AGG_MODES), junk_seed=seeds)
def test_loss_invariant_to_masked_out_values(shape, seed, agg, junk_seed):
    B, T = shape
    new, old, adv, mask = random_batch(B, T, seed, spread=0.5)
    g = torch.Generator().manual_seed(junk_seed)
    junk = lambda: 5 * torch.randn(B, T, generator=g)  # noqa: E731 - finite garbage, ratio stays < exp(~70)
    new2, old2, adv2 = (torch.where(mask, x, junk()) for x in (new, old, adv))
    lp1, lp2 = new.clone().requires_grad_(), new2.clone().requires_grad_()
    l1, i1 = policy_loss(lp1, old, adv, mask, agg=agg, dual_clip=3.0)
    l2, i2 = policy_loss(lp2, old2, adv2, mask, agg=agg, dual_clip=3.0)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12, abs=1e-14)
    assert i1 == pytest.approx(i2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)  # same on kept tokens, exactly 0 on masked ones
    assert bool((lp2.grad[~mask] == 0).all())


@FAST
@given(shape=shapes, seed=seeds, eps=eps_values, eps_high=st.one_of(st.none(), eps_values),
       dual=st.one_of(st.none(), st.floats(1.1, 5.0)), agg=st.sampled_from(AGG_MODES))
def test_module_equals_function(shape, seed, eps, eps_high, dual, agg):
    new, old, adv, mask = random_batch(*shape, seed)
    module = PolicyLoss(clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual, agg=agg)
    lm = module(new, old, adv, mask)
    lf, info = policy_loss(new, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual, agg=agg)
    assert torch.equal(lm, lf)
    assert module.last_info == info


@FAST
@given(seed=seeds, eps=eps_values)
def test_spinning_up_simplified_form(seed, eps):
    # Spinning Up's PPO page: min(rA, clip(r)A) = min(rA, g(eps, A)), g = (1+eps)A if A >= 0 else (1-eps)A
    g_ = torch.Generator().manual_seed(seed)
    r = torch.exp(0.6 * torch.randn(64, generator=g_))
    a = torch.randn(64, generator=g_)
    g = torch.where(a >= 0, (1 + eps) * a, (1 - eps) * a)
    torch.testing.assert_close(clipped_surrogate(r, a, eps), -torch.min(r * a, g), rtol=0, atol=1e-14)
    # hence the objective -loss never exceeds g(eps, A): no incentive to leave the band
    assert bool((-clipped_surrogate(r, a, eps) <= g + 1e-14).all())


@FAST
@given(seed=seeds, c=st.floats(1.01, 10.0))
def test_dual_clip_bounds_negative_advantage_loss(seed, c):
    g_ = torch.Generator().manual_seed(seed)
    r = torch.exp(2.0 * torch.randn(64, generator=g_))  # ratios up to ~e^6
    a = torch.randn(64, generator=g_)
    with_dc, without = clipped_surrogate(r, a, 0.2, dual_clip=c), clipped_surrogate(r, a, 0.2)
    neg = a < 0
    assert bool((with_dc[neg] <= -c * a[neg] + 1e-12).all())  # capped at c*|A|
    assert torch.equal(with_dc[~neg], without[~neg])  # A >= 0 untouched
    assert bool((with_dc <= without).all())  # the cap only ever lowers the loss


# ----------------------------------------------------------------------------- ValueErrors naming the problem

def _ok_batch():
    new, old, adv, mask = random_batch(2, 4, seed=0)
    return new, old, adv, mask


@pytest.mark.parametrize("which", ["old_log_probs", "advantages", "action_mask"])
def test_shape_mismatch(which):
    args = dict(zip(["log_probs", "old_log_probs", "advantages", "action_mask"], _ok_batch()))
    args[which] = args[which][:, :3]
    with pytest.raises(ValueError, match=rf"shape mismatch.*{which}\[2, 3\]"):
        policy_loss(**args)


def test_broadcastable_advantages_are_rejected():
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(new, old, adv[:, :1], mask)  # [B, 1] would broadcast silently; utils refuses it


def test_empty_mask():
    new, old, adv, mask = _ok_batch()
    for agg in AGG_MODES:
        with pytest.raises(ValueError, match="action_mask is empty"):
            policy_loss(new, old, adv, torch.zeros_like(mask), agg=agg)


@pytest.mark.parametrize("agg,match", [("seq-mean-token-mean", "empty mask"),
                                       ("seq-mean-token-sum", "row with no response token")])
def test_one_empty_row_raises_for_sequence_means(agg, match):
    new, old, adv, mask = _ok_batch()
    mask[1] = False
    with pytest.raises(ValueError, match=match):
        policy_loss(new, old, adv, mask, agg=agg)


def test_one_empty_row_is_fine_for_token_mean():
    # a token-mean has no per-row division, so a row with no token simply contributes nothing
    new, old, adv, mask = _ok_batch()
    mask[1] = False
    loss, _ = policy_loss(new, old, adv, mask, agg="token-mean")
    ref = naive_policy_loss(*as_lists(new[:1], old[:1], adv[:1], mask[:1]), agg="token-mean")
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_non_binary_mask():
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match="only 0/1"):
        policy_loss(new, old, adv, mask.long() * 2)


@pytest.mark.parametrize("which", ["log_probs", "old_log_probs", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(which, bad):
    args = dict(zip(["log_probs", "old_log_probs", "advantages", "action_mask"], _ok_batch()))
    args[which] = args[which].clone()
    args[which][0, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} has 1 non-finite"):
        policy_loss(**args)


@pytest.mark.parametrize("new_dtype,old_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float64)])
def test_log_prob_dtype_mix_is_refused(new_dtype, old_dtype):
    # fp16 log-probs against fp32 old ones used to give a loss silently, with a ratio off 1 by the fp16 rounding
    new, old, adv, mask = _ok_batch()
    names = [str(d).replace("torch.", "") for d in (new_dtype, old_dtype)]
    with pytest.raises(ValueError, match=rf"dtype mismatch: log_probs {names[0]}, old_log_probs {names[1]}"):
        policy_loss(new.to(new_dtype), old.to(old_dtype), adv, mask)


def test_advantages_may_have_another_float_dtype():
    new, old, adv, mask = _ok_batch()
    loss64, _ = policy_loss(new, old, adv, mask)
    loss32, _ = policy_loss(new, old, adv.float(), mask)
    assert loss32.item() == pytest.approx(loss64.item(), abs=1e-6)


@pytest.mark.parametrize("which", ["log_probs", "old_log_probs", "advantages"])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_integer_inputs_are_refused(which, dtype):
    args = dict(zip(["log_probs", "old_log_probs", "advantages", "action_mask"], _ok_batch()))
    args[which] = (args[which] > 0).to(dtype) if dtype == torch.bool else args[which].round().to(dtype)
    with pytest.raises(ValueError, match=rf"{which} must be a floating-point tensor, got dtype torch\.{str(dtype)[6:]}"):
        policy_loss(**args)


@pytest.mark.parametrize("eps", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_bad_clip_eps(eps):
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match=r"clip_eps must lie in \(0, 1\)"):
        policy_loss(new, old, adv, mask, clip_eps=eps)
    with pytest.raises(ValueError, match=r"clip_eps_high must lie in \(0, 1\)"):
        policy_loss(new, old, adv, mask, clip_eps_high=eps)
    with pytest.raises(ValueError, match=r"clip_eps must lie in \(0, 1\)"):
        PolicyLoss(clip_eps=eps)


@pytest.mark.parametrize("dual", [1.0, 0.5, 0.0, -3.0, float("nan")])
def test_bad_dual_clip(dual):
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(new, old, adv, mask, dual_clip=dual)


def test_policy_loss_module_shares_the_functions_checks():
    # one validator for the clip settings: the module accepts and refuses exactly what policy_loss does
    new, old, adv, mask = _ok_batch()
    loss, info = policy_loss(new, old, adv, mask, clip_eps=None)
    module = PolicyLoss(clip_eps=None)
    assert torch.equal(module(new, old, adv, mask), loss) and module.last_info == info
    for kwargs in ({"clip_eps": None, "dual_clip": 3.0}, {"clip_eps": None, "clip_eps_high": 0.3}):
        with pytest.raises(ValueError, match="no clip"):
            PolicyLoss(**kwargs)
        with pytest.raises(ValueError, match="no clip"):
            policy_loss(new, old, adv, mask, **kwargs)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match=r"clip_eps_high must lie in \(0, 1\)"):
        PolicyLoss(clip_eps_high=1.0)


def test_bad_agg():
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(new, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="agg must be one of"):
        PolicyLoss(agg="sum")
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregate(torch.zeros(2, 2), None, agg="token_mean")


@pytest.mark.parametrize("normalizer", [0, 0.0, -4.0])
def test_bad_normalizer(normalizer):
    new, old, adv, mask = _ok_batch()
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        policy_loss(new, old, adv, mask, normalizer=normalizer)


def test_per_token_loss_must_be_2d():
    x = torch.zeros(5)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        policy_loss(x, x, x)


def test_ratio_overflow():
    new, old, adv, mask = _ok_batch()
    new32, old32, adv32 = new.float(), old.float(), adv.float()
    old32[0, 0] = -100.0  # log-ratio ~ +100: exp overflows float32 (max ~ e^88.7)
    with pytest.raises(ValueError, match=r"ratio overflowed: max \|log_probs - old_log_probs\| = 9\d\.\d"):
        policy_loss(new32, old32, adv32, mask)


def test_ratio_overflow_is_refused_even_at_masked_positions():
    # An inf ratio under the mask would not change the loss, but its backward is 0 * inf = NaN
    # (d exp(x)/dx = exp(x)), so refusing it everywhere is what keeps the gradient finite.
    new, old, adv, mask = _ok_batch()
    new, old, adv = new.float(), old.float(), adv.float()
    mask[0, 1] = False
    old[0, 1] = -100.0
    with pytest.raises(ValueError, match="ratio overflowed"):
        policy_loss(new, old, adv, mask)
    lr = (new - old).requires_grad_()
    r = lr.exp()
    per_tok = clipped_surrogate(r, adv)
    per_tok = torch.where(mask, per_tok, per_tok.new_zeros(()))
    per_tok.sum().backward()
    assert bool(torch.isnan(lr.grad[0, 1]))  # what would have happened without the check


# ----------------------------------------------------------------------------- normalizer and micro-batches

def _micro_batch_setup():
    """Four sequences with very different token counts (1, 2, 6, 8) and a small parameter to differentiate."""
    B, T, V = 4, 8, 5
    g = torch.Generator().manual_seed(42)
    theta = torch.randn(B, T, V, generator=g, requires_grad=True)
    actions = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(theta.detach() + 0.3 * torch.randn(B, T, V, generator=g), -1).gather(-1, actions[..., None])[..., 0]
    adv = torch.randn(B, T, generator=g)
    lengths = torch.tensor([1, 2, 6, 8])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return theta, actions, old, adv, mask


def _logp(theta, actions, rows):
    return torch.log_softmax(theta[rows], -1).gather(-1, actions[rows][..., None])[..., 0]


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_accumulation_with_global_normalizer_equals_full_batch(agg):
    theta, actions, old, adv, mask = _micro_batch_setup()
    full, _ = policy_loss(_logp(theta, actions, slice(None)), old, adv, mask, agg=agg)
    (g_full,) = torch.autograd.grad(full, theta)

    # token-mean divides by the whole batch's token count; the seq modes by its number of sequences
    normalizer = float(mask.sum()) if agg == "token-mean" else float(mask.shape[0])
    acc = torch.zeros_like(theta)
    for rows in (slice(0, 2), slice(2, 4)):  # micro-batches with 3 and 14 tokens
        mb, _ = policy_loss(_logp(theta, actions, rows), old[rows], adv[rows], mask[rows], agg=agg,
                            normalizer=normalizer)
        acc += torch.autograd.grad(mb, theta)[0]
    torch.testing.assert_close(acc, g_full, rtol=1e-12, atol=1e-14)


def test_micro_batch_plain_mean_differs_for_token_mean():
    theta, actions, old, adv, mask = _micro_batch_setup()
    full, _ = policy_loss(_logp(theta, actions, slice(None)), old, adv, mask, agg="token-mean")
    (g_full,) = torch.autograd.grad(full, theta)
    acc = torch.zeros_like(theta)
    for rows in (slice(0, 2), slice(2, 4)):
        mb, _ = policy_loss(_logp(theta, actions, rows), old[rows], adv[rows], mask[rows], agg="token-mean")
        acc += torch.autograd.grad(mb / 2, theta)[0]  # the usual "loss / grad_accum_steps"
    # tokens of the 3-token micro-batch get weight 1/(2*3) instead of 1/17: gradients differ
    assert not torch.allclose(acc, g_full, rtol=1e-3, atol=1e-6)
    ratio_weight = (acc[0].abs().sum() / g_full[0].abs().sum()).item()
    assert ratio_weight == pytest.approx(17 / 6, rel=1e-9)  # row 0 is in the small micro-batch


def test_micro_batch_plain_mean_is_fine_for_seq_mean_with_equal_sized_micro_batches():
    # seq-mean-token-mean weights each sequence 1/B: with equal numbers of sequences per micro-batch,
    # loss/steps already gives the full-batch gradient, whatever the token counts
    theta, actions, old, adv, mask = _micro_batch_setup()
    full, _ = policy_loss(_logp(theta, actions, slice(None)), old, adv, mask)
    (g_full,) = torch.autograd.grad(full, theta)
    acc = torch.zeros_like(theta)
    for rows in (slice(0, 2), slice(2, 4)):
        mb, _ = policy_loss(_logp(theta, actions, rows), old[rows], adv[rows], mask[rows])
        acc += torch.autograd.grad(mb / 2, theta)[0]
    torch.testing.assert_close(acc, g_full, rtol=1e-12, atol=1e-14)
