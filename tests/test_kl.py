"""utils.kl: the k1/k2/k3 estimators against naive formulas, hand values, and the true KL."""

import math

import pytest
import torch

from utils.kl import KL_ESTIMATORS, kl_estimate, kl_from_logits


def naive(logp: float, ref: float, estimator: str) -> float:
    """Schulman's formulas written with r = pi_ref / pi, one number at a time."""
    r = math.exp(ref - logp)
    return {"k1": -math.log(r), "k2": 0.5 * math.log(r) ** 2, "k3": (r - 1) - math.log(r)}[estimator]


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_matches_naive_formula(estimator):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 5
    ref = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 5
    got = kl_estimate(logp, ref, estimator)
    rows = zip(logp.tolist(), ref.tolist())
    want = torch.tensor([[naive(a, b, estimator) for a, b in zip(ra, rb)] for ra, rb in rows], dtype=torch.float64)
    assert got.shape == logp.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hand_values():
    # pi(x) = 1/2, pi_ref(x) = 1/4: log_ratio = log 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    l2 = math.log(2)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(l2)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * l2**2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + l2)  # r = 1/2
    # the same token under swapped models: k1 flips sign, k3 does not
    assert kl_estimate(ref, logp, "k1").item() == pytest.approx(-l2)
    assert kl_estimate(ref, logp, "k3").item() == pytest.approx(2 - 1 - l2)
    # identical models: every estimator is exactly 0
    same = torch.tensor([-1.3, -0.2])
    for est in KL_ESTIMATORS:
        assert torch.equal(kl_estimate(same, same, est), torch.zeros(2))


def test_k3_and_k2_nonnegative_k1_can_be_negative():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(10_000, generator=g) * 3
    ref = torch.randn(10_000, generator=g) * 3
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())
    assert bool((kl_estimate(logp, ref, "k2") >= 0).all())
    assert bool((kl_estimate(logp, ref, "k1") < 0).any())


def test_k3_small_log_ratio_is_accurate():
    # exp(x) - 1 + ... cancels catastrophically in float32 for tiny x; expm1 keeps ~x^2/2
    x = torch.tensor([1e-4], dtype=torch.float32)
    got = kl_estimate(x, torch.zeros(1), "k3").item()
    assert got == pytest.approx(0.5e-8, rel=1e-3)


def test_unbiasedness_on_a_categorical():
    """Means of k1 and k3 over samples x ~ pi match the exact KL(pi || pi_ref); k2 does not in general."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), -1)
    q = torch.softmax(torch.randn(6, generator=g), -1)
    exact = float((p * (p.log() - q.log())).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[x].double(), q.log()[x].double()
    for est in ("k1", "k3"):
        vals = kl_estimate(logp, ref, est)
        se = float(vals.std() / math.sqrt(len(vals)))
        assert abs(float(vals.mean()) - exact) < 4 * se + 1e-9, est
    # k3 has lower variance than k1 when pi and pi_ref are close
    q_close = torch.softmax(p.log() + 0.1 * torch.randn(6, generator=g), -1)
    k1 = kl_estimate(logp, q_close.log()[x].double(), "k1")
    k3 = kl_estimate(logp, q_close.log()[x].double(), "k3")
    assert float(k3.var()) < float(k1.var())


def test_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(a, a, "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        kl_estimate(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError, match="overflow"):
        kl_estimate(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")


def test_half_precision_is_upcast():
    logp = torch.tensor([-0.5, -2.0], dtype=torch.bfloat16)
    ref = torch.tensor([-1.0, -1.0], dtype=torch.bfloat16)
    assert kl_estimate(logp, ref, "k3").dtype == torch.float32


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(estimator, dtype):
    g = torch.Generator().manual_seed(0)
    lp, ref = (-3 * torch.rand(4, 8, generator=g)).to(dtype), (-3 * torch.rand(4, 8, generator=g)).to(dtype)
    out = kl_estimate(lp, ref, estimator)
    assert out.dtype == torch.float32  # exp of a half-precision log-ratio would be coarse
    torch.testing.assert_close(out, kl_estimate(lp.float(), ref.float(), estimator))


# ----------------------------------------------------------------------------- kl_from_logits


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_exact_kl_from_logits_matches_the_sum_over_the_vocabulary(temperature):
    # KL(pi || pi_ref) = sum_x pi(x) (log pi(x) - log pi_ref(x)), pi = softmax(logits / tau), in float64 by hand
    g = torch.Generator().manual_seed(5)
    a, b = 2 * torch.randn(4, 3, 11, generator=g), 2 * torch.randn(4, 3, 11, generator=g)
    p, q = (a.double() / temperature).softmax(-1), (b.double() / temperature).softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1)
    got = kl_from_logits(a, b, temperature)
    assert got.shape == (4, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the direction matters (KL is not symmetric), and so does the temperature
    assert float((kl_from_logits(b, a, temperature).double() - want).abs().max()) > 1e-2
    if temperature != 1.0:
        assert float((kl_from_logits(a, b).double() - want).abs().max()) > 1e-2
    torch.testing.assert_close(kl_from_logits(a, a, temperature), torch.zeros(4, 3))


def test_exact_kl_from_logits_validates():
    a = torch.randn(2, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_from_logits(a, a[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        kl_from_logits(a, a, 0.0)
    bad = a.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kl_from_logits(a, bad)
