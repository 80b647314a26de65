"""A byte-level tokenizer built in memory (no files, no hub): 256 byte tokens + <|endoftext|>
(+ a ``<bos>`` put before every text, Gemma style, with ``add_bos=True``)."""

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
