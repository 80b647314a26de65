"""Data loading, formatting, packing and batching of the finetune's text (CPU, no hub)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import WORDS
from tiny_tokenizer import byte_tokenizer

from linearize.data import (
    ALPACA_PROMPT_NO_INPUT, adds_bos, build_data, epoch_order, format_row, iter_batches, pack, resolve_format,
)
from linearize.recipe import DataConfig, RecipeError, recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

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


@pytest.mark.parametrize("hub_offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_hub_dataset_offline_is_one_clear_error(monkeypatch, hub_offline):
    import time

    import datasets
    from huggingface_hub import constants

    from linearize.data import load_rows
    from linearize.errors import SourceNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", hub_offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    with pytest.raises(SourceNotFoundError) as err:
        load_rows(DataConfig(source="someone/not-cached-dataset"), "train")
    message = str(err.value)
    assert "\n" not in message and "'someone/not-cached-dataset'" in message
    assert "not in the datasets cache" in message and "local" in message and "gensim-wiki" in message
    assert time.perf_counter() - start < 10, "no retries"
    assert constants.HF_HUB_OFFLINE is hub_offline  # offline mode was only borrowed
