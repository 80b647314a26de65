"""The CLI's error boundary: which failures are expected (one line with the fix, exit 2) and their line."""

from __future__ import annotations

import errno

def _extras() -> dict[str, list[str]]:
    """Import name -> the extras of this package that install it (from the installed metadata)."""
    from importlib.metadata import PackageNotFoundError, requires
    import re

    try:
        lines = requires("linearize") or []
    except PackageNotFoundError:
        return {}
    found: dict[str, list[str]] = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+).*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if match:
            found.setdefault(match.group(1).lower().replace("-", "_"), []).append(match.group(2))
    return found


def _missing_extra(module: str, verb: str) -> str | None:
    extras = _extras().get(module.split(".")[0].lower())
    if not extras:
        return None
    extra = verb if verb in extras else next((e for e in extras if e != "dev"), extras[0])
    return f"the optional package {module.split('.')[0]!r} is not installed: pip install 'linearize[{extra}]'"


_OS_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EACCES: "choose a folder you can write to, or change its permissions",
    errno.EPERM: "choose a folder you can write to, or change its permissions",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
}


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_message(err: BaseException, verb: str) -> str | None:
    """The one line shown for an expected failure, or None for an unexpected one (a bug)."""
    from linearize.errors import LinearizeError

    if isinstance(err, LinearizeError):
        return one_line(err) or type(err).__name__
    if isinstance(err, ModuleNotFoundError) and err.name:
        return _missing_extra(err.name, verb)
    if type(err).__name__ == "SafetensorError":  # safetensors' own (Rust) error: a damaged weights file
        return (f"a safetensors weights file is damaged or incomplete ({one_line(err)}): copy or download the "
                "model again, or re-save it")
    if isinstance(err, OSError) and err.errno in _OS_FIXES:
        where = f": {err.filename}" if err.filename else ""
        return f"{(err.strerror or str(err)).lower()}{where} ({_OS_FIXES[err.errno]})"
    if isinstance(err, (ValueError, OSError)):  # OSError: transformers' "can't load ..."
        return one_line(err) or type(err).__name__
    return None


