"""Invariants 2-4 of DESIGN.md §3 on tiny random models of every supported architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaModel

import linearize
from linearize import ConversionConfig, UnsupportedArchitectureError
from linearize.cache import HybridCacheLayer, cache_kwarg, cache_nbytes, output_cache
from tiny_models import ARCHS, VOCAB, tiny_model

# transformers renamed `past_key_values` to `cache` (5.2x); the GPU machine has 5.17.
CACHE_KW = cache_kwarg(LlamaModel)
EXACT = dict(atol=1e-5, rtol=1e-5)

VARIANTS = {
    "liger-gla": ConversionConfig(window=4),
    "liger-hgrn2": ConversionConfig(gate="hgrn2", window=4),
    "liger-mamba2-separate": ConversionConfig(gate="mamba2", window=4, normalizer="separate"),
    "liger-rwkv6-learned-mix": ConversionConfig(gate="rwkv6", window=4, mix="learned"),
    "liger-scalar-shared": ConversionConfig(gate="scalar", window=4, normalizer="shared"),
    "liger-linear-only": ConversionConfig(use_window=False, normalizer="separate"),
    "lizard": ConversionConfig(mixer="lizard", window=4),
    "liger-keep-layer-0": ConversionConfig(window=4, keep_softmax_layers=[0]),
    "lizard-beyond-window": ConversionConfig(mixer="lizard", window=4, normalizer="shared",
                                             linear_span="beyond_window"),
    "beyond-window-sink-tokens": ConversionConfig(mixer="lizard", window=4, normalizer="shared",
                                                  linear_span="beyond_window", sink_tokens=3),
}
BEYOND_WINDOW = dict(mixer="lizard", normalizer="shared", linear_span="beyond_window", num_sinks=0)


_cache_of = output_cache


def _converted(arch="llama", config=None, seed=0):
    return linearize.convert(tiny_model(arch, seed), config or ConversionConfig(window=4))


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_only_conversion_reproduces_teacher(arch):
    ids = torch.randint(0, VOCAB, (2, 24))
    teacher = tiny_model(arch)
    expected = teacher(ids).logits
    converted = linearize.convert(teacher, ConversionConfig(mixer="softmax"))
    assert type(converted).__name__.startswith("Linearize")
    torch.testing.assert_close(converted(ids).logits, expected, atol=0, rtol=0)


def _prefill_then_decode(model, ids, split):
    out = model(ids[:, :split], use_cache=True)
    cache, logits = _cache_of(out), [out.logits]
    for t in range(split, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


# Every variant on llama; the default Liger and Lizard mixers on every architecture.
PREFILL_CASES = [("llama", v) for v in VARIANTS] + [(a, v) for a in ARCHS[1:] for v in ("liger-gla", "lizard")]


@pytest.mark.parametrize("arch,variant", PREFILL_CASES)
def test_prefill_plus_decode_equals_full_forward(arch, variant):
    model = _converted(arch, VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 21))
    full = model(ids).logits
    stepped, cache = _prefill_then_decode(model, ids, split=11)
    torch.testing.assert_close(stepped, full, **EXACT)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_beyond_window_split_is_the_teacher_within_the_window(arch):
    """linear_span='beyond_window': up to `window` tokens the linear part is empty, so the converted
    model is the teacher exactly, whatever its learned parameters."""
    ids = torch.randint(0, VOCAB, (2, 16))
    teacher = tiny_model(arch)
    expected = teacher(ids).logits
    model = linearize.convert(teacher, ConversionConfig(window=8, **BEYOND_WINDOW))  # converts in place
    for _, param in linearize.conversion_parameters(model):
        torch.nn.init.normal_(param)
    torch.testing.assert_close(model(ids[:, :8]).logits, expected[:, :8], **EXACT)
    # past the window the linear part stands in for the teacher's softmax over the older tokens
    assert (model(ids).logits[:, 8:] - expected[:, 8:]).abs().max() > 1e-4


def test_sink_tokens_without_the_linear_part_are_streaming_attention():
    """With the linear part weighed to zero, a converted layer is the teacher's attention over its
    window and the first sink_tokens tokens (StreamingLLM), in one forward and token by token."""
    from oracles import streaming_attention

    ids = torch.randint(0, VOCAB, (2, 20))
    with streaming_attention(tiny_model("llama"), keep=[], window=4, sinks=3) as teacher:
        expected = teacher(ids).logits
    model = _converted("llama", ConversionConfig(window=4, sink_tokens=3, **BEYOND_WINDOW))
    for _, mixer in linearize.iter_mixers(model):
        torch.nn.init.constant_(mixer.linear_log_scale, -1e4)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-4)
    logits, _ = _prefill_then_decode(model, ids, split=2)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_sink_tokens_train_with_finite_gradients():
    """The first queries see no sink outside their window and padding sees nothing at all: neither
    may turn a gradient into NaN."""
    model = _converted("llama", ConversionConfig(window=4, sink_tokens=2, **BEYOND_WINDOW))
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = [p.grad for _, p in linearize.conversion_parameters(model)] + [model.model.layers[0].self_attn.q_proj.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sink_tokens", [0, 2])
def test_beyond_window_split_matches_a_token_by_token_reference(sink_tokens):
    """o_t = (Σ_{t−w<s≤t or s<n} e^{q·k_s} v_s + e^β Σ_{n≤s≤t−w} Γ(s, t−w) φq·φk_s v_s) / (the same
    without v), Γ(s, u) = Π_{s<r≤u} γ_r: softmax over the window and the n sink tokens, the decayed
    linear state as it was when the window began for everything else, one denominator."""
    from linearize.mixers.parts import apply_rope

    w, T, n = 4, 11, sink_tokens
    model = _converted("llama", ConversionConfig(window=w, sink_tokens=n, **BEYOND_WINDOW))
    mixer = model.model.layers[0].self_attn
    torch.manual_seed(1)
    for _, param in linearize.conversion_parameters(model):
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(1, T, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    with torch.no_grad():
        out = mixer.hybrid_forward(x, (cos, sin))[0]
        q, k, v = mixer._qkv(x)
        fq, fk = mixer.feature_map_q(q)[0], mixer.feature_map_k(k)[0]
        log_g = torch.nn.functional.logsigmoid(mixer.gate_proj(x))[0]  # [T, Hkv], τ = 1
        q_r, k_r = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]
        v, beta = v[0], mixer.linear_log_scale
        group = mixer.num_heads // mixer.num_kv_heads
        o = torch.zeros(T, mixer.num_heads, mixer.head_dim)
        for t in range(T):
            for h in range(mixer.num_heads):
                g = h // group
                num, den = torch.zeros(mixer.head_dim), torch.zeros(())
                for s in range(t + 1):
                    if s > t - w or s < n:
                        a = torch.exp(q_r[t, h] @ k_r[s, g] * mixer.scaling)
                    else:
                        a = torch.exp(beta[h] + log_g[s + 1 : t - w + 1, g].sum()) * (fq[t, h] @ fk[s, g])
                    num, den = num + a * v[s, g], den + a
                o[t, h] = num / den
        expected = mixer.o_proj(o.reshape(T, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_conversion_changes_the_model_and_reuses_weights():
    teacher = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 16))
    expected = teacher(ids).logits
    q_weight = teacher.model.layers[0].self_attn.q_proj.weight
    model = linearize.convert(teacher, ConversionConfig(window=4))
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight
    assert not torch.allclose(model(ids).logits, expected, atol=1e-3)
    assert len(list(linearize.iter_mixers(model))) == 2


def test_teacher_attention_mode_reproduces_teacher():
    for arch in ARCHS:
        teacher = tiny_model(arch)
        ids = torch.randint(0, VOCAB, (2, 20))
        expected = teacher(ids).logits
        model = linearize.convert(teacher, ConversionConfig(mixer="lizard", window=4))
        with linearize.teacher_attention(model):
            torch.testing.assert_close(model(ids).logits, expected, **EXACT)


def test_cache_memory_is_constant_in_context_length():
    model = _converted("llama", ConversionConfig(window=4, keep_softmax_layers=[]))
    ids = torch.randint(0, VOCAB, (1, 64))
    _, cache_short = _prefill_then_decode(model, ids[:, :16], split=8)
    _, cache_long = _prefill_then_decode(model, ids, split=8)
    assert all(isinstance(layer, HybridCacheLayer) for layer in cache_long.layers)
    assert cache_nbytes(cache_short) == cache_nbytes(cache_long) > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("mode", [dict(num_beams=1), dict(num_beams=3)], ids=["greedy", "beam"])
def test_generate_cached_equals_uncached(arch, mode):
    model = _converted(arch, ConversionConfig(window=4, keep_softmax_layers=[1]))
    ids = torch.randint(1, VOCAB, (2, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, **mode)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


@pytest.mark.parametrize("config", [ConversionConfig(window=4), ConversionConfig(mixer="lizard", window=3),
                                    ConversionConfig(window=3, **BEYOND_WINDOW),
                                    ConversionConfig(window=3, sink_tokens=2, **BEYOND_WINDOW)],
                         ids=["liger", "lizard", "beyond-window", "sink-tokens"])
def test_left_padded_batch_equals_rows_alone(config):
    model = _converted("llama", config)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (12, 7, 3)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
        assert batch.sequences[i, width:].tolist() == alone.sequences[0, len(r):].tolist()
        for s_batch, s_alone in zip(batch.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_gives_identical_logits(arch, tmp_path):
    model = _converted(arch, ConversionConfig(mixer="lizard", window=4))
    for _, mixer in linearize.iter_mixers(model):  # move the new parameters off their init
        for p in mixer.new_parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (2, 15))
    expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"linearize_{arch}" and "auto_map" in config
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)


def test_loading_builds_the_model_convert_built_and_old_configs_still_load(tmp_path):
    """One construction step for convert() and loading: the same modules and settings; a config.json
    written before linear_span/sink_tokens existed (and with chunk_size) still loads."""
    model = _converted("llama", ConversionConfig(mixer="lizard", window=4, keep_softmax_layers=[1]))
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    for key in ("linear_span", "sink_tokens"):
        del config["linearize"][key]
    config["linearize"]["chunk_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert str(reloaded) == str(model)
    assert reloaded.config._attn_implementation == model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("linearize", "cli"):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    try:
        import linearize  # noqa: F401
        raise SystemExit("linearize must not be importable here")
    except ModuleNotFoundError:
        pass
    with torch.no_grad():
        torch.save(model(torch.load(ids_file)).logits, out_file)
    """
)


def logits_in_fresh_process(folder, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """The logits a saved checkpoint gives for ``ids`` when loaded with trust_remote_code in a fresh
    Python process where ``linearize`` cannot be imported (the exported flat files only)."""
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    return torch.load(tmp_path / "out.pt")


def test_reload_in_fresh_process_without_package(tmp_path):
    config = ConversionConfig(window=4, normalizer="shared", linear_span="beyond_window", keep_softmax_layers=[0])
    model = _converted("qwen3", config)
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    torch.testing.assert_close(logits_in_fresh_process(folder, ids, tmp_path), expected, atol=0, rtol=0)


def test_saved_code_is_what_the_process_loaded_not_what_is_on_disk_now(tmp_path, monkeypatch):
    """A finetune saves hours after it started: an upgrade or an edited checkout meanwhile must not
    change (or break) the code written beside its weights."""
    from linearize import export

    model = _converted("llama")
    before = linearize.save_converted(model, tmp_path / "before")
    monkeypatch.setattr(export, "PACKAGE_ROOT", tmp_path / "moved")  # the installed files are gone / elsewhere
    after = linearize.save_converted(model, tmp_path / "after")
    code = sorted(p.name for p in before.glob("*.py"))
    assert len(code) == len(export.RUNTIME_MODULES) + 2
    assert sorted(p.name for p in after.glob("*.py")) == code
    assert all((before / n).read_text() == (after / n).read_text() for n in code)


def test_save_is_atomic_and_replaces_existing(tmp_path):
    model = _converted("llama")
    out = tmp_path / "ckpt"
    linearize.save_converted(model, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(linearize.LinearizeError, match="--overwrite"):
        linearize.save_converted(model, out)
    assert (out / "stale.txt").exists()
    linearize.save_converted(model, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: .*llama"):
        linearize.convert(model)


def test_converting_twice_is_refused():
    model = _converted("llama")
    with pytest.raises(ValueError, match="already converted"):
        linearize.convert(model)


@pytest.mark.parametrize("bad", [dict(window=0), dict(gate="nope"), dict(mixer="liger", gate="learned"),
                                 dict(keep_softmax_layers=[5]), dict(linear_span="nope"),
                                 dict(mixer="lizard", linear_span="beyond_window"), dict(sink_tokens=4),
                                 dict(sink_tokens=-1, **BEYOND_WINDOW)])
def test_bad_conversion_settings_are_clear_errors(bad):
    with pytest.raises(ValueError):
        linearize.convert(tiny_model("llama"), ConversionConfig(**bad))
