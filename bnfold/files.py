"""Writing output files atomically: a temporary file in the target's directory, then a rename, so that a failed or
interrupted write never leaves a partial file (and never touches an existing one)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def write_atomically(path: Path, write: Callable[[object], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``. The file gets
    the permissions a plain ``open(path, "wb")`` would give; any OSError becomes an InputError naming ``path``."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = _create_temporary(directory, path.name)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    replaced = False
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        replaced = True
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# Opened as tempfile.mkstemp opens its file (exclusively, following no link, binary), but with mode 0666 for the
# kernel to apply the umask to, as open() does: mkstemp's Python-level name generation, and the chmod its 0600 then
# needs, cost more than writing a small model.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_BINARY", 0)


def _create_temporary(directory: Path, name: str) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` in ``directory``, opened for writing. O_EXCL never opens a file that is
    already there, nor follows a link planted under that name: a name that exists is skipped for another."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", os.fspath(directory))
