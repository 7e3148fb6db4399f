"""utils.diagnose: names the planted cause on synthetic histories and on real ones from the small GPT-2, silent when healthy."""

import copy
import math
import sys
from unittest import mock

import pytest
import torch

import utils
import utils.ppo
from utils.diagnose import CAUSES, Finding, diagnose, report
from utils.rewards import WordReward

PROMPT = "ROMEO.\n"


def epoch(i=0, **kw):
    """A healthy-looking per-epoch dict of actor_update, with overrides."""
    d = {"epoch": i, "loss": -0.5, "policy_loss": -0.5, "clip_frac": 0.0, "approx_kl_k1": 0.0, "approx_kl_k3": 0.0,
         "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "entropy": 5.0, "grad_norm": 0.8}
    d.update(kw)
    return d


def update_rows(n=8, advantage=None, loss=None, k1=None):
    """Healthy-looking per-update dicts of train: loss = -advantage, k1 >= 0."""
    adv = advantage or [((-1) ** i) * (1 + 0.3 * i) for i in range(n)]
    return [{"step": i, "score": a + 1, "advantage": a, "policy_loss": (-a if loss is None else loss[i]),
             "kl_ref_k1_mean": (0.02 * i if k1 is None else k1[i]), "grad_norm": 1.0} for i, a in enumerate(adv)]


def top(findings):
    assert findings, "expected a finding"
    return findings[0].code, findings[0].causes[0] if findings[0].causes else None


# ---------------------------------------------------------------- synthetic histories

def test_healthy_synthetic_is_silent():
    eps = [epoch(0)] + [epoch(i, ratio_min=0.9, ratio_max=1.1, approx_kl_k3=0.01 * i, clip_frac=0.1,
                              grad_norm=0.8 - 0.1 * i) for i in range(1, 4)]
    assert diagnose(eps) == []
    assert diagnose(update_rows()) == []
    assert report([]) == "healthy: no findings"


@pytest.mark.parametrize("lo, hi, k1, cause", [
    (math.exp(-10), math.exp(9), 2.4, "misaligned"),  # a shift on one side: ratios of e^10
    (0.3, 1.3, 0.3, "temperature"),  # systematic: every token moved the same way
    (0.4, 2.5, 0.02, "dropout"),  # wide noise around 1, small mean shift
])
def test_ratio_at_start_ranks_the_cause(lo, hi, k1, cause):
    f = diagnose([epoch(0, ratio_min=lo, ratio_max=hi, approx_kl_k1=k1)])
    assert top(f) == ("ratio_at_start", cause) and f[0].severity == "bug"


def test_ratio_tolerance_fp32_and_bf16():
    tiny = [epoch(0, ratio_min=1 - 1e-6, ratio_max=1 + 1e-6)]
    assert diagnose(tiny) == []  # same-code fp32 scoring
    bf16 = [epoch(0, ratio_min=math.exp(-0.03), ratio_max=math.exp(0.03))]
    f = diagnose(bf16)
    assert f[0].causes == ("numerics",) and f[0].severity == "warning"
    assert diagnose(bf16, precision="bf16") == []
    with pytest.raises(ValueError, match="precision"):
        diagnose(bf16, precision="fp8")


def test_config_confirms_dropout():
    f = diagnose([epoch(0, ratio_min=0.5, ratio_max=1.3, approx_kl_k1=0.3)],
                 config=utils.ppo.ActorConfig(dropout_in_update=True))
    assert top(f) == ("ratio_at_start", "dropout")


def test_nan_names_empty_mask_or_overflow():
    assert top(diagnose([epoch(0, loss=float("nan"), grad_norm=float("nan"))])) == ("non_finite", "empty_mask")
    assert top(diagnose([epoch(0, ratio_max=float("inf"), loss=float("inf"))])) == ("non_finite", "overflow")


def test_frozen_ratio_with_several_epochs():
    f = diagnose([epoch(i) for i in range(4)])
    assert top(f) == ("ratio_frozen", "old_recomputed")
    assert diagnose([epoch(0)]) == []  # one epoch: ratio 1 is all there is


def test_negative_kl_that_persists():
    f = diagnose(update_rows(k1=[0.0, -0.4, -0.3, -0.2, -0.3, -0.1, -0.2, -0.25]))
    assert top(f) == ("negative_kl", "sampling_settings")
    assert diagnose(update_rows(k1=[0.0, 0.1, -0.01, 0.05, 0.2, -0.02, 0.1, 0.04])) == []  # single negatives: noise


def test_loss_that_ignores_the_advantage():
    rows = update_rows(loss=[0.0, -0.001, -0.06, -0.05, -0.04, -0.045, -0.05, -0.04])
    assert top(diagnose(rows)) == ("score_not_in_loss", "advantage_normalisation")


def test_kl_climbing_only_with_kl_in_the_reward():
    k1 = [0.01 * i for i in range(18)]
    assert top(diagnose(update_rows(n=18, k1=k1))) == ("kl_climbs", "kl_only_in_reward")
    rows = update_rows(n=18, k1=k1)
    for r in rows:
        r["kl_loss"] = 0.1
    assert diagnose(rows) == []


def test_local_normaliser():
    assert top(diagnose([epoch(0, rank_tokens=[6, 144], normalizer=None)])) == ("local_normaliser", "local_normaliser")
    assert diagnose([epoch(0, rank_tokens=[6, 144], normalizer=75.0)]) == []
    assert diagnose([epoch(0, rank_tokens=[75, 75], normalizer=None)]) == []  # equal counts: the same weights


def test_optimistic_bound():
    kl = [0.0, 0.01, 0.03, 0.07, 0.13, 0.22, 0.34, 0.5]
    bad = [epoch(i, ratio_min=0.8, ratio_max=1.5, approx_kl_k3=k, clip_frac=min(0.1 * i, 0.6), grad_norm=0.8 + 0.15 * i)
           for i, k in enumerate(kl)]
    bad[0].update(ratio_min=1.0, ratio_max=1.0)
    assert top(diagnose(bad)) == ("clip_not_holding", "optimistic_bound")
    good = [dict(e, grad_norm=0.8 - 0.08 * i, approx_kl_k3=0.01 * i) for i, e in enumerate(bad)]
    assert diagnose(good) == []


def test_clip_zero_one_epoch_is_a_note():
    assert diagnose([epoch(0)]) == []
    f = diagnose([epoch(0)], notes=True)
    assert [x.code for x in f] == ["clip_zero_one_epoch"] and f[0].severity == "note"


def test_bad_input_is_a_value_error():
    for bad in ([], "history", [1, 2]):
        with pytest.raises(ValueError):
            diagnose(bad)


def test_every_cause_has_words():
    assert all(isinstance(v, str) and len(v) > 20 for v in CAUSES.values())
    assert str(Finding("x", "bug", "msg", ("dropout",))) == "[bug] msg"
    assert utils.diagnose is diagnose and utils.diagnose.report is report  # the package exports the function


# ---------------------------------------------------------------- real histories on the small GPT-2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return utils.load_policy()


@pytest.fixture(scope="module")
def reward():
    return WordReward(words={"the", "and", "to", "of", "a", "i", "my", "you", "that", "in", "is", "not"})


def fresh(bundled):
    policy = copy.deepcopy(bundled[0])
    return policy, utils.ppo.reference_model(policy)


def test_real_healthy_train_is_silent(bundled, reward):
    policy, ref = fresh(bundled)
    hist = utils.ppo.train(policy, ref, bundled[1], PROMPT, reward, utils.ppo.ActorConfig(seed=0), n_rollouts=6,
                           progress=False)
    assert diagnose(hist) == []


def test_real_whitening_one_sample(bundled, reward):
    policy, ref = fresh(bundled)
    hist = utils.ppo.train(policy, ref, bundled[1], PROMPT, reward,
                           utils.ppo.ActorConfig(seed=0, whiten_advantages=True), n_rollouts=6, progress=False)
    assert top(diagnose(hist)) == ("score_not_in_loss", "advantage_normalisation")


def _one_update(bundled, reward, cfg, **patch):
    policy, ref = fresh(bundled)
    torch.manual_seed(1)
    ro = utils.ppo.rollout(policy, ref, bundled[1], PROMPT, reward, cfg, baseline=0.5)
    if patch:
        with mock.patch.multiple(utils.ppo, **patch):
            return utils.ppo.actor_update(policy, utils.ppo.make_optimizer(policy, cfg), ro, cfg), ro
    return utils.ppo.actor_update(policy, utils.ppo.make_optimizer(policy, cfg), ro, cfg), ro


def test_real_healthy_update_is_silent(bundled, reward):
    hist, ro = _one_update(bundled, reward, utils.ppo.ActorConfig())
    assert diagnose(hist, rollout=ro) == []


def test_real_dropout(bundled, reward):
    hist, _ = _one_update(bundled, reward, utils.ppo.ActorConfig(ppo_epochs=1, dropout_in_update=True))
    assert top(diagnose(hist)) == ("ratio_at_start", "dropout")


def test_real_temperature(bundled, reward):
    at_one = lambda logits, labels, temperature=1.0: utils.logprobs_from_logits(logits, labels, 1.0)
    hist, _ = _one_update(bundled, reward, utils.ppo.ActorConfig(ppo_epochs=1, temperature=0.7),
                          logprobs_from_logits=at_one)
    assert top(diagnose(hist)) == ("ratio_at_start", "temperature")


def test_real_shift_in_the_update(bundled, reward):
    def shifted(model, input_ids, attention_mask, prompt_len):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, prompt_len:]
    hist, _ = _one_update(bundled, reward, utils.ppo.ActorConfig(ppo_epochs=1), response_logits=shifted)
    assert top(diagnose(hist)) == ("ratio_at_start", "misaligned")


def test_real_empty_mask_nan(bundled, reward):
    cfg = utils.ppo.ActorConfig(ppo_epochs=1)
    policy, ref = fresh(bundled)
    torch.manual_seed(2)
    ro = utils.ppo.rollout(policy, ref, bundled[1], PROMPT, reward, cfg)
    ro.action_mask = torch.zeros_like(ro.action_mask)
    ro.action_mask[0, 0] = True
    two = lambda t: torch.cat([t, t])  # row 1: the same response with an empty mask
    ro.input_ids, ro.attention_mask, ro.old_log_probs, ro.advantages, ro.ref_log_probs = map(
        two, (ro.input_ids, ro.attention_mask, ro.old_log_probs, ro.advantages, ro.ref_log_probs))
    ro.rewards = torch.zeros_like(ro.advantages)
    ro.action_mask = torch.cat([ro.action_mask, torch.zeros_like(ro.action_mask)])
    seed_mean = lambda x, m, dim=None: (x * m).sum(dim=dim) / m.sum(dim=dim)
    with mock.patch.object(utils.loss, "masked_mean", seed_mean):
        hist = utils.ppo.actor_update(policy, utils.ppo.make_optimizer(policy, cfg), ro, cfg)
    assert top(diagnose(hist, rollout=ro)) == ("non_finite", "empty_mask")


# ---------------------------------------------------------------- a planted bug in diagnose makes these tests fail

def test_planted_bug_is_caught():
    """Swap the ranking thresholds (a planted bug): the temperature case is then misnamed, as the tests above would see."""
    case = [epoch(0, ratio_min=0.3, ratio_max=1.3, approx_kl_k1=0.3)]
    assert top(diagnose(case)) == ("ratio_at_start", "temperature")
    with mock.patch.object(sys.modules["utils.diagnose"], "SYSTEMATIC_K1", 10.0):
        assert top(diagnose(case)) != ("ratio_at_start", "temperature")
    with mock.patch.object(sys.modules["utils.diagnose"], "TOLERANCE", {"fp32": 10.0, "bf16": 10.0}):
        assert diagnose(case) == []  # a tolerance that is too loose hides the bug
