"""What a finetune does to its output folder (issue 17): one run per folder (a lock), only folders of
its own, a changed recipe refused before anything is written, a finished run extended by a longer
stage, an adapter plain peft can load, outputs written atomically, and quiet logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import assert_close_rms
from tiny_models import tiny_recipe, tiny_teacher
from tiny_tokenizer import byte_tokenizer

from linearize.errors import OutputError
from linearize.outputs import MARKER, written_by_linearize
from linearize.train import ADAPTER_DIR, MODEL_DIR, RECIPE_FILE, SUMMARY_FILE, ResumeError, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

# Constant schedules and no KL: a run extended on resume equals one that ran the longer stage at once.
FAST = ("lora.kl_weight=0", "attention_transfer.max_steps=2", "train.save_every=2", "train.keep_checkpoints=1")


def _run(recipe, **kwargs):
    return finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer(), **kwargs)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_finetune_on_a_locked_output_dir_fails_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom linearize.outputs import FolderLock\n"
         f"lock = FolderLock({str(out)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(OutputError) as err:
            _run(tiny_recipe(tmp_path, "run"))
        assert time.perf_counter() - start < 5  # before the teacher is converted or the data packed
        message = str(err.value)
        assert f"{out} is being written by another linearize process (pid {holder.pid})" in message
        assert "\n" not in message
        assert not out.exists() or not any(out.iterdir())  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_output_dir_must_be_new_empty_or_a_finetune_run(tmp_path):
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "main.py").write_text("print('hi')\n")
    with pytest.raises(OutputError, match="is a folder with files linearize did not write"):
        _run(tiny_recipe(tmp_path, "project"))
    assert sorted(p.name for p in theirs.iterdir()) == ["main.py"]
    model = tmp_path / "converted"
    model.mkdir()
    (model / MARKER).write_text(json.dumps({"kind": "converted-model"}))
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="holds a converted model, not a finetune run: choose another output_dir"):
        _run(tiny_recipe(tmp_path, "converted"))
    with pytest.raises(OutputError, match="output_dir .* is an existing file"):
        (tmp_path / "file").write_text("x")
        _run(tiny_recipe(tmp_path, "file"))


def test_run_extend_refuse_and_nothing_to_do(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    first = _run(tiny_recipe(tmp_path, "run", *FAST))
    assert written_by_linearize(out) == "finetune-run"
    # Noise (item 19): no accelerate chatter per checkpoint, no rank prefixes in a one-process run.
    assert not [r for r in caplog.records if r.name.startswith("accelerate")], \
        [r.getMessage() for r in caplog.records if r.name.startswith("accelerate")]
    assert not [r for r in caplog.records if "RANK" in r.getMessage() or "[rank" in r.getMessage()]
    assert any("lora step 4/4" in r.getMessage() for r in caplog.records)

    # A changed shape on resume: refused before anything is written (item 8).
    before = _files(out)
    with pytest.raises(ResumeError) as err:
        _run(tiny_recipe(tmp_path, "run", *FAST, "lora.r=16"), resume=True)
    assert "lora.r (8 -> 16)" in str(err.value) and "use another output_dir" in str(err.value)
    assert _files(out) == before
    assert (out / RECIPE_FILE).read_bytes() == before[RECIPE_FILE]

    # A finished run, resumed with a longer LoRA stage, trains the extra steps (item 18) ...
    caplog.clear()
    extended = _run(tiny_recipe(tmp_path, "run", *FAST, "lora.max_steps=6"), resume=True)
    lora = extended.summary["stages"]["lora"]
    assert (lora["steps"], lora["total_steps"], len(lora["history"]["loss"])) == (6, 6, 6)
    assert extended.summary["global_step"] == 8
    assert json.loads((out / SUMMARY_FILE).read_text())["global_step"] == 8
    assert json.loads((out / MODEL_DIR / SUMMARY_FILE).read_text())["global_step"] == 8
    assert (out / MODEL_DIR / "model.safetensors").read_bytes() != before[MODEL_DIR + "/model.safetensors"]
    assert yaml.safe_load((out / RECIPE_FILE).read_text())["lora"]["max_steps"] == 6
    assert any("extending lora to 6 steps" in r.getMessage() for r in caplog.records)
    # ... and equals a run that took the 6 steps at once.
    straight = _run(tiny_recipe(tmp_path, "straight", *FAST, "lora.max_steps=6"))
    want, got = straight.model.state_dict(), extended.model.state_dict()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert straight.summary["stages"]["lora"]["history"] == lora["history"]

    # Resumed again with nothing to add: one line, nothing trained or rewritten.
    caplog.clear()
    before = _files(out)
    again = _run(tiny_recipe(tmp_path, "run", *FAST, "lora.max_steps=6"), resume=True)
    lines = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert lines == [f"the run in {out} is already finished (8 steps); nothing to do: to train longer, resume "
                     "with a higher <stage>.max_steps or <stage>.epochs"]
    assert _files(out) == before and again.summary["global_step"] == 8
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, extended.model(input_ids=ids).logits)
    del first


def test_adapter_is_written_atomically_and_a_resume_finishes_the_outputs(tmp_path, monkeypatch):
    import linearize.train.lora as lora_module

    out = tmp_path / "run"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(lora_module, "save_file", disk_full)  # fails after peft wrote its files
    with pytest.raises(OSError, match="No space left"):
        _run(tiny_recipe(tmp_path, "run", *FAST))
    assert not (out / ADAPTER_DIR).exists() and not (out / MODEL_DIR).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(f".{ADAPTER_DIR}.tmp")]
    assert (out / "checkpoints").is_dir()
    monkeypatch.undo()

    result = _run(tiny_recipe(tmp_path, "run", *FAST), resume=True)  # nothing left to train: only the outputs
    assert result.summary["global_step"] == 6
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (out / MODEL_DIR / "model.safetensors").is_file() and (out / SUMMARY_FILE).is_file()
    ids = torch.randint(0, 256, (1, 12))
    straight = _run(tiny_recipe(tmp_path, "straight", *FAST))
    with torch.no_grad():
        assert_close_rms(result.model(input_ids=ids).logits, straight.model(input_ids=ids).logits, torch.float32,
                         "outputs finished on resume vs an uninterrupted run")


def test_a_run_folder_from_before_markers_is_still_ours(tmp_path):
    out = tmp_path / "old-run"  # as linearize wrote run folders before they carried a marker
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "trainer_state.json").write_text("{}")
    (out / RECIPE_FILE).write_text("model: tiny\n")
    with pytest.raises(ResumeError, match="holds checkpoints of an earlier run: resume it"):
        _run(tiny_recipe(tmp_path, "old-run"))
    assert written_by_linearize(out) == "finetune-run"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RECIPE_FILE).write_text("x: 1\n")  # a recipe alone is not a run
    with pytest.raises(OutputError, match="files linearize did not write"):
        _run(tiny_recipe(tmp_path, "other"))
