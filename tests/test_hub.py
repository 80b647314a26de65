"""`linearize push`: the staged folder is self-contained, its card parses, and failures upload nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import linearize
from conftest import assert_close_rms
from linearize.checkpoint_files import CheckpointError
from linearize.errors import LinearizeError, OutputError
from linearize.outputs import MARKER
from linearize.hub import EVAL_REPORT, TRAINING_SUMMARY, HubError, push, stage_folder, validate_folder
from tiny_tokenizer import byte_tokenizer

REPORT = {  # the shape evals.report writes (schema linearize-eval-report/1)
    "schema": "linearize-eval-report/1", "teacher": "smollm2-135m", "student": "ckpt",
    "settings": {"limit": 50, "num_fewshot": None},
    "tasks": [
        {"task": "linearize_capitals", "metric": "acc", "higher_is_better": True, "teacher": 0.5, "student": 0.4,
         "recovery": 0.8, "n": 50},
        {"task": "linearize_wiki512", "metric": "token_perplexity", "higher_is_better": False, "teacher": 20.0,
         "student": 25.0, "recovery": 0.8, "n": 50},
    ],
    "average": {"teacher": 0.5, "student": 0.4, "recovery": 0.8, "tasks": ["linearize_capitals"]},
    "versions": {"lm_eval": "0.4.13"},
}
SUMMARY = {"tokens_seen": 12345, "perplexity": {"teacher": 20.0, "converted": 80.0, "finetuned": 25.0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted tiny model saved by save_converted, with an eval report and a training summary."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256)).eval()
    model = linearize.convert(teacher)
    folder = linearize.save_converted(model, tmp_path_factory.mktemp("ckpt") / "model", tok)
    (folder / EVAL_REPORT).write_text(json.dumps(REPORT))
    (folder / TRAINING_SUMMARY).write_text(json.dumps(SUMMARY))
    return folder, model


@pytest.fixture(scope="module")
def dry_run(checkpoint, tmp_path_factory):
    folder, _ = checkpoint
    out = tmp_path_factory.mktemp("dry") / "upload"
    assert push(folder, "someone/tiny-linear", dry_run=out) == str(out)
    return out


def test_dry_run_folder_loads_without_linearize_and_gives_the_same_logits(checkpoint, dry_run, tmp_path):
    _, model = checkpoint
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import importlib.util, sys, torch
assert importlib.util.find_spec("linearize") is None, "linearize must not be importable here"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(dry_run)!r}, trust_remote_code=True).eval()
assert "linearize" not in sys.modules
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    # -S: no site processing, so no .pth files and no editable install of linearize; only the
    # installed packages (torch, transformers, ...) on PYTHONPATH, run from an empty folder.
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sorted(site)),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close_rms(torch.load(tmp_path / "logits.pt"), expected, torch.float32, "fresh-process logits")


def test_card_metadata_and_sections(dry_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(dry_run / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # from the report's packaged teacher
    assert card.data.library_name == "transformers" and "linearize" in card.data.tags and "liger" in card.data.tags
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("linearize_capitals", "acc"): 0.4, ("linearize_wiki512", "token_perplexity"): 25.0}
    assert '"mixer": "liger"' in card.text and '"tokens_seen": 12345' in card.text
    assert "| linearize_capitals | acc ↑ | 50 | 0.5 | 0.4 | 0.8 |" in card.text
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "modeling_linearize.py", EVAL_REPORT, TRAINING_SUMMARY):
        assert (dry_run / name).is_file(), name


def test_validation_names_what_is_missing(dry_run, tmp_path):
    broken = stage_folder(dry_run, tmp_path / "broken", "someone/tiny-linear")
    (broken / "modeling_linearize.py").unlink()
    (broken / "model.safetensors").unlink()
    (broken / "README.md").write_text("---\nbase_model: [unclosed\n---\n")
    with pytest.raises(LinearizeError) as err:
        validate_folder(broken)
    msg = str(err.value)
    assert "modeling_linearize.py is missing" in msg and "no .safetensors" in msg and "YAML" in msg


def test_dry_run_folder_follows_the_output_policy(checkpoint, dry_run, tmp_path):
    folder, _ = checkpoint
    with pytest.raises(OutputError, match="already holds a push dry run: pass --overwrite"):
        push(folder, "someone/tiny-linear", dry_run=dry_run)
    again = tmp_path / "again"
    push(folder, "someone/tiny-linear", dry_run=again)
    (again / "stale.txt").write_text("from an earlier dry run")
    assert push(folder, "someone/tiny-linear", dry_run=again, overwrite=True) == str(again)
    assert not (again / "stale.txt").exists() and (again / "README.md").is_file()
    assert oct((again / "README.md").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        push(folder, "someone/tiny-linear", dry_run=foreign, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        push(folder, "someone/tiny-linear", dry_run=a_file)
    with pytest.raises(OutputError, match="overlaps"):
        push(folder, "someone/tiny-linear", dry_run=folder / "upload")
    with pytest.raises(ValueError, match="namespace"):
        push(folder, "tiny-linear", dry_run=dry_run.parent / "x")


def test_truncated_weights_are_refused_before_anything(checkpoint, tmp_path, capsys):
    from linearize import cli

    folder, _ = checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "dry"
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        push(broken, "someone/tiny-linear", dry_run=out)
    assert cli.main(["push", str(broken), "someone/tiny-linear", "--dry-run", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("linearize push: error: ")
    assert "model.safetensors is truncated" in err and "re-run `linearize convert`" in err
    assert not out.exists() and not any(p.name.startswith(".dry") for p in tmp_path.iterdir())


class _RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    calls: list = []

    def __init__(self, token=None, endpoint=None):
        self.calls.append(("init", token))

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": "someone"}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", sorted(os.listdir(kw["folder_path"])), kw["revision"]))
        return "https://huggingface.co/someone/tiny-linear/commit/abc"


def test_push_uploads_the_validated_folder_in_one_call(checkpoint, dry_run, monkeypatch):
    import huggingface_hub

    folder, _ = checkpoint
    _RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    url = push(folder, "someone/tiny-linear", private=True, revision="v1", token="hf_test")
    assert url.endswith("/commit/abc")
    names = [c[0] for c in _RecordingApi.calls]
    assert names == ["init", "whoami", "create_repo", "create_branch", "upload_folder"]
    assert _RecordingApi.calls[2][2]["private"] is True
    (_, uploaded, revision) = _RecordingApi.calls[-1]
    # exactly the dry-run folder, less the marker that says linearize wrote it
    assert revision == "v1" and uploaded == sorted(set(os.listdir(dry_run)) - {MARKER})


def test_push_without_token_or_hub_uploads_nothing(checkpoint, monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants

    folder, _ = checkpoint
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: uploads.append(a))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError, match="no Hugging Face token"):
        push(folder, "someone/tiny-linear")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push(folder, "someone/tiny-linear", token="hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="unreachable"):  # nothing listens on port 9 of the loopback
        push(folder, "someone/tiny-linear", token="hf_test", endpoint="http://127.0.0.1:9")
    assert uploads == []


def test_push_cli(checkpoint, tmp_path, capsys, monkeypatch):
    from linearize import cli

    folder, _ = checkpoint
    assert cli.main(["push", str(folder), "someone/tiny-linear", "--dry-run", str(tmp_path / "out")]) == 0
    assert "nothing uploaded" in capsys.readouterr().out and (tmp_path / "out" / "README.md").is_file()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert cli.main(["push", str(folder), "someone/tiny-linear"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
