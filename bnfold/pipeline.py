"""The fold pipeline, shared by the ``bnfold`` command and the Python API: load -> fold -> (verify) -> save.

One function, :func:`fold_path`, runs it for one model file (an ONNX model, or a torch.export ``.pt2`` program):

1. **load**: without verification (and without ``simplify``) an ONNX model's external tensors stay in their
   files and the folded weights stream to the output, so memory holds about the protobuf, never the weights;
2. **fold** (after ``simplify`` with onnxsim, when asked);
3. **verify** original against folded (onnxruntime for ONNX, torch for ``.pt2``), unless ``verify=False``;
   on ``data`` (the calibrate format) when given, else on seeded random inputs. An ONNX model whose BatchNorm
   statistics are invalid (NaN/inf, negative variance: :func:`bnfold.audit.invalid_statistics`) is wrong before
   any fold: it is not verified and not written, and the result fails;
4. **save** atomically, only when verification passed, and not at all with ``write=False`` (a dry run: the
   report says what a fold would do, which is what ``bnfold --check`` gates on).

:func:`jobs_for` turns command-line style inputs (files, directories, an output file or directory) into
``(source, destination)`` pairs. Nothing here prints; ``log`` receives progress lines when given.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import onnx

from .audit import invalid_statistics
from .errors import InputError
# (imported here, not per call: a lazy import costs as much as a small model's checks where each call starts cold)
from .onnx.fold import fold_model, select_rules
from .onnx.io import estimated_size, load_model_lazily, load_model_with_info, save_model
from .report import ExitCode, FoldReport, VerifyReport

FOLDED_SUFFIX = ".folded"
MODEL_SUFFIXES = (".onnx", ".pt2")

Log = Callable[[str], None]

# A fold with verification of a model with external data, or with this many bytes of weights inline, saves the
# folded model first and verifies the two files (bounded memory, see _verify_from_files); smaller models are
# verified from memory (no temporary file).
VERIFY_FROM_FILES_FROM = 256 << 20


@dataclass
class FoldResult:
    """What :func:`fold_path` did with one model."""

    source: Path
    output: Path | None  # the file written; None when nothing was written (dry run, failed verification, stream)
    report: FoldReport
    verification: VerifyReport | None = None  # None when not verified
    # (layer, audit Finding) for each BatchNorm whose statistics are invalid: the model is wrong before any fold
    invalid_statistics: list = field(default_factory=list)
    written: bool = False  # True when the folded model was written (to ``output`` or to the stream)
    seconds: dict[str, float] = field(default_factory=dict)  # time per step: load, fold, verify, save

    @property
    def passed(self) -> bool:
        """False when the statistics are invalid, or when verification ran and failed."""
        return not self.invalid_statistics and (self.verification is None or self.verification.passed)

    @property
    def failure(self) -> str:
        """Why the check failed, for messages ("" when it passed)."""
        if self.invalid_statistics:
            return "invalid BatchNorm statistics"
        return "" if self.passed else "verification failed"

    @property
    def nothing_to_fold(self) -> bool:
        """True when the fold changed nothing: what ``bnfold --check`` requires of a model (any fold counts, a
        folded per-channel Mul/Add as well as a BatchNormalization, and so does a branch merge)."""
        return not self.report.modified

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.CHECK_FAILED

    def to_dict(self) -> dict:
        return {"input": str(self.source), "output": str(self.output) if self.written and self.output else None,
                **self.report.to_dict(),
                "invalid_statistics": [{"layer": layer, **f.to_dict()} for layer, f in self.invalid_statistics],
                "verify": self.verification.to_dict() if self.verification is not None else None}


def default_output(source: "str | os.PathLike") -> Path:
    """``model.onnx`` -> ``model.folded.onnx`` (``.pt2`` likewise), beside the input."""
    source = Path(source)
    for suffix in MODEL_SUFFIXES:
        if source.name.lower().endswith(suffix):
            return source.with_name(source.name[:-len(suffix)] + FOLDED_SUFFIX + suffix)
    return source.with_name(source.name + FOLDED_SUFFIX + ".onnx")


def is_program(source: "str | os.PathLike") -> bool:
    """A torch.export program (``.pt2``), folded and verified in torch; anything else is read as ONNX."""
    # Path(source).suffix == ".pt2" (case-insensitive: a name longer than its suffix), said with os.path and str
    # methods: pathlib costs ten times as much where each call starts with cold caches, as a pipeline step does.
    name = os.path.basename(os.fspath(source).rstrip(_SEPARATORS))
    return len(name) > 4 and name[-4:].lower() == ".pt2"


_SEPARATORS = os.sep + (os.altsep or "")


def check_output_path(output: "str | os.PathLike") -> None:
    """An output file must be creatable: its directory exists and the path is not a directory."""
    name = os.fspath(output)  # (os.stat, not pathlib: see is_program; one call when the output exists)
    try:
        if stat.S_ISDIR(os.stat(name).st_mode):
            raise InputError(f"{output}: output is a directory")
        return  # an existing file: its directory exists
    except OSError:
        pass
    directory = os.path.dirname(name)
    if directory and not os.path.isdir(directory):
        raise InputError(f"{output}: output directory {directory} does not exist")


def jobs_for(inputs: Iterable["str | os.PathLike"], output: "str | os.PathLike | None" = None
             ) -> list[tuple[Path, Path]]:
    """``(source, destination)`` for every model named by ``inputs``.

    An input directory stands for the ``.onnx``/``.pt2`` files directly in it (outputs of an earlier fold,
    ``*.folded.*``, left out). With one input file, ``output`` is the output file. With several models (or a
    directory), ``output`` must be an existing directory other than the inputs' own, and each model keeps its
    file name there; without ``output`` each folded model goes beside its input as ``<stem>.folded.onnx``.
    """
    sources: list[Path] = []
    from_directory = False
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
                           and FOLDED_SUFFIX + p.suffix.lower() not in p.name.lower())
            if not found:
                raise InputError(f"{item}: is a directory without any .onnx or .pt2 model in it")
            sources += found
            from_directory = True
        else:
            sources.append(item)
    if not sources:
        raise InputError("no model given")
    if output is None:
        return [(s, default_output(s)) for s in sources]
    output = Path(output)
    if len(sources) == 1 and not from_directory:
        return [(sources[0], output)]  # one file names one file (a directory there is refused when writing)
    if not output.is_dir():
        raise InputError(f"{output}: with several models the output must be an existing directory")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"several inputs are named {repeated[0]}: they would overwrite each other in {output}")
    jobs = [(s, output / s.name) for s in sources]
    for source, destination in jobs:
        if destination.exists() and destination.resolve() == source.resolve():
            raise InputError(f"{output}: is the directory of input {source}; folded models would replace their "
                             "inputs (give another output directory)")
    return jobs


def fold_path(source: "str | os.PathLike", destination: "str | os.PathLike | IO[bytes] | None" = None, *,
              skip: Iterable[str] = (), verify: bool = True, providers: "Iterable[str] | None" = None,
              input_shapes: "Mapping[str, Iterable[int]] | None" = None, atol: float | None = None,
              rtol: float | None = None, seed: int = 0, simplify: bool = False,
              data: "str | os.PathLike | None" = None, write: bool = True, log: Log | None = None) -> FoldResult:
    """Load ``source``, fold it, verify it (unless ``verify=False``) and write it to ``destination``.

    ``destination``: a path (default ``<stem>.folded.onnx`` beside the source) or a binary stream such as
    ``sys.stdout.buffer`` (refused for a model with external data, whose weights need a file beside the model).
    Nothing is written when verification fails or with ``write=False``; a file is written atomically.
    ``providers`` given explicitly must all be available (else :class:`InputError`); by default verification
    uses the CPU plus CUDA when present. ``data`` (DATA.npz or a directory of .npy/.npz) verifies on real inputs.
    ``skip``, ``input_shapes``, ``simplify`` and ``data`` apply to ONNX models.
    """
    source = Path(source)
    stream = destination if destination is not None and hasattr(destination, "write") else None
    output = None if stream is not None else Path(destination) if destination is not None else default_output(source)
    if write and output is not None:
        check_output_path(output)
    log = log or _silent
    if is_program(source):
        if skip or input_shapes or simplify or data is not None:
            raise InputError("--input-shape, --skip, --simplify and --data apply to ONNX models, not .pt2 programs")
        result = _fold_program(source, output, stream, verify, providers, atol, rtol, seed, write, log)
    else:
        result = _fold_onnx(source, output, stream, skip, verify, providers, input_shapes, atol, rtol, seed,
                            simplify, data, write, log)
    return result


def fold_file(source: "str | os.PathLike", destination: "str | os.PathLike", *,
              skip: Iterable[str] = ()) -> FoldReport:
    """Load, fold and save without verification (:func:`fold_path` with ``verify=False``); also importable as
    ``bnfold.onnx.fold.fold_file``.

    A model with external data keeps it: its tensors are read from their files one at a time, folded values are
    spilled to a temporary file, and the output's data file is written tensor by tensor, so memory holds about
    the protobuf and a few tensors, never the weights."""
    return fold_path(source, destination, skip=skip, verify=False).report


def _fold_onnx(source, output, stream, skip, verify, providers, input_shapes, atol, rtol, seed, simplify, data,
               write, log) -> FoldResult:
    rules = select_rules(skip)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if simplify:  # onnxsim needs every weight in memory
        original, external_data = load_model_with_info(source)
        lazy_source = None
    else:
        # External tensors stay in their files, read when a fold needs them and streamed to the output.
        original, lazy_source = load_model_lazily(source)
        external_data = lazy_source is not None
    try:
        if external_data and stream is not None and write:
            raise InputError(f"{source}: a model with external data cannot be written to a stream; give a file")
        seconds["load"] = time.perf_counter() - start
        from_files = verify and not simplify and (external_data or
                                                  estimated_size(original) >= VERIFY_FROM_FILES_FROM)
        start = time.perf_counter()
        folded = original
        if simplify:
            from .onnx.simplify import simplify as run_simplify

            folded = run_simplify(original)
            log("simplified with onnxsim (BN fusion off)")
        if folded is original and verify and not from_files:  # the original stays untouched for verification
            folded = onnx.ModelProto()
            folded.CopyFrom(original)
        # Unless verification reads the folded model from memory, the folded weights go straight to the file.
        pending = None if verify and not from_files else {}
        report = fold_model(folded, rules, pending, lazy_source)
        seconds["fold"] = time.perf_counter() - start
        if log is not _silent:  # (the message is not even formatted for nobody)
            log(f"{source}: {len(report.folded)} folds, BatchNormalization {report.bn_before} -> {report.bn_after}")
            if report.merged:
                log(f"{source}: {len(report.merged)} branch merges")
        # The fold's BatchNorm reader refuses NaN/inf parameters and negative variances, so a BN with invalid
        # statistics is always among those left, with its original parameters: only then is there one to find
        # (checking every BN of a clean model would cost as much as the fold).
        invalid = invalid_statistics(folded, lazy_source.read if lazy_source is not None else None) \
            if report.skipped else []
        if invalid:  # the original itself computes garbage: nothing to verify, nothing to write
            return FoldResult(source, output, report, None, invalid, seconds=seconds)

        def save(path: Path) -> None:
            save_model(folded, path, external_data=external_data or None, replacements=pending,
                       source=lazy_source)

        if from_files:
            return _verify_from_files(source, output, stream, save, report, seconds, write, log,
                                      dict(providers=providers, input_shapes=input_shapes or None, data=data,
                                           atol=atol, rtol=rtol, seed=seed))
        verification = None
        if verify:
            from .verify import verify as run_verify

            log("verifying in onnxruntime (graph optimizations disabled)...")
            start = time.perf_counter()
            verification = run_verify(original, folded, providers=providers, input_shapes=input_shapes or None,
                                      data=data, atol=atol, rtol=rtol, seed=seed)
            seconds["verify"] = time.perf_counter() - start
            require_providers(verification, providers)
        result = FoldResult(source, output, report, verification, seconds=seconds)
        if write and result.passed:
            start = time.perf_counter()
            _write(save, output, stream)
            seconds["save"] = time.perf_counter() - start
            result.written = True
    finally:
        if lazy_source is not None:
            lazy_source.close()
    return result


def _verify_from_files(source: Path, output: Path | None, stream: "IO[bytes] | None",
                       save: Callable[[Path], None], report: FoldReport, seconds: dict[str, float],
                       write: bool, log: Log, options: dict) -> FoldResult:
    """Save the folded model to a private directory (beside ``output`` when it is written there, so that the
    result is renamed into place), verify the two files, then move or copy the result out, or delete it: memory
    holds one onnxruntime session at a time, never both models' weights (:func:`bnfold.verify.verify` with
    paths)."""
    from .onnx.io import move_model
    from .verify import verify as run_verify

    into_output = write and stream is None
    directory = output.parent if into_output else None  # else the system's temporary directory
    name = output.name if output is not None else "model.onnx"  # external references name the data file by it
    with tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".tmp", dir=directory) as tmp:
        staged = Path(tmp) / name
        start = time.perf_counter()
        save(staged)
        seconds["save"] = time.perf_counter() - start
        log("verifying in onnxruntime from files (graph optimizations disabled)...")
        start = time.perf_counter()
        verification = run_verify(source, staged, **options)
        seconds["verify"] = time.perf_counter() - start
        require_providers(verification, options["providers"])
        result = FoldResult(source, output, report, verification, seconds=seconds)
        if write and result.passed:
            start = time.perf_counter()
            if stream is None:
                move_model(staged, output)
            else:
                with open(staged, "rb") as f:
                    shutil.copyfileobj(f, stream)
                stream.flush()
            seconds["save"] += time.perf_counter() - start
            result.written = True
    return result


def _fold_program(source, output, stream, verify, providers, atol, rtol, seed, write, log) -> FoldResult:
    try:
        import torch
    except ImportError:
        raise InputError(".pt2 programs need PyTorch: pip install 'bnfold[torch]'") from None
    from .torch.export import fold_exported, load_program, save_program

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    program = load_program(source)
    seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    folded, report = fold_exported(program)
    seconds["fold"] = time.perf_counter() - start
    log(f"{source}: {len(report.folded)} folds, BatchNorm {report.bn_before} -> {report.bn_after}")
    verification = None
    if verify:
        from .torch.verify import verify as run_verify

        log("verifying in torch (the exported example inputs and seeded random ones like them)...")
        start = time.perf_counter()
        args = tuple(program.example_inputs[0]) if program.example_inputs is not None else ()
        generator = torch.Generator().manual_seed(seed)
        fresh = tuple(torch.randn(a.shape, generator=generator, dtype=a.dtype) if a.is_floating_point() else a
                      for a in args)
        verification = run_verify(program.module(), folded.module(), [args, fresh],
                                  devices=list(providers) if providers is not None else None, atol=atol, rtol=rtol,
                                  seed=seed)
        seconds["verify"] = time.perf_counter() - start
        require_providers(verification, providers)
    result = FoldResult(source, output, report, verification, seconds=seconds)
    if write and result.passed:
        start = time.perf_counter()
        _write(lambda path: save_program(folded, path), output, stream)
        seconds["save"] = time.perf_counter() - start
        result.written = True
    return result


def require_providers(verification: VerifyReport, providers: "Iterable[str] | None") -> None:
    """Providers (or devices) asked for by name must have run: an unavailable one is bad usage, not a pass."""
    if providers is None:
        return
    missing = [name for name, r in verification.providers.items() if not r.available]
    if missing:
        raise InputError(f"requested provider {', '.join(missing)} is not available: "
                         f"{verification.providers[missing[0]].reason}")


def _write(save: Callable[[Path], None], output: Path | None, stream: "IO[bytes] | None") -> None:
    """``save(path)`` writes atomically; a stream gets the bytes of a file saved in a private directory."""
    if stream is None:
        save(output)
        return
    with tempfile.TemporaryDirectory(prefix="bnfold-") as tmp:
        path = Path(tmp) / "model"
        save(path)
        with open(path, "rb") as f:
            shutil.copyfileobj(f, stream)
    stream.flush()


def _silent(message: str) -> None:
    del message


__all__ = ["FOLDED_SUFFIX", "FoldResult", "check_output_path", "default_output", "fold_file", "fold_path",
           "is_program", "jobs_for", "require_providers"]
