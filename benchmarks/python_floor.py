"""How fast can a Python fold of a small model be at all? A floor for peers.py's fold-time bar.

Run it from the repository root (needs onnxoptimizer: ``pip install -e ".[peers]"``)::

    python benchmarks/python_floor.py                 # mlp_bn1d, 200 rounds
    python benchmarks/python_floor.py resnet_small --rounds 100

Three things fold the same in-memory model, timed as peers.py times them (a fresh ``CopyFrom`` copy and
``gc.collect()`` before each call, outside the timer; calls interleaved round-robin):

* ``bnfold``: ``bnfold.onnx.fold.fold_onnx(model, inplace=True)``;
* ``onnxoptimizer``: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``, the fastest peer on the small
  samples (it folds no BN of mlp_bn1d, whose BNs follow Gemm, and none of the exporter-made ones of resnet_small);
* ``bare``: the least a Python fold can do. For each BatchNormalization fed by a Conv or Gemm whose weight, bias
  and BN parameters are float32 initializers in raw_data: read them, fold in float64, write the weight and bias
  back, rename the output, delete the BN and its parameters. No validation, no report, no refusals, no other
  pattern: a model that needs any of those is skipped. Not a tool; a measuring stick.

``bare``'s output is checked against the original with onnxruntime first. It prints min and median per tool and the
medians' ratios. The point: where ``bare`` is barely faster than onnxoptimizer, a Python fold that validates its
input, explains its refusals and handles every pattern has no room left to beat onnxoptimizer's C++ round trip.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]


def bare_fold(model: onnx.ModelProto) -> None:
    """Fold Conv/Gemm -> BatchNormalization in place, float32 initializers only, with no checks at all."""
    graph = model.graph
    nodes = list(graph.node)
    tensors = {t.name: t for t in graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    dead_nodes, dead_tensors = set(), set()
    with np.errstate(all="ignore"):
        for bn in nodes:
            if bn.op_type != "BatchNormalization":
                continue
            layer = producer.get(bn.input[0])
            if layer is None or layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3:
                continue
            weight, bias = tensors.get(layer.input[1]), tensors.get(layer.input[2])
            params = [tensors.get(name) for name in bn.input[1:5]]
            if weight is None or bias is None or None in params:
                continue
            epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            scale, shift, mean, var = (np.frombuffer(p.raw_data, np.float32).astype(np.float64) for p in params)
            s = scale / np.sqrt(var + epsilon)
            t = shift - mean * s
            w = np.frombuffer(weight.raw_data, np.float32).reshape(tuple(weight.dims))
            if layer.op_type == "Conv":
                multiplier = s.reshape((-1,) + (1,) * (w.ndim - 1))
            else:
                trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
                multiplier = s[:, None] if trans_b else s[None, :]
            new_w = np.empty_like(w)
            np.multiply(w, multiplier, out=new_w, dtype=np.float64, casting="unsafe")
            b = np.frombuffer(bias.raw_data, np.float32)
            weight.raw_data = new_w.tobytes()
            bias.raw_data = (s * b + t).astype(np.float32).tobytes()
            layer.output[0] = bn.output[0]
            dead_nodes.add(id(bn))
            dead_tensors.update(bn.input[1:5])
    for i in reversed(range(len(nodes))):
        if id(nodes[i]) in dead_nodes:
            del graph.node[i]
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead_tensors:
            del graph.initializer[i]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="mlp_bn1d", help="a sample model's name (default mlp_bn1d)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        import onnxoptimizer
    except ImportError:
        print("needs onnxoptimizer: pip install -e '.[peers]'", file=sys.stderr)
        return 2
    from bnfold.onnx.fold import fold_onnx

    model = onnx.load(str(ROOT / "sample_models" / f"{args.model}.onnx"))
    tools = {
        "bnfold": lambda m: fold_onnx(m, inplace=True),
        "onnxoptimizer": lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]),
        "bare": bare_fold,
    }
    check = onnx.ModelProto()
    check.CopyFrom(model)
    bare_fold(check)
    folded = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization") - \
        sum(1 for n in check.graph.node if n.op_type == "BatchNormalization")
    from bnfold.verify import verify

    checked = verify(model, check, providers="cpu", seed=0)  # the measuring stick must fold right
    if not checked:
        print(f"bare fold is wrong on {args.model}: {checked}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for round_ in range(args.rounds + 1):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            gc.collect()
            start = time.perf_counter()
            tools[name](copy)
            elapsed = time.perf_counter() - start
            if round_:  # the first round warms up
                times[name].append(elapsed * 1e3)
    print(f"{args.model}: {args.rounds} rounds; bare folds {folded} BatchNormalization (verified)")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"  {name:14s} min {min(values):7.3f} ms  median {medians[name]:7.3f} ms  "
              f"median / onnxoptimizer {medians[name] / medians['onnxoptimizer']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
