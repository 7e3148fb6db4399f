"""utils.kl_gradient: the exact KL gradient against autograd, each estimator's expected gradient against its
derivation, and the sampled mean against the exact expectation."""

import pytest
import torch

from utils import kl_gradient as kg


def pair(scale: float = 0.7, V: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(V, generator=g, dtype=torch.float64) * 2
    return ref + torch.randn(V, generator=g, dtype=torch.float64) * scale, ref


def autograd_kl(z, zr, reverse=False):
    z = z.clone().requires_grad_(True)
    logp, logq = z.log_softmax(-1), zr.log_softmax(-1)
    kl = (logq.exp() * (logq - logp)).sum() if reverse else (logp.exp() * (logp - logq)).sum()
    kl.backward()
    return z.grad, float(kl)


def test_exact_and_reverse_match_autograd():
    z, zr = pair()
    g, kl = autograd_kl(z, zr)
    torch.testing.assert_close(kg.exact_kl_grad(z, zr), g, rtol=0, atol=1e-14)
    assert kg.kl_exact(z, zr) == pytest.approx(kl, rel=1e-12)
    g_rev, _ = autograd_kl(z, zr, reverse=True)
    torch.testing.assert_close(kg.reverse_kl_grad(z, zr), g_rev, rtol=0, atol=1e-14)


def test_exact_gradient_is_zero_at_the_reference():
    z, _ = pair()
    assert float(kg.exact_kl_grad(z, z).abs().max()) < 1e-15
    assert kg.kl_exact(z, z) == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("estimator,target", [
    ("k1", "zero"), ("k2", "exact"), ("k3", "reverse"), ("k1*r", "exact"), ("k3*r", "exact"), ("k3+", "exact"),
])
def test_expected_gradient_is_the_derived_one(estimator, target):
    z, zr = pair()
    want = {"zero": torch.zeros_like(z), "exact": kg.exact_kl_grad(z, zr), "reverse": kg.reverse_kl_grad(z, zr)}[target]
    got = kg.expected_kl_grad(z, zr, estimator)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_biased_ones_are_biased():
    z, zr = pair()
    exact = kg.exact_kl_grad(z, zr)
    for est in ("k1", "k3", "k2*r"):
        rel = float((kg.expected_kl_grad(z, zr, est) - exact).norm() / exact.norm())
        assert rel > 0.1, est


def test_k2r_bias_is_half_d_squared():
    z, zr = pair()
    d = z.log_softmax(-1) - zr.log_softmax(-1)
    p = z.softmax(-1)
    c = 0.5 * d**2  # the extra per-sample coefficient of k2 * r over k2
    bias = p * c - p * (p * c).sum()  # E[c(x) (e_x - pi)]
    torch.testing.assert_close(kg.expected_kl_grad(z, zr, "k2*r") - kg.exact_kl_grad(z, zr), bias, rtol=0, atol=1e-14)


def test_values_of_the_loss_terms():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    lq = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    d = lp.detach() - lq
    for est in ("k1", "k1*r"):
        torch.testing.assert_close(kg.estimator_loss(lp, lq, est).detach(), d)
    for est in ("k3", "k3*r", "k3+"):  # r and the straight-through change gradients, never values
        torch.testing.assert_close(kg.estimator_loss(lp, lq, est).detach(), torch.expm1(-d) + d)


@pytest.mark.parametrize("estimator", kg.LOSS_ESTIMATORS)
def test_chain_matches_autograd_per_sample(estimator):
    z, zr = pair(V=256)
    a = kg.sampled_kl_grad(z, zr, estimator, 200, generator=torch.Generator().manual_seed(1), method="autograd")
    b = kg.sampled_kl_grad(z, zr, estimator, 200, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-11)


@pytest.mark.parametrize("estimator", ["k2", "k3", "k1*r", "k2*r"])
def test_sampled_mean_agrees_with_expectation_within_noise(estimator):
    z, zr = pair()
    mean, se = kg.sampled_kl_grad(z, zr, estimator, 40_000, generator=torch.Generator().manual_seed(2))
    s = kg.bias_summary(mean, se, kg.expected_kl_grad(z, zr, estimator))
    assert 0.5 < s["chi2"] < 2.0  # unbiased for its own expectation: squared error ~ sum of variances
    assert s["rel_bias"] < 2 * s["noise"]


def test_bias_summary_flags_a_bias():
    z, zr = pair()
    mean, se = kg.sampled_kl_grad(z, zr, "k3", 40_000, generator=torch.Generator().manual_seed(3))
    s = kg.bias_summary(mean, se, kg.exact_kl_grad(z, zr))
    assert s["chi2"] > 10 and s["rel_bias"] > 0.1


def test_errors():
    z, zr = pair()
    with pytest.raises(ValueError, match="estimator"):
        kg.estimator_loss(z[:3], zr[:3], "k4")
    with pytest.raises(ValueError, match=r"\[V\]"):
        kg.exact_kl_grad(z[None], zr[None])
    with pytest.raises(ValueError, match="non-finite"):
        kg.exact_kl_grad(torch.full_like(z, float("nan")), zr)
    with pytest.raises(ValueError, match="n must be"):
        kg.sampled_kl_grad(z, zr, "k2", 1)
    with pytest.raises(ValueError, match="method"):
        kg.sampled_kl_grad(z, zr, "k2", 10, method="fast")
    with pytest.raises(ValueError, match="target gradient is 0"):
        kg.bias_summary(z, z, torch.zeros_like(z))
