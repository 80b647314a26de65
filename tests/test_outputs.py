"""The output-folder policy (linearize/outputs.py) and the verbs that write through it.

Issue 17 items 1 and 3: no verb replaces or deletes anything it did not write itself.
"""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest
from transformers import AutoModelForCausalLM

import linearize
from linearize import cli
from linearize.errors import OutputError
from linearize.outputs import (
    MARKER, FolderLock, atomic_folder, atomic_write_json, check_output_dir, written_by_linearize,
)
from tiny_models import save_tiny_teacher, tiny_model


@pytest.fixture
def teacher_dir(tmp_path):
    return save_tiny_teacher(tmp_path / "teacher")


def _tree(folder):
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else f":{p.read_bytes()!r}")
                  for p in folder.rglob("*"))


def _convert(args, capsys):
    code = cli.main(["convert", *args])
    return code, capsys.readouterr().err


# --- the policy itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "  ", ".", ".."])
def test_empty_or_dot_paths_are_refused(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="--out"):
        check_output_dir(bad, what="converted checkpoint")


def test_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "project" / "src"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for path in (work, tmp_path / "project", "/"):
        with pytest.raises(OutputError, match="current folder|root"):
            check_output_dir(path, what="converted checkpoint")


def test_foreign_files_are_refused_and_an_empty_folder_is_fine(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="did not write"):
        check_output_dir(foreign, what="converted checkpoint", overwrite=True)
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", what="x") == (tmp_path / "empty").resolve()
    assert check_output_dir(tmp_path / "new" / "deeper", what="x") == (tmp_path / "new" / "deeper").resolve()


def test_an_existing_file_is_refused(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(OutputError, match="existing file"):
        check_output_dir(tmp_path / "model", what="converted checkpoint", overwrite=True)


def test_our_folder_needs_overwrite(tmp_path):
    with atomic_folder(tmp_path / "out", kind="converted-model") as tmp:
        (tmp / "weights").write_text("1")
    assert written_by_linearize(tmp_path / "out") == "converted-model"
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(tmp_path / "out", what="converted checkpoint")
    assert check_output_dir(tmp_path / "out", what="converted checkpoint", overwrite=True)


def test_output_may_not_overlap_a_source(tmp_path):
    src = tmp_path / "teacher"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(OutputError, match="overlaps|current"):
            check_output_dir(out, what="converted checkpoint", sources=[src], overwrite=True)


def test_atomic_folder_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, kind="converted-model") as tmp:
        (tmp / "a").write_text("old")
    before = _tree(out)
    with pytest.raises(RuntimeError), atomic_folder(out, kind="converted-model", overwrite=True) as tmp:
        (tmp / "a").write_text("new, half-written")
        raise RuntimeError("disk died")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries, no lock file left


def test_atomic_folder_replaces_its_own_folder_and_gives_normal_permissions(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, kind="converted-model") as tmp:
        (tmp / "a").write_text("old")
    with atomic_folder(out, kind="converted-model", overwrite=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    atomic_write_json(out / "r.json", {"x": 1})
    assert stat.S_IMODE((out / "r.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_temporaries_of_a_killed_process_are_cleaned(tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getppid()}-efgh"  # a running process: left alone
    live.mkdir()
    with atomic_folder(tmp_path / "out", kind="converted-model") as tmp:
        (tmp / "a").write_text("x")
    assert not stale.exists() and live.exists()


def _hold_lock(folder, ready, release):
    with FolderLock(folder):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path / "out", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputError, match=f"another linearize process \\(pid {holder.pid}\\)"):
            FolderLock(tmp_path / "out").acquire()
    finally:
        release.set()
        holder.join(30)
    with FolderLock(tmp_path / "out"):  # free again once the holder is gone
        pass


# --- `linearize convert` (issue 17 items 1, 3) --------------------------------------------------

def test_convert_into_a_project_folder_changes_nothing(teacher_dir, tmp_path, monkeypatch, capsys):
    project = tmp_path / "x" / "p"
    (project / ".git").mkdir(parents=True)
    (project / "main.py").write_text("hi\n")
    before = _tree(project)
    monkeypatch.chdir(project)
    for out in (".", "", str(project), str(tmp_path / "x")):
        code, err = _convert([str(teacher_dir), "--out", out], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert _tree(project) == before


def test_convert_onto_its_own_teacher_is_refused(teacher_dir, capsys):
    before = _tree(teacher_dir)
    code, err = _convert([str(teacher_dir), "--out", str(teacher_dir)], capsys)
    assert code == 2 and "overlaps the model being read" in err
    assert _tree(teacher_dir) == before


def test_convert_onto_an_existing_file_leaves_it_alone(teacher_dir, tmp_path, capsys):
    target = tmp_path / "model"
    target.write_text("precious")
    code, err = _convert([str(teacher_dir), "--out", str(target)], capsys)
    assert code == 2 and "existing file" in err
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "teacher"]  # no .model.old, no temp


def test_convert_onto_a_foreign_folder_is_refused(teacher_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "results.csv").write_text("1,2\n")
    code, err = _convert([str(teacher_dir), "--out", str(folder)], capsys)
    assert code == 2 and "did not write" in err
    assert [p.name for p in folder.iterdir()] == ["results.csv"]


def test_convert_replaces_its_own_checkpoint_only_when_asked(teacher_dir, tmp_path):
    out = tmp_path / "conv"
    model = linearize.convert(tiny_model("llama"), window=4)
    linearize.save_converted(model, out)
    (out / "eval_report.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds a converted model"):
        linearize.save_converted(model, out)
    assert (out / "eval_report.json").exists()
    linearize.save_converted(model, out, overwrite=True)
    assert not (out / "eval_report.json").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_save_converted_carries_the_tokenizer_of_the_source(teacher_dir, tmp_path):
    """Issue 17 item 13: the README's Python snippet saves a folder `linearize generate` can use."""
    model = linearize.convert(str(teacher_dir), linearize.ConversionConfig(window=4))
    out = linearize.save_converted(model, tmp_path / "conv")
    assert (out / "tokenizer.json").is_file()
    pieces = list(linearize.generate_stream(str(out), "w1 w2", max_new_tokens=2))
    assert pieces


def test_convert_checks_the_settings_against_the_model_before_loading_weights(teacher_dir, tmp_path, monkeypatch):
    """Issue 17 item 10: a window longer than the context, or a kept layer the model lacks, is refused
    from the config alone, before the weights load."""
    import linearize.sources as sources

    def no_weights(*_, **__):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(sources, "load_teacher", no_weights)
    for config in (linearize.ConversionConfig(window=10_000), linearize.ConversionConfig(keep_softmax_layers=[7])):
        with pytest.raises(ValueError, match="max_position_embeddings|not a layer"):
            linearize.convert_to_folder(str(teacher_dir), tmp_path / "conv", config)
    assert not (tmp_path / "conv").exists()


def test_saved_weights_are_readable_like_any_new_file(tmp_path):
    """Issue 17 item 19: safetensors writes 0600 and mkdtemp 0700; a saved model has the umask's modes."""
    out = linearize.save_converted(linearize.convert(tiny_model("llama"), window=4), tmp_path / "conv")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
