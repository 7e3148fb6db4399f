"""A toy reward: how many words of a response come from a lover's vocabulary.

The list (data/reward_words.json) holds words of love, joy and kindness and the intimate
forms of address (thee, thou, thy, thine, my, mine). The address words are there by
measurement: without them the small GPT-2 writes about 0.17 listed words per 24-token
response, too rare a signal for batch-size-1 updates to move reliably (notebook 06).

In RLHF a learned reward model stands here: a transformer with a scalar head, trained on
human preference pairs, that reads prompt + response and returns one number. This series
trains only the actor, so it uses a reward anyone can read and check by hand: deterministic,
computed on the decoded response text, and easy for the small GPT-2 to move within a few
dozen updates. Like any reward, it can be gamed (a response of "my my thee my" scores
high); the KL penalty to the reference model is what holds the text near the model it was.

Used in notebooks/06_actor_update.ipynb.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from utils.models import REPO_ROOT

DEFAULT_WORDS_FILE = REPO_ROOT / "data" / "reward_words.json"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")  # letters, with an inner apostrophe ("o'er", "'tis" -> "tis")


@functools.lru_cache(maxsize=8)
def load_words(path: str | Path = DEFAULT_WORDS_FILE) -> frozenset[str]:
    """The lower-case reward words from a JSON file ``{"words": [...]}`` (default: data/reward_words.json)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    words = data.get("words") if isinstance(data, dict) else None
    if not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError("the words file must hold {\"words\": [non-empty strings, ...]}")
    return frozenset(w.lower() for w in words)


def split_words(text: str) -> list[str]:
    """Lower-case words of ``text``: runs of letters, keeping an inner apostrophe ("thou'rt")."""
    return _WORD.findall(text.lower())


class WordReward:
    """Reward = number of words of the response found in ``words`` (each occurrence counts).

    ``reward(text) -> float``. ``normalize=True`` divides by the number of words instead
    (a fraction in [0, 1]; an empty response scores 0), which a policy can raise by
    writing *fewer* words; the count cannot be raised that way. ``cap`` limits the count.
    """

    def __init__(self, words: frozenset[str] | set[str] | list[str] | None = None, normalize: bool = False,
                 cap: float | None = None) -> None:
        self.words = load_words() if words is None else frozenset(w.lower() for w in words)
        if not self.words:
            raise ValueError("words is empty: every response would score 0")
        if cap is not None and not cap > 0:
            raise ValueError(f"cap must be > 0, got {cap!r}")
        self.normalize, self.cap = normalize, cap

    def hits(self, text: str) -> list[str]:
        """The words of ``text`` that are in the list, in order (what the score counts)."""
        return [w for w in split_words(text) if w in self.words]

    def __call__(self, text: str) -> float:
        if not isinstance(text, str):
            raise ValueError(f"the reward reads decoded text (str), got {type(text).__name__}")
        n_hits = len(self.hits(text))
        if self.normalize:
            n_words = len(split_words(text))
            return n_hits / n_words if n_words else 0.0
        return float(n_hits if self.cap is None else min(n_hits, self.cap))

    def __repr__(self) -> str:
        return f"WordReward({len(self.words)} words, normalize={self.normalize}, cap={self.cap})"


class LaggedReward:
    """A control: each response gets the score that ``reward_fn`` gave the *previous* response.

    The scores keep their distribution (they are real scores of this policy's responses), but each is
    paired with the wrong response, so a policy-gradient update has nothing to learn from them. The first
    call has no previous response and returns ``first`` (default 0.0). Notebook 06 trains with it to show
    that the reward's rise comes from the reward, not from the KL term, the optimiser or drift.
    """

    def __init__(self, reward_fn, first: float = 0.0) -> None:
        self.reward_fn, self._previous = reward_fn, float(first)

    def __call__(self, text: str) -> float:
        score, self._previous = self._previous, float(self.reward_fn(text))
        return score

    def __repr__(self) -> str:
        return f"LaggedReward({self.reward_fn!r})"


def word_reward(text: str, words: frozenset[str] | set[str] | None = None) -> float:
    """Number of words of ``text`` in ``words`` (default: data/reward_words.json). Deterministic."""
    return WordReward(words)(text)
