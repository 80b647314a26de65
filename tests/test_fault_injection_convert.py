"""Fault injection for `convert`: a writer killed (SIGKILL) at any point leaves either nothing, or the
previous complete checkpoint, or the new complete one: never a half-written folder that looks valid,
and the next write tidies what the killed one left (issue 17).

Each case runs the conversion in a child process that kills itself at one point of the save (after
the weights, inside the remote-code export, inside the tokenizer save, between the two renames of
a replacement), plus a few kills at seeded random times of a whole `linearize convert`.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time

import pytest
from transformers import AutoModelForCausalLM

import linearize
from linearize.outputs import MARKER
from tiny_models import tiny_model
from tiny_tokenizer import byte_tokenizer

CHILD = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import importlib
    import linearize
    conv = importlib.import_module("linearize.convert")  # (the package attribute `convert` is the function)
    
    teacher, out, window, point = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def die(*_, **__):
        os.kill(os.getpid(), signal.SIGKILL)

    def after(original):
        def wrapped(*args, **kwargs):
            original(*args, **kwargs)
            die()
        return wrapped

    if point == "after-weights":  # weights written, remote code not yet
        conv.write_remote_code = die
    elif point == "remote-code":  # weights and remote code written, tokenizer not yet
        conv.write_remote_code = after(conv.write_remote_code)
    elif point == "tokenizer":  # half the tokenizer files written
        import linearize.sources as sources
        load_tokenizer = sources.load_tokenizer
        def tokenizer_that_dies(*args, **kwargs):
            tok = load_tokenizer(*args, **kwargs)
            def save_then_die(folder, *a, **k):
                Path(folder, "tokenizer_config.json").write_text("{")
                die()
            tok.save_pretrained = save_then_die
            return tok
        sources.load_tokenizer = tokenizer_that_dies
    elif point == "between-renames":
        rename, calls = Path.rename, []
        def second_rename_dies(self, target):
            calls.append(self)
            if len(calls) == 2:
                die()
            return rename(self, target)
        Path.rename = second_rename_dies
    linearize.convert_to_folder(teacher, out, linearize.ConversionConfig(window=window), overwrite=True)
''')
POINTS = ("after-weights", "remote-code", "tokenizer", "between-renames")
OLD_WINDOW, NEW_WINDOW = 4, 8


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault") / "teacher"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _window_of_valid_checkpoint(out) -> int | None:
    """The window of the complete checkpoint at ``out``, None if nothing is there; fails on a half one."""
    if not out.exists():
        return None
    names = {p.name for p in out.iterdir()}
    assert {MARKER, "config.json", "model.safetensors", "tokenizer.json"} <= names, f"half-written: {names}"
    model = AutoModelForCausalLM.from_pretrained(out)
    return model.config.linearize["window"]


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def _run_child(teacher_dir, out, point, script):
    return subprocess.run([sys.executable, str(script), str(teacher_dir), str(out), str(NEW_WINDOW), point],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace"])
def test_killed_save_leaves_old_or_new_never_half(teacher_dir, tmp_path, replace):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for point in POINTS if replace else POINTS[:-1]:  # a new folder needs one rename only
        out = tmp_path / point / "conv"
        if replace:
            linearize.convert_to_folder(str(teacher_dir), out, linearize.ConversionConfig(window=OLD_WINDOW))
        run = _run_child(teacher_dir, out, point, script)
        assert run.returncode == -9, f"{point}: the child was meant to be killed\n{run.stderr[-2000:]}"
        assert _window_of_valid_checkpoint(out) == (OLD_WINDOW if replace and point != "between-renames" else None)
        # The next writer tidies up: a replaced folder comes back, temporaries go, the lock is free.
        linearize.convert_to_folder(str(teacher_dir), out, linearize.ConversionConfig(window=NEW_WINDOW),
                                    overwrite=True)
        assert _window_of_valid_checkpoint(out) == NEW_WINDOW
        assert _leftovers(out) == [], point


def test_killed_replacement_between_renames_restores_the_old_checkpoint(teacher_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "conv"
    linearize.convert_to_folder(str(teacher_dir), out, linearize.ConversionConfig(window=OLD_WINDOW))
    (out / "eval_report.json").write_text(json.dumps({"kept": True}))
    assert _run_child(teacher_dir, out, "between-renames", script).returncode == -9
    assert not out.exists()  # killed in the instant between moving the old one aside and the new one in
    with pytest.raises(linearize.LinearizeError, match="already holds"):  # the next writer restores it first
        linearize.convert_to_folder(str(teacher_dir), out, linearize.ConversionConfig(window=NEW_WINDOW))
    assert _window_of_valid_checkpoint(out) == OLD_WINDOW
    assert json.loads((out / "eval_report.json").read_text()) == {"kept": True}
    assert _leftovers(out) == []


def test_cli_convert_killed_at_random_times(teacher_dir, tmp_path):
    rng = random.Random(17)
    cmd = [sys.executable, "-m", "linearize", "convert", str(teacher_dir), "--window", str(NEW_WINDOW)]
    start = time.perf_counter()
    full = subprocess.run(cmd + ["--out", str(tmp_path / "timing")], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    duration = time.perf_counter() - start
    for trial in range(2):
        out = tmp_path / f"kill{trial}"
        child = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.0) * duration)
        child.kill()
        child.wait(60)
        assert _window_of_valid_checkpoint(out) in (None, NEW_WINDOW)
        linearize.convert_to_folder(str(teacher_dir), out, linearize.ConversionConfig(window=NEW_WINDOW),
                                    overwrite=True)
        assert _window_of_valid_checkpoint(out) == NEW_WINDOW and _leftovers(out) == []
