"""The one-line error helper every module uses to quote a library's exception."""

from __future__ import annotations

from bnfold.errors import first_line


def test_first_line_takes_the_first_non_empty_line():
    assert first_line(RuntimeError("\n  [ONNXRuntimeError] : 1 : FAIL  \nstack frame 1\nstack frame 2")) == \
        "[ONNXRuntimeError] : 1 : FAIL"


def test_an_exception_without_text_gives_its_type():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("  \n ")) == "ValueError"


def test_with_type_prefixes_the_type_name():
    assert first_line(ValueError("bad shape\nmore"), with_type=True) == "ValueError: bad shape"
    assert first_line(ValueError(""), with_type=True) == "ValueError"


def test_text_is_accepted_and_long_lines_are_cut():
    assert first_line("one\ntwo") == "one"
    assert first_line("") == ""
    cut = first_line("x" * 1000, max_chars=50)
    assert len(cut) == 50 and cut.endswith("…")
    assert first_line("x" * 1000) == "x" * 1000  # no cut unless asked: onnxruntime's reasons come last
