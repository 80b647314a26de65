"""Fault injection for finetune (convert's is in test_fault_injection_convert.py): kill it with
SIGKILL at seeded pseudo-random moments and check that nothing valid-looking is left half-done, and
that the resumed run completes as if nothing had happened."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_finetune_inputs



# --- finetune ------------------------------------------------------------------------------------
#
# One run (a forked child) is killed four times at seeded pseudo-random moments (a random time
# after a random checkpoint step); each time the folder is checked, then the run is resumed. The
# finished run must equal the uninterrupted one, bit for bit.

FINETUNE_KILLS = 4
FINETUNE_SEED = 17


def _finetune_recipe(tmp_path: Path) -> Path:
    teacher, corpus = tiny_finetune_inputs(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model: {teacher}
output_dir: {tmp_path / 'run'}
conversion: {{mixer: lizard, window: 4}}
data: {{source: {corpus}, seq_len: 16, validation_samples: 8}}
stages: [attention_transfer, lora]
attention_transfer: {{lr: 1.0e-2, max_steps: 3, schedule: constant}}
lora: {{lr: 1.0e-2, max_steps: 4, schedule: constant}}
train: {{batch_size: 4, eval_batches: 1, save_every: 1, keep_checkpoints: 2, tensorboard: false}}
""")
    return path


def _finetune_child(recipe: str, overrides: list[str], resume: bool) -> None:
    from linearize.recipe import load_recipe
    from linearize.train import finetune

    torch.set_num_threads(1)
    try:
        finetune(load_recipe(recipe, overrides), resume=resume)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _finetune(recipe: Path, *overrides: str, resume: bool = False):
    """A finetune in a forked child (the imports are already paid for: each run takes seconds)."""
    proc = multiprocessing.get_context("fork").Process(target=_finetune_child, args=(str(recipe), list(overrides), resume))
    proc.start()
    return proc


def _check_run_folder(out: Path) -> None:
    """Whatever is visible in a run folder is complete: checkpoints, model, adapter, summary."""
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401 (registers the converted classes)

    for ckpt in sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["checkpoint_stage"] == "attention_transfer":
            saved = torch.load(ckpt / "transfer_state.pt", weights_only=True)
            assert saved["params"] and saved["optimizer"]["state"], ckpt
        else:
            assert load_file(str(ckpt / "model.safetensors")), ckpt
            assert torch.load(ckpt / "optimizer.bin", weights_only=False)["state"], ckpt
    if (out / "model").exists():
        model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    if (out / "adapter").exists():
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    if (out / "training_summary.json").exists():  # written last: everything else is in place
        summary = json.loads((out / "training_summary.json").read_text())
        assert (out / "model" / "training_summary.json").is_file() and (out / "adapter").is_dir()
        assert summary["global_step"] == 7
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name or ".old" in p.name]
    assert all(name.startswith(".") for name in leftovers), leftovers  # hidden, never valid-looking


def _latest_step(out: Path) -> int:
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
    return max(steps, default=0)


@pytest.mark.usefixtures("one_thread")
def test_finetune_killed_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path):
    recipe = _finetune_recipe(tmp_path)
    import linearize.train  # noqa: F401 (imported once, before forking)

    reference = _finetune(recipe, f"output_dir={tmp_path / 'reference'}")
    reference.join(timeout=300)
    assert reference.exitcode == 0

    out = tmp_path / "run"
    rng = random.Random(FINETUNE_SEED)
    outcomes = []
    # Each kill waits for a checkpoint at or past a random step (7 = the last: the kill then lands in
    # the merge and saves), then a random fraction of a step more.
    for target in sorted(rng.sample(range(1, 8), FINETUNE_KILLS)):
        proc = _finetune(recipe, resume=_latest_step(out) > 0)
        deadline = time.perf_counter() + 300
        while proc.is_alive() and _latest_step(out) < target and time.perf_counter() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        outcomes.append(proc.exitcode)
        if out.exists():
            _check_run_folder(out)
    assert -signal.SIGKILL in outcomes  # at least one kill landed mid-run

    proc = _finetune(recipe, resume=_latest_step(out) > 0)
    proc.join(timeout=300)
    assert proc.exitcode == 0
    _check_run_folder(out)
    want = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    got = load_file(str(out / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    summary = json.loads((out / "training_summary.json").read_text())
    ref_summary = json.loads((tmp_path / "reference" / "training_summary.json").read_text())
    for stage in ("attention_transfer", "lora"):
        assert summary["stages"][stage]["history"] == ref_summary["stages"][stage]["history"]
