"""Checkers for the notebooks' exercises: each takes the learner's function and says what is wrong with it.

    check_ratio(ratio)                        # notebook 01   utils/checkers/ratio.py
    check_clipped_loss(clipped_loss)          # notebook 02   utils/checkers/clip.py
    check_logprobs(token_logprobs)            # notebook 03   utils/checkers/logprobs.py
    check_shifted_logprobs(shifted_logprobs)  # notebook 03
    check_masked_mean(masked_mean)            # notebook 04   utils/checkers/masking.py
    check_policy_loss(policy_loss_forward)    # notebook 04
    check_kl(kl_k3, estimator="k3")           # notebook 05   utils/checkers/advantages.py
    check_gae(gae)                            # notebook 05
    check_token_rewards(token_rewards)        # notebook 06   utils/checkers/rewards.py

A checker runs the function on small cases of its own (hand-worked ones, then seeded random
ones, then edge cases) and compares with a reference. Only when an answer is wrong does it look
through the mistakes it knows, listed by hand in its module, each a small function computing
what that mistake returns and a message; if one reproduces the answers it is named with the
numbers ("your ratio is inverted: got 0.5 where pi/pi_old = 2"). Otherwise the message says
what was expected and what came back. A wrong answer raises ``AssertionError``; a right one
prints one line, ``✓ check_ratio: all 4 cases pass``. A stub's ``NotImplementedError``
propagates unchanged. The engine (cases, comparison, diagnosis) is ``utils/checkers/engine.py``.
Exercise list: docs/exercises.md (the idea follows ARENA's checkers, which take the learner's
function as an argument).
"""

from utils.checkers.advantages import check_gae, check_kl
from utils.checkers.clip import check_clipped_loss
from utils.checkers.logprobs import check_logprobs, check_shifted_logprobs
from utils.checkers.masking import check_masked_mean, check_policy_loss
from utils.checkers.ratio import check_ratio
from utils.checkers.rewards import check_token_rewards

__all__ = [
    "check_ratio", "check_clipped_loss", "check_logprobs", "check_shifted_logprobs", "check_masked_mean",
    "check_policy_loss", "check_kl", "check_gae", "check_token_rewards",
]
