"""Does bnfold fold a model whose weights are larger than 2 GB, in external data, without holding them in memory?

Run it from the repository root::

    python benchmarks/large_model.py              # 2.2 GB of weights (needs ~5 GB of free disk, a few minutes)
    python benchmarks/large_model.py --quick      # 0.25 GB: smoke run, bar reported but not enforced
    python benchmarks/large_model.py --gb 4 --compare-eager

What it does, in one run:

* Builds the model without ever holding it: N blocks ``Conv(512->512, 3x3, pad 1, bias) -> BatchNormalization ->
  Relu`` (9.4 MB of float32 weight per Conv, N = ceil(size / 9.4 MB)), input ``[1, 512, 4, 4]``, opset 17. Each
  weight is drawn from a seeded generator and appended to ``model.onnx.data``; the protobuf only holds the
  references, the biases and the BN parameters (small, inline). Work files live under ``benchmarks/_work/``
  (git-ignored) and are removed at the end unless ``--keep``.
* Folds it end to end with ``bnfold.onnx.fold.fold_file(model.onnx, folded.onnx)`` (what ``bnfold --no-verify``
  runs) in a fresh ``python -c`` process that imports everything first, reads VmRSS from /proc/self/status,
  folds, then reads VmHWM (the peak resident set). **Bar: peak - RSS after imports < the weights' size** (the
  issue: never two full copies; memory-map or stream). With ``--compare-eager`` the same measurement is made for
  ``onnx.load`` (external data loaded) + ``onnx.save`` with external data, the floor of any tool that loads the
  whole model (no bar).
* Checks the result without trusting bnfold: no BatchNormalization left, the output's weights are in external data
  beside it, and for 8 blocks spread over the model the folded weight and bias are recomputed here in float64
  numpy from the original files (W * gamma/sqrt(var+eps) per output channel, (b - mean) * scale + beta), rounded
  once to float32, and compared bit for bit with what bnfold wrote.

Prints one table (measurement, value, bar, PASS/FAIL). Exit 0 when the bar passes and the checks pass, 1
otherwise (``--quick``: the bar is reported, the checks are still enforced).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "_work" / "large_model"
CHANNELS, SPATIAL, KERNEL, OPSET = 512, 4, 3, 17
EPS = 1e-5
WEIGHT_BYTES = CHANNELS * CHANNELS * KERNEL * KERNEL * 4


def build(directory: Path, blocks: int, seed: int = 0) -> tuple[Path, int]:
    """Write model.onnx + model.onnx.data block by block; return the model path and the weight bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    data_name = "model.onnx.data"
    nodes, inits = [], []
    x = "x"
    offset = 0
    with open(directory / data_name, "wb") as data:
        for i in range(blocks):
            rng = np.random.default_rng([seed, i])
            w = (rng.standard_normal((CHANNELS, CHANNELS, KERNEL, KERNEL), dtype=np.float32)
                 / np.float32(math.sqrt(CHANNELS * KERNEL * KERNEL)))
            data.write(w.tobytes())
            tensor = TensorProto(name=f"b{i}.w", data_type=TensorProto.FLOAT, dims=w.shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += w.nbytes
            del w
            inits.append(tensor)
            inits.append(numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), f"b{i}.b"))
            for role, value in (("gamma", rng.uniform(0.5, 1.5, CHANNELS)), ("beta", rng.normal(0, 0.1, CHANNELS)),
                                ("mean", rng.normal(0, 0.1, CHANNELS)), ("var", rng.uniform(0.5, 2.0, CHANNELS))):
                inits.append(numpy_helper.from_array(value.astype(np.float32), f"b{i}.{role}"))
            conv, bn, relu = f"b{i}.conv", f"b{i}.bn", f"b{i}.relu"
            nodes.append(helper.make_node("Conv", [x, f"b{i}.w", f"b{i}.b"], [conv], name=conv, pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("BatchNormalization", [conv, f"b{i}.gamma", f"b{i}.beta", f"b{i}.mean",
                                                                 f"b{i}.var"], [bn], name=bn, epsilon=EPS))
            nodes.append(helper.make_node("Relu", [bn], [relu], name=relu))
            x = relu
    shape = [1, CHANNELS, SPATIAL, SPATIAL]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path, offset


_MEASURE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import numpy, onnx, onnxruntime  # noqa: F401 - everything imported before the baseline
    import bnfold.onnx.fold, bnfold.onnx.io, bnfold.onnx.external  # noqa: F401
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    src, dst = sys.argv[1], sys.argv[2]
    if sys.argv[3] == "bnfold":
        from bnfold.onnx.fold import fold_file
        fold_file(src, dst)
    else:
        model = onnx.load(src)
        onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.rsplit("/", 1)[-1] + ".data", size_threshold=1024)
    print(json.dumps({{"base": base, "peak": status("VmHWM")}}))
""")


def measure(what: str, src: Path, dst: Path) -> tuple[float, int, int]:
    """(seconds, peak bytes above the post-import baseline, baseline bytes) of one fold in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE.format(root=str(ROOT)), str(src), str(dst), what],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, numbers["peak"] - numbers["base"], numbers["base"]


def read_external(model_dir: Path, tensor: TensorProto) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    with open(model_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return np.fromfile(f, dtype=np.float32, count=int(info["length"]) // 4).reshape(tuple(tensor.dims))


def check(src: Path, dst: Path, blocks: int) -> list[str]:
    """Problems found in the folded model, checked against float64 numpy on the original files."""
    problems = []
    original = onnx.load(str(src), load_external_data=False)
    folded = onnx.load(str(dst), load_external_data=False)
    if any(n.op_type == "BatchNormalization" for n in folded.graph.node):
        problems.append("BatchNormalization left in the folded model")
    if len(folded.graph.node) != 2 * blocks:
        problems.append(f"{len(folded.graph.node)} nodes, expected {2 * blocks} (Conv, Relu per block)")
    o_init = {t.name: t for t in original.graph.initializer}
    f_init = {t.name: t for t in folded.graph.initializer}
    conv_of = {n.output[0]: n for n in folded.graph.node if n.op_type == "Conv"}
    for i in sorted({round(k * (blocks - 1) / 7) for k in range(8)}):
        conv = conv_of.get(f"b{i}.bn")
        if conv is None:
            problems.append(f"block {i}: no Conv produces b{i}.bn")
            continue
        w_t, b_t = f_init[conv.input[1]], f_init[conv.input[2]]
        if w_t.data_location != TensorProto.EXTERNAL:
            problems.append(f"block {i}: folded weight is not in external data")
            continue
        w = read_external(src.parent, o_init[f"b{i}.w"]).astype(np.float64)
        p = {r: numpy_helper.to_array(o_init[f"b{i}.{r}"]).astype(np.float64)
             for r in ("b", "gamma", "beta", "mean", "var")}
        scale = p["gamma"] / np.sqrt(p["var"] + np.float64(np.float32(EPS)))
        want_w = (w * scale[:, None, None, None]).astype(np.float32)
        want_b = ((p["b"] - p["mean"]) * scale + p["beta"]).astype(np.float32)
        got_w = read_external(dst.parent, w_t)
        got_b = numpy_helper.to_array(b_t) if b_t.data_location != TensorProto.EXTERNAL else \
            read_external(dst.parent, b_t)
        if not np.array_equal(got_w, want_w):
            problems.append(f"block {i}: weight differs (max |diff| {np.max(np.abs(got_w - want_w)):.3g})")
        if not np.allclose(got_b, want_b, rtol=1e-6, atol=1e-7):
            problems.append(f"block {i}: bias differs (max |diff| {np.max(np.abs(got_b - want_b)):.3g})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=None, help="weight gigabytes (default 2.2, 0.25 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare-eager", action="store_true",
                        help="also measure onnx.load + onnx.save of the same model (needs memory for the weights)")
    parser.add_argument("--keep", action="store_true", help="keep benchmarks/_work/large_model")
    args = parser.parse_args(argv)
    gb = args.gb if args.gb is not None else (0.25 if args.quick else 2.2)
    blocks = max(1, math.ceil(gb * 1e9 / WEIGHT_BYTES))
    shutil.rmtree(WORK, ignore_errors=True)
    try:
        start = time.perf_counter()
        src, weight_bytes = build(WORK / "in", blocks)
        print(f"built {blocks} blocks, {weight_bytes / 1e9:.2f} GB of weights in external data "
              f"in {time.perf_counter() - start:.1f} s")
        out = WORK / "out"
        out.mkdir()
        seconds, peak, base = measure("bnfold", src, out / "folded.onnx")
        problems = check(src, out / "folded.onnx", blocks)
        rows = [("fold_file: time", f"{seconds:.1f} s", "", ""),
                ("fold_file: peak RSS above imports", f"{peak / 1e9:.3f} GB", "", ""),
                ("weights", f"{weight_bytes / 1e9:.3f} GB", "", ""),
                ("peak / weights", f"{peak / weight_bytes:.3f}", "< 1", "PASS" if peak < weight_bytes else "FAIL"),
                ("baseline RSS after imports", f"{base / 1e6:.0f} MB", "", "")]
        if args.compare_eager:
            shutil.rmtree(out / "eager", ignore_errors=True)
            (out / "eager").mkdir()
            e_seconds, e_peak, _ = measure("eager", src, out / "eager" / "copy.onnx")
            rows += [("onnx.load + onnx.save: time", f"{e_seconds:.1f} s", "", ""),
                     ("onnx.load + onnx.save: peak / weights", f"{e_peak / weight_bytes:.3f}", "", "")]
        rows.append(("folded weights and biases = float64 numpy", "8 blocks" if not problems else
                     f"{len(problems)} problem(s)", "exact", "PASS" if not problems else "FAIL"))
        width = max(len(r[0]) for r in rows)
        for name, value, bar, verdict in rows:
            print(f"{name:<{width}}  {value:>12}  {bar:>6}  {verdict}")
        for problem in problems:
            print(f"  problem: {problem}")
        bar_ok = peak < weight_bytes or args.quick
        return 0 if bar_ok and not problems else 1
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
            if WORK.parent.exists() and not any(WORK.parent.iterdir()):
                WORK.parent.rmdir()


if __name__ == "__main__":
    sys.exit(main())
