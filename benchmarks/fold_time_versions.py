"""Is this checkout's fold of the small sample models slower than another version's? Timed side by side.

Run it from the repository root::

    git archive 5c82f7e | tar -x -C /tmp/base      # the version to compare against (any directory with bnfold/)
    python benchmarks/fold_time_versions.py /tmp/base
    python benchmarks/fold_time_versions.py /tmp/base resnet_small --rounds 60 --calls 10
    python benchmarks/fold_time_versions.py /tmp/base --skip merge-branches --skip merge-sequential  # fold alone
    python benchmarks/fold_time_versions.py /tmp/base --in-process --rounds 60   # both in one process: tighter
    python benchmarks/fold_time_versions.py /tmp/base --in-process --file        # fold_file, file to file

Each version runs in its own long-lived subprocess (its ``bnfold`` imported from its directory, the editable
install's import hook removed), so both share the machine's state of the moment. The parent asks them in turn
for ``--calls`` folds of one model (the order swapped every round); each call is timed as ``python_floor.py`` and
``peers.py`` time it: ``bnfold.onnx.fold.fold_onnx(copy, inplace=True)`` on a fresh ``CopyFrom`` copy, after
``gc.collect()``, both outside the timer, with what was imported and loaded before the timed calls frozen out of
the collector's way (``gc.freeze()``, as peers.py does). The timer is the thread's CPU time
(``time.thread_time``): on a busy machine the time a process waits for a core would otherwise swamp differences
of a few percent. Every round's minimum is one sample. ``--cold`` leaves out the freeze: each ``gc.collect()``
then walks the whole heap and leaves the CPU caches cold for the fold that follows, a harsher regime than
peers.py's (about twice the time for a sub-millisecond fold). ``--file`` times ``bnfold.onnx.fold.fold_file(path,
out)`` instead, load, fold and save, as peers.py's file-to-file column does (the CPU time: a rename that waits for
the disk does not count), and compares the written files' bytes.

``--in-process`` runs both versions in one subprocess instead, imported side by side as two packages (symbolic
links named ``bnfold_this`` and ``bnfold_other`` in a temporary folder; the fold path's relative imports keep each
version to itself, and the worker stops with an error if a fold imports ``bnfold`` by its own name). Rounds then
alternate between the versions within one process, so both see the same heap, caches and clock: on a 2-core VM
the paired p10-p90 range narrows from about +-8 % to +-4 %, enough to see a difference of 2-3 %.

Printed per model: each version's median of the round minima and its spread (the 10th-90th percentile range of
those minima, relative to the median), the ratio of medians this/other, and the spread of the per-round ratios
(rounds are paired, so a load spike that hits both versions cancels). On a busy machine, trust the paired ratio.
Both versions' folded bytes are compared first (a speed-up that changes the output is no speed-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet_small", "mobilenet_small", "mlp_bn1d", "tcn1d", "decoder_convtranspose")

_WORKER = textwrap.dedent("""
    import gc, hashlib, json, os, sys, tempfile, time
    code = sys.argv[1]
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path.insert(0, code)
    import onnx
    import bnfold
    from bnfold.onnx.fold import fold_file, fold_onnx
    assert bnfold.__file__.startswith(code), bnfold.__file__
    freeze, file_mode = sys.argv[4] == "1", sys.argv[5] == "file"
    if sys.argv[3]:  # rules to skip (this version only): fold_onnx with them left out
        import functools
        fold_onnx = functools.partial(fold_onnx, skip=sys.argv[3].split(","))
        fold_file = functools.partial(fold_file, skip=sys.argv[3].split(","))
    out = os.path.join(tempfile.mkdtemp(), "folded.onnx")
    models = {}
    for line in sys.stdin:
        name, calls = line.split()
        if name not in models:
            models[name] = onnx.load(sys.argv[2] + "/" + name + ".onnx")
        model = models[name]
        path = sys.argv[2] + "/" + name + ".onnx"
        if calls == "digest":
            if file_mode:
                fold_file(path, out)
                with open(out, "rb") as f:
                    print(hashlib.sha256(f.read()).hexdigest(), flush=True)
            else:
                print(hashlib.sha256(fold_onnx(model)[0].SerializeToString()).hexdigest(), flush=True)
            if freeze:  # everything loaded so far is out of the collector's way, as in peers.py
                gc.collect()
                gc.freeze()
            continue
        times = []
        for _ in range(int(calls)):
            if file_mode:
                gc.collect()
                start = time.thread_time()
                fold_file(path, out)
            else:
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                gc.collect()
                start = time.thread_time()
                fold_onnx(copy, inplace=True)
            times.append(time.thread_time() - start)
        print(json.dumps(times), flush=True)
""")


_IN_PROCESS_WORKER = textwrap.dedent("""
    import gc, hashlib, json, os, sys, tempfile, time
    this_code, other_code, models_dir, skip, freeze, mode = sys.argv[1:7]
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    packages = tempfile.mkdtemp()
    os.symlink(os.path.join(this_code, "bnfold"), os.path.join(packages, "bnfold_this"))
    os.symlink(os.path.join(other_code, "bnfold"), os.path.join(packages, "bnfold_other"))
    sys.path.insert(0, packages)
    import onnx
    from bnfold_this.onnx.fold import fold_file as file_this, fold_onnx as fold_this
    from bnfold_other.onnx.fold import fold_file as file_other, fold_onnx as fold_other
    folds = {"this": (fold_this, file_this, {"skip": skip.split(",")} if skip else {}),
             "other": (fold_other, file_other, {})}
    out_dir = tempfile.mkdtemp()

    def by_own_name():
        return {m for m in sys.modules if m == "bnfold" or m.startswith("bnfold.")}

    imported = by_own_name()  # (a package's __init__ may import bnfold absolutely, e.g. for verify: not folding)

    def own_names_only():
        if by_own_name() - imported:
            sys.exit("a fold imported bnfold by its own name, which mixes versions: run without --in-process")

    def best(key, model, path, calls):
        fold, fold_file, kwargs = folds[key]
        out = os.path.join(out_dir, key + ".onnx")
        times = []
        for _ in range(calls):
            if mode == "file":
                gc.collect()
                start = time.thread_time()
                fold_file(path, out, **kwargs)
            else:
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
                gc.collect()
                start = time.thread_time()
                fold(copy, inplace=True, **kwargs)
            times.append(time.thread_time() - start)
        return min(times)

    def digest(key, model, path):
        fold, fold_file, kwargs = folds[key]
        if mode != "file":
            return hashlib.sha256(fold(model, **kwargs)[0].SerializeToString()).hexdigest()
        out = os.path.join(out_dir, key + ".onnx")
        fold_file(path, out, **kwargs)
        with open(out, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    for line in sys.stdin:
        name, rounds, calls = line.split()
        path = os.path.join(models_dir, name + ".onnx")
        model = onnx.load(path)
        digests = {key: digest(key, model, path) for key in folds}
        own_names_only()
        minima = {"this": [], "other": []}
        for key in minima:  # warm-up
            best(key, model, path, int(calls))
        if freeze == "1":  # everything loaded so far is out of the collector's way, as in peers.py
            gc.collect()
            gc.freeze()
        for r in range(int(rounds)):
            for key in (("this", "other") if r % 2 == 0 else ("other", "this")):
                minima[key].append(best(key, model, path, int(calls)))
        own_names_only()
        print(json.dumps({"same": digests["this"] == digests["other"], **minima}), flush=True)
""")


class Worker:
    def __init__(self, code: Path, skip: str, freeze: bool, mode: str):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(code), str(ROOT / "sample_models"), skip,
                                      "1" if freeze else "0", mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, model: str, calls: str) -> str:
        self.proc.stdin.write(f"{model} {calls}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {model} died")
        return line.strip()

    @property
    def stdin(self):
        return self.proc.stdin

    def wait(self) -> None:
        self.proc.wait()


def spread(values: list[float]) -> float:
    """10th-90th percentile range over the median."""
    deciles = statistics.quantiles(values, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="directory holding the other version's bnfold/ package")
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"sample models [{' '.join(MODELS)}]")
    parser.add_argument("--rounds", type=int, default=40, help="paired rounds per model [40]")
    parser.add_argument("--calls", type=int, default=10, help="folds per version per round; the minimum counts [10]")
    parser.add_argument("--skip", action="append", default=[],
                        help="a rule this checkout leaves out (repeatable): e.g. the branch merges, to time the fold "
                             "alone against a version without them")
    parser.add_argument("--in-process", action="store_true",
                        help="both versions in one process, side by side (tighter pairs; see the module text)")
    parser.add_argument("--file", action="store_true",
                        help="time fold_file (load, fold, save a file) instead of fold_onnx in memory")
    parser.add_argument("--cold", action="store_true",
                        help="no gc.freeze(): every gc.collect() walks the whole heap (harsher than peers.py)")
    args = parser.parse_args()
    skip = ",".join(args.skip)
    freeze, mode = not args.cold, "file" if args.file else "memory"
    if args.in_process:
        workers = {"both": subprocess.Popen([sys.executable, "-c", _IN_PROCESS_WORKER, str(ROOT),
                                             str(args.other.resolve()), str(ROOT / "sample_models"), skip,
                                             "1" if freeze else "0", mode],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)}
    else:
        workers = {"this": Worker(ROOT, skip, freeze, mode), "other": Worker(args.other.resolve(), "", freeze, mode)}
    status = 0
    try:
        print(f"this: {ROOT}   other: {args.other.resolve()}   {args.rounds} rounds x {args.calls} calls"
              f"{'   (one process)' if args.in_process else ''}{'   (cold: no gc.freeze)' if args.cold else ''}"
              f"{'   (fold_file, file to file)' if args.file else ''}")
        print(f"{'model':<24}{'this ms':>9}{'spread':>8}{'other ms':>10}{'spread':>8}{'this/other':>12}"
              f"{'paired p10-p90':>17}  bytes")
        for model in args.models:
            if args.in_process:
                minima, same = _in_process_minima(workers["both"], model, args.rounds, args.calls)
            else:
                minima, same = _two_process_minima(workers, model, args.rounds, args.calls)
            status |= not same
            this, other = (statistics.median(minima[k]) for k in ("this", "other"))
            paired = [a / b for a, b in zip(minima["this"], minima["other"])]
            p = statistics.quantiles(paired, n=10)
            print(f"{model:<24}{this * 1e3:>9.3f}{spread(minima['this']):>8.1%}{other * 1e3:>10.3f}"
                  f"{spread(minima['other']):>8.1%}{this / other:>12.3f}{p[0]:>8.3f}-{p[-1]:.3f}"
                  f"  {'same' if same else 'DIFFER'}")
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return status


def _two_process_minima(workers: dict, model: str, rounds: int, calls: int) -> tuple[dict, bool]:
    same = workers["this"].ask(model, "digest") == workers["other"].ask(model, "digest")
    for worker in workers.values():  # warm-up: imports done, caches filled
        worker.ask(model, str(calls))
    minima: dict[str, list[float]] = {"this": [], "other": []}
    for r in range(rounds):
        for key in (("this", "other") if r % 2 == 0 else ("other", "this")):
            minima[key].append(min(json.loads(workers[key].ask(model, str(calls)))))
    return minima, same


def _in_process_minima(worker: subprocess.Popen, model: str, rounds: int, calls: int) -> tuple[dict, bool]:
    worker.stdin.write(f"{model} {rounds} {calls}\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f"worker for {model} died")
    answer = json.loads(line)
    return {"this": answer["this"], "other": answer["other"]}, answer["same"]


if __name__ == "__main__":
    sys.exit(main())
