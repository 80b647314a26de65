"""The delta-rule linear branch (ConversionConfig.linear='delta', issue 18) as a converted layer: the
layer equals a token-by-token delta rule written out here, and every invariant of DESIGN.md §3 holds
for it on tiny models (prefill + decode, generate, left padding, save/reload, trust_remote_code, LoRA
merge, attention transfer), with the settings it refuses refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_convert import (
    CACHE_KW,
    _cache_of,
    _prefill_then_decode,
    logits_in_fresh_process,
)
from tiny_models import ARCHS, VOCAB, tiny_config, tiny_model, tiny_recipe, tiny_teacher
from tiny_tokenizer import byte_tokenizer
from transformers import AutoModelForCausalLM

import linearize
from linearize import ConversionConfig
from linearize.mixers import DeltaAttention, HybridAttention
from linearize.mixers.delta import DELTA_BETA_INIT

EXACT = dict(atol=1e-5, rtol=1e-5)
DELTA = dict(linear="delta", window=4)
BEYOND_WINDOW = dict(linear="delta", window=3, mixer="lizard", normalizer="shared", linear_span="beyond_window",
                     num_sinks=0)
VARIANTS = {
    "gla-gate": ConversionConfig(**DELTA),
    "scalar-gate-learned-mix": ConversionConfig(**DELTA, gate="scalar", mix="learned"),
    "hgrn2-shared": ConversionConfig(**DELTA, gate="hgrn2", normalizer="shared"),
    "lizard": ConversionConfig(**DELTA, mixer="lizard"),
    "linear-only": ConversionConfig(linear="delta", use_window=False),
    "keep-layer-1": ConversionConfig(**DELTA, keep_softmax_layers=[1]),
    "beyond-window-sink-tokens": ConversionConfig(**{**BEYOND_WINDOW, "window": 4}, sink_tokens=2),
}


def _converted(arch="llama", config=None, perturb=True):
    model = linearize.convert(tiny_model(arch), config or ConversionConfig(**DELTA))
    if perturb:  # away from the init, as after attention transfer
        torch.manual_seed(3)
        for _, param in linearize.conversion_parameters(model):
            param.data.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation
    yield
    torch.set_num_threads(before)


# --- what the layer computes -----------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["gla", "scalar"])
def test_linear_branch_is_the_gated_delta_rule_token_by_token(gate):
    """S'_t = diag(α_t) S_{t-1}, S_t = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ, o_t = q_t S_t with
    k = φk(k)/‖φk(k)‖, q = φq(q)/‖φq(q)‖, α from the teacher's key, β = σ(W_β x + b)."""
    model = _converted("llama", ConversionConfig(linear="delta", use_window=False, gate=gate))
    mixer = model.model.layers[0].self_attn
    T, H, Hkv, D = 9, mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    x = torch.randn(1, T, model.config.hidden_size)
    with torch.no_grad():
        out = mixer(x)[0]
        q, k, v = (t[0] for t in mixer._qkv(x))  # [T, H|Hkv, D]
        qn, kn = F.normalize(q.softmax(-1), dim=-1), F.normalize(k.softmax(-1), dim=-1)
        if gate == "gla":
            log_a = F.logsigmoid(k) / 16.0  # [T, Hkv, D]
        else:
            log_a = (F.logsigmoid(k.mean(-1, keepdim=True)) / 16.0).expand(T, Hkv, D)
        beta = torch.sigmoid(mixer.beta_proj(x))[0]  # [T, Hkv]
        S = torch.zeros(Hkv, D, D)
        o = torch.zeros(T, H, D)
        for t in range(T):
            for g in range(Hkv):
                S[g] = log_a[t, g].exp()[:, None] * S[g]
                S[g] = S[g] + beta[t, g] * torch.outer(kn[t, g], v[t, g] - S[g].T @ kn[t, g])
            for h in range(H):
                o[t, h] = qn[t, h] @ S[h // (H // Hkv)]
        expected = mixer.o_proj(o.reshape(1, T, -1))  # [1, T, hidden]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_conversion_adds_a_beta_projection_starting_at_one_half():
    model = linearize.convert(tiny_model("qwen3"), ConversionConfig(**DELTA))
    mixers = [m for _, m in linearize.iter_mixers(model)]
    assert mixers and all(type(m) is DeltaAttention for m in mixers)
    names = {name.split("self_attn.")[1] for name, _ in linearize.conversion_parameters(model)}
    assert names == {"beta_proj.weight", "beta_proj.bias"}  # Liger's gate reuses the key: nothing else new
    x = torch.randn(2, 5, model.config.hidden_size)
    for m in mixers:
        beta = m.write_strength(x)
        assert beta.shape == (2, 5, m.num_kv_heads)
        torch.testing.assert_close(beta, torch.full_like(beta, DELTA_BETA_INIT))
    gla = linearize.convert(tiny_model("qwen3"), ConversionConfig(window=4))
    assert all(type(m) is HybridAttention for _, m in linearize.iter_mixers(gla))


def test_delta_differs_from_the_additive_branch_it_replaces():
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        gla = linearize.convert(tiny_model("llama"), ConversionConfig(window=4))(ids).logits
        delta = linearize.convert(tiny_model("llama"), ConversionConfig(**DELTA))(ids).logits
    assert (gla - delta).abs().max() > 1e-3


def test_settings_that_mean_nothing_under_the_delta_rule_are_refused():
    with pytest.raises(ValueError, match=r"normalizer='separate'.*linear='delta'.*Use normalizer='none'"):
        ConversionConfig(linear="delta", normalizer="separate")
    with pytest.raises(ValueError, match=r"^linear='deltanet': must be one of gla, delta"):
        ConversionConfig(linear="deltanet")
    # Lizard's own normalizer is 'separate': under the delta rule an unset one is 'none'
    assert ConversionConfig(mixer="lizard", linear="delta").normalizer == "none"
    assert ConversionConfig(mixer="lizard").normalizer == "separate"


def test_cli_and_recipe_take_the_linear_setting(tmp_path):
    from linearize.cli import parse
    from linearize.config import SETTINGS

    args = parse(["convert", "some-model", "--out", str(tmp_path / "o"), "--linear", "delta", "--gate", "scalar"])
    config = ConversionConfig(**{name: getattr(args, name) for name in SETTINGS})
    assert (config.linear, config.gate, config.normalizer) == ("delta", "scalar", "none")
    recipe = tiny_recipe(tmp_path, "run", "conversion.linear=delta")
    assert recipe.conversion.linear == "delta" and recipe.conversion.normalizer == "none"


def test_conversion_chunk_size_reaches_the_chunked_delta_kernel(monkeypatch):
    from linearize.kernels import delta, delta_chunked

    seen = []

    def spy(*args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return delta_chunked.gated_delta_rule(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(delta, "chunked_delta", spy)
    ids = torch.randint(0, VOCAB, (1, 40))
    logits = {}
    for size in (8, 64):
        seen.clear()
        with torch.no_grad():
            logits[size] = linearize.convert(tiny_model("llama"), ConversionConfig(**DELTA, chunk_size=size))(ids).logits
        assert seen and set(seen) == {size}, seen
    torch.testing.assert_close(logits[8], logits[64], **EXACT)



@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_beyond_window_split_is_the_teacher_within_the_window(arch):
    """Under the delta rule too: up to `window` tokens nothing has entered the state (q·z = 0, so the
    shared normalizer gives the window's softmax alone), whatever β and the other new parameters are."""
    ids = torch.randint(0, VOCAB, (2, 14))
    teacher = tiny_model(arch)
    with torch.no_grad():
        expected = teacher(ids).logits
    model = linearize.convert(teacher, ConversionConfig(**{**BEYOND_WINDOW, "window": 7}))
    for _, param in linearize.conversion_parameters(model):
        torch.nn.init.normal_(param)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :7]).logits, expected[:, :7], **EXACT)
        assert (model(ids).logits[:, 7:] - expected[:, 7:]).abs().max() > 1e-4


def test_bf16_model_decodes_like_its_full_forward():
    from conftest import assert_close_rms

    model = _converted("qwen2", ConversionConfig(**DELTA, mix="learned")).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        stepped, _ = _prefill_then_decode(model, ids, split=8)
    assert stepped.dtype == torch.bfloat16 and torch.isfinite(stepped).all()
    assert_close_rms(stepped.float(), full.float(), torch.bfloat16, "bf16 prefill + decode vs full forward")


@pytest.mark.parametrize("gate", ["gla", "learned"])
def test_in_place_decode_step_equals_the_op(gate):
    """DeltaAttention._linear_step_ (the single-token step for HybridAttention.decode_step's hook)
    advances the state and reads out exactly as the delta-rule op, per-channel and scalar gates, GQA."""
    from linearize.kernels.delta import gated_delta_rule

    mixer = _converted("llama", ConversionConfig(linear="delta", window=4, gate=gate,
                                                 mixer="lizard" if gate == "learned" else "liger")).model.layers[0].self_attn
    x = torch.randn(3, 1, mixer.hidden_size)
    with torch.no_grad():
        fq, linear = mixer._linear_inputs(x, *mixer._qkv(x), None)
        state = torch.randn(3, mixer.num_kv_heads, fq.shape[-1], linear.v.shape[-1])
        g = linear.log_g[..., 0] if linear.log_g.shape[-1] == 1 else linear.log_g
        beta = torch.ones(linear.k.shape[:3])
        o_ref, s_ref = gated_delta_rule(fq, linear.k, linear.v, beta, g, scale=1.0, initial_state=state,
                                        output_final_state=True, backend="reference")
        o = mixer._linear_step_(fq, linear, state)
    torch.testing.assert_close(o, o_ref.float(), **EXACT)
    torch.testing.assert_close(state, s_ref, **EXACT)

# --- DESIGN.md §3 invariants ------------------------------------------------------------------------

PREFILL_CASES = [("llama", v) for v in VARIANTS] + [(a, "gla-gate") for a in ARCHS[1:]]


@pytest.mark.parametrize("arch,variant", PREFILL_CASES)
def test_prefill_plus_decode_equals_full_forward(arch, variant):
    model = _converted(arch, VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        full = model(ids).logits
        stepped, cache = _prefill_then_decode(model, ids, split=9)
        torch.testing.assert_close(stepped, full, **EXACT)
        assert cache.get_seq_length() == ids.shape[1]
        # two chunks of several tokens continue the same state
        out = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], use_cache=True, **{CACHE_KW: _cache_of(out)}).logits
    torch.testing.assert_close(torch.cat([out.logits, rest], dim=1), full, **EXACT)


@pytest.mark.parametrize("arch,mode", [("llama", dict(num_beams=1)), ("gemma3_text", dict(num_beams=1)),
                                       ("llama", dict(num_beams=3))], ids=["llama-greedy", "gemma3-greedy", "llama-beam"])
def test_generate_cached_equals_uncached(arch, mode):
    model = _converted(arch, ConversionConfig(**DELTA, keep_softmax_layers=[1]))
    ids = torch.randint(1, VOCAB, (2, 9))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, **mode)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


@pytest.mark.parametrize("config", [ConversionConfig(**DELTA), ConversionConfig(**BEYOND_WINDOW, sink_tokens=2)],
                         ids=["delta", "delta-beyond-window-sink-tokens"])
def test_left_padded_batch_equals_rows_alone(config):
    model = _converted("llama", config)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (11, 6, 3)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
        assert batch.sequences[i, width:].tolist() == alone.sequences[0, len(r):].tolist()
        for s_batch, s_alone in zip(batch.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_save_and_reload_gives_identical_logits(arch, tmp_path):
    model = _converted(arch, ConversionConfig(**DELTA, mixer="lizard"))
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["linearize"]["linear"] == "delta"
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model) and str(reloaded) == str(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)


def test_reload_in_fresh_process_without_package(tmp_path):
    """trust_remote_code: the exported runtime carries the delta kernels (chunked and reference)."""
    model = _converted("qwen3", ConversionConfig(**BEYOND_WINDOW, keep_softmax_layers=[0]))
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    assert (folder / "linearize_kernels_delta_chunked.py").is_file()
    torch.testing.assert_close(logits_in_fresh_process(folder, ids, tmp_path), expected, atol=0, rtol=0)


def test_beta_projection_trains_in_attention_transfer():
    """The per-layer transfer loss reaches W_β and b_β of every converted layer."""
    from linearize.train.transfer import transfer_errors

    model = linearize.convert(tiny_model("llama"), ConversionConfig(**DELTA))
    mse, _ = transfer_errors(model, torch.randint(0, VOCAB, (2, 12)))
    mse.sum().backward()
    for _, mixer in linearize.iter_mixers(model):
        for p in (mixer.beta_proj.weight, mixer.beta_proj.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_finetune_trains_beta_and_the_merged_checkpoint_equals_the_unmerged_adapter(tmp_path):
    """Both stages on a delta conversion: attention transfer lowers every layer's error and moves β;
    the merged checkpoint gives the unmerged LoRA adapter's logits (invariant 5)."""
    from conftest import RTOL, assert_close_rms
    from peft import PeftModel
    from safetensors.torch import load_file

    from linearize.train import CONVERSION_PARAMS_FILE, finetune

    recipe = tiny_recipe(tmp_path, "run", "conversion.linear=delta", "lora.kl_weight=0")
    result = finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer())
    at = result.summary["stages"]["attention_transfer"]
    assert all(a < b for a, b in zip(at["per_layer_after"]["mse"], at["per_layer_before"]["mse"])), at
    assert result.summary["merge_check_relative_rms"] < RTOL[torch.float32]
    trained = load_file(str(result.adapter_dir / CONVERSION_PARAMS_FILE))
    biases = [t for name, t in trained.items() if name.endswith("beta_proj.bias")]
    assert len(biases) == 2 and all((b - 0.0).abs().max() > 1e-4 for b in biases)  # moved off logit(0.5) = 0
    unmerged = linearize.convert(tiny_teacher(), recipe.conversion)
    _, unexpected = unmerged.load_state_dict(trained, strict=False)
    assert not unexpected
    unmerged = PeftModel.from_pretrained(unmerged, str(result.adapter_dir)).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        assert_close_rms(reloaded(input_ids=ids).logits, want, torch.float32, "merged checkpoint vs unmerged adapter")


def test_triton_backend_matches_chunked_in_prefill_decode_and_gradients(monkeypatch):
    """The layer on the Triton kernels (interpreted on CPU): the same logits and β gradients as on the
    chunked path, and its decode step (the Triton decode kernel) continues the prefill exactly."""
    pytest.importorskip("triton")
    from linearize.kernels import BACKEND_ENV

    ids = torch.randint(0, VOCAB, (2, 13))
    results = {}
    for backend in ("chunked", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        model = _converted("llama", ConversionConfig(**DELTA, gate="scalar", normalizer="shared"))
        model(ids, labels=ids).loss.backward()
        grad = model.model.layers[0].self_attn.beta_proj.weight.grad.clone()
        with torch.no_grad():
            full = model(ids).logits
            stepped, _ = _prefill_then_decode(model, ids, split=9)
        torch.testing.assert_close(stepped, full, **EXACT)
        results[backend] = full, grad
    torch.testing.assert_close(results["triton"][0], results["chunked"][0], **EXACT)
    torch.testing.assert_close(results["triton"][1], results["chunked"][1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_delta_conversion_invariants(tmp_path):
    """Slow (`pytest -m slow`): the invariants on the real SmolLM2-135M (offline default), delta branch
    with the default recipe's shape of conversion (window, beyond-window split, kept layers)."""
    from linearize.sources import load_teacher

    teacher, tokenizer = load_teacher("smollm2-135m")
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
        model = linearize.convert(teacher, ConversionConfig(linear="delta", window=8, keep_softmax_layers=[0, -1]))
        full = model(ids).logits
        assert torch.isfinite(full).all()
        with linearize.teacher_attention(model):
            torch.testing.assert_close(model(ids).logits, teacher_logits, atol=1e-4, rtol=1e-4)
        stepped, _ = _prefill_then_decode(model, ids, split=ids.shape[1] // 2)
        torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
        folder = linearize.save_converted(model, tmp_path / "smol", tokenizer)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        torch.testing.assert_close(reloaded(ids).logits, full, atol=0, rtol=0)


def test_write_strength_benchmark_reads_every_delta_layer(tmp_path):
    """benchmarks/delta_write_strength loads a saved delta checkpoint (trust_remote_code) and reads β of
    every converted layer on held-out text: β = DELTA_BETA_INIT everywhere before any training."""
    pytest.importorskip("gensim")
    from benchmarks.delta_write_strength import write_strengths

    tokenizer = byte_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)  # every byte of the held-out text is a token id the model has
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = linearize.convert(teacher, ConversionConfig(**DELTA, keep_softmax_layers=[0]))
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    tokenizer.save_pretrained(folder)
    betas = write_strengths(str(folder), tokens=64)
    converted = sum(isinstance(m, DeltaAttention) for m in model.modules())
    assert converted > 0 and len(betas) == converted
    for beta in betas:
        assert beta.shape[1] == 64
        torch.testing.assert_close(beta, torch.full_like(beta, DELTA_BETA_INIT))
