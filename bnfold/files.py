"""Writing output files atomically: a temporary file in the target's directory, then a rename, so that a failed or
interrupted write never leaves a partial file (and never touches an existing one)."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def write_atomically(path: Path, write: Callable[[object], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``. The file gets
    the permissions a plain ``open(path, "wb")`` would give; any OSError becomes an InputError naming ``path``."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
