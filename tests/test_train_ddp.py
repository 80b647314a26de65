"""Invariant 6: two data-parallel processes (gloo, CPU) take the same optimiser steps as one process
on the same global batch. Runs the real CLI entry (`python -m linearize finetune`, what
`accelerate launch -m linearize` runs) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RTOL, rel_rms
from safetensors.torch import load_file
from tiny_models import tiny_finetune_inputs, tiny_teacher

from linearize.recipe import load_recipe
from linearize.train import MODEL_DIR, SUMMARY_FILE, finetune

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe_file(tmp_path: Path) -> Path:
    teacher_dir, corpus = tiny_finetune_inputs(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model: {teacher_dir}
conversion: {{mixer: lizard, window: 4}}
data: {{source: {corpus}, seq_len: 16, validation_samples: 8}}
stages: [attention_transfer, lora]
attention_transfer: {{lr: 1.0e-2, max_steps: 2, schedule: constant}}
lora: {{lr: 1.0e-2, max_steps: 2, kl_weight: 0.5, schedule: constant}}
train: {{batch_size: 4, grad_accum: 2, eval_batches: 1, log_every: 1, tensorboard: false}}
""")
    return path


def test_two_gloo_processes_take_the_same_steps_as_one(tmp_path):
    recipe_path = _recipe_file(tmp_path)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "linearize", "finetune", str(recipe_path), f"output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[rank 0/2] lora step 2/2" in proc.stderr  # the rank prefix only where there are several
    assert "[RANK" not in proc.stderr and "Removed shared tensor" not in proc.stderr  # accelerate kept quiet

    single = finetune(load_recipe(recipe_path, [f"output_dir={tmp_path / 'one'}"]))
    ddp_summary = json.loads((tmp_path / "ddp" / SUMMARY_FILE).read_text())
    assert ddp_summary["world_size"] == 2 and single.summary["world_size"] == 1
    assert ddp_summary["tokens_seen"] == single.summary["tokens_seen"]

    want = load_file(str(tmp_path / "one" / MODEL_DIR / "model.safetensors"))
    got = load_file(str(tmp_path / "ddp" / MODEL_DIR / "model.safetensors"))
    assert want.keys() == got.keys()
    teacher = tiny_teacher().state_dict()
    changed = 0
    for name, expected in want.items():
        if name in teacher and torch.equal(teacher[name], expected):
            assert torch.equal(got[name], expected), name  # untouched weights stay untouched
            continue
        changed += 1
        err = rel_rms(got[name], expected)
        assert err <= RTOL[torch.float32], f"{name}: relative RMS {err:.3g}"
    assert changed > 0, "training changed no weight"
    for stage in ("attention_transfer", "lora"):
        ddp_loss = ddp_summary["stages"][stage]["history"]["loss"]
        one_loss = single.summary["stages"][stage]["history"]["loss"]
        assert len(ddp_loss) == len(one_loss) == 2, (stage, ddp_loss, one_loss)
        for a, b in zip(ddp_loss, one_loss):
            assert a == pytest.approx(b, rel=1e-4)
