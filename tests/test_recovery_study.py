"""The recovery-study driver on a tiny model: variants train, rows and table are written, a finished
variant is not run twice, and kept layers chosen by transfer error are the worst ones."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_teacher, write_corpus
from tiny_tokenizer import byte_tokenizer

from benchmarks import recovery_study as study

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_base_recipe(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_teacher().save_pretrained(teacher_dir)
    byte_tokenizer().save_pretrained(teacher_dir)
    corpus = write_corpus(tmp_path / "corpus.txt")
    recipe = tmp_path / "base.yaml"
    recipe.write_text(
        f"model: {teacher_dir}\n"
        "conversion: {mixer: liger, window: 4, chunk_size: 8}\n"
        f"data: {{source: {corpus}, seq_len: 16, validation_samples: 8}}\n"
        "stages: [lora]\n"
        "lora: {lr: 1.0e-2, schedule: constant}\n"
        "train: {batch_size: 4, eval_batches: 2, log_every: 1}\n"
    )
    return recipe


def test_study_runs_variants_and_writes_table(tmp_path, monkeypatch):
    recipe = tiny_base_recipe(tmp_path)
    out, runs = tmp_path / "study", tmp_path / "runs"
    argv = ["--recipe", str(recipe), "--variants", "liger,lolcats-at", "--steps", "3", "--at-steps", "2",
            "--out", str(out), "--runs", str(runs)]
    assert study.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"liger@3", "lolcats-at@3"}
    liger, at = rows["liger@3"], rows["lolcats-at@3"]
    assert liger["tokens"] == at["tokens"] == 3 * 4 * 16  # the same budget, attention transfer included
    for row in (liger, at):
        assert row["ppl_finetuned"] < row["ppl_start"]  # lr 1e-2 on a 15-word corpus: it learns
        assert row["ppl_ratio"] == pytest.approx(row["ppl_finetuned"] / row["ppl_teacher"])
    assert [t for t, _ in liger["loss_curve"]] == [64, 128, 192]
    assert [t for t, _ in at["loss_curve"]] == [192]  # 2 transfer steps, then 1 LoRA step
    assert at["transfer_layers"] == [0, 1] and len(at["transfer_relative_mse"]) == 2
    assert liger["transfer_relative_mse"] is None
    assert not runs.exists() or not any(runs.iterdir()), "training folders are removed once recorded"
    table = (out / "table.md").read_text()
    assert "| liger |" in table and "| lolcats-at |" in table and (out / "loss.png").is_file()

    # a second call finds both rows and trains nothing
    monkeypatch.setattr(study, "run_variant", lambda *a, **k: pytest.fail("a recorded variant ran again"))
    assert study.main(argv) == 0


def test_teacher_lora_control_trains_the_teacher_on_the_whole_budget(tmp_path):
    """The control: no conversion (the start is the teacher), every step LoRA, the same tokens."""
    recipe = tiny_base_recipe(tmp_path)
    out = tmp_path / "study"
    argv = ["--recipe", str(recipe), "--variants", "teacher-lora,lolcats-at", "--steps", "3", "--at-steps", "2",
            "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert study.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    control, student = rows["teacher-lora@3"], rows["lolcats-at@3"]
    assert control["ppl_start"] == pytest.approx(control["ppl_teacher"], rel=1e-6)
    assert control["ppl_finetuned"] < control["ppl_teacher"]
    assert control["tokens"] == student["tokens"] and [t for t, _ in control["loss_curve"]] == [64, 128, 192]
    assert control["transfer_layers"] is None and "mixer softmax" in control["what"]


def test_worst_layers_and_bad_variants(tmp_path):
    row = {"variant": "x", "transfer_layers": [0, 2, 3, 5], "transfer_relative_mse": [0.1, 0.9, 0.3, 0.5]}
    assert study.worst_layers(row, 2) == [2, 5]
    with pytest.raises(ValueError, match="no per-layer transfer error"):
        study.worst_layers({"variant": "y", "transfer_relative_mse": None}, 1)
    with pytest.raises(SystemExit):
        study.main(["--variants", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # keeps the layers lizard found hardest: needs its row first
        study.main(["--variants", "lizard-keep-1in6-worst", "--out", str(tmp_path)])
    for name, (_, overrides) in study.VARIANTS.items():
        from linearize.recipe import load_recipe

        load_recipe(study.BASE_RECIPE, overrides)  # every variant is a valid recipe
    # the control also on the default recipe (the 60-minute runs): the teacher, LoRA only
    control = load_recipe("recipes/smollm2-135m-cpu.yaml", study.VARIANTS["teacher-lora"][1])
    assert control.stages == ["lora"] and control.conversion.mixer == "softmax"
    control = load_recipe("recipes/smollm2-135m-cpu.yaml", study.VARIANTS["window-sinks-only"][1])
    assert control.conversion.linear == "none" and control.conversion.sink_tokens == 4


def test_rows_from_finished_finetunes(tmp_path):
    summary = {
        "recipe": {"train": {"batch_size": 2, "grad_accum": 1}, "data": {"seq_len": 8},
                   "conversion": {"mixer": "lizard", "normalizer": "shared", "keep_softmax_layers": [1]}},
        "tokens_seen": 64, "wall_time_s": 12.34, "perplexity": {"teacher": 10.0, "converted": 30.0, "finetuned": 12.0},
        "stages": {"attention_transfer": {"tokens": 32, "train_time_s": 3.0},
                   "lora": {"train_time_s": 6.0, "history": {"loss": [2.5, 2.0]}}},
    }
    path = tmp_path / "training_summary.json"
    path.write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert study.main(["--summaries", f"mine={path}", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"].values()
    assert row["loss_curve"] == [[48, 2.5], [64, 2.0]]  # after the 32 transfer tokens, 16 per step
    assert row["train_time_s"] == 9.0 and row["ppl_ratio"] == pytest.approx(1.2)
    assert "| mine | mixer lizard, normalizer shared, keep_softmax_layers [1]; 8-token blocks |" in (
        out / "table.md").read_text()
    with pytest.raises(SystemExit):
        study.main(["--summaries", f"mine={tmp_path / 'missing.json'}", "--out", str(out)])
