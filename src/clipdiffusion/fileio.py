"""Writing output files without losing what was there.

`check_output(path)` runs before any slow work and refuses what can never be written: a folder, a device or other
non-regular file, a missing or unwritable parent folder. `atomic_write(path, write)` then writes through a private
temporary file in the target's folder (``.NAME.XXXXXX.tmp``, created with ``O_EXCL`` by `tempfile.mkstemp`),
flushes it to disk and renames it onto the target. A failed write (full disk, ``ulimit -f``, a quota, an
interrupt) removes the temporary file and leaves the previous file, if any, byte for byte as it was; the error is
one `ClipDiffusionError` naming the field, the path and the operating system's reason.

A symbolic link as the target is replaced by the new file; the file it pointed to is never written (a link
planted where an output goes cannot redirect the write). Python ignores
SIGXFSZ (CPython sets it to SIG_IGN at start-up), so exceeding ``ulimit -f`` is an ``OSError`` (EFBIG) here, not a
killed process. Torch-free, no third-party imports.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ClipDiffusionError

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
          (stat.S_ISSOCK, "a socket"))


def _shown(field: str, path) -> str:
    return f"{field}={str(path)!r}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def check_output(path, field: str = "output") -> Path:
    """`path`, checked now so that a bad output fails before the work that produces it: not a folder, device,
    pipe or socket, in an existing writable folder. A symbolic link at `path` is fine: writing replaces the link
    itself. Raises `ClipDiffusionError` naming `field` and `path`."""
    path = Path(path)
    shown = _shown(field, path)
    if not str(path) or path.name in ("", ".", ".."):
        raise ClipDiffusionError(f"{shown}: is not a file name")
    try:
        st = os.lstat(path)  # the link itself, never what it points to
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise ClipDiffusionError(f"{shown}: a part of the path before {path.name!r} is not a folder") from None
    except OSError as exc:
        raise ClipDiffusionError(f"{shown}: cannot be checked ({_reason(exc)})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ClipDiffusionError(f"{shown}: is a folder; give a file name")
        for test, kind in _KINDS:
            if test(st.st_mode):
                raise ClipDiffusionError(f"{shown}: is {kind}, not a regular file")
    parent = path.parent
    if not parent.is_dir():
        raise ClipDiffusionError(f"{shown}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipDiffusionError(f"{shown}: folder {str(parent)!r} is not writable")
    return path


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return mask


def _new_file_mode(target: Path) -> int:
    """The permissions the file will have: the replaced regular file's, or what ``open()`` would have given a new
    one (mkstemp's files are private, 0600, which would hide a PNG from the user's other programs)."""
    try:
        st = os.lstat(target)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
        return 0o666 & ~_umask()
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path, write: Callable, *, field: str = "output", error: Callable | None = None) -> Path:
    """Write `path` with ``write(binary_file)``: into a private temporary file beside it (random name, ``O_EXCL``),
    flushed and synced, then renamed onto it. On any failure the temporary file is removed and an existing file at
    `path` is left as it was; an `OSError` becomes ``error(path, reason)`` (default: a `ClipDiffusionError` naming
    `field`, `path` and the reason). Exceptions that are not `OSError` (a bug, Ctrl-C) propagate after the
    clean-up. The one writer of every file the project produces (images, weights, configs, conditioning)."""
    if error is None:
        def error(p, reason):
            return ClipDiffusionError(f"{_shown(field, p)}: {reason}")

    path = Path(path)
    try:
        check_output(path, field)
    except ClipDiffusionError as exc:
        raise error(path, str(exc).removeprefix(_shown(field, path) + ": ")) from None
    existed = os.path.lexists(path)
    kept = "; the existing file is unchanged" if existed else ""
    mode = _new_file_mode(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    except OSError as exc:
        raise error(path, f"cannot create a file in {str(path.parent)!r} ({_reason(exc)}){kept}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise error(path, f"cannot write ({_reason(exc)}){kept}") from None
        raise
    return path
