"""Speed and memory of the Triton kernels against the attention people run today (GPU only).

For each T in 1K..32K with B·T fixed (default 32K tokens), H = 32, D = 128, bf16, forward and
forward+backward time (ms, median of ``triton.testing.do_bench``), achieved TFLOP/s and peak
memory of:

- ``sdpa_causal``   torch SDPA causal attention, flash backend (the softmax layer being replaced)
- ``gla``           our chunked gated linear attention (``linearize.kernels.triton``)
- ``fla_chunk_gla`` flash-linear-attention's ``chunk_gla``, when ``fla`` is importable (it is only
                    ever installed for this comparison; never a runtime dependency)
- ``swa``           our sliding-window attention (window 64)
- ``liger_unfused`` our GLA + our SWA + the mix, as three calls
- ``liger_fused``   our fused Liger-attention kernel (the converted layer's attention core)

FLOP model (multiply-adds count 2; causal halves the score matrix), written into the results:
softmax causal ``2·B·H·T²·D``; GLA chunked ``B·H·T·(4·K·V + C·(K + V))`` with chunk C = 64 (state
update, inter-chunk output and the half-masked intra-chunk products); window ``4·B·H·T·w·D``.
Backward counts 2.5× (softmax) or 2× (GLA) the forward, the usual convention.

Run on a CUDA machine::

    python -m benchmarks.bench_kernels                    # full grid, writes benchmarks/results/
    python -m benchmarks.bench_kernels --T 4096 --ops gla fla_chunk_gla

Issue #3's targets (H100, bf16): GLA fwd+bwd >= 1.2x fla's chunk_gla at every T >= 2K; fused
>= 1.5x the unfused pair; the fused layer faster than SDPA causal from T = 4K. The summary in the
JSON reports these ratios; nothing is claimed until a GPU run has written them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import logging
import os
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench_kernels")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OPS = ("sdpa_causal", "gla", "fla_chunk_gla", "swa", "liger_unfused", "liger_fused")
GLA_CHUNK = 64  # chunk length in the FLOP model (ours and fla's chunk_gla both use 64)
DEVICE = "cuda"  # where the benchmark tensors live (require_cuda checks it exists)
LIGER_GATE_NORMALIZER = 16.0  # log α = logsigmoid(k) / 16 (Liger, DESIGN.md §1): realistic decays


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768], help="sequence lengths"
    )
    p.add_argument("--tokens", type=int, default=32768, help="B·T, fixed across T (B = tokens // T)")
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: H, no GQA)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (= K = V)")
    p.add_argument("--window", type=int, default=64, help="sliding window w")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/kernels_<gpu>.json)")
    return p.parse_args(argv)


def require_cuda() -> None:
    """Refuse clearly where the numbers would be meaningless."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("error: TRITON_INTERPRET=1 runs Triton in its CPU interpreter; unset it to benchmark the kernels")
    if not torch.cuda.is_available():
        sys.exit("error: these benchmarks need a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")


def environment(argv: list[str]) -> dict:
    """GPU name, versions and the command, stored with every result file."""
    import triton

    try:
        import fla  # noqa: F401

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fla": fla_version,
        "python": platform.python_version(),
        "command": " ".join(["python", "-m", "benchmarks." + Path(sys.argv[0]).stem, *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def default_out(prefix: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return RESULTS_DIR / f"{prefix}_{slug}.json"


def measure(fn, backward: bool, warmup: int, rep: int) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) of ``fn`` (and a backward through it)."""
    from triton.testing import do_bench

    def step():
        if not backward:  # forward alone as inference runs it: no autograd graph kept
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(torch.ones_like(out))

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, warmup=warmup, rep=rep, grad_to_none=None, return_mode="median")
    return ms, peak


def flops(op: str, B: int, T: int, H: int, D: int, w: int) -> float:
    """Forward FLOPs per the model in the module docstring."""
    softmax = 2.0 * B * H * T * T * D
    gla = float(B * H * T * (4 * D * D + GLA_CHUNK * 2 * D))
    window = 4.0 * B * H * T * min(w, T) * D
    return {
        "sdpa_causal": softmax,
        "gla": gla,
        "fla_chunk_gla": gla,
        "swa": window,
        "liger_unfused": gla + window,
        "liger_fused": gla + window,
    }[op]


BWD_FACTOR = {
    "sdpa_causal": 2.5,
    "swa": 2.5,
    "gla": 2.0,
    "fla_chunk_gla": 2.0,
    "liger_unfused": 2.2,  # GLA-dominated mix of the two
    "liger_fused": 2.2,
}


def build_ops(B, T, H, Hkv, D, w, dtype, wanted) -> dict:
    """name -> zero-argument callable returning a tensor, for every op that can run here."""
    from linearize.kernels import triton as tk

    dev = DEVICE

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()

    q, k, v = leaf(B, T, H, D), leaf(B, T, Hkv, D), leaf(B, T, Hkv, D)
    q_lin = leaf(B, T, H, D)
    k_lin = leaf(B, T, Hkv, D)
    g = (F.logsigmoid(torch.randn(B, T, Hkv, D, device=dev)) / LIGER_GATE_NORMALIZER).to(dtype).requires_grad_()
    ops = {}
    if "sdpa_causal" in wanted:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (leaf(B, n, T, D) for n in (H, Hkv, Hkv))

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=Hkv != H)

        ops["sdpa_causal"] = sdpa
    if "gla" in wanted:
        ops["gla"] = lambda: tk.gated_linear_attention(q_lin, k_lin, v, g)[0]
    if "fla_chunk_gla" in wanted:
        try:
            from fla.ops.gla import chunk_gla
        except ImportError:
            logger.warning("flash-linear-attention is not installed: fla_chunk_gla skipped")
        else:
            if Hkv != H:
                logger.warning("fla_chunk_gla needs H == Hkv: skipped")
            else:
                # time-first [B, T, H, D] like ours; older fla releases default to head-first
                extra = {"head_first": False} if "head_first" in inspect.signature(chunk_gla).parameters else {}
                ops["fla_chunk_gla"] = lambda: chunk_gla(q_lin, k_lin, v, g, scale=D**-0.5, **extra)[0]
    if "swa" in wanted:
        ops["swa"] = lambda: tk.sliding_window_attention(q, k, v, w)[0]
    if "liger_unfused" in wanted:

        def unfused():
            o_lin = tk.gated_linear_attention(q_lin, k_lin, v, g)[0]
            o_swa = tk.sliding_window_attention(q, k, v, w)[0]
            return 0.5 * o_swa + 0.5 * o_lin

        ops["liger_unfused"] = unfused
    if "liger_fused" in wanted:
        ops["liger_fused"] = lambda: tk.fused_liger_attention(q_lin, k_lin, g, q, k, v, w, window_weight=0.5)[0]
    return ops


def run(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    H, D, w = args.heads, args.head_dim, args.window
    Hkv = args.kv_heads or H
    rows = []
    for T in args.T:
        B = max(1, args.tokens // T)
        ops = build_ops(B, T, H, Hkv, D, w, dtype, args.ops)
        for name, fn in ops.items():
            row = {"op": name, "B": B, "T": T}
            for mode, backward in (("fwd", False), ("fwdbwd", True)):
                try:
                    ms, peak = measure(fn, backward, args.warmup, args.rep)
                except torch.cuda.OutOfMemoryError:
                    row[f"{mode}_status"] = "out of memory"
                    torch.cuda.empty_cache()
                    continue
                f = flops(name, B, T, H, D, w) * (1.0 if not backward else 1.0 + BWD_FACTOR[name])
                row.update({f"{mode}_ms": ms, f"{mode}_tflops": f / ms / 1e9, f"{mode}_peak_mib": peak})
            logger.info("%s", row)
            rows.append(row)
        del ops
        torch.cuda.empty_cache()
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """The ratios issue #3 sets targets for (speedup > 1 means ours is faster)."""
    by = {(r["op"], r["T"]): r for r in rows}

    def ratio(a, b, T, mode="fwdbwd_ms"):
        ra, rb = by.get((a, T)), by.get((b, T))
        if ra and rb and mode in ra and mode in rb:
            return rb[mode] / ra[mode]
        return None

    out = {}
    for T in sorted({r["T"] for r in rows}):
        out[str(T)] = {
            "gla_vs_fla_chunk_gla_fwdbwd": ratio("gla", "fla_chunk_gla", T),
            "fused_vs_unfused_fwd": ratio("liger_fused", "liger_unfused", T, "fwd_ms"),
            "fused_vs_unfused_fwdbwd": ratio("liger_fused", "liger_unfused", T),
            "fused_vs_sdpa_fwd": ratio("liger_fused", "sdpa_causal", T, "fwd_ms"),
            "fused_vs_sdpa_fwdbwd": ratio("liger_fused", "sdpa_causal", T),
        }
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    require_cuda()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {"environment": environment(argv), "config": {k: str(v) for k, v in vars(args).items()}}
    result["flop_model"] = {
        "sdpa_causal": "2*B*H*T^2*D",
        "gla": f"B*H*T*(4*D*D + {GLA_CHUNK}*2*D)",
        "swa": "4*B*H*T*min(w,T)*D",
        "backward_factor": BWD_FACTOR,
    }
    result.update(run(args))
    out = args.out or default_out("kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)
    logger.info("summary: %s", json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
