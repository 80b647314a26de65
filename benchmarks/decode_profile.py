"""Profile single-token decode of a converted model: aten calls per step, CPU ms per step, and one
converted attention module's calls and CPU µs, for the in-place step and the general path it replaced.

    python benchmarks/decode_profile.py CONVERTED_DIR [--context 512] [--threads 1] [--table]

``--table`` also prints torch.profiler's table of one in-place attention call (ops by CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import linearize  # noqa: F401  (registers the converted classes)
from linearize.bench.measure import _decode_steps, _prefill
from linearize.mixers.hybrid import HybridAttention


def weights_floor_ms(model, reps: int = 15) -> tuple[float, float]:
    """Median wall and CPU ms of every ``nn.Linear`` of the model applied to one token (nothing else):
    the matrix-vector products a decode step cannot avoid, i.e. reading every weight once."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, 1, m.in_features) for m in linears}
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(reps + 3):
            start, start_cpu = time.perf_counter(), time.process_time()
            for m in linears:
                m(inputs[m.in_features])
            if i >= 3:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def aten_calls(prof) -> int:
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.converted, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    n_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    wall_ms, cpu_ms = weights_floor_ms(model)
    print(f"weights floor: every nn.Linear on one token ({n_bytes / 1e6:.0f} MB): {wall_ms:.1f} ms wall, {cpu_ms:.1f} CPU ms; "
          f"load1 {open('/proc/loadavg').read().split()[0]}", flush=True)
    in_place = HybridAttention._decodes_in_place
    for name, path in (("in-place step", in_place), ("general path (before)", lambda self, x: False)):
        HybridAttention._decodes_in_place = path
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
            cache, token = _prefill(model, ids)
            _decode_steps(model, cache, token, 3, cpu)
            step_cpu = []
            for _ in range(20):
                start = time.process_time()
                _decode_steps(model, cache, token, 1, cpu)
                step_cpu.append(time.process_time() - start)
            attn = model.model.layers[0].self_attn
            x = torch.randn(1, 1, model.config.hidden_size)
            position = torch.tensor([[args.context + 30]])
            kwargs = {"position_embeddings": model.model.rotary_emb(x, position), "past_key_values": cache}
            call_cpu = []
            for _ in range(200):
                start = time.process_time()
                attn(x, **kwargs)
                call_cpu.append(time.process_time() - start)
            with profile(activities=[ProfilerActivity.CPU]) as step_prof:
                _decode_steps(model, cache, token, 1, cpu)
            with profile(activities=[ProfilerActivity.CPU]) as call_prof:
                attn(x, **kwargs)
        print(f"{name}: step {1e3 * statistics.median(step_cpu):.1f} CPU ms, {aten_calls(step_prof)} aten calls; "
              f"one attention module {1e6 * statistics.median(call_cpu):.0f} CPU us, {aten_calls(call_prof)} aten calls; "
              f"threads {args.threads}, context {args.context}, load1 {open('/proc/loadavg').read().split()[0]}", flush=True)
        if args.table and path is in_place:
            print(call_prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    HybridAttention._decodes_in_place = in_place


if __name__ == "__main__":
    main()
