"""A failed in-place conversion leaves the teacher exactly as it was, so a retry works (issue 17 item 7)."""

from __future__ import annotations

import importlib

import pytest
import torch

import linearize
import linearize.surgery as surgery
from linearize import ConversionConfig
from tiny_models import VOCAB, tiny_model


class Boom(RuntimeError):
    pass


def _state(model):
    layers = model.model.layers
    return (type(model), model.config, model.config.to_dict(), [layer.self_attn for layer in layers],
            [m.config for m in model.modules() if "config" in vars(m)],
            dict(model.model._forward_pre_hooks), model.config._attn_implementation)


@pytest.mark.parametrize("fail_at", ["second_layer", "after_build"])
def test_failure_in_the_middle_of_surgery_leaves_the_teacher_and_a_retry_works(monkeypatch, fail_at):
    teacher = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = teacher(ids).logits
    before = _state(teacher)

    if fail_at == "second_layer":  # the first layer is already swapped when the second fails
        real = surgery.HybridAttention

        def mixer(teacher_attn, config, idx, **kw):
            if idx == 1:
                raise Boom("injected")
            return real(teacher_attn, config, idx, **kw)

        monkeypatch.setattr(surgery, "HybridAttention", mixer)
    else:  # every layer swapped and the hook registered, then something fails
        real_build = surgery.build_converted

        def build(model, base_type):
            real_build(model, base_type)
            raise Boom("injected")

        monkeypatch.setattr(importlib.import_module("linearize.convert"), "build_converted", build)

    with pytest.raises(Boom):
        linearize.convert(teacher, ConversionConfig(window=4))
    after = _state(teacher)
    assert after[0] is before[0] and after[1] is before[1] and after[2] == before[2]
    assert all(a is b for a, b in zip(after[3], before[3])) and all(a is b for a, b in zip(after[4], before[4]))
    assert after[5] == before[5] and after[6] == before[6]
    assert not list(linearize.iter_mixers(teacher))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, expected, atol=0, rtol=0)

    monkeypatch.undo()
    model = linearize.convert(teacher, ConversionConfig(window=4))  # the retry is not refused
    fresh = linearize.convert(tiny_model("llama"), ConversionConfig(window=4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=0, rtol=0)
    assert len(model.model._forward_pre_hooks) == len(before[5]) + 1  # one padding hook, not two


def test_bad_settings_change_nothing():
    teacher = tiny_model("llama")
    before = _state(teacher)
    for bad in (dict(keep_softmax_layers=[9]), dict(window=10_000)):
        with pytest.raises(ValueError):
            linearize.convert(teacher, ConversionConfig(**bad))
        after = _state(teacher)
        assert after[0] is before[0] and after[1] is before[1]
        assert all(a is b for a, b in zip(after[3], before[3]))
    linearize.convert(teacher, ConversionConfig(window=4))
