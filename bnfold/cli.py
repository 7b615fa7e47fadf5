"""The ``bnfold`` command. Thin: parse, call the library, render. Logs go to stderr; ``--json`` puts only the report
on stdout. Exit codes: see :class:`bnfold.report.ExitCode` (0 done, 1 check failed, 2 bad input or usage,
3 internal error)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import InputError
from .report import ExitCode


class _DefaultCommandGroup(click.Group):
    """``bnfold MODEL ...`` means ``bnfold fold MODEL ...``."""

    default_command = "fold"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _log(message: str) -> None:
    click.echo(message, err=True)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in values:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
            if any(d < 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"'{item}' is not NAME=DxDxD (e.g. input=1x3x224x224)",
                                     param_hint="--input-shape") from None
    return shapes


def _parse_providers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [p.strip() for p in value.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("give at least one provider, e.g. cpu or cpu,cuda", param_hint="--providers")
    return names


def _default_output(model_path: Path) -> Path:
    name = model_path.name
    stem = name[:-5] if name.lower().endswith(".onnx") else name
    return model_path.with_name(f"{stem}.folded.onnx")


def _rule_choices() -> list[str]:
    from .onnx.fold import ALL_RULE_NAMES

    return list(ALL_RULE_NAMES)


@click.group(cls=_DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def cli() -> None:
    """Fold inference-time BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul next to it, verify that
    the folded model computes the same function, and report what was done and why anything was left.

    \b
    bnfold MODEL.onnx            same as: bnfold fold MODEL.onnx
    bnfold verify ORIGINAL CANDIDATE   do two ONNX models compute the same function?
    bnfold audit CHECKPOINT      inspect stored BatchNorm statistics
    bnfold calibrate MODEL.onnx --data DATA.npz   recompute them from data
    bnfold bench MODEL.onnx      time original, folded and ideal in onnxruntime
    Exit codes: 0 done, 1 a check failed (verification, invalid statistics, audit errors), 2 bad input or usage,
    3 internal error.
    """


@cli.command("fold")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write the folded model [default: MODEL stem + .folded.onnx, beside the input].")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option("--no-verify", is_flag=True, help="Skip comparing original and folded outputs in onnxruntime.")
@click.option("--providers", help="Comma-separated execution providers to verify on: cpu, cuda "
              "[default: cpu, plus cuda when onnxruntime-gpu can use a GPU].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
              help="Concrete shape for an input with dynamic dimensions (repeatable; default dims are 1).")
@click.option("--skip", "skip", multiple=True, type=click.Choice(_rule_choices()),
              help="Leave out a fold rule (repeatable).")
@click.option("--atol", type=float, help="Explicit absolute tolerance instead of the noise rule (see README).")
@click.option("--rtol", type=float, help="Explicit relative tolerance instead of the noise rule (see README).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random verification inputs.")
@click.option("--simplify", is_flag=True, help="Run onnxsim first (with its own BN fusion off).")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Verify on real inputs: DATA.npz or a directory of .npy/.npz (the calibrate format).")
def fold_command(model, output, as_json, no_verify, providers, input_shapes, skip, atol, rtol, seed, simplify,
                 data_path):
    """Fold BatchNormalization in MODEL (an .onnx file, or a torch.export .pt2 program) and write the result."""
    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    invalid = []
    if model.suffix.lower() == ".pt2":
        if input_shapes or skip or simplify or data_path:
            raise click.UsageError("--input-shape, --skip, --simplify and --data apply to ONNX models, not .pt2 "
                                   "programs")
        output = output or model.with_name(model.name[:-4] + ".folded.pt2")
        _check_output(output)
        report, verification, write = _fold_program(model, output, no_verify, provider_names, atol, rtol, seed)
    else:
        output = output or _default_output(model)
        _check_output(output)
        report, verification, write, invalid = _fold_onnx(model, output, no_verify, provider_names, shapes, skip,
                                                          atol, rtol, seed, simplify, data_path)
    _require_available(verification, provider_names)
    passed = not invalid and (verification is None or verification.passed)
    written = None
    if passed:
        write()
        written = str(output)
        _log(f"wrote {output}")
    elif invalid:
        _log("invalid BatchNorm statistics: no output written")
    else:
        _log("verification FAILED: no output written")

    if as_json:
        payload = {"input": str(model), "output": written, **report.to_dict(),
                   "invalid_statistics": [{"layer": layer, **f.to_dict()} for layer, f in invalid],
                   "verify": verification.to_dict() if verification is not None else None}
        click.echo(json.dumps(payload, indent=2, sort_keys=False))
    else:
        lines = report.summary_lines()
        lines += [f"invalid statistics: {layer}: {f.code}: {f.detail}" for layer, f in invalid]
        if invalid:
            lines.append("verify: skipped (the original model is already wrong)")
        else:
            lines += (verification.summary_lines() if verification is not None
                      else ["verify: skipped (--no-verify)"])
        reason = "invalid BatchNorm statistics" if invalid else "verification failed"
        lines.append(f"output: {written}" if written else f"output: not written ({reason})")
        click.echo("\n".join(lines))
    sys.exit(ExitCode.OK if passed else ExitCode.CHECK_FAILED)


def _require_available(verification, provider_names) -> None:
    """A provider the user asked for by name must have run: exit 2 otherwise."""
    if verification is not None and provider_names is not None:
        missing = [name for name, r in verification.providers.items() if not r.available]
        if missing:
            raise InputError(f"requested provider {', '.join(missing)} is not available: "
                             f"{verification.providers[missing[0]].reason}")


def _check_output(output: Path) -> None:
    if output.exists() and output.is_dir():
        raise InputError(f"{output}: output is a directory")
    if not output.parent.is_dir() and str(output.parent):
        raise InputError(f"{output}: output directory {output.parent} does not exist")


def _fold_onnx(model, output, no_verify, provider_names, shapes, skip, atol, rtol, seed, simplify, data_path):
    import onnx

    from .audit import invalid_statistics

    from .onnx.fold import fold_model, select_rules
    from .onnx.io import load_model_lazily, load_model_with_info, save_model

    rules = select_rules(skip)
    if no_verify and not simplify:
        # Nothing needs the weights in memory: external tensors stay in their files and stream to the output.
        original, source = load_model_lazily(model)
        external_data = source is not None
    else:
        original, external_data = load_model_with_info(model)
        source = None
    invalid = invalid_statistics(original, source.read if source is not None else None)
    if invalid:
        no_verify = True  # nothing to compare: the original itself computes garbage
    folded = original
    if simplify:
        from .onnx.simplify import simplify as run_simplify

        folded = run_simplify(original)
        _log("simplified with onnxsim (BN fusion off)")
    if folded is original and not no_verify:  # the original stays untouched for verification
        folded = onnx.ModelProto()
        folded.CopyFrom(original)
    # Without verification nothing needs the folded weights in memory: they go straight to the file.
    pending = {} if no_verify else None
    report = fold_model(folded, rules, pending, source)
    _log(f"{model}: {len(report.folded)} folds, BatchNormalization {report.bn_before} -> {report.bn_after}")
    if report.merged:
        _log(f"{model}: {len(report.merged)} branch merges")
    verification = None
    if not no_verify:
        from .verify import verify

        _log("verifying in onnxruntime (graph optimizations disabled)...")
        verification = verify(original, folded, providers=provider_names, input_shapes=shapes or None,
                              data=data_path, atol=atol, rtol=rtol, seed=seed)
    return report, verification, lambda: save_model(folded, output, external_data=external_data or None,
                                                    replacements=pending, source=source), invalid


def _fold_program(model, output, no_verify, provider_names, atol, rtol, seed):
    try:
        import torch
    except ImportError:
        raise InputError(".pt2 programs need PyTorch: pip install 'bnfold[torch]'") from None
    from .torch.export import fold_exported, load_program, save_program

    program = load_program(model)
    folded, report = fold_exported(program)
    _log(f"{model}: {len(report.folded)} folds, BatchNorm {report.bn_before} -> {report.bn_after}")
    verification = None
    if not no_verify:
        from .torch.verify import verify

        _log("verifying in torch (the exported example inputs and seeded random ones like them)...")
        args = tuple(program.example_inputs[0]) if program.example_inputs is not None else ()
        generator = torch.Generator().manual_seed(seed)
        fresh = tuple(torch.randn(a.shape, generator=generator, dtype=a.dtype) if a.is_floating_point() else a
                      for a in args)
        verification = verify(program.module(), folded.module(), [args, fresh], devices=provider_names,
                              atol=atol, rtol=rtol, seed=seed)
    return report, verification, lambda: save_program(folded, output)


@cli.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Real inputs: DATA.npz or a directory of .npy/.npz (the calibrate format) [default: seeded "
              "random inputs].")
@click.option("--providers", help="Comma-separated execution providers: cpu, cuda "
              "[default: cpu, plus cuda when onnxruntime-gpu can use a GPU].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD...",
              help="Concrete shape for an input with dynamic dimensions (repeatable; default dims are 1).")
@click.option("--atol", type=float, help="Explicit absolute tolerance instead of the noise rule.")
@click.option("--rtol", type=float, help="Explicit relative tolerance instead of the noise rule.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs and perturbations.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
def verify_command(original, candidate, data_path, providers, input_shapes, atol, rtol, seed, as_json):
    """Check that CANDIDATE (any ONNX model with ORIGINAL's inputs and outputs) computes the same function as
    ORIGINAL: each output's difference is judged against ORIGINAL's own rounding noise (see the README).
    Exit 0 equivalent, 1 not, 2 bad input."""
    from .errors import require_file
    from .verify import verify

    for path in (original, candidate):
        require_file(path, "an ONNX model")
    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    report = verify(original, candidate, providers=provider_names, input_shapes=shapes or None, data=data_path,
                    atol=atol, rtol=rtol, seed=seed)
    _require_available(report, provider_names)
    if as_json:
        click.echo(json.dumps({"original": str(original), "candidate": str(candidate), "passed": report.passed,
                               "verify": report.to_dict()}, indent=2))
    else:
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
              help="Concrete shape for an input with dynamic dimensions (repeatable; default dims are 1).")
@click.option("--skip", "skip", multiple=True, type=click.Choice(_rule_choices()),
              help="Leave out a fold rule when folding in memory (repeatable).")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime intra-op threads [default: the CPUs this process may use].")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed rounds first.")
@click.option("--repeat", type=click.IntRange(min=1),
              help="Timed rounds [default: at least 10 rounds and --min-time seconds].")
@click.option("--min-time", "min_time", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds of timed rounds per provider and level when --repeat is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def bench_command(model, folded, providers, opt_levels, as_json, plot, input_shapes, skip, threads, warmup, repeat,
                  min_time, seed):
    """Time MODEL against its folded form (FOLDED, or folded in memory) and the ideal: MODEL with every
    BatchNormalization removed and its branches merged, the floor any fold can reach. Latency median [p10, p90] per provider and
    optimization level, session-creation time, speedup. Progress goes to stderr."""
    from .bench import benchmark, plot as draw

    shapes = _parse_shapes(input_shapes)
    provider_names = _parse_providers(providers)
    levels = _parse_opt_levels(opt_levels)
    if plot is not None:
        _check_output(plot)
    if folded is not None and skip:
        raise click.UsageError("--skip applies when bnfold folds MODEL itself, not to a given FOLDED model")
    if model.suffix.lower() == ".pt2":
        if opt_levels or input_shapes or skip:
            raise click.UsageError("--opt-level, --input-shape and --skip apply to ONNX models, not .pt2 programs")
        report = _bench_program(model, folded, provider_names, warmup, repeat, threads)
    else:
        report = benchmark(model, folded, providers=provider_names, opt_levels=levels, input_shapes=shapes or None,
                           seed=seed, warmup=warmup, repeat=repeat, min_time_s=min_time, threads=threads,
                           skip=skip, progress=_log)
    if provider_names is not None:
        missing = [r for r in report.results if not r.available]
        if missing:
            raise InputError(f"requested provider {missing[0].provider} is not available: {missing[0].reason}")
    _render(report, as_json, plot, draw)
    sys.exit(ExitCode.OK)


def _bench_program(model, folded, provider_names, warmup, repeat, threads):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(".pt2 programs need PyTorch: pip install 'bnfold[torch]'") from None
    from .torch.export import benchmark_program, load_program

    program = load_program(model)
    folded_program = load_program(folded) if folded is not None else None
    report = benchmark_program(program, folded_program, devices=provider_names, warmup=warmup,
                               repeat=repeat or 30, threads=threads, progress=_log)
    report.model = str(model)
    return report


@cli.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="DATA.npz (one array per graph input, batched along axis 0) or a directory of .npy/.npz files.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--estimator", type=click.Choice(["unbiased", "ema"]), default="unbiased", show_default=True)
@click.option("--decay", type=float, default=0.9, show_default=True, help="EMA decay (PyTorch momentum = 1 - decay).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write [default: MODEL stem + .calibrated.onnx, beside the input].")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON summary on stdout.")
def calibrate_command(model, data_path, batch_size, estimator, decay, output, as_json):
    """Recompute the statistics of every BatchNormalization in MODEL from data (training-mode semantics: each
    batch normalized by its own statistics) and write a model with the new running mean/var, ready to fold."""
    from .onnx.calibrate import calibrate_onnx, load_calibration_data
    from .onnx.io import load_model_with_info, save_model

    name = model.name[:-5] if model.name.lower().endswith(".onnx") else model.name
    output = output or model.with_name(f"{name}.calibrated.onnx")
    _check_output(output)
    original, external_data = load_model_with_info(model)
    data = load_calibration_data(data_path, original)
    bar = None  # started by the first finished batch: an error found before that is the only line on stderr

    def progress(done: int, total: int) -> None:
        nonlocal bar
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
    _log(f"wrote {output}")
    if as_json:
        click.echo(json.dumps({"input": str(model), "output": str(output), "estimator": estimator, **info}, indent=2))
    else:
        lines = [f"calibrated {len(info['layers'])} BatchNormalization nodes ({estimator})"]
        lines += [f"  {layer['bn']}: {layer['batches']} batches, {layer['values']} values per channel"
                  for layer in info["layers"]]
        lines += [f"note: {note}" for note in info["notes"]]
        lines.append(f"output: {output}")
        click.echo("\n".join(lines))
    sys.exit(ExitCode.OK)


@cli.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw per-layer distributions to this PNG.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration data to compare stored statistics with.")
def audit_command(path, as_json, plot, data):
    """Audit the BatchNorm statistics stored in PATH: an .onnx model, a PyTorch checkpoint (.pt/.pth/.ckpt, read
    with weights_only=True) or a .safetensors file. Exit 1 when a finding has error severity."""
    from .audit import audit, plot as draw

    if plot is not None:
        _check_output(plot)
    report = audit(path, data=data)
    _render(report, as_json, plot, draw)
    sys.exit(report.exit_code)


def _render(report, as_json: bool, plot, draw) -> None:
    """The PNG if asked for, then the report: JSON alone on stdout, or its summary lines."""
    if plot is not None:
        draw(report, plot)
        _log(f"wrote {plot}")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"bnfold: internal error: {type(exc).__name__}: {first} (set BNFOLD_DEBUG=1 for a traceback; "
                   "please report it)", err=True)
        sys.exit(ExitCode.INTERNAL_ERROR)


if __name__ == "__main__":
    main()
