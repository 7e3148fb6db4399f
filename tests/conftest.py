"""Fixtures shared by the test modules."""

import os
import random
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_rng(request):
    """torch's and Python's global generators seeded per test, from its name plus ``$PPO_TEST_SEED`` (default 0).

    A test's draws then do not depend on which tests ran before it on the same pytest-xdist worker, and
    ``make test-seeds`` (``PPO_TEST_SEED=1``; ``SEEDS="1 2 3"`` for more) checks that no test holds only for one lucky draw.
    """
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("PPO_TEST_SEED", "0"))
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: a 1.35M-parameter model gains nothing from 2, and on a busy machine
    they spin-wait. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
