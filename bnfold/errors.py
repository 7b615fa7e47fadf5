"""Exceptions that the CLI turns into one-line messages and exit codes (see report.ExitCode)."""


class BnfoldError(Exception):
    """Base class of errors bnfold raises on purpose."""


class InputError(BnfoldError):
    """The input (file, model, data, option) is unusable: exit code 2, one line, no traceback."""
