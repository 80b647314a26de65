"""benchmarks/recipe_steps.py on a tiny recipe: each variant runs its own tree in a fresh process and
reports the child's numbers; a failed run raises with its log's end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_finetune_inputs, tiny_recipe

from benchmarks import recipe_steps


def _recipe(tmp_path: Path) -> Path:
    """tiny_models.tiny_recipe as a file, its teacher a saved folder (the runs are other processes)."""
    teacher, _ = tiny_finetune_inputs(tmp_path)
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(tiny_recipe(tmp_path, "unused", f"model={teacher}").to_yaml())
    return path


def test_two_trees_alternate_and_report_the_childs_numbers(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    out = tmp_path / "runs.json"
    logs = tmp_path / "logs"
    assert recipe_steps.main([str(recipe), "--steps", "2", "--max-tokens", "4000", "--code", f"a={recipe_steps.REPO}",
                              "--code", f"b={recipe_steps.REPO}", "--logs", str(logs), "--out", str(out),
                              "--set", "train.log_every=1"]) == 0
    runs = json.loads(out.read_text())
    assert [r["variant"] for r in runs] == ["a", "b"]
    for r in runs:
        assert 0.1 < r["peak_rss_gb"] < 20  # a Python process with torch: hundreds of MB, not bytes or kB
        assert r["tokens_per_s"] == pytest.approx(2 * 4 * 16 / r["lora_time_s"])  # 2 steps of batch 4 x 16 tokens
        assert r["user_s"] > 0.5  # the child's CPU time (importing torch alone), not this process's
    # the same code, seed and data: the same losses, to the bit
    assert runs[0]["first_ce"] == runs[1]["first_ce"] and runs[0]["final_ce"] == runs[1]["final_ce"]
    assert runs[0]["finetuned_perplexity"] == runs[1]["finetuned_perplexity"]
    assert sorted(p.name for p in logs.iterdir()) == ["tiny-cpu-a-1.log", "tiny-cpu-b-1.log"]
    log = (logs / "tiny-cpu-a-1.log").read_text()
    assert "lora step 1/2" in log and "lora step 2/2" in log  # the script's and --set's overrides reached the run
    printed = capsys.readouterr().out
    assert "| tiny-cpu.yaml | a | 1 |" in printed and "| tiny-cpu.yaml | b | 1 |" in printed


def test_a_tree_with_its_own_recipe_runs_it(tmp_path):
    tree = tmp_path / "tree"
    (tree / "recipes").mkdir(parents=True)
    (tree / "recipes" / "smollm2-135m-cpu.yaml").write_text("model: x\n")
    assert recipe_steps.recipe_in_tree(recipe_steps.REPO / "recipes/smollm2-135m-cpu.yaml", tree) == tree / "recipes/smollm2-135m-cpu.yaml"
    assert recipe_steps.recipe_in_tree(recipe_steps.REPO / "recipes/gemma3-270m-cpu.yaml", tree) == recipe_steps.REPO / "recipes/gemma3-270m-cpu.yaml"


def test_a_failed_run_raises_with_its_log(tmp_path):
    recipe = _recipe(tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with 2(.|\n)*lora\.no_such_key"):
        recipe_steps.run_once(recipe, "a", recipe_steps.REPO, 1, 1, 4000, extra=("lora.no_such_key=1",))


@pytest.mark.parametrize("spec, message", [("before", "NAME=PATH"), ("x=/nonexistent", "no linearize package")])
def test_code_specs_are_checked(spec, message):
    with pytest.raises(SystemExit, match=message):
        recipe_steps.parse_code([spec])
