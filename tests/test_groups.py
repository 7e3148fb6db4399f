"""Tests for utils/groups.py: batched group rollouts and GRPO / Dr. GRPO / RLOO advantages.

References: float64 loops over each group (``statistics`` for mean and the unbiased std), verl 0.9.1's own
``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage`` (through ``utils.trainers``), and the
small GPT-2 for the rollout layout (padding, masks, position ids). Planted bugs must fail the references.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from utils import groups as Gr
from utils.logprobs import sequence_logprobs


def ref_advantages(scores: list[float], G: int, method: str, eps: float = 1e-6) -> list[float]:
    out = []
    for k in range(0, len(scores), G):
        grp = scores[k:k + G]
        if all(x == grp[0] for x in grp):
            out += [0.0] * G
            continue
        mean = statistics.fmean(grp)
        for i, x in enumerate(grp):
            if method == "grpo":
                out.append((x - mean) / (statistics.stdev(grp) + eps))
            elif method == "dr_grpo":
                out.append(x - mean)
            else:
                others = grp[:i] + grp[i + 1:]
                out.append(x - statistics.fmean(others))
    return out


def scores_batch(n_groups=5, G=4, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (n_groups * G,), generator=g).double() if ties else torch.randn(n_groups * G, generator=g, dtype=torch.float64)
    s[:G] = 2.0  # one group with no signal
    return s


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("method", Gr.GROUP_METHODS)
def test_against_float64_loops(method, G, ties):
    s = scores_batch(G=G, ties=ties)
    ours = Gr.group_advantages(s, G, method)
    ref = torch.tensor(ref_advantages(s.tolist(), G, method), dtype=torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("method", Gr.GROUP_METHODS)
def test_flat_group_is_exactly_zero_never_nan(method):
    s = torch.tensor([0.1, 0.1, 0.1, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0])  # 0.1 * 3 / 3 != 0.1 in float
    adv = Gr.group_advantages(s, 3, method)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_sums_and_scale():
    s = scores_batch(G=4, ties=False)
    for method in Gr.GROUP_METHODS:
        adv = Gr.group_advantages(s, 4, method).reshape(-1, 4)
        torch.testing.assert_close(adv.sum(-1), torch.zeros(adv.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    # GRPO ignores the reward's scale and offset (up to eps); Dr. GRPO and RLOO scale with it
    a, b = Gr.group_advantages(s, 4, "grpo"), Gr.group_advantages(10 * s + 3, 4, "grpo")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Gr.group_advantages(10 * s + 3, 4, "dr_grpo"), 10 * Gr.group_advantages(s, 4, "dr_grpo"))
    # RLOO = G / (G - 1) * Dr. GRPO
    torch.testing.assert_close(Gr.group_advantages(s, 4, "rloo"), 4 / 3 * Gr.group_advantages(s, 4, "dr_grpo"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=1), "group_size must be an int >= 2"),
    (dict(group_size=True), "group_size"),
    (dict(group_size=3), "do not split"),
    (dict(group_size=2, method="ppo"), "method must be one of"),
    (dict(group_size=2, eps=0.0), "eps"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Gr.group_advantages(torch.arange(4.0), **kwargs)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="non-finite"):
        Gr.group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="1-D"):
        Gr.group_advantages(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="1-D"):
        Gr.group_advantages(torch.ones(0), 2)


def test_token_advantages():
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert Gr.token_advantages(adv, mask).tolist() == [[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="must agree"):
        Gr.token_advantages(adv, mask[:1])


# ----------------------------------------------------------------------------- verl's own code

trainers = pytest.importorskip("utils.trainers")


def _verl():
    try:
        return trainers.verl_core_algos()
    except ModuleNotFoundError as err:
        pytest.skip(f"verl not importable: {err}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", Gr.GROUP_METHODS)
def test_against_verl(method, seed):
    ca = _verl()
    G = 4
    s = scores_batch(G=G, seed=seed, ties=False).float()
    s[:G] += torch.tensor([0.0, 0.0, 0.0, 1.0])  # verl's std=0 case aside: every group has a signal here
    T = 5
    mask = torch.ones(len(s), T)
    rewards = torch.zeros(len(s), T)
    rewards[:, -1] = s  # the score on the last token, as verl's token_level_rewards
    index = np.repeat(np.arange(len(s) // G), G)
    if method == "rloo":
        theirs, _ = ca.compute_rloo_outcome_advantage(rewards, mask, index)
    else:
        theirs, _ = ca.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=method == "grpo")
    ours = Gr.token_advantages(Gr.group_advantages(s, G, method), mask.bool())
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_verl_differs_on_groups_of_one():
    """verl gives a lone response its raw score as advantage (mean 0, std 1); we refuse G = 1."""
    ca = _verl()
    s = torch.tensor([2.0, 5.0])
    rewards = s[:, None].clone()
    theirs, _ = ca.compute_grpo_outcome_advantage(rewards, torch.ones(2, 1), np.array([0, 1]))
    assert torch.allclose(theirs[:, 0], s / (1 + 1e-6))
    with pytest.raises(ValueError, match="no baseline"):
        Gr.group_advantages(s, 1)


# ----------------------------------------------------------------------------- planted bugs


def _bug_population_std(scores, group_size, method="grpo", eps=1e-6):
    r = scores.reshape(-1, group_size)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + eps)).reshape(-1)


def _bug_batch_mean(scores, group_size, method="grpo", eps=1e-6):
    return (scores - scores.mean()) / (scores.reshape(-1, group_size).std(-1).repeat_interleave(group_size) + eps)


def _bug_rloo_no_factor(scores, group_size, method="rloo", eps=1e-6):
    r = scores.reshape(-1, group_size)
    return (r - r.mean(-1, keepdim=True)).reshape(-1)


@pytest.mark.parametrize("bug,method", [(_bug_population_std, "grpo"), (_bug_batch_mean, "grpo"),
                                        (_bug_rloo_no_factor, "rloo")])
def test_planted_bugs_fail_the_reference(monkeypatch, bug, method):
    monkeypatch.setattr(Gr, "group_advantages", bug)
    with pytest.raises(AssertionError):
        test_against_float64_loops(method, 3, False)


# ----------------------------------------------------------------------------- rollouts on the small GPT-2


@pytest.fixture(scope="module")
def rollout():
    from utils.models import load_policy

    torch.manual_seed(0)
    policy, tok = load_policy()
    prompts = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,"]
    gb = Gr.sample_groups(policy, tok, prompts, 3, max_new_tokens=12, stop_token_ids=[199])
    return policy, tok, gb


def test_layout(rollout):
    policy, tok, gb = rollout
    N, P = 6, gb.prompt_len
    assert gb.input_ids.shape[0] == N and gb.action_mask.shape == (N, gb.input_ids.shape[1] - P)
    assert gb.group.tolist() == [0, 0, 0, 1, 1, 1]
    enc = tok(gb.prompts, return_tensors="pt", padding=True)
    assert P == enc.input_ids.shape[1]
    for i in range(N):  # each row's prompt block is its prompt, left-padded
        assert torch.equal(gb.input_ids[i, :P], enc.input_ids[gb.group[i]])
        assert torch.equal(gb.attention_mask[i, :P], enc.attention_mask[gb.group[i]])
        real = gb.attention_mask[i].bool()
        assert gb.position_ids[i][real].tolist() == list(range(int(real.sum())))  # 0, 1, ... over real tokens
        m = gb.action_mask[i]
        assert bool(m[0]) and not bool((~m[:-1] & m[1:]).any())  # kept tokens form a prefix: right padding
        resp = gb.input_ids[i, P:]
        stops = torch.isin(resp, torch.tensor([tok.eos_token_id, 199]))
        if bool(stops.any()):  # kept up to and including the first stop token, nothing after
            first = int(stops.nonzero()[0])
            assert int(m.sum()) == first + 1
        else:
            assert bool(m.all())
    assert torch.equal(gb.lengths, gb.action_mask.sum(-1))


def test_batched_logprobs_equal_one_row_at_a_time(rollout):
    """Left padding of the prompt and right padding of the response change no kept token's log-prob."""
    policy, _, gb = rollout
    with torch.no_grad():
        batched = sequence_logprobs(policy, gb.input_ids, gb.attention_mask, gb.prompt_len)
        for i in range(gb.input_ids.shape[0]):
            real = gb.attention_mask[i].bool()
            ids = gb.input_ids[i][real][None]
            plen = int(gb.attention_mask[i, :gb.prompt_len].sum())
            alone = sequence_logprobs(policy, ids, None, plen)[0]
            torch.testing.assert_close(alone, batched[i][gb.action_mask[i]], atol=1e-5, rtol=1e-5)


def test_sample_groups_errors(rollout):
    policy, tok, _ = rollout
    with pytest.raises(ValueError, match="group_size"):
        Gr.sample_groups(policy, tok, ["a"], 1)
    with pytest.raises(ValueError, match="prompts"):
        Gr.sample_groups(policy, tok, [], 2)
    with pytest.raises(ValueError, match="context"):
        Gr.sample_groups(policy, tok, ["a"], 2, max_new_tokens=10_000)
    tok.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left"):
            Gr.sample_groups(policy, tok, ["a"], 2)
    finally:
        tok.padding_side = "left"
