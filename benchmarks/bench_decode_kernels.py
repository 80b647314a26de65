"""Decode cost per token of the converted layer's attention against softmax attention with a KV
cache (GPU only).

For each context C in 1K..128K: one new token, B sequences, H = 32 query heads, D = 128, bf16:

- ``sdpa_kv_cache``  torch SDPA of the new query over a [B, Hkv, C, D] KV cache (what a softmax
                     layer does per token; grows with C)
- ``gla_step``       our recurrent decode step: state [B, Hkv, D, D] fp32 updated in place
- ``swa_step``       our window kernel over the last ``window`` cached keys (constant in C)
- ``liger_step``     both plus the mix: the converted layer's attention per token

ms/token is the median of ``triton.testing.do_bench``; the bytes each method keeps per layer
(KV cache vs state + window buffer) are written alongside. The converted layer's cost does not
depend on C (it is measured at every C anyway, so nothing is extrapolated).

Run on a CUDA machine::

    python -m benchmarks.bench_decode_kernels            # writes benchmarks/results/decode_kernels_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # run as `python -m benchmarks.bench_decode_kernels` or as a file
    from benchmarks.bench_kernels import DEVICE, LIGER_GATE_NORMALIZER, default_out, environment, require_cuda
except ImportError:  # pragma: no cover - file executed directly without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.bench_kernels import DEVICE, LIGER_GATE_NORMALIZER, default_out, environment, require_cuda

logger = logging.getLogger("bench_decode_kernels")

OPS = ("sdpa_kv_cache", "gla_step", "swa_step", "liger_step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--contexts", type=int, nargs="+", default=[1024 * 2**i for i in range(8)], help="context lengths (1K..128K)"
    )
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: H)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (= K = V)")
    p.add_argument("--window", type=int, default=64, help="sliding window w")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/decode_kernels_<gpu>.json)"
    )
    return p.parse_args(argv)


def bench_context(C: int, args, dtype) -> list[dict]:
    from triton.testing import do_bench

    from linearize.kernels import triton as tk

    B, H, D, w = args.batch, args.heads, args.head_dim, args.window
    Hkv = args.kv_heads or H
    dev = DEVICE
    rows = []
    q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
    k_new = torch.randn(B, 1, Hkv, D, device=dev, dtype=dtype)
    v_new = torch.randn(B, 1, Hkv, D, device=dev, dtype=dtype)
    g_new = (F.logsigmoid(torch.randn(B, 1, Hkv, D, device=dev)) / LIGER_GATE_NORMALIZER).to(dtype)
    state = torch.zeros(B, Hkv, D, D, device=dev, dtype=torch.float32)
    k_win = torch.randn(B, w, Hkv, D, device=dev, dtype=dtype)
    v_win = torch.randn(B, w, Hkv, D, device=dev, dtype=dtype)
    win_bytes = 2 * k_win.numel() * k_win.element_size() + state.numel() * 4

    def gla_step():
        return tk.gla_decode_step(q, k_new, v_new, g_new, state)

    def swa_step():
        return tk.sliding_window_attention(q, k_win, v_win, w)[0]

    def liger_step():
        return 0.5 * swa_step() + 0.5 * gla_step()

    fns = {"gla_step": (gla_step, state.numel() * 4), "swa_step": (swa_step, win_bytes - state.numel() * 4),
           "liger_step": (liger_step, win_bytes)}  # fmt: skip
    if "sdpa_kv_cache" in args.ops:
        try:
            qt = q.transpose(1, 2)  # [B, H, 1, D]
            kc = torch.randn(B, Hkv, C, D, device=dev, dtype=dtype)
            vc = torch.randn(B, Hkv, C, D, device=dev, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            rows.append({"op": "sdpa_kv_cache", "context": C, "status": "out of memory"})
        else:
            fns["sdpa_kv_cache"] = (
                lambda: F.scaled_dot_product_attention(qt, kc, vc, enable_gqa=Hkv != H),
                2 * kc.numel() * kc.element_size(),
            )
    with torch.no_grad():
        for name in args.ops:
            if name not in fns:
                continue
            fn, nbytes = fns[name]
            ms = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
            row = {"op": name, "context": C, "batch": B, "ms_per_token": ms, "cache_bytes_per_layer": nbytes}
            logger.info("%s", row)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    require_cuda()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    env = environment(argv)
    rows = []
    for C in args.contexts:
        rows.extend(bench_context(C, args, dtype))
        torch.cuda.empty_cache()
    by = {(r["op"], r["context"]): r for r in rows if "ms_per_token" in r}
    summary = {
        str(C): (by[("sdpa_kv_cache", C)]["ms_per_token"] / by[("liger_step", C)]["ms_per_token"])
        for C in args.contexts
        if ("sdpa_kv_cache", C) in by and ("liger_step", C) in by
    }
    result = {
        "environment": env,
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "summary": {"liger_step_speedup_over_sdpa_kv_cache": summary},
    }
    out = args.out or default_out("decode_kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
