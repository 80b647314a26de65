"""Where one LoRA step's memory goes: the tensors autograd keeps for the backward pass, by module.

    OMP_NUM_THREADS=1 python -m benchmarks.memory_breakdown recipes/smollm2-135m-cpu.yaml [--seq-len 2048]
        [--ops autograd recompute] [--mixer keep recompute]

Builds the recipe's converted model with its LoRA adapters, runs one forward of a [1, T] batch with
``saved_tensors_hooks`` recording every tensor autograd saves (deduplicated by storage), attributed
to the innermost module running at the time (mixer, MLP, rest of the layer, LM head and loss), once
with the model's own full-logits cross-entropy (``lora.lm_loss_chunk=0``) and once with the chunked
loss. Weights, which autograd also references, are not counted. ``--ops``: one column per variant of
the chunked GLA / window ops' backward (``benchmarks/light_ops.py``: autograd over the forward, or
``kernels/chunked_backward.py``'s recomputing Functions), each with the chunked loss. ``--mixer``:
one column per converted-layer mode (``keep``: autograd keeps the layer's intermediates;
``recompute``: ``mixers.hybrid.RECOMPUTE_IN_BACKWARD``, the layer keeps its projections and the
ops' outputs, with the LoRA step's light MLPs), each with the recomputing ops. A recomputed layer's
saved tensors are not seen by the hooks (``torch.utils.checkpoint`` stands in for them); the row
"live after the forward" counts everything the step holds at the start of the backward, whoever
holds it: glibc's bytes in use (``mallinfo2``) after the forward and the loss minus before. Prints
a Markdown table (recorded in benchmarks/results/memory_cpu.md).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util

import torch

from linearize.recipe import load_recipe


def _model(recipe):
    from linearize.config import torch_dtype
    from linearize.convert import conversion_parameters, convert
    from linearize.sources import load_model, load_tokenizer
    from linearize.train.lora import _get_peft_model

    model = load_model(recipe.model, dtype=torch_dtype(recipe.model_dtype))
    model = convert(model, recipe.conversion, tokenizer=load_tokenizer(recipe.model))
    extra = list(conversion_parameters(model))
    peft_model = _get_peft_model(model, recipe.lora)
    for _, p in extra:
        p.requires_grad_(True)
    return peft_model.train()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (heap and mmap'd blocks); None elsewhere."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def saved_by_module(peft_model, ids: torch.Tensor, chunk: int) -> dict[str, int]:
    """Bytes autograd saves during the forward + loss of ``ids`` [1, T], by module (storages counted once)."""
    import contextlib

    from linearize.train import lora
    from linearize.train.lm_loss import (
        NO_LOGITS,
        capture_lm_head_input,
        chunked_lm_loss,
        shifted_labels,
    )
    from linearize.train.memory import light_mlps

    base = peft_model.get_base_model()
    where = ["embedding/other"]
    seen: set[int] = set()
    totals: collections.Counter[str] = collections.Counter()
    handles = []
    seen.update(p.untyped_storage().data_ptr() for p in peft_model.parameters())  # weights are not activations
    live_before = malloc_in_use()

    def label(module, name):
        handles.append(module.register_forward_pre_hook(lambda m, a: where.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: where.pop() and None))

    for layer in base.get_decoder().layers:
        kind = type(layer.self_attn).__name__
        label(layer, f"{kind} layers: norms, residuals")
        label(layer.self_attn, f"{kind} layers: attention / mixer")
        label(layer.mlp, f"{kind} layers: MLP")

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            totals[where[-1]] += t.untyped_storage().nbytes()
        return t

    light = light_mlps(peft_model) if lora.LIGHT_MLP else contextlib.nullcontext()  # as the LoRA step
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), light:
        if chunk:
            with capture_lm_head_input(base) as box:
                peft_model(input_ids=ids, use_cache=False, logits_to_keep=NO_LOGITS)
            where.append("LM head + loss")
            ce, _ = chunked_lm_loss(box["hidden"], base.lm_head.weight, shifted_labels(ids), chunk=chunk)
        else:
            handles.append(base.lm_head.register_forward_pre_hook(lambda m, a: where.append("LM head + loss")))
            ce = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    live = None if live_before is None else malloc_in_use() - live_before
    for h in handles:
        h.remove()
    del ce
    out = dict(totals)
    if live is not None:
        out[LIVE] = live
    return out


LIVE = "live after the forward (malloc in use; all holders)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ops", nargs="+", default=None, help="columns by chunked-op backward variant instead")
    ap.add_argument("--mixer", nargs="+", default=None, choices=["keep", "recompute"],
                    help="columns by converted-layer mode instead (recomputing ops)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    model = _model(recipe)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    if args.mixer:
        from benchmarks.light_ops import use_mixer, use_mlp

        rows = {}
        for mode in args.mixer:  # keep: neither the layers' recompute nor the light MLPs
            use_mixer(mode)
            use_mlp("keep" if mode == "keep" else "light")
            rows[f"layers: {mode}" + (", light MLPs" if mode == "recompute" else "")] = saved_by_module(
                model, ids, recipe.lora.lm_loss_chunk)
        use_mixer("recompute")
        use_mlp("light")
    elif args.ops:
        from benchmarks.light_ops import use, use_mixer, use_mlp

        use_mixer("keep")  # the ops' own saved tensors, seen by the hooks
        use_mlp("keep")
        rows = {}
        for variant in args.ops:
            use(variant)
            rows[f"ops: {variant}"] = saved_by_module(model, ids, recipe.lora.lm_loss_chunk)
        use("autograd")
    else:
        rows = {"full logits (before)": saved_by_module(model, ids, 0),
                f"chunked {recipe.lora.lm_loss_chunk} (after)": saved_by_module(model, ids, recipe.lora.lm_loss_chunk)}
    keys = sorted({k for r in rows.values() for k in r} - {LIVE})
    gb = 1e9
    print(f"T={args.seq_len}, vocab={model.config.vocab_size}; weights {weights / gb:.3f} GB, trainable "
          f"{trainable / gb:.4f} GB (AdamW state 2x that)\n")
    print("| saved for backward (GB) | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys + ["total"]:
        vals = [sum(v for n, v in r.items() if n != LIVE) if k == "total" else r.get(k, 0) for r in rows.values()]
        print(f"| {k} | " + " | ".join(f"{v / gb:.3f}" for v in vals) + " |")
    if all(LIVE in r for r in rows.values()):
        print(f"| {LIVE} | " + " | ".join(f"{r[LIVE] / gb:.3f}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
