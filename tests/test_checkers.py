"""The exercise checkers (utils/checkers/) pass right answers and name the typical wrong ones.

Right answers are the ``utils`` implementations themselves, through one-line adapters, so the
solutions live once (in ``utils``) and the checkers' own references (loops, for KL, GAE and the
rewards) are tested against them. Every mistake a checker lists is fed to it as a learner's answer
and must be named as itself; more wrong answers, written here, must get the right message; and
answers that are wrong in no known way (zeros, noise) must fail with "expected ... got ...".
"""

from __future__ import annotations

import pytest
import torch

import utils
from utils.checkers import (
    check_clipped_loss, check_gae, check_kl, check_logprobs, check_masked_mean, check_policy_loss, check_ratio,
    check_shifted_logprobs, check_token_rewards,
)
from utils.checkers import advantages as ck_adv
from utils.checkers import clip as ck_clip
from utils.checkers import logprobs as ck_lp
from utils.checkers import masking as ck_mask
from utils.checkers import ratio as ck_ratio
from utils.checkers import rewards as ck_rewards

GENERIC = r"expected .* got .*max abs diff"


def noise_like(t: torch.Tensor) -> torch.Tensor:
    """A random tensor shaped like ``t``: a wrong answer no checker knows."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(123))


def pick(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- the utils implementations, adapted
# to each exercise's signature (one line each)

def ratio(lp, old): return utils.kl_estimate(lp, old, "k1").exp()  # noqa: E704  exp(log pi - log pi_old)
def token_logprobs(x, y): return utils.logprobs_from_logits(x, y)  # noqa: E704
def token_logprobs_t(x, y, temperature=1.0): return utils.logprobs_from_logits(x, y, temperature)  # noqa: E704
def shifted_logprobs(x, ids): return utils.logprobs_from_logits(x[:, :-1], ids[:, 1:])  # noqa: E704
def policy_loss_forward(lp, old, adv, mask, clip_eps=0.2): return utils.policy_loss(lp, old, adv, mask, clip_eps)[0]  # noqa: E704,E501
def gae(r, v, gamma, lam): return utils.gae(r, v, gamma, lam)[0]  # noqa: E704


def kl(estimator):
    return lambda lp, ref: utils.kl_estimate(lp, ref, estimator)


# ----------------------------------------------------------------------------- passes


@pytest.mark.parametrize("checker, fn, line", [
    (check_ratio, ratio, "check_ratio"),
    (check_clipped_loss, utils.clipped_surrogate, "check_clipped_loss"),
    (check_logprobs, token_logprobs, "check_logprobs"),
    (check_logprobs, token_logprobs_t, "check_logprobs"),
    (check_shifted_logprobs, shifted_logprobs, "check_shifted_logprobs"),
    (check_masked_mean, utils.masked_mean, "check_masked_mean"),
    (check_policy_loss, policy_loss_forward, "check_policy_loss"),
    (check_kl, kl("k3"), "check_kl[k3]"),
    (lambda fn: check_kl(fn, estimator="k1"), kl("k1"), "check_kl[k1]"),
    (lambda fn: check_kl(fn, estimator="k2"), kl("k2"), "check_kl[k2]"),
    (check_gae, gae, "check_gae"),
    (check_token_rewards, utils.token_rewards, "check_token_rewards"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_utils_implementation_passes(checker, fn, line, capsys):
    checker(fn)
    out = capsys.readouterr().out
    assert out.startswith(f"\u2713 {line}: all ") and "cases pass" in out


def test_bad_estimator_name_raises():
    with pytest.raises(ValueError, match="estimator"):
        check_kl(kl("k3"), estimator="k4")


def test_stub_error_propagates_unchanged():
    def stub(lp, old):
        raise NotImplementedError("Exercise 1.1: write the ratio")
    with pytest.raises(NotImplementedError, match="Exercise 1.1"):
        check_ratio(stub)


def test_a_broken_reference_is_caught_on_the_hand_worked_case(monkeypatch):
    monkeypatch.setattr(ck_ratio, "reference", ck_ratio.inverted)
    with pytest.raises(RuntimeError, match="check_ratio itself is broken"):
        check_ratio(ratio)


# ----------------------------------------------------------------------------- each listed mistake is named as itself

LISTED = (
    [(check_ratio, m) for m in ck_ratio.MISTAKES]
    + [(check_clipped_loss, m) for m in ck_clip.MISTAKES]
    + [(check_logprobs, m) for m in ck_lp.LOGPROB_MISTAKES]
    + [(check_shifted_logprobs, m) for m in ck_lp.SHIFT_MISTAKES]
    + [(check_masked_mean, m) for m in ck_mask.MASKED_MEAN_MISTAKES]
    + [(check_policy_loss, m) for m in ck_mask.POLICY_LOSS_MISTAKES]
    + [(check_gae, m) for m in ck_adv.GAE_MISTAKES]
    + [(check_token_rewards, m) for m in ck_rewards.MISTAKES]
)
LISTED_KL = [(est, m) for est in ("k1", "k2", "k3") for m in ck_adv.kl_mistakes(est)
             if m.wrong is not ck_adv.ESTIMATORS[est]]


def _opening(template: str) -> str:
    """The fixed text a mistake's message starts with (up to its first field)."""
    return template.split("{", 1)[0]


@pytest.mark.parametrize("checker, mistake", LISTED, ids=lambda v: getattr(getattr(v, "wrong", None), "__name__", ""))
def test_every_listed_mistake_is_named_as_itself(checker, mistake):
    with pytest.raises(AssertionError) as err:
        checker(mistake.wrong)
    assert _opening(mistake.says) in str(err.value), str(err.value)


@pytest.mark.parametrize("estimator, mistake", LISTED_KL,
                         ids=lambda v: v if isinstance(v, str) else v.wrong.__name__)
def test_every_listed_kl_mistake_is_named_as_itself(estimator, mistake):
    with pytest.raises(AssertionError) as err:
        check_kl(mistake.wrong, estimator=estimator)
    assert _opening(mistake.says) in str(err.value), str(err.value)


def test_mistake_lists_are_short_and_by_hand():
    lists = [ck_ratio.MISTAKES, ck_clip.MISTAKES, ck_lp.LOGPROB_MISTAKES, ck_lp.SHIFT_MISTAKES,
             ck_mask.MASKED_MEAN_MISTAKES, ck_mask.POLICY_LOSS_MISTAKES, ck_adv.GAE_MISTAKES, ck_rewards.MISTAKES,
             ck_adv.kl_mistakes("k3")]
    assert all(5 <= len(ms) <= 8 for ms in lists), [len(ms) for ms in lists]


# ----------------------------------------------------------------------------- more wrong answers, written here


@pytest.mark.parametrize("fn, match", [
    (lambda lp, old: (old - lp).exp(), r"inverted: got 0\.5 where pi/pi_old = 2"),
    (lambda lp, old: lp - old, "log-ratio"),
    (lambda lp, old: lp / old, "divided the log-probs"),
    (lambda lp, old: lp.exp() - old.exp(), "subtracted the probabilities"),
    (lambda lp, old: lp.exp() / old.exp(), r"exp\(log_probs\) / exp\(old_log_probs\).*underflow"),
    (lambda lp, old: (lp - old).exp().mean(), r"returned shape \[\], expected \[3\]"),
    (lambda lp, old: (lp - old.detach()).exp().detach(), "no gradient to log_probs"),
    (lambda lp, old: (lp - old).exp().tolist(), "returned list, expected a torch.Tensor"),
    (lambda lp, old: torch.zeros_like(lp), GENERIC),
    (lambda lp, old: noise_like(lp), GENERIC),
])
def test_ratio_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_ratio(fn)


def test_ratio_learner_exception_is_reported():
    def broken(lp, old):
        if lp.dim() > 1:
            raise RuntimeError("only 1-D inputs handled")
        return (lp - old).exp()
    with pytest.raises(AssertionError, match=r"case 'random \[4, 6\]'\): your function raised RuntimeError"):
        check_ratio(broken)


@pytest.mark.parametrize("fn, match", [
    (lambda r, a, e: -torch.max(r * a, r.clamp(1 - e, 1 + e) * a), "you used max instead of min"),
    (lambda r, a, e: torch.min(r * a, r.clamp(1 - e, 1 + e) * a), "sign is flipped"),
    (lambda r, a, e: -r.clamp(1 - e, 1 + e) * a, r"clipped without the min: at r=0\.5, A=1"),
    (lambda r, a, e: -r * a, "never clipped"),
    (lambda r, a, e: -torch.min(r * a, r.clamp(0.8, 1.2) * a), r"ignored clip_eps.*clip_eps=0\.1"),
    (lambda r, a, e: -torch.min(r * a, (r * a).clamp(1 - e, 1 + e)), "clipped r\\*A instead of r"),
    (lambda r, a, e: utils.clipped_surrogate(r, a, e).mean(), "elementwise"),
    (lambda r, a, e: torch.zeros_like(r), GENERIC),
    (lambda r, a, e: noise_like(r), GENERIC),
])
def test_clipped_loss_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_clipped_loss(fn)


def test_clipped_loss_no_min_message_names_the_table_row():
    # first row of the table where the min matters: A = 1, r = 0.5 < 1-eps keeps r*A = 0.5, loss -0.5;
    # clipping alone gives -clip(0.5)*1 = -0.8
    with pytest.raises(AssertionError, match=r"at r=0\.5, A=1, eps=0\.2 \(A > 0 and r < 1-eps\) the min keeps "
                                             r"the unclipped r\*A, so the loss is -0\.5; you got -0\.8"):
        check_clipped_loss(lambda r, a, e: -r.clamp(1 - e, 1 + e) * a)


@pytest.mark.parametrize("fn, match", [
    (lambda x, y: pick(x.softmax(-1), y), "probabilities"),
    (lambda x, y: pick(x, y), "raw logits"),
    (lambda x, y: -pick(x.log_softmax(-1), y), "negative log-likelihood"),
    (lambda x, y: pick(x.softmax(-1).log(), y), r"log\(softmax"),
    (lambda x, y: pick(x.log_softmax(0), y), "dim=0"),
    (lambda x, y: x.log_softmax(-1), "gather the label"),
    (lambda x, y: torch.zeros(y.shape), GENERIC),
    (lambda x, y: noise_like(y.float()), GENERIC),
])
def test_logprobs_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_logprobs(fn)


@pytest.mark.parametrize("fn, match", [
    (lambda x, y, temperature=1.0: pick(x.log_softmax(-1), y), "forgot the temperature"),
    (lambda x, y, temperature=1.0: pick((x * temperature).log_softmax(-1), y), "multiplied the logits"),
    (lambda x, y, temperature=1.0: pick(x.log_softmax(-1), y) / temperature, "divided the log-probs"),
])
def test_logprobs_temperature_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_logprobs(fn)


@pytest.mark.parametrize("fn, match", [
    (lambda x, ids: token_logprobs(x[:, :-1], ids[:, :-1]), "off by one: you scored token t with the logits at t"),
    (lambda x, ids: token_logprobs(x[:, 1:], ids[:, 1:]), "off by one: you scored token t with the logits at t"),
    (lambda x, ids: token_logprobs(x[:, 1:], ids[:, :-1]), "shifted the wrong way"),
    (lambda x, ids: token_logprobs(x, ids), r"expected \[1, 2\] = \[B, T-1\]"),
    (lambda x, ids: pick(x[:, :-1].softmax(-1), ids[:, 1:]), "probabilities"),
    (lambda x, ids, temperature=1.0: shifted_logprobs(x, ids), "forgot the temperature"),
    (lambda x, ids: torch.zeros(ids[:, 1:].shape), GENERIC),
])
def test_shifted_logprobs_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_shifted_logprobs(fn)


def _masked_mean_no_raise(x, m, dim=None):
    m = m.float()
    return (x * m).sum() / m.sum() if dim is None else (x * m).sum(dim) / m.sum(dim)


@pytest.mark.parametrize("fn, match", [
    (lambda x, m, dim=None: (x * m).sum() / x.numel() if dim is None else (x * m).sum(dim) / x.shape[dim],
     r"divided by the number of all tokens \(6\), not the kept ones \(3\)"),
    (lambda x, m, dim=None: x.mean() if dim is None else x.mean(dim), "ignored the mask"),
    (lambda x, m, dim=None: (x * m).sum() if dim is None else (x * m).sum(dim), "masked sum, not the mean"),
    (lambda x, m, dim=None: utils.masked_mean(x, m, -1).mean() if dim is None else utils.masked_mean(x, m, dim),
     "averaged the per-row means"),
    (lambda x, m, dim=None: utils.masked_mean(x, m), r"returned shape \[\], expected \[2\]"),
    (_masked_mean_no_raise, "returns nan on an empty mask instead of raising ValueError"),
    (lambda x, m, dim=None: _masked_mean_no_raise(x, m, dim) if m.any() else torch.tensor(0.0),
     r"returns 0 on an empty mask.*instead of raising ValueError"),
    (lambda x, m, dim=None: (x * m).sum() / m.sum().clamp(min=1) if dim is None
     else (x * m).sum(dim) / m.sum(dim).clamp(min=1), r"returns 0 on an empty mask"),
    (lambda x, m, dim=None: utils.masked_mean(x, m) if dim is None else (x * m).sum(dim) / m.sum(dim).clamp(min=1),
     r"returns \[.*\] when a row keeps no entry"),
    (lambda x, m, dim=None: utils.masked_mean(x, m, dim) if m.any() else 1 / 0, "raised ZeroDivisionError"),
    (lambda x, m, dim=None: torch.zeros(()) if dim is None else torch.zeros(x.shape[:-1]), GENERIC),
])
def test_masked_mean_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_masked_mean(fn)


def _pl(lp, old, adv, mask, clip_eps=0.2, *, invert=False, agg="seq"):
    r = (old - lp).exp() if invert else (lp - old).exp()
    loss = -torch.min(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    m = mask.float()
    if agg == "seq":
        return ((loss * m).sum(-1) / m.sum(-1)).mean()
    if agg == "token":
        return (loss * m).sum() / m.sum()
    if agg == "all":
        return (loss * m).sum() / m.numel()
    if agg == "nomask":
        return loss.mean()
    raise AssertionError(agg)


@pytest.mark.parametrize("fn, match", [
    (lambda *a: _pl(*a, agg="token"), r"\(token-mean\)"),
    (lambda *a: _pl(*a, agg="all"), r"divided by the number of all tokens \(T per row\), not the kept ones"),
    (lambda *a: _pl(*a, agg="nomask"), "ignored action_mask"),
    (lambda *a: _pl(*a, invert=True), "ratio is inverted"),
    (lambda *a: _pl(*a, invert=True, agg="token"), GENERIC),  # two mistakes at once: no single one matches
    (lambda lp, old, adv, mask, clip_eps=0.2: _pl(lp, old, adv, mask), r"ignored clip_eps"),
    (lambda lp, old, adv, mask, clip_eps=0.2: ((lambda r: -torch.max(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv))
                                               ((lp - old).exp()) * mask).sum(-1).div(mask.sum(-1)).mean(),
     "max instead of min"),
    (lambda *a: _pl(*a).detach(), "no gradient to log_probs"),
    (lambda *a: (_pl(*a), {}), "returned a tuple"),
    (lambda lp, old, adv, mask, clip_eps=0.2: (-(lp - old).exp() * adv * mask).sum(-1).div(mask.sum(-1)),
     r"expected \[\] = a scalar"),
    (lambda *a: torch.zeros(()), GENERIC),
    (lambda lp, *a: lp.sum() * 0 + 0.123, GENERIC),
])
def test_policy_loss_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_policy_loss(fn)


@pytest.mark.parametrize("estimator, fn, match", [
    ("k3", lambda lp, ref: lp - ref, "k1 instead of k3"),
    ("k3", lambda lp, ref: 0.5 * (lp - ref) ** 2, "k2 instead of k3"),
    ("k3", lambda lp, ref: (lp - ref).exp() - 1 - (lp - ref), "swapped log_probs and ref_log_probs"),
    ("k3", lambda lp, ref: (ref - lp).exp() - (ref - lp), "dropped the -1"),
    ("k3", lambda lp, ref: utils.kl_estimate(lp, ref, "k3").mean(), "per token"),
    ("k1", lambda lp, ref: ref - lp, "swapped"),
    ("k1", kl("k3"), "k3 instead of k1"),
    ("k2", lambda lp, ref: (lp - ref) ** 2, "dropped the 1/2"),
    ("k3", lambda lp, ref: torch.zeros_like(lp), GENERIC),
    ("k3", lambda lp, ref: noise_like(lp), GENERIC),
])
def test_kl_mistakes(estimator, fn, match):
    with pytest.raises(AssertionError, match=match):
        check_kl(fn, estimator=estimator)


def _gae_vec(r, v, gamma, lam, *, k=None, next_v="zero"):
    """Vectorised-over-batch GAE with switches for the mistakes (independent of the checker's loop)."""
    B, T = r.shape
    k = gamma * lam if k is None else k(gamma, lam)
    adv, running = torch.zeros(B, T), torch.zeros(B)
    for t in reversed(range(T)):
        if t + 1 < T:
            nv = v[:, t + 1]
        else:
            nv = {"zero": torch.zeros(B), "roll": v[:, 0], "repeat": v[:, -1]}[next_v]
        running = r[:, t] + gamma * nv - v[:, t] + k * running
        adv[:, t] = running
    return adv


@pytest.mark.parametrize("fn, match", [
    (lambda r, v, g, l: _gae_vec(r, v, g, l, k=lambda g, l: 0.0), "reset the GAE accumulator"),
    (lambda r, v, g, l: _gae_vec(r, v, g, l, k=lambda g, l: g), "used gamma instead of gamma\\*lam"),
    (lambda r, v, g, l: _gae_vec(r, v, g, l, k=lambda g, l: l), GENERIC),  # lam for gamma*lam: not listed
    (lambda r, v, g, l: _gae_vec(r, v, g, l) + v, "returns A \\+ V"),
    (lambda r, v, g, l: _gae_vec(r, v, g, l, next_v="roll"), "torch.roll wraps"),
    (lambda r, v, g, l: _gae_vec(r, v, g, l, next_v="repeat"), "bootstrapped with V_\\(T-1\\)"),
    (lambda r, v, g, l: _gae_vec(r, v, l, g), "swapped gamma and lam"),
    (lambda r, v, g, l: _gae_vec(r.flip(-1), v.flip(-1), g, l).flip(-1), GENERIC),
    (lambda r, v, g, l: torch.zeros_like(r), GENERIC),
    (lambda r, v, g, l: _gae_vec(r, v, g, l)[:, :-1], r"expected \[1, 3\] = \[B, T\]"),
])
def test_gae_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_gae(fn)


def test_gae_forward_recursion_is_named():
    def forward(r, v, gamma, lam):
        B, T = r.shape
        adv, running = torch.zeros(B, T), torch.zeros(B)
        for t in range(T):
            nv = v[:, t + 1] if t + 1 < T else torch.zeros(B)
            running = r[:, t] + gamma * nv - v[:, t] + gamma * lam * running
            adv[:, t] = running
        return adv
    with pytest.raises(AssertionError, match="forward in time"):
        check_gae(forward)


def _tr(score, kl, mask, kl_coef, *, masked=True, at="last_kept", sign=-1.0):
    m = mask.bool()
    pen = sign * kl_coef * kl
    out = torch.where(m, pen, torch.zeros_like(kl)) if masked else pen.clone()
    idx = {"last_kept": m.long().sum(-1) - 1, "last": torch.full_like(score, kl.shape[1] - 1, dtype=torch.long),
           "first": torch.zeros_like(score, dtype=torch.long)}[at]
    out[torch.arange(len(score)), idx] += score
    return out


@pytest.mark.parametrize("fn, match", [
    (lambda *a: _tr(*a, at="last"), "score placed at the last position instead of the last kept token"),
    (lambda *a: _tr(*a, at="first"), "score placed at the first token"),
    (lambda *a: _tr(*a, masked=False), "did not zero the KL penalty on masked-out tokens"),
    (lambda *a: _tr(*a, masked=False, at="last"), GENERIC),  # two mistakes at once
    (lambda *a: _tr(*a, sign=1.0), "must be subtracted"),
    (lambda s, k, m, c: _tr(s, k, m, 1.0), "forgot kl_coef"),
    (lambda s, k, m, c: torch.where(m.bool(), -c * k, 0.0) + s[:, None] * m, "every kept token"),
    (lambda s, k, m, c: torch.zeros_like(k), GENERIC),
    (lambda s, k, m, c: noise_like(k), GENERIC),
])
def test_token_rewards_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_token_rewards(fn)


def test_token_rewards_overwrite_and_one_past():
    def overwrite(s, k, m, c):
        out = torch.where(m.bool(), -c * k, torch.zeros_like(k))
        out[torch.arange(len(s)), m.long().sum(-1) - 1] = s
        return out

    def one_past(s, k, m, c):
        out = torch.where(m.bool(), -c * k, torch.zeros_like(k))
        idx = m.long().sum(-1).clamp(max=k.shape[1] - 1)
        out[torch.arange(len(s)), idx] += s
        return out

    with pytest.raises(AssertionError, match="overwrote"):
        check_token_rewards(overwrite)
    with pytest.raises(AssertionError, match="one past the last kept token"):
        check_token_rewards(one_past)


def test_checker_does_not_mutate_learner_visible_inputs():
    # a learner who writes into an input must not change what the reference sees
    def inplace_ratio(lp, old):
        return old.sub_(lp).neg_().exp_()  # overwrites old_log_probs with the ratio
    check_ratio(inplace_ratio)  # right answer, computed in place on the checker's copy
