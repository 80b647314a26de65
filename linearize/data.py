"""Training text: load (hub, local files, offline Wikipedia), format, tokenize, pack, batch.

The result of :func:`build_data` is two int32 tensors of packed token blocks, ``[N, seq_len]`` for
training and (when there is held-out text) validation. :func:`iter_batches` walks them in a seeded
order that depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
run would, on any number of processes.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SourceNotFoundError
from .recipe import DataConfig

logger = logging.getLogger(__name__)

# `datasets` builder per file extension.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
OFFLINE_WIKI = "gensim-wiki"

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), with the
# response appended: the format Liger trains on with Alpaca-cleaned.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_FIELDS = ("instruction", "output")


@dataclass
class PackedData:
    """Packed token blocks and where they came from."""

    train: torch.Tensor
    """[N, seq_len] int32 training blocks."""
    validation: torch.Tensor | None
    """[M, seq_len] int32 held-out blocks, or None."""
    format: str
    """The row format used (text / alpaca / chat)."""
    train_documents: int
    validation_documents: int

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


# --- loading -------------------------------------------------------------------------------------


def _local_files(source: str) -> list[str] | None:
    """The files a local source names, or None when ``source`` does not look local."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in FILE_BUILDERS and p.is_file())
        if not files:
            raise FileNotFoundError(
                f"data folder {path} holds no {'/'.join(sorted(FILE_BUILDERS))} files"
            )
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        if not files:
            raise FileNotFoundError(f"no data files match {source!r}")
        return files
    if path.suffix in FILE_BUILDERS or path.is_file() or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        return [str(path)]
    return None


def _builder(files: list[str]) -> str:
    kinds = {FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in FILE_BUILDERS)
        raise ValueError(f"data file {bad}: unsupported type; use one of {', '.join(sorted(FILE_BUILDERS))}")
    if len(kinds) > 1:
        raise ValueError(f"data files mix formats ({', '.join(sorted(kinds))}); use one kind per recipe")
    return kinds.pop()


def _offline_wiki(split: str):
    import datasets

    from . import offline_text

    articles = offline_text.wiki_articles(split=split)
    return datasets.Dataset.from_dict({"title": [a.title for a in articles], "text": [a.text for a in articles]})


def load_rows(cfg: DataConfig, split: str):
    """One split of the source as a ``datasets.Dataset`` of raw rows."""
    import datasets

    if cfg.source == OFFLINE_WIKI:
        return _offline_wiki(split)
    files = _local_files(cfg.source)
    if files is not None:
        if split != "train":
            raise ValueError(
                f"data.validation_split={split!r}: local files have only a train split; "
                "use data.validation_samples to hold documents out"
            )
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"data source {cfg.source!r} is empty: {', '.join(files)} hold no text")
        return datasets.load_dataset(_builder(files), data_files=files, split="train")
    return _load_hub_dataset(cfg, split)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host resolves and accepts a connection (a quick check, no request)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hub offline mode for the duration: ``datasets`` then reads only its cache, without retries."""
    import datasets
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def _load_hub_dataset(cfg: DataConfig, split: str):
    """A hub dataset (or its cached copy); one clear error when neither can be had."""
    import datasets
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return datasets.load_dataset(cfg.source, cfg.name, split=split)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        why = "the hub cannot be reached (offline) and it is not in the datasets cache" if offline else \
            f"it could not be loaded from the hub ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        raise SourceNotFoundError(
            f"data.source {cfg.source!r}: {why}; pass a local .json/.jsonl/.txt/.parquet file or folder, "
            f"or data.source={OFFLINE_WIKI} (the offline Wikipedia sample)"
        ) from None


# --- formatting ----------------------------------------------------------------------------------


def resolve_format(cfg: DataConfig, columns: list[str], tokenizer) -> str:
    """The row format for ``cfg.format`` given the dataset's columns (``auto`` decides here)."""
    has_alpaca = all(c in columns for c in ALPACA_FIELDS)
    has_chat_template = getattr(tokenizer, "chat_template", None) is not None
    fmt = cfg.format
    if fmt == "auto":
        if "messages" in columns or (has_alpaca and has_chat_template):
            fmt = "chat"
        elif has_alpaca:
            fmt = "alpaca"
        else:
            fmt = "text"
    if fmt == "text" and cfg.text_field not in columns:
        raise ValueError(
            f"data: no column {cfg.text_field!r} for format 'text' (columns: {', '.join(columns)}); "
            "set data.text_field or data.format"
        )
    if fmt == "alpaca" and not has_alpaca:
        raise ValueError(f"data: format 'alpaca' needs columns instruction and output (columns: {', '.join(columns)})")
    if fmt == "chat":
        if not has_chat_template:
            raise ValueError("data: format 'chat' needs a tokenizer with a chat template; use format 'alpaca' or 'text'")
        if "messages" not in columns and not has_alpaca:
            raise ValueError(
                f"data: format 'chat' needs a 'messages' column or instruction/output (columns: {', '.join(columns)})"
            )
    return fmt


def _alpaca_text(row: dict[str, Any]) -> str:
    extra = (row.get("input") or "").strip()
    template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=extra, output=row["output"])


def _chat_text(row: dict[str, Any], tokenizer) -> str:
    messages = row.get("messages")
    if messages is None:
        extra = (row.get("input") or "").strip()
        prompt = row["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def format_row(row: dict[str, Any], fmt: str, tokenizer, text_field: str = "text") -> str:
    if fmt == "text":
        return row[text_field] or ""
    if fmt == "alpaca":
        return _alpaca_text(row)
    return _chat_text(row, tokenizer)


# --- tokenizing and packing ----------------------------------------------------------------------


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token before every text it encodes (Gemma's does)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def pack(
    texts: list[str], tokenizer, seq_len: int, add_special_tokens: bool = True, bos_per_block: bool = False
) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into [N, seq_len] int32 blocks (remainder dropped).

    ``bos_per_block``: every block starts with BOS followed by ``seq_len - 1`` tokens of the stream
    (the documents' own leading BOS is dropped so that it is not doubled).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: packing needs one to separate documents")
    bos = tokenizer.bos_token_id
    if bos_per_block and bos is None:
        raise ValueError("data.bos_per_block=true but the tokenizer has no BOS token; set data.bos_per_block=false")
    pieces: list[np.ndarray] = []
    batch = 512
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start : start + batch], add_special_tokens=add_special_tokens)["input_ids"]
        for doc in enc:
            if bos_per_block and doc[:1] == [bos]:
                doc = doc[1:]
            if doc:
                pieces.append(np.asarray(doc + [eos], dtype=np.int32))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    width = seq_len - 1 if bos_per_block else seq_len
    n = len(ids) // width
    blocks = ids[: n * width].reshape(n, width)
    if bos_per_block:
        blocks = np.concatenate([np.full((n, 1), bos, dtype=np.int32), blocks], axis=1)
    return torch.from_numpy(np.ascontiguousarray(blocks))  # [N, seq_len] int32


def _texts(ds, fmt: str, tokenizer, text_field: str) -> list[str]:
    texts = [format_row(row, fmt, tokenizer, text_field) for row in ds]
    return [t for t in texts if t.strip()]


def build_data(cfg: DataConfig, tokenizer, seed: int = 0, max_length: int | None = None) -> PackedData:
    """Load, format, pack and split the recipe's text.

    ``max_length`` is the longest sequence the model supports (``linearize.sources.model_max_length``);
    a longer ``seq_len`` is an error.
    """
    if max_length is not None and cfg.seq_len > max_length:
        raise ValueError(
            f"data.seq_len={cfg.seq_len} is longer than the model supports ({max_length} positions); "
            f"use data.seq_len<={max_length}"
        )
    rows = load_rows(cfg, cfg.split)
    if len(rows) == 0:
        raise ValueError(f"data source {cfg.source!r} (split {cfg.split!r}) has no rows")
    fmt = resolve_format(cfg, list(rows.column_names), tokenizer)
    if cfg.shuffle:
        rows = rows.shuffle(seed=seed)
    val_rows = None
    if cfg.validation_split is not None:
        val_rows = load_rows(cfg, cfg.validation_split)
    elif cfg.validation_samples:
        if cfg.validation_samples >= len(rows):
            raise ValueError(
                f"data.validation_samples={cfg.validation_samples} leaves no training rows (the source has {len(rows)})"
            )
        val_rows = rows.select(range(cfg.validation_samples))
        rows = rows.select(range(cfg.validation_samples, len(rows)))
    if cfg.max_samples is not None:
        rows = rows.select(range(min(cfg.max_samples, len(rows))))

    special = fmt != "chat"  # chat templates write their own BOS
    bos_per_block = cfg.bos_per_block if isinstance(cfg.bos_per_block, bool) else special and adds_bos(tokenizer)
    train_texts = _texts(rows, fmt, tokenizer, cfg.text_field)
    if not train_texts:
        raise ValueError(f"data source {cfg.source!r}: every training row is empty after formatting")
    train = pack(train_texts, tokenizer, cfg.seq_len, add_special_tokens=special, bos_per_block=bos_per_block)
    if len(train) == 0:
        raise ValueError(
            f"data source {cfg.source!r} has fewer tokens than one block of data.seq_len={cfg.seq_len}"
        )
    if cfg.max_tokens is not None:
        train = train[: cfg.max_tokens // cfg.seq_len]
    validation, val_docs = None, 0
    if val_rows is not None:
        val_texts = _texts(val_rows, fmt, tokenizer, cfg.text_field)
        val_docs = len(val_texts)
        validation = pack(val_texts, tokenizer, cfg.seq_len, add_special_tokens=special, bos_per_block=bos_per_block)
        if len(validation) == 0:
            raise ValueError(f"the validation text has fewer tokens than one block of data.seq_len={cfg.seq_len}")
    logger.info(
        "data: %d training blocks of %d tokens (%d documents, format %s%s)%s",
        len(train), cfg.seq_len, len(train_texts), fmt, ", BOS first in each block" if bos_per_block else "",
        f", {len(validation)} validation blocks" if validation is not None else "",
    )
    return PackedData(train, validation, fmt, len(train_texts), val_docs)


# --- batching ------------------------------------------------------------------------------------


def epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch: a permutation seeded by (seed, epoch) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=gen)


def iter_batches(
    blocks: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Iterator[torch.Tensor]:
    """This process's share of each global batch of one epoch, from global batch ``start`` on.

    Global batch ``b`` holds blocks ``order[b*batch_size:(b+1)*batch_size]``; process ``rank`` takes
    the ``rank``-th of ``world_size`` equal slices. Incomplete last batches are dropped.
    """
    if batch_size % world_size:
        raise ValueError(
            f"train.batch_size={batch_size} is not a multiple of the {world_size} processes; "
            "the batch is split between them"
        )
    per = batch_size // world_size
    order = epoch_order(len(blocks), seed, epoch) if shuffle else torch.arange(len(blocks))
    for b in range(start, len(blocks) // batch_size):
        idx = order[b * batch_size + rank * per : b * batch_size + (rank + 1) * per]
        yield blocks[idx].long()  # [per, seq_len]


__all__ = [
    "ALPACA_PROMPT_NO_INPUT", "ALPACA_PROMPT_WITH_INPUT", "PackedData", "adds_bos", "build_data", "epoch_order",
    "format_row", "iter_batches", "load_rows", "pack", "resolve_format",
]
