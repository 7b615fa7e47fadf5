"""Exceptions that the CLI turns into one-line messages and exit codes (see report.ExitCode)."""


class BnfoldError(Exception):
    """Base class of errors bnfold raises on purpose."""


class InputError(BnfoldError):
    """The input (file, model, data, option) is unusable: exit code 2, one line, no traceback."""


def require_file(path, what: str):
    """``path`` as a Path when it names an existing regular file, else InputError saying what was expected."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not {what}")
    return path


def first_line(error: "BaseException | str", *, with_type: bool = False, max_chars: "int | None" = None) -> str:
    """The first non-empty line of an error (or a text), for one-line messages: libraries raise multi-line
    errors (onnxruntime, protobuf, torch) whose first line is the useful one. An exception without text gives its
    type name; ``with_type`` prefixes the type name (``"ValueError: ..."``); with ``max_chars`` a longer line is
    cut and ends in ``…`` (onnxruntime puts the reason at the end of its long lines: cut only where that is not
    needed)."""
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if max_chars is not None and len(line) > max_chars:
        line = line[:max_chars - 1] + "…"
    if isinstance(error, BaseException):
        name = type(error).__name__
        if not line:
            return name
        return f"{name}: {line}" if with_type else line
    return line
