"""The summary of ``benchmarks/gpu_check.py``: each step's status, issue 3's targets with pass/fail,
the headline numbers; written as ``summary.json`` and ``summary.md`` after every step.

A target is judged only from a GPU run's numbers: in a CPU rehearsal every verdict is
"skipped (cpu rehearsal)", and a target whose numbers are missing says why ("not measured: ...").
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from linearize.outputs import atomic_write_json, atomic_write_text

SCHEMA = 1
STEP_ORDER = ("pytest_gpu", "kernels", "decode_kernels", "model_bench", "finetune")
STATUSES = ("ok", "failed", "skipped")
REHEARSAL = "skipped (cpu rehearsal)"
NOTE = ("Models have random weights and read random (bench) or byte-level (finetune) token ids: speed only. "
        "The SmolLM2-135M shape comes from its config (hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64).")
REHEARSAL_NOTE = ("CPU REHEARSAL: tiny sizes, kernels in Triton's interpreter or the chunked path. These timings "
                  "say only that the script runs; they are not GPU numbers and are not judged.")

# Issue 3's targets: (id, text, kernels.json summary key, threshold, smallest T judged, at least?)
TARGETS = (
    ("gla_vs_fla", "GLA fwd+bwd >= 1.2x fla chunk_gla throughput, every T >= 2K",
     "gla_vs_fla_chunk_gla_fwdbwd", 1.2, 2048),
    ("fused_vs_unfused", "fused Liger attention >= 1.5x GLA + window run separately (fwd+bwd), every T",
     "fused_vs_unfused_fwdbwd", 1.5, 0),
    ("fused_vs_sdpa_fwd", "converted layer (fused Liger) faster than SDPA causal from T = 4K, forward",
     "fused_vs_sdpa_fwd", 1.0, 4096),
    ("fused_vs_sdpa_fwdbwd", "converted layer (fused Liger) faster than SDPA causal from T = 4K, fwd+bwd",
     "fused_vs_sdpa_fwdbwd", 1.0, 4096),
)


def new_summary(args, env: dict, wheels: list[dict], argv: list[str]) -> dict:
    return {
        "kind": "gpu-check", "schema": SCHEMA, "mode": "cpu-rehearsal" if args.cpu_rehearsal else "gpu",
        "note": NOTE, "rehearsal_note": REHEARSAL_NOTE if args.cpu_rehearsal else None,
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env, "wheels": wheels, "time_limit_s": args.time_limit, "budgets_s": args.budgets,
        "steps": {}, "targets": [], "complete": False,
    }


def one_line(text: str, limit: int = 300) -> str:
    lines = str(text).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


VERBOSE_LINE = re.compile(r"(?:(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)|(PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+))")


def pytest_result(junit: Path, code: int | None, budget: float, rehearsal: bool, output: str = "") -> dict:
    """Counts and failing tests from pytest's JUnit XML; ok only when tests ran and none failed.
    Without the XML (pytest stopped at its budget) the counts come from its verbose ``output``."""
    out = {"status": "failed", "reason": None, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "failed_tests": []}
    if rehearsal:
        out["note"] = "rehearsal: a few interpreter tests through the same driver; the compiled -m gpu run needs a GPU"
    if not junit.is_file():
        seen = {}
        for m in VERBOSE_LINE.finditer(output):
            seen[m.group(1) or m.group(4)] = m.group(2) or m.group(3)
        for test_id, outcome in seen.items():
            out[{"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}[outcome]] += 1
            if outcome in ("FAILED", "ERROR"):
                out["failed_tests"].append(test_id)
        so_far = f" ({out['passed']} passed, {out['failed'] + out['errors']} failed before that)" if seen else ""
        out["reason"] = (f"timed out after its {budget:g} s budget{so_far}" if code is None else
                         f"pytest exited with code {code} before writing its report (see log.txt){so_far}")
        return out
    skipped_reasons = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            out["failed" if tag == "failure" else "errors"] += 1
            out["failed_tests"].append(f"{test_id}: {one_line(kinds[tag].get('message', ''), 200)}")
        elif "skipped" in kinds:
            out["skipped"] += 1
            skipped_reasons.append(one_line(kinds["skipped"].get("message", ""), 120))
        else:
            out["passed"] += 1
    bad = out["failed"] + out["errors"]
    total = out["passed"] + bad + out["skipped"]
    if code is None:
        out["reason"] = f"timed out after its {budget:g} s budget ({out['passed']} passed, {bad} failed so far)"
    elif bad:
        names = ", ".join(t.split(":")[2] if t.count(":") >= 2 else t for t in out["failed_tests"][:5])
        out["reason"] = one_line(f"{bad} of {total} failed: {names}")
    elif out["passed"] == 0:
        out["reason"] = f"no test ran ({out['skipped']} skipped: {skipped_reasons[0] if skipped_reasons else 'none'})"
    else:
        out["status"] = "ok"
    out["failed_tests"] = out["failed_tests"][:50]
    return out


def headline(step: str, data: dict) -> dict:
    """The few numbers of a step shown in the summary (from its JSON)."""
    if step == "kernels":
        return {"rows": len(data.get("rows", [])), "fla": data.get("fla")}
    if step == "decode_kernels":
        return dict(data.get("summary", {}))
    if step == "model_bench":
        return {"table": data.get("table")}
    if step == "finetune":
        keys = ("optimizer_steps", "tokens_per_step", "tokens_per_s_steady", "steady_steps", "tokens_per_s_all_steps",
                "peak_memory_bytes", "memory_kind", "kernel_backend", "device")
        return {k: data.get(k) for k in keys}
    return {}


def status_text(result: dict) -> str:
    if result["status"] == "ok":
        counts = f": {result['passed']} passed, {result['skipped']} skipped" if "passed" in result else ""
        return f"ok ({result.get('seconds', 0):.1f} s){counts}"
    return f"{result['status']}: {result.get('reason') or 'no reason recorded'}"


def judge(summary: dict, kernels: dict | None) -> list[dict]:
    """Issue 3's targets from the kernels step's ratios (speedup > 1: ours faster). Pass needs every
    T of the grid at or above the target's smallest T; one miss is a fail."""
    rehearsal = summary["mode"] == "cpu-rehearsal"
    step = summary["steps"].get("kernels")
    kernels = kernels or {}
    grid = sorted({int(r["T"]) for r in kernels.get("rows", [])})
    rows = []
    for target_id, text, key, threshold, from_t in TARGETS:
        wanted = [T for T in grid if T >= from_t]
        ratios = {T: kernels.get("summary", {}).get(str(T), {}).get(key) for T in wanted}
        ratios = {T: v for T, v in ratios.items() if v is not None}
        met = {T: (v > threshold if threshold == 1.0 else v >= threshold) for T, v in ratios.items()}
        row = {"id": target_id, "target": text, "threshold": threshold,
               "ratios": {str(T): v for T, v in ratios.items()},
               "measured": ", ".join(f"T={T}: {v:.2f}x" for T, v in ratios.items()) or "-"}
        fla = kernels.get("fla") or {}
        if rehearsal:
            row["verdict"] = REHEARSAL
        elif step is None or step["status"] == "skipped":
            row["verdict"] = "not measured: the kernels step " + ("did not run" if step is None else
                                                                  f"was skipped ({step.get('reason')})")
        elif target_id == "gla_vs_fla" and not fla.get("importable"):
            row["verdict"] = f"not measured: fla not importable ({fla.get('reason')})"
        elif not ratios:
            row["verdict"] = "not measured: no ratio in kernels.json (see its rows)"
        elif not all(met.values()):
            row["verdict"] = "fail"
        elif len(ratios) < len(wanted):
            row["verdict"] = "not measured at T=" + ",".join(str(T) for T in wanted if T not in ratios)
        else:
            row["verdict"] = "pass"
        rows.append(row)
    return rows


MODEL_ROWS = (  # the same question at model level, from model_bench.json (informational: not issue 3's wording)
    ("model_prefill", "converted model prefill faster than the teacher's from 4K, batch 1 (model level, informational)",
     "prefill_s"),
    ("model_decode",
     "converted model decode ms/token below the teacher's from 4K, batch 1 (model level, informational)",
     "decode_ms_per_token"),
)


def judge_model(summary: dict, bench: dict | None) -> list[dict]:
    """Teacher time / converted time per context >= 4K from the model bench (> 1: converted faster)."""
    rows = []
    results = (bench or {}).get("results", {})
    for row_id, text, key in MODEL_ROWS:
        pairs = zip(results.get("teacher", []), results.get("converted", []))
        ratios = {t["context"]: t[key] / c[key] for t, c in pairs
                  if t["context"] >= 4096 and t.get("status") == c.get("status") == "ok"}
        row = {"id": row_id, "target": text, "threshold": 1.0, "ratios": {str(k): v for k, v in ratios.items()},
               "measured": ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()) or "-"}
        if summary["mode"] == "cpu-rehearsal":
            row["verdict"] = REHEARSAL
        elif not ratios:
            row["verdict"] = "not measured: no context >= 4K with both models ok in model_bench.json"
        else:
            row["verdict"] = "pass" if all(v > 1.0 for v in ratios.values()) else "fail"
        rows.append(row)
    return rows


def _read(out: Path, result: dict | None) -> dict | None:
    name = (result or {}).get("file")
    if not name or not (out / name).is_file():
        return None
    return json.loads((out / name).read_text())


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'} ({summary['mode']}), {summary['date']}", ""]
    if summary.get("rehearsal_note"):
        lines += [f"**{summary['rehearsal_note']}**", ""]
    lines += [summary["note"], "",
              f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, transformers "
              f"{env.get('transformers')}, peft {env.get('peft')}, python {env.get('python')}. "
              f"Command: `{summary['command']}`. Wall {summary.get('wall_s', 0):.0f} s "
              f"(limit {summary['time_limit_s']:.0f} s){'' if summary['complete'] else ', run not finished'}.", ""]
    if summary["wheels"]:
        lines += [f"- wheel `{w['wheel']}`: {w['status']}" for w in summary["wheels"]] + [""]
    lines += ["## Steps", "", "| step | status | seconds (budget) | detail |", "|---|---|---:|---|"]
    for name in STEP_ORDER:
        r = summary["steps"].get(name)
        if r is None:
            lines.append(f"| {name} | not run yet | - | - |")
            continue
        secs = f"{r['seconds']:.1f} ({r['budget_s']:.0f})" if "seconds" in r else "-"
        detail = r.get("reason") or r.get("note") or ""
        if name == "pytest_gpu" and "passed" in r:
            detail = f"{r['passed']} passed, {r['failed'] + r['errors']} failed, {r['skipped']} skipped. {detail}"
        lines.append(f"| {name} | {r['status']} | {secs} | {detail.strip().replace('|', '/')} |")
    lines += ["", "## Issue 3's targets (speedup > 1: ours faster)", "", "| target | measured | verdict |",
              "|---|---|---|"]
    prefix = "CPU timing, not a GPU number: " if summary["mode"] == "cpu-rehearsal" else ""
    for t in summary["targets"]:
        measured = prefix + t["measured"] if t["measured"] != "-" else "-"
        lines.append(f"| {t['target']} | {measured} | {t['verdict']} |")
    bench = summary["steps"].get("model_bench", {}).get("headline", {}).get("table")
    if bench:
        lines += ["", "## Model bench (batch 1; teacher T / converted C; random weights)", "", bench]
    ft = summary["steps"].get("finetune", {}).get("headline", {})
    if ft.get("tokens_per_s_steady") is not None:
        peak = ft.get("peak_memory_bytes") or 0
        lines += ["", "## Finetune", "",
                  f"{ft['optimizer_steps']} optimiser steps of {ft['tokens_per_step']} tokens on {ft['device']} "
                  f"(kernel backend {ft['kernel_backend']}): {ft['tokens_per_s_steady']:.0f} tokens/s over the last "
                  f"{ft['steady_steps']} steps, peak memory {peak / 2**30:.2f} GiB ({ft['memory_kind']})."]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict, wall_s: float) -> str:
    """Judge the targets from what is on disk, write summary.json and summary.md; return the Markdown."""
    summary["wall_s"] = round(wall_s, 1)
    summary["targets"] = (judge(summary, _read(out, summary["steps"].get("kernels")))
                          + judge_model(summary, _read(out, summary["steps"].get("model_bench"))))
    text = markdown(summary)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", text)
    return text
