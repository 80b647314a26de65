"""``keep_softmax_layers: auto:N``: convert() probes the teacher (linearize.layer_probe) and keeps the
layers it suggests; the checkpoint records the indices and the probe's scores and reloads without
probing again; bad values are one clear error (config, recipe, CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import save_tiny_teacher
from tiny_tokenizer import byte_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import linearize
from linearize import cli, layer_probe
from linearize.config import ConversionConfig, parse_layer_indices
from linearize.recipe import RecipeError, recipe_from_dict

LAYERS = 4


def _teacher(seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer Llama over the byte tokenizer's 257 ids (auto:N has layers to choose from)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=257, max_position_embeddings=512, bos_token_id=256,
                         eos_token_id=256, pad_token_id=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def converted():
    """(converted model, the probe run separately on an identical teacher, its induction and far scores)."""
    tok = byte_tokenizer()
    reference = _teacher()
    vocab = layer_probe.random_token_range(tok, reference.config.vocab_size)
    induction = layer_probe.induction_scores(reference, length=256, vocab=vocab)  # capped: 512 / 2
    far = layer_probe.far_attention(reference, layer_probe.probe_text_ids(tok, 512), window=16,
                                    sinks=layer_probe.PROBE_SINKS)
    model = linearize.convert(_teacher(), ConversionConfig(window=16, keep_softmax_layers="auto:2"), tokenizer=tok)
    return model, tok, induction, far


def test_auto_keeps_the_layers_the_probe_suggests(converted):
    model, _, induction, far = converted
    expected = layer_probe.suggest_layers(induction, far, count=2)
    assert len(expected) == 2
    assert model.config.linearize["keep_softmax_layers"] == expected
    mixed = [i for i, _ in linearize.iter_mixers(model)]
    assert mixed == [i for i in range(LAYERS) if i not in expected]
    probe = model.config.linearize_layer_probe
    assert probe["request"] == "auto:2" and probe["suggested"] == expected
    assert (probe["window"], probe["sinks"], probe["induction_length"], probe["text_tokens"]) == (16, 4, 256, 512)
    torch.testing.assert_close(torch.tensor(probe["induction_max_head"]), induction.amax(dim=1))
    torch.testing.assert_close(torch.tensor(probe["far_attention_max_head"]), far.amax(dim=1))


def test_saved_checkpoint_holds_indices_and_scores_and_reloads_identically(converted, tmp_path):
    model, tok, _, _ = converted
    out = linearize.save_converted(model, tmp_path / "auto", tok)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.linearize == model.config.linearize  # concrete indices: no probe at load
    assert isinstance(reloaded.config.linearize["keep_softmax_layers"], list)
    assert reloaded.config.linearize_layer_probe == model.config.linearize_layer_probe
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_auto_config_round_trips_and_validates():
    config = ConversionConfig(keep_softmax_layers=" auto:06")
    assert config.keep_softmax_layers == "auto:6" and config.auto_layer_count() == 6
    assert ConversionConfig.from_dict(config.to_dict()) == config
    assert ConversionConfig(keep_softmax_layers=[1, -1]).auto_layer_count() is None
    for bad in ("auto:", "auto:-1", "auto:2.5", "auto:x", "auto6"):
        with pytest.raises(ValueError, match=r"^keep_softmax_layers=.*auto:N"):
            ConversionConfig(keep_softmax_layers=bad)
    config.check_model(num_layers=6, max_positions=None)  # N may equal the layer count
    with pytest.raises(ValueError, match=r"^keep_softmax_layers='auto:6': N must be from 0 to the model's 5 layers"):
        config.check_model(num_layers=5, max_positions=None)
    with pytest.raises(ValueError, match="not resolved yet"):
        config.layer_kinds(6)


def test_auto_beyond_the_layers_fails_before_the_model_changes():
    teacher = _teacher()
    with pytest.raises(ValueError, match="N must be from 0 to the model's 4 layers"):
        linearize.convert(teacher, ConversionConfig(keep_softmax_layers="auto:5"), tokenizer=byte_tokenizer())
    assert type(teacher) is LlamaForCausalLM
    with pytest.raises(ValueError, match=r"pass convert\(\.\.\., tokenizer=\.\.\.\)"):
        linearize.convert(teacher, ConversionConfig(keep_softmax_layers="auto:1"))


def test_auto_zero_keeps_no_layer():
    model = linearize.convert(_teacher(), ConversionConfig(window=16, keep_softmax_layers="auto:0"),
                              tokenizer=byte_tokenizer())
    assert model.config.linearize["keep_softmax_layers"] == []
    assert len(list(linearize.iter_mixers(model))) == LAYERS


def test_cli_and_recipe_accept_auto(tmp_path, capsys):
    assert parse_layer_indices("auto:3") == "auto:3" and parse_layer_indices("0,-1") == [0, -1]
    with pytest.raises(argparse.ArgumentTypeError, match=r"auto:N needs N, a whole number"):
        parse_layer_indices("auto:many")
    recipe = recipe_from_dict(yaml.safe_load("conversion:\n  keep_softmax_layers: auto:6"))
    assert recipe.conversion.keep_softmax_layers == "auto:6"
    with pytest.raises(RecipeError, match=r"keep_softmax_layers='auto:-2'.*auto:N"):
        recipe_from_dict({"conversion": {"keep_softmax_layers": "auto:-2"}})

    teacher = save_tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "converted"
    assert cli.main(["convert", str(teacher), "--out", str(out), "--window", "8", "--keep-softmax", "auto:1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    kept = model.config.linearize["keep_softmax_layers"]
    assert kept == model.config.linearize_layer_probe["suggested"] and len(kept) == 1
    assert cli.main(["convert", str(teacher), "--out", str(tmp_path / "x"), "--keep-softmax", "auto:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("keep_softmax_layers='auto:3': N must be from 0 to the model's 2 layers")
    with pytest.raises(SystemExit) as exit_:  # an option's bad value: argparse's one line
        cli.main(["convert", str(teacher), "--out", str(tmp_path / "y"), "--keep-softmax", "auto"])
    assert exit_.value.code == 2
    assert "argument --keep-softmax: keep_softmax_layers='auto': auto:N needs N" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_6_reproduces_the_default_recipes_layers_on_smollm2(tmp_path):
    """The default recipe's [7, 17, 18, 20, 21, 23] (recipes/smollm2-135m-cpu.yaml): layer 7 has the
    most attention beyond the 128-token window, the other five the strongest induction heads."""
    data = yaml.safe_load(Path("recipes/smollm2-135m-cpu.yaml").read_text())
    recipe = recipe_from_dict({**data, "conversion": {**data["conversion"], "keep_softmax_layers": "auto:6"}})
    model, tokenizer = linearize.sources.load_teacher("smollm2-135m")
    model = linearize.convert(model, recipe.conversion, tokenizer=tokenizer)
    assert model.config.linearize["keep_softmax_layers"] == [7, 17, 18, 20, 21, 23]
    far = model.config.linearize_layer_probe["far_attention_max_head"]
    assert max(range(len(far)), key=far.__getitem__) == 7
