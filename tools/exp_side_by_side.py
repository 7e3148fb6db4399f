"""Notebook 15's experiment: PPO (06) and the group methods side by side, on one prompt, over seeds.

    nice -n 10 python tools/exp_side_by_side.py --seeds 0 1 2 3 4     # writes data/results/side_by_side.json

(The committed file was written as five one-seed runs in parallel, ``--seeds k --out ...``, merged into one file
whose ``seconds`` is the longest run's wall time, ~34 min on a busy shared 2-core machine; timed arm by arm under a lighter load, one seed
took about 3 min. Each run is one thread, so the rows do not depend on how they were run.)

Every arm trains the shipped small GPT-2 (or ``--policy DIR``) on "ROMEO.\\n" with the word reward
(utils.rewards.WordReward), from the same start, with the same sampling budget: N_RESPONSES sampled
responses of at most 24 tokens, the same AdamW (lr 1e-4, grad-norm 1.0) and K = 4 epochs on each batch.

    ppo        notebook 06: one response per rollout, KL in the reward (beta = 0.05), EMA baseline,
               utils.ppo.train. 48 rollouts x 4 epochs = 192 optimizer steps.
    grpo       G = 4 responses per step, A = (R - mean) / std within the group (utils.groups), PPO's clipped
               token ratio (eps 0.2), seq-mean-token-mean (TRL loss_type="grpo"). 12 groups x 4 epochs = 48 steps.
    dr_grpo    A = R - mean (no std), seq-mean-token-sum-norm with horizon 24 (TRL loss_type="dr_grpo").
    gspo       GRPO's advantages, the sequence ratio exp(mean_t log r_t) clipped to [1 - 3e-4, 1 + 4e-4].
    cispo      GRPO's advantages, -sg(min(r, 1.2)) A log pi, token-mean (verl's CISPO defaults).
    grpo_lagged  control: grpo, but each response gets the previous response's score (LaggedReward),
               so the scores keep their distribution and lose their pairing with the text.
    grpo_mb1   control: grpo in mini-batches of one response (4 epochs x 4 mini-batches per group), so it takes
               PPO's 192 optimizer steps: separates "group advantages" from "fewer optimizer steps".

The group arms put the KL to the reference in the loss (k3, coefficient 0.05, token-mean over the batch), where
GRPO puts it (verl use_kl_loss, TRL beta); PPO keeps it in the reward, as in 06. After training, each arm is
measured on 128 fresh responses (seed 10_000 + seed): score, exact KL(pi || pi_ref) summed over each response's
positions over the whole vocabulary (as utils.ppo.evaluate), length, and entropy (nats per token, mean over kept
tokens). "before" is the untrained model on the same 128 draws.

Same seed = same first batch in every group arm. One thread per run (bit-for-bit reproducible on one machine).
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from exp_actor_update import main as _main  # noqa: E402  (same --seeds/--out/--policy command line and file layout)
from utils.groups import group_advantages, sample_groups, token_advantages  # noqa: E402
from utils.kl import kl_estimate, kl_from_logits  # noqa: E402
from utils.logprobs import entropy_from_logits, logprobs_from_logits, response_logits  # noqa: E402
from utils.loss import aggregate  # noqa: E402
from utils.masking import masked_mean, masked_sum  # noqa: E402
from utils.models import load_policy, set_seed, set_threads  # noqa: E402
from utils.objectives import objective_loss  # noqa: E402
from utils.ppo import ActorConfig, make_optimizer, reference_model, sample_responses, train  # noqa: E402
from utils.rewards import LaggedReward, WordReward  # noqa: E402

PROMPT = "ROMEO.\n"
N_RESPONSES, G, N_EVAL = 48, 4, 128
KL_LOSS_COEF = 0.05  # the group arms' KL term in the loss (k3); PPO's beta in the reward is also 0.05
# arm -> (kind, settings). kind "ppo": utils.ppo.train; "group": group_train below.
ARMS = {
    "ppo": ("ppo", {}),
    "grpo": ("group", {"method": "grpo", "objective": "ppo", "agg": "seq-mean-token-mean"}),
    "dr_grpo": ("group", {"method": "dr_grpo", "objective": "ppo", "agg": "seq-mean-token-sum-norm"}),
    "gspo": ("group", {"method": "grpo", "objective": "gspo", "agg": "seq-mean-token-mean"}),
    "cispo": ("group", {"method": "grpo", "objective": "cispo", "agg": "token-mean"}),
    "grpo_lagged": ("group", {"method": "grpo", "objective": "ppo", "agg": "seq-mean-token-mean", "lagged": True}),
    "grpo_mb1": ("group", {"method": "grpo", "objective": "ppo", "agg": "seq-mean-token-mean", "minibatch": 1}),
}
# tests/test_results.py re-runs these arms of the first seed (~50 s: two objectives and the control; the ppo arm is
# utils.ppo.train, whose reproduction tools/exp_actor_update.py already tests).
REPRO_ARMS = ("grpo", "gspo", "grpo_lagged")
# Reproduction tolerance per metric, as in tools/exp_actor_update.py: about one standard deviation over seeds
# (length: one token), widened by the test to two of a key's own standard deviations over seeds where that is more
# (utils.results.reproduction_tolerance). A rerun on the machine that wrote the file is exact; on another CPU float
# sums round differently and the sampled tokens can part ways during the run.
TOLERANCE = {"score": 0.5, "kl": 8.0, "length": 1.0, "entropy": 0.5, "clip_frac": 0.05}


@torch.no_grad()
def measure(policy, ref, tokenizer, reward_fn, n: int = N_EVAL, seed: int = 0, max_new_tokens: int = 24) -> dict:
    """Score, exact KL to the reference, length and entropy of ``n`` fresh responses (floats, means over responses).

    The same draws, score and KL as ``utils.ppo.evaluate`` (tests/test_side_by_side.py checks it), plus the
    policy's entropy at those positions: nats per kept token, averaged over all kept tokens.
    """
    cfg = ActorConfig(max_new_tokens=max_new_tokens)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        input_ids, attention_mask, prompt_len, action_mask = sample_responses(policy, tokenizer, PROMPT, cfg, n=n)
    logits = response_logits(policy.eval(), input_ids, attention_mask, prompt_len)  # [n, R, V]
    ref_logits = response_logits(ref.eval(), input_ids, attention_mask, prompt_len)
    kl = masked_sum(kl_from_logits(logits, ref_logits), action_mask, dim=-1)  # [n]: summed over each response
    texts = [tokenizer.decode(ids[prompt_len:][m], skip_special_tokens=True) for ids, m in zip(input_ids, action_mask)]
    return {"score": statistics.fmean(float(reward_fn(t)) for t in texts), "kl": float(kl.mean()),
            "length": float(action_mask.sum(-1).float().mean()),
            "entropy": float(masked_mean(entropy_from_logits(logits), action_mask))}


def group_train(policy, ref, tokenizer, reward_fn, seed: int, method: str, objective: str, agg: str,
                n_steps: int = N_RESPONSES // G, group_size: int = G, epochs: int = 4, minibatch: int = G,
                kl_loss_coef: float = KL_LOSS_COEF, max_new_tokens: int = 24) -> list[dict]:
    """The GRPO-family loop: sample G responses, group advantages, K epochs of ``objective`` + KL loss on them.

    Each step: ``sample_groups`` -> scores -> ``group_advantages(method)`` on every kept token -> old and reference
    log-probs (no grad, eval mode) -> ``epochs`` passes over the group in mini-batches of ``minibatch`` responses
    (default: the whole group, one AdamW step per epoch), each step on
    ``objective_loss(objective, agg=agg) + kl_loss_coef * token-mean k3``. Returns one dict per step (score,
    clip_frac averaged over the epochs). Seeds torch with ``seed`` first.
    """
    cfg = ActorConfig(max_new_tokens=max_new_tokens)  # the series' optimizer settings (lr, weight decay, grad norm)
    set_seed(seed)
    optimizer = make_optimizer(policy, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history = []
    for step in range(n_steps):
        b = sample_groups(policy, tokenizer, [PROMPT], group_size, max_new_tokens=max_new_tokens)
        scores = torch.tensor([float(reward_fn(t)) for t in b.responses])
        adv = token_advantages(group_advantages(scores, group_size, method), b.action_mask)  # [G, R]
        labels = b.input_ids[:, b.prompt_len:]
        with torch.no_grad():
            old_lp = logprobs_from_logits(response_logits(policy.eval(), b.input_ids, b.attention_mask, b.prompt_len), labels)
            ref_lp = logprobs_from_logits(response_logits(ref.eval(), b.input_ids, b.attention_mask, b.prompt_len), labels)
        clip = []
        for _ in range(epochs):
            for rows in torch.arange(group_size).split(minibatch):  # minibatch = G: one step on the whole group
                ids, att, mask, a = b.input_ids[rows], b.attention_mask[rows], b.action_mask[rows], adv[rows]
                lp = logprobs_from_logits(response_logits(policy, ids, att, b.prompt_len), labels[rows])
                pg, info = objective_loss(objective, lp, old_lp[rows], a, mask, agg=agg,
                                          horizon=max_new_tokens if agg == "seq-mean-token-sum-norm" else None)
                loss = pg + kl_loss_coef * aggregate(kl_estimate(lp, ref_lp[rows], "k3"), mask, "token-mean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                clip.append(info["clip_frac"])
        history.append({"step": step, "score": float(scores.mean()), "clip_frac": statistics.fmean(clip)})
    policy.eval()
    return history


def run_arm(base, tok, reward, seed: int, kind: str, settings: dict) -> tuple[dict, dict]:
    """Train a copy of ``base`` in one arm; return (final metrics, per-step curves)."""
    policy, ref = copy.deepcopy(base), reference_model(base)
    settings = dict(settings)
    reward_fn = LaggedReward(reward) if settings.pop("lagged", False) else reward
    if kind == "ppo":
        history = train(policy, ref, tok, PROMPT, reward_fn, ActorConfig(seed=seed), n_rollouts=N_RESPONSES,
                        progress=False)
    else:
        history = group_train(policy, ref, tok, reward_fn, seed, **settings)
    final = measure(policy, ref, tok, reward, seed=10_000 + seed)  # the true reward, fresh draws
    final["clip_frac"] = statistics.fmean(h["clip_frac"] for h in history)
    return final, {"score": [h["score"] for h in history]}


def run_one(seed: int, policy: str | None = None, arms: dict = ARMS, progress: bool = False) -> tuple[dict, dict]:
    """All arms for one seed: (row {"<arm>/<metric>": value}, curves {"<arm>/<metric>": [...]})."""
    set_threads(1)
    base, tok = load_policy(policy)
    reward = WordReward()
    row, curves = {}, {}
    before = measure(base, reference_model(base), tok, reward, seed=10_000 + seed)
    row.update({f"before/{k}": v for k, v in before.items() if k != "kl"})
    for arm, (kind, settings) in tqdm(arms.items(), desc=f"seed {seed}", disable=not progress, leave=False):
        final, curve = run_arm(base, tok, reward, seed, kind, settings)
        if progress:
            tqdm.write(f"seed {seed} {arm:11s} " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))
        row.update({f"{arm}/{k}": v for k, v in final.items()})
        curves.update({f"{arm}/{k}": v for k, v in curve.items()})
    return row, curves


if __name__ == "__main__":
    _main("side_by_side", run_one, __doc__, TOLERANCE)
