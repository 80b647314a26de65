"""The one output-folder policy of every verb that writes (convert, finetune, eval, bench, push).

A user's files are sacred: a verb writes only into a folder that is new, empty, or was written by
linearize itself (it holds :data:`MARKER`, or is a converted checkpoint saved before the marker
existed), and replaces one of its own only when asked (``overwrite=True``, the CLI's
``--overwrite``). It never writes to ``.``, an empty path, the home or root folder, a folder that
holds the current one, an existing file, or the model it reads from.

- :func:`check_output_dir` runs these checks; verbs call it before any slow loading.
- :func:`atomic_folder` builds a folder under a hidden temporary sibling and renames it into place
  when complete, so a crash leaves the old folder (or nothing), never a half-written one.
- :class:`FolderLock` keeps two runs from writing one folder at once.
- :func:`atomic_write_text` / :func:`atomic_write_json`: one file, written then renamed.

Temporary siblings are named ``.NAME.tmp-PID-XXXX`` (the new folder being built) and
``.NAME.old-PID-XXXX`` (the folder being replaced, for the instant between two renames). What a
killed process (its PID no longer runs) left is tidied the next time anything writes ``NAME``:
the old folder goes back into place if the new one never arrived, the rest is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError

logger = logging.getLogger(__name__)

MARKER = ".linearize-output"
"""File inside every folder linearize writes: JSON naming what the folder holds (``kind``)."""
TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"
CONVERTED_PREFIX = "linearize_"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_like_new(path: Path, directory: bool) -> None:
    """``mkdtemp``/``mkstemp`` create 0700/0600; give what a plain mkdir/open would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def give_normal_permissions(folder: Path) -> None:
    """Files and folders under ``folder`` get what a plain open/mkdir would give (umask applied):
    safetensors writes its files 0600 and ``mkdtemp`` makes 0700, which would hide a shared model."""
    _chmod_like_new(folder, directory=True)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            _chmod_like_new(path, directory=path.is_dir())


def written_by_linearize(path: Path) -> str | None:
    """What linearize wrote at ``path`` (the marker's kind), or None when the folder is not ours."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind", "output"))
        except (ValueError, OSError):
            return "output"
    config = path / "config.json"  # converted checkpoints saved before the marker existed
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type", "")
        except (ValueError, OSError):
            return None
        if isinstance(model_type, str) and model_type.startswith(CONVERTED_PREFIX):
            return "converted-model"
    return None


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
    except ValueError:
        return False
    return True


def check_output_dir(path: str | os.PathLike | None, *, what: str, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike | None] = (), reuse_kind: str | None = None,
                     flag: str = "--out") -> Path:
    """Return ``path`` resolved if a verb may write its folder there; raise :class:`OutputError` if not.

    ``what`` names the output in messages ("converted checkpoint"). ``sources``: paths the verb
    reads (a teacher folder, a .gguf): the output may be neither one of them, inside one, nor hold
    one. ``reuse_kind``: a folder of ours of this kind (marker kind, e.g. ``finetune-run``) is fine
    without ``overwrite`` (a run that is resumed, a report that is refreshed); one of another kind
    is refused.
    """
    if path is None or str(path).strip() == "":
        raise OutputError(f"{flag} is empty: name a new folder for the {what}, e.g. {flag} out/model")
    raw = Path(path).expanduser()
    if str(raw) == "." or raw.name == "..":
        raise OutputError(f"{flag} {path!s} names an existing folder by '.' or '..': name a new folder "
                          f"for the {what}, e.g. {flag} out/model")
    out = raw.resolve()
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor) or out == Path.home().resolve() or _is_within(cwd, out):
        raise OutputError(f"{flag} {path!s} is the root, home or current folder (or holds it): "
                          f"name a new folder for the {what}")
    for source in sources:
        if source is None or str(source).strip() == "":
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if out == src or _is_within(out, src) or _is_within(src, out):
            raise OutputError(f"{flag} {path!s} overlaps the model being read ({src}): "
                              f"write the {what} to another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{flag} {path!s} is an existing file, not a folder: choose another {flag}")
        if any(out.iterdir()):
            kind = written_by_linearize(out)
            if kind is None:
                raise OutputError(f"{flag} {path!s} is a folder with files linearize did not write: "
                                  f"choose a new or empty folder (nothing was changed)")
            if reuse_kind is not None and kind != reuse_kind:
                article = "an" if what[:1] in "aeiou" else "a"
                raise OutputError(f"{flag} {path!s} holds a {kind.replace('-', ' ')}, not {article} {what}: "
                                  f"choose another {flag}")
            if not (overwrite or reuse_kind):
                raise OutputError(f"{flag} {path!s} already holds a {kind.replace('-', ' ')}: pass "
                                  f"--overwrite to replace it, or choose another {flag}")
    _check_writable_parent(out, path, flag)
    return out


def _check_writable_parent(out: Path, path, flag: str) -> None:
    parent = _nearest_existing(out.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path!s}: cannot write in {parent} (permission denied): choose a writable folder")


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise OutputError(f"cannot create a folder under {path}: it is a file")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(out: Path, infix: str) -> list[Path]:
    """``.NAME<infix>PID-*`` siblings of ``out`` whose writing process no longer runs."""
    prefix = f".{out.name}{infix}"
    stale = []
    for entry in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        if entry.name.startswith(prefix):
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                stale.append(entry)
    return stale


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Tidy what a killed writer of ``out`` left beside it.

    A folder that was moved aside to be replaced (``.NAME.old-PID-*``) goes back into place if the
    kill came before its replacement arrived; every other leftover (``.NAME.tmp-PID-*``, a
    half-written new folder or file) is removed. Returns what was removed.
    """
    for backup in _stale_siblings(out, OLD_INFIX):
        if not out.exists():
            backup.rename(out)
            logger.warning("restored %s from %s, left by an interrupted run", out, backup.name)
    removed = []
    for entry in _stale_siblings(out, TMP_INFIX) + _stale_siblings(out, OLD_INFIX):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
        logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _temp_name(out: Path, infix: str = TMP_INFIX) -> str:
    return f".{out.name}{infix}{os.getpid()}-"


def write_marker(folder: Path, kind: str, **info: Any) -> None:
    (folder / MARKER).write_text(json.dumps({"kind": kind, **info}, indent=1) + "\n")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out`` (which must pass
    :func:`check_output_dir`), on any failure it is removed and ``out`` is untouched.

    The old folder is moved aside before the rename and deleted only after the new one is in place.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        clean_stale_temporaries(out)
        if out.exists():  # re-checked under the lock: another process may have written it meanwhile
            check_output_dir(out, what=kind.replace("-", " "), overwrite=overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(out), dir=out.parent))
        try:
            _chmod_like_new(tmp, directory=True)
            yield tmp
            write_marker(tmp, kind)
            give_normal_permissions(tmp)
            if out.exists() and any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=_temp_name(out, OLD_INFIX), dir=out.parent))
                os.rmdir(old)
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                if out.exists():
                    out.rmdir()
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class FolderLock:
    """An exclusive, non-blocking lock on writing ``folder`` (a ``.NAME.lock`` file beside it).

    A second run on the same folder fails at once with :class:`OutputError` naming the holder's PID.
    The lock is released when the process ends, however it ends; the lock file is removed on a
    clean release.
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder).resolve()
        self.path = folder.parent / f".{folder.name}.lock"
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.folder} is being written by another linearize process "
                                      f"(pid {holder}): wait for it to finish or choose another folder") from None
                raise
            # The file may have been removed by its last holder between our open and flock: retry.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_name(path), dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _chmod_like_new(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def check_output_file(path: str | os.PathLike, *, what: str, flag: str = "--out",
                      suffixes: tuple[str, ...] = (".json",)) -> Path:
    """A single output file (``bench --out x.json``): not a folder, parent writable, right suffix."""
    if str(path).strip() == "":
        raise OutputError(f"{flag} is empty: name the {what} file")
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise OutputError(f"{flag} {path!s} is a folder: name a {'/'.join(suffixes)} file for the {what}")
    if suffixes and out.suffix not in suffixes:
        raise OutputError(f"{flag} {path!s}: the {what} is written as {'/'.join(suffixes)}; "
                          f"name a file ending in {suffixes[0]}")
    _check_writable_parent(out, path, flag)
    return out


__all__ = [
    "MARKER", "FolderLock", "atomic_folder", "atomic_write_json", "atomic_write_text", "check_output_dir",
    "check_output_file", "clean_stale_temporaries", "give_normal_permissions", "write_marker", "written_by_linearize",
]
