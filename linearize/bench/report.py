"""What ``linearize bench`` writes: the Markdown table, the PNG chart (optional: matplotlib), the
JSON results (atomically, through ``linearize.outputs``), and the up-front check of where they go."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from linearize.environment import missing_modules
from linearize.errors import OutputError
from linearize.outputs import atomic_write_json, check_output_file

from .measure import STATUS_OK

logger = logging.getLogger(__name__)

REPORT_KEYS = ("settings", "results")  # what marks a JSON file as a bench report (safe to replace)


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get("status") == STATUS_OK else row.get("status", "-")


def format_table(report: dict) -> str:
    """The grid as a Markdown table: one line per context, teacher beside converted."""
    res = report["results"]
    lines = [
        "| context | prefill s (T / C) | prefill tok/s (T / C) | decode ms/tok (T / C) | peak MiB (T / C) "
        "| cache KiB/seq (T / C) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t, c in zip(res["teacher"], res["converted"]):
        cells = [
            f"{_cell(t, k, f)} / {_cell(c, k, f)}"
            for k, f in (("prefill_s", "{:.3f}"), ("prefill_tokens_per_s", "{:.0f}"), ("decode_ms_per_token", "{:.1f}"))
        ]
        mem = [
            f"{_cell({**t, 'v': t.get(k, 0) / d}, 'v', '{:.0f}')} / {_cell({**c, 'v': c.get(k, 0) / d}, 'v', '{:.0f}')}"
            for k, d in (("peak_memory_bytes", 2**20), ("cache_bytes_per_sequence", 2**10))
        ]
        lines.append(f"| {t['context']} | " + " | ".join(cells + mem) + " |")
    for name, tp in res.get("throughput", {}).items():
        if tp["status"] == STATUS_OK:
            capped = " (cap reached)" if tp["largest_batch_capped"] else ""
            lines.append(f"\n{name} decode throughput at {tp['context']} tokens: batch {tp['batch']}{capped}, "
                         f"{tp['decode_tokens_per_s']:.1f} tokens/s")
        else:
            lines.append(f"\n{name} decode throughput at {tp['context']} tokens: {tp['status']}")
    return "\n".join(lines)


def plot(report: dict, path: str | os.PathLike) -> Path:
    """PNG of prefill time, decode ms/token and peak memory against context (log-log), both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("prefill_s", "prefill time (s)", 1.0),
        ("decode_ms_per_token", "decode (ms / token)", 1.0),
        ("peak_memory_bytes", f"peak memory (MiB, {report['memory_kind']})", 2.0**-20),
        ("cache_bytes_per_sequence", "cache (KiB / sequence)", 2.0**-10),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, label, scale) in zip(axes, panels):
        for name, style in (("teacher", "o-"), ("converted", "s-")):
            rows = [r for r in report["results"][name] if r.get("status") == STATUS_OK and r.get(key, 0) > 0]
            ax.plot([r["context"] for r in rows], [r[key] * scale for r in rows], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    hw = report["hardware"]
    fig.suptitle(f"{report['settings']['dtype']}, batch {report['settings']['batch']}, "
                 f"{hw.get('gpu', hw['processor'])} ({hw['cpu_count']} CPUs)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _is_bench_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in REPORT_KEYS)


def check_report_path(json_path: str | os.PathLike, flag: str = "--out") -> Path:
    """Where :func:`write_report` may write (checked before the run): a ``.json`` file in a
    writable folder that is new or an earlier bench report (so is the PNG beside it); anything else
    raises :class:`linearize.errors.OutputError`. Returns the path, resolved."""
    out = check_output_file(json_path, what="bench results", flag=flag, suffixes=(".json",))
    png = out.with_suffix(".png")
    if out.exists() and not _is_bench_report(out):
        raise OutputError(f"{flag} {json_path}: {out} exists and is not a bench report: choose another {flag}")
    if png.is_dir() or (png.exists() and not (out.exists() and _is_bench_report(out))):
        raise OutputError(f"{flag} {json_path}: {png} (where the chart goes) exists and was not written by bench: "
                          f"choose another {flag}")
    return out


def plot_available() -> bool:
    """Whether the chart can be drawn (matplotlib, the ``bench`` extra, is installed)."""
    return not missing_modules(["matplotlib"])


def write_report(report: dict, json_path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write the JSON (atomically) and, beside it, the PNG (same name, ``.png``); without matplotlib
    the PNG is skipped with a warning (its path is then None)."""
    out = check_report_path(json_path)
    atomic_write_json(out, report)
    if not plot_available():
        logger.warning("matplotlib is not installed, so no chart was drawn: pip install 'linearize[bench]'")
        return out, None
    return out, plot(report, out.with_suffix(".png"))
