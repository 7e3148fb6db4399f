"""Tests for utils/objectives.py (the ratio family) and the aggregation modes added to utils/loss.py.

Three kinds of reference:
- a float64 reference in plain Python floats (``math.exp``, loops), whose gradient is taken by central finite
  differences with every stop-gradient term frozen at the evaluation point (so it is the surrogate's gradient);
- the trainers' own code, imported through ``utils.trainers``: verl 0.9.1 ``core_algos`` (vanilla, gspo, cispo,
  geo_mean, reinforce, agg_loss), OpenRLHF 0.11.2 ``PolicyLoss`` / ``aggregate_loss``, TRL 1.16.0
  ``GRPOTrainer._compute_loss`` (grpo, sequence level, cispo, delta, dr_grpo, dapo);
- planted bugs: each one is patched into ``utils.objectives`` and the reference check must then fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from utils import objectives as O
from utils.loss import AGGREGATIONS, TRL_LOSS_TYPES, VERL_AGG_MODES, aggregate, global_normalizer, policy_loss

# ----------------------------------------------------------------------------- data


def batch(B=4, T=7, seed=0, spread=0.3, row_adv=True, dtype=torch.float64):
    """log_probs (leaf), old_log_probs, advantages and a mask with 1..T kept tokens per row (right padding)."""
    g = torch.Generator().manual_seed(seed)
    old = -0.05 - 3 * torch.rand(B, T, generator=g, dtype=dtype)
    new = (old + spread * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_()
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone() if row_adv else torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row, so the horizon T is reached
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return new, old, adv, mask


# ----------------------------------------------------------------------------- float64 reference (Python floats)


def ref_token_values(name, lp, lp_frozen, old, adv, mask, lo, hi, delta):
    """Per-token loss values (lists of lists) at ``lp``, every sg() term evaluated at ``lp_frozen``."""
    B, T = len(lp), len(lp[0])
    rows = []
    for b in range(B):
        kept = [t for t in range(T) if mask[b][t]]
        n = len(kept)
        row = [0.0] * T
        if name in ("gspo", "gmpo"):
            if name == "gspo":
                log_s = sum(lp_frozen[b][t] - old[b][t] for t in kept) / n
            else:
                parts = []
                for t in kept:
                    lr, a = lp[b][t] - old[b][t], adv[b][t]
                    sg = (a > 0) - (a < 0)
                    lc = min(max(lr, -lo), hi)
                    parts.append(sg * min(sg * lr, sg * lc))
                a_seq = sum(adv[b][t] for t in kept) / n
                seq_loss = -a_seq * math.exp(sum(parts) / n)
        for t in range(T):
            a, lpt = adv[b][t], lp[b][t]
            r = math.exp(lpt - old[b][t])
            if name in ("ppo", "clip_higher", "delta"):
                c = min(max(r, 1 - lo), 1 + hi)
                x = min(r, delta) if name == "delta" else r
                row[t] = -min(x * a, c * a)
            elif name == "gspo":
                if not mask[b][t]:
                    s = math.exp(lpt - old[b][t])  # a padded slot: any finite value, it is masked out
                else:
                    s = math.exp(log_s + lpt - lp_frozen[b][t])  # sg(s) * pi_t / sg(pi_t)
                row[t] = -min(s * a, min(max(s, 1 - lo), 1 + hi) * a)
            elif name == "cispo":
                w = math.exp(lp_frozen[b][t] - old[b][t])
                w = min(w if lo is None else max(w, 1 - lo), 1 + hi)
                row[t] = -w * a * lpt
            elif name == "gmpo":
                row[t] = seq_loss
            else:  # reinforce
                row[t] = -a * lpt
        rows.append(row)
    return rows


def ref_aggregate(v, mask, mode, normalizer=None, horizon=None):
    """All verl / TRL reductions with loops."""
    mode = TRL_LOSS_TYPES.get(mode, mode)
    B, T = len(v), len(v[0])
    kept = [[t for t in range(T) if mask[b][t]] for b in range(B)]
    total = sum(v[b][t] for b in range(B) for t in kept[b])
    if mode == "token-sum":
        return total
    if mode == "token-mean":
        return total / (sum(len(k) for k in kept) if normalizer is None else normalizer)
    per_seq = [sum(v[b][t] for t in kept[b]) / (len(kept[b]) if mode == "seq-mean-token-mean" else 1) for b in range(B)]
    out = sum(per_seq) / (B if normalizer is None else normalizer)
    return out / (T if horizon is None else horizon) if mode == "seq-mean-token-sum-norm" else out


def reference(name, lp, old, adv, mask, agg, lo, hi, delta=None, normalizer=None, horizon=None, h=1e-6):
    """(loss, gradient) of the aggregated objective in float64 Python: the gradient by central differences."""
    L, Ol, A, M = lp.detach().tolist(), old.tolist(), adv.tolist(), mask.tolist()

    def f(x):
        return ref_aggregate(ref_token_values(name, x, L, Ol, A, M, lo, hi, delta), M, agg, normalizer, horizon)

    grad = [[0.0] * len(L[0]) for _ in L]
    for b in range(len(L)):
        for t in range(len(L[0])):
            up = [row[:] for row in L]
            dn = [row[:] for row in L]
            up[b][t] += h
            dn[b][t] -= h
            grad[b][t] = (f(up) - f(dn)) / (2 * h)
    return f(L), torch.tensor(grad, dtype=torch.float64)


SETTINGS = {  # eps chosen so that on the test data some tokens / rows clip and some do not
    "ppo": dict(clip_eps=0.2),
    "clip_higher": dict(clip_eps=0.2, clip_eps_high=0.28),
    "delta": dict(clip_eps=0.2, delta=1.3),
    "gspo": dict(clip_eps=0.05, clip_eps_high=0.08),
    "cispo": dict(clip_eps=None, clip_eps_high=0.2),
    "gmpo": dict(clip_eps=0.2, clip_eps_high=0.25),
    "reinforce": dict(),
}


def _lo_hi(name):
    obj, lo, hi, dlt = O._settings(name, SETTINGS[name].get("clip_eps"), SETTINGS[name].get("clip_eps_high"),
                                   SETTINGS[name].get("delta"))
    return lo, hi, dlt


def check_against_reference(name, seed, agg, row_adv=True):
    lp, old, adv, mask = batch(seed=seed, row_adv=row_adv)
    loss, _ = O.objective_loss(name, lp, old, adv, mask, agg=agg, **SETTINGS[name])
    grad, = torch.autograd.grad(loss, lp)
    lo, hi, dlt = _lo_hi(name)
    ref_loss, ref_grad = reference(name, lp, old, adv, mask, agg, lo, hi, dlt)
    assert abs(float(loss.detach()) - ref_loss) < 1e-9, (name, float(loss.detach()), ref_loss)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(O.OBJECTIVES))
def test_against_float64_reference(name, seed, agg):
    check_against_reference(name, seed, agg)


@pytest.mark.parametrize("name", ["ppo", "clip_higher", "delta", "cispo", "reinforce"])
def test_token_objectives_with_per_token_advantages(name):
    check_against_reference(name, 3, "token-mean", row_adv=False)


def test_settings_clip_on_the_test_data():
    """The reference tests would be weak if nothing clipped (or everything did): check both happen."""
    for name in ("ppo", "clip_higher", "delta", "gspo", "cispo", "gmpo"):
        fracs = []
        for seed in (0, 1, 2):
            lp, old, adv, mask = batch(seed=seed)
            fracs.append(O.objective_loss(name, lp, old, adv, mask, **SETTINGS[name])[1]["clip_frac"])
        assert 0 < max(fracs) and min(fracs) < 1, (name, fracs)


# ----------------------------------------------------------------------------- claims the notebook makes


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_every_ratio_gives_the_reinforce_gradient_on_policy(agg):
    """At r = 1 (first epoch) every member's gradient equals REINFORCE's (group advantages: one per row)."""
    lp, _, adv, mask = batch(seed=4)
    old = lp.detach().clone()
    ref, = torch.autograd.grad(O.objective_loss("reinforce", lp, old, adv, mask, agg=agg)[0], lp)
    for name in O.OBJECTIVES:
        g, = torch.autograd.grad(O.objective_loss(name, lp, old, adv, mask, agg=agg)[0], lp)
        torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-10, msg=name)


def test_delta_equals_dual_clip():
    """TRL's two-sided delta and the dual-clip of utils.loss give the same loss and gradient."""
    lp, old, adv, mask = batch(seed=5, spread=0.6, row_adv=False)
    a, _ = O.objective_loss("delta", lp, old, adv, mask, clip_eps=0.2, delta=1.5, agg="token-mean")
    b, _ = policy_loss(lp, old, adv, mask, clip_eps=0.2, dual_clip=1.5, agg="token-mean")
    ga, = torch.autograd.grad(a, lp)
    gb, = torch.autograd.grad(b, lp)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_ppo_matches_policy_loss():
    lp, old, adv, mask = batch(seed=6, row_adv=False)
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
        a, ia = O.objective_loss("clip_higher", lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, agg=agg)
        b, ib = policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, agg=agg)
        torch.testing.assert_close(a, b)
        assert abs(ia["clip_frac"] - ib["clip_frac"]) < 1e-7  # the same fraction, summed in fp32 in two orders


def test_cispo_never_zeroes_a_gradient():
    """PPO's clip zeroes the gradient of clipped tokens; CISPO's only caps their weight."""
    lp, old, adv, mask = batch(seed=7, spread=0.6, row_adv=False)
    g_ppo, = torch.autograd.grad(O.objective_loss("ppo", lp, old, adv, mask, agg="token-sum")[0], lp)
    g_cis, = torch.autograd.grad(O.objective_loss("cispo", lp, old, adv, mask, agg="token-sum")[0], lp)
    assert bool((g_ppo[mask] == 0).any())
    assert bool((g_cis[mask] != 0).all())
    r = (lp - old).exp().detach()
    assert bool((g_cis[mask].abs() <= (adv.abs() * 1.2)[mask] + 1e-12).all())  # |weight| <= 1 + eps_high


def test_objective_module_matches_function():
    lp, old, adv, mask = batch(seed=8)
    mod = O.ObjectiveLoss("gspo", clip_eps=0.05, clip_eps_high=0.08)
    a = mod(lp, old, adv, mask)
    b, info = O.objective_loss("gspo", lp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.08)
    torch.testing.assert_close(a, b)
    assert mod.last_info == info and "gspo" in repr(mod)


def test_registry_names_sources():
    for name, obj in O.OBJECTIVES.items():
        assert obj.name == name and "@" in obj.source and obj.agg in AGGREGATIONS


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ppo2"), "objective must be one of"),
    (dict(name="ppo", clip_eps=1.5), "clip_eps"),
    (dict(name="ppo", clip_eps=-0.1), "clip_eps"),
    (dict(name="ppo", clip_eps_high=float("nan")), "clip_eps_high"),
    (dict(name="delta", delta=1.1), "delta must be >"),
    (dict(name="ppo", delta=3.0), "delta is the 'delta'"),
    (dict(name="gspo", agg="mean"), "agg must be one of"),
])
def test_bad_settings_raise(kwargs, match):
    lp, old, adv, mask = batch(seed=0)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        O.objective_loss(name, lp, old, adv, mask, **kwargs)


def test_bad_tensors_raise():
    lp, old, adv, mask = batch(seed=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        O.objective_loss("ppo", lp, old[:, :3], adv, mask)
    bad = old.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        O.objective_loss("cispo", lp, bad, adv, mask)
    with pytest.raises(ValueError, match="empty"):
        O.objective_loss("gspo", lp, old, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="overflow"):
        O.objective_loss("ppo", lp, old - 200.0, adv, mask)
    with pytest.raises(ValueError):  # a row with no token: the sequence ratio is undefined
        m = mask.clone()
        m[1] = False
        O.objective_loss("gspo", lp, old, adv, m)


# ----------------------------------------------------------------------------- aggregation (utils/loss.py additions)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_modes_against_loops(mode):
    lp, old, adv, mask = batch(seed=9)
    v = torch.randn(lp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = aggregate(v, mask, mode)
    assert abs(float(ours) - ref_aggregate(v.tolist(), mask.tolist(), mode)) < 1e-12


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_the_global_normalizer_add_up(mode):
    """Two micro-batches with unequal token counts: with global_normalizer their losses (and gradients) add up
    to the full batch's; token-mean without it (a mean of micro-batch means) does not."""
    lp, old, adv, mask = batch(B=6, T=9, seed=10)
    per_tok = O.per_token_loss("ppo", lp, old, adv, mask)
    full = aggregate(per_tok, mask, mode, horizon=9 if TRL_LOSS_TYPES.get(mode, mode) == "seq-mean-token-sum-norm" else None)
    parts = [slice(0, 2), slice(2, 6)]
    assert int(mask[parts[0]].sum()) != int(mask[parts[1]].sum())
    norm = global_normalizer([mask[p] for p in parts], mode)
    horizon = 9 if TRL_LOSS_TYPES.get(mode, mode) == "seq-mean-token-sum-norm" else None
    summed = sum(aggregate(per_tok[p], mask[p], mode, norm, horizon) for p in parts)
    torch.testing.assert_close(summed, full, atol=1e-12, rtol=1e-12)
    g_full, = torch.autograd.grad(full, lp, retain_graph=True)
    g_sum, = torch.autograd.grad(summed, lp)
    torch.testing.assert_close(g_sum, g_full, atol=1e-12, rtol=1e-12)


def test_local_mean_breaks_micro_batching():
    lp, old, adv, mask = batch(B=6, T=9, seed=10)
    per_tok = O.per_token_loss("ppo", lp, old, adv, mask)
    full = aggregate(per_tok, mask, "token-mean")
    local = sum(aggregate(per_tok[p], mask[p], "token-mean") for p in (slice(0, 2), slice(2, 6))) / 2
    assert abs(float(full - local)) > 1e-3


def test_default_horizon_follows_the_padded_width():
    """seq-mean-token-sum-norm divides by T by default: a micro-batch trimmed to its own width changes it."""
    v = torch.ones(2, 8, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    assert float(aggregate(v, mask, "seq-mean-token-sum-norm")) == 3 / 8
    assert float(aggregate(v[:, :3], mask[:, :3], "seq-mean-token-sum-norm")) == 1.0
    assert float(aggregate(v[:, :3], mask[:, :3], "dr_grpo", horizon=8)) == 3 / 8


def test_aggregate_new_mode_errors():
    v, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="token-sum"):
        aggregate(v, mask, "token-sum", normalizer=4.0)
    with pytest.raises(ValueError, match="horizon"):
        aggregate(v, mask, "token-mean", horizon=3)
    with pytest.raises(ValueError, match="horizon"):
        aggregate(v, mask, "dr_grpo", horizon=0)
    with pytest.raises(ValueError, match="agg must be one of"):
        global_normalizer(mask, "mean")
    with pytest.raises(ValueError, match="keep no token"):
        global_normalizer(torch.zeros(2, 3, dtype=torch.bool), "dapo")
    assert global_normalizer(mask, "token-sum") is None
    assert global_normalizer([mask, mask[:1]], "grpo") == 3.0
    assert global_normalizer([mask, mask[:1]], "dapo") == 9.0


# ----------------------------------------------------------------------------- the trainers' own code

trainers = pytest.importorskip("utils.trainers")


def _verl():
    try:
        return trainers.verl_core_algos()
    except ModuleNotFoundError as err:
        pytest.skip(f"verl not importable: {err}")


def _verl_cfg(**kw):
    return trainers.verl_actor_config(**kw)


def _f32(*ts):
    return [t.float() if t.is_floating_point() else t for t in ts]


def _f32_batch(seed, row_adv=True, B=5, T=8, spread=0.3):
    lp, old, adv, mask = batch(B=B, T=T, seed=seed, row_adv=row_adv, spread=spread)
    return lp.detach().float().requires_grad_(), old.float(), adv.float(), mask


def _both(ours, theirs, lp):
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    g1, = torch.autograd.grad(ours, lp, retain_graph=True)
    g2, = torch.autograd.grad(theirs, lp, retain_graph=True)
    torch.testing.assert_close(g1, g2, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", VERL_AGG_MODES)
def test_verl_agg_loss(mode, seed):
    ca = _verl()
    lp, old, adv, mask = _f32_batch(seed)
    v = O.per_token_loss("ppo", lp, old, adv, mask)
    _both(aggregate(v, mask, mode), ca.agg_loss(v, mask.float(), mode), lp)
    # the global values: verl's batch_num_tokens / global_batch_size / loss_scale_factor
    kw = {"token-mean": dict(batch_num_tokens=50)}.get(mode, {} if mode == "token-sum" else dict(global_batch_size=9))
    norm = kw.get("batch_num_tokens", kw.get("global_batch_size"))
    horizon = 12 if mode == "seq-mean-token-sum-norm" else None
    if horizon:
        kw["loss_scale_factor"] = horizon
    _both(aggregate(v, mask, mode, norm, horizon), ca.agg_loss(v, mask.float(), mode, **kw), lp)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,cfg,fn", [
    ("ppo", dict(clip_ratio=0.2, clip_ratio_c=1e9), "compute_policy_loss_vanilla"),
    ("clip_higher", dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1e9), "compute_policy_loss_vanilla"),
    ("delta", dict(clip_ratio=0.2, clip_ratio_c=1.3), "compute_policy_loss_vanilla"),  # verl's dual-clip c = delta
    ("gspo", dict(clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.08), "compute_policy_loss_gspo"),
    ("cispo", dict(clip_ratio=0.2, clip_ratio_low=10.0, clip_ratio_high=0.2), "compute_policy_loss_cispo"),
    ("gmpo", dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.25), "compute_policy_loss_geo_mean"),
    ("reinforce", dict(), "compute_policy_loss_reinforce"),
])
def test_verl_policy_losses(name, cfg, fn, seed):
    ca = _verl()
    lp, old, adv, mask = _f32_batch(seed, spread=0.4)
    agg = "seq-mean-token-mean" if name in ("gspo", "gmpo") else "token-mean"
    theirs, _ = getattr(ca, fn)(old, lp, adv, mask.float(), loss_agg_mode=agg, config=_verl_cfg(**cfg))
    ours, _ = O.objective_loss(name, lp, old, adv, mask, agg=agg, **SETTINGS[name])
    _both(ours, theirs, lp)


def _openrlhf():
    try:
        return trainers.openrlhf_loss()
    except ModuleNotFoundError as err:
        pytest.skip(f"openrlhf not importable: {err}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,kind,token_level", [
    ("ppo", "ppo", True), ("clip_higher", "ppo", False), ("gspo", "gspo", False),
])
def test_openrlhf_policy_loss(name, kind, token_level, seed):
    L = _openrlhf()
    lp, old, adv, mask = _f32_batch(seed, spread=0.4)
    s = SETTINGS[name]
    lo = s["clip_eps"]
    hi = s.get("clip_eps_high", lo)
    theirs = L.PolicyLoss(lo, hi, token_level_loss=token_level, policy_loss_type=kind)(lp, old, adv, mask.float())[0]
    agg = "token-mean" if token_level else "seq-mean-token-mean"
    ours, _ = O.objective_loss(name, lp, old, adv, mask, agg=agg, **s)
    _both(ours, theirs, lp)


def _trl(lp, old, adv_rows, mask, loss_type, epsilon=0.2, epsilon_high=None, delta=None, level="token",
         max_completion_length=None, num_items=None):
    """TRL's GRPOTrainer._compute_loss on our tensors, with the harness of utils.trainers plus the settings used here."""
    harness = trainers._GRPOLossHarness(lp, loss_type, epsilon, epsilon_high, 0.0)
    harness.args.delta = delta
    harness.importance_sampling_level = level
    harness.max_completion_length = max_completion_length
    B, T = lp.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv_rows, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    return trainers.trl_grpo()._compute_loss(harness, None, inputs)


@pytest.mark.parametrize("seed", [0, 1])
def test_trl_loss_types(seed):
    lp, old, adv, mask = _f32_batch(seed, spread=0.4)
    rows = adv[:, 0]  # TRL's advantages: one per completion, [B]
    # token ratio, grpo (seq-mean-token-mean) with clip-higher
    _both(O.objective_loss("clip_higher", lp, old, adv, mask, agg="grpo")[0],
          _trl(lp, old, rows, mask, "grpo", 0.2, 0.28), lp)
    # two-sided delta
    _both(O.objective_loss("delta", lp, old, adv, mask, clip_eps=0.2, delta=1.3, agg="grpo")[0],
          _trl(lp, old, rows, mask, "grpo", 0.2, delta=1.3), lp)
    # sequence level = GSPO
    _both(O.objective_loss("gspo", lp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.08, agg="grpo")[0],
          _trl(lp, old, rows, mask, "grpo", 0.05, 0.08, level="sequence"), lp)
    # cispo: TRL's epsilon_high is the bound on r itself (1 + our clip_eps_high), no lower bound
    _both(O.objective_loss("cispo", lp, old, adv, mask, clip_eps_high=0.2, agg="dapo", normalizer=float(mask.sum()))[0],
          _trl(lp, old, rows, mask, "cispo", 0.2, 1.2), lp)
    # dr_grpo: divide by B * max_completion_length
    _both(O.objective_loss("ppo", lp, old, adv, mask, agg="dr_grpo", horizon=20)[0],
          _trl(lp, old, rows, mask, "dr_grpo", max_completion_length=20), lp)
    # dapo with a global token count larger than this micro-batch's
    _both(O.objective_loss("ppo", lp, old, adv, mask, agg="dapo", normalizer=77.0)[0],
          _trl(lp, old, rows, mask, "dapo", num_items=77), lp)


# ----------------------------------------------------------------------------- planted bugs


def _bug_cispo_no_sg(log_probs, old_log_probs, advantages, clip_eps=None, clip_eps_high=0.2):
    ratio = O.token_log_ratio(log_probs, old_log_probs).exp()
    low = None if clip_eps is None else 1 - clip_eps
    return -ratio.clamp(min=low, max=1 + clip_eps_high) * advantages * log_probs  # forgot .detach()


def _bug_gspo_sum(log_probs, old_log_probs, action_mask):
    log_s = (O.token_log_ratio(log_probs, old_log_probs) * action_mask).sum(-1)  # a sum, not the mean
    return log_probs - log_probs.detach() + log_s.detach()[:, None]


def _bug_gspo_pads(log_probs, old_log_probs, action_mask):
    log_s = O.token_log_ratio(log_probs, old_log_probs).mean(-1)  # the mean runs over the padding too
    return log_probs - log_probs.detach() + log_s.detach()[:, None]


def _bug_ppo_max(log_probs, old_log_probs, advantages, clip_eps=0.2, clip_eps_high=None, delta=None):
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = O.token_log_ratio(log_probs, old_log_probs).exp()
    return -torch.max(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + eps_high) * advantages)  # optimistic


def _bug_gmpo_plain_clip(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.4, clip_eps_high=0.4):
    log_r = O.token_log_ratio(log_probs, old_log_probs).clamp(-clip_eps, clip_eps_high)  # both sides, whatever A's sign
    adv_seq = (advantages * action_mask).sum(-1) / action_mask.sum(-1)
    ratio_seq = ((log_r * action_mask).sum(-1) / action_mask.sum(-1)).exp()
    return (-adv_seq * ratio_seq)[:, None].expand_as(log_probs)


@pytest.mark.parametrize("attr,bug,name", [
    ("cispo_token_loss", _bug_cispo_no_sg, "cispo"),
    ("sequence_log_ratio", _bug_gspo_sum, "gspo"),
    ("sequence_log_ratio", _bug_gspo_pads, "gspo"),
    ("ppo_token_loss", _bug_ppo_max, "clip_higher"),
    ("gmpo_token_loss", _bug_gmpo_plain_clip, "gmpo"),
])
def test_planted_bugs_fail_the_reference(monkeypatch, attr, bug, name):
    monkeypatch.setattr(O, attr, bug)
    failures = 0
    for seed in (0, 1, 2):
        try:
            check_against_reference(name, seed, "seq-mean-token-mean")
        except AssertionError:
            failures += 1
    assert failures >= 1, f"the planted bug in {attr} went unnoticed"


def test_gspo_two_forms_agree_for_row_advantages():
    """verl writes s as sg(s) pi_t / sg(pi_t); OpenRLHF and TRL differentiate exp(mean_t log r_t) itself. With one
    advantage per row (GRPO's) the gradients are equal; with per-token advantages they are not."""
    def through_mean(lp, old, adv, mask):
        s = ((lp - old) * mask).sum(-1).div(mask.sum(-1)).exp()[:, None]
        return aggregate(-torch.min(s * adv, s.clamp(1 - 0.05, 1 + 0.08) * adv), mask, "seq-mean-token-mean")
    for row_adv, equal in ((True, True), (False, False)):
        lp, old, adv, mask = batch(seed=11, row_adv=row_adv, spread=0.1)
        g1, = torch.autograd.grad(O.objective_loss("gspo", lp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.08)[0], lp)
        g2, = torch.autograd.grad(through_mean(lp, old, adv, mask), lp)
        assert torch.allclose(g1, g2, atol=1e-12) == equal


@pytest.mark.parametrize("seed", [0, 1])
def test_trl_grpo_loss_settings(seed):
    """utils.trainers.trl_grpo_loss passes delta, num_items_in_batch, max_completion_length and the sequence level on."""
    lp, old, adv, mask = _f32_batch(seed, spread=0.4)
    rows = adv[:, 0]
    run = trainers.trl_grpo_loss
    _both(O.objective_loss("delta", lp, old, adv, mask, clip_eps=0.2, delta=1.3, agg="grpo")[0],
          run(lp, old, rows, mask, "grpo", delta=1.3)[0], lp)
    _both(O.objective_loss("ppo", lp, old, adv, mask, agg="dapo", normalizer=77.0)[0],
          run(lp, old, rows, mask, "dapo", num_items_in_batch=77)[0], lp)
    _both(O.objective_loss("ppo", lp, old, adv, mask, agg="dr_grpo", horizon=20)[0],
          run(lp, old, rows, mask, "dr_grpo", max_completion_length=20)[0], lp)
    _both(O.objective_loss("ppo", lp, old, adv, mask, agg="dr_grpo")[0],  # default horizon: the padded width T
          run(lp, old, rows, mask, "dr_grpo")[0], lp)
    _both(O.objective_loss("gspo", lp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.08, agg="grpo")[0],
          run(lp, old, rows, mask, "grpo", epsilon=0.05, epsilon_high=0.08, importance_sampling_level="sequence")[0], lp)
