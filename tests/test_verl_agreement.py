"""utils agrees with verl's own code (verl==0.9.1, imported through utils.trainers), values and gradients.

Compared: ``compute_policy_loss_vanilla`` (with a real ``ActorConfig``), ``agg_loss`` (every mode utils also has:
the list is the intersection with ``utils.loss.AGGREGATIONS``, so a mode added there is tested as soon as verl has it),
``kl_penalty`` (every estimator of ``utils.kl.KL_ESTIMATORS``), ``compute_gae_advantage_return`` and
``masked_whiten``. Intentional differences are tested as such: verl clamps the log-ratio to [-20, 20]
(core_algos.py L1338 at 1dda039b), always dual-clips at ``clip_ratio_c`` = 3, clamps k3 to [-10, 10]
(L2241-2244), adds 1e-8 to ``masked_mean``'s denominator, and drops empty rows from its seq-mean modes; utils
raises on empty masks.
"""

from __future__ import annotations

import pytest
import torch

import utils
from utils import trainers
from utils.kl import KL_ESTIMATORS
from utils.loss import AGGREGATIONS, TRL_LOSS_TYPES

core, vF = trainers.verl_core_algos(), trainers.verl_functional()
VERL_DUAL_CLIP = 3.0  # ActorConfig.clip_ratio_c default, always applied to A < 0


def _verl_has_mode(mode: str) -> bool:
    try:
        core.agg_loss(torch.zeros(1, 1), torch.ones(1, 1), mode)
    except ValueError:
        return False
    return True


SHARED_MODES = [m for m in AGGREGATIONS if _verl_has_mode(m)]


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


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def test_shared_modes_cover_ours():
    """Every aggregation utils has under verl's names, verl has too (TRL's names are tested in test_trl_agreement)."""
    assert SHARED_MODES == [m for m in AGGREGATIONS if m not in TRL_LOSS_TYPES]
    assert {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"} <= set(SHARED_MODES)


def test_actor_config_is_verls_default():
    config = trainers.verl_actor_config()
    assert type(config).__name__ == "ActorConfig" and type(config).__module__ == "verl.workers.config.actor"
    assert (config.clip_ratio, config.clip_ratio_c, config.loss_agg_mode, config.global_batch_info) == (0.2, 3.0, "token-mean", {})


@pytest.mark.parametrize("B,T,seed", [(1, 4, 0), (4, 9, 1), (8, 33, 2)])
@pytest.mark.parametrize("agg", SHARED_MODES)
@pytest.mark.parametrize("low,high", [(0.2, None), (0.2, 0.28), (0.1, 0.3)])
def test_policy_loss_vanilla_matches(B, T, seed, agg, low, high):
    log_probs, old, adv, mask = _batch(B, T, seed, spread=0.8)  # wide: the clips and verl's dual clip bite
    config = trainers.verl_actor_config(clip_ratio=low, clip_ratio_low=low, clip_ratio_high=low if high is None else high)
    theirs, metrics = core.compute_policy_loss_vanilla(old, log_probs, adv, mask, loss_agg_mode=agg, config=config)
    ours, info = utils.policy_loss(log_probs, old, adv, mask, clip_eps=low, clip_eps_high=high,
                                   dual_clip=VERL_DUAL_CLIP, agg=agg)
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=1e-7)  # verl's seq-means: 1e-8 eps
    torch.testing.assert_close(_grad(ours, log_probs), _grad(theirs, log_probs), atol=1e-12, rtol=1e-7)
    assert abs(metrics["actor/ppo_kl"] - info["approx_kl_k1"]) < 1e-7


def test_dual_clip_is_always_on_in_verl():
    """Without ``dual_clip`` ours differs exactly on the A < 0 tokens whose loss passes -3A."""
    log_probs, old, adv, mask = _batch(1, 64, 3, spread=2.0)
    config = trainers.verl_actor_config()
    theirs, metrics = core.compute_policy_loss_vanilla(old, log_probs, adv, mask, config=config)
    plain, _ = utils.policy_loss(log_probs, old, adv, mask, agg="token-mean")
    assert metrics["actor/pg_clipfrac_lower"] > 0 and float(plain) > float(theirs)


@pytest.mark.parametrize("agg", SHARED_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_agg_loss_matches(agg, seed):
    g = torch.Generator().manual_seed(seed)
    loss_mat = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 11, generator=g) > 0.4).to(torch.float64)
    mask[:, 0] = 1  # every row keeps a token
    theirs, ours = core.agg_loss(loss_mat, mask, agg), utils.aggregate(loss_mat, mask, agg)
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=1e-7)
    torch.testing.assert_close(_grad(ours, loss_mat), _grad(theirs, loss_mat), atol=1e-12, rtol=1e-7)


# verl's global count for each mode, which our ``normalizer`` replaces; modes outside this map are compared above
GLOBAL_COUNT = {"token-mean": "batch_num_tokens", "seq-mean-token-mean": "global_batch_size",
                "seq-mean-token-sum": "global_batch_size", "seq-mean-token-sum-norm": "global_batch_size"}


@pytest.mark.parametrize("agg", [m for m in SHARED_MODES if m in GLOBAL_COUNT])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_agg_loss_global_counts_match_our_normalizer(agg, dp_size):
    """verl divides by the *global* count times dp_size (gradients are averaged over ranks afterwards);
    with normalizer = global count / dp_size ours gives the same per-rank loss."""
    g = torch.Generator().manual_seed(5)
    loss_mat = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g) > 0.3).to(torch.float64)
    mask[:, 0] = 1
    count = 2.5 * (float(mask.sum()) if agg == "token-mean" else mask.shape[0])  # this rank holds part of the batch
    theirs = core.agg_loss(loss_mat, mask, agg, dp_size=dp_size, **{GLOBAL_COUNT[agg]: count})
    ours = utils.aggregate(loss_mat, mask, agg, normalizer=count / dp_size)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-7)


def test_policy_loss_reads_global_batch_info_from_the_config():
    log_probs, old, adv, mask = _batch(4, 8, 6)
    n = 3.0 * float(mask.sum())
    config = trainers.verl_actor_config(global_batch_info={"dp_size": 1, "batch_num_tokens": n})
    theirs, _ = core.compute_policy_loss_vanilla(old, log_probs, adv, mask, config=config)
    ours, _ = utils.policy_loss(log_probs, old, adv, mask, dual_clip=VERL_DUAL_CLIP, agg="token-mean", normalizer=n)
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_penalty_matches(estimator, seed):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-2.0 + torch.randn(5, 12, generator=g, dtype=torch.float64)).requires_grad_()
    ref = log_probs.detach() + 0.5 * torch.randn(5, 12, generator=g, dtype=torch.float64)  # inside verl's clamps
    theirs, ours = core.kl_penalty(log_probs, ref, estimator), utils.kl_estimate(log_probs, ref, estimator)
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(_grad(ours.sum(), log_probs), _grad(theirs.sum(), log_probs), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_then_whitened(gamma, lam, holes):
    """verl's GAE skips masked positions like ours and whitens the advantages inside; returns are unwhitened."""
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10 + holes))
    rewards = torch.randn(5, 10, generator=g, dtype=torch.float64)
    values = torch.randn(5, 10, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 7, 3, 1, 6])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).to(torch.float64)
    if holes:  # observation tokens inside a response (tool output): skipped, not ends of the episode
        mask[0, 2:4] = 0
        mask[1, 1] = 0
    rewards, values = rewards * mask, values * mask
    adv_t, ret_t = core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv_o, ret_o = utils.gae(rewards, values, gamma, lam, mask)
    keep = mask.bool()
    torch.testing.assert_close(ret_o[keep], ret_t[keep], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(utils.whiten(adv_o, mask)[keep], adv_t[keep], atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_whiten_matches(shift_mean, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(4, 9, generator=g, dtype=torch.float64) + 1.0
    mask = (torch.rand(4, 9, generator=g) > 0.5).to(torch.float64)
    mask[0, :2] = 1
    theirs, ours = vF.masked_whiten(x, mask, shift_mean=shift_mean), utils.whiten(x, mask, shift_mean=shift_mean)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("dim", [None, -1])
def test_masked_mean_matches_up_to_its_eps(dim):
    _, _, x, mask = _batch(5, 7, 9)
    theirs, ours = vF.masked_mean(x, mask, axis=dim), utils.masked_mean(x, mask, dim=dim)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-7)  # verl: sum / (count + 1e-8)
    assert not torch.equal(ours, theirs)


# ---------------------------------------------------------------- where the numbers part ways, on purpose


def test_log_ratio_clamp_at_20():
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    one, pos = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    config = trainers.verl_actor_config()
    for log_ratio, agree in [(-19.0, True), (-30.0, False)]:  # A > 0, ratio far below 1 - eps: the unclipped branch
        old = torch.full((1, 1), -log_ratio, dtype=torch.float64)
        theirs, _ = core.compute_policy_loss_vanilla(old, lp, pos, one, config=config)
        ours, _ = utils.policy_loss(lp, old, pos, one, dual_clip=VERL_DUAL_CLIP)
        g_t, g_o = _grad(theirs, lp), _grad(ours, lp)
        if agree:
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=0)
            torch.testing.assert_close(g_o, g_t, rtol=1e-10, atol=0)
        else:  # verl: ratio stuck at e^-20, no gradient; ours: e^-30 with its (tiny) gradient
            assert float(theirs) == pytest.approx(-float(torch.tensor(-20.0).exp())) and float(g_t) == 0.0
            assert float(ours) == pytest.approx(-float(torch.tensor(-30.0).exp())) and float(g_o) != 0.0


@pytest.mark.parametrize("estimator", [e for e in KL_ESTIMATORS if e == "k3"])
def test_k3_clamps(estimator):
    """verl clamps k3's log-ratio to +-20 and its value to [-10, 10]; ours returns the value."""
    log_ratio = torch.tensor([-15.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    theirs = core.kl_penalty(log_ratio, torch.zeros(4, dtype=torch.float64), estimator)
    ours = utils.kl_estimate(log_ratio, torch.zeros(4, dtype=torch.float64), estimator)
    inside = ours.abs() < 10
    torch.testing.assert_close(ours[inside], theirs[inside], atol=1e-12, rtol=1e-10)
    assert float(theirs[0]) == 10.0 and float(ours[0]) > 3e6


def test_empty_masks():
    log_probs, old, adv, mask = _batch(4, 6, 10, empty_row=True)
    empty = torch.zeros_like(mask)
    assert float(vF.masked_mean(adv, empty)) == 0.0  # 0 / 1e-8
    theirs, _ = core.compute_policy_loss_vanilla(old, log_probs, adv, empty, config=trainers.verl_actor_config())
    assert torch.isnan(theirs)  # agg_loss token-mean: 0 / 0
    with pytest.raises(ValueError):
        utils.masked_mean(adv, empty)
    for agg in [m for m in SHARED_MODES if m.startswith("seq-mean")]:  # verl drops the empty row, ours raises
        rest = utils.aggregate(adv[1:], mask[1:], agg)
        torch.testing.assert_close(core.agg_loss(adv, mask, agg), rest, atol=1e-12, rtol=1e-7)
        with pytest.raises(ValueError):
            utils.aggregate(adv, mask, agg)


# ---------------------------------------------------------------- the import shim itself


def test_shim_leaves_no_stand_ins_behind():
    import sys

    assert not any(isinstance(sys.modules.get(name), trainers._StubModule) for name in trainers.STUBBED)
    assert not any(isinstance(m, trainers._StubModule) for m in list(sys.modules.values()))


def test_missing_trainer_names_the_fix(monkeypatch):
    monkeypatch.setitem(trainers.PINS, "no-such-trainer", "1.0")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-trainer==1\.0"):
        trainers._import("no-such-trainer", "no_such_trainer.loss")
