"""utils.rewards: the word-list reward on hand-written texts."""

import json

import pytest

from utils.rewards import DEFAULT_WORDS_FILE, WordReward, load_words, split_words, word_reward


def test_words_file_is_lowercase_and_nonempty():
    words = json.loads(DEFAULT_WORDS_FILE.read_text())["words"]
    assert len(words) == len(set(words)) > 10
    assert all(w == w.lower() and w.isalpha() for w in words)
    assert {"love", "joy", "sweet"} <= load_words()


def test_split_words():
    assert split_words("O, Romeo! Thou'rt my LOVE.\n'Tis") == ["o", "romeo", "thou'rt", "my", "love", "tis"]
    assert split_words("") == []


def test_hand_cases():
    r = WordReward({"love", "joy"})
    assert r("") == 0.0
    assert r("What light through yonder window breaks") == 0.0
    assert r("Love, love, and JOY!") == 3.0  # every occurrence, any case
    assert r("lovely joyful") == 0.0  # whole words only
    assert r.hits("my love is joy") == ["love", "joy"]
    assert WordReward({"love"}, cap=2)("love love love") == 2.0
    assert WordReward({"love", "joy"}, normalize=True)("love and joy and more") == pytest.approx(0.4)
    assert WordReward({"love"}, normalize=True)("...") == 0.0


def test_default_list_and_determinism():
    text = "ROMEO.\nMy sweet love, what joy! Good night, good night."
    assert word_reward(text) == 6.0  # my, sweet, love, joy, good, good
    r = WordReward()
    assert [r(text) for _ in range(3)] == [6.0, 6.0, 6.0]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        WordReward(set())
    with pytest.raises(ValueError, match="cap"):
        WordReward({"love"}, cap=0)
    with pytest.raises(ValueError, match="str"):
        WordReward({"love"})(["love"])
    bad = tmp_path / "words.json"
    bad.write_text(json.dumps({"words": []}))
    with pytest.raises(ValueError, match="words"):
        load_words(bad)
