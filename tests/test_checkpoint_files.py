"""linearize.checkpoint_files: a checkpoint's weights are verified from their headers (truncated,
padded, garbage, missing shards, unparsable config) before push uploads them."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from linearize.checkpoint_files import (
    CheckpointError, checkpoint_problems, safetensors_problem, verify_checkpoint_files,
)


@pytest.fixture
def folder(tmp_path):
    save_file({"a": torch.zeros(64, 8), "b": torch.ones(3)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "linearize_llama"}))
    return tmp_path


def test_a_whole_checkpoint_passes(folder):
    assert safetensors_problem(folder / "model.safetensors") is None
    verify_checkpoint_files(folder)


@pytest.mark.parametrize("cut", [4, 20, -1, -100])
def test_truncated_weights_are_named(folder, cut):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint_files(folder)
    message = str(err.value)
    assert "model.safetensors is truncated" in message and "re-run `linearize convert`" in message
    assert "\n" not in message


def test_extra_bytes_and_a_garbage_header_are_corrupt(folder):
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole + b"\0" * 10)
    assert "is corrupt" in safetensors_problem(weights)
    weights.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 100)
    assert "header is not JSON" in safetensors_problem(weights)
    weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "truncated or corrupt" in safetensors_problem(weights)


def test_missing_shard_and_bad_config_are_listed_in_one_line(folder):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "config.json").write_text("{garbage")
    problems = checkpoint_problems(folder)
    assert any("config.json does not parse" in p for p in problems)
    assert any("model-00002-of-00002.safetensors (named in model.safetensors.index.json) is missing" in p
               for p in problems)
    assert len(problems) == 2
    with pytest.raises(CheckpointError, match="config.json does not parse.*shard"):
        verify_checkpoint_files(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        verify_checkpoint_files(folder / "nothing-here")
