"""The version of bnfold, in one place: the package metadata (pyproject.toml) and ``bnfold --version`` read it."""

__version__ = "0.1.0"
