"""utils.ppo: one rollout, one actor update, a short train, on the bundled model and on a fresh random one."""

import copy

import pytest
import torch

from utils import load_policy, sequence_logprobs
from utils.kl import kl_estimate
from utils.logprobs import entropy_from_logits
from utils.masking import masked_mean, masked_sum
from utils.ppo import (
    ActorConfig, Rollout, actor_update, epoch_mean, evaluate, make_optimizer, reference_model, rollout,
    sample_responses, train, update_end,
)
from utils.kl import kl_from_logits
from utils.logprobs import response_logits
from utils.rewards import LaggedReward, WordReward

PROMPT = "ROMEO.\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_policy()


def fresh(bundled):
    policy, tok = bundled
    policy = copy.deepcopy(policy)
    return policy, reference_model(policy), tok


def constant_reward(value):
    return lambda text: value


def test_rollout_fields_and_advantages(bundled):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=10, kl_coef=0.1, gamma=1.0, lam=1.0)
    with torch.no_grad():  # make the policy differ from the reference so the KL is not all zero
        policy.transformer.wte.weight.mul_(1.05)
    torch.manual_seed(0)
    ro = rollout(policy, ref, tok, PROMPT, WordReward(), cfg, baseline=0.25)
    assert isinstance(ro, Rollout)
    R = ro.input_ids.shape[1] - ro.prompt_len
    for name in ("action_mask", "old_log_probs", "ref_log_probs", "kl", "rewards", "advantages", "returns", "values"):
        assert getattr(ro, name).shape == (1, R), name
    assert 1 <= ro.response_len <= 10
    assert ro.score == WordReward()(ro.response)
    assert not ro.old_log_probs.requires_grad and not ro.ref_log_probs.requires_grad
    # independent check of the reward shaping with gamma = lam = 1: A_t = (score - b) - beta * sum_{t' >= t} kl_t'
    kl = torch.where(ro.action_mask, ro.old_log_probs - ro.ref_log_probs, 0.0)[0]
    assert float(kl.abs().sum()) > 0
    kl_to_go = torch.flip(torch.cumsum(torch.flip(kl, [0]), 0), [0])
    want = torch.where(ro.action_mask[0], (ro.score - 0.25) - 0.1 * kl_to_go, 0.0)
    torch.testing.assert_close(ro.advantages[0], want)
    torch.testing.assert_close(ro.returns, ro.advantages + ro.values)
    last = int(ro.action_mask[0].nonzero().max())
    assert ro.rewards[0, last] == pytest.approx(ro.score - 0.1 * float(kl[last]))


def test_first_epoch_ratio_is_exactly_one_in_eval_mode(bundled):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=3, lr=1e-4)
    torch.manual_seed(1)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(1.0), cfg)
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert len(hist) == 3
    first = hist[0]
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0 and first["clip_frac"] == 0.0
    assert first["approx_kl_k1"] == 0.0
    assert hist[-1]["ratio_max"] != 1.0  # the steps moved the policy
    assert {"loss", "clip_frac", "ratio_mean", "approx_kl_k3", "entropy", "grad_norm"} <= set(first)
    assert not policy.training  # left in eval mode


def test_temperature_reaches_the_update(bundled):
    # at tau = 0.7 the first epoch's log-probs must be the rollout's (ratio exactly 1) and its entropy that of
    # softmax(logits / tau): an update that forgot the temperature anywhere would see a ratio != 1 or another entropy
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=1, temperature=0.7)
    torch.manual_seed(1)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(1.0), cfg)
    with torch.no_grad():
        logits = response_logits(policy, ro.input_ids, ro.attention_mask, ro.prompt_len)
        want = float(masked_mean(entropy_from_logits(logits, 0.7), ro.action_mask))
        at_one = float(masked_mean(entropy_from_logits(logits, 1.0), ro.action_mask))
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert hist[0]["ratio_min"] == 1.0 and hist[0]["ratio_max"] == 1.0
    assert hist[0]["entropy"] == pytest.approx(want, rel=1e-5) and abs(want - at_one) > 1e-2


def test_ratio_is_against_the_rollout_policy_not_the_reference(bundled):
    # a policy that has drifted from the reference: the first epoch's ratio is pi / pi_old = 1 exactly,
    # while pi / pi_ref is not (the two coincide only while policy == reference, as in most tests here)
    policy, ref, tok = fresh(bundled)
    with torch.no_grad():
        policy.transformer.wte.weight.mul_(1.1)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=1)
    torch.manual_seed(3)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(1.0), cfg)
    assert float((ro.old_log_probs - ro.ref_log_probs)[ro.action_mask].abs().max()) > 1e-2
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert hist[0]["ratio_min"] == 1.0 and hist[0]["ratio_max"] == 1.0 and hist[0]["approx_kl_k1"] == 0.0


def test_dropout_in_update_breaks_ratio_one(bundled):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=1, dropout_in_update=True)
    torch.manual_seed(1)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(1.0), cfg)
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert hist[0]["ratio_max"] - hist[0]["ratio_min"] > 1e-3  # dropout noise, before any step


@pytest.mark.parametrize("score,sign", [(1.0, +1), (-1.0, -1)])
def test_update_moves_logprobs_in_the_advantage_direction(bundled, score, sign):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=2, lr=1e-4, kl_coef=0.0, baseline="none")
    torch.manual_seed(2)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(score), cfg)
    assert bool((torch.sign(ro.advantages[ro.action_mask]) == sign).all())
    before = float(masked_sum(ro.old_log_probs, ro.action_mask))
    actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    with torch.no_grad():
        new = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_len)
        after = float(masked_sum(new, ro.action_mask))
    assert sign * (after - before) > 0.01


def test_short_train_is_deterministic_and_logs(bundled):
    cfg = ActorConfig(max_new_tokens=6, ppo_epochs=2, seed=3)
    runs = []
    for _ in range(2):
        policy, ref, tok = fresh(bundled)
        runs.append(train(policy, ref, tok, PROMPT, WordReward(), cfg, n_rollouts=3, progress=False))
    assert len(runs[0]) == 3
    keys = {"score", "baseline", "kl_ref_k1_mean", "kl_ref_k1_sum", "kl_ref_k3_mean", "clip_frac", "loss", "response"}
    assert keys <= set(runs[0][0])
    assert runs[0][0]["kl_ref_k1_mean"] == 0.0  # the first rollout comes from the reference itself
    assert [h["response"] for h in runs[0]] == [h["response"] for h in runs[1]]
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]
    # EMA baseline: b_{n+1} = 0.9 b_n + 0.1 score_n, from b_0 = 0
    b = 0.0
    for h in runs[0]:
        assert h["baseline"] == pytest.approx(b)
        b = 0.9 * b + 0.1 * h["score"]


def test_evaluate_deterministic_and_leaves_rng(bundled):
    policy, tok = bundled
    ref = reference_model(policy)
    cfg = ActorConfig(max_new_tokens=6)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    e1 = evaluate(policy, ref, tok, PROMPT, WordReward(), cfg, n=8, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    e2 = evaluate(policy, ref, tok, PROMPT, WordReward(), cfg, n=8, seed=7)
    assert e1["scores"].shape == (8,) and torch.equal(e1["scores"], e2["scores"]) and e1["texts"] == e2["texts"]
    assert e1["scores"].tolist() == [WordReward()(t) for t in e1["texts"]]


def test_early_eos_rows_are_masked(bundled):
    policy, tok = bundled
    tok = copy.deepcopy(tok)
    newline = tok("\n")["input_ids"][0]
    tok.eos_token = tok.convert_ids_to_tokens(newline)  # a frequent token as EOS, so rows end early
    tok.pad_token = tok.convert_ids_to_tokens(0)
    torch.manual_seed(0)
    ids, attn, P, mask = sample_responses(policy, tok, "ROMEO.", ActorConfig(max_new_tokens=12), n=16)
    resp = ids[:, P:]
    ended = (resp == newline).any(-1)
    assert bool(ended.any()) and bool((~mask).any())
    for row, m, a in zip(resp, mask, attn[:, P:]):
        hits = (row == newline).nonzero()
        n_kept = int(hits[0]) + 1 if len(hits) else row.shape[0]
        assert m.tolist() == [True] * n_kept + [False] * (row.shape[0] - n_kept)  # EOS kept, pads after it not
        assert torch.equal(a.bool(), m)


def test_runs_unchanged_on_a_random_model_from_a_folder(tmp_path, bundled):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = bundled
    torch.manual_seed(0)
    cfg_model = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg_model).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy, tok2 = load_policy(tmp_path)
    ref = reference_model(policy)
    cfg = ActorConfig(max_new_tokens=5, ppo_epochs=2)
    hist = train(policy, ref, tok2, PROMPT, constant_reward(1.0), cfg, n_rollouts=2, progress=False)
    assert len(hist) == 2 and all(h["grad_norm"] > 0 for h in hist)
    with pytest.raises(ValueError, match="context"):
        rollout(policy, ref, tok2, PROMPT, WordReward(), ActorConfig(max_new_tokens=64))


@pytest.mark.parametrize("kwargs,match", [
    ({"clip_eps": 1.5}, "clip_eps"), ({"kl_estimator": "k5"}, "kl_estimator"), ({"lam": 1.2}, "lam"),
    ({"agg": "mean"}, "agg"), ({"ppo_epochs": 0}, "ppo_epochs"), ({"baseline": "critic"}, "baseline"),
    ({"temperature": 0.0}, "temperature"), ({"dual_clip": 0.5}, "dual_clip"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"kl_coef": -0.1}, "kl_coef"), ({"kl_loss_coef": float("nan")}, "kl_loss_coef"),
    ({"kl_loss_estimator": "k4"}, "kl_loss_estimator"), ({"baseline_decay": 1.5}, "baseline_decay"),
    ({"gamma": -0.1}, "gamma"), ({"clip_eps_high": 1.0}, "clip_eps_high"), ({"clip_eps": None, "clip_eps_high": 0.3}, "no clip"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"lr": 0.0}, "lr"), ({"temperature": float("inf")}, "temperature"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActorConfig(**kwargs)


def test_whitening_one_token_response_raises(bundled):
    policy, ref, tok = fresh(bundled)
    with pytest.raises(ValueError, match="at least 2"):
        rollout(policy, ref, tok, PROMPT, constant_reward(1.0), ActorConfig(max_new_tokens=1, whiten_advantages=True))


def test_kl_loss_pulls_toward_reference(bundled):
    policy, ref, tok = fresh(bundled)
    with torch.no_grad():  # a policy that has drifted from the reference
        policy.transformer.wte.weight.mul_(1.1)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=4, lr=1e-4, kl_coef=0.0, baseline="none", kl_loss_coef=1.0)
    torch.manual_seed(4)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(0.0), cfg)
    assert bool((ro.advantages == 0).all())  # no policy-gradient signal: only the KL term acts
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert hist[0]["kl_loss"] > 0 and hist[0]["policy_loss"] == 0.0
    # epoch 0 runs on the rollout's policy: the term is kl_loss_estimator's (k3) mean, not the reward's k1
    k3 = kl_estimate(ro.old_log_probs, ro.ref_log_probs, "k3")
    assert hist[0]["kl_loss"] == pytest.approx(float(masked_mean(k3, ro.action_mask)), rel=1e-5)
    assert hist[-1]["kl_loss"] < 0.9 * hist[0]["kl_loss"]
    # with the coefficient at 0 the term does not act: the weights do not move. p2 drifts like the policy above, so
    # its KL gradient is not zero (on a copy of the reference it would be, and a KL term that always acted would pass)
    p2, _, _ = fresh(bundled)
    with torch.no_grad():
        p2.transformer.wte.weight.mul_(1.1)
    before = [p.detach().clone() for p in p2.parameters()]
    actor_update(p2, make_optimizer(p2, cfg), ro, ActorConfig(max_new_tokens=8, ppo_epochs=2, kl_loss_coef=0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, p2.parameters()))


def test_evaluate_kl_and_scores(bundled):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=6)
    ev = evaluate(policy, ref, tok, PROMPT, WordReward(), cfg, n=8, seed=7)
    assert torch.equal(ev["kl"], torch.zeros(8))  # the policy is its own reference
    with torch.no_grad():
        policy.transformer.wte.weight.mul_(1.1)
    ev2 = evaluate(policy, ref, tok, PROMPT, WordReward(), cfg, n=8, seed=7)
    # against a direct computation on the same samples: sum over kept tokens of log pi - log pi_ref
    torch.manual_seed(7)
    ids, attn, P, mask = sample_responses(policy, tok, PROMPT, cfg, n=8)
    with torch.no_grad():
        lr = sequence_logprobs(policy, ids, attn, P) - sequence_logprobs(ref, ids, attn, P)
        p, q = response_logits(policy, ids, attn, P).log_softmax(-1), response_logits(ref, ids, attn, P).log_softmax(-1)
    torch.testing.assert_close(ev2["kl_k1"], (lr * mask).sum(-1))
    exact = ((p.exp() * (p - q)).sum(-1) * mask).sum(-1)  # sum over the vocabulary, then over kept tokens
    torch.testing.assert_close(ev2["kl"], exact)
    torch.testing.assert_close(ev2["kl_per_token"], ev2["kl"] / mask.sum(-1))
    assert bool((ev2["kl"] > 0).all()) and not torch.equal(ev2["kl"], ev2["kl_k1"])


def test_kl_from_logits_is_the_exact_kl_and_validates():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(kl_from_logits(a, b).double(), (p * (p / q).log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_from_logits(a, a), torch.zeros(3, 5))
    tau = 0.7
    pt, qt = (a / tau).softmax(-1), (b / tau).softmax(-1)
    torch.testing.assert_close(kl_from_logits(a, b, tau).double(), (pt * (pt / qt).log()).sum(-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kl_from_logits(a, b), kl_from_logits(b, a))  # the direction matters
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_from_logits(a, b[..., :6])
    with pytest.raises(ValueError, match="temperature"):
        kl_from_logits(a, b, 0.0)


def test_no_clip_is_the_plain_surrogate(bundled):
    """clip_eps=None: the loss is -r*A aggregated, so its gradient is never zeroed; the clipped loss's is."""
    policy, ref, tok = fresh(bundled)
    torch.manual_seed(2)
    cfg = ActorConfig(max_new_tokens=8, clip_eps=None, ppo_epochs=6, lr=1e-3)
    ro = rollout(policy, ref, tok, PROMPT, WordReward(), cfg, baseline=-1.0)  # advantage >= +1 on every token
    hist = actor_update(policy, make_optimizer(policy, cfg), ro, cfg)
    assert all(h["clip_frac"] == 0.0 for h in hist) and hist[-1]["ratio_max"] > 1.2
    p2, _, _ = fresh(bundled)
    clipped = actor_update(p2, make_optimizer(p2, cfg), ro, ActorConfig(max_new_tokens=8, ppo_epochs=6, lr=1e-3))
    assert max(h["clip_frac"] for h in clipped) > 0
    with pytest.raises(ValueError, match="no clip"):
        ActorConfig(clip_eps=None, dual_clip=3.0)


def test_train_reports_the_mean_over_epochs_and_where_the_update_ended(bundled):
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=3, lr=1e-3, seed=4)
    hist = train(policy, ref, tok, PROMPT, WordReward(), cfg, n_rollouts=2, progress=False)
    # replay the same seed by hand: the per-update row is the mean of actor_update's per-epoch rows
    p2, r2, _ = fresh(bundled)
    torch.manual_seed(4)
    ro = rollout(p2, r2, tok, PROMPT, WordReward(), cfg, baseline=0.0)
    with torch.no_grad():
        old_logits = response_logits(p2, ro.input_ids, ro.attention_mask, ro.prompt_len)
    epochs = actor_update(p2, make_optimizer(p2, cfg), ro, cfg)
    for key in ("loss", "clip_frac", "ratio_max", "approx_kl_k3", "grad_norm", "entropy"):
        assert hist[0][key] == pytest.approx(sum(e[key] for e in epochs) / len(epochs)), key
    end = update_end(old_logits, p2, ro, cfg)
    for key, value in end.items():
        assert hist[0][key] == pytest.approx(value), key
    assert end["end_kl_old"] > 0 and end["end_max_abs_log_ratio"] > 0


def test_the_optimizer_steps_on_the_clipped_gradient(bundled):
    # AdamW hides a missing clip (its step barely depends on the gradient's scale), so watch the gradient
    # that step() receives: its norm is at most max_grad_norm, while the logged grad_norm is the norm before clipping
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=8, ppo_epochs=2, max_grad_norm=0.01)
    torch.manual_seed(2)
    ro = rollout(policy, ref, tok, PROMPT, constant_reward(1.0), cfg)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters() if p.grad is not None])))))
    hist = actor_update(policy, opt, ro, cfg)
    assert len(seen) == 2 and all(h["grad_norm"] > 0.01 for h in hist)
    assert all(n <= 0.01 * (1 + 1e-4) for n in seen)
    # lr = 0: the policy does not move, so both epochs see the same gradient (one that accumulated would differ)
    assert hist[1]["grad_norm"] == pytest.approx(hist[0]["grad_norm"], rel=1e-6)


def test_ema_baseline_follows_the_scores(bundled):
    # a constant score of 1 from b_0 = 0: b = 0, 0.1, 0.19 (decay 0.9); swapped weights would give 0, 0.9, 0.99
    policy, ref, tok = fresh(bundled)
    cfg = ActorConfig(max_new_tokens=3, ppo_epochs=1, baseline_decay=0.9)
    hist = train(policy, ref, tok, PROMPT, constant_reward(1.0), cfg, n_rollouts=3, progress=False)
    assert [h["baseline"] for h in hist] == pytest.approx([0.0, 0.1, 0.19])
    assert [h["advantage"] for h in hist] == pytest.approx([1.0, 0.9, 0.81])


def test_epoch_mean_is_the_mean_of_every_key_but_epoch():
    epochs = [{"epoch": 0, "loss": 1.0, "clip_frac": 0.0}, {"epoch": 1, "loss": 2.0, "clip_frac": 0.5},
              {"epoch": 2, "loss": 6.0, "clip_frac": 0.25}]
    assert epoch_mean(epochs) == {"loss": 3.0, "clip_frac": 0.25}


def test_lagged_reward_pairs_each_text_with_the_previous_score():
    lagged = LaggedReward(WordReward(), first=0.5)
    assert [lagged(t) for t in ("my love", "no", "thou my joy", "x")] == [0.5, 2.0, 0.0, 3.0]
