"""What this machine provides, checked before a verb starts its slow work: optional packages (the
extras of ``pyproject.toml``), a CUDA device, the Hugging Face Hub. Each check raises a
:class:`~linearize.errors.LinearizeError` whose one-line message says how to fix it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import socket
from urllib.parse import urlparse

from .errors import LinearizeError

TRUE_VALUES = {"1", "on", "yes", "true"}  # how huggingface_hub reads its boolean variables
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0


class MissingDependencyError(LinearizeError, ModuleNotFoundError):
    """An optional package a verb needs is not installed."""


class DeviceError(LinearizeError, ValueError):
    """A device was asked for that torch does not see."""


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library through ctypes where it is glibc (its ``mallopt`` / ``malloc_trim`` tune and trim
    the allocator), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def trim_heap() -> bool:
    """Hand glibc's free heap pages back to the OS now (``malloc_trim(0)``); False without glibc.

    Where freed memory is retained (the ``linearize`` command's allocator setting), a phase that
    starts after a trim has its own peak RSS, not the previous phase's free pages on top of it: a
    finetune with ``train.malloc_trim_every`` trims before each stage and the final evaluation,
    ``linearize bench`` before each measurement."""
    libc = glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def missing_modules(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The import names in ``modules`` that are not installed (found without importing them)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, modules: dict[str, str], what: str) -> None:
    """Raise :class:`MissingDependencyError` unless every module is installed.

    ``modules``: import name -> distribution name (``{"lm_eval": "lm-eval"}``); ``extra``: the
    ``linearize[...]`` extra that installs them; ``what``: who needs them (``"linearize eval"``).
    """
    missing = missing_modules(list(modules))
    if missing:
        names = ", ".join(modules[m] for m in missing)
        raise MissingDependencyError(f"{what} needs {names}, which is not installed: "
                                     f"pip install 'linearize[{extra}]' (or pip install -e '.[{extra}]' in a checkout)")


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if torch can use it; :class:`DeviceError` for a CUDA device on a machine without one."""
    import torch

    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {device}: torch sees no CUDA device on this machine; use {flag} cpu")
        index = str(device).partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 ...); pick one of them")
    return device


def default_device() -> str:
    """``cuda`` when torch sees a CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hub_unavailable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face Hub cannot be used here (offline variables set, or its host does not
    answer within ``timeout`` seconds), or None when it can."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in TRUE_VALUES:
            return f"switched off ({name}={os.environ[name]})"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"unreachable ({host}:{port}: {err.strerror or err})"


__all__ = [
    "DeviceError", "MissingDependencyError", "check_device", "default_device", "hub_unavailable",
    "missing_modules", "require_extra",
]
