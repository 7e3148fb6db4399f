"""Groups instead of a critic: G responses per prompt, several prompts in one batch, advantages within each group.

    GRPO      A_i = (R_i - mean_j R_j) / (std_j R_j + eps)       (std unbiased, as torch.std, verl and TRL)
    Dr. GRPO  A_i =  R_i - mean_j R_j                             (no std: arXiv 2503.20783)
    RLOO      A_i =  R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_j R_j)

The layout of a batch (verl's): prompts left-padded to one width P, responses right-padded after their EOS,
the N = n_prompts * G rows ordered prompt by prompt (TRL's ``repeat_interleave`` order), and position ids
counted over real tokens only, so a left-padded prompt starts at position 0.

Edge cases, decided here once (the trainers differ): G = 1 raises ``ValueError`` (a group of one has no
baseline; verl then returns the raw score as the advantage, TRL returns 0). A group whose scores are all equal
carries no signal: its advantages are exactly 0 for every method (TRL gets 0 by dividing 0 by std + 1e-4,
verl by std + 1e-6; here no division by ~0 happens at all).

Sources: verl/trainer/ppo/core_algos.py ``compute_grpo_outcome_advantage`` L268 (std L321, G = 1 L315-317,
the division L325-328) and ``compute_rloo_outcome_advantage`` L588 (L631) at 1dda039b; trl/trainer/grpo_trainer.py
``_generate_and_score_completions`` L2685-2707 (scale_rewards, + 1e-4) at f2cd5771;
openrlhf/trainer/ppo_utils/experience_maker.py L264-270 (rloo, dr_grpo, group_norm) at 3c3be623.

Derived in notebooks/11_groups_and_aggregation.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.checks import check_finite
from utils.logprobs import position_ids_from_mask
from utils.masking import response_mask
from utils.models import context_length

GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


@dataclass
class GroupBatch:
    """A batch of G responses to each of several prompts. N = len(prompts) * G rows, R response positions."""

    input_ids: torch.Tensor  # [N, P + R] left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # [N, P + R] 1 on real prompt tokens and on kept response tokens
    position_ids: torch.Tensor  # [N, P + R] 0, 1, 2, ... over real tokens
    prompt_len: int  # P, the width of the (left-padded) prompt block
    action_mask: torch.Tensor  # [N, R] bool: response tokens up to and including the first EOS
    group: torch.Tensor  # [N] long: which prompt each row answers
    group_size: int  # G
    prompts: list[str]
    responses: list[str]  # decoded kept response tokens, special tokens skipped

    @property
    def lengths(self) -> torch.Tensor:
        """Kept response tokens per row [N]."""
        return self.action_mask.sum(-1)


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2, got {group_size!r}: a group of one response has no baseline "
            "(its mean is its own score, so its advantage would be 0, or the raw score in verl)"
        )
    return group_size


@torch.no_grad()
def sample_groups(policy, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int = 24,
                  temperature: float = 1.0, stop_token_ids: list[int] | None = None) -> GroupBatch:
    """Sample ``group_size`` responses to each prompt in one ``generate`` call (full softmax(logits / T), eval mode).

    A response ends at EOS or at the first of ``stop_token_ids`` (kept: it is an action the policy took), or after
    ``max_new_tokens``. Uses the global torch RNG (seed it for reproducible samples). Returns a ``GroupBatch``.
    """
    _check_group_size(group_size)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left for batched generation (load_policy sets this)")
    device = next(policy.parameters()).device
    stops = [tokenizer.eos_token_id] + [int(t) for t in (stop_token_ids or []) if int(t) != tokenizer.eos_token_id]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [n, P]
    P = prompt_ids.shape[1]
    if P + max_new_tokens > context_length(policy):
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                         f"{context_length(policy)}")
    was_training = policy.training
    policy.eval()
    out = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=float(temperature),
        top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=group_size,
        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
    )  # [n * G, P + R], rows prompt by prompt
    policy.train(was_training)
    if out.shape[1] == P:
        raise RuntimeError("generation returned no new token")
    is_stop = torch.isin(out[:, P:], torch.tensor(stops, device=device)).long()
    action_mask = response_mask(out, P) & ((is_stop.cumsum(-1) - is_stop) == 0)  # [N, R]: up to the first stop
    attention_mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), action_mask.long()], dim=1)
    group = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    responses = [tokenizer.decode(ids[P:][m], skip_special_tokens=True) for ids, m in zip(out, action_mask)]
    return GroupBatch(out, attention_mask, position_ids_from_mask(attention_mask), P, action_mask, group,
                      group_size, list(prompts), responses)


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """One advantage per response [N] from its score [N], within consecutive groups of ``group_size``.

    method: "grpo" (mean and std), "dr_grpo" (mean only) or "rloo" (leave-one-out mean). A group of equal
    scores gets advantage 0 (exactly); group_size < 2 raises ``ValueError``.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    G = _check_group_size(group_size)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor [N], got shape {list(scores.shape)}")
    if scores.numel() % G:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {G}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    check_finite(scores=scores)
    r = scores.detach().reshape(-1, G).to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    centered = r - r.mean(-1, keepdim=True)  # [n, G]
    flat = (r == r[:, :1]).all(-1, keepdim=True)  # no signal in this group
    if method == "grpo":
        adv = centered / (r.std(-1, keepdim=True) + eps)  # New (vs Dr. GRPO): divide by the group's std
    elif method == "dr_grpo":
        adv = centered
    else:
        adv = centered * G / (G - 1)  # = R_i - (sum_j R_j - R_i) / (G - 1)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(scores.dtype)


def token_advantages(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Each response's advantage [N] on each of its kept tokens [N, R] (0 on padding)."""
    if advantages.dim() != 1 or action_mask.dim() != 2 or advantages.shape[0] != action_mask.shape[0]:
        raise ValueError(f"advantages [N] and action_mask [N, R] must agree, got {list(advantages.shape)} and "
                         f"{list(action_mask.shape)}")
    return torch.where(action_mask.bool(), advantages[:, None], torch.zeros((), dtype=advantages.dtype))
