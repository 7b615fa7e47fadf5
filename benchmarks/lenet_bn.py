"""LeNet-5 with and without BatchNorm on scikit-learn's digits: accuracy, recalibration, folding, timing.

A small, offline reproduction of the BatchNorm paper's LeNet experiment. Run it from the repository root::

    python benchmarks/lenet_bn.py                    # 8 epochs, seed 0, 2 threads
    python benchmarks/lenet_bn.py --epochs 4 --seed 1 --threads 1

Needs torch and scikit-learn (scikit-learn is a benchmark-only dependency, not one of bnfold's). Nothing is
downloaded: the data is ``sklearn.datasets.load_digits()``, which ships inside the scikit-learn package.

What it measures, all in one run (CPU, float32):

* Data: the 1797 8x8 digit images (10 classes), upsampled to 32x32 (bilinear, ``F.interpolate``), scaled to
  [0, 1] and standardized with the training set's mean / std; a fixed stratified 80/20 train/test split (seeded).
* Model: LeNet-5 (Conv 5x5 1->6, ReLU, MaxPool 2 -> Conv 5x5 6->16, ReLU, MaxPool 2 -> Linear 400->120, ReLU ->
  Linear 120->84, ReLU -> Linear 84->10). Three variants trained with the same seed, initialization order and
  schedule (SGD, momentum 0.9, lr 0.01, batch 32, shuffled each epoch with the same generator):
  - no BN;
  - BN after every Conv / hidden Linear (BatchNorm2d / BatchNorm1d) with EMA decay 0.99 (torch momentum 0.01);
  - the same with decay 0.9 (torch momentum 0.1).
* Recalibration: a copy of each BN model gets ``bnfold.torch.recalibrate(model, batches, estimator="unbiased")``
  over the training set (the training images in order, batches of 32; the paper's Algorithm 2).
* Test accuracy of: no BN; each decay with the EMA statistics as trained; each decay recalibrated. The paper's
  CIFAR-10 numbers (no BN 74.33 %, decay 0.99 78.16 %, decay 0.9 78.26 %) are printed next to them for context
  only: a different data set and network size, not a target.
* Folding: every BN model (both decays, EMA and recalibrated) is folded with ``bnfold.torch.fold_module``; the
  argmax prediction of every test image must be unchanged (changed count must be 0); the largest absolute logit
  difference and the BatchNorm count before / after are printed.
* Timing: recalibration against plain inference (eval mode, ``torch.no_grad()``) over the same training batches,
  interleaved for ``--repeat`` rounds after a warm-up (the order alternates each round); medians are compared.
  The bar: recalibration / inference <= 1.5 for each BN model.

Exit status 0 when every check passes (no changed predictions, ratio bar), 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's bnfold
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.torch import fold_module, recalibrate  # noqa: E402

RATIO_BAR = 1.5
PAPER = {"none": 74.33, 0.99: 78.16, 0.9: 78.26}  # BatchNorm paper, CIFAR-10 table (different data set)
BATCH = 32


def load_data(seed: int):
    """Digits upsampled to 32x32 and standardized; a stratified 80/20 split. Returns float32 tensors."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this benchmark needs scikit-learn (pip install scikit-learn); it downloads nothing")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target,
                                           random_state=seed)
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx]


def lenet(bn_momentum: float | None) -> nn.Sequential:
    """LeNet-5; with ``bn_momentum`` a BatchNorm after every Conv and hidden Linear (torch momentum = 1 - decay)."""
    bn = bn_momentum is not None

    def norm(cls, channels):
        return [cls(channels, momentum=bn_momentum)] if bn else []

    return nn.Sequential(
        nn.Conv2d(1, 6, 5, bias=not bn), *norm(nn.BatchNorm2d, 6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, bias=not bn), *norm(nn.BatchNorm2d, 16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120, bias=not bn), *norm(nn.BatchNorm1d, 120), nn.ReLU(),
        nn.Linear(120, 84, bias=not bn), *norm(nn.BatchNorm1d, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            index = order[start:start + BATCH]
            if len(index) < 2:  # BatchNorm1d needs 2 values per channel in training mode
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[start:start + 256]) for start in range(0, len(x), 256)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits(model, x).argmax(1) == y).float().mean().item()


def time_recalibration(model: nn.Module, batches: list[torch.Tensor], repeat: int) -> tuple[float, float]:
    """Median seconds of one recalibration pass and of one inference pass over ``batches``, interleaved."""
    work = copy.deepcopy(model).eval()

    def infer():
        with torch.no_grad():
            for batch in batches:
                work(batch)

    def calibrate():
        recalibrate(work, batches, estimator="unbiased")

    for _ in range(2):  # warm-up
        infer()
        calibrate()
    times = {"infer": [], "calibrate": []}
    for round_ in range(repeat):
        pair = [("infer", infer), ("calibrate", calibrate)]
        for name, run in (pair if round_ % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["calibrate"]), statistics.median(times["infer"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs for every variant (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, initialization, shuffling")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds for the recalibration timing")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--epochs, --repeat and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    x_train, y_train, x_test, y_test = load_data(args.seed)
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, 1x32x32, 10 classes; "
          f"{args.epochs} epochs, SGD lr 0.01 momentum 0.9, batch {BATCH}, seed {args.seed}, "
          f"{args.threads} thread(s)")

    models: dict = {}
    for key, momentum in (("none", None), (0.99, 0.01), (0.9, 0.1)):
        torch.manual_seed(args.seed)  # same initialization stream for every variant
        t0 = time.perf_counter()
        models[key] = train(lenet(momentum), x_train, y_train, args.epochs, args.seed)
        print(f"  trained {'no BN' if key == 'none' else f'BN decay {key}'} in {time.perf_counter() - t0:.1f} s")

    calibration_batches = [x_train[start:start + BATCH] for start in range(0, len(x_train), BATCH)]
    if calibration_batches[-1].shape[0] < 2:  # BatchNorm1d needs 2 values per channel
        calibration_batches.pop()
    recalibrated = {}
    for decay in (0.99, 0.9):
        recalibrated[decay] = recalibrate(copy.deepcopy(models[decay]), calibration_batches, estimator="unbiased")

    rows = [("no BN", models["none"], PAPER["none"])]
    for decay in (0.99, 0.9):
        rows.append((f"BN decay {decay} (EMA stats as trained)", models[decay], PAPER[decay]))
        rows.append((f"BN decay {decay} recalibrated (unbiased)", recalibrated[decay], None))
    print()
    print("Test accuracy (digits, this run)   vs. the paper's CIFAR-10 table (different data set, context only)")
    print(f"  {'model':<42} {'digits test acc':>16} {'paper CIFAR-10':>16}")
    for label, model, paper in rows:
        paper_text = f"{paper:.2f} %" if paper is not None else "-"
        print(f"  {label:<42} {accuracy(model, x_test, y_test):>14.2f} % {paper_text:>16}")

    print()
    print("Folding (bnfold.torch.fold_module), predictions on the whole test set")
    print(f"  {'model':<42} {'BN before->after':>16} {'changed preds':>14} {'max |logit diff|':>17}")
    fold_ok = True
    example = x_test[:BATCH]
    for label, model, _ in rows[1:]:
        folded, report = fold_module(model, (example,))
        reference, result = logits(model, x_test), logits(folded, x_test)
        changed = int((reference.argmax(1) != result.argmax(1)).sum())
        diff = (reference - result).abs().max().item()
        ok = changed == 0 and report.bn_after == 0
        fold_ok &= ok
        print(f"  {label:<42} {f'{report.bn_before} -> {report.bn_after}':>16} {changed:>14d} {diff:>17.3e}"
              f"  {'ok' if ok else 'FAIL'}")

    print()
    print(f"Timing: recalibration vs. plain inference over the same {len(calibration_batches)} training batches "
          f"(eval mode, no grad), {args.repeat} interleaved rounds, medians")
    print(f"  {'model':<42} {'recalibrate':>12} {'inference':>12} {'ratio':>7}  bar <= {RATIO_BAR}x")
    timing_ok = True
    for decay in (0.99, 0.9):
        calibrate_s, infer_s = time_recalibration(models[decay], calibration_batches, args.repeat)
        ratio = calibrate_s / infer_s
        ok = ratio <= RATIO_BAR
        timing_ok &= ok
        print(f"  {f'BN decay {decay}':<42} {calibrate_s * 1e3:>9.2f} ms {infer_s * 1e3:>9.2f} ms "
              f"{ratio:>6.2f}x  {'PASS' if ok else 'FAIL'}")

    print()
    print(f"folding: {'PASS' if fold_ok else 'FAIL'} (0 changed predictions, no BatchNorm left)")
    print(f"recalibration / inference <= {RATIO_BAR}x: {'PASS' if timing_ok else 'FAIL'}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0 if fold_ok and timing_ok else 1


if __name__ == "__main__":
    sys.exit(main())
