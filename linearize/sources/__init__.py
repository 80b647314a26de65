"""Where a teacher model comes from: a hub id, a local HF folder, a ``.gguf`` file, or a packaged model.

``resolve_source`` turns the user's string into a ``ResolvedSource`` (checking that it exists and,
for a hub id, that it can be reached); ``load_model`` / ``load_tokenizer`` / ``load_teacher`` load it
through ``AutoModelForCausalLM`` / ``AutoTokenizer``. GGUF files are dequantized by transformers
into an ordinary dense model (needs the ``gguf`` and ``accelerate`` packages).

Packaged models (``packaged.py``) install from the package registry and need no hub access;
``checks.py`` turns a damaged local file into one line that names it (``ModelLoadError``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from ..checkpoint_files import CONFIG_FILE
from ..errors import ModelLoadError, SourceNotFoundError
from .checks import check_config, check_gguf_file, check_weights, raised_reading_gguf
from .packaged import PACKAGED_MODELS, PackagedModel, cache_dir

__all__ = [
    "DEFAULT_MODEL", "PACKAGED_MODELS", "PackagedModel", "ResolvedSource", "cache_dir", "load_config", "load_model",
    "load_teacher", "load_tokenizer", "model_max_length", "resolve_source",
]

logger = logging.getLogger(__name__)

SourceKind = Literal["packaged", "gguf", "folder", "hub"]

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedSource:
    """A model source that exists (or, for a hub id, whose config could be fetched or found cached).

    ``location`` is the folder (folder, gguf, packaged) or the repo id (hub); ``gguf_file`` is the
    file name inside ``location`` for GGUF sources (packaged models are GGUFs too).
    """

    kind: SourceKind
    location: str
    gguf_file: str | None = None
    name: str = ""  # what the user passed (or the packaged model's name)

    @property
    def path(self) -> Path | None:
        """The local file or folder holding the model; None for a hub id."""
        if self.kind == "hub":
            return None
        return Path(self.location) / self.gguf_file if self.gguf_file else Path(self.location)

    def pretrained_kwargs(self) -> dict:
        """Extra keyword arguments for ``from_pretrained(self.location, ...)``."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return f"{self.kind}:{self.path if self.path is not None else self.location}"


def _looks_like_path(source: str) -> bool:
    """A string is treated as a path if it could not be a hub repo id or is written like a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith(("/", ".", "~")) or "\\" in source:
        return True
    if _local_first_part(source) is not None:
        return True
    if Path(source).suffix.lower() == ".gguf":
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def _local_first_part(source: str) -> str | None:
    """The first folder of ``a/b`` when it exists here (so ``a/b`` names a path, not a hub id)."""
    path = Path(source)
    if path.is_absolute() or source.startswith(("~", ".")) or len(path.parts) < 2:
        return None
    return path.parts[0] if Path(path.parts[0]).is_dir() else None


def _no_such_path(name: str) -> SourceNotFoundError:
    first = _local_first_part(name)
    why = f" ({first}/ is a folder here, so this is read as a local path, not a hub id)" if first else ""
    return SourceNotFoundError(
        f"no such folder or file: {name}{why}. Pass an existing model folder or .gguf file, a hub id "
        f"(namespace/name), or one of the packaged models: {', '.join(PACKAGED_MODELS)}."
    )


def _resolve_gguf(path: Path, name: str) -> ResolvedSource:
    if not path.is_file():
        raise SourceNotFoundError(f"GGUF file not found: {path}. Pass an existing .gguf file.")
    path = path.resolve()
    check_gguf_file(path)
    return ResolvedSource("gguf", str(path.parent), path.name, name)


def _resolve_folder(path: Path, name: str) -> ResolvedSource:
    path = path.resolve()
    if (path / CONFIG_FILE).is_file():
        check_config(path)
        return ResolvedSource("folder", str(path), None, name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        logger.info("Folder %s has no config.json but one GGUF file; using %s", path, ggufs[0])
        return ResolvedSource("gguf", str(path), ggufs[0], name)
    if ggufs:
        raise SourceNotFoundError(
            f"Folder {path} has no config.json and several GGUF files ({', '.join(ggufs)}); pass one of them."
        )
    raise SourceNotFoundError(
        f"Folder {path} holds no Hugging Face model (no config.json) and no .gguf file. "
        "Pass a folder written by save_pretrained, a .gguf file, or a hub id."
    )


def _hub_error(repo_id: str, reason: str) -> SourceNotFoundError:
    return SourceNotFoundError(
        f"Could not load {repo_id!r}: no local file or folder has that name, and as a Hugging Face hub id "
        f"{reason}. Pass a local model folder or a .gguf file, use the offline default "
        f"({DEFAULT_MODEL!r}, or leave MODEL out), or set up hub access (network, unset HF_HUB_OFFLINE, "
        "and `hf auth login` for gated or private models)."
    )


def _resolve_hub(repo_id: str, revision: str | None = None) -> ResolvedSource:
    """Check that the repo's config.json is in the local HF cache or downloadable, else raise."""
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        hf_hub_download(repo_id, "config.json", revision=revision)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the hub could not be reached"
        raise _hub_error(repo_id, f"it is not in the local Hugging Face cache and {why}") from error
    except GatedRepoError as error:
        raise _hub_error(repo_id, "it is gated and this machine has no access to it") from error
    except RepositoryNotFoundError as error:
        raise _hub_error(repo_id, "it does not exist or is private") from error
    except RevisionNotFoundError as error:
        raise _hub_error(repo_id, f"it has no revision {revision!r}") from error
    except RemoteEntryNotFoundError as error:
        raise _hub_error(
            repo_id, "it has no config.json (for a GGUF-only repo, download the .gguf file and pass its path)"
        ) from error
    except HfHubHTTPError as error:
        raise _hub_error(repo_id, f"the hub answered with an error ({error})") from error
    return ResolvedSource("hub", repo_id, None, repo_id)


def resolve_source(source: str | os.PathLike | ResolvedSource | None) -> ResolvedSource:
    """Resolve a model source string; None means ``DEFAULT_MODEL``.

    Order: a packaged model name; then anything written like a path (absolute/relative prefixes,
    backslashes, a ``.gguf`` suffix, or not a valid repo id) or that exists on disk is a local
    ``.gguf`` file or HF folder; anything else is a hub repo id, which must be in the local HF cache
    or reachable. Raises ``SourceNotFoundError`` saying what was tried and what to do.
    """
    if isinstance(source, ResolvedSource):
        return source
    if source is None:
        source = DEFAULT_MODEL
    name = os.fspath(source)
    if not name.strip():
        raise ValueError("Model source is empty: pass a hub id, a folder, a .gguf file, or leave it out.")

    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged is not None:
        path = packaged.gguf_path()
        resolved = ResolvedSource("packaged", str(path.parent), path.name, packaged.name)
        logger.info("Model source %r: packaged %s (%s)", name, packaged.description, path)
        return resolved

    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        if path.is_dir():
            resolved = _resolve_folder(path, name)
        elif path.suffix.lower() == ".gguf" or not path.exists():
            if not path.exists():
                raise _no_such_path(name)
            resolved = _resolve_gguf(path, name)
        else:
            raise SourceNotFoundError(
                f"{path} is a file but not a .gguf file. Pass a .gguf file or the folder holding config.json."
            )
    else:
        resolved = _resolve_hub(name)
    logger.info("Model source %r resolved to %s", name, resolved)
    return resolved


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def _hub_cause(error: BaseException) -> BaseException | None:
    """The huggingface_hub error behind a transformers OSError, if there is one in the chain."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _from_pretrained(loader: Callable, resolved: ResolvedSource, **kwargs):
    try:
        return loader(resolved.location, **resolved.pretrained_kwargs(), **kwargs)
    except Exception as error:
        if isinstance(error, OSError) and resolved.kind == "hub" and _hub_cause(error) is not None:
            raise _hub_error(
                resolved.location, f"some of its files are neither in the local cache nor downloadable ({error})"
            ) from error
        if resolved.gguf_file and raised_reading_gguf(error):
            packaged = PACKAGED_MODELS.get(resolved.name)
            fix = (f"reinstall it: {packaged.install_command.replace('pip install', 'pip install --force-reinstall')}"
                   if resolved.kind == "packaged" and packaged else "download or copy it again")
            raise ModelLoadError(
                f"cannot read the GGUF file {resolved.path}: it is truncated or corrupt ({error}): {fix}"
            ) from error
        raise


def _gguf_load_kwargs(resolved: ResolvedSource) -> dict:
    """Load GGUF weights dequantized into plain tensors.

    Without ``GgufConfig(dequantize=True)`` transformers 5.2x marks the model as GGUF-quantized
    (``model.hf_quantizer`` set, ``config.quantization_config`` kept) even when it unpacked every
    weight, and such a model refuses ``save_pretrained`` ("not serializable") and training; with
    the ``kernels`` package it would also keep packed ``GgufLinear`` modules instead of ``nn.Linear``.
    """
    if not resolved.gguf_file:
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x: GGUF loads are always dequantized and unmarked
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(
    source: str | os.PathLike | ResolvedSource | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM from any source, in eval mode, as a dense (dequantized) model."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_source(source)
    if resolved.kind == "folder":
        check_weights(Path(resolved.location))
    start = time.perf_counter()
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        resolved,
        dtype=dtype,
        device_map={"": torch.device(device)},
        **_gguf_load_kwargs(resolved),
    )
    model.eval()
    model.linearize_source = resolved  # where it came from: save_converted carries its tokenizer
    logger.info(
        "Loaded %s (%s, %d layers) from %s in %.1f s",
        type(model).__name__,
        model.config.model_type,
        getattr(model.config.get_text_config(), "num_hidden_layers", -1),
        resolved,
        time.perf_counter() - start,
    )
    return model


def load_config(source: str | os.PathLike | ResolvedSource | None = None):
    """The model's config alone (no weights): for checks that should come before a slow load."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, resolve_source(source))


def load_tokenizer(source: str | os.PathLike | ResolvedSource | None = None):
    """Load the tokenizer (with its chat template, if the source has one) from any source."""
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    start = time.perf_counter()
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolved)
    logger.info("Loaded tokenizer %s from %s in %.1f s", type(tokenizer).__name__, resolved, time.perf_counter() - start)
    return tokenizer


def load_teacher(
    source: str | os.PathLike | ResolvedSource | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(model, tokenizer)`` from one source, resolved once."""
    resolved = resolve_source(source)
    return load_model(resolved, dtype=dtype, device=device), load_tokenizer(resolved)


# Config attributes that hold the longest context a model was built for, most common first.
_MAX_LENGTH_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_max_length(config) -> int | None:
    """The longest context (in tokens) the model's config declares, or None if it declares none."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        text_config = get_text_config()
        if text_config is not config:
            configs.insert(0, text_config)
    for cfg in configs:
        for attribute in _MAX_LENGTH_ATTRIBUTES:
            value = getattr(cfg, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
