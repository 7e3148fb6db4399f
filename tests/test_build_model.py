"""The shipped small GPT-2 is the one its manifest describes, and rebuilding never overwrites it."""

import json

import pytest

from utils.build_model import BuildConfig, MODEL_FILES, REBUILD_DIR, build, file_hashes
from utils.models import DEFAULT_MODEL_DIR


def test_shipped_files_match_the_manifest():
    manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    recorded = manifest["files"]
    assert set(MODEL_FILES) <= set(recorded), f"manifest lacks hashes for {set(MODEL_FILES) - set(recorded)}"
    assert file_hashes(DEFAULT_MODEL_DIR) == recorded, "data/tiny-gpt2 differs from its manifest: was it rebuilt in place?"


def test_file_hashes_see_a_changed_byte(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "manifest.json").write_text("{}")
    before = file_hashes(tmp_path)
    assert list(before) == ["a.bin"]  # the manifest does not hash itself
    (tmp_path / "a.bin").write_bytes(b"\x00\x02")
    assert file_hashes(tmp_path) != before


def test_build_refuses_the_shipped_folder():
    with pytest.raises(ValueError, match="refusing to overwrite the shipped model"):
        build(DEFAULT_MODEL_DIR, BuildConfig(steps=1), quiet=True)
    assert REBUILD_DIR != DEFAULT_MODEL_DIR


def test_a_rebuilt_folder_records_its_own_hashes(tmp_path):
    out = tmp_path / "m"
    cfg = BuildConfig(steps=2, n_layer=1, n_embd=32, n_head=2, vocab_size=300, batch_size=2, block_size=16, seed=3)
    manifest = build(out, cfg, quiet=True)
    assert manifest["build"]["seed"] == 3
    assert manifest["files"] == file_hashes(out)
    assert set(MODEL_FILES) <= set(manifest["files"])
