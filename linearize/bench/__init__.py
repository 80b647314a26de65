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

Modules: ``measure`` (settings and measurement primitives), ``run`` (load the pair, run the grid),
``report`` (table, chart, JSON; where they may go).
"""

from .measure import (
    STATUS_LIMIT, STATUS_OK, STATUS_OOM, BenchConfig, PeakMemory, measure_context, measure_throughput,
    parse_contexts, retain_freed_memory,
)
from .report import check_report_path, format_table, plot, plot_available, write_report
from .run import PairMismatchError, check_pair, environment, grid_size, load_pair, run_bench

__all__ = [
    "STATUS_LIMIT", "STATUS_OK", "STATUS_OOM", "BenchConfig", "PairMismatchError", "PeakMemory", "check_pair",
    "check_report_path", "environment", "format_table", "grid_size", "load_pair", "measure_context",
    "measure_throughput", "parse_contexts", "plot", "plot_available", "retain_freed_memory", "run_bench",
    "write_report",
]
