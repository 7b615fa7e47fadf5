"""Does fold_module's merged result run as fast as the authors' own deploy form of a reparameterizable network?

Run it from the repository root (needs torch: ``pip install ".[torch]"``)::

    python benchmarks/torch_reparam_speed.py                  # batch 8, 30 timed rounds, torch's default threads
    python benchmarks/torch_reparam_speed.py --threads 1 --repeat 60
    python benchmarks/torch_reparam_speed.py --models mobileone dbb

What it measures, all in one run, per model (every net of ``tests/reparam_models.py``: RepVGG-, MobileOne-,
ACNet-, DBB-, RepViT-, RepGhost-, FastViT- and EfficientViT-style, with trained-looking statistics from its
``realistic()``; input ``[batch, 3, 64, 64]`` float32, eager CPU, timed by ``bnfold.torch.verify.benchmark`` under
``torch.inference_mode()``: warm-up rounds, then ``--repeat`` rounds that run the three modules in turn, the order
rotating each round; merged / deploy is the median of the per-round ratios, so that a load spike that hits one
round hits both):

* folded only: ``fold_module(model, (x,), merge=False)``: every branch's BN folded, every branch still a conv;
* merged: ``fold_module(model, (x,))`` (the default: branches merged, bnfold.torch.merge);
* deploy: the authors' form, ``reparameterize_model(model)`` (each block's own ``reparameterize()``).

Prints per model: the three medians, merged / deploy (the bar: <= 1.03, as benchmarks/torch_speed.py's) and the
gain of merging over plain folding (folded-only / merged), and the largest relative error of merged and deploy
against the float64 original. Exit status 0 when every model meets the bar, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):  # run as a script from anywhere: the checkout's bnfold and test models
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import reparam_models as R  # noqa: E402
from bnfold.torch import fold_module  # noqa: E402
from bnfold.torch.verify import benchmark  # noqa: E402

BAR = 1.03
SPATIAL = 64


def relative_error(module, ref, x) -> float:
    with torch.no_grad():
        return ((module(x).double() - ref).abs().max() / ref.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the timing")
    parser.add_argument("--models", nargs="+", choices=sorted(R.MODELS), default=list(R.MODELS))
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat, --batch and --threads must be >= 1, --warmup >= 0")

    x = torch.randn(args.batch, 3, SPATIAL, SPATIAL, generator=torch.Generator().manual_seed(0))
    print(f"input [{args.batch}, 3, {SPATIAL}, {SPATIAL}] float32, eager CPU, torch {torch.__version__}, "
          f"median of {args.repeat} interleaved rounds after {args.warmup} warm-up")
    print(f"{'model':<11}{'folded ms':>11}{'merged ms':>11}{'deploy ms':>11}{'merged/deploy':>15}"
          f"{'folded/merged':>15}{'err merged':>12}{'err deploy':>12}")
    ok = True
    for name in args.models:
        model = R.realistic(R.MODELS[name](), seed=0)
        folded_only, _ = fold_module(model, (x,), merge=False)
        merged, report = fold_module(model, (x,))
        deploy = R.reparameterize_model(model)
        ref = copy.deepcopy(model).double()
        with torch.no_grad():
            ref_out = ref(x.double())
        result = benchmark(folded_only, merged, (x,), ideal=deploy, warmup=args.warmup, repeat=args.repeat,
                           threads=args.threads)
        # paired: the samples of one round ran back to back (one batch per round)
        ratio = statistics.median(a / b for a, b in zip(result.folded.samples_ms, result.ideal.samples_ms))
        gain = result.original.median_ms / result.folded.median_ms
        ok &= ratio <= BAR
        print(f"{name:<11}{result.original.median_ms:>11.3f}{result.folded.median_ms:>11.3f}"
              f"{result.ideal.median_ms:>11.3f}{ratio:>15.3f}{gain:>15.3f}"
              f"{relative_error(merged, ref_out, x):>12.2e}{relative_error(deploy, ref_out, x):>12.2e}")
    print(f"bar: merged / deploy <= {BAR}   {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
