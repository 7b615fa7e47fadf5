"""How much memory do verifying, and folding with verification, take for a model with external data, next to the
weights' size?

Run it from the repository root::

    python benchmarks/verify_memory.py             # the 2.2 GB model of large_model.py (~7 GB of free disk)
    python benchmarks/verify_memory.py --quick     # 0.25 GB: smoke run, bar reported but not enforced
    python benchmarks/verify_memory.py --gb 1

What it does, in one run:

* Builds the model of ``benchmarks/large_model.py`` (N blocks Conv 512->512 3x3 -> BatchNormalization -> Relu,
  weights in external data) and folds it with ``bnfold.onnx.fold.fold_file`` (what ``bnfold --no-verify`` does),
  under ``benchmarks/_work/verify_memory/`` (git-ignored, removed at the end unless ``--keep``).
* In a fresh ``python -c`` process that imports everything first, reads VmRSS from /proc/self/status, then runs
  ``bnfold.verify(model.onnx, folded.onnx, providers="cpu")`` (original, two perturbed copies and the candidate,
  one session after another, sessions created from the files) and reads VmHWM, the peak resident set.
  **Bar: (peak - RSS after imports) / weights' size <= 2.5.**
* The same way, ``bnfold MODEL`` end to end: ``bnfold.fold_path(model.onnx, out.onnx, providers=["cpu"])`` (load
  lazily, fold, save the folded model beside the output, verify the two files, rename into place). Its output must
  be byte-identical to the ``--no-verify`` fold's. **Bar: the same 2.5.**
* For comparison, the floor measured the same way: one onnxruntime session of the original model created from its
  file and run once (what the runtime itself needs for one model; no bar).

Prints one table and the verdict. Exit 0 when the bar passes and the fold verified, 1 otherwise (``--quick``: the
bar is reported, the verdict still enforced).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "_work" / "verify_memory"
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from large_model import WEIGHT_BYTES, build  # noqa: E402

from bnfold.onnx.io import data_file  # noqa: E402

BAR = 2.5

_MEASURE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import numpy, onnx, onnxruntime  # noqa: F401 - everything imported before the baseline
    import bnfold, bnfold.verify, bnfold.ort, bnfold.onnx.external, bnfold.pipeline  # noqa: F401
    import bnfold.audit, bnfold.onnx.fold, bnfold.onnx.io  # noqa: F401
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    src, dst, what = sys.argv[1], sys.argv[2], sys.argv[3]
    result = {{}}
    if what == "verify":
        report = bnfold.verify(src, dst, providers="cpu")
        result["passed"] = report.passed
        result["summary"] = report.summary_lines()
    elif what == "pipeline":
        folded = bnfold.fold_path(src, dst, providers=["cpu"])
        result["passed"] = folded.passed and folded.written
        result["summary"] = folded.verification.summary_lines()
    else:
        import numpy as np
        from bnfold import ort as ortlib
        with ortlib.open_session(src, ortlib.session_options("disabled")) as (sess, _):
            sess.run(None, {{"x": np.zeros((1, 512, 4, 4), np.float32)}})
    result.update(base=base, peak=status("VmHWM"))
    print(json.dumps(result))
""")


def measure(what: str, src: Path, dst: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE.format(root=str(ROOT)), str(src), str(dst), what],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weights' size in GB [2.2]")
    parser.add_argument("--quick", action="store_true", help="0.25 GB, bar reported but not enforced")
    parser.add_argument("--keep", action="store_true", help="keep the work files")
    args = parser.parse_args()
    gb = 0.25 if args.quick else args.gb
    blocks = max(1, math.ceil(gb * 1e9 / WEIGHT_BYTES))

    from bnfold.onnx.fold import fold_file

    shutil.rmtree(WORK, ignore_errors=True)
    try:
        src, weight_bytes = build(WORK / "model", blocks)
        dst = WORK / "folded" / "folded.onnx"
        dst.parent.mkdir(parents=True)
        start = time.perf_counter()
        fold_file(src, dst)
        fold_s = time.perf_counter() - start
        floor = measure("session", src, dst)
        verified = measure("verify", src, dst)
        piped = WORK / "pipeline" / "folded.onnx"
        piped.parent.mkdir()
        pipeline = measure("pipeline", src, piped)
        same_bytes = all(filecmp.cmp(a, b, shallow=False) for a, b in
                         ((dst, piped), (data_file(dst), data_file(piped))))
        leftovers = sorted(p.name for p in piped.parent.iterdir() if p not in (piped, data_file(piped)))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)

    gib = 1 << 30
    ratio = (verified["peak"] - verified["base"]) / weight_bytes
    floor_ratio = (floor["peak"] - floor["base"]) / weight_bytes
    pipeline_ratio = (pipeline["peak"] - pipeline["base"]) / weight_bytes
    passed_bar = ratio <= BAR and pipeline_ratio <= BAR
    print(f"model: {blocks} blocks Conv 512->512 3x3 -> BN -> Relu, weights {weight_bytes / gib:.2f} GiB external")
    print(f"{'measurement':<44} {'value':>12} {'bar':>8}  result")
    print(f"{'fold (fold_file), s':<44} {fold_s:>12.1f}")
    print(f"{'verify (4 sessions, one after another), s':<44} {verified['seconds']:>12.1f}")
    print(f"{'one onnxruntime session: peak / weights':<44} {floor_ratio:>12.2f}")
    print(f"{'bnfold.verify: peak / weights':<44} {ratio:>12.2f} {'<= ' + str(BAR):>8}  "
          f"{'PASS' if passed_bar else 'FAIL'}{' (not enforced: --quick)' if args.quick else ''}")
    print(f"{'bnfold.verify: peak above imports, GiB':<44} {(verified['peak'] - verified['base']) / gib:>12.2f}")
    print(f"{'bnfold MODEL (fold_path, verified), s':<44} {pipeline['seconds']:>12.1f}")
    print(f"{'bnfold MODEL: peak / weights':<44} {pipeline_ratio:>12.2f} {'<= ' + str(BAR):>8}  "
          f"{'PASS' if pipeline_ratio <= BAR else 'FAIL'}{' (not enforced: --quick)' if args.quick else ''}")
    print(f"{'bnfold MODEL: output = --no-verify output':<44} {str(same_bytes):>12} {'True':>8}  "
          f"{'PASS' if same_bytes else 'FAIL'}")
    print(f"{'bnfold MODEL: files left beside the output':<44} {len(leftovers):>12} {'0':>8}  "
          f"{'PASS' if not leftovers else 'FAIL'}")
    print("\n".join(verified["summary"]))
    ok = (verified["passed"] and pipeline["passed"] and same_bytes and not leftovers
          and (passed_bar or args.quick))
    print("result:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
