"""Prefill time, decode latency, decode throughput and memory of a converted model and its teacher.

One grid: for each model (teacher with its usual ``DynamicCache``, converted with its hybrid cache)
and each context length C:

- prefill: one forward over C random tokens that fills the cache (``logits_to_keep=1``, as a server
  would), timed; tokens/s = batch * C / seconds;
- decode: from that cache, ``warmup_steps`` single-token steps untimed, then ``decode_steps`` timed
  steps; ms/token is the median step time;
- memory: peak over prefill + decode (CUDA max allocated on GPU; on CPU the process RSS sampled
  every ``RSS_SAMPLE_S`` seconds with psutil) and the cache's bytes per sequence after prefill.

Decode throughput: at one context, the batch is doubled from 1 until it runs out of memory or
reaches ``max_batch``; the largest batch that fits gives tokens/s = batch / median step time.

A context above the teacher's declared limit is recorded as ``"exceeds model limit"``; an
out-of-memory error is recorded as ``"out of memory"`` and the grid goes on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from linearize.checkpoint_files import CONFIG_FILE
from linearize.config import DTYPES
from linearize.environment import check_device, missing_modules
from linearize.errors import LinearizeError, OutputError
from linearize.outputs import atomic_write_json, check_output_file

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_LIMIT = "exceeds model limit"
STATUS_OOM = "out of memory"
RSS_SAMPLE_S = 0.005  # RSS sampling period on CPU (5 ms: finer than any step we time)
CONVERTED_PREFIX = "linearize_"  # model_type of a converted checkpoint: this + the teacher's model_type
REPORT_KEYS = ("settings", "results")  # what marks a JSON file as a bench report (safe to replace)


class PairMismatchError(LinearizeError, ValueError):
    """The converted checkpoint was not made from the given teacher (another family or shape)."""


@dataclass
class BenchConfig:
    """What to measure. Defaults follow issue #6 (1K..32K, batch 1, median over steps after warm-up)."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    batch: int = 1  # batch of the prefill / decode-latency grid
    device: str = "cpu"
    dtype: str = "float32"
    decode_steps: int = 16  # timed single-token steps per context
    warmup_steps: int = 2  # untimed steps before them
    throughput_context: int | None = None  # None: the largest grid context within the teacher's limit
    max_batch: int = 64  # upper end of the throughput batch search; 0 skips the throughput test
    threads: int | None = None  # CPU threads for torch (None: leave torch's setting)
    retain_freed_memory: bool = False  # CPU, glibc: keep freed memory in the process (see retain_freed_memory)
    teacher_beyond_limit: bool = False  # time the teacher past its declared context limit too (cost only:
    # the tokens are random, so what it predicts there does not matter; its curve then spans the grid)
    seed: int = 0

    def __post_init__(self):
        if not self.contexts or any(c <= 0 for c in self.contexts):
            raise ValueError(f"contexts must be positive token counts, got {self.contexts}")
        if self.batch < 1 or self.decode_steps < 1 or self.warmup_steps < 0 or self.max_batch < 0:
            raise ValueError("batch and decode_steps must be >= 1, warmup_steps and max_batch >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)
        self.contexts = sorted(set(self.contexts))


def parse_contexts(text: str) -> list[int]:
    """``"512,1k,2K,16k"`` -> ``[512, 1024, 2048, 16384]`` (k = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise ValueError(f"bad context {part!r} in {text!r}: use token counts like 512,1k,2k") from None
    if not out:
        raise ValueError(f"no context lengths in {text!r}: use e.g. 1k,2k,4k")
    return out


# --- measurement primitives ---------------------------------------------------------------------

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> None:
    """Make glibc keep freed memory in the process instead of returning it to the OS.

    By default glibc serves every allocation above 32 MiB with its own mmap and unmaps it on free,
    so each large activation is page-faulted in again (zero-filled) on the next forward: on 2 cores
    at T=16K that made SmolLM2's prefill grow 2.5x per doubling of T instead of 2.1x (6.4M minor
    faults instead of 0.26M; benchmarks/results/README.md). CPU servers avoid it with jemalloc or
    tcmalloc; this does the same for the benchmark process, for teacher and converted alike.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise ValueError("--retain-freed-memory needs glibc (Linux); leave it out on this system")
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise ValueError("glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD); leave --retain-freed-memory out")



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class PeakMemory:
    """Peak memory inside a ``with`` block: CUDA max allocated, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def kind(device: torch.device) -> str:
        if device.type == "cuda":
            return "cuda max allocated"
        try:
            import psutil  # noqa: F401

            return "process RSS (psutil, sampled)"
        except ImportError:
            return "process max RSS (resource.getrusage; whole-run peak)"

    def _sample(self, process) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import psutil
        except ImportError:
            return self
        process = psutil.Process()
        self.peak = process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return False


def _tokens(vocab: int, batch: int, length: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)  # [B, T]


def _prefill(model, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1:].argmax(-1)  # next token [B, 1]


def _decode_steps(model, cache, token: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Seconds of each single-token step, continuing from ``cache``."""
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # [B, 1]
        _sync(device)
        times.append(time.perf_counter() - start)
        cache = out.cache
    return times


def measure_context(model, context: int, cfg: BenchConfig, device: torch.device, vocab: int) -> dict:
    """Prefill + decode at one context length for one model (a dict row of the results)."""
    from linearize.cache import cache_nbytes

    gen = torch.Generator().manual_seed(cfg.seed + context)
    row = {"context": context, "batch": cfg.batch}
    try:
        with torch.inference_mode(), PeakMemory(device) as mem:
            ids = _tokens(vocab, cfg.batch, context, device, gen)
            _sync(device)
            start = time.perf_counter()
            cache, token = _prefill(model, ids)
            _sync(device)
            prefill_s = time.perf_counter() - start
            cache_bytes = cache_nbytes(cache) // cfg.batch
            _decode_steps(model, cache, token, cfg.warmup_steps, device)
            step_s = _decode_steps(model, cache, token, cfg.decode_steps, device)
            del cache
    except Exception as err:
        if not _is_oom(err):
            raise
        logger.warning("out of memory at context %d: %s", context, str(err).splitlines()[0])
        return {**row, "status": STATUS_OOM}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        **row,
        "status": STATUS_OK,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": cfg.batch * context / prefill_s,
        "decode_ms_per_token": 1e3 * statistics.median(step_s),
        "decode_steps": len(step_s),
        "peak_memory_bytes": mem.peak,
        "cache_bytes_per_sequence": cache_bytes,
    }


def measure_throughput(model, context: int, cfg: BenchConfig, device: torch.device, vocab: int) -> dict:
    """Decode tokens/s at the largest batch (doubling from 1, up to ``max_batch``) that fits."""
    best, tried = None, []
    batch = 1
    while batch <= cfg.max_batch:
        gen = torch.Generator().manual_seed(cfg.seed)
        try:
            with torch.inference_mode():
                cache, token = _prefill(model, _tokens(vocab, batch, context, device, gen))
                _decode_steps(model, cache, token, cfg.warmup_steps, device)
                step_s = _decode_steps(model, cache, token, cfg.decode_steps, device)
                del cache
        except Exception as err:
            if not _is_oom(err):
                raise
            tried.append({"batch": batch, "status": STATUS_OOM})
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        median = statistics.median(step_s)
        best = {"batch": batch, "decode_ms_per_step": 1e3 * median, "decode_tokens_per_s": batch / median}
        tried.append({"batch": batch, "status": STATUS_OK, "decode_tokens_per_s": batch / median})
        batch *= 2
    if best is None:
        return {"context": context, "status": STATUS_OOM, "tried": tried}
    return {"context": context, "status": STATUS_OK, **best, "largest_batch_capped": best["batch"] * 2 > cfg.max_batch,
            "tried": tried}


# --- the run ------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Hardware and library versions recorded with every result."""
    import transformers

    import linearize

    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import psutil

        hardware["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware["gpu"] = props.name
        hardware["gpu_memory_bytes"] = props.total_memory
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "linearize": linearize.__version__,
    }
    return {"hardware": hardware, "versions": versions}


def load_pair(converted_dir: str | os.PathLike, teacher: str | os.PathLike | None, cfg: BenchConfig):
    """``(teacher_model, converted_model)`` on ``cfg.device`` in ``cfg.dtype``, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the converted classes with AutoModelForCausalLM)
    from linearize.sources import load_model

    if not (Path(converted_dir) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{converted_dir} is not a converted checkpoint folder (no {CONFIG_FILE}; make one "
                                "with `linearize convert`)")
    converted_config = _read_config(Path(converted_dir))
    dtype = DTYPES[cfg.dtype]
    teacher_model = load_model(teacher, dtype=dtype, device=cfg.device)
    check_pair(teacher_model.config, converted_config, teacher=str(teacher or "the default teacher"),
               converted=str(converted_dir))
    converted = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=dtype, device_map={"": torch.device(cfg.device)})
    return teacher_model.eval(), converted.eval()


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LinearizeError(f"{folder / CONFIG_FILE} does not parse ({err}): re-run `linearize convert`") from None
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith(CONVERTED_PREFIX):
        raise LinearizeError(f"{folder} is not a converted checkpoint (its model_type is not linearize_*): "
                             "pass a folder written by `linearize convert`")
    return config


_PAIR_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size")


def check_pair(teacher_config, converted_config: dict, teacher: str = "the teacher", converted: str = "the converted model") -> None:
    """Raise :class:`PairMismatchError` (one line) unless ``converted_config`` (a converted
    checkpoint's config.json) was made from a model like ``teacher_config``: same family
    (``model_type``), layers, hidden size and vocabulary. Cheap: runs before the converted weights load."""
    text = teacher_config.get_text_config() if hasattr(teacher_config, "get_text_config") else teacher_config
    family = str(converted_config.get("model_type", "")).removeprefix(CONVERTED_PREFIX)
    have = {"model_type": getattr(text, "model_type", None), **{f: getattr(text, f, None) for f in _PAIR_FIELDS}}
    want = {"model_type": family, **{f: converted_config.get(f) for f in _PAIR_FIELDS}}
    differ = [k for k in want if want[k] is not None and have[k] is not None and want[k] != have[k]]
    if differ:
        show = lambda d: ", ".join(f"{k} {d[k]}" for k in differ)  # noqa: E731
        raise PairMismatchError(f"{converted} was converted from another model than the teacher {teacher} "
                                f"({show(want)} vs the teacher's {show(have)}): pass the model it was converted "
                                "from with --teacher")


def run_bench(
    teacher_model,
    converted_model,
    cfg: BenchConfig,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure both models over the grid; ``progress(description)`` is called after each cell."""
    from linearize.sources import model_max_length

    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.retain_freed_memory and device.type == "cpu":
        retain_freed_memory()
    limit = model_max_length(teacher_model.config)
    vocab = teacher_model.config.get_text_config().vocab_size
    models = {"teacher": teacher_model, "converted": converted_model}

    def over(context: int) -> bool:
        return limit is not None and context + cfg.warmup_steps + cfg.decode_steps > limit

    fits = [c for c in cfg.contexts if cfg.teacher_beyond_limit or not over(c)]
    throughput_context = cfg.throughput_context or (max(fits) if fits else None)

    results: dict = {"teacher": [], "converted": [], "throughput": {}}
    for name, model in models.items():
        # one short forward first, so one-off costs (allocator, kernel choice) miss the first cell
        with torch.inference_mode():
            _prefill(model, torch.zeros(1, 8, dtype=torch.long, device=device))
        for context in cfg.contexts:
            if name == "teacher" and over(context) and not cfg.teacher_beyond_limit:
                row = {"context": context, "batch": cfg.batch, "status": STATUS_LIMIT, "model_limit": limit}
            else:
                row = measure_context(model, context, cfg, device, vocab)
                if over(context):
                    row["beyond_teacher_limit"] = True
            results[name].append(row)
            logger.debug("%s @ %d: %s", name, context, row)
            if progress is not None:
                progress(f"{name} {context}")
        if cfg.max_batch > 0 and throughput_context is not None:
            results["throughput"][name] = measure_throughput(model, throughput_context, cfg, device, vocab)
            if progress is not None:
                progress(f"{name} throughput")
    return {
        "settings": asdict(cfg),
        "teacher_limit": limit,
        "memory_kind": PeakMemory.kind(device) + (
            "; freed memory retained: the later model inherits the earlier one's peak"
            if cfg.retain_freed_memory and device.type == "cpu" else ""),
        **environment(device),
        "results": results,
    }


def grid_size(cfg: BenchConfig) -> int:
    """Number of ``progress`` calls ``run_bench`` makes (for a progress bar's total)."""
    return 2 * (len(cfg.contexts) + (1 if cfg.max_batch > 0 else 0))


# --- reporting ----------------------------------------------------------------------------------


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
