"""Prefill seconds and page faults of a converted model per context, and the growth per doubling.

    python benchmarks/prefill_growth.py CONVERTED_DIR [--contexts 2048,4096,8192,16384] [--reps 1]
        [--threads N] [--allocator retain|system]

``--allocator retain`` applies what the ``linearize`` command applies at start
(``linearize.cli.allocator.keep_freed_memory``); ``system`` (default here, as in any Python process
that imports linearize) keeps glibc's defaults. Each prefill is one forward with ``use_cache=True``
and ``logits_to_keep=1`` after a warm-up forward; minor page faults (``ru_minflt``) around it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted")
    p.add_argument("--contexts", default="2048,4096,8192,16384")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allocator", choices=("retain", "system"), default="system")
    args = p.parse_args()
    if args.allocator == "retain":  # before torch allocates anything
        from linearize.cli.allocator import keep_freed_memory

        print("allocator", keep_freed_memory())
    import torch
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the converted classes)
    from linearize.bench.measure import _prefill, parse_contexts

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.converted, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        _prefill(model, torch.zeros(1, 8, dtype=torch.long))
    seconds = {}
    for context in parse_contexts(args.contexts):
        times, faults = [], []
        for _ in range(args.reps):
            ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.inference_mode():
                start = time.perf_counter()
                cache, _ = _prefill(model, ids)
                times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del cache
        seconds[context] = statistics.median(times)
        load = open("/proc/loadavg").read().split()[0]
        print(f"ctx {context}: prefill {seconds[context]:.3f} s {[round(t, 3) for t in times]}, "
              f"minor faults {faults}, load1 {load}", flush=True)
    contexts = sorted(seconds)
    print("x per doubling", [round(seconds[b] / seconds[a], 2) for a, b in zip(contexts, contexts[1:])])


if __name__ == "__main__":
    main()
