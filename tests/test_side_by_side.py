"""tools/exp_side_by_side.py: its measurement agrees with utils.ppo.evaluate, its group loop is the one it says."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from utils.ppo import ActorConfig, evaluate, reference_model
from utils.rewards import WordReward

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("exp_side_by_side", ROOT / "tools" / "exp_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exp = _load()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    from utils.models import load_policy

    return load_policy()


def _moved(policy, seed=0, scale=0.05):
    """A copy of ``policy`` with noise on its last block, so its KL to ``policy`` is not zero."""
    moved = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.transformer.h[-1].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return moved


def test_measure_agrees_with_evaluate(model):
    policy, tok = model
    ref, moved, reward = reference_model(policy), _moved(policy), WordReward()
    ours = exp.measure(moved, ref, tok, reward, n=8, seed=3)
    ev = evaluate(moved, ref, tok, exp.PROMPT, reward, ActorConfig(), n=8, seed=3)
    assert ours["kl"] > 0.1
    assert ours["score"] == pytest.approx(float(ev["scores"].mean()), abs=1e-9)
    assert ours["kl"] == pytest.approx(float(ev["kl"].mean()), rel=1e-6)
    assert ours["length"] == pytest.approx(float(ev["length"].float().mean()), abs=1e-9)
    assert 0 < ours["entropy"] < torch.log(torch.tensor(float(policy.config.vocab_size)))


def _train(model, **kw):
    policy, tok = model
    net, ref = copy.deepcopy(policy), reference_model(policy)
    settings = dict(method="grpo", objective="ppo", agg="seq-mean-token-mean", n_steps=1, max_new_tokens=8)
    settings.update(kw)
    history = exp.group_train(net, ref, tok, WordReward(), seed=settings.pop("seed", 0), **settings)
    return net, history


def test_group_train_is_deterministic_under_its_seed(model):
    a, ha = _train(model)
    b, hb = _train(model)
    c, _ = _train(model, seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and ha == hb
    assert not torch.equal(pa, pc)


def test_first_epoch_has_ratio_one_so_nothing_clips(model):
    """pi_old is the sampling policy, detached: with one epoch the ratio is exactly 1 and no token clips."""
    _, history = _train(model, epochs=1, n_steps=2)
    assert all(h["clip_frac"] == 0.0 for h in history)


def test_minibatch_one_takes_G_steps_per_epoch(model, monkeypatch):
    steps = []
    step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    _train(model, epochs=2)
    whole = len(steps)
    _train(model, epochs=2, minibatch=1)
    assert whole == 2 and len(steps) - whole == 2 * exp.G


def test_arms_and_tolerances_are_consistent():
    assert set(exp.REPRO_ARMS) <= set(exp.ARMS)
    assert {"ppo", "grpo", "dr_grpo", "gspo", "cispo"} <= set(exp.ARMS)
    assert set(exp.TOLERANCE) >= {"score", "kl", "length", "entropy", "clip_frac"}
    assert exp.N_RESPONSES % exp.G == 0  # equal numbers of sampled responses in every arm
