"""Prove a refactor changed nothing: fold a fixed corpus with two versions of bnfold and compare the bytes.

Run it from the repository root::

    python benchmarks/fold_identity.py corpus benchmarks/_work/identity/corpus --examples 300
    python benchmarks/fold_identity.py fold benchmarks/_work/identity/corpus after.json
    python benchmarks/fold_identity.py fold benchmarks/_work/identity/corpus before.json --code /tmp/old-checkout
    python benchmarks/fold_identity.py compare before.json after.json
    python benchmarks/fold_identity.py fold benchmarks/_work/identity/corpus after.json \
        --skip merge-branches --skip merge-sequential      # the fold alone, against a version without merges
    python benchmarks/fold_identity.py compare before.json after.json --bytes-only

``corpus`` writes the sample models and ``--examples`` fuzz models (tests/fuzz_graphs.fuzz_cases, hypothesis seed
``--seed``) as plain .onnx files. ``fold`` folds each one in memory (``fold_onnx``) and file to file
(``fold_file``) and records the SHA-256 of the folded bytes and of the report (skip reason codes left out, so that
a version without them compares); ``--code DIR`` runs the bnfold found in DIR instead of the installed one (for
example ``git archive <commit> | tar -x -C DIR``); ``--skip RULE`` leaves rules out (for example the branch merges,
to compare the fold with a version that has none). ``compare`` prints every model whose bytes or report differ
(``--bytes-only``: bytes, for versions whose reports have different keys) and exits 1 if there is one, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_code(directory: str) -> None:
    """Import bnfold from ``directory``: an editable install's import hook would otherwise win over sys.path."""
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path.insert(0, str(Path(directory).resolve()))


def make_corpus(out: Path, examples: int, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    sys.path.insert(0, str(ROOT / "tests"))
    import fuzz_graphs

    out.mkdir(parents=True, exist_ok=True)
    for sample in sorted((ROOT / "sample_models").glob("*.onnx")):
        shutil.copy(sample, out / f"sample-{sample.name}")
    count = 0

    @hypothesis_seed(seed)
    @settings(max_examples=examples, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_graphs.fuzz_cases(max_blocks=8))
    def write(case):
        nonlocal count
        (out / f"fuzz-{count:05d}.onnx").write_bytes(case.model.SerializeToString())
        count += 1

    write()
    print(f"{count} fuzz models and the samples in {out}")


def fold_corpus(corpus: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
    import onnx

    import bnfold
    from bnfold.onnx.fold import fold_file, fold_onnx

    print(f"bnfold from {Path(bnfold.__file__).parent}", file=sys.stderr)
    options = {"skip": skip} if skip else {}  # a version without the option is called as it always was
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(corpus.glob("*.onnx")):
            entry = {}
            try:
                model, report = fold_onnx(onnx.load(path), **options)
                entry["memory"] = hashlib.sha256(model.SerializeToString()).hexdigest()
                entry["report"] = _report_hash(report)
            except Exception as exc:  # noqa: BLE001 - a refusal by exception must stay the same too
                entry["memory"] = f"{type(exc).__name__}: {exc}"
            target = Path(tmp) / "folded.onnx"
            try:
                report = fold_file(path, target, **options)
                entry["file"] = hashlib.sha256(target.read_bytes()).hexdigest()
                entry["file_report"] = _report_hash(report)
            except Exception as exc:  # noqa: BLE001
                entry["file"] = f"{type(exc).__name__}: {exc}"
            results[path.name] = entry
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{len(results)} models folded, hashes in {out}")


def _report_hash(report) -> str:
    d = report.to_dict()
    for skip in d["skipped"]:
        skip.pop("code", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def compare(before: Path, after: Path, bytes_only: bool = False) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    if bytes_only:
        a, b = ({name: {k: v for k, v in entry.items() if k in ("memory", "file")} for name, entry in d.items()}
                for d in (a, b))
    differ = [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    for name in differ:
        print(f"DIFFERS {name}: {a.get(name)} vs {b.get(name)}")
    print(f"{len(a)} vs {len(b)} models, {len(differ)} differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("corpus")
    p.add_argument("out", type=Path)
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("fold")
    p.add_argument("corpus", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--code", help="directory holding the bnfold package to run")
    p.add_argument("--skip", action="append", default=[], help="a rule to leave out (repeatable)")
    p = sub.add_parser("compare")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--bytes-only", action="store_true", help="compare the folded bytes, not the reports")
    args = parser.parse_args(argv)
    if args.command == "corpus":
        make_corpus(args.out, args.examples, args.seed)
    elif args.command == "fold":
        if args.code:
            _use_code(args.code)
        fold_corpus(args.corpus, args.out, tuple(args.skip))
    else:
        return compare(args.before, args.after, args.bytes_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
