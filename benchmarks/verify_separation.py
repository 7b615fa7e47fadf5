"""Does the verification verdict separate correct folds from real changes, and by how much?

Run it from the repository root::

    python benchmarks/verify_separation.py            # chains of 20/100/300 blocks + three PyTorch architectures
    python benchmarks/verify_separation.py --quick    # chains only (no torch export), a few seconds
    python benchmarks/verify_separation.py --seeds 3  # more input seeds per model

For each model (built here with seeded random weights and realistic BatchNorm statistics; the architectures are
Inception-, ResNet-50- and MobileNetV2-style networks from tests/torch_models.py, exported with
``torch.onnx.export(dynamo=True, optimize=False)``), on each input seed, it computes the verifier's ratio
(``max |candidate − original| / noise scale``, see bnfold/verify.py) for

* accepted candidates: bnfold's fold, and onnxruntime's own basic-level optimized model (its Conv+BN fusion);
* planted errors in a correct fold: one output channel of one Conv scaled by (1 + 1e-3), one Conv bias shifted by
  1 % of that bias's range, two output channels swapped; each in the first Conv and in the last Conv, on the
  channel where the change shows most (the others are weaker, by construction).

It prints per model the largest accepted ratio, the smallest planted ratio in the first and in the last Conv, and
the smallest over the three kinds of error of the better of the two places ("planted"), the limit K
(``bnfold.verify.NOISE_FACTOR``), and verification time next to fold time, measured side by side in this run.
Exit 0 when every accepted ratio is <= K and every "planted" ratio is > K. Where a change is placed matters: in a
chain of unit gain a change in the first Conv fades with depth, and in a ResNet-50 a 1e-3 change of one channel
in the last Conv is diluted by global pooling to a few times the model's own rounding noise; no comparison of
outputs can see a change smaller than the rounding the model does anyway.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:  # run as a script from anywhere: the checkout's bnfold and test builders
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import bnfold  # noqa: E402
from onnx_builders import (conv_bn_chain, most_sensitive_channel, ort_basic_optimized, plant_bias_shift,  # noqa: E402
                           plant_channel_scale, plant_channel_swap)

V = importlib.import_module("bnfold.verify")


def chain_models() -> dict[str, onnx.ModelProto]:
    return {"chain-20": conv_bn_chain(20), "chain-100": conv_bn_chain(100), "chain-300": conv_bn_chain(300),
            "chain-100-growing": conv_bn_chain(100, gain=1.9)}


def torch_models(directory: Path) -> dict[str, onnx.ModelProto]:
    import torch
    from torch_models import DeepMobileNet, InceptionLike, ResNet50Like, realistic_bn

    models = {}
    for name, module in (("inception", InceptionLike(blocks=3, width=8)),
                         ("resnet50", ResNet50Like(depths=(3, 4, 6, 3), width=4)),
                         ("mobilenet_v2", DeepMobileNet(width=8))):
        path = directory / f"{name}.onnx"
        torch.onnx.export(realistic_bn(module), (torch.randn(1, 3, 64, 64),), str(path), dynamo=True,
                          optimize=False)
        models[name] = onnx.load(path)
    return models


def ratio(original, candidate, feeds) -> float:
    [out] = V.verify(original, candidate, providers="cpu", inputs=feeds).providers["cpu"].outputs
    return out.ratio


def planted(folded, feeds, conv: int) -> list[onnx.ModelProto]:
    channel = most_sensitive_channel(folded, feeds, conv=conv)
    convs = [n for n in folded.graph.node if n.op_type == "Conv" and len(n.input) == 3]
    bias = next(t for t in folded.graph.initializer if t.name == convs[conv].input[2])
    other = (channel + 1) % bias.dims[0]
    return [plant_channel_scale(folded, 1 + 1e-3, channel, conv), plant_bias_shift(folded, 0.01, channel, conv),
            plant_channel_swap(folded, channel, other, conv)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="chains only (no PyTorch export)")
    parser.add_argument("--seeds", type=int, default=2, help="input seeds per model")
    args = parser.parse_args()

    limit = V.NOISE_FACTOR
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="bnfold-sep-") as tmp:
        models = chain_models()
        if not args.quick:
            models.update(torch_models(Path(tmp)))
        for name, model in models.items():
            start = time.perf_counter()
            folded, _ = bnfold.fold_onnx(model)
            fold_s = time.perf_counter() - start
            ort_model = ort_basic_optimized(model, tmp)
            accepted, first, last, verify_s = [], [], [], []
            for seed in range(args.seeds):
                feeds = V.make_inputs(model, seed=seed)
                start = time.perf_counter()
                accepted.append(ratio(model, folded, feeds))
                verify_s.append(time.perf_counter() - start)
                accepted.append(ratio(model, ort_model, feeds))
                first.append([ratio(model, c, feeds) for c in planted(folded, feeds, 0)])
                last.append([ratio(model, c, feeds) for c in planted(folded, feeds, -1)])
            best = min(max(f, la) for fs, ls in zip(first, last) for f, la in zip(fs, ls))
            ok &= max(accepted) <= limit < best
            rows.append((name, max(accepted), min(map(min, first)), min(map(min, last)), best,
                         float(np.median(verify_s)), fold_s))

    print(f"limit K = {limit:g} (accepted when ratio <= K); ratios over {args.seeds} input seed(s)")
    print(f"{'model':<18} {'max accepted':>13} {'min planted':>12} {'min planted':>12} {'min planted':>12} "
          f"{'verify s':>9} {'fold s':>8} {'verify/fold':>11}")
    print(f"{'':<18} {'(fold, ort)':>13} {'first Conv':>12} {'last Conv':>12} {'better place':>12}")
    for name, acc, first, last, best, verify_s, fold_s in rows:
        print(f"{name:<18} {acc:>13.3g} {first:>12.3g} {last:>12.3g} {best:>12.3g} {verify_s:>9.3f} "
              f"{fold_s:>8.3f} {verify_s / fold_s:>11.1f}")
    worst_accepted = max(r[1] for r in rows)
    weakest_planted = min(r[4] for r in rows)
    print(f"separation: largest accepted ratio {worst_accepted:.3g}, smallest planted ratio {weakest_planted:.3g} "
          f"({weakest_planted / worst_accepted:.0f}x apart); limit K = {limit:g}")
    print("result:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
