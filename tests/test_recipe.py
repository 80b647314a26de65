"""The finetuning recipe: shipped YAMLs validate; bad keys/types name the key and the file; overrides;
help text from the field docs."""

from pathlib import Path

import pytest
import yaml

from linearize.config import ConversionConfig
from linearize.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_help

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPE_FILES}
    for model in ("llama-3.2-1b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m-cpu"):
        for mixer in ("liger", "lizard"):
            assert f"{model}-{mixer}.yaml" in names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.conversion, ConversionConfig)
    # Every key the file sets is a recipe key that kept its value (nothing silently dropped).
    raw = yaml.safe_load(path.read_text())
    assert recipe.conversion.mixer == raw["conversion"]["mixer"]
    assert recipe.stages == raw["stages"]
    if recipe.conversion.mixer == "lizard":
        assert recipe.stages == ["attention_transfer", "lora"]
        assert (recipe.lora.r, recipe.lora.alpha) == (8, 16.0)
    else:
        assert recipe.stages == ["lora"]
        assert recipe.lora.r == 8
    assert recipe.lora.targets == raw.get("lora", {}).get("targets", ["q_proj", "k_proj", "v_proj"])
    assert set(recipe.lora.targets) <= {"q_proj", "k_proj", "v_proj", "o_proj"}
    if recipe.accelerate_config is not None:
        launch = yaml.safe_load(Path(recipe.accelerate_config).read_text())
        assert launch["distributed_type"] == "FSDP"
    if "-7b-" in path.name or "-8b-" in path.name:
        assert recipe.accelerate_config is not None, "7-8B recipes name an FSDP accelerate config"
    if "cpu" not in path.name:
        # The published settings (DESIGN.md §1).
        assert recipe.lora.lr == 1e-3 and recipe.train.precision == "bf16"
        assert recipe.data.seq_len == 1024 and recipe.data.max_samples == 50000 and recipe.lora.epochs == 2
    else:
        # CPU recipes run on the offline models (DESIGN.md) and the offline Wikipedia sample.
        assert recipe.model in ("smollm2-135m", "gemma3-270m") and recipe.data.source == "gensim-wiki"


def test_round_trip_through_yaml():
    recipe = load_recipe(RECIPES / "smollm2-135m-cpu-lizard.yaml")
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key",
    [
        ("lora:\n  rank: 8\n", "lora.rank"),
        ("data:\n  seq_len: long\n", "data.seq_len"),
        ("train:\n  precision: bf32\n", "train.precision"),
        ("stages: [lora, distill]\n", "stages[1]"),
        ("lora:\n  targets: q_proj\n", "lora.targets"),
        ("train:\n  gradient_checkpointing: 1\n", "train.gradient_checkpointing"),
        ("conversion:\n  mixr: liger\n", "conversion.mixr"),
        ("conversion:\n  window: 1.5\n", "conversion.window"),
        ("optimizer: adam\n", "optimizer"),
        ("data: gensim-wiki\n", "data"),
    ],
)
def test_wrong_key_or_type_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_value_errors_name_the_section_and_file(tmp_path):
    path = _write(tmp_path, "conversion:\n  mixer: mamba\n")
    with pytest.raises(RecipeError, match="conversion.*mixer='mamba'") as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    path = _write(tmp_path, "stages: []\n")
    with pytest.raises(RecipeError, match="stages is empty"):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


REQUIRED = "model: smollm2-135m\noutput_dir: runs/x\n"


def test_yaml_floats_without_dot_are_numbers(tmp_path):
    recipe = load_recipe(_write(tmp_path, REQUIRED + "lora:\n  lr: 1e-4\n"))  # YAML 1.1 reads 1e-4 as a string
    assert recipe.lora.lr == 1e-4


def test_overrides(tmp_path):
    path = _write(tmp_path, REQUIRED + "lora:\n  r: 4\n")
    recipe = load_recipe(path, ["lora.r=16", "conversion.keep_softmax_layers=[0, 3]", "train.max_grad_norm=null",
                                "stages=[attention_transfer, lora]", "conversion.mixer=lizard", "data.source=x.txt"])
    assert recipe.lora.r == 16
    assert recipe.conversion.keep_softmax_layers == [0, 3]
    assert recipe.train.max_grad_norm is None
    assert recipe.stages == ["attention_transfer", "lora"]
    assert recipe.conversion.num_sinks == 4  # lizard defaults fill in
    with pytest.raises(RecipeError, match="lora.rank") as err:
        load_recipe(path, ["lora.rank=16"])
    assert "command-line" in str(err.value)
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(path, ["lora.r"])
    with pytest.raises(RecipeError, match="'lora.r' is not a section"):
        load_recipe(path, ["lora.r.x=1"])


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "lora:\n  r: 4\n"])
def test_a_recipe_without_model_or_output_dir_is_refused(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError, match="missing required keys model, output_dir: set the teacher") as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="missing required key output_dir: set the run folder"):
        load_recipe(path, ["model=smollm2-135m"])
    recipe = load_recipe(path, ["model=smollm2-135m", "output_dir=runs/x"])  # overrides count
    assert (recipe.model, recipe.output_dir) == ("smollm2-135m", "runs/x")
    with pytest.raises(RecipeError, match="missing required keys model, output_dir"):
        load_recipe(None)  # the defaults alone are not a run either


def test_help_documents_every_key():
    text = recipe_help()
    for key in ("model", "conversion.mixer", "conversion.keep_softmax_layers", "data.source", "data.seq_len",
                "data.max_tokens", "stages", "attention_transfer.lr", "lora.r", "lora.alpha", "lora.kl_weight",
                "train.batch_size", "train.grad_accum", "train.precision", "train.gradient_checkpointing",
                "train.save_every", "output_dir"):
        assert f"  {key} (" in text, key
    assert "LoRA rank" in text  # the field's docstring
    assert "  model (str, required, e.g. smollm2-135m)" in text and "  lora.r (int, default 8)" in text


def test_cli_parses_finetune():
    from linearize import cli

    args = cli.build_parser().parse_args(["finetune", "r.yaml", "lora.r=4", "train.seed=1", "--resume"])
    assert (args.verb, args.recipe, args.overrides, args.resume) == ("finetune", "r.yaml", ["lora.r=4", "train.seed=1"], True)


def test_defaults_are_valid():
    assert Recipe().stages == ["lora"]
