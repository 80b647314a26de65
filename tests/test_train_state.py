"""The finetune's run state, checkpoints and resume decision, without training anything."""

from __future__ import annotations

import json

import pytest

from linearize.recipe import Recipe
from linearize.train.state import (
    STATE_FILE, Checkpoints, ResumeError, RunState, StageState, plan_resume, stage_total,
)


def _state(recipe: Recipe, steps: dict[str, int], done: dict[str, bool], per_epoch: int = 10) -> RunState:
    stages = {}
    for name in recipe.stages:
        cfg = getattr(recipe, name)
        st = StageState(per_epoch, stage_total(per_epoch, cfg.epochs, cfg.max_steps), done=done[name],
                        steps=steps[name], history={"loss": [1.0] * steps[name]})
        if done[name]:
            st.results = {"final_loss": 1.0, "first_loss": 1.0, "tokens_per_s": 5.0}
        stages[name] = st
    return RunState(recipe=recipe.to_dict(), world_size=1, data={"train_blocks": 40}, stages=stages,
                    global_step=sum(steps.values()), tokens_seen=64 * sum(steps.values()),
                    checkpoint_stage=recipe.stages[-1])


def _recipe(**lora) -> Recipe:
    r = Recipe(model="tiny", output_dir="runs/x", stages=["attention_transfer", "lora"])
    r.attention_transfer.max_steps = 4
    r.lora.max_steps = 4
    for k, v in lora.items():
        setattr(r.lora, k, v)
    return r


def _write(root, step: int, state: RunState) -> Checkpoints:
    ckpts = Checkpoints(root / "checkpoints", keep=2)
    ckpts.save(step, lambda folder: (folder / "weights.bin").write_bytes(b"w" * 10), state)
    return ckpts


def test_state_round_trips_through_the_checkpoint_json_layout(tmp_path):
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 2}, {"attention_transfer": True, "lora": False})
    state.stages["attention_transfer"].results["per_layer_after"] = {"layers": [0, 1], "mse": [0.1, 0.2]}
    state.extra["merge_check_relative_rms"] = 1e-7
    data = json.loads(json.dumps(state.to_dict()))
    # the layout older checkpoints and summaries have: results flat in each stage, no nesting
    assert data["stages"]["attention_transfer"]["final_loss"] == 1.0
    assert data["stages"]["attention_transfer"]["per_layer_after"]["mse"] == [0.1, 0.2]
    assert data["checkpoint_stage"] == "lora" and data["merge_check_relative_rms"] == 1e-7
    assert RunState.from_dict(data) == state
    assert RunState.from_dict(data).to_dict() == data


def test_checkpoints_are_complete_or_invisible_and_rotate(tmp_path):
    state = _state(_recipe(), {"attention_transfer": 1, "lora": 0}, {"attention_transfer": False, "lora": False})
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert ckpts.latest() is None
    for step in (1, 2, 3):
        ckpts.save(step, lambda folder: (folder / "w.bin").write_bytes(b"x"), state)
    assert [p.name for p in ckpts.all()] == ["step-0000002", "step-0000003"]
    # what a kill leaves: a temp folder mid-write, a folder mid-removal, a folder without its state file
    (ckpts.root / ".tmp-step-0000009").mkdir()
    (ckpts.root / ".tmp-step-0000009" / STATE_FILE).write_text("{}")
    (ckpts.root / ".old-step-0000001").mkdir()
    (ckpts.root / "step-0000008").mkdir()
    assert ckpts.latest().name == "step-0000003"
    ckpts.clean_leftovers()
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["step-0000002", "step-0000003", "step-0000008"]

    def failing(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpts.save(4, failing, state)
    assert ckpts.latest().name == "step-0000003"  # the failed one never became a checkpoint


def test_resume_refuses_missing_or_unexpected_checkpoints(tmp_path):
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints")
    assert plan_resume(ckpts, _recipe().to_dict(), resume=False).checkpoint is None
    with pytest.raises(ResumeError, match="nothing to resume: no checkpoint in"):
        plan_resume(ckpts, _recipe().to_dict(), resume=True)
    _write(tmp_path / "run", 8, _state(_recipe(), {"attention_transfer": 4, "lora": 4},
                                        {"attention_transfer": True, "lora": True}))
    with pytest.raises(ResumeError, match="holds checkpoints of an earlier run: resume it"):
        plan_resume(ckpts, _recipe().to_dict(), resume=False)


@pytest.mark.parametrize("change, keys", [
    (lambda r: setattr(r.lora, "r", 16), "lora.r (8 -> 16)"),
    (lambda r: setattr(r.lora, "targets", ["q_proj"]), "lora.targets"),
    (lambda r: setattr(r.conversion, "window", 8), "conversion.window"),
    (lambda r: setattr(r, "model", "other"), "model ('tiny' -> 'other')"),
    (lambda r: setattr(r.data, "seq_len", 32), "data.seq_len"),
    (lambda r: setattr(r.train, "batch_size", 16), "train.batch_size"),
])
def test_resume_refuses_a_changed_recipe_naming_the_keys(tmp_path, change, keys):
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 2}, {"attention_transfer": True, "lora": False})
    ckpts = _write(tmp_path / "run", 6, state)
    new = _recipe()
    change(new)
    with pytest.raises(ResumeError) as err:
        plan_resume(ckpts, new.to_dict(), resume=True)
    message = str(err.value)
    assert keys in message and "use another output_dir" in message and "\n" not in message
    stages = _recipe()
    stages.stages = ["lora"]
    with pytest.raises(ResumeError, match=r"stages changed \(\['attention_transfer', 'lora'\] -> \['lora'\]\)"):
        plan_resume(ckpts, stages.to_dict(), resume=True)


def test_resume_reads_an_older_recipe_with_this_versions_defaults(tmp_path):
    """A run started before a setting existed (here conversion.linear, added later) resumes: the
    missing key takes its default, so it is not a change. A checkpoint recipe that no longer parses
    is refused with the reason."""
    old = _recipe().to_dict()
    del old["conversion"]["linear"]
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 2}, {"attention_transfer": True, "lora": False})
    state.recipe = old
    ckpts = _write(tmp_path / "run", 6, state)
    plan = plan_resume(ckpts, _recipe().to_dict(), resume=True)
    assert plan.checkpoint is not None and plan.changed == []
    state.recipe = {**old, "conversion": {**old["conversion"], "retired_setting": 3}}
    ckpts = _write(tmp_path / "run2", 6, state)
    with pytest.raises(ResumeError, match="retired_setting.*another version of linearize"):
        plan_resume(ckpts, _recipe().to_dict(), resume=True)


def test_resume_allows_logging_changes_and_extends_the_last_stage(tmp_path):
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 4}, {"attention_transfer": True, "lora": True})
    ckpts = _write(tmp_path / "run", 8, state)
    same = plan_resume(ckpts, _recipe().to_dict(), resume=True)
    assert same.nothing_to_do and same.extended == [] and same.changed == []

    new = _recipe(max_steps=8)
    new.train.log_every, new.train.keep_checkpoints, new.output_dir = 1, 5, "elsewhere/x"
    plan = plan_resume(ckpts, new.to_dict(), resume=True)
    assert plan.extended == ["lora"] and not plan.nothing_to_do
    assert set(plan.changed) == {"lora.max_steps", "train.log_every", "train.keep_checkpoints", "output_dir"}
    lora = plan.state.stages["lora"]
    assert (lora.steps, lora.total_steps, lora.done) == (4, 8, False)
    assert plan.state.stages["attention_transfer"].done
    assert plan.checkpoint == ckpts.latest()

    more_epochs = _recipe(max_steps=None, epochs=2.0)  # 2 epochs of 10 steps
    assert plan_resume(ckpts, more_epochs.to_dict(), resume=True).state.stages["lora"].total_steps == 20


def test_resume_refuses_to_extend_a_stage_that_a_later_one_built_on(tmp_path):
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 2}, {"attention_transfer": True, "lora": False})
    ckpts = _write(tmp_path / "run", 6, state)
    new = _recipe()
    new.attention_transfer.max_steps = 6
    with pytest.raises(ResumeError, match="cannot extend stage attention_transfer to 6 steps: stage lora has trained"):
        plan_resume(ckpts, new.to_dict(), resume=True)
    with pytest.raises(ResumeError, match="stage lora already took 2 steps, the recipe now asks for 1"):
        plan_resume(ckpts, _recipe(max_steps=1).to_dict(), resume=True)
    # before lora starts, stage 1 may still grow
    early = _state(_recipe(), {"attention_transfer": 2, "lora": 0}, {"attention_transfer": False, "lora": False})
    ckpts2 = _write(tmp_path / "run2", 2, early)
    plan = plan_resume(ckpts2, new.to_dict(), resume=True)
    assert plan.state.stages["attention_transfer"].total_steps == 6 and plan.extended == []


def test_plan_resume_writes_nothing(tmp_path):
    state = _state(_recipe(), {"attention_transfer": 4, "lora": 4}, {"attention_transfer": True, "lora": True})
    ckpts = _write(tmp_path / "run", 8, state)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ResumeError):
        plan_resume(ckpts, _recipe(r=16).to_dict(), resume=True)
    plan_resume(ckpts, _recipe(max_steps=8).to_dict(), resume=True)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
