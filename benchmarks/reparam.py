"""Branch merging (structural reparameterization): bnfold's ONNX output against the authors' own deploy form.

For each RepVGG-, MobileOne-, ACNet-, DBB-, RepViT-, RepGhost- and FastViT-style net of ``tests/reparam_models.py``
(realistic BN statistics, seeded), run from the repository root::

    python benchmarks/reparam.py                 # 1 thread, 128x128 input, 2 s of rounds per family
    python benchmarks/reparam.py --threads 2 --size 224 --min-time 3

it exports with torch's ONNX exporter (``dynamo=True, optimize=False``):

* **original**: the train-time graph, every branch and BatchNormalization;
* **deploy**: the authors' deploy form (each block's own ``reparameterize()``), exported the same way;

and makes with bnfold:

* **bn-folded**: ``fold_onnx(original, skip=merge rules)``, plain BN folding;
* **merged**: ``fold_onnx(original)``, BN folding and branch merging (the default).

They are timed side by side by :func:`bnfold.bench.time_models` (onnxruntime CPU, graph optimizations disabled, the
order rotating each round): merged and deploy together, then original, bn-folded and merged together; a ratio is the
median of the per-round ratios (samples of one round ran back to back). Printed per family: node counts, the error
of merged and deploy against the float64 reference (the original torch module in float64, relative to the output
scale), medians, **merged / deploy** (the bar: <= 1.02) and **bn-folded / merged** (the gain over plain BN
folding). Exit status 0 when every family meets the bar and the count and error checks, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):  # run as a script from anywhere: the checkout's bnfold and test models
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bnfold  # noqa: E402
from bnfold.bench import time_models  # noqa: E402
from bnfold.onnx.merge import MERGE_RULE_NAMES  # noqa: E402
from reparam_models import MODELS, realistic, reparameterize_model  # noqa: E402

BAR = 1.02


def export(module, x):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (x,), dynamo=True, optimize=False).model_proto


def count(model, op):
    return sum(1 for n in model.graph.node if n.op_type == op)


def run(model, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def paired_ratio(a, b) -> float:
    """Median over rounds of a's sample / b's sample in the same round."""
    return float(np.median(np.asarray(a.latency.samples_ms) / np.asarray(b.latency.samples_ms)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed rounds per family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ok = True
    print(f"onnxruntime CPU, optimizations disabled, {args.threads} thread(s), input 1x3x{args.size}x{args.size}")
    print(f"{'family':10} {'BN o/f/m/d':>12} {'Conv o/f/m/d':>14} {'err merged':>11} {'err deploy':>11} "
          f"{'orig ms':>8} {'bnfold ms':>9} {'merged ms':>9} {'deploy ms':>9} {'merged/deploy':>13} "
          f"{'bn-folded/merged':>16}")
    for name, factory in MODELS.items():
        torch.manual_seed(args.seed)
        module = realistic(factory(), seed=args.seed)
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            reference = copy.deepcopy(module).double()(x.double()).numpy()
        original = export(module, x)
        deploy = export(reparameterize_model(module), x)
        folded, _ = bnfold.fold_onnx(original, skip=MERGE_RULE_NAMES)
        merged, _ = bnfold.fold_onnx(original)
        models = {"original": original, "bn-folded": folded, "merged": merged, "deploy": deploy}
        scale = np.abs(reference).max()
        err_merged = float(np.abs(run(merged, x.numpy()) - reference).max() / scale)
        err_deploy = float(np.abs(run(deploy, x.numpy()) - reference).max() / scale)
        feeds = {original.graph.input[0].name: x.numpy()}
        # Two timed runs: the pair the bar is about alone (nothing heavier between their samples), then plain
        # folding and the original for the gain. Ratios are medians of per-round ratios (the models of one round
        # ran back to back, so drift of a loaded machine cancels).
        pair, _ = time_models({"merged": merged, "deploy": deploy}, feeds, provider="cpu", opt_level="disabled",
                              threads=args.threads, min_time_s=args.min_time)
        rest, _ = time_models({"original": original, "bn-folded": folded, "merged": merged}, feeds, provider="cpu",
                              opt_level="disabled", threads=args.threads, min_time_s=args.min_time)
        ms = {"deploy": pair["deploy"].latency.median_ms, "merged": pair["merged"].latency.median_ms,
              "original": rest["original"].latency.median_ms, "bn-folded": rest["bn-folded"].latency.median_ms}
        ratio = paired_ratio(pair["merged"], pair["deploy"])
        gain = paired_ratio(rest["bn-folded"], rest["merged"])
        counts_ok = all(count(merged, op) <= count(deploy, op) for op in ("BatchNormalization", "Conv"))
        family_ok = ratio <= BAR and counts_ok and err_merged <= 3 * err_deploy
        ok &= family_ok
        bn = "/".join(str(count(models[k], "BatchNormalization")) for k in models)
        conv = "/".join(str(count(models[k], "Conv")) for k in models)
        print(f"{name:10} {bn:>12} {conv:>14} {err_merged:>11.3g} {err_deploy:>11.3g} {ms['original']:>8.3f} "
              f"{ms['bn-folded']:>9.3f} {ms['merged']:>9.3f} {ms['deploy']:>9.3f} {ratio:>13.3f} {gain:>16.3f}"
              f"{'' if family_ok else '  FAILED'}")
    print(f"bar: merged/deploy <= {BAR}, BN and Conv counts <= deploy, error <= 3x deploy's: "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
