"""Finetuning on tiny models (CPU, fp32): both stages train, the merged checkpoint reloads with the
unmerged model's logits (invariant 5), resume is bitwise, bad input fails early with clear errors;
data loading, formatting, packing and batching."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import RTOL, assert_close_rms
from tiny_tokenizer import byte_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from linearize.data import (
    ALPACA_PROMPT_NO_INPUT, adds_bos, build_data, epoch_order, format_row, iter_batches, pack, resolve_format,
)
from linearize.outputs import write_marker
from linearize.recipe import DataConfig, RecipeError, load_recipe, recipe_from_dict
from linearize.train import CONVERSION_PARAMS_FILE, SUMMARY_FILE, ResumeError, finetune

WORDS = "the a red green blue cat dog bird runs sits sings on under mat tree".split()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops: a second intra-op thread only adds synchronisation (and spins when cores are shared).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_teacher(seed: int = 0, max_positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=257, max_position_embeddings=max_positions, bos_token_id=256, eos_token_id=256, pad_token_id=256,
        tie_word_embeddings=True,  # as SmolLM2: checkpoints must handle the shared tensor
    )
    return LlamaForCausalLM(config).eval()


def write_corpus(path, lines: int = 120, seed: int = 0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(lines)) + "\n")
    return path


def tiny_recipe(tmp_path, out="run", *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return load_recipe(None, [
        "model=tiny", "conversion.mixer=lizard", "conversion.window=4", "conversion.chunk_size=8",
        f"data.source={corpus}", "data.seq_len=16", "data.validation_samples=8",
        "stages=[attention_transfer, lora]",
        "attention_transfer.lr=1e-2", "attention_transfer.max_steps=4", "attention_transfer.schedule=constant",
        "lora.lr=1e-2", "lora.max_steps=4", "lora.kl_weight=0.5", "lora.schedule=constant",
        "train.batch_size=4", "train.eval_batches=2", "train.log_every=2",
        f"output_dir={tmp_path / out}", *extra,
    ])


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
    # parameters + the saved adapter, unmerged.
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    unmerged = linearize.convert(tiny_teacher(), recipe.conversion)
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


# --- data ----------------------------------------------------------------------------------------


def test_alpaca_and_chat_formatting():
    tok = byte_tokenizer()
    row = {"instruction": "Name a colour.", "input": "", "output": "Red."}
    assert format_row(row, "alpaca", tok) == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.", output="Red.")
    with_input = format_row(dict(row, input="Sky"), "alpaca", tok)
    assert "### Input:\nSky\n\n### Response:\nRed." in with_input
    cfg = DataConfig(source="x.jsonl")
    assert resolve_format(cfg, ["instruction", "input", "output"], tok) == "alpaca"  # no chat template
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert resolve_format(cfg, ["instruction", "input", "output"], tok) == "chat"
    assert format_row(dict(row, input="Sky"), "chat", tok) == "<user>Name a colour.\n\nSky<assistant>Red."
    assert resolve_format(cfg, ["text"], tok) == "text"
    with pytest.raises(ValueError, match="no column 'text'"):
        resolve_format(cfg, ["body"], tok)


def test_pack_joins_documents_with_eos():
    tok = byte_tokenizer()
    blocks = pack(["ab", "cde", "f"], tok, seq_len=3)
    eos = tok.eos_token_id
    a, b, c, d, e, f = tok("abcdef")["input_ids"]
    assert blocks.dtype == torch.int32 and blocks.tolist() == [[a, b, eos], [c, d, e], [eos, f, eos]]


def test_pack_starts_every_block_with_bos_for_tokenizers_that_prepend_it(tmp_path):
    tok = byte_tokenizer(add_bos=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a, b, c, d, e, f = tok("abcdef", add_special_tokens=False)["input_ids"]
    assert adds_bos(tok) and not adds_bos(byte_tokenizer())
    # the documents' own BOS is dropped, then each block is BOS + 3 tokens of the stream
    blocks = pack(["ab", "cde", "f"], tok, seq_len=4, bos_per_block=True)
    assert blocks.dtype == torch.int32 and blocks.tolist() == [[bos, a, b, eos], [bos, c, d, e], [bos, eos, f, eos]]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(WORDS * 8) + "\n")
    auto = build_data(DataConfig(source=str(path), seq_len=8, validation_samples=4), tok)
    assert (auto.train[:, 0] == bos).all() and (auto.validation[:, 0] == bos).all()
    assert (auto.train[:, 1:] != bos).all()
    off = build_data(DataConfig(source=str(path), seq_len=8, bos_per_block=False), tok)
    assert not (off.train[:, 0] == bos).all()
    plain = build_data(DataConfig(source=str(path), seq_len=8), byte_tokenizer())  # auto: no BOS added
    assert not (plain.train[:, 0] == plain.train[0, 0]).all()
    with pytest.raises(RecipeError, match="bos_per_block"):
        recipe_from_dict({"data": {"bos_per_block": "yes"}})


def test_build_data_split_budget_and_jsonl(tmp_path):
    tok = byte_tokenizer()
    rows = [{"instruction": f"Say {w}.", "output": w} for w in WORDS * 4]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = build_data(DataConfig(source=str(path), seq_len=16, validation_samples=5, max_samples=30), tok)
    assert data.format == "alpaca" and data.validation_documents == 5 and data.train_documents == 30
    assert data.train.shape[1] == 16 and data.validation is not None
    capped = build_data(DataConfig(source=str(path), seq_len=16, max_tokens=64), tok)
    assert capped.train.shape == (4, 16)
    with pytest.raises(ValueError, match="only a train split"):
        build_data(DataConfig(source=str(path), validation_split="validation"), tok)


def test_batches_split_between_processes_and_resume_mid_epoch():
    blocks = torch.arange(40, dtype=torch.int32).view(20, 2)
    single = list(iter_batches(blocks, 4, seed=3, epoch=1))
    ranks = [list(iter_batches(blocks, 4, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 5
    for b, batch in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b], ranks[1][b]]), batch)
    assert [t.tolist() for t in iter_batches(blocks, 4, seed=3, epoch=1, start=2)] == [t.tolist() for t in single[2:]]
    assert not torch.equal(epoch_order(20, 3, 0), epoch_order(20, 3, 1))
    assert torch.equal(epoch_order(20, 3, 1), epoch_order(20, 3, 1))
    with pytest.raises(ValueError, match="not a multiple of the 3 processes"):
        next(iter_batches(blocks, 4, seed=0, epoch=0, world_size=3))


def test_offline_wikipedia_source():
    pytest.importorskip("gensim")
    data = build_data(DataConfig(source="gensim-wiki", validation_split="heldout", max_samples=2, seq_len=512),
                      byte_tokenizer())
    assert data.train_documents == 2 and data.validation_documents == 20
    assert len(data.validation) > len(data.train)
