"""ConversionConfig checks every value when it is made, and against the model before converting it."""

from __future__ import annotations

import math

import pytest
import torch

import linearize
from linearize import ConversionConfig
from linearize.config import MAX_WINDOW, SETTINGS
from linearize.convert import check_conversion
from tiny_models import COMMON, VOCAB, tiny_config, tiny_model

BAD = [
    # (field, value, words the message must hold)
    ("gate_logit_normalizer", math.nan, "finite number > 0.0"),
    ("gate_logit_normalizer", math.inf, "finite number > 0.0"),
    ("gate_logit_normalizer", 0.0, "> 0.0"),
    ("gate_logit_normalizer", -1.0, "> 0.0"),
    ("gate_logit_normalizer", True, "finite number"),
    ("gate_logit_normalizer", "16", "finite number"),
    ("window_weight", 5.0, "from 0.0 to 1.0"),
    ("window_weight", -0.1, "from 0.0 to 1.0"),
    ("window_weight", math.nan, "from 0.0 to 1.0"),
    ("window", 0, "integer from 1 to 1048576 tokens"),
    ("window", 10_000_000_000, "integer from 1 to 1048576 tokens"),
    ("window", 1.5, "integer"),
    ("window", 64.0, "integer"),
    ("window", True, "integer"),
    ("window", "64", "integer"),
    ("num_sinks", -1, "integer from 0 to 1024"),
    ("num_sinks", 5000, "integer from 0 to 1024"),
    ("num_sinks", 2.0, "integer"),
    ("sink_tokens", -1, "integer from 0"),
    ("sink_tokens", MAX_WINDOW + 1, "integer from 0"),
    ("chunk_size", 0, "integer from 1"),
    ("use_window", "yes", "true or false"),
    ("use_window", 1, "true or false"),
    ("keep_softmax_layers", [1.5], "list of layer indices"),
    ("keep_softmax_layers", [True], "list of layer indices"),
    ("keep_softmax_layers", "0,1", "list of layer indices"),
    ("keep_softmax_layers", 3, "list of layer indices"),
    ("mixer", "mamba", "one of liger, lizard, softmax"),
    ("gate", "nope", "one of gla"),
    ("feature_map", 1, "one of softmax, hedgehog"),
    ("mix", "nope", "one of fixed, learned"),
    ("normalizer", "sum", "one of none"),
    ("linear_span", "most", "one of all, beyond_window"),
]


@pytest.mark.parametrize("name,value,words", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_every_bad_value_is_refused_naming_field_value_and_what_is_allowed(name, value, words):
    with pytest.raises(ValueError) as err:
        ConversionConfig(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{name}={value!r}: "), message
    assert words in message, message


def test_every_field_has_a_check():
    import dataclasses

    assert set(SETTINGS) == {f.name for f in dataclasses.fields(ConversionConfig)}


@pytest.mark.parametrize("kwargs", [dict(window_weight=0), dict(window_weight=1), dict(window=1),
                                    dict(window=MAX_WINDOW), dict(gate_logit_normalizer=2),
                                    dict(keep_softmax_layers=(0, -1)), dict(num_sinks=0)])
def test_edge_values_are_accepted_and_normalised(kwargs):
    config = ConversionConfig(**kwargs)
    name, value = next(iter(kwargs.items()))
    stored = getattr(config, name)
    assert stored == (list(value) if isinstance(value, tuple) else value)
    assert type(stored) is type(SETTINGS[name].kind(0) if SETTINGS[name].kind is not list else [])


def test_mixer_defaults_fill_in_and_are_checked_too():
    config = ConversionConfig(mixer="lizard")
    assert (config.gate, config.window, config.num_sinks, config.window_weight) == ("learned", 128, 4, 0.5)
    assert ConversionConfig.from_dict(config.to_dict()) == config


def test_window_longer_than_the_context_is_refused_before_the_model_changes():
    model = tiny_model("llama")
    limit = COMMON["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"^window={limit + 1}: must be at most the model's context of {limit} tokens"):
        linearize.convert(model, ConversionConfig(window=limit + 1))
    with pytest.raises(ValueError, match=rf"^sink_tokens={limit + 1}: .*{limit} tokens"):
        linearize.convert(model, window=4, mixer="lizard", normalizer="shared", linear_span="beyond_window",
                          sink_tokens=limit + 1)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    linearize.convert(model, ConversionConfig(window=limit))  # the whole context is allowed


@pytest.mark.parametrize("keep", [[2], [-3], [0, 7]])
def test_kept_layers_out_of_range_are_refused_with_the_range(keep):
    model = tiny_model("llama")  # 2 layers
    with pytest.raises(ValueError, match=r"^keep_softmax_layers=.*indices -2 to 1"):
        linearize.convert(model, ConversionConfig(window=4, keep_softmax_layers=keep))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_model_checks_need_only_the_config():
    """The CLI can check a conversion against the teacher's config.json before loading any weight."""
    check_conversion(tiny_config("llama"), ConversionConfig(window=8, keep_softmax_layers=[-1]))
    with pytest.raises(ValueError, match="keep_softmax_layers"):
        check_conversion(tiny_config("llama"), ConversionConfig(keep_softmax_layers=[5]))
    with pytest.raises(linearize.UnsupportedArchitectureError):
        from transformers import GPT2Config

        check_conversion(GPT2Config(), ConversionConfig())


def test_overrides_without_a_config_take_the_chosen_mixers_defaults():
    model = linearize.convert(tiny_model("llama"), mixer="lizard", window=4)
    assert model.config.linearize["gate"] == "learned" and model.config.linearize["num_sinks"] == 4
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


# --- the convert command's options, generated from the fields --------------------------------------

LEGACY_FLAGS = ("--mixer", "--gate", "--tau", "--feature-map", "--window", "--no-window", "--mix", "--window-weight",
                "--normalizer", "--linear-span", "--sink-tokens", "--sinks", "--keep-softmax")


def _parser():
    import argparse

    from linearize.config import conversion_arguments

    parser = argparse.ArgumentParser(prog="convert", exit_on_error=False)
    for flag, kwargs in conversion_arguments():
        parser.add_argument(flag, **kwargs)
    return parser


def _config_from(argv):
    args = _parser().parse_args(argv)
    return ConversionConfig(**{name: getattr(args, name) for name in SETTINGS})


def test_convert_options_cover_every_field_with_the_existing_flag_names():
    from linearize.config import conversion_arguments, field_docs

    arguments = dict(conversion_arguments())
    assert set(LEGACY_FLAGS) <= set(arguments)
    assert {kw["dest"] for kw in arguments.values()} == set(SETTINGS)
    docs = field_docs(ConversionConfig)
    for flag, kwargs in arguments.items():  # help is the field's docstring's first sentence
        assert docs[kwargs["dest"]].replace("``", "").split(". ")[0].split(" (")[0] in kwargs["help"], flag
    assert "liger 64, lizard 128" in arguments["--window"]["help"]


def test_parsed_options_make_the_config():
    assert _config_from([]) == ConversionConfig()
    config = _config_from("--mixer lizard --no-window --normalizer separate --sinks 0 --keep-softmax 0,-1 "
                          "--tau 2 --window-weight 0.25 --chunk-size 16".split())
    assert config == ConversionConfig(mixer="lizard", use_window=False, normalizer="separate", num_sinks=0,
                                      keep_softmax_layers=[0, -1], gate_logit_normalizer=2.0, window_weight=0.25,
                                      chunk_size=16)
    assert _config_from(["--mixer", "lizard"]).window == 128  # left out: the mixer's default


def test_bad_options_are_one_line_naming_the_field():
    import argparse

    with pytest.raises(argparse.ArgumentError, match=r"--keep-softmax.*keep_softmax_layers='1\.5'"):
        _parser().parse_args(["--keep-softmax", "1.5"])
    with pytest.raises(ValueError, match=r"^gate_logit_normalizer=nan: must be a finite number > 0"):
        _config_from(["--tau", "nan"])
    with pytest.raises(ValueError, match=r"^window_weight=5\.0: must be a finite number from 0\.0 to 1\.0"):
        _config_from(["--window-weight", "5"])
