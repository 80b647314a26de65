"""Compile every kernel ahead of time for a GPU target, without a GPU.

Triton's compiler (front end, MLIR passes, LLVM, and the ``ptxas`` shipped in the triton wheel)
runs on any machine; only launching needs a device. This compiles each kernel at the shapes a
real model uses (H = 32, K = V = D = 128, the GPU block sizes) and reports registers, spills and
shared memory, which catches everything the interpreter cannot: constructs the compiler rejects,
type errors in loops, and tiles too large for the register file.

    TRITON_INTERPRET=0 python -m linearize.kernels.triton.compile_check [--arch 90] [--json out.json]

It must run with ``TRITON_INTERPRET`` unset or 0 (interpreted kernels are not compilable objects).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger(__name__)

GPU_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "D": 128, "DV": 128}
"""A Llama-like layer (32 query heads on 8 KV heads, head dim 128)."""


def _jit_fn(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _resource_usage(cubin: bytes) -> dict:
    """Registers, spill stores and static shared memory of a cubin, from the ``cuobjdump`` that
    ships with triton (the counts a driver would report after loading it)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(tool), "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", text) for key in ("REG", "STACK")}
    return {key.lower(): int(m.group(1)) for key, m in found.items() if m}


def _signature(fn, types: dict, constexprs: dict) -> tuple[dict, dict]:
    sig, cst = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name], cst[name] = "constexpr", constexprs[name]
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"no type or value for argument {name!r} of {fn.__name__}")
    return sig, cst


def kernel_specs(dtype: str) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, argument types, constexprs) of every kernel at GPU shapes, for ``dtype``
    inputs ("bf16" or "fp32"); optional pointers are compiled both absent (None) and present."""
    from . import decode, fused, gla, swa
    from ._utils import block, dot_precision, full_block

    import torch

    s = GPU_SHAPES
    prec = dot_precision(torch.float32 if dtype == "fp32" else torch.bfloat16)
    p, f32, i32, i8 = f"*{dtype}", "*fp32", "*i32", "*i8"
    BT, BC = 64, gla.SUB_CHUNK_SIZE
    BK, BV = block(s["K"], gla.BLOCK_K_MAX), block(s["V"], gla.BLOCK_V_MAX)
    dims = {"H": s["H"], "HKV": s["HKV"], "K": s["K"], "V": s["V"], "BT": BT, "BC": BC, "BK": BK, "BV": BV, "PREC": prec}
    ints = {"blocks": i32, "cu": i32, "first": i32, "scale": "fp32"}
    specs = [
        ("gla._cumsum", gla._cumsum_kernel, {"g": p, "gc": f32, **ints}, {**dims}),
        ("gla._fwd_h", gla._fwd_h_kernel, {"k": p, "v": p, "gc": f32, "h": p, "h0": f32, "ht": f32, **ints},
         {**dims, "HAS_H0": True, "STORE_HT": True}),
        ("gla._fwd_o", gla._fwd_o_kernel, {"q": p, "k": p, "v": p, "gc": f32, "h": p, "o": p, **ints}, dims),
        ("gla._bwd_dh", gla._bwd_dh_kernel, {"q": p, "do": p, "gc": f32, "dh": p, "dht": f32, "dh0": f32, **ints},
         {**dims, "USE_DHT": True, "STORE_DH0": True}),
        ("gla._bwd_dq", gla._bwd_dq_kernel, {"k": p, "v": p, "gc": f32, "h": p, "do": p, "dq": f32, **ints}, dims),
        ("gla._bwd_dk", gla._bwd_dk_kernel, {"q": p, "v": p, "gc": f32, "dh": p, "do": p, "dk": f32, **ints}, dims),
        ("gla._bwd_dv", gla._bwd_dv_kernel, {"q": p, "k": p, "gc": f32, "dh": p, "do": p, "dv": f32, **ints}, dims),
        ("gla._bwd_dg", gla._bwd_dg_kernel,
         {"q": p, "k": p, "dq": f32, "dk": f32, "ht": f32, "dht": f32, "dg": f32, **ints}, {**dims, "USE_DHT": True}),
        ("decode._decode", decode._decode_kernel,
         {"q": p, "k": p, "v": p, "g": p, "state": f32, "o": p, "scale": "fp32", "T": "i32"},
         {"H": s["H"], "HKV": s["HKV"], "K": s["K"], "V": s["V"], "BK": full_block(s["K"]),
          "BV": block(s["V"], decode.BLOCK_V_MAX)}),
    ]  # fmt: skip
    sdims = {"H": s["H"], "HKV": s["HKV"], "D": s["D"], "DV": s["DV"], "BM": swa.BLOCK_M, "BN": swa.BLOCK_N,
             "BD": full_block(s["D"]), "BDV": full_block(s["DV"]), "PREC": prec}  # fmt: skip
    sints = {"blocks": i32, "cu_q": i32, "cu_k": i32, "scale": "fp32", "scale_log2": "fp32", "window": "i32"}
    qkv = {"q": p, "k": p, "v": p, "do": p, "lse": f32, "delta": f32}
    for mask in (False, True):
        masks = {"key_mask": i8} if mask else {}
        none_mask = {} if mask else {"key_mask": None}
        specs += [
            (f"swa._fwd(mask={mask})", swa._fwd_kernel, {**qkv, "o": p, "sink": f32, **masks, **sints},
             {**sdims, **none_mask, "HAS_MASK": mask, "HAS_SINK": True}),
            (f"swa._bwd_dq(mask={mask})", swa._bwd_dq_kernel, {**qkv, "dq": p, **masks, **sints},
             {**sdims, **none_mask, "BN": swa.BLOCK_BWD, "HAS_MASK": mask}),
            (f"swa._bwd_dkdv(mask={mask})", swa._bwd_dkdv_kernel, {**qkv, "dk": p, "dv": p, **masks, **sints},
             {**sdims, **none_mask, "BM": swa.BLOCK_BWD, "HAS_MASK": mask}),
        ]  # fmt: skip
    specs.append(
        ("fused._fwd", fused._fused_fwd_kernel,
         {"q_lin": p, "k_lin": p, "v": p, "gc": f32, "h": p, "q": p, "k": p, "o": p, "o_swa": p, "lse": f32,
          "key_mask": i8, "sink": f32, "blocks": i32, "cu": i32, "scale_lin": "fp32", "scale_log2": "fp32",
          "window": "i32", "w_win": "fp32"},
         {"H": s["H"], "HKV": s["HKV"], "K": s["K"], "D": s["D"], "V": s["V"], "BT": BT, "BC": BC, "BK": BK,
          "BN": swa.BLOCK_N, "BD": full_block(s["D"]), "BV": full_block(s["V"]), "HAS_MASK": True, "HAS_SINK": True,
          "STORE_SWA": True, "PREC": prec})
    )  # fmt: skip
    specs += _delta_specs(p, prec, f32, i32)
    return specs


def _delta_specs(p: str, prec: str, f32: str, i32: str) -> list:
    """The gated delta-rule kernels (``delta.py``) at GPU shapes, and GLA's kernels it calls with
    chunks of 16."""
    from . import delta, gla
    from ._utils import block, full_block

    s = GPU_SHAPES
    dims = {"HKV": s["HKV"], "K": s["K"], "V": s["V"], "BT": delta.CHUNK_SIZE, "PREC": prec}
    bv = block(s["V"], delta.BLOCK_V_MAX)
    gdims = {"H": s["H"], "HKV": s["HKV"], "K": s["K"], "V": s["V"], "BT": delta.CHUNK_SIZE, "BC": delta.CHUNK_SIZE,
             "BK": block(s["K"], gla.BLOCK_K_MAX), "BV": block(s["V"], gla.BLOCK_V_MAX), "PREC": prec}  # fmt: skip
    return [
        ("delta._wu", delta._wu_kernel, {"k": p, "v": p, "beta": p, "gc": f32, "w": f32, "u": f32, "blocks": i32, "cu": i32},
         {**dims, "BK": block(s["K"], delta.BLOCK_K_MAX), "BV": bv}),
        ("delta._fwd_h", delta._fwd_h_kernel,
         {"k": p, "w": f32, "u": f32, "gc": f32, "h": p, "dv": p, "h0": f32, "ht": f32, "cu": i32, "first": i32},
         {**dims, "BK": full_block(s["K"]), "BV": bv, "HAS_H0": True, "STORE_HT": True}),
        ("delta._bwd_dvi", delta._bwd_dvi_kernel,
         {"q": p, "k": p, "gc": f32, "do": p, "dvi": f32, "blocks": i32, "cu": i32, "scale": "fp32"},
         {**dims, "H": s["H"], "BK": block(s["K"], delta.BLOCK_K_MAX), "BV": bv}),
        ("delta._bwd_dh", delta._bwd_dh_kernel,
         {"q": p, "k": p, "w": f32, "gc": f32, "do": p, "dvi": f32, "dh": p, "dd": f32, "dht": f32, "dh0": f32,
          "cu": i32, "first": i32, "scale": "fp32"},
         {**dims, "H": s["H"], "BK": full_block(s["K"]), "BV": bv, "USE_DHT": True, "STORE_DH0": True}),
        ("delta._bwd_wu", delta._bwd_wu_kernel,
         {"k": p, "v": p, "beta": p, "gc": f32, "u": f32, "w": f32, "h": p, "dd": f32, "dv": f32, "dbeta": f32,
          "dkr": f32, "dkra": f32, "dkwa": f32, "blocks": i32, "cu": i32},
         {**dims, "BK": block(s["K"], delta.BLOCK_K_BWD), "BV": bv}),
        ("delta._fwd_o(gla, BT=16)", gla._fwd_o_kernel,
         {"q": p, "k": p, "v": p, "gc": f32, "h": p, "o": p, "blocks": i32, "cu": i32, "scale": "fp32"}, gdims),
        ("delta._bwd_dq(gla, BT=16)", gla._bwd_dq_kernel,
         {"k": p, "v": p, "gc": f32, "h": p, "do": p, "dq": f32, "blocks": i32, "cu": i32, "scale": "fp32"}, gdims),
        ("delta._bwd_dk(gla, BT=16)", gla._bwd_dk_kernel,
         {"q": p, "v": p, "gc": f32, "dh": p, "do": p, "dk": f32, "blocks": i32, "cu": i32, "scale": "fp32"}, gdims),
        ("delta._decode", delta._decode_kernel,
         {"q": p, "k": p, "v": p, "beta": p, "g": p, "state": f32, "o": p, "scale": "fp32", "T": "i32"},
         {"H": s["H"], "HKV": s["HKV"], "K": s["K"], "V": s["V"], "BK": full_block(s["K"]), "BV": bv,
          "SCALAR_G": False}),
    ]  # fmt: skip


def compile_all(
    arch: int = 90, dtypes=("bf16", "fp32"), num_warps: int = 4, num_stages: int = 2, only: str = ""
) -> list[dict]:
    """Compile every kernel for ``sm_<arch>``; one record per kernel and dtype (errors included)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._utils import INTERPRET

    if INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset or 0 (interpreted kernels cannot be compiled)")
    target = GPUTarget("cuda", arch, 32)
    out = []
    for dtype in dtypes:
        for name, kernel, types, cst in kernel_specs(dtype):
            if only not in name:
                continue
            fn = _jit_fn(kernel)
            rec = {"kernel": name, "dtype": dtype, "arch": arch, "num_warps": num_warps, "num_stages": num_stages}
            start = time.perf_counter()
            try:
                sig, constexprs = _signature(fn, types, cst)
                ck = triton.compile(
                    ASTSource(fn, sig, constexprs), target=target, options={"num_warps": num_warps, "num_stages": num_stages}
                )
                rec.update(ok=True, shared=ck.metadata.shared, **_resource_usage(ck.asm["cubin"]))
            except Exception as e:  # recorded and reported: the point is to list every failure
                rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            rec["seconds"] = round(time.perf_counter() - start, 2)
            out.append(rec)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every Triton kernel for a GPU target (no GPU needed).")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    p.add_argument("--only", default="", help="compile only kernels whose name contains this")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        logger.error("unset TRITON_INTERPRET (or set it to 0) to compile the kernels")
        return 2
    records = compile_all(args.arch, args.dtypes, args.num_warps, args.num_stages, only=args.only)
    for r in records:
        if r["ok"]:
            logger.info("%-26s %s  regs %3s  stack %5s  shared %6d  (%.1fs)", r["kernel"], r["dtype"], r.get("reg"),
                        r.get("stack"), r["shared"], r["seconds"])  # fmt: skip
        else:
            logger.info("%-26s %s  FAILED  %s", r["kernel"], r["dtype"], r["error"].splitlines()[0][:300])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
