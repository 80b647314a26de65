"""The converted layer's recompute in the backward (``mixers.hybrid.RECOMPUTE_IN_BACKWARD``): the
same loss and the same gradient of every trainable parameter (LoRA and conversion parameters), bit
for bit in fp32, as autograd keeping every intermediate; the GLA / window ops' forwards run once
(their outputs are replayed, not recomputed); outside the recompute autograd keeps only the
projections' inputs and outputs; inference paths and the delta rule are unaffected. The training
step's light MLPs and heap trimming (``linearize.train.memory``) change no number either."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import linearize
from linearize import ConversionConfig
from linearize.convert import conversion_parameters
from linearize.kernels import chunked, chunked_backward
from linearize.mixers import hybrid
from linearize.mixers.hybrid import HybridAttention
from linearize.recipe import LoraConfig
from linearize.train.lora import _get_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

# The default recipe's layout (shared denominator, linear part beyond the window, sink tokens,
# Hedgehog maps, learned gate), Liger's fused op, learned sink logits with a separate normalizer,
# and the window + sinks control without a linear branch.
CONFIGS = {
    "default": {"mixer": "lizard", "normalizer": "shared", "linear_span": "beyond_window", "sink_tokens": 2,
                "window": 8, "chunk_size": 16},
    "liger": {"mixer": "liger", "window": 8, "chunk_size": 16},
    "sinks": {"mixer": "lizard", "num_sinks": 2, "normalizer": "separate", "window": 8, "chunk_size": 16},
    "window_only": {"mixer": "lizard", "linear": "none", "sink_tokens": 2, "linear_span": "beyond_window",
                    "normalizer": "shared", "window": 8, "chunk_size": 16},
}
_OPS = {name: getattr(chunked_backward, name) for name in ("_gla_chunked", "_gla_chunked_scalar", "_swa_blocks")}
_HYBRID_FORWARD = HybridAttention.hybrid_forward
_ATTEND = HybridAttention._attend
T = 100  # several chunks and (SEGMENT_TOKENS patched to 32) several segments per op


def _lora_model(arch: str, config: dict, seed: int = 0):
    model = linearize.convert(tiny_model(arch), ConversionConfig(**config))
    peft_model = _get_peft_model(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for _, p in conversion_parameters(model):
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: its gradients would not reach A
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return peft_model.train()


def _step(monkeypatch, arch, config, recompute: bool):
    """Loss, gradients of the trainable parameters, and how often the layers' forward and the ops'
    segment forwards ran."""
    monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", recompute)
    model = _lora_model(arch, config)
    calls = collections.Counter()
    for name, fn in _OPS.items():
        monkeypatch.setattr(chunked_backward, name, lambda *a, fn=fn, name=name: calls.update([name]) or fn(*a))
    monkeypatch.setattr(HybridAttention, "_attend",
                        lambda self, *a, **k: calls.update(["layer"]) or _ATTEND(self, *a, **k))
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_recompute_gives_the_same_loss_and_gradients(monkeypatch, arch, name):
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 32)
    loss0, grads0, calls0 = _step(monkeypatch, arch, CONFIGS[name], recompute=False)
    loss1, grads1, calls1 = _step(monkeypatch, arch, CONFIGS[name], recompute=True)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and any("lora_A" in n for n in grads0)
    for n in grads0:
        if grads0[n] is None:  # a parameter the layout does not use (window_only: the linear branch's)
            assert grads1[n] is None and "lora" not in n, n
            continue
        assert "lora" not in n or grads0[n].abs().sum() > 0, f"{n}: no gradient to compare"
        assert torch.equal(grads0[n], grads1[n]), n
    layers = calls0["layer"]
    assert layers > 0 and calls1["layer"] == 2 * layers, "each converted layer runs again in the backward"
    ops = {k: v for k, v in calls0.items() if k != "layer"}
    assert ops and ops == {k: v for k, v in calls1.items() if k != "layer"}, "the ops' forwards run once"
    if name in ("default", "sinks"):  # Lizard's learned gate: one decay per head, the scalar-decay GLA form
        assert ops.get("_gla_chunked_scalar", 0) > 0 and "_gla_chunked" not in ops, ops


def _saved_bytes_in_mixers(model, ids) -> int:
    """Bytes autograd saves (outside a recompute: the checkpoint saves its input) while the converted
    layers run (the ops' outputs kept for the replay are not saved tensors)."""
    inside, total, seen = [False], [0], set()
    mixers = [m for m in model.modules() if isinstance(m, HybridAttention)]
    handles = [m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)) for m in mixers]
    handles += [m.register_forward_hook(lambda *a: inside.__setitem__(0, False)) for m in mixers]

    def pack(t):
        if inside[0] and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t

    seen.update(p.untyped_storage().data_ptr() for p in model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    for h in handles:
        h.remove()
    del loss
    return total[0]


def test_only_the_projections_are_saved_outside_the_recompute(monkeypatch):
    model = _lora_model("llama", CONFIGS["default"])
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", False)
    keep = _saved_bytes_in_mixers(model, ids)
    monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", True)
    light = _saved_bytes_in_mixers(model, ids)
    # the layer's input, q, k, v, o_proj's input and the LoRA factors' small outputs, per layer
    hidden, kv, layers = model.config.hidden_size, 2 * 16, model.config.num_hidden_layers
    assert light <= layers * ids.numel() * (3 * hidden + 2 * kv + 4 * 4) * 4 < keep / 3, (light, keep)


def test_inference_and_the_delta_rule_do_not_recompute(monkeypatch):
    """No grad (eval, generation), a cache, or another linear op: the plain forward, once."""
    calls = collections.Counter()
    monkeypatch.setattr(HybridAttention, "hybrid_forward",
                        lambda self, *a, **k: calls.update([type(self).__name__]) or _HYBRID_FORWARD(self, *a, **k))
    model = _lora_model("llama", CONFIGS["default"])
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    assert calls["HybridAttention"] == 2  # 2 layers, once each
    got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)
    calls.clear()
    model(input_ids=ids, use_cache=True).logits.sum().backward()  # a cache: no recompute
    assert calls["HybridAttention"] == 2
    delta = _lora_model("llama", dict(CONFIGS["default"], linear="delta"))
    calls.clear()
    delta(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert calls["DeltaAttention"] == 2


def test_a_replay_that_does_not_match_the_record_raises():
    q, k, v = (torch.randn(1, 20, 2, 4) for _ in range(3))
    store = collections.deque()
    with chunked_backward.reused_outputs(store, replay=False):
        chunked_backward.swa_blocks(q.requires_grad_(), k, v, 4, 0.5, None, None, 8)
    assert len(store) == 1
    with chunked_backward.reused_outputs(store, replay=True), pytest.raises(RuntimeError, match="recorded with"):
        chunked_backward.swa_blocks(q[:, :10], k[:, :10], v[:, :10], 4, 0.5, None, None, 8)
    with chunked_backward.reused_outputs(collections.deque(), replay=True), pytest.raises(RuntimeError, match="more"):
        chunked_backward.swa_blocks(q, k, v, 4, 0.5, None, None, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_light_mlps_give_the_same_gradients(arch):
    """light_mlps (gate and up saved, the activation recomputed) == autograd keeping act(gate), bit for
    bit, for the LoRA parameters and the input; it covers every layer's MLP and removes itself."""
    from linearize.train.memory import light_mlps

    def step(light: bool):
        model = _lora_model(arch, CONFIGS["default"])
        ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        with light_mlps(model) if light else contextlib.nullcontext() as covered:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, covered, model

    loss0, grads0, _, _ = step(False)
    loss1, grads1, covered, model = step(True)
    assert covered == model.config.num_hidden_layers
    assert torch.equal(loss0, loss1)
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    assert not any("forward" in vars(m) for m in model.modules()), "the instance forwards are removed"


def test_light_mlps_save_gate_and_up_only():
    from linearize.train.memory import light_mlps

    mlp = tiny_model("llama").model.layers[0].mlp.train().requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(1, 8, 64, requires_grad=True)
    saved = []
    weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    for light in (False, True):
        ptrs: set[int] = set()

        def pack(t, ptrs=ptrs):
            ptrs.add(t.untyped_storage().data_ptr())
            return t

        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
              light_mlps(mlp) if light else contextlib.nullcontext()):
            mlp(x)
        saved.append(len(ptrs - weights))
    assert saved == [3, 2]


def test_recompute_inside_whole_layer_checkpointing(monkeypatch):
    """train.gradient_checkpointing (transformers' per-layer checkpoint around the layer's own) gives
    the same gradients too."""
    grads = []
    for recompute in (False, True):
        monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", recompute)
        model = _lora_model("llama", CONFIGS["default"])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_trimmed_forward_trims_every_kth_layer_with_grad_only(monkeypatch):
    from linearize.train import memory

    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    model = tiny_model("gemma3_text")  # 3 layers
    ids = torch.randint(0, VOCAB, (1, 12))
    with memory.trimmed_forward(model, 2) as n:
        assert n == 1
        model(input_ids=ids)
        assert calls == [0]
        with torch.no_grad():
            model(input_ids=ids)
        assert calls == [0]
    model(input_ids=ids)
    assert calls == [0], "the hooks are removed"
    with memory.trimmed_forward(model, 1) as n, torch.enable_grad():
        model(input_ids=ids)
    assert n == 3 and calls == [0] * 4
    with memory.trimmed_forward(model, 0) as n:
        assert n == 0


def test_light_mlps_probe_draws_no_random_numbers():
    """The once-per-class probe runs in eval mode under a forked RNG: training's random stream (LoRA
    dropout) is the same with and without light MLPs, and the modules keep their mode."""
    from linearize.train import memory

    model = _lora_model("llama", CONFIGS["default"])
    memory._CHECKED.clear()
    state = torch.get_rng_state()
    with memory.light_mlps(model) as covered:
        assert covered == 2
    assert torch.equal(state, torch.get_rng_state())
    assert all(m.training for m in model.modules())


def test_finetune_is_the_same_with_every_memory_saver(tmp_path, monkeypatch):
    """Both stages of a tiny finetune (attention transfer, then LoRA with the KL term) with the layers'
    recompute, the light MLPs and the heap trimmed after every layer give the same losses at every
    step and the same held-out perplexities as with none of them; with the trimming on, the heap is
    also trimmed before each stage and before the final evaluation."""
    import importlib

    from tiny_models import tiny_recipe, tiny_teacher
    from tiny_tokenizer import byte_tokenizer

    from linearize import environment
    from linearize.train import finetune, lora

    finetune_module = importlib.import_module("linearize.train.finetune")
    boundary_trims = []
    monkeypatch.setattr(finetune_module, "trim_heap", lambda: boundary_trims.append(environment.trim_heap()))
    runs = []
    for on in (False, True):
        monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", on)
        monkeypatch.setattr(lora, "LIGHT_MLP", on)
        recipe = tiny_recipe(tmp_path, f"run{on}", f"train.malloc_trim_every={int(on)}")
        runs.append(finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer()).summary)
        assert len(boundary_trims) == (3 if on else 0)  # attention transfer, LoRA, the final evaluation
    assert boundary_trims == [environment.glibc() is not None] * 3  # glibc here: each trim ran
    off, on = runs
    for stage in ("attention_transfer", "lora"):
        assert off["stages"][stage]["history"] == on["stages"][stage]["history"], stage
    assert off["perplexity"] == on["perplexity"]
