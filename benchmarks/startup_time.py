"""How fast does the ``bnfold`` command answer ``--version`` and ``--help``?

Run it from the repository root, with the environment where bnfold is installed::

    python benchmarks/startup_time.py              # 15 rounds
    python benchmarks/startup_time.py --repeat 30

What it measures, all in one run: fresh processes of this Python running

* ``pass`` (the interpreter's own start, the floor);
* ``import bnfold`` (lazy: it loads neither onnx, numpy, onnxruntime nor torch);
* ``bnfold --version`` and ``bnfold --help`` (the installed entry point's code: ``bnfold.cli.main``);
* ``import onnx`` (what ``import bnfold`` used to pay for, for scale).

Each round runs every command once, in an order that rotates from round to round (drift on a noisy machine hits
all alike); medians are compared. The bar: ``bnfold --version`` and ``--help`` under 0.5 s (median), printed also
as a ratio over the bare interpreter start. Exit status 0 when the bar passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BAR_S = 0.5
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import bnfold": ["-c", "import bnfold"],
    "bnfold --version": ["-c", "from bnfold.cli import main; main(['--version'])"],
    "bnfold --help": ["-c", "from bnfold.cli import main; main(['--help'])"],
    "import onnx": ["-c", "import onnx"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds (default 15)")
    args = parser.parse_args(argv)
    names = list(COMMANDS)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # one untimed round: file-system caches warm for everyone
        subprocess.run([sys.executable, *COMMANDS[name]], capture_output=True, check=True)
    for round_index in range(args.repeat):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            subprocess.run([sys.executable, *COMMANDS[name]], capture_output=True, check=True)
            samples[name].append(time.perf_counter() - start)
    floor = statistics.median(samples["python -c pass"])
    print(f"{'command':20s} {'median s':>9s} {'min s':>7s} {'/ python start':>15s}")
    for name in names:
        median = statistics.median(samples[name])
        print(f"{name:20s} {median:9.3f} {min(samples[name]):7.3f} {median / floor:14.2f}x")
    worst = max(statistics.median(samples[n]) for n in ("bnfold --version", "bnfold --help"))
    passed = worst < BAR_S
    print(f"bar: bnfold --version and --help < {BAR_S} s: {worst:.3f} s, {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
