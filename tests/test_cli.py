"""The `linearize convert` and `linearize generate` verbs, end to end on a tiny local model."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from linearize import cli
import linearize
from tiny_models import VOCAB, save_tiny_teacher
from tiny_tokenizer import word_tokenizer


@pytest.fixture
def teacher_dir(tmp_path):
    return save_tiny_teacher(tmp_path / "teacher")


def test_convert_then_generate(teacher_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert cli.main(["convert", str(teacher_dir), "--out", str(out), "--window", "4", "--keep-softmax", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.linearize["window"] == 4 and model.config.linearize["keep_softmax_layers"] == [1]
    assert [i for i, _ in linearize.iter_mixers(model)] == [0]

    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "w4 w5 w6", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tok("w4 w5 w6", return_tensors="pt")
    expected = model.eval().generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert printed == tok.decode(expected[0, 3:], skip_special_tokens=True).strip()


def test_convert_beyond_window_split(teacher_dir, tmp_path, capsys):
    out = tmp_path / "split"
    args = ["convert", str(teacher_dir), "--out", str(out), "--mixer", "lizard", "--window", "4"]
    assert cli.main(args + ["--linear-span", "beyond_window"]) == 2  # needs the shared normalizer
    assert "normalizer='shared'" in capsys.readouterr().err and not out.exists()
    assert cli.main(args + ["--linear-span", "beyond_window", "--normalizer", "shared", "--sink-tokens", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.linearize["linear_span"] == "beyond_window" and model.config.linearize["sink_tokens"] == 2
    assert all(hasattr(mixer, "linear_log_scale") for _, mixer in linearize.iter_mixers(model))


def test_unreachable_hub_id_is_one_clear_error(tmp_path, capsys):
    code = cli.main(["convert", "nobody/does-not-exist", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nobody/does-not-exist" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_setting_is_one_clear_error(teacher_dir, tmp_path, capsys):
    code = cli.main(["convert", str(teacher_dir), "--out", str(tmp_path / "x"), "--keep-softmax", "9"])
    assert code == 2
    assert "keep_softmax_layers" in capsys.readouterr().err


@pytest.mark.parametrize("verb", cli.VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    assert verb in capsys.readouterr().out


def test_unsupported_architecture_from_the_cli(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    assert cli.main(["convert", str(folder), "--out", str(tmp_path / "y")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_finetune_overrides_may_follow_its_options():
    """`linearize finetune r.yaml --resume lora.max_steps=8` (issue 17 items 8 and 18 write it so)."""
    args = cli.parse(["finetune", "r.yaml", "lora.r=4", "--resume", "lora.max_steps=8", "train.seed=1"])
    assert args.resume and args.overrides == ["lora.r=4", "lora.max_steps=8", "train.seed=1"]
    with pytest.raises(SystemExit):
        cli.parse(["generate", "m", "--prompt", "x", "lora.r=4"])  # overrides belong to finetune only
