"""docs/anchors.md stays checkable: every claim names a commit, every test it names exists, and the claims
that the installed wheels (verl 0.9.1, openrlhf 0.11.2, trl 1.16.0, through utils.trainers) can answer are
checked on their behaviour here.

Part 1 parses the document: claim tables are the tables whose header has an "as of" column; the commits
allowed there are those of the tables under "## Commits". Part 2 runs the trainers' own functions.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from utils import trainers

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "anchors.md"
SHA = re.compile(r"\b[0-9a-f]{7,40}\b")
TEST_REF = re.compile(r"(tests/test_\w+\.py)::(\w+)")


# ---------------------------------------------------------------- part 1: the document


def _tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every Markdown table as (section heading, header cells, body rows of cells)."""
    tables, section, header, rows = [], "", None, []
    for line in text.splitlines() + [""]:
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        if header is not None:
            tables.append((section, header, rows))
        header, rows = None, []
    return tables


def listed_commits(text: str) -> set[str]:
    """The commits of the tables under "## Commits"."""
    out = set()
    for section, header, rows in _tables(text):
        if section == "Commits" and "commit" in header:
            out |= {row[header.index("commit")] for row in rows}
    return out


def claim_problems(text: str) -> list[str]:
    """Claim rows whose "as of" cell lacks a listed commit or a line, whose cells are miscounted, or whose
    text names a commit the header does not list."""
    allowed, problems = listed_commits(text), []
    for section, header, rows in _tables(text):
        if "as of" not in header:
            continue
        col = header.index("as of")
        for row in rows:
            where = f"§{section}: {' | '.join(row[:3])}"
            if len(row) != len(header):
                problems.append(f"{where}: {len(row)} cells, header has {len(header)}")
                continue
            shas = SHA.findall(row[col])
            if not shas or not row[col].startswith(shas[0]):
                problems.append(f"{where}: 'as of' is {row[col]!r}, not a commit")
            elif not re.search(r"\bL\d+", row[col]) and "L1-" not in row[col]:
                problems.append(f"{where}: 'as of' {row[col]!r} names no line")
            unknown = {s for cell in row for s in SHA.findall(cell)} - allowed
            if unknown:
                problems.append(f"{where}: commits {sorted(unknown)} are not in the header tables")
    return problems


def missing_tests(text: str, root: Path = ROOT) -> list[str]:
    """``tests/test_x.py::name`` references whose file or top-level function does not exist."""
    missing = []
    for path, name in sorted(set(TEST_REF.findall(text))):
        file = root / path
        if not file.exists():
            missing.append(f"{path} (no such file)")
            continue
        names = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, ast.FunctionDef)}
        if name not in names:
            missing.append(f"{path}::{name}")
    return missing


TEXT = DOC.read_text()


def test_header_lists_the_snapshots_and_the_wheels():
    commits = listed_commits(TEXT)
    assert {"1dda039b", "3c3be623", "f2cd5771", "45b4b715", "83757d9c"} <= commits
    for dist, pin in trainers.PINS.items():  # the wheels named are the ones the shim pins and that are installed
        assert f"{dist} {pin}" in TEXT and version(dist) == pin


def test_every_claim_row_has_an_as_of_commit():
    rows = sum(len(rows) for _, header, rows in _tables(TEXT) if "as of" in header)
    assert rows >= 60  # the claim tables were found at all
    assert claim_problems(TEXT) == []


def test_every_named_test_exists():
    assert len(set(TEST_REF.findall(TEXT))) >= 20
    assert missing_tests(TEXT) == []


def test_the_checks_catch_planted_bugs(tmp_path):
    """A row without a commit, an unknown commit, a missing cell and a misspelt test are all reported."""
    row = next(line for line in TEXT.splitlines() if "| `masked_var(values, mask, unbiased=True)` |" in line)
    no_commit = TEXT.replace(row, row.replace("1dda039b L311-326", "L311-326"))
    assert any("not a commit" in p for p in claim_problems(no_commit))
    unknown = TEXT.replace(row, row.replace("1dda039b", "deadbeef"))
    assert any("deadbeef" in p for p in claim_problems(unknown))
    short = TEXT.replace(row, row.replace(" | 0.9.1: identical", "", 1))
    assert any("cells" in p for p in claim_problems(short))
    misspelt = TEXT.replace("test_verl_masked_var_refuses_fewer_than_two", "test_verl_masked_var_refuses")
    assert missing_tests(misspelt) == ["tests/test_anchors.py::test_verl_masked_var_refuses"]
    (tmp_path / "tests").mkdir()
    assert "tests/test_anchors.py (no such file)" in missing_tests(TEXT, tmp_path)


# ---------------------------------------------------------------- part 2: the claims, on the wheels' code

# (installed file, line, text that line holds): the wheel lines the claim tables cite, read in the installed files
WHEEL_LINES = [
    ("verl/trainer/ppo/core_algos.py", 1286, "def compute_policy_loss_vanilla("),
    ("verl/trainer/ppo/core_algos.py", 1338, "torch.clamp(negative_approx_kl, min=-20.0, max=20.0)"),
    ("verl/trainer/ppo/core_algos.py", 1140, "def agg_loss("),
    ("verl/trainer/ppo/core_algos.py", 262, "verl_F.masked_whiten(advantages, response_mask)"),
    ("verl/trainer/ppo/core_algos.py", 2188, "def kl_penalty("),  # one line lower than 1dda039b's L2187
    ("verl/trainer/ppo/core_algos.py", 2245, "torch.clamp(kld, min=-10, max=10)"),
    ("verl/utils/torch_functional.py", 308, "+ 1e-8)"),
    ("verl/utils/torch_functional.py", 343, "torch.rsqrt(var + 1e-8)"),
    ("verl/trainer/config/actor/actor.yaml", 83, "clip_ratio_c: 3.0"),
    ("verl/trainer/config/actor/actor.yaml", 86, "loss_agg_mode: token-mean"),
    ("openrlhf/models/loss.py", 187, "raw_policy_log_ratio.clamp(min=-20.0, max=20.0)"),
    ("openrlhf/models/loss.py", 36, "(token_counts > 0)"),
    ("openrlhf/models/utils.py", 108, "log_ratio.clamp(min=-10)"),
    ("openrlhf/models/utils.py", 113, "value.clamp(min=-10, max=10)"),
    ("openrlhf/models/utils.py", 154, "eos_indices = "),
    ("openrlhf/models/utils.py", 199, "def masked_mean("),
    ("openrlhf/models/utils.py", 205, "def masked_normalize("),
    ("openrlhf/cli/train_ppo_ray.py", 406, '"--actor.eps_clip", type=float, default=0.2'),
    ("openrlhf/cli/train_ppo_ray.py", 410, '"--algo.advantage.lambd", type=float, default=1'),
    ("openrlhf/cli/train_ppo_ray.py", 449, '"--algo.kl.estimator"'),
    ("openrlhf/cli/train_ppo_ray.py", 524, '"--algo.kl.use_loss", action="store_true", default=False'),
    ("trl/trainer/grpo_config.py", 453, "disable_dropout: bool"),
    ("trl/trainer/grpo_config.py", 454, "default=False"),
    ("trl/trainer/grpo_config.py", 682, "default=0.0"),
    ("trl/trainer/grpo_config.py", 694, "default=0.2"),
    ("trl/trainer/grpo_config.py", 802, 'default="dapo"'),
    ("trl/trainer/grpo_config.py", 926, "default=True"),
    ("trl/trainer/utils.py", 194, "def disable_dropout_in_model("),
]


@pytest.mark.parametrize("path,line,text", WHEEL_LINES, ids=[f"{p}:{n}" for p, n, _ in WHEEL_LINES])
def test_wheel_lines(path, line, text):
    """Each cited wheel line holds the code the claim describes, in the installed package."""
    package = importlib.util.find_spec(path.split("/")[0]).submodule_search_locations[0]
    source = (Path(package).parent / path).read_text().splitlines()
    assert text in source[line - 1], f"{path} L{line} is {source[line - 1].strip()!r}"
    ranges = [(int(a), int(b or a)) for a, b in re.findall(r"\bL(\d+)(?:-(\d+))?", TEXT)]
    assert any(a <= line <= b for a, b in ranges)  # the doc cites that line (alone or in a range)



core, vF = trainers.verl_core_algos(), trainers.verl_functional()
olf_loss, olf_utils = trainers.openrlhf_loss(), trainers.openrlhf_utils()


def test_verl_clamps_the_log_ratio():
    """§3: a log-ratio of 50 gives verl a finite loss, the one of a log-ratio of 20 (no dual clip for A > 0)."""
    lp, one = torch.zeros(1, 1, requires_grad=True), torch.ones(1, 1)
    loss, _ = core.compute_policy_loss_vanilla(torch.full((1, 1), -50.0), lp, -one, one, config=trainers.verl_actor_config())
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(3.0)  # A < 0: capped by the dual clip at -c*A
    loss, _ = core.compute_policy_loss_vanilla(torch.full((1, 1), 50.0), lp, one, one, config=trainers.verl_actor_config())
    assert float(loss.detach()) == pytest.approx(-float(torch.tensor(-20.0).exp()))  # A > 0, ratio e^-50 -> e^-20
    assert float(torch.autograd.grad(loss, lp)[0]) == 0.0  # outside the clamp: no gradient


def test_openrlhf_clamps_the_log_ratio():
    """§3: OpenRLHF's PolicyLoss is finite at a log-ratio of 50: the ratio stops at e^20."""
    lp, one = torch.zeros(1, 1, requires_grad=True), torch.ones(1, 1)
    loss = olf_loss.PolicyLoss()(lp, torch.full((1, 1), -50.0), -one, one)[0]
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(float(torch.tensor(20.0).exp()), rel=1e-6)
    assert float(torch.autograd.grad(loss, lp)[0]) == 0.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_clamps_every_kl_estimator(estimator):
    """§4: one final clamp to [-10, 10] for k1, k2 and k3 alike; the result is float32."""
    log_ratio = torch.tensor([-50.0, -12.0, 0.3, 12.0, 50.0], dtype=torch.bfloat16)
    kl = olf_utils.compute_approx_kl(log_ratio, torch.zeros_like(log_ratio), kl_estimator=estimator)
    assert kl.dtype == torch.float32 and float(kl.abs().max()) == 10.0
    assert float(kl[2]) != 0.0 and abs(float(kl[2])) < 1  # inside: untouched


def test_openrlhf_k3_gradient_finite_far_below_the_reference():
    """§4, wheel column: 0.11.2 also clamps k3's log-ratio at -10 before exp, so the gradient stays finite."""
    lp = torch.tensor([-200.0], requires_grad=True)
    kl = olf_utils.compute_approx_kl(lp, torch.zeros(1), kl_estimator="k3")
    assert float(kl.detach()) == 10.0 and torch.isfinite(torch.autograd.grad(kl.sum(), lp)[0]).all()


def test_verl_clamps_k3_only():
    """§4: verl clamps low_var_kl (k3) to [-10, 10]; k1 and k2 pass through."""
    lp, ref = torch.tensor([-30.0, 0.0]), torch.tensor([0.0, -30.0])
    assert core.kl_penalty(lp, ref, "low_var_kl").abs().max() == 10.0
    assert torch.equal(core.kl_penalty(lp, ref, "k1"), lp - ref)
    assert float(core.kl_penalty(lp, ref, "k2").max()) == 450.0
    with pytest.raises(NotImplementedError):
        core.kl_penalty(lp, ref, "full")


def test_verl_plus_estimators_take_the_k2_gradient():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5])
    value = core.kl_penalty(lp, ref, "k3+")
    assert torch.allclose(value, core.kl_penalty(lp, ref, "k3"))
    assert torch.allclose(torch.autograd.grad(value.sum(), lp)[0], (lp - ref).detach())  # d/dlp of (lp - ref)^2 / 2


def test_empty_mask_verl_zero_openrlhf_nan():
    """§1: verl's masked_mean has 1e-8 in the denominator, OpenRLHF's none."""
    x, empty = torch.randn(2, 3), torch.zeros(2, 3)
    assert float(vF.masked_mean(x, empty)) == 0.0
    assert torch.isnan(olf_utils.masked_mean(x, empty))


def test_verl_masked_var_refuses_fewer_than_two():
    x = torch.randn(2, 3)
    for n in (0, 1):
        mask = torch.zeros(2, 3)
        mask.view(-1)[:n] = 1
        with pytest.raises(ValueError):
            vF.masked_var(x, mask)


def test_openrlhf_log_probs_divide_logits_in_place():
    """§2: with T != 1 OpenRLHF divides the caller's logits tensor itself."""
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    before = logits.clone()
    out = olf_utils.log_probs_from_logits(logits, labels, temperature=0.5)
    assert torch.equal(logits, before / 0.5)
    torch.testing.assert_close(out, torch.log_softmax(before / 0.5, -1).gather(-1, labels[..., None])[..., 0])


def test_openrlhf_policy_loss_defaults():
    """§3, §9: clip 0.2 both sides, no dual clip, token-level, PPO ratio, rollout correction off."""
    fn = olf_loss.PolicyLoss()
    assert (fn.clip_eps_low, fn.clip_eps_high, fn.dual_clip, fn.token_level_loss, fn.policy_loss_type) == (0.2, 0.2, None, True, "ppo")
    assert fn.is_correction_level == "off"  # 0.11.2's name; 3c3be623 has enable_vllm_is_correction=False


def test_openrlhf_token_mean_uses_the_count_passed_in():
    """§3: with batch_num_tokens the token mode divides by that count times dp_size, not by the local tokens;
    the per-sample mode leaves an empty row out."""
    loss, mask = torch.ones(2, 4), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]])
    assert float(olf_loss.aggregate_loss(loss, mask)) == 1.0  # local token-mean
    assert float(olf_loss.aggregate_loss(loss, mask, batch_num_tokens=10.0, dp_size=2)) == pytest.approx(5 / 10 * 2)
    mask[0] = 0
    per_row = olf_loss.aggregate_loss(torch.arange(8.0).view(2, 4), mask, token_level_loss=False)
    assert float(per_row) == pytest.approx(5.0, rel=1e-6)  # row 1 alone: (4 + 5 + 6) / 3


def test_openrlhf_masked_normalize_is_per_row():
    """§6: after b3d29278 each row of a [B, T] tensor (B != T) is centred on its own masked mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g) + torch.tensor([[0.0], [5.0], [-5.0]])
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    out = olf_utils.masked_normalize(x, mask, dim=1)
    row_mean = (out * mask).sum(1) / mask.sum(1)
    row_var = ((out * mask) ** 2).sum(1) / mask.sum(1)
    torch.testing.assert_close(row_mean, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(row_var, torch.ones(3), atol=1e-5, rtol=0)  # biased variance


def test_openrlhf_score_on_the_last_action():
    """§4, §7: compute_reward scatters the score at the last 1 of action_mask."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    reward = olf_utils.compute_reward(torch.tensor([1.0, 2.0, 3.0]), 0.0, torch.zeros(3, 5), action_mask=mask)
    assert reward.nonzero().tolist() == [[0, 2], [1, 4], [2, 0]]


def test_verl_response_mask_keeps_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9]])
    assert vF.get_response_mask(ids, eos_token=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_verl_agg_loss_modes():
    """§3, §9: token-sum exists, seq-mean-token-sum-norm divides by the padded length, unknown modes raise."""
    loss, mask = torch.ones(2, 4), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]])
    assert float(core.agg_loss(loss, mask, "token-sum")) == 5.0
    assert float(core.agg_loss(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx(2.5 / 4)
    assert float(core.agg_loss(loss, mask, "token-mean", dp_size=2, batch_num_tokens=10)) == 1.0
    with pytest.raises(ValueError):
        core.agg_loss(loss, mask, "token-mean", dp_size=2)  # a global count is required
    with pytest.raises(ValueError):
        core.agg_loss(loss, mask, "no-such-mode")
    assert {"vanilla", "gspo", "cispo", "clip_cov", "kl_cov"} <= set(core.POLICY_LOSS_REGISTRY)


def test_verl_actor_config_defaults():
    """§3, §4: the real ActorConfig's defaults are those of actor.yaml."""
    c = trainers.verl_actor_config()
    assert (c.clip_ratio, c.clip_ratio_low, c.clip_ratio_high, c.clip_ratio_c) == (0.2, 0.2, 0.2, 3.0)
    assert (c.loss_agg_mode, c.policy_loss.loss_mode, c.ppo_epochs, c.entropy_coeff) == ("token-mean", "vanilla", 1, 0)
    assert (c.use_kl_loss, c.kl_loss_type, c.kl_loss_coef) == (False, "low_var_kl", 0.001)


def test_trl_grpo_config_defaults():
    """§4, §8, §9: the dataclass defaults of trl 1.16.0's GRPOConfig (read from its fields: constructing one
    validates the hardware)."""
    from trl import GRPOConfig

    d = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert d["disable_dropout"] is False and d["beta"] == 0.0
    assert (d["loss_type"], d["epsilon"], d["epsilon_high"], d["temperature"]) == ("dapo", 0.2, None, 1.0)
    assert d["vllm_importance_sampling_correction"] is True and d["scale_rewards"] == "group"


def test_trl_ships_no_ppo_trainer():
    """Wheel column: trl 1.16.0 has trl/experimental/ but no experimental/ppo/, and no trl/core.py."""
    import trl

    package = Path(trl.__file__).parent
    assert (package / "experimental").is_dir() and not (package / "experimental" / "ppo").exists()
    assert not (package / "core.py").exists() and (package / "trainer" / "grpo_trainer.py").exists()
