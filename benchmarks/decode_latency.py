"""Decode ms/token of the teacher and its converted model at several contexts, same process, interleaved.

The converted model runs its default single-token step (``HybridAttention.decode_step``, in place) and,
for comparison, the general path every step took before issue 19 (``--no-before`` skips it). Caches of
C tokens are built directly, so no long prefill is needed: the teacher's ``DynamicCache`` gets random
keys/values of C tokens per layer (decode cost depends on their shape only); the converted model's cache
comes from a 128-token prefill with its position set to C (its size does not depend on C).

    python benchmarks/decode_latency.py CONVERTED_DIR [--teacher smollm2-135m] [--contexts 512,2048,8192,16384]
        [--steps 12] [--reps 3] [--threads 2]

Prints per context the median wall ms/token (median over reps of the per-rep median over steps), each
rep's value, the median process CPU ms per step, and the load average (record it: the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import linearize  # noqa: F401  (registers the converted classes)
from linearize.bench.measure import parse_contexts
from linearize.cache import cache_kwarg, output_cache
from linearize.mixers.hybrid import HybridAttention
from linearize.sources import load_model


def teacher_cache(config, context: int) -> DynamicCache:
    gen = torch.Generator().manual_seed(context)
    cache = DynamicCache(config=config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, context, head_dim)
    for i in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), i)
    return cache


def converted_cache(model, context: int, vocab: int):
    ids = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(context))
    cache = output_cache(model(input_ids=ids, use_cache=True))
    for layer in cache.layers:
        layer.seen_tokens = context
    return cache


def timed(model, cache, steps: int) -> tuple[float, list[float]]:
    """Median wall ms of ``steps`` single-token steps after 2 untimed ones, and each step's CPU ms."""
    name, token, wall, cpu = cache_kwarg(model), torch.tensor([[42]]), [], []
    for i in range(steps + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        if i >= 2:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), [1e3 * c for c in cpu]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted")
    p.add_argument("--teacher", default=None)
    p.add_argument("--contexts", default="512,2048,8192,16384")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-before", action="store_true", help="skip the general (pre-issue-19) decode path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    conv = AutoModelForCausalLM.from_pretrained(args.converted, dtype=torch.float32).eval()
    teacher = load_model(args.teacher, dtype=torch.float32, device="cpu").eval()
    vocab = teacher.config.vocab_size
    in_place = HybridAttention._decodes_in_place
    general = lambda self, x: False  # noqa: E731
    runs = [("teacher", teacher, lambda c: teacher_cache(teacher.config, c), in_place),
            ("converted", conv, lambda c: converted_cache(conv, c, vocab), in_place)]
    if not args.no_before:
        runs.append(("converted_before", conv, lambda c: converted_cache(conv, c, vocab), general))
    print(f"threads {torch.get_num_threads()}, steps {args.steps}, reps {args.reps}")
    for context in parse_contexts(args.contexts):
        wall, cpu, loads = {}, {}, []
        with torch.inference_mode():
            for _ in range(args.reps):
                for key, model, make, path in runs:
                    HybridAttention._decodes_in_place = path
                    ms, cpu_ms = timed(model, make(context), args.steps)
                    wall.setdefault(key, []).append(ms)
                    cpu.setdefault(key, []).extend(cpu_ms)
                HybridAttention._decodes_in_place = in_place
                loads.append(float(open("/proc/loadavg").read().split()[0]))
        med = {k: statistics.median(v) for k, v in wall.items()}
        print(f"ctx {context}: " + ", ".join(f"{k} {med[k]:.1f} ms {[round(x, 1) for x in v]}" for k, v in wall.items())
              + "; CPU ms " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in cpu.items())
              + f"; teacher/converted {med['teacher'] / med['converted']:.2f}x; load1 {loads}", flush=True)


if __name__ == "__main__":
    main()
