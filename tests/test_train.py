"""Finetuning on tiny models (CPU, fp32): both stages train, the merged checkpoint reloads with the
unmerged model's logits (invariant 5), resume is bitwise, bad input fails early with clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RTOL, assert_close_rms
from tiny_models import tiny_recipe, tiny_teacher
from tiny_tokenizer import byte_tokenizer
from transformers import AutoModelForCausalLM

from linearize.config import ConversionConfig
from linearize.outputs import write_marker
from linearize.train import CONVERSION_PARAMS_FILE, SUMMARY_FILE, ResumeError, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_stages_train_and_merged_checkpoint_reloads(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    import linearize

    recipe = tiny_recipe(tmp_path)
    result = finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer())
    s = result.summary
    at, lora = s["stages"]["attention_transfer"], s["stages"]["lora"]
    before, after = at["per_layer_before"], at["per_layer_after"]
    assert before["layers"] == after["layers"] == [0, 1]
    assert all(a < b for a, b in zip(after["mse"], before["mse"])), (before, after)
    assert at["final_loss"] < at["first_loss"]
    assert lora["final_ce"] < lora["first_ce"] and "final_kl" in lora
    assert s["tokens_seen"] == (4 + 4) * 4 * 16
    assert set(s["perplexity"]) == {"teacher", "converted", "finetuned"}
    assert s["merge_check_relative_rms"] < RTOL[torch.float32]
    assert json.loads((result.output_dir / SUMMARY_FILE).read_text())["tokens_seen"] == s["tokens_seen"]
    assert (result.model_dir / SUMMARY_FILE).is_file()

    # Invariant 5: the saved merged checkpoint == the teacher, converted, + trained conversion
    # parameters + the saved adapter, unmerged -- loaded with plain peft as the adapter's README says.
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == recipe.model == "tiny"  # not a site-packages path
    readme = (result.adapter_dir / "README.md").read_text()
    assert "linearize.convert('tiny', conversion)" in readme and "PeftModel.from_pretrained(base" in readme
    assert CONVERSION_PARAMS_FILE in readme and "../model/" in readme
    conversion = ConversionConfig.from_dict(json.loads((result.adapter_dir / "linearize_conversion.json").read_text()))
    assert conversion == recipe.conversion
    unmerged = linearize.convert(tiny_teacher(), conversion)
    trained = load_file(str(result.adapter_dir / CONVERSION_PARAMS_FILE))
    assert trained, "the adapter folder keeps the trained conversion parameters"
    missing, unexpected = unmerged.load_state_dict(trained, strict=False)
    assert not unexpected
    unmerged = PeftModel.from_pretrained(unmerged, str(result.adapter_dir)).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        assert_close_rms(reloaded(input_ids=ids).logits, want, torch.float32, "merged checkpoint vs unmerged adapter")
        assert_close_rms(result.model(input_ids=ids).logits, want, torch.float32, "in-memory merged model")


def _stop_at(stage: str, step: int):
    def callback(name, k, metrics):
        if (name, k) == (stage, step):
            raise KeyboardInterrupt

    return callback


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    extra = ("train.grad_accum=2", "train.save_every=2", "train.keep_checkpoints=1", "lora.kl_weight=0")
    full = finetune(tiny_recipe(tmp_path, "full", *extra), model=tiny_teacher(), tokenizer=byte_tokenizer())

    recipe = tiny_recipe(tmp_path, "parts", *extra)
    ckpts = tmp_path / "parts" / "checkpoints"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C inside stage 1: saves step 3, exits
        finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer(), callback=_stop_at("attention_transfer", 3))
    assert [p.name for p in ckpts.iterdir()] == ["step-0000003"]
    with pytest.raises(KeyboardInterrupt):  # resumed, then Ctrl-C inside stage 2
        finetune(recipe, resume=True, model=tiny_teacher(), tokenizer=byte_tokenizer(), callback=_stop_at("lora", 1))
    assert [p.name for p in ckpts.iterdir()] == ["step-0000005"]
    resumed = finetune(recipe, resume=True, model=tiny_teacher(), tokenizer=byte_tokenizer())

    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    for stage in ("attention_transfer", "lora"):
        assert full.summary["stages"][stage]["history"] == resumed.summary["stages"][stage]["history"]
    assert resumed.summary["tokens_seen"] == full.summary["tokens_seen"]


def test_bad_input_fails_early_with_clear_errors(tmp_path):
    teacher, tok = tiny_teacher(), byte_tokenizer()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        finetune(tiny_recipe(tmp_path, "a", f"data.source={tmp_path / 'nope.txt'}"), model=teacher, tokenizer=tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        finetune(tiny_recipe(tmp_path, "b", f"data.source={tmp_path / 'empty.txt'}"), model=tiny_teacher(), tokenizer=tok)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="empty after formatting"):
        finetune(tiny_recipe(tmp_path, "c", f"data.source={tmp_path / 'blank.jsonl'}", "data.validation_samples=0"),
                 model=tiny_teacher(), tokenizer=tok)
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model supports \\(64"):
        finetune(tiny_recipe(tmp_path, "d", "data.seq_len=128"), model=tiny_teacher(), tokenizer=tok)
    with pytest.raises(ValueError, match="stage attention_transfer trains nothing"):
        finetune(tiny_recipe(tmp_path, "e", "conversion.mixer=liger", "conversion.gate=null"),
                 model=tiny_teacher(), tokenizer=tok)
    with pytest.raises(ValueError, match="fewer than one optimiser step"):
        finetune(tiny_recipe(tmp_path, "f", "train.batch_size=4096"), model=tiny_teacher(), tokenizer=tok)
    with pytest.raises(ResumeError, match="nothing to resume"):
        finetune(tiny_recipe(tmp_path, "g"), resume=True, model=tiny_teacher(), tokenizer=tok)
    (tmp_path / "h" / "checkpoints" / "step-0000001").mkdir(parents=True)
    (tmp_path / "h" / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("{}")
    write_marker(tmp_path / "h", "finetune-run")
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        finetune(tiny_recipe(tmp_path, "h"), model=tiny_teacher(), tokenizer=tok)


def test_fsdp_rebuild_uses_the_given_models_class_and_config():
    """After FSDP training the main process rebuilds the peft model from the gathered state: from the
    converted model it was given (class + config), never by reloading ``recipe.model``."""
    from peft import get_peft_model

    import linearize
    from linearize.recipe import LoraConfig
    from linearize.train.lora import peft_config, rebuild_peft_model

    model = linearize.convert(tiny_teacher(), linearize.ConversionConfig(mixer="lizard", window=4))
    cfg = LoraConfig(r=4)
    peft_model = get_peft_model(model, peft_config(cfg))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero update, so the LoRA weights matter
    rebuilt = rebuild_peft_model(type(model), model.config, torch.float32, cfg, peft_model.state_dict())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, peft_model(input_ids=ids).logits)
