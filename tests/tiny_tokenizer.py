"""Tokenizers built in memory (no files, no hub), the one place tests get one from.

``byte_tokenizer``: 256 byte tokens + <|endoftext|> (+ a ``<bos>`` put before every text, Gemma style,
with ``add_bos=True``). ``word_tokenizer``: words ``w3``, ``w4``, ... for tiny models of any vocabulary."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
BOS = "<bos>"


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOT] = len(vocab)
    if add_bos:
        vocab[BOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS if add_bos else EOT, eos_token=EOT, pad_token=EOT)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for tiny models of ``vocab_size`` ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2
    (end of text and padding), then the words ``w3`` ... ``w{vocab_size - 1}`` (the id is the number)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
