"""Issue 14's GPU check: one command that proves the Triton path on a real GPU and measures issue 3's
targets, writing everything under one results folder (benchmarks/results/gpu/README.md).

In order, each step in its own process with its own time budget (a failure or a timeout is a
result; the next step runs anyway):

1. ``pytest_gpu``      ``pytest -m gpu`` on the test files that hold GPU tests: every kernel test
                       compiled for real, fp32 and bf16 (``TRITON_INTERPRET=0``)
2. ``kernels``         ``bench_kernels`` at T = 2K, 8K, 32K, fwd and fwd+bwd, vs SDPA flash and fla
                       ``chunk_gla`` when an fla-core wheel imports
3. ``decode_kernels``  ``bench_decode_kernels`` (ms/token, 1K..128K)
4. ``model_bench``     ``linearize bench`` of a SmolLM2-135M-shaped model (random weights) converted
                       with ``linearize convert``'s defaults, bf16, 4K..64K, teacher beside it
5. ``finetune``        20 optimiser steps of the default recipe's conversion and LoRA, bf16

then ``summary.md`` / ``summary.json``: each step's status and issue 3's targets with pass/fail.

    python benchmarks/gpu_check.py --out $OUT/gpu          # on the GPU machine (<= 8 minutes)
    python benchmarks/gpu_check.py --cpu-rehearsal --out /tmp/rehearsal   # anywhere: tiny sizes

``--cpu-rehearsal`` runs every step in a tiny form on the CPU (kernels in Triton's interpreter) and
marks what needs a GPU "skipped (cpu rehearsal)"; its timings are never judged.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file from a checkout: `linearize` and `benchmarks` from here
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check_summary as report  # noqa: E402
from linearize.errors import LinearizeError  # noqa: E402
from linearize.outputs import atomic_write_json, check_output_dir, write_marker  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu"
CARRY_DIR = RESULTS / "carry"
KIND = "gpu-check"
# (step, seconds) in run order; the GPU budgets add up to the 470 s default time limit (the first
# H200 run: pytest_gpu 104 s, decode_kernels 14 s, kernels out of its 95 s in fla's autotuning).
# pytest gets the most: it compiles and autotunes every kernel, fp32 and bf16, from an empty cache.
BUDGETS = {"pytest_gpu": 130, "kernels": 170, "decode_kernels": 25, "model_bench": 80, "finetune": 65}
REHEARSAL_BUDGETS = {name: 120 for name in BUDGETS}
TIME_LIMIT_S = 480.0
MIN_STEP_S = 10.0  # a step is skipped when less than this is left of the time limit
STEP_FILES = {"kernels": "kernels.json", "decode_kernels": "decode_kernels.json", "model_bench": "model_bench.json",
              "finetune": "finetune.json"}
GPU_TEST_MARK = "pytest.mark.gpu"
REHEARSAL_TESTS = "decode_step_matches_reference"  # interpreter tests the rehearsal runs through pytest
PYTEST_WORKERS = 4  # the GPU machine has 16 cores; the kernel tests are small enough to share one GPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results/gpu/<date>-<gpu name>)")
    p.add_argument("--overwrite", action="store_true", help="replace a results folder this script wrote before")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="tiny sizes on the CPU; GPU-only parts are skipped; nothing is judged")
    p.add_argument("--fla-wheel", type=Path, action="append", default=[],
                   help="an fla-core (or other pure-Python) wheel to import from; repeatable")
    p.add_argument("--carry-dir", type=Path, default=CARRY_DIR,
                   help="every *.whl here is used too (default: benchmarks/results/gpu/carry)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds for all steps together")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help=f"change one step's time budget; steps: {', '.join(BUDGETS)}")
    p.add_argument("--steps", nargs="+", choices=list(BUDGETS), default=list(BUDGETS), help="run only these steps")
    p.add_argument("--run-step", choices=list(STEP_FILES), help=argparse.SUPPRESS)  # internal: one step, this process
    args = p.parse_args(argv)
    budgets = dict(REHEARSAL_BUDGETS if args.cpu_rehearsal else BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not re.fullmatch(r"\d+(\.\d*)?", seconds):
            p.error(f"--budget {item}: use STEP=SECONDS with STEP one of {', '.join(budgets)}")
        budgets[name] = float(seconds)
    args.budgets = budgets
    return args


def log(line: str, logfile: Path | None, start: float) -> None:
    text = f"[gpu_check {time.monotonic() - start:6.1f}s] {line}"
    print(text, flush=True)
    if logfile is not None:
        with logfile.open("a") as f:
            f.write(text + "\n")


# --- carried wheels -----------------------------------------------------------------------------


def wheel_packages(wheel: Path) -> list[str]:
    """Top-level import names a wheel provides (``top_level.txt``, else its top folders/modules)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top:
            return [line.strip() for line in zf.read(top[0]).decode().splitlines() if line.strip()]
    firsts = {n.split("/")[0] for n in names}
    return sorted(f.removesuffix(".py") for f in firsts if not f.endswith((".dist-info", ".data")))


def use_wheels(wheels: list[Path], site: Path) -> list[dict]:
    """Unpack each pure-Python wheel whose packages are not importable yet into ``site``.

    A wheel is a zip; unpacked (rather than imported from the zip) so that Triton can read the
    kernels' source. Nothing is installed; an unusable wheel is reported, never raised.
    """
    import importlib.util

    records = []
    for wheel in wheels:
        record = {"wheel": wheel.name, "bytes": wheel.stat().st_size if wheel.is_file() else None}
        try:
            packages = wheel_packages(wheel)
            record["packages"] = packages
            if packages and all(importlib.util.find_spec(p) is not None for p in packages):
                record["status"] = "not used: already installed"
            else:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(site)
                record["status"] = "used"
        except (OSError, zipfile.BadZipFile, ValueError) as err:
            record["status"] = f"not used: {type(err).__name__}: {err}"
        records.append(record)
    return records


def find_wheels(args) -> list[Path]:
    found = list(args.fla_wheel)
    if args.carry_dir.is_dir():
        found += sorted(args.carry_dir.glob("*.whl"))
    return list(dict.fromkeys(found))


# --- steps --------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """Test files holding ``@pytest.mark.gpu`` tests (today tests/test_kernels_triton.py)."""
    files = (REPO / "tests").glob("test_*.py")
    return sorted(str(p.relative_to(REPO)) for p in files if GPU_TEST_MARK in p.read_text())


def pytest_command(rehearsal: bool, junit: Path) -> list[str]:
    """``pytest -m gpu`` (verbose: a timed-out run still shows each finished test in log.txt); on the
    GPU machine with pytest-xdist, in PYTEST_WORKERS processes so that Triton compiles in parallel."""
    select = ["-m", "not gpu", "-k", REHEARSAL_TESTS] if rehearsal else ["-m", "gpu"]
    import importlib.util

    workers = ["-n", str(PYTEST_WORKERS)] if not rehearsal and importlib.util.find_spec("xdist") else []
    return [sys.executable, "-m", "pytest", *gpu_test_files(), *select, *workers, "-v", "-rfEs",
            "-p", "no:cacheprovider", f"--junitxml={junit}"]


def run_process(cmd: list[str], env: dict, budget: float, logfile: Path) -> tuple[int | None, float]:
    """(return code or None on timeout, seconds); output goes to ``logfile``; on timeout the whole
    process group the step started is killed."""
    start = time.monotonic()
    with logfile.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
    return code, time.monotonic() - start


def step_env(rehearsal: bool, work: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_DATASETS_CACHE"] = str(work / "datasets-cache")  # nothing left in the home folder
    # The test conftest defaults TRITON_INTERPRET to 1 when unset: compiled kernels need an explicit 0.
    env["TRITON_INTERPRET"] = "1" if rehearsal else "0"
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LINEARIZE_KERNEL_BACKEND", None)  # the automatic choice: Triton on CUDA tensors
    return env


def run_step(name: str, args, out: Path, work: Path, logfile: Path, budget: float) -> dict:
    """One step in its own process; its status from its JSON (or from how the process ended).
    ``work``: this run's scratch folder (``work/site`` holds the unpacked wheels)."""
    env = step_env(args.cpu_rehearsal, work)
    if name == "pytest_gpu":
        junit = work / "pytest_gpu.xml"
        cmd = pytest_command(args.cpu_rehearsal, junit)
        with logfile.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        offset = logfile.stat().st_size
        code, seconds = run_process(cmd, env, budget, logfile)
        with logfile.open() as f:
            f.seek(offset)
            output = f.read()
        result = report.pytest_result(junit, code, budget, args.cpu_rehearsal, output)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--out", str(out)]
        if args.cpu_rehearsal:
            cmd.append("--cpu-rehearsal")
        code, seconds = run_process(cmd, env, budget, logfile)
        path = out / STEP_FILES[name]
        data = json.loads(path.read_text()) if path.is_file() else {}
        result = {"status": data.get("status", "failed"), "reason": data.get("reason"), "file": STEP_FILES[name]}
        if code is None or "status" not in data:
            why = (f"timed out after its {budget:g} s budget" if code is None else
                   f"the step process exited with code {code} (see log.txt)")
            result.update(status="failed", reason=why + (" (partial results kept)" if path.is_file() else ""))
            if path.is_file():
                atomic_write_json(path, {**data, "status": "failed", "reason": result["reason"]})
        result["headline"] = report.headline(name, data)
    result.update(seconds=round(seconds, 1), budget_s=budget)
    return result


def child(args) -> int:
    """``--run-step NAME``: run one step here, write ``<out>/<file>`` (partial, then final)."""
    import logging

    from benchmarks import gpu_check_steps as steps

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.out / STEP_FILES[args.run_step]
    ctx = steps.Context(out=args.out, rehearsal=args.cpu_rehearsal,
                        partial=lambda data: atomic_write_json(path, {**data, "complete": False}))
    try:
        data = steps.STEPS[args.run_step](ctx)
    except Exception as err:
        import traceback

        traceback.print_exc()
        previous = json.loads(path.read_text()) if path.is_file() else {}
        data = {**previous, "status": "failed", "reason": steps.one_line(err)}
    atomic_write_json(path, {**data, "complete": True, "rehearsal": args.cpu_rehearsal})
    return 0


# --- the run ------------------------------------------------------------------------------------


def default_out(rehearsal: bool, gpu: str | None) -> Path:
    name = "cpu-rehearsal" if rehearsal else re.sub(r"[^a-z0-9]+", "-", (gpu or "gpu").lower()).strip("-")
    return RESULTS / f"{_dt.date.today().isoformat()}-{name}"


def prepare_out(out: Path, overwrite: bool) -> Path:
    out = check_output_dir(out, what="GPU check results", overwrite=overwrite)
    if out.exists() and any(out.iterdir()):  # ours (check_output_dir refused anything else) and overwrite
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_step:
        return child(args)
    start = time.monotonic()
    from benchmarks.gpu_check_steps import environment

    env = environment()
    if not args.cpu_rehearsal and env["gpu"] is None:
        print("error: no CUDA device (torch.cuda.is_available() is False); on a machine without a GPU run "
              "`python benchmarks/gpu_check.py --cpu-rehearsal --out DIR`", file=sys.stderr)
        return 2
    try:  # no FolderLock: a run killed at the device's timeout would leave its lock file beside the
        # results, one file more than the 8 the device brings back
        out = prepare_out(args.out or default_out(args.cpu_rehearsal, env["gpu"]), args.overwrite)
    except LinearizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        write_marker(out, KIND)
        logfile = out / "log.txt"
        wheels = use_wheels(find_wheels(args), work / "site")
        summary = report.new_summary(args, env, wheels, argv if argv is not None else sys.argv[1:])
        log(f"{summary['mode']} run, results in {out}", logfile, start)
        for w in wheels:
            log(f"wheel {w['wheel']}: {w['status']}", logfile, start)
        for name in BUDGETS:
            left = args.time_limit - (time.monotonic() - start)
            if name not in args.steps:
                result = {"status": "skipped", "reason": "not in --steps"}
            elif left < MIN_STEP_S:
                result = {"status": "skipped", "reason": f"time limit: {left:.0f} s of {args.time_limit:.0f} s left"}
            else:
                budget = round(min(args.budgets[name], left), 1)
                log(f"{name}: started (budget {budget:.0f} s)", logfile, start)
                with logfile.open("a") as f:
                    f.write(f"\n===== {name} =====\n")
                result = run_step(name, args, out, work, logfile, budget)
            summary["steps"][name] = result
            log(f"{name}: {report.status_text(result)}", logfile, start)
            report.write(out, summary, time.monotonic() - start)  # after every step: a killed run keeps a summary
        summary["complete"] = True
        markdown = report.write(out, summary, time.monotonic() - start)
        print("\n" + markdown, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
