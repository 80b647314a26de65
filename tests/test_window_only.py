"""linear='none': the converted layer without its linear branch is StreamingLLM's attention (window +
sink tokens), through the cache, generation and save/reload; the linear parameters do nothing."""

from __future__ import annotations

import pytest
import torch
from oracles import streaming_attention
from test_convert import _prefill_then_decode
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import linearize
from linearize import ConversionConfig
from linearize.mixers import WindowOnlyAttention
from linearize.recipe import load_recipe

SPLIT_SINK_TOKENS = dict(mixer="lizard", normalizer="shared", linear_span="beyond_window", sink_tokens=3, num_sinks=0)


def _window_only(arch="llama", **settings):
    return linearize.convert(tiny_model(arch), ConversionConfig(window=4, linear="none", **settings))


@pytest.mark.parametrize("settings", [SPLIT_SINK_TOKENS, dict(sink_tokens=3, linear_span="beyond_window",
                                                              normalizer="shared")])
def test_window_only_is_streaming_attention(settings):
    ids = torch.randint(0, VOCAB, (2, 20))
    with streaming_attention(tiny_model("llama"), keep=[], window=4, sinks=3) as teacher:
        expected = teacher(ids).logits
    model = _window_only(**settings)
    assert all(isinstance(m, WindowOnlyAttention) for _, m in linearize.iter_mixers(model))
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-4)
    logits, _ = _prefill_then_decode(model, ids, split=2)  # token by token through the cache
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_linear_parameters_change_nothing():
    ids = torch.randint(0, VOCAB, (1, 16))
    model = _window_only(mixer="lizard", num_sinks=2)  # learned sinks, learned gate, Hedgehog maps, learned mix
    before = model(ids).logits
    with torch.no_grad():
        for _, mixer in linearize.iter_mixers(model):
            for name, p in mixer.named_parameters():
                if any(part in name for part in ("gate_proj", "feature_map", "window_logit")):
                    p.add_(torch.randn_like(p))
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_window_only_generates_and_reloads(tmp_path):
    model = _window_only(**SPLIT_SINK_TOKENS)
    ids = torch.randint(0, VOCAB, (1, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    linearize.save_converted(model, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.linearize["linear"] == "none"
    longer = torch.randint(0, VOCAB, (1, 24))
    torch.testing.assert_close(again(longer).logits, model(longer).logits, atol=0, rtol=0)


def test_window_only_needs_the_window_and_is_a_recipe_key():
    with pytest.raises(ValueError, match="linear='none' leaves only the window branch"):
        ConversionConfig(linear="none", use_window=False, normalizer="separate")
    recipe = load_recipe("recipes/smollm2-135m-cpu.yaml", ["conversion.linear=none"])
    assert recipe.conversion.linear == "none" and recipe.conversion.sink_tokens == 4


def test_attention_transfer_with_nothing_to_train_says_so(tmp_path):
    """linear='none' with sink tokens (no learned sinks) leaves attention transfer nothing that changes
    an output: a clear error that names the fix, not autograd's "does not require grad"."""
    from tiny_models import tiny_recipe, tiny_teacher
    from tiny_tokenizer import byte_tokenizer

    from linearize.train import finetune

    recipe = tiny_recipe(tmp_path, "run", "conversion.linear=none", "conversion.num_sinks=0",
                         "conversion.normalizer=shared", "conversion.linear_span=beyond_window",
                         "conversion.sink_tokens=2")
    with pytest.raises(ValueError, match=r"attention transfer has nothing to train.*stages=\[lora\]"):
        finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer())
