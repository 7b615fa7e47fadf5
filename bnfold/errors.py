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
