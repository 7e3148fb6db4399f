"""utils.rollout_correction: TIS and MIS weights against float64 transcriptions of the trainers' lines."""

import math

import pytest
import torch

from utils import rollout_correction as rc


def batch(seed: int = 0, B: int = 4, T: int = 6, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = rollout + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # a shorter response
    mask[3, 2:] = False
    return old, rollout, mask


def test_tis_is_verl_clamp_and_openrlhf_two_sided():
    old, rollout, mask = batch()
    w = torch.exp(old - rollout)  # verl line 849 / OpenRLHF line 199: old - rollout
    torch.testing.assert_close(rc.tis_weights(old, rollout, mask, cap=2.0), torch.where(mask, w.clamp(max=2.0), 0.0))
    torch.testing.assert_close(rc.tis_weights(old, rollout, mask, cap=1.5, floor=0.8),
                               torch.where(mask, w.clamp(0.8, 1.5), 0.0))


def test_tis_carries_no_gradient():
    old, rollout, mask = batch()
    old.requires_grad_(True)
    w = rc.tis_weights(old, rollout, mask)
    assert not w.requires_grad


def test_sequence_levels():
    old, rollout, mask = batch()
    lw = torch.where(mask, old - rollout, 0.0)
    seq = torch.exp(lw.sum(-1, keepdim=True)).expand_as(lw)  # TRL line 2585: sum of log-ratios
    geo = torch.exp(lw.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(lw)  # OpenRLHF line 209
    torch.testing.assert_close(rc.tis_weights(old, rollout, mask, cap=1e9, level="sequence"), torch.where(mask, seq, 0.0))
    torch.testing.assert_close(rc.tis_weights(old, rollout, mask, cap=1e9, level="geometric"), torch.where(mask, geo, 0.0))


def test_mis_keeps_inside_bounds_inclusive_and_zeroes_the_rest():
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    old = torch.log(torch.tensor([[0.5, 0.49, 2.0, 2.01]], dtype=torch.float64))
    mask = torch.ones(1, 4, dtype=torch.bool)
    keep = rc.mis_keep(old, rollout, mask, low=0.5, high=2.0)
    assert keep.tolist() == [[True, False, True, False]]  # verl lines 599-600: >= lower and <= upper
    torch.testing.assert_close(rc.mis_weights(old, rollout, mask, 0.5, 2.0),
                               torch.tensor([[0.5, 0.0, 2.0, 0.0]], dtype=torch.float64))


def test_sequence_mask_drops_the_whole_sequence():
    rollout = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, math.log(5.0)], [0.1, -0.1, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    keep = rc.mis_keep(old, rollout, mask, 0.5, 2.0, level="sequence")
    assert keep.tolist() == [[False] * 3, [True] * 3]
    token = rc.mis_keep(old, rollout, mask, 0.5, 2.0, level="token")
    assert token.tolist() == [[True, True, False], [True] * 3]


def test_masked_positions_are_zero_whatever_they_hold():
    old, rollout, mask = batch()
    old2 = old.clone()
    old2[~mask] = 50.0  # garbage on padding must not leak into weights or sequence levels
    for level in rc.LEVELS:
        torch.testing.assert_close(rc.tis_weights(old2, rollout, mask, level=level),
                                   rc.tis_weights(old, rollout, mask, level=level))
        assert not rc.mis_keep(old2, rollout, mask, level=level)[~mask].any()


def test_no_overflow_on_huge_log_ratios():
    rollout = torch.zeros(1, 2, dtype=torch.float32)
    old = torch.tensor([[200.0, -200.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = rc.tis_weights(old, rollout, mask, cap=3.0)
    assert torch.isfinite(w).all() and w[0, 0] == 3.0
    assert rc.mis_weights(old, rollout, mask).tolist() == [[0.0, 0.0]]


def test_stats_identical_and_known():
    old, _, mask = batch()
    s = rc.mismatch_stats(old, old.clone(), mask)
    assert s["w_min"] == s["w_max"] == 1.0 and s["frac_outside"] == 0.0 and s["kl_k1"] == 0.0 and s["kl_k3"] == 0.0
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    old = torch.log(torch.tensor([[1.0, 1.05, 1.2, 0.5]], dtype=torch.float64))
    s = rc.mismatch_stats(old, rollout, torch.ones(1, 4, dtype=torch.bool))
    assert s["frac_outside"] == 0.5 and s["w_max"] == pytest.approx(1.2) and s["w_min"] == pytest.approx(0.5)


def test_errors():
    old, rollout, mask = batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        rc.tis_weights(old[:, :3], rollout, mask)
    with pytest.raises(ValueError, match="non-finite"):
        rc.tis_weights(torch.full_like(old, float("nan")), rollout, mask)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="no kept token"):
        rc.tis_weights(old, rollout, empty)
    with pytest.raises(ValueError, match="cap"):
        rc.tis_weights(old, rollout, mask, cap=0.0)
    with pytest.raises(ValueError, match="floor"):
        rc.tis_weights(old, rollout, mask, cap=1.0, floor=2.0)
    with pytest.raises(ValueError, match="low"):
        rc.mis_keep(old, rollout, mask, low=3.0, high=2.0)
    with pytest.raises(ValueError, match="level"):
        rc.log_weights(old, rollout, mask, level="batch")
    with pytest.raises(ValueError, match="band"):
        rc.mismatch_stats(old, rollout, mask, band=1.5)
