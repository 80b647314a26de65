"""The steps of ``benchmarks/gpu_check.py``; each runs in its own process (``--run-step NAME``).

A step returns a dict that becomes ``<out>/<name>.json``: its measurements plus ``status``
(``ok`` / ``failed``) and, when not ok, a one-line ``reason``. Long steps write what they have
after every cell (``ctx.partial``), so a step stopped at its time budget still leaves its rows.

Two sizes of every step: the GPU run (issue 14's shapes) and the CPU rehearsal (tiny shapes, kernels
in Triton's interpreter or the chunked path), which only proves that the code runs: its timings
mean nothing and are never judged against a target.

Models are built from a config with random weights and fed random (or byte-level) token ids: speed,
memory and tokens/s do not depend on weight values, and nothing can be downloaded on the device.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-cpu.yaml"

# SmolLM2-135M-Instruct's shape (its config.json); weights are random: speed only.
SMOLLM2_135M = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)
# Rehearsal model: everything tiny; head_dim 16 is the smallest edge the Triton kernels take.
TINY = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, vocab_size=320, max_position_embeddings=512, rope_theta=10000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)

# GPU sizes (issue 14) and rehearsal sizes of each step.
KERNEL_T = {"gpu": [2048, 8192, 32768], "cpu": [40]}
KERNEL_SHAPE = {"gpu": [], "cpu": ["--tokens", "40", "--heads", "1", "--head-dim", "16", "--window", "8"]}
DECODE_CONTEXTS = {"gpu": [1024 * 2**i for i in range(8)], "cpu": [32]}
DECODE_SHAPE = {"gpu": [], "cpu": ["--heads", "1", "--head-dim", "16", "--window", "8"]}
BENCH_CONTEXTS = {"gpu": [4096, 8192, 16384, 32768, 65536], "cpu": [32, 64]}
BENCH_STEPS = {"gpu": (16, 2), "cpu": (2, 1)}  # (timed, untimed) decode steps per context
BENCH_THROUGHPUT = {"gpu": (8192, 64), "cpu": (32, 2)}  # (context, largest batch tried: doubling from 1)
BENCH_LAYERS = {"gpu": 30, "cpu": 2}
# The rehearsal trains 4 tiny layers (keeping layer 1 as softmax instead of the recipe's 7..23) in
# fp32: bf16 autocast on a CPU only slows the chunked path down and proves nothing about Triton.
FINETUNE = {"gpu": dict(steps=12, seq_len=2048, precision="bf16", layers=30, overrides=[]),
            "cpu": dict(steps=2, seq_len=64, precision="fp32", layers=4,
                        overrides=["conversion.keep_softmax_layers=[1]"])}
WARMUP_STEPS = {"gpu": 2, "cpu": 0}  # optimiser steps left out of the steady tokens/s (compilation, autotuning)


@dataclass
class Context:
    """What a step gets: where to write, which size to run, how to save partial results."""

    out: Path
    rehearsal: bool
    partial: Callable[[dict], None]

    @property
    def size(self) -> str:
        return "cpu" if self.rehearsal else "gpu"

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """GPU name, library versions and the machine, recorded in the summary."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{name: _version(name) for name in ("torch", "triton", "transformers", "peft", "accelerate", "datasets")},
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30)
    return env


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_timer(fn) -> float:
    """ms of one call of ``fn`` on the CPU (rehearsal stand-in for do_bench: proves it runs, no more)."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def cpu_measure(fn, backward: bool, warmup: int, rep: int) -> tuple[float, float]:
    """Rehearsal stand-in for ``bench_kernels.measure`` (which needs CUDA): (ms, peak MiB = 0)."""

    def step():
        if not backward:
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(torch.ones_like(out))

    return cpu_timer(step), 0.0


# --- kernels ------------------------------------------------------------------------------------


def probe_fla() -> dict:
    """Whether fla's ``chunk_gla`` imports (from an installed or carried fla-core wheel).

    ``fla/ops/__init__.py`` imports every op, and one that breaks with this Triton (fla 0.5.2 with
    triton 3.9: an autotune key that is not a kernel argument) stops them all; so when the package
    import fails, ``fla.ops`` is stood in by an empty package and only ``fla.ops.gla`` is imported.
    """
    import types

    try:
        from fla.ops.gla import chunk_gla  # noqa: F401

        route = "fla.ops"
    except Exception as err:  # any failure here (missing, or broken with this triton) is a result
        first = one_line(err)
        for name in [m for m in sys.modules if m == "fla.ops" or m.startswith("fla.ops.")]:
            del sys.modules[name]
        try:
            import fla

            stand_in = types.ModuleType("fla.ops")
            stand_in.__path__ = [str(Path(fla.__file__).parent / "ops")]
            sys.modules["fla.ops"] = stand_in
            from fla.ops.gla import chunk_gla  # noqa: F401, F811
        except Exception as err2:
            sys.modules.pop("fla.ops", None)
            return {"importable": False, "reason": f"{first}; fla.ops.gla alone: {one_line(err2)}"}
        route = f"fla.ops.gla alone (the package import failed: {first})"
    import fla

    return {"importable": True, "version": getattr(fla, "__version__", None), "route": route,
            "path": str(Path(fla.__file__).parent)}


def kernels(ctx: Context) -> dict:
    """``benchmarks/bench_kernels.py``'s grid, one op and mode at a time so one error skips one cell."""
    from benchmarks import bench_kernels as bk

    argv = ["--T", *map(str, KERNEL_T[ctx.size]), *KERNEL_SHAPE[ctx.size]]
    args = bk.parse_args(argv)
    if ctx.rehearsal:
        bk.DEVICE = "cpu"
        measure, fla = cpu_measure, {"importable": False, "reason": "skipped (cpu rehearsal)"}
    else:
        measure, fla = bk.measure, probe_fla()
    ops = [op for op in args.ops if op != "fla_chunk_gla" or fla["importable"]]
    dtype = getattr(torch, args.dtype)
    H, D, w = args.heads, args.head_dim, args.window
    Hkv = args.kv_heads or H
    result = {"argv": argv, "config": {k: str(v) for k, v in vars(args).items()}, "fla": fla, "rows": []}
    errors = []
    # fla last, after every T of the others: its autotuning takes long enough on a cold device
    # that, run first, it left the budget no time for our own kernels at 8K and 32K
    ours = [op for op in ops if op != "fla_chunk_gla"]
    passes = [(T, ours) for T in args.T] + [(T, ["fla_chunk_gla"]) for T in args.T if "fla_chunk_gla" in ops]
    for T, pass_ops in passes:
        B = max(1, args.tokens // T)
        try:
            built = bk.build_ops(B, T, H, Hkv, D, w, dtype, pass_ops)
        except Exception as err:  # e.g. inputs that do not fit: this T has no rows, the next T runs
            errors.append(f"inputs at T={T}: {one_line(err)}")
            traceback.print_exc()
            _empty_cache()
            continue
        for name, fn in built.items():
            row = {"op": name, "B": B, "T": T}
            for mode, backward in (("fwd", False), ("fwdbwd", True)):
                try:
                    ms, peak = measure(fn, backward, args.warmup, args.rep)
                except Exception as err:
                    row[f"{mode}_status"] = "out of memory" if _is_oom(err) else f"error: {one_line(err)}"
                    if not _is_oom(err):
                        errors.append(f"{name} {mode} T={T}: {one_line(err)}")
                        traceback.print_exc()
                    _empty_cache()
                    continue
                f = bk.flops(name, B, T, H, D, w) * (1.0 if not backward else 1.0 + bk.BWD_FACTOR[name])
                row.update({f"{mode}_ms": ms, f"{mode}_tflops": f / ms / 1e9, f"{mode}_peak_mib": peak})
            logger.info("%s", row)
            result["rows"].append(row)
            result["summary"] = bk.summarise(result["rows"])  # ratios so far: a timeout keeps them
            ctx.partial(result)
        del built
        _empty_cache()
    result["summary"] = bk.summarise(result["rows"])
    result["flop_model"] = {"sdpa_causal": "2*B*H*T^2*D", "gla": f"B*H*T*(4*D*D + {bk.GLA_CHUNK}*2*D)",
                            "swa": "4*B*H*T*min(w,T)*D", "backward_factor": bk.BWD_FACTOR}
    if errors:
        return {**result, "status": "failed", "reason": f"{len(errors)} cells failed, first: {errors[0]}"}
    return {**result, "status": "ok"}


def decode_kernels(ctx: Context) -> dict:
    """``benchmarks/bench_decode_kernels.py``'s grid, one context at a time."""
    from benchmarks import bench_decode_kernels as bd

    argv = ["--contexts", *map(str, DECODE_CONTEXTS[ctx.size]), *DECODE_SHAPE[ctx.size]]
    args = bd.parse_args(argv)
    if ctx.rehearsal:
        import triton.testing

        bd.DEVICE = "cpu"
        triton.testing.do_bench = lambda fn, **kw: cpu_timer(fn)  # do_bench times with CUDA events
    dtype = getattr(torch, args.dtype)
    result = {"argv": argv, "config": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    errors = []
    for C in args.contexts:
        try:
            result["rows"].extend(bd.bench_context(C, args, dtype))
        except Exception as err:
            status = "out of memory" if _is_oom(err) else f"error: {one_line(err)}"
            result["rows"].append({"context": C, "status": status})
            if not _is_oom(err):
                errors.append(f"context {C}: {one_line(err)}")
                traceback.print_exc()
        _empty_cache()
        ctx.partial(result)
    by = {(r["op"], r["context"]): r["ms_per_token"] for r in result["rows"] if "ms_per_token" in r}
    result["summary"] = {"liger_step_speedup_over_sdpa_kv_cache": {
        str(C): by[("sdpa_kv_cache", C)] / by[("liger_step", C)]
        for C in args.contexts if ("sdpa_kv_cache", C) in by and ("liger_step", C) in by}}
    if errors:
        return {**result, "status": "failed", "reason": f"{len(errors)} contexts failed, first: {errors[0]}"}
    return {**result, "status": "ok"}


# --- models -------------------------------------------------------------------------------------


def llama(shape: dict, **changes):
    """A LlamaForCausalLM of ``shape`` with random weights (seeded), fp32 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**shape, **changes}, attn_implementation="sdpa"))


def byte_tokenizer():
    """256 byte tokens + ``<|endoftext|>``, built in memory (no hub): ids are all the finetune needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[eot] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot)


def offline_text(chars: int) -> str:
    """``chars`` characters of English prose that ships with Python (pydoc's topics; this repo's
    sources where pydoc_data is missing), repeated if short, cut at a line end."""
    try:
        from pydoc_data.topics import topics

        text = "\n".join(topics.values())
    except ImportError:
        text = "\n".join(p.read_text(errors="replace") for p in sorted((REPO / "linearize").rglob("*.py")))
    text = text * max(1, math.ceil(chars / max(len(text), 1)))
    return text[: text.find("\n", chars) if text.find("\n", chars) > 0 else None]


def model_bench(ctx: Context) -> dict:
    """``linearize bench``'s library: teacher and converted (``linearize convert`` defaults), batch 1
    over the grid, then decode throughput at the largest batch that fits (doubling, capped)."""
    import linearize
    from linearize import bench as mb

    device, dtype = torch.device(ctx.device), torch.bfloat16
    shape = SMOLLM2_135M if not ctx.rehearsal else TINY
    teacher = llama(shape, num_hidden_layers=BENCH_LAYERS[ctx.size]).to(device=device, dtype=dtype).eval()
    conversion = linearize.ConversionConfig()
    converted = linearize.convert(copy.deepcopy(teacher), conversion).eval()
    tp_context, cap = BENCH_THROUGHPUT[ctx.size]
    timed, untimed = BENCH_STEPS[ctx.size]
    cfg = mb.BenchConfig(contexts=BENCH_CONTEXTS[ctx.size], batch=1, device=ctx.device, dtype="bfloat16",
                         decode_steps=timed, warmup_steps=untimed, max_batch=0, teacher_beyond_limit=True)
    report = mb.run_bench(teacher, converted, cfg)
    report["model"] = {"shape": shape | {"num_hidden_layers": BENCH_LAYERS[ctx.size]}, "weights": "random",
                       "conversion": dataclasses.asdict(conversion),
                       "teacher_attention": teacher.config._attn_implementation}
    report["table"] = mb.format_table(report)  # kept with every partial write: a timeout keeps the table
    ctx.partial(report)
    tp_cfg = dataclasses.replace(cfg, max_batch=cap)
    vocab = teacher.config.vocab_size
    errors = []
    for name, model in (("teacher", teacher), ("converted", converted)):
        try:
            report["results"]["throughput"][name] = mb.measure_throughput(model, tp_context, tp_cfg, device, vocab)
        except Exception as err:
            report["results"]["throughput"][name] = {"context": tp_context, "status": f"error: {one_line(err)}"}
            errors.append(f"{name} throughput: {one_line(err)}")
            traceback.print_exc()
        report["table"] = mb.format_table(report)
        ctx.partial(report)
    report["settings"]["max_batch"] = cap
    report["table"] = mb.format_table(report)
    logger.info("\n%s", report["table"])
    bad = [f"{name} {r['context']}: {r['status']}" for name in ("teacher", "converted")
           for r in report["results"][name] if r["status"] not in (mb.STATUS_OK, mb.STATUS_OOM)]
    errors += bad
    if errors:
        return {**report, "status": "failed", "reason": f"{len(errors)} cells failed, first: {errors[0]}"}
    return {**report, "status": "ok"}


def finetune_recipe(size: str, data: Path, output_dir: Path):
    """The default recipe, LoRA stage only, ``FINETUNE[size]``'s steps, length and precision, no
    validation, checkpoints or tensorboard: ``(recipe, overrides)``."""
    from linearize.recipe import load_recipe

    ft = FINETUNE[size]
    overrides = [
        "stages=[lora]", f"lora.max_steps={ft['steps']}", f"data.seq_len={ft['seq_len']}", f"data.source={data}",
        "data.validation_split=null", f"train.precision={ft['precision']}", "train.save_every=0",
        "train.tensorboard=false", f"output_dir={output_dir}", *ft["overrides"],
    ]
    return load_recipe(DEFAULT_RECIPE, overrides), overrides


def finetune(ctx: Context) -> dict:
    """The default recipe's conversion and LoRA settings, ``steps`` optimiser steps, bf16 mixed
    precision, through ``linearize.train.finetune``; tokens/s and peak memory."""
    import linearize.train
    from linearize import kernels

    size = FINETUNE[ctx.size]
    stamps: list[float] = []
    losses: list[float] = []

    warmup = WARMUP_STEPS[ctx.size]

    def callback(stage, step, metrics):
        stamps.append(time.perf_counter())
        losses.append(float(metrics["loss"]))
        steady = len(stamps) - 1 - warmup
        ctx.partial({"optimizer_steps": len(stamps), "losses": losses, "steady_steps": max(steady, 0),
                     "tokens_per_step": tokens_per_step,
                     "tokens_per_s_steady": (steady * tokens_per_step / (stamps[-1] - stamps[warmup])
                                             if steady > 0 else None),
                     "first_step_s": stamps[0] - start, "note": "partial: written after every optimiser step"})

    cuda = torch.device("cuda") if torch.cuda.is_available() and not ctx.rehearsal else None
    with tempfile.TemporaryDirectory(prefix="gpu_check_finetune_") as tmp:  # the run's folder: not kept
        work = Path(tmp)
        data = work / "text.txt"
        data.write_text(offline_text(2 * size["steps"] * size["seq_len"]))  # bytes = tokens: 2x what the steps read
        recipe, overrides = finetune_recipe(ctx.size, data, work / "run")
        tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.data.seq_len
        model = llama(SMOLLM2_135M if not ctx.rehearsal else TINY, num_hidden_layers=size["layers"])
        if cuda is not None:
            torch.cuda.reset_peak_memory_stats(cuda)
        start = time.perf_counter()
        result = linearize.train.finetune(recipe, model=model, tokenizer=byte_tokenizer(), callback=callback)
        wall = time.perf_counter() - start
        device = next(result.model.parameters()).device
    steady = len(stamps) - 1 - warmup  # the steps between the warm-up's last callback and the last one
    out = {
        "recipe": str(DEFAULT_RECIPE.relative_to(REPO)), "overrides": overrides,
        "conversion": recipe.to_dict()["conversion"],
        "model": f"{'tiny Llama' if ctx.rehearsal else 'SmolLM2-135M shape'}, {size['layers']} layers, "
                 "random weights",
        "tokenizer": "byte-level (257 ids): speed only", "device": str(device),
        "kernel_backend": kernels.resolve_backend(None, torch.empty(0, device=device)),
        "optimizer_steps": len(stamps), "tokens_per_step": tokens_per_step, "wall_s": wall,
        "first_step_s": stamps[0] - start if stamps else None,  # model setup, data, Triton compilation
        "losses": losses,
        "tokens_per_s_steady": steady * tokens_per_step / (stamps[-1] - stamps[warmup]) if steady > 0 else None,
        "steady_steps": max(steady, 0),
        "tokens_per_s_all_steps": result.summary.get("tokens_per_s"),  # the run summary's (first steps included)
    }
    if cuda is not None:
        out.update(peak_memory_bytes=torch.cuda.max_memory_allocated(cuda), memory_kind="cuda max allocated")
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        out.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                   memory_kind="process max RSS")
    if len(stamps) != size["steps"]:
        return {**out, "status": "failed", "reason": f"{len(stamps)} optimiser steps ran, {size['steps']} asked for"}
    bad = [i + 1 for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        return {**out, "status": "failed", "reason": f"non-finite loss at step {bad[0]}"}
    return {**out, "status": "ok"}


STEPS: dict[str, Callable[[Context], dict]] = {
    "kernels": kernels, "decode_kernels": decode_kernels, "model_bench": model_bench, "finetune": finetune,
}
