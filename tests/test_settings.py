"""PPO_SEED and PPO_THREADS: the two environment settings every notebook reads (utils.models)."""

import pytest
import torch

from utils.models import base_seed, set_threads


def test_base_seed_defaults_to_zero_and_reads_the_env(monkeypatch):
    monkeypatch.delenv("PPO_SEED", raising=False)
    assert base_seed() == 0
    monkeypatch.setenv("PPO_SEED", "7")
    assert base_seed() == 7
    monkeypatch.setenv("PPO_SEED", " ")
    assert base_seed() == 0


@pytest.mark.parametrize("raw", ["one", "1.5", "-1"])
def test_base_seed_rejects_bad_values_by_name(monkeypatch, raw):
    monkeypatch.setenv("PPO_SEED", raw)
    with pytest.raises(ValueError, match="PPO_SEED"):
        base_seed()


def test_set_threads_default_and_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("PPO_THREADS", raising=False)
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("PPO_THREADS", "2")
        assert set_threads(1) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("PPO_THREADS", "0")
        with pytest.raises(ValueError, match="PPO_THREADS"):
            set_threads()
    finally:
        torch.set_num_threads(before)
