"""`linearize bench` on a tiny converted model: well-formed JSON, a PNG, a too-long context reported."""

from __future__ import annotations

import json

import pytest

from linearize import cli
import linearize
from linearize import bench as mb
from tiny_models import COMMON, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folders(tmp_path):
    teacher = tiny_model("llama")
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    converted_dir = linearize.save_converted(linearize.convert(tiny_model("llama"), window=8), tmp_path / "converted")
    return teacher_dir, converted_dir


def test_bench_cli_writes_json_and_png(folders, tmp_path, capsys):
    teacher_dir, converted_dir = folders
    limit = COMMON["max_position_embeddings"]
    too_long = 2 * limit
    out = tmp_path / "res" / "bench.json"
    argv = ["bench", str(converted_dir), "--teacher", str(teacher_dir), "--contexts", f"16,64,{too_long}",
            "--device", "cpu", "--decode-steps", "3", "--warmup-steps", "1", "--max-batch", "2", "--out", str(out)]
    assert cli.main(argv) == 0

    report = json.loads(out.read_text())
    assert {"command", "hardware", "versions", "settings", "results", "teacher_limit", "memory_kind"} <= set(report)
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
    real_prefill = mb._prefill

    def prefill(model, ids):
        if ids.shape[1] == 32:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_prefill(model, ids)

    monkeypatch.setattr(mb, "_prefill", prefill)
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
