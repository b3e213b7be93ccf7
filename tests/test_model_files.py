"""Damaged or wrong model inputs fail with one message naming the file, before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_skill
from skillbook.errors import ConfigError
from skillbook.ml import model_files


@pytest.fixture
def llama_copy(family_model, tmp_path):
    return shutil.copytree(family_model("llama"), tmp_path / "m")


def test_truncated_safetensors_is_named(llama_copy):
    with open(llama_copy / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ConfigError, match=r"model\.safetensors is not a readable safetensors file .* truncated"):
        model_files.check_model_path(llama_copy)


def test_a_dir_without_weights_or_config_is_named(llama_copy, tmp_path):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has config.json but no weights"):
        model_files.check_hf_dir(llama_copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        model_files.check_hf_dir(tmp_path / "empty")


def test_unknown_model_type_and_broken_config_are_named(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps(cfg | {"model_type": "foo"}))
    with pytest.raises(ConfigError, match="model_type 'foo', which transformers .* cannot build"):
        model_files.check_hf_dir(llama_copy)
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a readable config.json"):
        model_files.check_hf_dir(llama_copy)


def test_junk_gguf_is_refused_by_the_recipes_that_take_one(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"junk")
    for skill, sets in (("serving", {"smoke": True}), ("evaluation", {})):
        with pytest.raises(ConfigError, match="is not a GGUF file"):
            run_skill(skill, tmp_path / "runs", {"model": str(junk), **sets})
