"""Measurement primitives of ``linearize bench``: the settings (:class:`BenchConfig`), peak memory,
prefill and decode timing at one context, decode throughput at the largest batch that fits."""

from __future__ import annotations

import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from linearize.config import torch_dtype
from linearize.environment import check_device, glibc, trim_heap

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_LIMIT = "exceeds model limit"
STATUS_OOM = "out of memory"
RSS_SAMPLE_S = 0.005  # RSS sampling period on CPU (5 ms: finer than any step we time)


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
        torch_dtype(self.dtype)  # a ValueError listing the names for any other
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
    libc = glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        raise ValueError("--retain-freed-memory needs glibc (Linux); leave it out on this system")
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise ValueError("glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD); leave --retain-freed-memory out")


def allocator_mode(cfg: BenchConfig) -> str:
    """What the results were measured under, in words: glibc's defaults or freed memory retained."""
    import os

    if cfg.device != "cpu":
        return "device allocator"
    if cfg.retain_freed_memory or os.environ.get("LINEARIZE_ALLOCATOR") == "retain":
        return "retain freed memory (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1; the linearize command's default)"
    return "system (glibc defaults: large tensors unmapped on free, page-faulted in again)"


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
    from linearize.cache import output_cache

    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1:].argmax(-1)  # next token [B, 1]


def _decode_steps(model, cache, token: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Seconds of each single-token step, continuing from ``cache``."""
    from linearize.cache import cache_kwarg, output_cache

    name = cache_kwarg(model)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)  # [B, 1]
        _sync(device)
        times.append(time.perf_counter() - start)
        cache = output_cache(out)
    return times


def _timed_decode(model, cache, token: torch.Tensor, cfg: BenchConfig, device: torch.device) -> list[float]:
    """``cfg.warmup_steps`` untimed steps, then the seconds of ``cfg.decode_steps`` timed ones."""
    _decode_steps(model, cache, token, cfg.warmup_steps, device)
    return _decode_steps(model, cache, token, cfg.decode_steps, device)


def measure_context(model, context: int, cfg: BenchConfig, device: torch.device, vocab: int) -> dict:
    """Prefill + decode at one context length for one model (a dict row of the results)."""
    from linearize.cache import cache_nbytes

    gen = torch.Generator().manual_seed(cfg.seed + context)
    row = {"context": context, "batch": cfg.batch}
    if device.type == "cpu":
        trim_heap()  # this cell's peak RSS starts from what the process holds, not what it kept
    try:
        with torch.inference_mode(), PeakMemory(device) as mem:
            ids = _tokens(vocab, cfg.batch, context, device, gen)
            _sync(device)
            start = time.perf_counter()
            cache, token = _prefill(model, ids)
            _sync(device)
            prefill_s = time.perf_counter() - start
            cache_bytes = cache_nbytes(cache) // cfg.batch
            step_s = _timed_decode(model, cache, token, cfg, device)
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
    if device.type == "cpu":
        trim_heap()
    while batch <= cfg.max_batch:
        gen = torch.Generator().manual_seed(cfg.seed)
        try:
            with torch.inference_mode():
                cache, token = _prefill(model, _tokens(vocab, batch, context, device, gen))
                step_s = _timed_decode(model, cache, token, cfg, device)
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


