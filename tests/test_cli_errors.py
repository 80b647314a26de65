"""The CLI's error boundary: every expected failure is one line `linearize VERB: error: ...` and exit 2,
a traceback only under --debug; a bug keeps its traceback and asks to be reported (exit 1)."""

from __future__ import annotations

import argparse

import dataclasses
import errno
import importlib.util
import os
import subprocess
import sys
import time

import pytest

import linearize
from linearize import cli
from linearize.cli import verbs
from tiny_models import save_tiny_teacher


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``linearize *argv`` in this process."""
    capsys.readouterr()  # drop what fixtures wrote
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: --help, --version and argument errors
        code = exit_.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one line an expected failure prints, last (logging goes through pytest's handler, not stderr;
    transformers' own progress bars may come before it)."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("linearize ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


@pytest.fixture
def teacher_dir(tmp_path):
    return save_tiny_teacher(tmp_path / "teacher")


# --- argument errors: one line naming the option, before anything loads ---------------------------

SEE_GENERATE = " (see `linearize generate --help`)"


@pytest.mark.parametrize("argv, message", [
    (["--num-beams", "0"], "argument --num-beams: must be an integer >= 1, got '0'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got '0'"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be an integer >= 1, got '-3'"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got 'nan'"),
    (["--top-p", "0"], "argument --top-p: must be a finite number above 0 up to 1, got '0'"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number above 0 up to 1, got '1.5'"),
])
def test_generate_option_out_of_range(capsys, argv, message):
    code, err = run(capsys, "generate", "somewhere", "--prompt", "hi", *argv)
    assert (code, err) == (2, f"linearize generate: error: {message}{SEE_GENERATE}\n")


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_empty_prompt(capsys, prompt):
    code, err = run(capsys, "generate", "somewhere", "--prompt", prompt)
    assert (code, err) == (2, "linearize generate: error: argument --prompt: is empty: give the text to continue, "
                              f"e.g. --prompt 'The capital of France is'{SEE_GENERATE}\n")


@pytest.mark.parametrize("argv, message", [
    (["--keep-softmax", "1.5"], "argument --keep-softmax: keep_softmax_layers='1.5': must be comma-separated "
                                "layer indices (integers), e.g. 0,6,-1"),
    (["--window", "0"], "argument --window: window=0: must be an integer from 1 to 1048576 tokens"),
    (["--tau", "nan"], "argument --tau: gate_logit_normalizer=nan: must be a finite number > 0.0"),
    (["--window-weight", "5"], "argument --window-weight: window_weight=5.0: must be a finite number from 0.0 to 1.0"),
])
def test_convert_option_out_of_range(capsys, tmp_path, argv, message):
    code, err = run(capsys, "convert", "nobody/never-loaded", "--out", str(tmp_path / "x"), *argv)
    assert (code, err) == (2, f"linearize convert: error: {message} (see `linearize convert --help`)\n")


# --- cheap checks first: --out before any model is resolved or loaded ------------------------------


def test_convert_checks_out_before_the_model(capsys, tmp_path, monkeypatch):
    import linearize.sources as sources

    monkeypatch.setattr(sources, "resolve_source", lambda *a, **k: pytest.fail("the model was resolved"))
    start = time.perf_counter()
    code, err = run(capsys, "convert", "nobody/does-not-exist", "--out", "")
    assert time.perf_counter() - start < 5
    assert (code, one_error_line(err)) == (
        2, "linearize convert: error: --out is empty: name a new folder for the converted checkpoint, e.g. --out out/model")


def test_convert_refuses_its_own_folder_without_overwrite(capsys, teacher_dir, tmp_path):
    out = tmp_path / "converted"
    assert run(capsys, "convert", str(teacher_dir), "--out", str(out), "--window", "4")[0] == 0
    code, err = run(capsys, "convert", str(teacher_dir), "--out", str(out), "--window", "4")
    assert (code, one_error_line(err)) == (
        2, f"linearize convert: error: --out {out} already holds a converted model: pass --overwrite to "
        "replace it, or choose another --out")
    assert run(capsys, "convert", str(teacher_dir), "--out", str(out), "--window", "8", "--overwrite")[0] == 0
    assert '"window": 8' in (out / "config.json").read_text()


# --- the boundary itself ---------------------------------------------------------------------------


def test_full_disk_is_one_line_with_the_path(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "model.safetensors"))

    monkeypatch.setattr(linearize, "convert_to_folder", full_disk)
    code, err = run(capsys, "convert", "--out", str(out))
    assert (code, one_error_line(err)) == (
        2, f"linearize convert: error: no space left on device: {out / 'model.safetensors'} "
        "(free some space or write to another disk)")


def test_debug_adds_the_traceback(capsys, tmp_path):
    code, err = run(capsys, "convert", "--out", "", "--debug")
    assert code == 2 and "Traceback" in err and "OutputError" in err
    assert err.strip().splitlines()[-1].startswith("linearize convert: error: --out is empty")
    code, err = run(capsys, "--debug", "convert", "--out", "")  # before the verb too
    assert code == 2 and "Traceback" in err


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(linearize, "convert_to_folder", bug)
    code, err = run(capsys, "convert", "--out", "somewhere-new")
    assert code == 1 and "Traceback" in err
    assert err.strip().splitlines()[-1] == (
        "linearize convert: internal error: RuntimeError: boom. This is a bug: please report it with the command "
        "you ran and the traceback above.")


def _without(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_eval_without_lm_eval_fails_at_once_with_the_pip_command(capsys, monkeypatch):
    _without(monkeypatch, "lm_eval")
    code, err = run(capsys, "eval", "some-dir")
    assert (code, one_error_line(err)) == (
        2, "linearize eval: error: linearize eval needs lm-eval, which is not installed: pip install "
        "'linearize[eval]' (or pip install -e '.[eval]' in a checkout)")


def test_bench_without_matplotlib_says_so_before_measuring(capsys, caplog, monkeypatch):
    """No chart without matplotlib, said first; the table and JSON do not need it (issue 17 item 11)."""
    _without(monkeypatch, "matplotlib")
    code, err = run(capsys, "bench", "no-such-dir")
    assert code == 2 and "no-such-dir" in one_error_line(err)
    assert "matplotlib is not installed: no PNG chart will be drawn (pip install 'linearize[bench]')" in caplog.text


def test_missing_extra_met_deep_inside_a_verb(capsys, monkeypatch):
    def no_lm_eval(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")

    monkeypatch.setitem(cli.VERBS, "eval", dataclasses.replace(cli.VERBS["eval"], run=no_lm_eval))
    code, err = run(capsys, "eval", "d")
    assert (code, one_error_line(err)) == (
        2, "linearize eval: error: the optional package 'lm_eval' is not installed: pip install 'linearize[eval]'")


# --- generate ----------------------------------------------------------------------------------------


def test_chat_without_a_chat_template(capsys, teacher_dir):
    code, err = run(capsys, "generate", str(teacher_dir), "--prompt", "w4 w5", "--chat")
    assert (code, one_error_line(err)) == (
        2, "linearize generate: error: this tokenizer has no chat template: drop --chat")


def test_generation_that_ends_at_once_gets_a_hint(capsys, caplog, monkeypatch):
    monkeypatch.setattr(linearize, "generate_stream", lambda *a, **k: iter(["", " \n"]))
    code, err = run(capsys, "generate", "m", "--prompt", "hi", "--chat")
    assert code == 0
    assert ("the model ended its turn at once; an untrained conversion often does: finetune it first "
            "(linearize finetune) or drop --chat") in caplog.text
    caplog.clear()
    monkeypatch.setattr(linearize, "generate_stream", lambda *a, **k: iter(["Paris."]))
    assert run(capsys, "generate", "m", "--prompt", "hi", "--chat")[0] == 0
    assert "at once" not in caplog.text


# --- dispatch, help, version ---------------------------------------------------------------------------


def test_each_verb_runs_its_own_function():
    parser = cli.build_parser()
    for name, verb in cli.VERBS.items():
        argv = {"convert": ["--out", "x"], "generate": ["--prompt", "p"], "push": ["d", "u/n"],
                "finetune": ["r.yaml"]}.get(name, ["d"])
        assert parser.parse_args([name, *argv]).run is verb.run is getattr(verbs, f"run_{name}")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"linearize {linearize.__version__}"


def test_dtype_choices_are_the_one_table():
    from linearize.config import DTYPE_NAMES

    for verb in ("convert", "bench", "eval"):
        parser = argparse.ArgumentParser()
        cli.VERBS[verb].add(parser)
        (dtype,) = [a for a in parser._actions if a.dest == "dtype"]
        assert tuple(dtype.choices) == DTYPE_NAMES, verb


def test_damaged_weights_met_anywhere_are_one_line(capsys, monkeypatch):
    from safetensors import SafetensorError

    def damaged(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setattr(linearize, "convert_to_folder", damaged)
    code, err = run(capsys, "convert", "--out", "somewhere-new")
    assert (code, one_error_line(err)) == (
        2, "linearize convert: error: a safetensors weights file is damaged or incomplete (Error while deserializing "
        "header: incomplete metadata, file not fully covered): copy or download the model again, or re-save it")


def test_permission_denied_names_the_path(capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv/models/out")

    monkeypatch.setattr(linearize, "convert_to_folder", denied)
    code, err = run(capsys, "convert", "--out", "somewhere-new")
    assert (code, one_error_line(err)) == (
        2, "linearize convert: error: permission denied: /srv/models/out (choose a folder you can write to, or "
        "change its permissions)")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_help_imports_neither_torch_nor_transformers():
    """`linearize --help` / `--version` / a verb's help answer without torch or transformers (0.2 s,
    against 6 s when `import linearize` loaded them)."""
    done = _python(
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"  # importing them fails
        "from linearize.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['push', '--help'], ['bench', '--help'], ['--version']):\n"
        "    try: main(argv)\n"
        "    except SystemExit as e: assert e.code == 0, argv\n")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("first", ["linearize", "transformers"])
def test_import_linearize_registers_the_auto_classes_in_either_order(first):
    imports = ["import linearize", "import transformers"]
    done = _python(
        "import sys\n" + "\n".join(imports if first == "linearize" else imports[::-1]) + "\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'linearize_llama' in CONFIG_MAPPING, 'not registered'\n"
        "import linearize.convert\n"
        "assert callable(linearize.convert), 'the submodule hid the function'\n")
    assert done.returncode == 0, done.stderr[-2000:]
