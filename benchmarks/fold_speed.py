"""How fast, and how lean, is folding a large ONNX model compared with just loading and saving it?

Run it from the repository root::

    python benchmarks/fold_speed.py            # full size (about 2-3 minutes), exit 0 only if every bar passes
    python benchmarks/fold_speed.py --quick    # smoke run: small models, bars reported but not enforced
    python benchmarks/fold_speed.py --blocks 1000 --repeat 7
    python benchmarks/fold_speed.py --profile  # also cProfile one end-to-end fold of the main model

What it measures, all in one run:

* The model: N chained blocks ``Conv(32->32, 3x3, pad 1, bias) -> BatchNormalization -> Relu``, input
  ``[1, 32, 8, 8]`` float32, opset 17, built with ``onnx.helper`` from seeded numpy (BN statistics are non-trivial:
  var in [0.5, 2], mean ~ N(0, 0.1), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1)). N = 2,000 is about 75 MB. Models are
  written once per run under ``benchmarks/_work/`` (git-ignored) and removed at the end unless ``--keep``.
* "end-to-end fold": ``bnfold.onnx.fold.fold_file(path, out)`` (load, fold, save; what ``bnfold --no-verify`` does),
  no verification. "floor": ``onnx.load(path)`` -> ``onnx.save(model, out)`` of the same file, the least any tool
  that rewrites the file must spend. Every timed run starts from the file on disk.
* Ratio A = fold(N) / floor(N), bar <= 1.5. One warm-up each, then ``--repeat`` runs interleaved
  (floor, fold, floor, fold, ...); medians are compared.
* Ratio B = fold(5,000 blocks) / fold(500 blocks), bar <= 12 (10x the model: linear scaling plus slack).
  Interleaved too, after a warm-up each.
* Peak memory: the end-to-end fold of the main model in a fresh ``python -c`` subprocess that imports everything
  first, reads VmRSS from /proc/self/status, folds, then reads VmHWM; (VmHWM - VmRSS after imports) divided by the
  file size, bar <= 2.5. The floor is measured the same way for comparison (no bar). The same model in float16
  folded with the merge rules on and off (skipped): peak memory on / off, bar <= 1.1 (16-bit models keep float64
  values of folded weights for the merges to round once, only for the weights a merge may read: none here).
* Correctness, cheaply: the folded file has no BatchNormalization left and exactly 2N nodes (Conv, Relu); and, if
  onnxruntime is importable, a 20-block model gives the same output before and after folding.

Prints one table (measurement, value, bar, PASS/FAIL). Exit status 0 when every bar passes and the folded model
is correct, 1 otherwise. ``--quick`` reports the bars without enforcing them (correctness is still enforced).
Note that the floor's own peak memory is about 3x the file (upb's SerializeToString needs twice the file on top
of the model), so the 2.5x memory bar can only be met by a save that does not serialize the model in one piece.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's bnfold
    sys.path.insert(0, str(ROOT))

from bnfold.onnx.fold import fold_file, fold_onnx  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work"
CHANNELS, SPATIAL, OPSET = 32, 8, 17

BAR_TIME_RATIO = 1.5
BAR_SCALING = 12.0
BAR_MEMORY = 2.5
BAR_MEMORY_MERGING = 1.1


# ---- the synthetic model ------------------------------------------------------------------------------------

def build_model(blocks: int, seed: int = 0, dtype=np.float32) -> onnx.ModelProto:
    """``blocks`` x (Conv 3x3 with bias -> BatchNormalization -> Relu), chained (float32, or ``dtype``)."""
    rng = np.random.default_rng(seed)
    c = CHANNELS
    nodes, inits = [], []
    x = "input"
    std = np.sqrt(2.0 / (c * 9))  # He init keeps activations in range through long chains
    for i in range(blocks):
        w = (rng.standard_normal((c, c, 3, 3)) * std).astype(np.float32)
        b = (rng.standard_normal(c) * 0.1).astype(np.float32)
        gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta = (rng.standard_normal(c) * 0.1).astype(np.float32)
        mean = (rng.standard_normal(c) * 0.1).astype(np.float32)
        var = rng.uniform(0.5, 2.0, c).astype(np.float32)
        p = f"b{i}"
        for name, arr in ((f"{p}.w", w), (f"{p}.b", b), (f"{p}.gamma", gamma), (f"{p}.beta", beta),
                          (f"{p}.mean", mean), (f"{p}.var", var)):
            inits.append(numpy_helper.from_array(arr.astype(dtype), name))
        nodes.append(helper.make_node("Conv", [x, f"{p}.w", f"{p}.b"], [f"{p}.conv"], name=f"{p}_conv",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization",
                                      [f"{p}.conv", f"{p}.gamma", f"{p}.beta", f"{p}.mean", f"{p}.var"],
                                      [f"{p}.bn"], name=f"{p}_bn", epsilon=1e-5))
        y = "output" if i == blocks - 1 else f"{p}.relu"
        nodes.append(helper.make_node("Relu", [f"{p}.bn"], [y], name=f"{p}_relu"))
        x = y
    shape = [1, c, SPATIAL, SPATIAL]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, f"chain{blocks}", [helper.make_tensor_value_info("input", elem, shape)],
                              [helper.make_tensor_value_info("output", elem, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-benchmark")
    model.ir_version = 8
    return model


def write_model(blocks: int, dtype=np.float32) -> Path:
    path = WORK / f"chain{blocks}{'' if dtype == np.float32 else '_' + np.dtype(dtype).name}.onnx"
    model = build_model(blocks, dtype=dtype)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


# ---- what is timed ------------------------------------------------------------------------------------------

def run_floor(src: Path, out: Path) -> None:
    model = onnx.load(str(src))
    onnx.save(model, str(out))


def run_fold(src: Path, out: Path) -> None:
    fold_file(src, out)


def timed(fn, *args) -> float:
    gc.collect()  # the previous run's garbage is freed outside the clock
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def interleaved(cases: list[tuple[str, callable, tuple]], repeat: int) -> dict[str, list[float]]:
    """One warm-up each, then ``repeat`` rounds of every case in turn."""
    for _, fn, args in cases:
        fn(*args)
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(repeat):
        for name, fn, args in cases:
            times[name].append(timed(fn, *args))
    return times


# ---- peak memory in a fresh process -------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import numpy, onnx, onnx.numpy_helper, onnx.reference, onnx.shape_inference, onnx.external_data_helper
    from bnfold.onnx.fold import fold_file

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise SystemExit(f"no {key} in /proc/self/status")

    what, src, out = sys.argv[2:5]
    base = status("VmRSS")
    if what == "fold":
        fold_file(src, out)
    elif what == "fold-without-merges":
        fold_file(src, out, skip=("merge-branches", "merge-sequential"))
    else:
        model = onnx.load(src)
        onnx.save(model, out)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


def peak_memory(what: str, src: Path, out: Path) -> tuple[int, int]:
    """(RSS after imports, peak RSS) in bytes of a fresh interpreter running ``what`` once."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(ROOT), what, str(src), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe '{what}' failed:\n{proc.stderr.strip()}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["base"], data["peak"]


# ---- correctness -----------------------------------------------------------------------------------------------

def check_folded_file(path: Path, blocks: int) -> str:
    """'' when the folded file has no BatchNormalization and 2 nodes per block, else what is wrong."""
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    bn = ops.count("BatchNormalization")
    if bn:
        return f"{bn} BatchNormalization nodes left"
    if len(ops) != 2 * blocks or ops.count("Conv") != blocks or ops.count("Relu") != blocks:
        return f"expected {blocks} Conv + {blocks} Relu, got {len(ops)} nodes"
    if len(model.graph.initializer) != 2 * blocks:
        return f"expected {2 * blocks} initializers (weight, bias per Conv), got {len(model.graph.initializer)}"
    return ""


def check_numerics(blocks: int = 20) -> str:
    """'' when onnxruntime gives the same output before and after folding a small chain; 'skipped' without ort."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "skipped (no onnxruntime)"
    model = build_model(blocks, seed=1)
    folded, _ = fold_onnx(model)
    x = np.random.default_rng(2).standard_normal((1, CHANNELS, SPATIAL, SPATIAL)).astype(np.float32)
    outs = []
    for m in (model, folded):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ort must not fold BN itself
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input": x})[0])
    err = float(np.max(np.abs(outs[0] - outs[1])))
    scale = float(np.max(np.abs(outs[0]))) or 1.0
    if err > 1e-4 * scale + 1e-5:
        return f"outputs differ after folding: max |diff| {err:.3g} (output scale {scale:.3g})"
    return ""


# ---- the run ---------------------------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=None, help="blocks in the main model (default 2000; 200 quick)")
    parser.add_argument("--small", type=int, default=None, help="small model of ratio B (default 500; 50 quick)")
    parser.add_argument("--large", type=int, default=None, help="large model of ratio B (default 5000; 500 quick)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs of each case (default 5; 3 quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run; no bars enforced")
    parser.add_argument("--profile", action="store_true", help="also cProfile one end-to-end fold of the main model")
    parser.add_argument("--keep", action="store_true", help="keep the generated models in benchmarks/_work/")
    args = parser.parse_args(argv)
    quick = args.quick
    blocks = args.blocks or (200 if quick else 2000)
    small = args.small or (50 if quick else 500)
    large = args.large or (500 if quick else 5000)
    repeat = args.repeat or (3 if quick else 5)
    if min(blocks, small, large, repeat) < 1:
        parser.error("sizes and --repeat must be positive")

    WORK.mkdir(parents=True, exist_ok=True)
    paths: dict = {}
    out_fold, out_floor, out_b = WORK / "out_fold.onnx", WORK / "out_floor.onnx", WORK / "out_scaling.onnx"
    try:
        failures = _bench(args, quick, blocks, small, large, repeat, paths, out_fold, out_floor, out_b)
    finally:
        if not args.keep:
            for p in list(paths.values()) + [out_fold, out_floor, out_b]:
                p.unlink(missing_ok=True)
            for leftover in WORK.glob(".out_*.tmp"):  # save_model's temporary folders, should a run have died
                shutil.rmtree(leftover, ignore_errors=True)
    return 1 if failures else 0


def _bench(args, quick: bool, blocks: int, small: int, large: int, repeat: int, paths: dict[int, Path],
           out_fold: Path, out_floor: Path, out_b: Path) -> int:
    t0 = time.perf_counter()
    for n in sorted({blocks, small, large}):
        paths[n] = write_model(n)
    main_path = paths[blocks]
    size = main_path.stat().st_size
    print(f"models written in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{n} blocks = {_mb(p.stat().st_size)}" for n, p in paths.items()), flush=True)
    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs; medians of {repeat} interleaved runs after one warm-up each", flush=True)

    rows: list[tuple[str, str, str, str]] = []  # measurement, value, bar, verdict
    failures = 0

    def verdict(ok: bool) -> str:
        nonlocal failures
        if quick:
            return "pass" if ok else "fail (not enforced)"
        failures += not ok
        return "PASS" if ok else "FAIL"

    # Ratio A: fold vs load+save of the same file.
    times = interleaved([("floor", run_floor, (main_path, out_floor)),
                         ("fold", run_fold, (main_path, out_fold))], repeat)
    floor_t, fold_t = statistics.median(times["floor"]), statistics.median(times["fold"])
    ratio_a = fold_t / floor_t
    spread = lambda ts: f"(min {min(ts):.3f}, max {max(ts):.3f})"  # noqa: E731
    rows.append((f"floor: onnx.load + onnx.save, {blocks} blocks", f"{floor_t:.3f} s {spread(times['floor'])}", "", ""))
    rows.append((f"end-to-end fold, {blocks} blocks", f"{fold_t:.3f} s {spread(times['fold'])}", "", ""))
    rows.append(("A: fold / floor", f"{ratio_a:.2f}x", f"<= {BAR_TIME_RATIO}", verdict(ratio_a <= BAR_TIME_RATIO)))
    print(f"ratio A done ({time.perf_counter() - t0:.0f} s)", flush=True)

    # Correctness of the file the last timed fold wrote.
    problem = check_folded_file(out_fold, blocks)
    rows.append((f"folded {blocks}-block file: BatchNormalization left", problem or "0 (2N nodes, 2N initializers)",
                 "0", "PASS" if not problem else "FAIL"))
    failures += bool(problem)
    problem = check_numerics()
    if problem.startswith("skipped"):
        rows.append(("onnxruntime, 20 blocks: folded == original", problem, "", ""))
    else:
        rows.append(("onnxruntime, 20 blocks: folded == original", problem or "max diff within 1e-4",
                     "same", "PASS" if not problem else "FAIL"))
        failures += bool(problem)

    # Ratio B: scaling from small to large.
    times = interleaved([("small", run_fold, (paths[small], out_b)),
                         ("large", run_fold, (paths[large], out_b))], repeat)
    small_t, large_t = statistics.median(times["small"]), statistics.median(times["large"])
    ratio_b = large_t / small_t
    rows.append((f"end-to-end fold, {small} blocks", f"{small_t:.3f} s {spread(times['small'])}", "", ""))
    rows.append((f"end-to-end fold, {large} blocks", f"{large_t:.3f} s {spread(times['large'])}", "", ""))
    rows.append((f"B: fold {large} / fold {small} ({large / small:g}x the model)", f"{ratio_b:.2f}x",
                 f"<= {BAR_SCALING * (large / small) / 10:g}", verdict(ratio_b <= BAR_SCALING * (large / small) / 10)))
    print(f"ratio B done ({time.perf_counter() - t0:.0f} s)", flush=True)

    # Peak memory in fresh processes.
    base_f, peak_f = peak_memory("fold", main_path, out_fold)
    base_l, peak_l = peak_memory("floor", main_path, out_floor)
    mem_fold, mem_floor = (peak_f - base_f) / size, (peak_l - base_l) / size
    rows.append((f"file size, {blocks} blocks", _mb(size), "", ""))
    rows.append(("peak RSS - post-import RSS, floor", f"{_mb(peak_l - base_l)} = {mem_floor:.2f}x file", "", ""))
    rows.append(("peak RSS - post-import RSS, fold", f"{_mb(peak_f - base_f)} = {mem_fold:.2f}x file",
                 f"<= {BAR_MEMORY}", verdict(mem_fold <= BAR_MEMORY)))
    # A float16 model keeps float64 values of folded weights for the merges to round once; only those a merge may
    # read (none here), so its fold needs no more memory with the merge rules on than off.
    path16 = paths["float16"] = write_model(blocks, np.float16)
    base_m, peak_m = peak_memory("fold", path16, out_fold)
    base_n, peak_n = peak_memory("fold-without-merges", path16, out_fold)
    ratio_m = (peak_m - base_m) / (peak_n - base_n)
    rows.append((f"float16 {blocks} blocks ({_mb(path16.stat().st_size)}): fold memory, merge rules on / off",
                 f"{_mb(peak_m - base_m)} / {_mb(peak_n - base_n)} = {ratio_m:.2f}x", f"<= {BAR_MEMORY_MERGING}",
                 verdict(ratio_m <= BAR_MEMORY_MERGING)))

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print()
    print(f"{'measurement':<{width}}  {'value':<{vwidth}}  {'bar':<8}  result")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 8}  ------")
    for name, value, bar, result in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {bar:<8}  {result}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; "
          + (f"{failures} FAILED" if failures else "quick run: bars not enforced" if quick else "all bars pass"))

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(run_fold, main_path, out_fold)
        for key in ("cumulative", "tottime"):
            print(f"\n---- cProfile of one end-to-end fold, {blocks} blocks, by {key} ----")
            pstats.Stats(prof).sort_stats(key).print_stats(25)

    return failures


if __name__ == "__main__":
    sys.exit(main())
