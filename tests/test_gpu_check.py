"""benchmarks/gpu_check.py, the prepared GPU run of issue 14, rehearsed on the CPU so that it cannot
rot before a GPU session runs it: every step runs in a tiny form and the results folder, the summary
JSON and the Markdown table come out as a GPU run writes them."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check
from benchmarks import gpu_check_summary as summary_mod

REPO = Path(__file__).resolve().parent.parent
FILES = {"summary.md", "summary.json", "log.txt", "kernels.json", "decode_kernels.json", "model_bench.json",
         "finetune.json", ".linearize-output"}
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT
DEVICE_MAX_FILES = 8


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "results"
    proc = run_script("--cpu-rehearsal", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_rehearsal_writes_every_result_file_the_device_can_bring_back(rehearsal):
    out, _ = rehearsal
    names = {p.name for p in out.iterdir()}
    assert names == FILES
    assert len(names) <= DEVICE_MAX_FILES and all(DEVICE_NAME.match(n) for n in names)
    assert all(p.is_file() for p in out.iterdir())  # no sub-folders: $OUT/gpu/<file> is two levels at most


def test_rehearsal_summary_json_has_every_step_ok_and_every_target(rehearsal):
    out, _ = rehearsal
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "gpu-check" and s["schema"] == summary_mod.SCHEMA and s["mode"] == "cpu-rehearsal"
    assert s["complete"] is True and 0 < s["wall_s"] < s["time_limit_s"]
    assert "random weights" in s["note"] and "speed only" in s["note"] and s["rehearsal_note"]
    assert list(s["steps"]) == list(summary_mod.STEP_ORDER)
    for name, step in s["steps"].items():
        assert step["status"] == "ok", (name, step)
        assert 0 < step["seconds"] <= step["budget_s"]
    assert s["steps"]["pytest_gpu"]["passed"] >= 1 and s["steps"]["pytest_gpu"]["failed"] == 0
    assert [t["id"] for t in s["targets"]] == [t[0] for t in summary_mod.TARGETS + summary_mod.MODEL_ROWS]
    assert all(t["verdict"] == summary_mod.REHEARSAL for t in s["targets"])  # rehearsal timings are never judged


def test_rehearsal_step_files_hold_measurements(rehearsal):
    out, _ = rehearsal
    step = {name: json.loads((out / file).read_text()) for name, file in gpu_check.STEP_FILES.items()}
    for name, data in step.items():
        assert data["status"] == "ok" and data["complete"] is True and data["rehearsal"] is True, name
    kernels = step["kernels"]
    assert kernels["fla"] == {"importable": False, "reason": summary_mod.REHEARSAL}
    ops = {r["op"] for r in kernels["rows"]}
    assert ops == {"sdpa_causal", "gla", "swa", "liger_unfused", "liger_fused"}
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in kernels["rows"])
    assert {r["op"] for r in step["decode_kernels"]["rows"]} == {"sdpa_kv_cache", "gla_step", "swa_step", "liger_step"}
    bench = step["model_bench"]
    for name in ("teacher", "converted"):
        assert [r["status"] for r in bench["results"][name]] == ["ok", "ok"]
        assert bench["results"]["throughput"][name]["status"] == "ok"
    assert bench["model"]["weights"] == "random" and "| context |" in bench["table"]
    ft = step["finetune"]
    assert ft["optimizer_steps"] == 2 and all(math.isfinite(x) for x in ft["losses"])
    assert ft["kernel_backend"] == "chunked" and ft["peak_memory_bytes"] > 0
    assert ft["steady_steps"] == 1 and ft["tokens_per_s_steady"] > 0 and ft["tokens_per_s_all_steps"] > 0


def test_rehearsal_markdown_table_and_progress_lines(rehearsal):
    out, proc = rehearsal
    md = (out / "summary.md").read_text()
    assert "CPU REHEARSAL" in md and "random weights" in md
    assert "| step | status | seconds (budget) | detail |" in md
    for name in summary_mod.STEP_ORDER:
        assert re.search(rf"^\| {name} \| ok \| [0-9.]+ \([0-9]+\) \|", md, re.M), name
    assert "## Model bench" in md and "## Finetune" in md and "tokens/s" in md
    assert "| target | measured | verdict |" in md
    assert md.count(summary_mod.REHEARSAL) == len(summary_mod.TARGETS + summary_mod.MODEL_ROWS)
    for name in summary_mod.STEP_ORDER:  # progress lines, then the table
        assert f"] {name}: started" in proc.stdout and f"] {name}: ok (" in proc.stdout
    assert proc.stdout.rstrip().endswith(md.rstrip())
    log = (out / "log.txt").read_text()
    assert "===== finetune =====" in log and "pytest" in log


def test_a_second_run_refuses_the_folder_without_overwrite(rehearsal, capsys):
    out, _ = rehearsal
    assert gpu_check.main(["--cpu-rehearsal", "--out", str(out), "--steps", "kernels"]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err
    assert json.loads((out / "summary.json").read_text())["complete"] is True  # untouched


def test_a_step_out_of_time_is_a_result_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--cpu-rehearsal", "--out", str(out), "--steps", "kernels", "decode_kernels",
            "--budget", "kernels=0.5", "--budget", "decode_kernels=0.5"]
    assert gpu_check.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"]["kernels"]["status"] == "failed"
    assert s["steps"]["kernels"]["reason"].startswith("timed out after its 0.5 s budget")
    assert s["steps"]["decode_kernels"]["status"] == "failed"  # ran (and timed out) after the failed step
    for name in ("pytest_gpu", "model_bench", "finetune"):
        assert s["steps"][name] == {"status": "skipped", "reason": "not in --steps"}
    assert "| kernels | failed |" in (out / "summary.md").read_text()
    assert "kernels: failed: timed out" in capsys.readouterr().out
    # asked again with --overwrite, the folder is replaced
    assert gpu_check.main([*argv[:3], "--overwrite", "--steps", "pytest_gpu", "--budget", "pytest_gpu=0.5"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"]["kernels"]["status"] == "skipped" and not (out / "kernels.json").exists()


def test_without_a_gpu_the_gpu_run_refuses(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main([]) == 2
    assert "--cpu-rehearsal" in capsys.readouterr().err


# --- pieces -------------------------------------------------------------------------------------


def fake_summary(mode="gpu", kernels_status="ok"):
    return {"mode": mode, "steps": {"kernels": {"status": kernels_status, "reason": None}}}


def kernels_data(fla=True, **ratios):
    """kernels.json with the given ratio per summary key: {key: {T: ratio}}."""
    grid = [2048, 8192, 32768]
    summary = {str(T): {key: per_t.get(T) for key, per_t in ratios.items()} for T in grid}
    rows = [{"op": "gla", "T": T} for T in grid]
    return {"rows": rows, "summary": summary, "fla": {"importable": fla, "reason": None if fla else "ImportError: x"}}


def verdicts(targets):
    return {t["id"]: t["verdict"] for t in targets}


def test_targets_pass_fail_and_not_measured():
    all_t = lambda v: {2048: v, 8192: v, 32768: v}  # noqa: E731
    data = kernels_data(gla_vs_fla_chunk_gla_fwdbwd=all_t(1.3),
                        fused_vs_unfused_fwdbwd={2048: 1.6, 8192: 1.4, 32768: 2},
                        fused_vs_sdpa_fwd={2048: 0.5, 8192: 1.1, 32768: 3.0}, fused_vs_sdpa_fwdbwd={8192: 1.2})
    got = verdicts(summary_mod.judge(fake_summary(), data))
    assert got["gla_vs_fla"] == "pass"
    assert got["fused_vs_unfused"] == "fail"  # one T below 1.5x
    assert got["fused_vs_sdpa_fwd"] == "pass"  # T = 2K is below the target's 4K
    assert got["fused_vs_sdpa_fwdbwd"] == "not measured at T=32768"
    no_fla = verdicts(summary_mod.judge(fake_summary(), kernels_data(False, gla_vs_fla_chunk_gla_fwdbwd=all_t(2.0))))
    assert no_fla["gla_vs_fla"] == "not measured: fla not importable (ImportError: x)"
    assert set(verdicts(summary_mod.judge(fake_summary("cpu-rehearsal"), data)).values()) == {summary_mod.REHEARSAL}
    skipped = verdicts(summary_mod.judge(fake_summary(kernels_status="skipped"), None))
    assert all(v.startswith("not measured: the kernels step was skipped") for v in skipped.values())
    never = summary_mod.judge({"mode": "gpu", "steps": {}}, None)
    assert never[0]["verdict"] == "not measured: the kernels step did not run"


def test_model_level_rows_from_the_bench():
    def row(context, prefill, decode, status="ok"):
        return {"context": context, "status": status, "prefill_s": prefill, "decode_ms_per_token": decode}

    bench = {"results": {"teacher": [row(2048, 1, 1), row(4096, 2, 10), row(8192, 4, 20, "exceeds model limit")],
                         "converted": [row(2048, 2, 2), row(4096, 1, 12), row(8192, 1, 5)]}}
    got = {t["id"]: t for t in summary_mod.judge_model(fake_summary(), bench)}
    assert got["model_prefill"]["ratios"] == {"4096": 2.0} and got["model_prefill"]["verdict"] == "pass"
    assert got["model_decode"]["verdict"] == "fail"  # 10 / 12 < 1
    none = summary_mod.judge_model(fake_summary(), None)
    assert all(t["verdict"].startswith("not measured") for t in none)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_kernels_triton" name="test_a[cuda]"/>
<testcase classname="tests.test_kernels_triton" name="test_b[cuda]">
<failure message="AssertionError: o: relative RMS error 0.1">x</failure></testcase>
<testcase classname="tests.test_kernels_triton" name="test_c[cuda]"><skipped message="needs a CUDA device"/></testcase>
</testsuite></testsuites>"""


def test_pytest_result_from_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(JUNIT)
    r = summary_mod.pytest_result(junit, 1, 150, rehearsal=False)
    assert (r["status"], r["passed"], r["failed"], r["skipped"]) == ("failed", 1, 1, 1)
    assert r["reason"] == "1 of 3 failed: test_b[cuda]" and "relative RMS error" in r["failed_tests"][0]
    junit.write_text(JUNIT.replace('<failure message="AssertionError: o: relative RMS error 0.1">x</failure>', ""))
    assert summary_mod.pytest_result(junit, 0, 150, rehearsal=False)["status"] == "ok"
    junit.write_text(JUNIT.split("<testcase")[0] + '<testcase classname="t" name="c"><skipped message="needs a CUDA '
                     'device"/></testcase></testsuite></testsuites>')
    r = summary_mod.pytest_result(junit, 0, 150, rehearsal=False)
    assert r["status"] == "failed" and r["reason"] == "no test ran (1 skipped: needs a CUDA device)"
    r = summary_mod.pytest_result(tmp_path / "missing.xml", None, 150, rehearsal=False)
    assert r["reason"] == "timed out after its 150 s budget"
    verbose = ("tests/test_k.py::test_a[cuda] PASSED  [ 5%]\n"
               "[gw1] [ 10%] FAILED tests/test_k.py::test_b[cuda-dtype1] \n"
               "[gw0] [ 15%] PASSED tests/test_k.py::test_c[cuda]\n")
    r = summary_mod.pytest_result(tmp_path / "missing.xml", None, 150, rehearsal=False, output=verbose)
    assert r["reason"] == "timed out after its 150 s budget (2 passed, 1 failed before that)"
    assert r["failed_tests"] == ["tests/test_k.py::test_b[cuda-dtype1]"]


def make_wheel(path: Path, package: str, top_level: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/__init__.py", "VALUE = 42\n")
        if top_level:
            zf.writestr(f"{package}-1.0.dist-info/top_level.txt", f"{package}\n")
    return path


def test_carried_wheels_are_unpacked_unless_installed(tmp_path, monkeypatch):
    fresh = make_wheel(tmp_path / "gc_fake_pkg-1.0-py3-none-any.whl", "gc_fake_pkg")
    no_top = make_wheel(tmp_path / "gc_fake_two-1.0-py3-none-any.whl", "gc_fake_two", top_level=False)
    installed = make_wheel(tmp_path / "json-1.0-py3-none-any.whl", "json")
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    site = tmp_path / "site"
    records = {r["wheel"]: r for r in gpu_check.use_wheels([fresh, no_top, installed, broken], site)}
    assert records[fresh.name]["status"] == "used" and records[fresh.name]["packages"] == ["gc_fake_pkg"]
    assert records[no_top.name]["packages"] == ["gc_fake_two"]
    assert records[installed.name]["status"] == "not used: already installed"
    assert records[broken.name]["status"].startswith("not used: BadZipFile")
    monkeypatch.syspath_prepend(str(site))
    import gc_fake_pkg

    assert gc_fake_pkg.VALUE == 42
    args = SimpleNamespace(fla_wheel=[fresh], carry_dir=tmp_path)
    assert gpu_check.find_wheels(args)[0] == fresh and len(gpu_check.find_wheels(args)) == 4


def test_fla_probe_imports_gla_alone_when_the_ops_package_breaks(tmp_path, monkeypatch):
    from benchmarks.gpu_check_steps import probe_fla

    site = tmp_path / "site"
    (site / "fla" / "ops" / "gla").mkdir(parents=True)
    (site / "fla" / "__init__.py").write_text("__version__ = '0.0-test'\n")
    broken = "raise ValueError('key contains names that are not kernel arguments: BT')\n"
    (site / "fla" / "ops" / "__init__.py").write_text(broken)
    (site / "fla" / "ops" / "gla" / "__init__.py").write_text("def chunk_gla(*a, **k):\n    return 'gla'\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        got = probe_fla()
        from fla.ops.gla import chunk_gla  # what bench_kernels.build_ops imports next

        assert chunk_gla() == "gla"
    finally:
        for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[name]
    assert got["importable"] and got["version"] == "0.0-test"
    assert got["route"].startswith("fla.ops.gla alone (the package import failed: ValueError: key contains")
    (site / "fla" / "ops" / "gla" / "__init__.py").write_text("import einops_not_here\n")
    try:
        got = probe_fla()
    finally:
        for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[name]
    assert not got["importable"] and "No module named 'einops_not_here'" in got["reason"]


def test_gpu_tests_are_found_and_run_compiled():
    files = gpu_check.gpu_test_files()
    assert "tests/test_kernels_triton.py" in files and "tests/test_gpu_check.py" not in files
    cmd = gpu_check.pytest_command(False, Path("/x.xml"))
    assert " -m gpu " in " ".join(cmd) and "-k" not in cmd
    import importlib.util

    assert ("-n" in cmd) == (importlib.util.find_spec("xdist") is not None)  # parallel compiles where it can
    assert "-n" not in gpu_check.pytest_command(True, Path("/x.xml"))
    assert gpu_check.step_env(False, Path("/w"))["TRITON_INTERPRET"] == "0"  # conftest would default it to 1
    assert gpu_check.step_env(True, Path("/w"))["TRITON_INTERPRET"] == "1"


def test_gpu_sizes_are_valid_settings(tmp_path):
    """What the GPU run asks for, checked without a GPU: the recipe, the text, the benchmark options."""
    from benchmarks import bench_decode_kernels, bench_kernels
    from benchmarks import gpu_check_steps as steps
    from linearize.recipe import load_recipe

    recipe, overrides = steps.finetune_recipe("gpu", tmp_path / "text.txt", tmp_path / "run")
    default = load_recipe(steps.DEFAULT_RECIPE)
    assert recipe.stages == ["lora"] and recipe.lora.max_steps == 12 and recipe.train.precision == "bf16"
    assert recipe.conversion == default.conversion and recipe.data.seq_len == default.data.seq_len == 2048
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.targets) == (default.lora.r, default.lora.alpha,
                                                                       default.lora.targets)
    text = steps.offline_text(2 * 20 * 2048)
    assert len(steps.byte_tokenizer()(text)["input_ids"]) >= 20 * 2048  # enough blocks for 20 steps
    args = bench_kernels.parse_args(["--T", *map(str, steps.KERNEL_T["gpu"]), *steps.KERNEL_SHAPE["gpu"]])
    assert (args.T, args.heads, args.head_dim, args.dtype) == ([2048, 8192, 32768], 32, 128, "bfloat16")
    dec = bench_decode_kernels.parse_args(["--contexts", *map(str, steps.DECODE_CONTEXTS["gpu"])])
    assert dec.contexts[0] == 1024 and dec.contexts[-1] == 128 * 1024
    assert steps.BENCH_CONTEXTS["gpu"] == [4096, 8192, 16384, 32768, 65536]


def test_budgets_fit_the_device_limits():
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TIME_LIMIT_S <= 8 * 60
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "nope=3"])
    assert gpu_check.parse_args(["--budget", "kernels=30"]).budgets["kernels"] == 30
