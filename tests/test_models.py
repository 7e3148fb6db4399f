"""The bundled small GPT-2 (built by `make model`) and the two load paths of `load_policy`."""

import functools
import json
from pathlib import Path

import huggingface_hub

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from utils import context_length, load_policy
from utils.models import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def bundled():
    return load_policy()


def test_bundled_model_is_a_real_gpt2_in_eval_mode(bundled):
    model, tok = bundled
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training, "load_policy must return eval mode (dropout off)"
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert context_length(model) == model.config.n_positions == 256
    assert len(tok) == model.config.vocab_size


def test_manifest_records_the_build():
    m = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    for key in ("build", "corpus", "train_loss_curve", "val_perplexity", "unigram_val_perplexity", "samples"):
        assert key in m
    assert len(m["corpus"]["sha256"]) == 64
    first, last = m["train_loss_curve"][0][1], m["train_loss_curve"][-1][1]
    assert last < first - 2.0, "training barely moved the loss"
    assert m["val_perplexity"] < m["unigram_val_perplexity"] / 2, "no better than counting words"


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return load_policy()[1]


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_tokenizer_round_trips_any_text(text):
    tokenizer = _tokenizer()  # not a fixture: hypothesis reruns the body many times
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_model_writes_english_words(bundled):
    """Not token soup: most generated words are words that occur in the corpus's vocabulary of common words."""
    model, tok = bundled
    torch.manual_seed(0)
    enc = tok("KING.\nWhat news", return_tensors="pt")
    out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=60)
    words = [w.strip(".,;:!?'\"-[]()").lower() for w in tok.decode(out[0]).split()]
    common = {"the", "and", "i", "to", "of", "a", "my", "you", "that", "in", "is", "not", "me", "it", "with",
              "be", "his", "your", "this", "he", "but", "for", "have", "thou", "so", "will", "what", "her",
              "thy", "no", "by", "all", "do", "shall", "if", "are", "we", "thee", "our", "on", "lord", "good",
              "now", "king", "sir", "o", "come", "as", "him", "let", "or", "more", "here", "there", "then"}
    assert sum(w in common for w in words) >= 5, words


def test_env_setting_switches_the_model(tmp_path, monkeypatch, bundled):
    _, tok = bundled
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=1)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setenv("PPO_POLICY", str(tmp_path))
    model, _ = load_policy()
    assert context_length(model) == 32


@pytest.mark.slow
def test_build_runs_end_to_end_on_a_tiny_config(tmp_path):
    from utils.build_model import BuildConfig, build

    cfg = BuildConfig(vocab_size=300, n_layer=1, n_head=1, n_embd=16, n_positions=32, block_size=16,
                      batch_size=2, steps=3, warmup=1)
    m = build(tmp_path, cfg, quiet=True)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "manifest.json").exists()
    model, tok = load_policy(tmp_path)
    assert len(tok) == 300 and m["parameters"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- load_policy


def test_load_policy_from_a_saved_folder(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    fresh = GPT2LMHeadModel(cfg)
    fresh.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR)).save_pretrained(tmp_path)  # as shipped: no pad token
    model, tok = load_policy(tmp_path)
    assert not model.training
    assert model.config.n_embd == 32 and model.config.n_positions == 64
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, fresh.transformer.h[0].attn.c_attn.weight)
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_load_policy_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_policy(tmp_path)  # a folder without config.json


def test_load_policy_unknown_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(RuntimeError) as info:
        load_policy("no-such-org/no-such-model-for-ppo-tests")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "bundled model" in msg and "save_pretrained" in msg


@pytest.mark.parametrize("where", ["/no/such/dir", "./no-such-model-dir", Path("no-such-model-dir")])
def test_load_policy_nonexistent_folder_says_so(where):
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        load_policy(where)


def test_load_policy_file_is_not_a_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_policy(tmp_path / "model.bin")
