"""`linearize eval` checks its inputs in seconds, before any model loads, and says the fix in one
line: task names (offline ones, standard ones and the hub they need), the device, the eval extra,
the report folder (output policy). A limit bounds the work per task; progress reaches its total."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import linearize  # noqa: E402
from linearize import cli, environment  # noqa: E402
from linearize.checkpoint_files import EVAL_REPORT_KIND  # noqa: E402
from linearize.errors import LinearizeError, OutputError  # noqa: E402
from linearize.evals import recovery, runner  # noqa: E402
from linearize.evals.config import CAPITALS, PASSKEY, WIKI, WIKI_WINDOWS, OfflineTaskConfig, task_config_for  # noqa: E402
from linearize.evals.report import check_report_dir  # noqa: E402
from linearize.outputs import MARKER, written_by_linearize  # noqa: E402
from tiny_models import COMMON  # noqa: E402
from tiny_tokenizer import byte_tokenizer  # noqa: E402

def tiny_llama(vocab: int):
    """A tiny random Llama over the byte tokenizer's vocabulary (lm-eval feeds it real token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": vocab})).eval()


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


class FakeTaskManager:
    """lm-eval's task index, without the ~10 s of indexing."""

    def __init__(self, *args, **kwargs):
        self.all_tasks = ["piqa", "arc_easy", "mmlu"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test: the checks must come first."""
    import linearize.sources

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(linearize.sources, "load_model", refuse)
    monkeypatch.setattr(linearize.sources, "load_tokenizer", refuse)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("eval-inputs") / "student"
    return linearize.save_converted(linearize.convert(tiny_llama(len(tok))), folder, tok)


def one_line_error(capsys, verb="eval") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"linearize {verb}: error: "), err
    return err


def test_task_names_are_checked_up_front(monkeypatch):
    monkeypatch.setattr("lm_eval.tasks.TaskManager", FakeTaskManager)
    for name in environment.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runner, "hub_unavailable", lambda: None)  # as if the hub answered
    with pytest.raises(runner.UnknownTaskError, match="unknown task linearize_wikk: offline tasks are linearize_wiki, "):
        runner.check_tasks(["linearize_wikk"])
    with pytest.raises(runner.UnknownTaskError, match="unknown task nosuchtask: not an lm-eval task; offline tasks"):
        runner.check_tasks(["capitals", "nosuchtask"][1:])
    monkeypatch.setattr(runner, "hub_unavailable", environment.hub_unavailable)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", None)  # offline: refused before lm-eval's index is needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(runner.UnknownTaskError) as err:
        runner.check_tasks(["linearize_offline", "piqa"])
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "standard tasks need hub access" in str(err.value)
    assert "linearize_capitals" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    with pytest.raises(runner.UnknownTaskError, match="HF_DATASETS_OFFLINE"):
        runner.check_tasks(["piqa"])
    assert runner.check_tasks(["linearize_offline"]) == (["linearize_wiki", "linearize_wiki512", CAPITALS, PASSKEY,
                                                         "linearize_pydoc"], [])


def test_hub_unreachable_is_reported(monkeypatch):
    for name in environment.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert environment.hub_unavailable(timeout=1).startswith("unreachable (127.0.0.1:9")


def test_eval_cli_refuses_bad_tasks_before_loading(student_dir, capsys, no_model_loads, monkeypatch):
    assert cli.main(["eval", str(student_dir), "--tasks", "linearize_capitals,linearize_nope"]) == 2
    assert "unknown task linearize_nope: offline tasks are" in one_line_error(capsys)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", FakeTaskManager)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["eval", str(student_dir), "--tasks", "piqa"]) == 2
    assert "standard tasks need hub access" in one_line_error(capsys)


@NO_CUDA
def test_cuda_on_a_machine_without_it_is_one_line(student_dir, capsys, no_model_loads, monkeypatch):
    assert cli.main(["eval", str(student_dir), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device on this machine; use --device cpu" in one_line_error(capsys)
    # python -m linearize.evals run --model linearize: checked before lm-eval indexes its tasks
    from linearize.evals import __main__ as evals_main

    monkeypatch.setattr(sys, "argv", ["x", "run", "--model", "linearize", "--model_args",
                                      f"pretrained={student_dir}", "--tasks", "piqa", "--device", "cuda"])
    with pytest.raises(SystemExit) as code:
        evals_main.main()
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m linearize.evals: error: --device cuda: torch sees no CUDA") and "\n" not in err


@NO_CUDA
def test_registered_lm_eval_model_defaults_to_cpu(student_dir):
    from linearize.evals.lm_model import LinearizeLM

    lm = LinearizeLM(pretrained=str(student_dir), batch_size=1)
    assert lm.model.device.type == "cpu"
    with pytest.raises(environment.DeviceError, match="use --device cpu"):
        LinearizeLM(pretrained=str(student_dir), device="cuda")


def test_missing_eval_extra_is_named_with_the_install_command(student_dir, capsys, no_model_loads, monkeypatch):
    monkeypatch.setitem(runner.EVAL_MODULES, "linearize_no_such_module", "lm-eval")
    with pytest.raises(environment.MissingDependencyError, match=r"pip install 'linearize\[eval\]'"):
        recovery.run_recovery(student_dir, tasks=[CAPITALS])
    assert cli.main(["eval", str(student_dir)]) == 2
    assert "pip install 'linearize[eval]'" in one_line_error(capsys)


def test_report_folder_follows_the_output_policy(student_dir, tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    assert cli.main(["eval", str(student_dir), "--tasks", CAPITALS, "--out", str(a_file)]) == 2
    assert "is an existing file" in one_line_error(capsys) and a_file.read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        check_report_dir(foreign, student_dir)
    with pytest.raises(OutputError, match="is the checkpoint folder"):
        check_report_dir(student_dir, student_dir)
    with pytest.raises(OutputError, match="holds a converted model, not an eval report"):
        check_report_dir(student_dir, tmp_path / "elsewhere")
    # the default DIR/eval is fine when missing, and an earlier report (even from before the marker) is replaced
    assert check_report_dir(None, student_dir) == (student_dir / "eval").resolve()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text(json.dumps({"schema": "linearize-eval-report/1"}))
    assert check_report_dir(earlier, student_dir) == earlier.resolve()
    assert written_by_linearize(earlier) == EVAL_REPORT_KIND and (earlier / MARKER).is_file()


def test_a_limit_bounds_the_work_per_task():
    quick = task_config_for(2)
    assert quick.wiki_doc_max_chars == 2000 and quick.passkey_lengths == (1024,) and quick.wiki_max_chars is None
    assert task_config_for(None) == OfflineTaskConfig()
    only_capitals = task_config_for({CAPITALS: 50})
    assert only_capitals.wiki_doc_max_chars is None and only_capitals.passkey_lengths == (1024, 2048, 4096, 8192)
    assert task_config_for({WIKI: 3}).wiki_doc_max_chars == 2000
    explicit = task_config_for(2, passkey_lengths=[2048, 4096], wiki_doc_max_chars=None)
    assert explicit.passkey_lengths == (2048, 4096) and explicit.wiki_doc_max_chars == 2000
    # the quick look cuts linearize_wiki's documents, not the articles the 512-token windows come from
    from linearize.evals.data import build_docs

    tok = byte_tokenizer()
    tiny = dict(wiki_max_chars=3000, wiki_window_tokens=256)
    full, cut = OfflineTaskConfig(**tiny), OfflineTaskConfig(**tiny, wiki_doc_max_chars=500)
    assert max(len(d["text"]) for d in build_docs(WIKI, tok, cut)) == 500
    assert build_docs(WIKI_WINDOWS, tok, cut) == build_docs(WIKI_WINDOWS, tok, full)


def test_eval_run_reports_progress_and_writes_a_relocated_task_folder(student_dir, tmp_path, capsys):
    tok = byte_tokenizer()
    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    calls = []
    out = tmp_path / "report"
    report, paths = recovery.run_recovery(
        student_dir, teacher_dir, [CAPITALS, PASSKEY], out_dir=out, limit=2, batch_size=2, write_to_checkpoint=False,
        task_config=task_config_for(2, passkey_lengths=[420], wiki_max_chars=200),
        progress=lambda done, total, what: calls.append((done, total, what)))
    assert "Running loglikelihood requests" not in capsys.readouterr().err  # one overall line: the caller's
    assert [c[2] for c in calls] == [f"{role} {task}" for role in ("teacher", "student") for task in (CAPITALS, PASSKEY)]
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][0] == calls[-1][1] > 0
    assert report["settings"]["offline_tasks"]["passkey_lengths"] == [420]
    assert written_by_linearize(out) == EVAL_REPORT_KIND and paths["json"].parent == out
    assert not (student_dir / "eval_report.json").exists()
    for task in (CAPITALS, PASSKEY):  # the stubs point into the final folder, not the temporary one
        import yaml

        stub = yaml.safe_load((out / "tasks" / f"{task}.yaml").read_text())
        data = stub["dataset_kwargs"]["data_files"]["test"]
        assert data == str(out.resolve() / "tasks" / "data" / f"{task}.jsonl")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]
    assert oct(paths["json"].stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(LinearizeError):  # a second run into the same folder while one holds it
        from linearize.outputs import FolderLock

        with FolderLock(out):
            recovery.run_recovery(student_dir, teacher_dir, [CAPITALS], out_dir=out, limit=1)


def test_truncated_checkpoint_is_refused_before_loading(student_dir, tmp_path, capsys, no_model_loads):
    import os
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(student_dir, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    assert cli.main(["eval", str(broken), "--tasks", CAPITALS]) == 2
    assert "model.safetensors is truncated" in one_line_error(capsys)
