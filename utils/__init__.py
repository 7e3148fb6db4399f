"""Helpers derived in the PPO actor-loss notebooks, kept here so later notebooks import them.

One module per idea (each docstring names the notebook that derives it):
checks (input validation, ``cmp``), masking (``masked_mean``), logprobs (token
log-probs), loss (``policy_loss``, ``PolicyLoss``), models (``load_policy``),
kl (``kl_estimate``), advantages (``token_rewards``, ``gae``, ``whiten``),
objectives (the ratio family: GSPO, CISPO, GMPO, ...), groups (G responses per prompt, GRPO / Dr. GRPO / RLOO advantages), rewards (the word-list score), ppo (``ActorConfig``, ``rollout``, ``actor_update``,
``train``), checkers (exercise checkers), profiling (time and peak memory).
"""

import warnings

# transformers imports tqdm.auto, which warns (with a file path) when ipywidgets is absent; we use plain tqdm.
warnings.filterwarnings("ignore", message="IProgress not found")

from utils.checks import cmp  # noqa: E402
from utils.logprobs import entropy_from_logits, logprobs_from_logits, position_ids_from_mask, response_logits, sequence_logprobs
from utils.loss import AGGREGATIONS, PolicyLoss, aggregate, clipped_surrogate, global_normalizer, policy_loss
from utils.objectives import OBJECTIVES, ObjectiveLoss, objective_loss, per_token_loss
from utils.groups import GroupBatch, group_advantages, sample_groups, token_advantages
from utils.masking import masked_mean, masked_sum, response_mask
from utils.advantages import gae, returns_to_go, token_rewards, whiten
from utils.kl import kl_estimate
from utils.diagnose import Finding, diagnose  # noqa: E402  (utils.diagnose is the function; its module's names ride on it)
from utils.models import DEFAULT_MODEL_DIR, base_seed, context_length, load_policy, set_seed, set_threads

__all__ = [
    "cmp", "entropy_from_logits", "logprobs_from_logits", "position_ids_from_mask", "response_logits",
    "sequence_logprobs", "PolicyLoss", "aggregate", "clipped_surrogate", "policy_loss", "masked_mean",
    "masked_sum", "response_mask", "gae", "returns_to_go", "token_rewards", "whiten", "kl_estimate", "DEFAULT_MODEL_DIR", "base_seed",
    "context_length", "load_policy", "set_seed", "set_threads",
    "AGGREGATIONS", "global_normalizer", "OBJECTIVES", "ObjectiveLoss", "objective_loss", "per_token_loss",
    "GroupBatch", "group_advantages", "sample_groups", "token_advantages", "diagnose", "Finding",
]

# Submodules reachable as attributes after a plain `import utils` (the notebooks' one calling style).
from utils import advantages, kl, kl_gradient, ppo, profiling, results, rewards, rollout_correction  # noqa: E402,F401
