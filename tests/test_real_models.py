"""Slow: the invariants on the real SmolLM2-135M (offline default). Run with `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.sources import load_teacher
from test_convert import CACHE_KW, _cache_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_teacher("smollm2-135m")
    return model, tokenizer


def test_smollm2_conversion_invariants(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    assert (teacher.config.num_hidden_layers, teacher.config.num_attention_heads,
            teacher.config.num_key_value_heads) == (30, 9, 3)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
        model = linearize.convert(teacher, linearize.ConversionConfig(window=8))
        full = model(ids).logits
        with linearize.teacher_attention(model):
            torch.testing.assert_close(model(ids).logits, teacher_logits, atol=1e-4, rtol=1e-4)
        # prefill + decode == full forward
        split = ids.shape[1] // 2
        out = model(ids[:, :split], use_cache=True)
        cache, steps = _cache_of(out), [out.logits]
        for t in range(split, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
        # cached == uncached generation
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
        # save / reload
        folder = linearize.save_converted(model, tmp_path / "smol", tokenizer)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        torch.testing.assert_close(reloaded(ids).logits, full, atol=0, rtol=0)
