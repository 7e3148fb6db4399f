"""Notebooks 06 and 07's experiment: does the single-prompt PPO update raise the reward, why, and what does eps do?

    python tools/exp_actor_update.py --seeds 0 1 2 3 4        # writes data/results/actor_update.json

Every arm trains the shipped small GPT-2 (or ``--policy DIR``) for 60 rollouts of "ROMEO.\\n" with
utils.ppo.train, then scores 128 fresh responses (utils.ppo.evaluate: listed words, and the exact KL to the
reference over the whole vocabulary). The arms:

    reward      the series' defaults: KL in the reward, beta = 0.05, K = 4 epochs
    reward_0.2  KL in the reward, beta = 0.2
    loss_0.1    KL in the loss (verl's use_kl_loss, k3), kl_loss_coef = 0.1, none in the reward
    lagged      control: each response gets the previous response's score (utils.rewards.LaggedReward)
    epochs_1    control: K = 1 epoch instead of 4 (one policy-gradient step per rollout, the ratio is always 1)
    eps_0.05, eps_0.5, eps_none
                the defaults with clip_eps = 0.05, 0.5 or no clip at all (notebook 07; "reward" is eps = 0.2)

Same seed = same first rollout in every arm. One thread per run: this model's matmuls are too small to
split, and one thread keeps a run bit-for-bit reproducible on one machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.models import load_policy  # noqa: E402
from utils.ppo import ActorConfig, evaluate, reference_model, train  # noqa: E402
from utils.results import RESULTS_DIR, machine, save_results  # noqa: E402
from utils.rewards import LaggedReward, WordReward, split_words  # noqa: E402

PROMPT = "ROMEO.\n"
N_UPDATES, N_EVAL = 60, 128
ARMS = {  # arm -> (ActorConfig overrides, control reward?)
    "reward": ({}, False),
    "reward_0.2": ({"kl_coef": 0.2}, False),
    "loss_0.1": ({"kl_coef": 0.0, "kl_loss_coef": 0.1}, False),
    "lagged": ({}, True),
    "epochs_1": ({"ppo_epochs": 1}, False),
    "eps_0.05": ({"clip_eps": 0.05}, False),
    "eps_0.5": ({"clip_eps": 0.5}, False),
    "eps_none": ({"clip_eps": None}, False),
}
# tests/test_results.py re-runs these arms of the first seed (the PPO default, a control, the no-clip extreme).
REPRO_ARMS = ("reward", "lagged", "eps_none")
# Reproduction tolerance for tests/test_results.py, per metric: one standard deviation over seeds (the median over
# the arms of the committed file; length: one token). On the machine that wrote the file a rerun is exact (one
# thread, seeded); on another CPU float sums round differently and the sampled tokens can part ways during the run.
# The test widens each key's tolerance to two of that key's own standard deviations over seeds
# (utils.results.reproduction_tolerance): the no-clip arm spreads far more than the median arm. Claims are made on
# means over seeds, not on one row.
TOLERANCE = {"score": 0.4, "kl": 9.0, "kl_per_token": 0.4, "length": 1.0, "entropy": 0.5, "distinct": 0.06,
             "step_kl": 0.003, "clip_frac": 0.005, "max_log_ratio": 0.35}


def distinct_words(texts: list[str]) -> float:
    """Share of distinct words among all the words of ``texts`` (a crude diversity measure)."""
    words = [w for t in texts for w in split_words(t)]
    return len(set(words)) / max(len(words), 1)


def run_arm(base, tok, reward, seed: int, overrides: dict, lagged: bool, n_updates: int = N_UPDATES,
            n_eval: int = N_EVAL, progress: bool = False) -> tuple[dict, dict]:
    """Train a copy of ``base`` in one arm; return (final metrics, per-update curves)."""
    policy = copy.deepcopy(base)
    ref = reference_model(base)
    cfg = ActorConfig(seed=seed, **overrides)
    reward_fn = LaggedReward(reward) if lagged else reward
    history = train(policy, ref, tok, PROMPT, reward_fn, cfg, n_rollouts=n_updates, progress=progress)
    ev = evaluate(policy, ref, tok, PROMPT, reward, cfg, n=n_eval, seed=10_000 + seed)  # the true reward
    final = {
        "score": float(ev["scores"].mean()), "kl": float(ev["kl"].mean()),
        "kl_per_token": float(ev["kl_per_token"].mean()), "length": float(ev["length"].float().mean()),
        "entropy": statistics.fmean(h["entropy"] for h in history[-10:]),  # of the policy at its own samples
        "distinct": distinct_words(ev["texts"]),
        "step_kl": statistics.fmean(h["end_kl_old"] for h in history),  # exact KL(pi_old || pi_new) per update
        "clip_frac": statistics.fmean(h["clip_frac"] for h in history),
        "max_log_ratio": max(h["end_max_abs_log_ratio"] for h in history),
    }
    curves = {"score": [h["score"] for h in history], "kl_ref_k1_mean": [h["kl_ref_k1_mean"] for h in history],
              "clip_frac": [h["clip_frac"] for h in history], "end_kl_old": [h["end_kl_old"] for h in history]}
    return final, curves


def run_one(seed: int, policy: str | None = None, arms: dict = ARMS, progress: bool = False) -> tuple[dict, dict]:
    """All arms for one seed: (row {"<arm>/<metric>": value}, curves {"<arm>/<metric>": [...]})."""
    torch.set_num_threads(1)
    base, tok = load_policy(policy)
    reward = WordReward()
    row, curves = {}, {}
    before = evaluate(base, reference_model(base), tok, PROMPT, reward, ActorConfig(), n=N_EVAL, seed=10_000 + seed)
    row["before/score"] = float(before["scores"].mean())
    row["before/length"] = float(before["length"].float().mean())
    row["before/distinct"] = distinct_words(before["texts"])
    for arm, (overrides, lagged) in tqdm(arms.items(), desc=f"seed {seed}", disable=not progress, leave=False):
        final, curve = run_arm(base, tok, reward, seed, overrides, lagged)
        if progress:
            tqdm.write(f"seed {seed} {arm:11s} " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))
        row.update({f"{arm}/{k}": v for k, v in final.items()})
        curves.update({f"{arm}/{k}": v for k, v in curve.items()})
    return row, curves


def main(name: str = "actor_update", run=run_one, doc: str = __doc__, tolerance: dict = TOLERANCE) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--policy", default=None, help="model folder (default: the shipped data/tiny-gpt2)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json")
    args = ap.parse_args()
    t0, rows, curves = time.time(), {}, {}
    for seed in tqdm(args.seeds, desc="seeds"):
        rows[str(seed)], curves[str(seed)] = run(seed, args.policy, progress=True)
    save_results(args.out, script=f"tools/exp_{name}.py", policy=args.policy or "data/tiny-gpt2 (shipped)",
                 seeds=args.seeds, rows=rows, curves=curves, tolerance=tolerance, machine=machine(),
                 seconds=round(time.time() - t0, 1))
    print(f"wrote {args.out.name}: {len(args.seeds)} seeds in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
