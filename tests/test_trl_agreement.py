"""Our utils agree with what the installed TRL (pinned trl==1.16.0) computes on the same tensors.

What TRL 1.16 ships and we compare against (notebooks/09_real_trainers.ipynb walks through it):
``trl.trainer.utils.selective_log_softmax`` and ``entropy_from_logits`` (vs ``utils.logprobs``),
``trl.trainer.utils.nanstd`` (the statistic behind GRPO's reward scaling, vs ``utils.advantages.whiten``),
and the policy-loss code of ``GRPOTrainer._compute_loss`` (vs ``utils.policy_loss``), called through
``utils.trainers.trl_grpo_loss`` with a stand-in trainer object that supplies only the attributes that method reads. TRL 1.16 no longer ships
``masked_mean``/``whiten``/``masked_whiten`` (they lived in the removed ``trl/core.py``).
Everything is fp32 and offline; naive loops in float64 are the independent reference.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from trl.trainer.utils import entropy_from_logits as trl_entropy  # noqa: E402
from trl.trainer.utils import nanstd, selective_log_softmax  # noqa: E402

from utils.advantages import whiten  # noqa: E402
from utils.kl import kl_estimate  # noqa: E402
from utils.logprobs import entropy_from_logits, logprobs_from_logits  # noqa: E402
from utils.loss import aggregate, policy_loss  # noqa: E402
from utils.masking import masked_mean  # noqa: E402
from utils.trainers import trl_grpo_loss  # noqa: E402

SHAPES = [(1, 1, 11), (4, 17, 50), (2, 5, 4096), (3, 33)]  # [..., V]: last dim is the vocabulary


def _logits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(shape, generator=g)


def _labels(shape, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, shape[-1], shape[:-1], generator=g)


def _naive_logprobs(logits, labels, temperature):
    """One row at a time, float64: log softmax(logits / T)[label]."""
    flat, lab = logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
    out = [torch.log_softmax(flat[i] / temperature, -1)[lab[i]] for i in range(flat.shape[0])]
    return torch.stack(out).reshape(labels.shape)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_selective_log_softmax_matches_ours(shape, temperature):
    logits, labels = _logits(shape, 0), _labels(shape, 0)
    ours = logprobs_from_logits(logits, labels, temperature)
    theirs = selective_log_softmax(logits, labels, temperature=temperature)
    naive = _naive_logprobs(logits, labels, temperature)
    assert theirs.shape == ours.shape == labels.shape
    torch.testing.assert_close(ours.double(), naive, atol=2e-5, rtol=0)
    torch.testing.assert_close(theirs.double(), naive, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_selective_log_softmax_row_mask_is_ours_times_mask():
    logits, labels = _logits((3, 9, 40), 1), _labels((3, 9, 40), 1)
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) > 0.4
    theirs = selective_log_softmax(logits, labels, row_mask=mask)
    ours = torch.where(mask, logprobs_from_logits(logits, labels), 0.0)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
    assert bool((theirs[~mask] == 0).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entropy_matches_ours(shape):
    logits = _logits(shape, 3)
    flat = logits.reshape(-1, shape[-1]).double()
    naive = torch.stack([-(torch.softmax(r, -1) * torch.log_softmax(r, -1)).sum() for r in flat]).reshape(shape[:-1])
    ours, theirs = entropy_from_logits(logits), trl_entropy(logits)
    torch.testing.assert_close(ours.double(), naive, atol=2e-5, rtol=0)
    torch.testing.assert_close(theirs.double(), naive, atol=2e-5, rtol=0)


@pytest.mark.parametrize("B,T", [(1, 2), (4, 7), (16, 3)])
def test_nanstd_is_the_unbiased_std_our_whiten_divides_by(B, T):
    g = torch.Generator().manual_seed(B * 100 + T)
    x = 2.0 * torch.randn(B, T, generator=g) + 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask.view(-1)[:2] = True  # at least two kept entries
    kept = [float(x[b, t]) for b in range(B) for t in range(T) if mask[b, t]]
    n = len(kept)
    mean = sum(kept) / n
    naive_std = (sum((v - mean) ** 2 for v in kept) / (n - 1)) ** 0.5  # Bessel-corrected, by hand
    x_nan = torch.where(mask, x, float("nan"))  # TRL's convention: NaN marks what to ignore
    assert abs(float(nanstd(x_nan)) - naive_std) < 1e-5
    theirs = torch.where(mask, (x - torch.nanmean(x_nan)) / torch.sqrt(nanstd(x_nan) ** 2 + 1e-8), 0.0)
    torch.testing.assert_close(whiten(x, mask), theirs, atol=1e-5, rtol=0)


def test_trl_1_16_ships_no_masked_mean_or_whiten():
    """The reason the two tests above compare against nanstd: the old helpers are gone from TRL."""
    import trl.trainer.utils as tu

    assert importlib.util.find_spec("trl.core") is None
    assert not any(hasattr(tu, name) for name in ("masked_mean", "masked_var", "masked_whiten", "whiten"))


# ---------------------------------------------------------------- TRL's own GRPO loss code on our tensors


def _batch(B, T, seed, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-2.0 + 0.5 * torch.randn(B, T, generator=g)).requires_grad_()
    old = log_probs.detach() + 0.3 * torch.randn(B, T, generator=g)  # ratios spread past 1 +- 0.2
    ref = log_probs.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[0] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return log_probs, old, ref, adv, mask


def _trl_loss(log_probs, old, adv, mask, loss_type, ref=None, **kw):
    """TRL's own ``GRPOTrainer._compute_loss``, run by ``utils.trainers.trl_grpo_loss`` on our tensors."""
    return trl_grpo_loss(log_probs, old, adv, mask, loss_type, ref_log_probs=ref, **kw)


@pytest.mark.parametrize("B,T,seed", [(1, 5, 0), (4, 9, 1), (8, 16, 2)])
@pytest.mark.parametrize("loss_type,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"), ("dapo", "token-mean")])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_code_matches_policy_loss(B, T, seed, loss_type, agg, eps_high):
    log_probs, old, _, adv, mask = _batch(B, T, seed)
    theirs, metrics = _trl_loss(log_probs, old, adv, mask, loss_type, epsilon_high=eps_high)
    normalizer = float(mask.sum()) if loss_type == "dapo" else None  # dapo divides by num_items_in_batch
    ours, info = policy_loss(log_probs, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, agg=agg, normalizer=normalizer)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    g_ours, = torch.autograd.grad(ours, log_probs)
    g_theirs, = torch.autograd.grad(theirs, log_probs)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)
    assert abs(metrics["clip_ratio/region_mean"][0] - info["clip_frac"]) < 1e-6


def test_grpo_kl_term_is_our_k3():
    log_probs, old, ref, adv, mask = _batch(4, 10, 7)
    beta = 0.04
    theirs, metrics = _trl_loss(log_probs, old, adv, mask, "grpo", ref=ref, beta=beta)
    k3 = kl_estimate(log_probs, ref, "k3")
    assert abs(metrics["kl"][0] - float(masked_mean(k3.detach(), mask))) < 1e-6
    pg, _ = policy_loss(log_probs, old, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(pg + beta * aggregate(k3, mask, "seq-mean-token-mean"), theirs, atol=1e-6, rtol=1e-6)


def test_where_they_differ_empty_masks():
    """TRL clamps the token count to >= 1: an empty mask is a loss of 0, an empty row a zero-loss sequence.
    Ours refuses both (ValueError), so a batch that lost its response tokens is noticed."""
    log_probs, old, _, adv, mask = _batch(3, 6, 5, empty_row=True)
    zero = torch.zeros_like(mask)
    for loss_type in ("grpo", "bnpo"):
        assert float(_trl_loss(log_probs, old, adv, zero, loss_type)[0].detach()) == 0.0
    with pytest.raises(ValueError):
        policy_loss(log_probs, old, adv, zero)
    # one empty row: token-mean is unaffected (the row has no tokens), seq-mean counts it as a sequence of loss 0
    theirs_bnpo, _ = _trl_loss(log_probs, old, adv, mask, "bnpo")
    ours_tok, _ = policy_loss(log_probs, old, adv, mask, agg="token-mean")
    torch.testing.assert_close(ours_tok, theirs_bnpo, atol=1e-6, rtol=1e-6)
    theirs_grpo, _ = _trl_loss(log_probs, old, adv, mask, "grpo")
    per_row, _ = policy_loss(log_probs[1:], old[1:], adv[1:], mask[1:], agg="seq-mean-token-mean")
    torch.testing.assert_close(theirs_grpo, per_row * 2 / 3, atol=1e-6, rtol=1e-6)  # diluted by the empty row
    with pytest.raises(ValueError):
        policy_loss(log_probs, old, adv, mask, agg="seq-mean-token-mean")
