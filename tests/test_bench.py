"""`linearize bench` on a tiny converted model: well-formed JSON, a PNG, a too-long context reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from linearize import cli
import linearize
from linearize import bench as mb
from linearize.cli.allocator import ALLOCATOR_ENV
from tiny_models import COMMON, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folders(tmp_path):
    teacher = tiny_model("llama")
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    converted_dir = linearize.save_converted(linearize.convert(tiny_model("llama"), window=8), tmp_path / "converted")
    return teacher_dir, converted_dir


def test_bench_cli_writes_json_and_png(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "system")  # the test process keeps glibc's defaults (the mode is recorded)
    teacher_dir, converted_dir = folders
    limit = COMMON["max_position_embeddings"]
    too_long = 2 * limit
    out = tmp_path / "res" / "bench.json"
    argv = ["bench", str(converted_dir), "--teacher", str(teacher_dir), "--contexts", f"16,64,{too_long}",
            "--device", "cpu", "--decode-steps", "3", "--warmup-steps", "1", "--max-batch", "2", "--out", str(out)]
    assert cli.main(argv) == 0

    report = json.loads(out.read_text())
    assert {"command", "hardware", "versions", "settings", "results", "teacher_limit", "memory_kind",
            "allocator"} <= set(report)
    assert report["allocator"].startswith("system")
    assert all(len(report["load_average"][when]) == 3 for when in ("start", "end"))
    assert report["versions"]["torch"] and report["hardware"]["cpu_count"] >= 1
    assert report["command"].startswith("linearize bench ")
    assert cli.build_parser().parse_args(report["command"].split()[1:]).max_batch == 2  # the command reruns
    assert report["teacher_limit"] == limit
    for name in ("teacher", "converted"):
        rows = {r["context"]: r for r in report["results"][name]}
        assert sorted(rows) == [16, 64, too_long]
        for context in (16, 64):
            row = rows[context]
            assert row["status"] == mb.STATUS_OK
            for key in ("prefill_s", "prefill_tokens_per_s", "decode_ms_per_token", "peak_memory_bytes",
                        "cache_bytes_per_sequence"):
                assert row[key] > 0, (name, context, key)
            assert row["decode_steps"] == 3
        tp = report["results"]["throughput"][name]
        assert tp["status"] == mb.STATUS_OK and tp["batch"] in (1, 2) and tp["decode_tokens_per_s"] > 0
        assert tp["context"] == 64  # largest grid context within the teacher's limit
    teacher_rows = {r["context"]: r for r in report["results"]["teacher"]}
    assert teacher_rows[too_long]["status"] == mb.STATUS_LIMIT
    # the converted model has no context limit of its own: measured there, and flagged
    conv = {r["context"]: r for r in report["results"]["converted"]}
    assert conv[too_long]["status"] == mb.STATUS_OK and conv[too_long]["beyond_teacher_limit"]
    # teacher KV cache grows with context; the converted cache does not (window 8 < 16 tokens)
    assert teacher_rows[64]["cache_bytes_per_sequence"] > teacher_rows[16]["cache_bytes_per_sequence"]
    assert conv[64]["cache_bytes_per_sequence"] == conv[16]["cache_bytes_per_sequence"] == conv[too_long][
        "cache_bytes_per_sequence"]

    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert mb.STATUS_LIMIT in printed and "| 64 |" in printed


def test_oom_is_reported_and_the_grid_goes_on(folders, monkeypatch):
    teacher_dir, converted_dir = folders
    cfg = mb.BenchConfig(contexts=[16, 32], decode_steps=2, warmup_steps=0, max_batch=0)
    teacher, converted = mb.load_pair(converted_dir, teacher_dir, cfg)
    real_prefill = mb.measure._prefill

    def prefill(model, ids):
        if ids.shape[1] == 32:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_prefill(model, ids)

    monkeypatch.setattr(mb.measure, "_prefill", prefill)
    report = mb.run_bench(teacher, converted, cfg)
    for name in ("teacher", "converted"):
        statuses = [r["status"] for r in report["results"][name]]
        assert statuses == [mb.STATUS_OK, mb.STATUS_OOM]
    assert report["results"]["throughput"] == {}


def test_teacher_beyond_limit_is_timed_and_flagged(folders):
    teacher_dir, converted_dir = folders
    too_long = 2 * COMMON["max_position_embeddings"]
    cfg = mb.BenchConfig(contexts=[16, too_long], decode_steps=2, warmup_steps=0, max_batch=0,
                         teacher_beyond_limit=True, retain_freed_memory=True)
    report = mb.run_bench(*mb.load_pair(converted_dir, teacher_dir, cfg), cfg)
    assert report["teacher_limit"] == COMMON["max_position_embeddings"]
    for name in ("teacher", "converted"):
        rows = {r["context"]: r for r in report["results"][name]}
        assert rows[too_long]["status"] == mb.STATUS_OK and rows[too_long]["beyond_teacher_limit"]
        assert "beyond_teacher_limit" not in rows[16]


def test_bad_input_is_a_clear_error():
    assert mb.parse_contexts("512, 1k,2K") == [512, 1024, 2048]
    with pytest.raises(ValueError, match="bad context"):
        mb.parse_contexts("1k,lots")
    with pytest.raises(ValueError, match="contexts"):
        mb.BenchConfig(contexts=[0])


def _one_line(capsys) -> str:
    """The error line (the last of stderr; loading progress bars may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("linearize bench: error: "), lines
    return errors[0]


def test_output_and_pair_are_checked_before_measuring(folders, tmp_path, capsys, monkeypatch):
    teacher_dir, converted_dir = folders

    def no_run(*args, **kwargs):
        raise AssertionError("the grid ran before the inputs were checked")

    monkeypatch.setattr(mb, "run_bench", no_run)
    base = ["bench", str(converted_dir), "--teacher", str(teacher_dir), "--device", "cpu", "--contexts", "16"]
    assert cli.main(base + ["--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_line(capsys)
    assert cli.main(base + ["--out", str(tmp_path / "x.txt")]) == 2
    assert "name a file ending in .json" in _one_line(capsys)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    assert cli.main(base + ["--out", str(mine)]) == 2
    assert "is not a bench report" in _one_line(capsys) and mine.read_text() == '{"my": "data"}'
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in converted_dir.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes()[: 100 if f.name == "model.safetensors" else None])
    assert cli.main(["bench", str(broken), "--teacher", str(teacher_dir), "--device", "cpu", "--out",
                     str(tmp_path / "r.json")]) == 2
    assert "model.safetensors is truncated" in _one_line(capsys)
    monkeypatch.chdir(tmp_path)  # the default bench.json in the current folder is checked the same way
    (tmp_path / "bench.json").write_text("[1, 2]")
    assert cli.main(base) == 2
    assert "bench.json exists and is not a bench report" in _one_line(capsys)

    for arch, what in (("qwen2", "model_type qwen2"), ("llama-vocab", "vocab_size")):
        other = tmp_path / arch
        model = tiny_model("qwen2") if arch == "qwen2" else tiny_model_with(vocab_size=2 * COMMON["vocab_size"])
        model.save_pretrained(other)
        assert cli.main(["bench", str(converted_dir), "--teacher", str(other), "--device", "cpu",
                         "--out", str(tmp_path / "r.json")]) == 2
        err = _one_line(capsys)
        assert "was converted from another model than the teacher" in err and "--teacher" in err
        assert (what in err) if arch == "llama-vocab" else ("model_type llama vs the teacher's model_type qwen2" in err)


def tiny_model_with(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**COMMON, **overrides})).eval()


def test_report_without_matplotlib_keeps_table_and_json(tmp_path, monkeypatch, caplog):
    report = {"settings": {"dtype": "float32", "batch": 1}, "results": {"teacher": [], "converted": []}}
    monkeypatch.setattr(mb.report, "plot_available", lambda: False)
    json_path, png_path = mb.write_report(report, tmp_path / "b.json")
    assert png_path is None and json.loads(json_path.read_text()) == report
    assert "pip install 'linearize[bench]'" in caplog.text
    assert oct(json_path.stat().st_mode & 0o777) != oct(0o600)
    # an earlier bench report (and its chart) may be replaced
    (tmp_path / "b.png").write_bytes(PNG_SIGNATURE)
    assert mb.check_report_path(tmp_path / "b.json") == (tmp_path / "b.json").resolve()


# Allocates, touches and frees a 64 MiB block five times; prints the mode and the page faults of the
# last four rounds (glibc's defaults unmap the block at every free, so each round faults it in again).
_FAULTS = """
import ctypes, ctypes.util, resource
from linearize.cli.allocator import keep_freed_memory
mode = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(mode, sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_linearize_processes_keep_freed_memory_unless_told_not_to():
    """The setting ``linearize``'s main applies: a large block freed and allocated again is not
    page-faulted in again (issue 19: prefill grew > 2x per doubling from those faults)."""
    results = {}
    for mode in ("default", "system"):
        env = {k: v for k, v in os.environ.items() if k != ALLOCATOR_ENV}
        if mode == "system":
            env[ALLOCATOR_ENV] = "system"
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        results[mode] = out.stdout.split()
    assert results["default"][0] == "retain" and results["system"][0] == "system"
    page_faults_per_round = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(results["system"][1]) > 3 * page_faults_per_round  # faulted in again every round
    assert int(results["default"][1]) < page_faults_per_round // 4  # reused
