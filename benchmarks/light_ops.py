"""Run the ``linearize`` CLI (or time the ops) with the chunked ops' backward switched, for before/after.

    OMP_NUM_THREADS=1 /usr/bin/time -v python -m benchmarks.light_ops --ops recompute -- finetune recipes/... ...
    OMP_NUM_THREADS=1 python -m benchmarks.light_ops --ops autograd --time-ops

``--ops``: ``autograd`` (the chunked ops as they are: autograd keeps every intermediate),
``recompute`` (``kernels/chunked_backward.py``: inputs saved, hand-written backward) or
``checkpoint`` (``torch.utils.checkpoint`` per segment). ``--mixer``: ``recompute`` (the converted
layers keep their input and the ops' outputs and recompute the rest in the backward,
``mixers.hybrid.RECOMPUTE_IN_BACKWARD``, the default) or ``keep`` (autograd keeps the layers'
intermediates). ``--mlp``: ``light`` (the LoRA step's gated MLPs keep gate and up only,
``train.lora.LIGHT_MLP``, the default) or ``keep`` (glibc's heap trimming is the recipe's
``train.malloc_trim_every``). The switch is a monkeypatch of
``chunked._gla_chunked`` / ``chunked._swa_blocks`` made here, not in library code. ``--time-ops``
times forward + backward of both ops at the default recipe's shapes (SmolLM2-135M, hedgehog features,
shared denominator: GLA q [1, T, 9, 128], k [1, T, 3, 128], v [1, T, 3, 65]; window 128, D 64).

One decay per head (the default recipe's learned gate, ``kernels.chunked.SCALAR_DECAY``):
``--scalar-decay off`` runs the CLI with it expanded to every key dimension (the per-key form, as
before the scalar-decay form existed); ``--time-ops --decay per-head`` times the GLA op with g
[1, T, 3, 1] in both forms, interleaved, each with the library's default (memory-light) backward:

    OMP_NUM_THREADS=1 python -m benchmarks.light_ops --time-ops --decay per-head
    OMP_NUM_THREADS=1 python -m benchmarks.light_ops --scalar-decay off -- finetune recipes/... ...

Results: benchmarks/results/memory_cpu.md.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from linearize.kernels import chunked, chunked_backward
from linearize.mixers import hybrid

VARIANTS = {
    "autograd": (chunked._gla_chunked, chunked._swa_blocks),
    "recompute": (chunked_backward.gla_chunked, chunked_backward.swa_blocks),
    "checkpoint": (chunked_backward.gla_chunked_checkpointed, chunked_backward.swa_blocks_checkpointed),
}


def use(variant: str) -> None:
    """Route chunked.py's segments through ``variant``. ``recompute`` is the library's own switch
    (``chunked.LIGHT_BACKWARD``, which also covers the scalar-decay form of a per-head decay); the
    others turn it off and patch the per-key GLA and window segments (a per-head decay's scalar form
    then runs under plain autograd)."""
    chunked._gla_chunked, chunked._swa_blocks = VARIANTS["autograd"]
    chunked.LIGHT_BACKWARD = variant == "recompute"
    if variant != "recompute":
        chunked._gla_chunked, chunked._swa_blocks = VARIANTS[variant]


def use_mixer(mode: str) -> None:
    """``recompute``: the converted layers recompute in the backward; ``keep``: autograd keeps their
    intermediates."""
    hybrid.RECOMPUTE_IN_BACKWARD = {"recompute": True, "keep": False}[mode]


def use_mlp(mode: str) -> None:
    """``light``: the LoRA step's gated MLPs recompute the activation in the backward; ``keep``: not."""
    from linearize.train import lora

    lora.LIGHT_MLP = {"light": True, "keep": False}[mode]


PARTS = ("fwd", "bwd", "fwd cpu", "bwd cpu")


def _gla_inputs(T: int, decay_dims: int):
    """The GLA op's inputs at the default recipe's shapes; g [1, T, 3, ``decay_dims``]."""
    q = torch.randn(1, T, 9, 128).softmax(-1).requires_grad_()  # [B, T, H, 2D] hedgehog features
    k = torch.randn(1, T, 3, 128).softmax(-1).requires_grad_()  # [B, T, Hkv, 2D]
    v = torch.randn(1, T, 3, 65).requires_grad_()  # [B, T, Hkv, D + 1] shared denominator column
    shift = 4 if decay_dims == 1 else 0  # the learned gate's decays sit nearer 1
    g = (F.logsigmoid(torch.randn(1, T, 3, decay_dims) + shift) / 16).requires_grad_()
    return q, k, v, g


def _time_forward_backward(run, into: dict, key) -> None:
    """Append the wall and this process's CPU time of ``run()`` and of its backward to ``into[key, part]``."""
    t0, c0 = time.perf_counter(), time.process_time()
    o = run()
    t1, c1 = time.perf_counter(), time.process_time()
    o.backward(torch.ones_like(o))
    t2, c2 = time.perf_counter(), time.process_time()
    for part, dt in zip(PARTS, (t1 - t0, t2 - t1, c1 - c0, c2 - c1)):
        into[key, part].append(dt)


def _print_medians(label: str, times: dict, key, repeats: int, T: int) -> None:
    m = {part: statistics.median(times[key, part]) * 1e3 for part in PARTS}
    print(f"{label}: forward {m['fwd']:6.1f} ms (cpu {m['fwd cpu']:6.1f}), backward "
          f"{m['bwd']:6.1f} ms (cpu {m['bwd cpu']:6.1f}), total {m['fwd'] + m['bwd']:6.1f} ms "
          f"(cpu {m['fwd cpu'] + m['bwd cpu']:6.1f}); median of {repeats}, T={T}")


def time_ops(T: int, repeats: int, variants: list[str]) -> None:
    """Forward and backward of both ops, the variants interleaved (shared machine: same conditions).
    Prints medians of wall time and of this process's CPU time (less sensitive to other jobs)."""
    torch.manual_seed(0)
    q, k, v, g = _gla_inputs(T, 128)
    qr = torch.randn(1, T, 9, 64).requires_grad_()  # [B, T, H, D]
    kr, vr = torch.randn(1, T, 3, 64).requires_grad_(), torch.randn(1, T, 3, 64).requires_grad_()
    ops = {
        "gla": lambda: chunked.gated_linear_attention(q, k, v, g, scale=1.0)[0],
        "swa": lambda: chunked.sliding_window_attention(qr, kr, vr, window=128)[0],
    }
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for variant in variants:
            use(variant)
            for name, run in ops.items():
                _time_forward_backward(run, times, (variant, name))
    for variant in variants:
        for name in ops:
            _print_medians(f"{variant:10s} {name}", times, (variant, name), repeats, T)


def time_scalar_decay(T: int, repeats: int) -> None:
    """Forward and backward of the GLA op with one decay per head, in the scalar-decay form and
    expanded to the per-key form (``chunked.SCALAR_DECAY``), interleaved; medians as ``time_ops``."""
    torch.manual_seed(0)
    q, k, v, g = _gla_inputs(T, 1)  # g [B, T, Hkv, 1]: the learned gate
    forms = {"scalar": True, "per-key": False}
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for form, scalar in forms.items():
            chunked.SCALAR_DECAY = scalar
            _time_forward_backward(lambda: chunked.gated_linear_attention(q, k, v, g, scale=1.0)[0], times, form)
    chunked.SCALAR_DECAY = True
    for form in forms:
        _print_medians(f"gla per-head decay, {form:8s}", times, form, repeats, T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", choices=list(VARIANTS), default="recompute")
    parser.add_argument("--mixer", choices=["recompute", "keep"], default="recompute")
    parser.add_argument("--mlp", choices=["light", "keep"], default="light")
    parser.add_argument("--time-ops", action="store_true")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--decay", choices=["per-key", "per-head"], default="per-key",
                        help="--time-ops: per-key (both ops, the --variants) or per-head (GLA, both decay forms)")
    parser.add_argument("--scalar-decay", choices=["on", "off"], default="on",
                        help="off: a per-head decay takes the per-key form (chunked.SCALAR_DECAY = False)")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the linearize CLI arguments")
    args = parser.parse_args()
    if args.time_ops:
        if args.decay == "per-head":
            time_scalar_decay(args.seq_len, args.repeats)
        else:
            time_ops(args.seq_len, args.repeats, args.variants)
        return
    chunked.SCALAR_DECAY = args.scalar_decay == "on"
    use(args.ops)
    use_mixer(args.mixer)
    use_mlp(args.mlp)
    from linearize.cli import main as cli_main

    sys.argv = ["linearize", *[a for a in args.cli if a != "--"]]
    cli_main()


if __name__ == "__main__":
    main()
