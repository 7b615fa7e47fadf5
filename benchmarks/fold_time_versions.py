"""Is this checkout's fold of the small sample models slower than another version's? Timed side by side.

Run it from the repository root::

    git archive 5c82f7e | tar -x -C /tmp/base      # the version to compare against (any directory with bnfold/)
    python benchmarks/fold_time_versions.py /tmp/base
    python benchmarks/fold_time_versions.py /tmp/base resnet_small --rounds 60 --calls 10
    python benchmarks/fold_time_versions.py /tmp/base --skip merge-branches --skip merge-sequential  # fold alone

Each version runs in its own long-lived subprocess (its ``bnfold`` imported from its directory, the editable
install's import hook removed), so both share the machine's state of the moment. The parent asks them in turn
for ``--calls`` folds of one model (the order swapped every round); each call is timed as ``python_floor.py`` and
``peers.py`` time it: ``bnfold.onnx.fold.fold_onnx(copy, inplace=True)`` on a fresh ``CopyFrom`` copy, after
``gc.collect()``, both outside the timer. The timer is the thread's CPU time (``time.thread_time``): on a busy
machine the time a process waits for a core would otherwise swamp differences of a few percent. Every round's
minimum is one sample.

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
    import gc, hashlib, json, sys, time
    code = sys.argv[1]
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path.insert(0, code)
    import onnx
    import bnfold
    from bnfold.onnx.fold import fold_onnx
    assert bnfold.__file__.startswith(code), bnfold.__file__
    if len(sys.argv) > 3 and sys.argv[3]:  # rules to skip (this version only): fold_onnx with them left out
        import functools
        fold_onnx = functools.partial(fold_onnx, skip=sys.argv[3].split(","))
    models = {}
    for line in sys.stdin:
        name, calls = line.split()
        if name not in models:
            models[name] = onnx.load(sys.argv[2] + "/" + name + ".onnx")
        model = models[name]
        if calls == "digest":
            folded, _ = fold_onnx(model)
            print(hashlib.sha256(folded.SerializeToString()).hexdigest(), flush=True)
            continue
        times = []
        for _ in range(int(calls)):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            gc.collect()
            start = time.thread_time()
            fold_onnx(copy, inplace=True)
            times.append(time.thread_time() - start)
        print(json.dumps(times), flush=True)
""")


class Worker:
    def __init__(self, code: Path, skip: str = ""):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(code), str(ROOT / "sample_models"), skip],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, model: str, calls: str) -> str:
        self.proc.stdin.write(f"{model} {calls}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {model} died")
        return line.strip()

    def close(self) -> None:
        self.proc.stdin.close()
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
    args = parser.parse_args()
    workers = {"this": Worker(ROOT, ",".join(args.skip)), "other": Worker(args.other.resolve())}
    status = 0
    try:
        print(f"this: {ROOT}   other: {args.other.resolve()}   {args.rounds} rounds x {args.calls} calls")
        print(f"{'model':<24}{'this ms':>9}{'spread':>8}{'other ms':>10}{'spread':>8}{'this/other':>12}"
              f"{'paired p10-p90':>17}  bytes")
        for model in args.models:
            same = workers["this"].ask(model, "digest") == workers["other"].ask(model, "digest")
            status |= not same
            for worker in workers.values():  # warm-up: imports done, caches filled
                worker.ask(model, str(args.calls))
            minima: dict[str, list[float]] = {"this": [], "other": []}
            for r in range(args.rounds):
                for key in (("this", "other") if r % 2 == 0 else ("other", "this")):
                    minima[key].append(min(json.loads(workers[key].ask(model, str(args.calls)))))
            this, other = (statistics.median(minima[k]) for k in ("this", "other"))
            paired = [a / b for a, b in zip(minima["this"], minima["other"])]
            p = statistics.quantiles(paired, n=10)
            print(f"{model:<24}{this * 1e3:>9.3f}{spread(minima['this']):>8.1%}{other * 1e3:>10.3f}"
                  f"{spread(minima['other']):>8.1%}{this / other:>12.3f}{p[0]:>8.3f}-{p[-1]:.3f}"
                  f"  {'same' if same else 'DIFFER'}")
    finally:
        for worker in workers.values():
            worker.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
