"""One prompt, one response, one PPO actor update: the seed note's loop on a real causal LM.

    rollout:      prompt -> sample a response (eval mode, no grad) -> old and reference log-probs
                  -> score from the reward function -> per-token rewards -> advantages
    actor_update: K epochs of the clipped policy loss on that one rollout (AdamW, grad clipping)
    train:        N rollouts of the same prompt, each followed by an actor update

No critic (this series trains the actor only). The baseline that an advantage needs is the
simplest critic there is: one number b for every state, an exponential moving average of past
scores. With gamma = 1 this is the same as subtracting b from the score (REINFORCE with a
baseline, plus the per-token KL penalty). Whitening is off by default: with one response per
update, whitening over its tokens removes the score (every token carries the same score - b),
and with one token it is undefined (see notebooks/05_token_advantages.ipynb).

The KL to the reference enters the per-token rewards (``kl_coef``, the seed note's recipe and
OpenRLHF's default) and, optionally, the loss (``kl_loss_coef``, verl's ``use_kl_loss``); notebook 06
measures why the second holds the policy closer with batch size 1.

Derived in notebooks/06_actor_update.ipynb; the no-clip control and ``update_end`` are used in
notebooks/07_what_epsilon_does.ipynb.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from utils.advantages import _check_coef, _check_discount, gae, token_rewards, whiten
from utils.kl import _check_estimator, kl_estimate, kl_from_logits
from utils.logprobs import _check_temperature, entropy_from_logits, logprobs_from_logits, response_logits, sequence_logprobs
from utils.loss import _check_agg, _check_clip_args, aggregate, policy_loss
from utils.masking import masked_mean, masked_sum, response_mask
from utils.models import context_length, set_seed

BASELINES = ("ema", "none")


@dataclass
class ActorConfig:
    """Every switch of the single-prompt actor update, with the series' defaults."""

    # --- sampling (rollout) ---
    max_new_tokens: int = 24
    """the most tokens a response may have; generation also stops at EOS"""
    temperature: float = 1.0
    """sampling temperature; the log-probs of the loss use the same one (pi is softmax(logits / T))"""

    # --- per-token rewards and advantages ---
    kl_coef: float = 0.05
    """beta: each response token's reward gets -beta * KL_t against the frozen reference model"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: "k1" (log pi - log pi_ref, OpenRLHF/TRL default), "k2" or "k3\""""
    gamma: float = 1.0
    """discount over response tokens; 1.0 in OpenRLHF, verl and TRL"""
    lam: float = 1.0
    """GAE lambda. 1.0 (OpenRLHF, verl defaults): every token's advantage is score - b - beta * (KL still to come).
    With no critic, lam < 1 (TRL and DeepSpeed-Chat use 0.95 with a learned critic) only shrinks the score's
    credit for early tokens by lam**(distance to the end)"""
    baseline: str = "ema"
    """"ema": b = moving average of past scores, used as a constant value V_t = b; "none": b = 0 (plain REINFORCE)"""
    baseline_decay: float = 0.9
    """EMA decay: after each rollout b <- decay * b + (1 - decay) * score"""
    baseline_init: float = 0.0
    """b before the first rollout"""
    kl_loss_coef: float = 0.0
    """coefficient of a second KL term added to the *loss* instead of the reward (verl ``use_kl_loss``, OpenRLHF
    ``--algo.kl.use_loss``, whose default estimator k1 has zero expected gradient as a loss, GRPO): kl_loss_coef * mean over tokens of KL(pi_theta || pi_ref), differentiated directly.
    0 = off (the seed note's recipe: KL only in the reward)"""
    kl_loss_estimator: str = "k3"
    """estimator for the loss term ("k3" is verl's low_var_kl)"""
    whiten_advantages: bool = False
    """whiten the advantages over the rollout's tokens; off: with batch size 1 it erases the score (notebook 05)"""

    # --- the actor update ---
    ppo_epochs: int = 4
    """K: gradient steps on each rollout (the ratio is exactly 1 only in the first)"""
    lr: float = 1e-4
    """AdamW learning rate. Picked by trial for the small GPT-2 at batch size 1: at 3e-4 and above, 60 updates
    turned its text into noise in our runs"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm to this before each step (None: no clipping, the norm is still logged)"""
    clip_eps: float | None = 0.2
    """PPO clip range: the ratio pi/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high]. None: no clip (the plain
    importance-weighted surrogate -r*A; notebook 07's control, not a trainer setting)"""
    clip_eps_high: float | None = None
    """upper clip range ("clip-higher", DAPO); None = clip_eps"""
    dual_clip: float | None = None
    """c > 1 caps the loss of negative-advantage tokens at -c * A (verl uses 3.0); None = off"""
    agg: str = "seq-mean-token-mean"
    """how per-token losses become one number: "seq-mean-token-mean", "token-mean", "seq-mean-token-sum", ...
    (``utils.loss.AGGREGATIONS``; with one response per update the first two agree)"""
    dropout_in_update: bool = False
    """False: the policy stays in eval mode (dropout off) during the update, as TRL's PPO trainer disables dropout
    (trl/experimental/ppo/ppo_trainer.py L489-491 @f2cd5771; its GRPO trainer only with disable_dropout=True,
    default False); True: train() mode, so the first epoch's ratio is no longer 1 (the bundled model has dropout 0.1)"""
    seed: int = 0
    """seeds sampling in ``train`` (torch and Python RNGs)"""

    def __post_init__(self) -> None:
        # Fail at construction, not mid-run. The settings the loss, the KL and the advantages take are checked by
        # those modules' own validators (one rule each, the same ones their functions apply); the rest are this loop's.
        _check_temperature(self.temperature)
        _check_coef(self.kl_coef, "kl_coef")
        _check_coef(self.kl_loss_coef, "kl_loss_coef")
        _check_estimator(self.kl_estimator, "kl_estimator")
        _check_estimator(self.kl_loss_estimator, "kl_loss_estimator")
        for name in ("gamma", "lam", "baseline_decay"):
            _check_discount(getattr(self, name), name)
        _check_agg(self.agg)
        _check_clip_args(self.clip_eps, self.clip_eps_high, self.dual_clip)
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if not (isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1):
            raise ValueError(f"ppo_epochs must be an int >= 1, got {self.ppo_epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass
class Rollout:
    """One sampled response and everything the actor update needs. Tensors are [1, T] or [1, R], R = T - prompt_len."""

    input_ids: torch.Tensor  # [1, T] prompt + response (pads after EOS)
    attention_mask: torch.Tensor  # [1, T] 1 on the prompt and the kept response tokens
    prompt_len: int
    action_mask: torch.Tensor  # [1, R] bool: response tokens up to and including the first EOS
    old_log_probs: torch.Tensor  # [1, R] log pi_old(token), no grad, at cfg.temperature
    ref_log_probs: torch.Tensor  # [1, R] log pi_ref(token), no grad, at cfg.temperature
    kl: torch.Tensor  # [1, R] per-token KL estimate (cfg.kl_estimator) of pi_old vs pi_ref
    score: float  # the reward function's number for the response text
    values: torch.Tensor  # [1, R] b on kept tokens
    rewards: torch.Tensor  # [1, R] -kl_coef * kl, plus the score on the last kept token
    advantages: torch.Tensor  # [1, R]
    returns: torch.Tensor  # [1, R] advantages + values
    response: str  # the decoded response (special tokens skipped)

    @property
    def response_len(self) -> int:
        """Number of kept response tokens (EOS included when it was sampled)."""
        return int(self.action_mask.sum())


def reference_model(policy: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the policy: eval mode, no gradients. The KL penalty measures the distance to it."""
    return copy.deepcopy(policy).eval().requires_grad_(False)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_responses(policy, tokenizer, prompt: str, cfg: ActorConfig, n: int = 1):
    """Sample ``n`` responses to one prompt from softmax(logits / T) (no top-k, no top-p), in eval mode.

    Returns ``(input_ids [n, T], attention_mask [n, T], prompt_len, action_mask [n, T - prompt_len])``.
    Uses the global torch RNG (seed it for reproducible samples).
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    enc = tokenizer(prompt, return_tensors="pt")
    prompt_ids = enc["input_ids"].to(_device(policy))  # [1, P]
    prompt_len = prompt_ids.shape[1]
    n_ctx = context_length(policy)
    if prompt_len + cfg.max_new_tokens > n_ctx:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the context of {n_ctx}"
        )
    was_training = policy.training
    policy.eval()  # dropout off: the sampling policy must be the one whose log-probs we store
    out = policy.generate(
        input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True,
        temperature=cfg.temperature, top_k=0, top_p=1.0,  # the full softmax(logits / T), as the loss assumes
        max_new_tokens=cfg.max_new_tokens, num_return_sequences=n,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # [n, T]
    policy.train(was_training)
    if out.shape[1] == prompt_len:
        raise RuntimeError("generation returned no new token")
    action_mask = response_mask(out, prompt_len, tokenizer.eos_token_id)  # [n, R]
    attention_mask = torch.cat([torch.ones_like(out[:, :prompt_len]), action_mask.long()], dim=1)  # pads after EOS -> 0
    return out, attention_mask, prompt_len, action_mask


def rollout(policy, ref, tokenizer, prompt: str, reward_fn, cfg: ActorConfig, baseline: float = 0.0) -> Rollout:
    """Sample one response to ``prompt`` and compute everything the actor update needs.

    reward_fn(text: str) -> float scores the decoded response. ``baseline`` is b, used as a constant
    value V_t = b on every kept token (no critic). Old and reference log-probs are computed under
    ``torch.no_grad`` in eval mode, at ``cfg.temperature``.
    """
    input_ids, attention_mask, prompt_len, action_mask = sample_responses(policy, tokenizer, prompt, cfg, n=1)
    with torch.no_grad():
        was_training = policy.training
        policy.eval()
        old_log_probs = sequence_logprobs(policy, input_ids, attention_mask, prompt_len, cfg.temperature)  # [1, R]
        policy.train(was_training)
        ref.eval()
        ref_log_probs = sequence_logprobs(ref, input_ids, attention_mask, prompt_len, cfg.temperature)  # [1, R]
    response = tokenizer.decode(input_ids[0, prompt_len:][action_mask[0]], skip_special_tokens=True)
    score = float(reward_fn(response))
    if not math.isfinite(score):
        raise ValueError(f"reward_fn returned {score!r} for {response!r}")
    kl = kl_estimate(old_log_probs, ref_log_probs, cfg.kl_estimator)  # [1, R]
    rewards = token_rewards(torch.tensor([score], dtype=kl.dtype, device=kl.device), kl, action_mask, cfg.kl_coef)
    values = torch.where(action_mask, float(baseline), 0.0).to(rewards.dtype)  # the constant critic V_t = b
    advantages, returns = gae(rewards, values, cfg.gamma, cfg.lam, action_mask)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, action_mask)  # raises on a one-token response
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, prompt_len=prompt_len, action_mask=action_mask,
        old_log_probs=old_log_probs, ref_log_probs=ref_log_probs, kl=kl, score=score,
        values=values, rewards=rewards, advantages=advantages, returns=returns, response=response,
    )


def make_optimizer(policy: torch.nn.Module, cfg: ActorConfig) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters with ``cfg.lr`` and ``cfg.weight_decay``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def actor_update(policy, optimizer: torch.optim.Optimizer, rollout: Rollout, cfg: ActorConfig) -> list[dict]:
    """K = ``cfg.ppo_epochs`` PPO steps on one rollout; returns one diagnostics dict per epoch.

    Each epoch: new log-probs (with grad) -> ``policy_loss`` against the rollout's old log-probs
    (+ ``kl_loss_coef`` * KL to the reference, if set) -> backward -> clip the gradient norm -> AdamW
    step. The diagnostics are measured before that epoch's step: loss (the total), policy_loss,
    kl_loss (the KL term, only when ``kl_loss_coef > 0``), clip_frac, ratio_min/max/mean,
    approx_kl_k1/k3 (estimates of KL(pi_old || pi_theta) on the rollout's tokens), entropy (nats, mean
    over kept tokens) and grad_norm (before clipping).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    policy.train(cfg.dropout_in_update)  # eval() by default: dropout would make pi differ from the pi_old we stored
    history = []
    try:
        for epoch in range(cfg.ppo_epochs):
            logits = response_logits(policy, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)  # [1, R, V]
            log_probs = logprobs_from_logits(logits, rollout.input_ids[:, rollout.prompt_len:], cfg.temperature)
            pg_loss, info = policy_loss(
                log_probs, rollout.old_log_probs, rollout.advantages, rollout.action_mask, clip_eps=cfg.clip_eps,
                clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip, agg=cfg.agg,
            )
            loss = pg_loss
            if cfg.kl_loss_coef > 0:  # verl's use_kl_loss: KL to the reference as a loss term, differentiated directly
                kl_ref = kl_estimate(log_probs, rollout.ref_log_probs, cfg.kl_loss_estimator)  # [1, R], with grad
                kl_loss = aggregate(kl_ref, rollout.action_mask, cfg.agg)
                loss = pg_loss + cfg.kl_loss_coef * kl_loss
                info["kl_loss"] = kl_loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # before step(), or it clips nothing
            optimizer.step()
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits.detach(), cfg.temperature), rollout.action_mask)
            history.append({"epoch": epoch, "loss": loss.item(), "policy_loss": pg_loss.item(), **info,
                            "entropy": float(entropy), "grad_norm": float(grad_norm)})
    finally:
        policy.eval()
    return history


@torch.no_grad()
def _logits(model, ro: Rollout) -> torch.Tensor:
    return response_logits(model.eval(), ro.input_ids, ro.attention_mask, ro.prompt_len)  # [1, R, V]


def update_end(old_logits: torch.Tensor, policy, ro: Rollout, cfg: ActorConfig) -> dict:
    """Where one update ended, measured once after its last step on the rollout's positions.

    old_logits: [1, R, V], the sampling policy's logits at the rollout (before the update). Returns
    ``end_kl_old`` (exact KL(pi_old || pi_new) over the whole vocabulary, mean over kept positions: not an
    estimate on the very tokens the update pushed), ``end_ratio_min`` / ``end_ratio_max`` and
    ``end_max_abs_log_ratio`` of the rollout's tokens.
    """
    new_logits = _logits(policy, ro)
    kl = kl_from_logits(old_logits, new_logits, cfg.temperature)  # [1, R]: KL(pi_old || pi_new) per position
    labels = ro.input_ids[:, ro.prompt_len:]
    log_ratio = (logprobs_from_logits(new_logits, labels, cfg.temperature) - ro.old_log_probs)[ro.action_mask]
    return {"end_kl_old": float(masked_mean(kl, ro.action_mask)), "end_ratio_min": float(log_ratio.exp().min()),
            "end_ratio_max": float(log_ratio.exp().max()), "end_max_abs_log_ratio": float(log_ratio.abs().max())}


def epoch_mean(epochs: list[dict]) -> dict[str, float]:
    """The one rule by which ``actor_update``'s K per-epoch diagnostics become one per-update number: the mean.

    epochs: one dict per epoch, all with the same keys. Returns {key: mean over the epochs} for every key but
    ``epoch``. Where the update *ended* is not a mean; ``update_end`` measures it once after the last step.
    """
    return {k: sum(e[k] for e in epochs) / len(epochs) for k in epochs[0] if k != "epoch"}


def _ema(baseline: float, score: float, cfg: ActorConfig) -> float:
    if cfg.baseline == "none":
        return 0.0
    return cfg.baseline_decay * baseline + (1.0 - cfg.baseline_decay) * score


def train(policy, ref, tokenizer, prompt: str, reward_fn, cfg: ActorConfig, n_rollouts: int,
          progress: bool = True) -> list[dict]:
    """N rollouts of the same prompt, each followed by ``actor_update``; returns one dict per update.

    Each dict holds, measured at the rollout (before the update): step, score, baseline, advantage
    (score - b), kl_ref_k1_mean / kl_ref_k1_sum / kl_ref_k3_mean (KL of the sampling policy to the
    reference on the response's tokens, per token and summed), response_len and the response text.
    **One rule for the K epochs** (``epoch_mean``): every per-epoch diagnostic of ``actor_update`` (loss,
    policy_loss, kl_loss, clip_frac, ratio_min/mean/max, approx_kl_k1/k3, entropy, grad_norm) is reported as
    its mean over the epochs; where the update ended is measured once after the last step (``update_end``:
    end_kl_old, end_ratio_min/max, end_max_abs_log_ratio).
    Seeds torch with ``cfg.seed`` first, so the same call gives the same history.
    """
    if not (isinstance(n_rollouts, int) and n_rollouts >= 1):
        raise ValueError(f"n_rollouts must be an int >= 1, got {n_rollouts!r}")
    set_seed(cfg.seed)
    optimizer = make_optimizer(policy, cfg)
    ref.eval()
    baseline = cfg.baseline_init if cfg.baseline == "ema" else 0.0
    history = []
    bar = tqdm(range(n_rollouts), desc="rollouts", disable=not progress, mininterval=1.0)  # few redraws in a notebook
    for step in bar:
        ro = rollout(policy, ref, tokenizer, prompt, reward_fn, cfg, baseline=baseline)
        old_logits = _logits(policy, ro)
        epochs = actor_update(policy, optimizer, ro, cfg)
        log_ratio_ref = ro.old_log_probs - ro.ref_log_probs  # [1, R]
        row = {
            "step": step, "score": ro.score, "baseline": baseline, "advantage": ro.score - baseline,
            "kl_ref_k1_mean": float(masked_mean(log_ratio_ref, ro.action_mask)),
            "kl_ref_k1_sum": float(masked_sum(log_ratio_ref, ro.action_mask)),
            "kl_ref_k3_mean": float(masked_mean(kl_estimate(ro.old_log_probs, ro.ref_log_probs, "k3"), ro.action_mask)),
            "response_len": ro.response_len,
        }
        row.update(epoch_mean(epochs))  # the one rule: the mean over the K epochs
        row.update(update_end(old_logits, policy, ro, cfg))
        row["response"] = ro.response
        history.append(row)
        baseline = _ema(baseline, ro.score, cfg)
        if progress:
            bar.set_postfix(score=f"{ro.score:.1f}", b=f"{baseline:.2f}", refresh=False)
    return history


@torch.no_grad()
def evaluate(policy, ref, tokenizer, prompt: str, reward_fn, cfg: ActorConfig, n: int = 32, seed: int = 1234) -> dict:
    """Score and KL to the reference of ``n`` fresh responses (one batched generation, deterministic under ``seed``).

    Returns a dict of tensors [n]: ``scores``; ``kl`` = the exact KL(pi || pi_ref) of each response's next-token
    distributions over the whole vocabulary, summed over its tokens (averaged over responses it estimates the
    sequence-level KL, with far less noise than k1 on the sampled tokens); ``kl_per_token`` = that sum / length;
    ``kl_k1`` = the k1 sum on the sampled tokens (the same expectation, noisier); ``length``; and ``texts``
    (list of str). Leaves the global RNG as it found it.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        input_ids, attention_mask, prompt_len, action_mask = sample_responses(policy, tokenizer, prompt, cfg, n=n)
    logits = response_logits(policy.eval(), input_ids, attention_mask, prompt_len)  # [n, R, V]
    ref_logits = response_logits(ref.eval(), input_ids, attention_mask, prompt_len)
    labels = input_ids[:, prompt_len:]
    k1 = logprobs_from_logits(logits, labels, cfg.temperature) - logprobs_from_logits(ref_logits, labels, cfg.temperature)
    kl = masked_sum(kl_from_logits(logits, ref_logits, cfg.temperature), action_mask, dim=-1)  # [n]
    length = action_mask.sum(-1)
    texts = [tokenizer.decode(ids[prompt_len:][m], skip_special_tokens=True) for ids, m in zip(input_ids, action_mask)]
    scores = torch.tensor([float(reward_fn(t)) for t in texts])
    return {"scores": scores, "kl": kl, "kl_per_token": kl / length, "kl_k1": masked_sum(k1, action_mask, dim=-1),
            "length": length, "texts": texts}


def config_table(cfg: ActorConfig) -> str:
    """The config as aligned ``name = value`` lines, for printing in a notebook."""
    return "\n".join(f"{k:18s} = {v!r}" for k, v in asdict(cfg).items())
