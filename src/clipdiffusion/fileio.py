"""Writing output files without losing what was there.

`check_output(path)` runs before any slow work and refuses what can never be written: a folder, a device or other
non-regular file, a missing or unwritable parent folder. `atomic_write(path, write)` then writes through a private
temporary file in the target's folder (``.NAME.XXXXXX.tmp``, created with ``O_EXCL`` by `tempfile.mkstemp`),
flushes it to disk and renames it onto the target. A failed write (full disk, ``ulimit -f``, a quota, an
interrupt) removes the temporary file and leaves the previous file, if any, byte for byte as it was; the error is
one `ClipDiffusionError` naming the field, the path and the operating system's reason.

A symbolic link as the target is followed: the file it points to is replaced, the link stays. Python ignores
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
    """The file that writing `path` will replace (the link's target for a symbolic link), checked now so that a
    bad output fails before the work that produces it. Raises `ClipDiffusionError` naming `field` and `path`."""
    path = Path(path)
    shown = _shown(field, path)
    if not str(path) or path.name in ("", ".", ".."):
        raise ClipDiffusionError(f"{shown}: is not a file name")
    try:
        st = os.stat(path)  # follows symbolic links
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
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    parent = target.parent
    if not parent.is_dir():
        raise ClipDiffusionError(f"{shown}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipDiffusionError(f"{shown}: folder {str(parent)!r} is not writable")
    return target


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
    """The permissions the file will have: the replaced file's, or what ``open()`` would have given a new one
    (mkstemp's files are private, 0600, which would hide a PNG from the user's other programs)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path, write: Callable, *, field: str = "output") -> Path:
    """Write `path` with ``write(binary_file)``: into a private temporary file beside the target, flushed and
    synced, then renamed onto it. Returns the path written (a link's target). On any failure the temporary file
    is removed and an existing file at `path` is left as it was; an `OSError` becomes a `ClipDiffusionError`
    naming `field`, `path` and the reason. Exceptions that are not `OSError` (a bug, Ctrl-C) propagate after the
    clean-up."""
    target = check_output(path, field)
    shown = _shown(field, path)
    existed = target.exists()
    kept = "; the existing file is unchanged" if existed else ""
    mode = _new_file_mode(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ClipDiffusionError(f"{shown}: cannot create a file in {str(target.parent)!r} "
                                 f"({_reason(exc)}){kept}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ClipDiffusionError(f"{shown}: cannot write ({_reason(exc)}){kept}") from None
        raise
    return target
