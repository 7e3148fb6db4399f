"""Load the policy: the bundled small GPT-2 by default, a hub name or a folder on request.

The one setting: ``load_policy("gpt2")`` (or the environment variable
``PPO_POLICY=gpt2``) switches every notebook to a hub model when you are online.
Used from notebooks/00_map_and_model.ipynb on.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "data" / "tiny-gpt2"
POLICY_ENV = "PPO_POLICY"  # name or folder; unset = the bundled model
SEED_ENV = "PPO_SEED"  # shifts every seed the notebooks use; unset = 0
THREADS_ENV = "PPO_THREADS"  # overrides the thread count a notebook sets


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def base_seed() -> int:
    """The series' base seed: ``$PPO_SEED`` (default 0). Notebooks seed with ``base_seed() + k``.

    ``make robust`` runs every notebook with ``PPO_SEED=1`` to show that no claim rests on one draw.
    """
    return _env_int(SEED_ENV, 0, 0)


def set_threads(default: int = 2) -> int:
    """Set torch's intra-op thread count to ``$PPO_THREADS`` if set, else ``default``; return it.

    The series is measured on 2 cores; a reader with more can raise it. Results stay within the
    asserts' margins whatever the count (float sums round differently with other thread counts).
    """
    n = _env_int(THREADS_ENV, default, 1)
    torch.set_num_threads(n)
    return n


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (all the randomness the series uses)."""
    random.seed(seed)
    torch.manual_seed(seed)


def load_policy(name: str | os.PathLike | None = None, device: torch.device | str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    name: None -> ``$PPO_POLICY`` if set, else the bundled ``data/tiny-gpt2`` that
    ``make model`` builds; otherwise a folder written by ``save_pretrained`` or a hub
    name such as ``"gpt2"`` / ``"distilgpt2"`` (needs the network or a warm HF cache).
    The tokenizer gets ``pad_token = eos_token`` (GPT-2 has none) and left padding,
    which batched generation needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in every notebook

    name = name if name is not None else os.environ.get(POLICY_ENV) or DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    is_local = path.is_dir() or str(name) == str(DEFAULT_MODEL_DIR)
    # a Path, or a string starting like one ("/", "./", "../", "~"), is a folder, never a hub name ("gpt2", "org/model")
    looks_local = isinstance(name, os.PathLike) or str(name).startswith(("/", "./", "../", "~", "\\"))
    if looks_local and not is_local:
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"no model folder at {path}: the folder {what}. Pass a folder written by "
                                "save_pretrained, a hub name such as 'gpt2', or nothing for the bundled model")
    if is_local and not (path / "config.json").is_file():
        hint = "run `make model` to build it" if path == DEFAULT_MODEL_DIR else "save one there with save_pretrained"
        raise FileNotFoundError(f"no model at {path}: {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
        model = AutoModelForCausalLM.from_pretrained(str(name))
    except OSError as err:  # hub names offline end here
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise RuntimeError(
            f"could not load {str(name)!r}: {err.__class__.__name__}. "
            + ("HF_HUB_OFFLINE is set and it is not in your Hugging Face cache; " if offline else "")
            + "a hub name needs the network (or a cached copy). Offline, use the bundled model "
            "(load_policy() with no name, after `make model`) or a folder written by save_pretrained."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 ships no pad token; masks tell pads apart
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts pad on the left
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def context_length(model) -> int:
    """The longest sequence the model accepts (GPT-2: ``n_positions``)."""
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))
