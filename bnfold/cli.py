"""The ``bnfold`` command. Thin: parse, call the library, render. Logs go to stderr; ``--json`` puts only the report
on stdout. Exit codes: see :class:`bnfold.report.ExitCode` (0 done, 1 check failed, 2 bad input or usage,
3 internal error). Imports stay light (click, the report types): ``bnfold --version`` and ``--help`` load neither
onnx nor onnxruntime; each command imports what it needs when it runs."""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path

import click

from .errors import InputError, first_line
from .report import ExitCode, json_document
from .version import __version__

STDOUT = "-"  # an output path of "-" means standard output, where a command can write there; never a file "-"


class _DefaultCommandGroup(click.Group):
    """``bnfold MODEL ...`` means ``bnfold fold MODEL ...``; a near-miss of a command name is an error that says
    which command was meant, not a missing model file."""

    default_command = "fold"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            _refuse_mistyped_command(args[0], list(self.commands))
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _refuse_mistyped_command(word: str, commands: list[str]) -> None:
    """A bare word (no suffix, no directory part, no such file) close to a command name is a mistyped command."""
    if word.startswith("-") or Path(word).suffix or os.sep in word or "/" in word or os.path.exists(word):
        return
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    if close:
        raise click.UsageError(f"no such command '{word}' (did you mean '{close[0]}'?)")


class _LazyChoice(click.Choice):
    """A Choice whose values are loaded when first needed: the rule names live in bnfold.onnx.rules, which imports
    onnx, and ``bnfold --version`` / ``--help`` should not pay for that."""

    def __init__(self, load) -> None:  # noqa: D107 - the base class's __init__ would read the values now
        self._load = load
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    @choices.setter
    def choices(self, value) -> None:
        self._choices = tuple(value)


def _log(message: str) -> None:
    click.echo(message, err=True)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and the --json report).")


_SHAPE = re.compile(r"^(?P<name>.+)[=:](?P<dims>\d+(?:[x,]\d+)*)$", re.IGNORECASE)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``NAME=1x3x224x224`` (bnfold), ``NAME:1,3,224,224`` (onnxsim) or ``NAME:1x3x224x224`` (trtexec); the last
    ``=`` or ``:`` ends the name, so names such as ``input:0`` work."""
    shapes = {}
    for item in values:
        match = _SHAPE.match(item.strip())
        if not match:
            raise click.BadParameter(f"'{item}' is not NAME=DxDxD, NAME:D,D,D or NAME:DxDxD (e.g. input=1x3x224x224)",
                                     param_hint="--input-shape")
        shapes[match["name"]] = tuple(int(d) for d in re.split(r"[x,]", match["dims"].lower()))
    return shapes


def _parse_providers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [p.strip() for p in value.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("give at least one provider, e.g. cpu or cpu,cuda", param_hint="--providers")
    return names


def _rule_choices() -> tuple[str, ...]:
    from .onnx.fold import ALL_RULE_NAMES

    return ALL_RULE_NAMES


def _output_file(path: Path, option: str) -> Path:
    """An output file named on the command line: ``-`` is refused where a command cannot write to stdout."""
    from .pipeline import check_output_path

    if str(path) == STDOUT:
        raise click.UsageError(f"{option} -: this command cannot write to standard output; give a file name")
    check_output_path(path)
    return path


@click.group(cls=_DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="bnfold", help="Show the version and exit.")
def cli() -> None:
    """Fold inference-time BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul next to it, verify that
    the folded model computes the same function, and report what was done and why anything was left.

    \b
    bnfold MODEL.onnx [OUT.onnx]  same as: bnfold fold MODEL.onnx [OUT.onnx]
    bnfold a.onnx b.onnx -o DIR   fold several models (or a directory of them)
    bnfold --check MODEL.onnx     exit 1 if anything is left to fold (writes nothing)
    bnfold verify ORIGINAL CANDIDATE   do two ONNX models compute the same function?
    bnfold audit CHECKPOINT       inspect stored BatchNorm statistics
    bnfold calibrate MODEL.onnx --data DATA.npz   recompute them from data
    bnfold bench MODEL.onnx       time original, folded and ideal in onnxruntime
    Exit codes: 0 done, 1 a check failed (verification, invalid statistics, --check, audit errors), 2 bad input
    or usage, 3 internal error.
    """


@cli.command("fold")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="MODEL... [OUTPUT]")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file, or directory with several models; '-' writes the model to stdout "
              "[default: OUTPUT if two paths are given, else MODEL stem + .folded.onnx beside each input].")
@click.option("--check", is_flag=True,
              help="Fold in memory and write nothing; exit 1 if any model has something left to fold (a CI gate).")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@quiet_option
@click.option("-v", "--verbose", is_flag=True,
              help="Also log the time of each step, and print the full report of every model when folding several.")
@click.option("--no-verify", is_flag=True, help="Skip comparing original and folded outputs in onnxruntime.")
@click.option("--providers", help="Comma-separated execution providers to verify on: cpu, cuda "
              "[default: cpu, plus cuda when onnxruntime-gpu can use a GPU].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
              help="Concrete shape for an input with dynamic dimensions: NAME=1x3x224x224, NAME:1,3,224,224 or "
              "NAME:1x3x224x224 (repeatable; other dynamic dims are 1).")
@click.option("--skip", "skip", multiple=True, type=_LazyChoice(_rule_choices), metavar="RULE",
              help="Leave out a fold or branch-merge rule (repeatable; see the README for the names).")
@click.option("--atol", type=float, help="Explicit absolute tolerance instead of the noise rule (see README).")
@click.option("--rtol", type=float, help="Explicit relative tolerance instead of the noise rule (see README).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random verification inputs and weight perturbations.")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Verify on real inputs: DATA.npz or a directory of .npy/.npz (the calibrate format).")
@click.option("--simplify", is_flag=True, help="Run onnxsim first (with its own BN fusion off; pip install "
              "'bnfold[simplify]').")
def fold_command(models, output, check, as_json, quiet, verbose, no_verify, providers, input_shapes, skip, atol,
                 rtol, seed, simplify, data_path):
    """Fold BatchNormalization in MODEL (an .onnx file, a torch.export .pt2 program, or a directory of them) and
    write the result. Two paths without -o mean MODEL OUTPUT, as in onnxsim. Verification failure: exit 1 and
    nothing written for that model; with several models the exit code is the worst one."""
    from .pipeline import fold_path, jobs_for

    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    inputs = list(models)
    if output is None and len(inputs) == 2 and not check:
        output = inputs.pop()  # bnfold IN OUT
    to_stdout = output is not None and str(output) == STDOUT
    if to_stdout:
        if check or as_json or len(inputs) != 1 or Path(inputs[0]).is_dir():
            raise click.UsageError("-o - writes one model to stdout: give one MODEL, without --check or --json")
        jobs = [(Path(inputs[0]), sys.stdout.buffer)]
    else:
        jobs = jobs_for(inputs, output)
    several = len(jobs) > 1 or any(Path(i).is_dir() for i in inputs)
    # Several models: one report line each, progress only with -v.
    log = _log if verbose or not (quiet or several) else None
    # The report goes to stdout, unless the model itself does.
    report_stream = sys.stderr if to_stdout else sys.stdout
    worst = ExitCode.OK
    documents = []
    for source, destination in jobs:
        try:
            result = fold_path(source, destination, skip=skip, verify=not (no_verify or check),
                               providers=provider_names, input_shapes=shapes or None, atol=atol, rtol=rtol,
                               seed=seed, simplify=simplify, data=data_path, write=not check, log=log)
        except InputError as exc:
            if not several:
                raise
            message = str(exc) if str(source) in str(exc) else f"{source}: {exc}"
            click.echo(f"bnfold: error: {message}", err=True)
            documents.append({"input": str(source), "error": str(exc)})
            worst = max(worst, ExitCode.BAD_INPUT)
            continue
        code = result.exit_code if not check or result.nothing_to_fold else ExitCode.CHECK_FAILED
        worst = max(worst, code)
        documents.append({**result.to_dict(), **({"check": "failed" if code else "passed"} if check else {})})
        if verbose:
            _log(f"{source}: " + ", ".join(f"{step} {s:.3f} s" for step, s in result.seconds.items()))
        if result.written and not to_stdout and log is not None:
            log(f"wrote {result.output}")
        elif not result.passed and log is not None:
            log(f"{source}: {result.failure}: no output written")
        if as_json or quiet:
            continue
        if several and not verbose:
            click.echo(_one_line(result, check), file=report_stream)
        else:
            click.echo("\n".join(_summary_lines(result, check)), file=report_stream)
    if as_json:
        document = {"models": documents} if several else documents[0]
        click.echo(json.dumps(json_document(document), indent=2))
    sys.exit(worst)


def _changes(report) -> str:
    """"3 folds" or "3 folds, 2 merges": what the fold did (or, with --check, would do)."""
    folds = len(report.folded)
    text = f"{folds} fold{'s' * (folds != 1)}"
    if report.merged:
        text += f", {len(report.merged)} merge{'s' * (len(report.merged) != 1)}"
    return text


def _one_line(result, check: bool) -> str:
    """One report line per model when folding several."""
    report = result.report
    parts = [f"{result.source}: BatchNormalization {report.bn_before} -> {report.bn_after}", _changes(report)]
    if check:
        parts.append("check passed: nothing to fold" if result.nothing_to_fold else "check FAILED: would fold")
        return ", ".join(parts)
    if result.invalid_statistics:
        parts.append(f"invalid statistics in {len(result.invalid_statistics)} BatchNorm")
    elif result.verification is not None:
        parts.append(f"verify {'PASSED' if result.passed else 'FAILED'}")
    parts.append(f"wrote {result.output}" if result.written else "not written")
    return ", ".join(parts)


def _summary_lines(result, check: bool) -> list[str]:
    lines = result.report.summary_lines()
    if check:
        lines.append("check: passed, nothing to fold (nothing written)" if result.nothing_to_fold
                     else f"check: FAILED, {_changes(result.report)} possible (nothing written)")
        return lines
    lines += [f"invalid statistics: {layer}: {f.code}: {f.detail}" for layer, f in result.invalid_statistics]
    if result.invalid_statistics:
        lines.append("verify: skipped (the original model is already wrong)")
    elif result.verification is not None:
        lines += result.verification.summary_lines()
    else:
        lines.append("verify: skipped (--no-verify)")
    if result.written:
        lines.append(f"output: {result.output if result.output is not None else 'stdout'}")
    else:
        lines.append(f"output: not written ({result.failure})")
    return lines


@cli.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Real inputs: DATA.npz or a directory of .npy/.npz (the calibrate format) [default: seeded "
              "random inputs].")
@click.option("--providers", help="Comma-separated execution providers: cpu, cuda "
              "[default: cpu, plus cuda when onnxruntime-gpu can use a GPU].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
              help="Concrete shape for an input with dynamic dimensions: NAME=1x3x224x224, NAME:1,3,224,224 or "
              "NAME:1x3x224x224 (repeatable; other dynamic dims are 1).")
@click.option("--atol", type=float, help="Explicit absolute tolerance instead of the noise rule.")
@click.option("--rtol", type=float, help="Explicit relative tolerance instead of the noise rule.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs and perturbations.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@quiet_option
def verify_command(original, candidate, data_path, providers, input_shapes, atol, rtol, seed, as_json, quiet):
    """Check that CANDIDATE (any ONNX model with ORIGINAL's inputs and outputs) computes the same function as
    ORIGINAL: each output's difference is judged against ORIGINAL's own rounding noise (see the README).
    Exit 0 equivalent, 1 not, 2 bad input."""
    from .errors import require_file
    from .pipeline import require_providers
    from .verify import verify

    for path in (original, candidate):
        require_file(path, "an ONNX model")
    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    report = verify(original, candidate, providers=provider_names, input_shapes=shapes or None, data=data_path,
                    atol=atol, rtol=rtol, seed=seed)
    require_providers(report, provider_names)
    if as_json:
        click.echo(json.dumps(json_document({"original": str(original), "candidate": str(candidate),
                                             "passed": report.passed, "verify": report.to_dict()}), indent=2))
    elif not quiet:
        lines = report.summary_lines()
        lines.append("result: " + ("EQUIVALENT" if report.passed else "NOT EQUIVALENT"))
        click.echo("\n".join(lines))
    sys.exit(ExitCode.OK if report.passed else ExitCode.CHECK_FAILED)


def _parse_opt_levels(values: tuple[str, ...]) -> list[str]:
    from .bench import OPT_LEVELS

    levels = [v.strip().lower() for item in values for v in item.split(",") if v.strip()]
    for level in levels:
        if level not in OPT_LEVELS:
            raise click.BadParameter(f"'{level}' is not one of {', '.join(OPT_LEVELS)}", param_hint="--opt-level")
    return levels or ["disabled", "all"]


@cli.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("folded", required=False, type=click.Path(path_type=Path))
@click.option("--providers", help="Comma-separated execution providers: cpu, cuda "
              "[default: cpu, plus cuda when onnxruntime-gpu is installed].")
@click.option("--opt-level", "opt_levels", multiple=True, metavar="LEVEL[,LEVEL]",
              help="onnxruntime graph optimization level(s): disabled, basic, extended, all (repeatable or "
              "comma-separated) [default: disabled,all].")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw the comparison to this PNG.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
              help="Concrete shape for an input with dynamic dimensions: NAME=1x3x224x224, NAME:1,3,224,224 or "
              "NAME:1x3x224x224 (repeatable; other dynamic dims are 1).")
@click.option("--skip", "skip", multiple=True, type=_LazyChoice(_rule_choices), metavar="RULE",
              help="Leave out a fold rule when folding in memory (repeatable).")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime intra-op threads [default: the CPUs this process may use].")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed rounds first.")
@click.option("--repeat", type=click.IntRange(min=1),
              help="Timed rounds [default: at least 10 rounds and --min-time seconds].")
@click.option("--min-time", "min_time", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds of timed rounds per provider and level when --repeat is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@quiet_option
def bench_command(model, folded, providers, opt_levels, as_json, plot, input_shapes, skip, threads, warmup, repeat,
                  min_time, seed, quiet):
    """Time MODEL against its folded form (FOLDED, or folded in memory) and the ideal: MODEL with every
    BatchNormalization removed and its branches merged, the floor any fold and merge can reach. Latency median
    [p10, p90] per provider and optimization level, session-creation time, speedup. Progress goes to stderr."""
    from .bench import benchmark, plot as draw

    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    levels = _parse_opt_levels(opt_levels)
    if plot is not None:
        _output_file(plot, "--plot")
    if folded is not None and skip:
        raise click.UsageError("--skip applies when bnfold folds MODEL itself, not to a given FOLDED model")
    if model.suffix.lower() == ".pt2":
        if opt_levels or input_shapes or skip:
            raise click.UsageError("--opt-level, --input-shape and --skip apply to ONNX models, not .pt2 programs")
        report = _bench_program(model, folded, provider_names, warmup, repeat, threads, quiet)
    else:
        report = benchmark(model, folded, providers=provider_names, opt_levels=levels, input_shapes=shapes or None,
                           seed=seed, warmup=warmup, repeat=repeat, min_time_s=min_time, threads=threads,
                           skip=skip, progress=None if quiet else _log)
    if provider_names is not None:
        missing = [r for r in report.results if not r.available]
        if missing:
            raise InputError(f"requested provider {missing[0].provider} is not available: {missing[0].reason}")
    _render(report, as_json, plot, draw, quiet)
    sys.exit(ExitCode.OK)


def _bench_program(model, folded, provider_names, warmup, repeat, threads, quiet):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(".pt2 programs need PyTorch: pip install 'bnfold[torch]'") from None
    from .torch.export import benchmark_program, load_program

    program = load_program(model)
    folded_program = load_program(folded) if folded is not None else None
    report = benchmark_program(program, folded_program, devices=provider_names, warmup=warmup,
                               repeat=repeat or 30, threads=threads, progress=None if quiet else _log)
    report.model = str(model)
    return report


@cli.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="DATA.npz (one array per graph input, batched along axis 0) or a directory of .npy/.npz files.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples per batch: each batch is normalized by its own statistics, as in training.")
@click.option("--estimator", type=click.Choice(["unbiased", "ema"]), default="unbiased", show_default=True,
              help="unbiased: population statistics pooled over all batches (m/(m-1)); ema: running average.")
@click.option("--decay", type=float, default=0.9, show_default=True, help="EMA decay (PyTorch momentum = 1 - decay).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write [default: MODEL stem + .calibrated.onnx, beside the input].")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON summary on stdout.")
@quiet_option
def calibrate_command(model, data_path, batch_size, estimator, decay, output, as_json, quiet):
    """Recompute the statistics of every BatchNormalization in MODEL from data (training-mode semantics: each
    batch normalized by its own statistics) and write a model with the new running mean/var, ready to fold."""
    from .onnx.calibrate import calibrate_onnx, load_calibration_data
    from .onnx.io import load_model_with_info, save_model

    name = model.name[:-5] if model.name.lower().endswith(".onnx") else model.name
    output = output or model.with_name(f"{name}.calibrated.onnx")
    _output_file(output, "-o")
    original, external_data = load_model_with_info(model)
    data = load_calibration_data(data_path, original)
    bar = None  # started by the first finished batch: an error found before that is the only line on stderr

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = click.progressbar(length=total, label="calibrating", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        calibrated, info = calibrate_onnx(original, data, batch_size=batch_size, estimator=estimator, decay=decay,
                                          progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    save_model(calibrated, output, external_data=external_data or None)
    if not quiet:
        _log(f"wrote {output}")
    if as_json:
        click.echo(json.dumps(json_document({"input": str(model), "output": str(output), "estimator": estimator,
                                             **info}), indent=2))
    else:
        lines = [f"calibrated {len(info['layers'])} BatchNormalization nodes ({estimator})"]
        lines += [f"  {layer['bn']}: {layer['batches']} batches, {layer['values']} values per channel"
                  for layer in info["layers"]]
        lines += [f"note: {note}" for note in info["notes"]]
        lines.append(f"output: {output}")
        if not quiet:
            click.echo("\n".join(lines))
    sys.exit(ExitCode.OK)


@cli.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw per-layer distributions to this PNG.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration data to compare stored statistics with.")
@quiet_option
def audit_command(path, as_json, plot, data, quiet):
    """Audit the BatchNorm statistics stored in PATH: an .onnx model, a PyTorch checkpoint (.pt/.pth/.ckpt, read
    with weights_only=True) or a .safetensors file. Exit 1 when a finding has error severity."""
    from .audit import audit, plot as draw

    if plot is not None:
        _output_file(plot, "--plot")
    report = audit(path, data=data)
    _render(report, as_json, plot, draw, quiet)
    sys.exit(report.exit_code)


def _render(report, as_json: bool, plot, draw, quiet: bool) -> None:
    """The PNG if asked for, then the report: JSON alone on stdout, or its summary lines (not with --quiet)."""
    if plot is not None:
        draw(report, plot)
        if not quiet:
            _log(f"wrote {plot}")
    if as_json:
        click.echo(json.dumps(json_document(report.to_dict()), indent=2))
    elif not quiet:
        click.echo("\n".join(report.summary_lines()))


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure becomes one line on stderr and a documented exit code."""
    try:
        cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors
        click.echo(f"bnfold: error: {exc.format_message()}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except click.exceptions.Abort:
        click.echo("bnfold: aborted", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except InputError as exc:
        click.echo(f"bnfold: error: {exc}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except MemoryError:
        click.echo("bnfold: error: out of memory", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("bnfold: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        first = first_line(str(exc))
        click.echo(f"bnfold: internal error: {type(exc).__name__}: {first} (set BNFOLD_DEBUG=1 for a traceback; "
                   "please report it)", err=True)
        sys.exit(ExitCode.INTERNAL_ERROR)


if __name__ == "__main__":
    main()
