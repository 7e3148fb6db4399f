"""utils.advantages: token rewards, GAE, returns-to-go and whitening against slow loops and hand cases."""

import pytest
import torch

from utils.advantages import gae, last_kept_index, returns_to_go, token_rewards, whiten


def slow_gae(rewards, values, gamma, lam, mask=None):
    """GAE one row at a time in plain Python over the kept tokens only (the definition)."""
    B, T = len(rewards), len(rewards[0])
    mask = mask or [[True] * T for _ in range(B)]
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        kept = [t for t in range(T) if mask[b][t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(kept):
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b][t]
            adv[b][t] = next_a
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_slow_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv, ret = gae(r, v, gamma, lam)
    want = torch.tensor(slow_gae(r.tolist(), v.tolist(), gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, adv + v)


def test_gae_masked_rows_skip_pads_and_holes():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 7, generator=g, dtype=torch.float64)
    v = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0, 0],   # response ended at t=2: pads after it
                         [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)  # holes
    adv, ret = gae(r, v, 0.9, 0.8, mask)
    want = torch.tensor(slow_gae(r.tolist(), v.tolist(), 0.9, 0.8, mask.tolist()), dtype=torch.float64)
    torch.testing.assert_close(adv, want)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())
    # a padded row equals the same row cut at its end: no gamma * V(pad) crosses the EOS boundary
    adv_cut, _ = gae(r[1:2, :3], v[1:2, :3], 0.9, 0.8)
    torch.testing.assert_close(adv[1:2, :3], adv_cut)


def test_gae_lambda_zero_is_td_residual():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, -1.0, 2.0]])
    adv, _ = gae(r, v, 0.9, 0.0)
    # delta_t = r_t + 0.9 V_{t+1} - V_t, with V_3 = 0
    want = torch.tensor([[1.0 + 0.9 * -1.0 - 0.5, 2.0 + 0.9 * 2.0 + 1.0, 3.0 - 2.0]])
    torch.testing.assert_close(adv, want)


def test_gae_lambda_one_values_zero_is_returns_to_go():
    r = torch.tensor([[0.0, -0.1, 0.2, 1.0]])
    adv, ret = gae(r, torch.zeros_like(r), 1.0, 1.0)
    want = torch.tensor([[1.1, 1.1, 1.2, 1.0]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(returns_to_go(r), want)
    torch.testing.assert_close(ret, want)
    # with a discount: G_t = r_t + 0.5 G_{t+1}
    torch.testing.assert_close(returns_to_go(torch.tensor([[1.0, 1.0, 1.0]]), 0.5), torch.tensor([[1.75, 1.5, 1.0]]))


def test_constant_value_equals_baseline_subtracted_from_score():
    """With gamma = 1, a constant value V_t = b is the same as subtracting b from the final reward."""
    r = torch.tensor([[-0.1, -0.2, 0.05, 2.0]])
    b = 0.7
    adv_v, _ = gae(r, torch.full_like(r, b), 1.0, 0.9)
    r_minus_b = r.clone()
    r_minus_b[0, -1] -= b
    adv_b, _ = gae(r_minus_b, torch.zeros_like(r), 1.0, 0.9)
    torch.testing.assert_close(adv_v, adv_b)


def test_gae_treats_values_as_constants():
    # the values come from a critic; the advantages are targets for the actor, so no gradient may flow into V
    r = torch.tensor([[0.0, 0.5, 1.0]])
    v = torch.tensor([[0.2, -0.1, 0.4]], requires_grad=True)
    adv, ret = gae(r, v, 0.9, 0.8)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        gae(r, torch.zeros(2, 4), 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, 1.5, 1.0)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, 1.0, -0.1)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gae(torch.zeros(3), torch.zeros(3), 1.0, 1.0)


def test_token_rewards_hand_case():
    score = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                       [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1],
                         [1, 1, 0, 0]])  # row 1 ended after 2 tokens; the rest is padding
    rewards = token_rewards(score, kl, mask, kl_coef=0.1)
    want = torch.tensor([[-0.01, -0.02, -0.03, -0.04 + 2.0],
                         [-0.05, -0.06 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, want)
    # the bug: putting the score at position -1 lands row 1's score on a pad
    buggy = torch.where(mask.bool(), -0.1 * kl, 0.0)
    buggy[:, -1] += score
    assert buggy[1, -1] == -1.0 and not mask[1, -1]


def test_token_rewards_last_kept_with_holes_and_zero_coef():
    mask = torch.tensor([[1, 0, 1, 0, 0]], dtype=torch.bool)
    assert last_kept_index(mask).tolist() == [2]
    rewards = token_rewards(torch.tensor([1.5]), torch.ones(1, 5), mask, kl_coef=0.0)
    assert rewards.tolist() == [[0.0, 0.0, 1.5, 0.0, 0.0]]


def test_token_rewards_errors():
    kl, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="score"):
        token_rewards(torch.zeros(3), kl, mask, 0.1)
    with pytest.raises(ValueError, match="shape"):
        token_rewards(torch.zeros(2), kl, torch.ones(2, 4), 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(torch.zeros(2), kl, mask, -0.1)
    with pytest.raises(ValueError, match="no kept token"):
        token_rewards(torch.zeros(2), kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        token_rewards(torch.tensor([float("nan"), 0.0]), kl, mask, 0.1)


def test_whiten_mean_zero_std_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 5
    mask = torch.rand(4, 9, generator=g) > 0.3
    w = whiten(x, mask)
    kept = w[mask]
    assert abs(float(kept.mean())) < 1e-12
    assert float(kept.std()) == pytest.approx(1.0, abs=1e-6)  # unbiased std, as verl/TRL
    assert bool((w[~mask] == 0).all())
    # against a naive computation on the kept entries
    xs = x[mask]
    torch.testing.assert_close(kept, (xs - xs.mean()) / torch.sqrt(xs.var() + 1e-8))
    # shift_mean=False: rescaled only, the mean stays
    assert float(whiten(x, mask, shift_mean=False)[mask].mean()) == pytest.approx(float(xs.mean()), abs=1e-9)


def test_whiten_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[0, 1, 0]]))
    with pytest.warns(UserWarning, match="degrees of freedom"):
        assert torch.isnan(torch.tensor([3.0]).std())  # what a naive version would divide by


def test_whiten_equal_entries_give_zeros():
    assert torch.equal(whiten(torch.full((1, 5), 0.7)), torch.zeros(1, 5))
