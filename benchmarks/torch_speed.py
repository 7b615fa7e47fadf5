"""Does a BatchNorm-folded PyTorch model run as fast as the same model with no BatchNorm at all?

Run it from the repository root (needs torch: ``pip install ".[torch]"``)::

    python benchmarks/torch_speed.py                 # batch 8, 30 timed rounds, torch's default thread count
    python benchmarks/torch_speed.py --repeat 100 --threads 1
    python benchmarks/torch_speed.py --batch 1
    python benchmarks/torch_speed.py --keep-class    # time the folded ResNet18 object (keep_class=True)

What it measures, all in one run:

* The model: a ResNet-18 defined here (no torchvision): stem Conv 7x7 stride 2 + BN + ReLU + MaxPool 3x3 stride 2,
  BasicBlocks x [2, 2, 2, 2] with 64-128-256-512 channels (1x1 Conv + BN shortcuts where the shape changes),
  global average pooling, Linear 512 -> 1000; Conv layers without bias, BN after every Conv. Seeded. BN affine
  parameters are drawn (gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1)) and the running statistics come from 10 train-mode
  batches of random data (cumulative average), then the model is put in eval mode.
* Three modules, eager, CPU, float32, input ``[batch, 3, 64, 64]``, timed by ``bnfold.torch.verify.benchmark``
  under ``torch.inference_mode()``: 5 warm-up rounds, then ``--repeat`` rounds that run the three in turn (the
  order rotates each round, so drift on a noisy machine hits all alike); medians are compared.
  - original: the model as defined, with its BatchNorm layers;
  - folded: ``bnfold.torch.fold_module(model, (example,))`` (a GraphModule), or with ``--keep-class`` the user's
    own ResNet18 object that ``fold_module(..., keep_class=True)`` gives back;
  - ideal: a deep copy of the original with every BatchNorm replaced by ``nn.Identity`` (numerically wrong; the
    floor that folding can reach).
* The bar: folded / ideal <= 1.03 (median latency).
* Correctness: ``bnfold.torch.verify.verify`` of the folded model against the original on two batches (float32
  tolerances atol 1e-4, rtol 1e-3); the largest absolute error is printed.

Prints one table. Exit status 0 when the bar passes and the folded model verifies, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's bnfold
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.torch import fold_module  # noqa: E402
from bnfold.torch.verify import benchmark, verify  # noqa: E402

BAR = 1.03
SEED = 0
SPATIAL = 64
CALIBRATION_BATCHES = 10


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(seed: int = SEED) -> ResNet18:
    """The seeded model in eval mode, with drawn BN affine parameters and statistics from random data."""
    torch.manual_seed(seed)
    model = ResNet18()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(CALIBRATION_BATCHES):
            model(torch.randn(16, 3, SPATIAL, SPATIAL))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def without_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy with every BatchNorm replaced by nn.Identity (numerically wrong: the speed floor)."""
    ideal = copy.deepcopy(model)
    for name, module in list(ideal.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(ideal.get_submodule(parent_name) if parent_name else ideal, child, nn.Identity())
    return ideal.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the timing")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--keep-class", action="store_true", help="time the folded module in its own class")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat, --batch and --threads must be >= 1, --warmup >= 0")

    model = build_model()
    torch.manual_seed(SEED + 1)
    example = torch.randn(args.batch, 3, SPATIAL, SPATIAL)
    folded, fold_report = fold_module(model, (example,), keep_class=args.keep_class)
    ideal = without_batchnorm(model)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_bn_folded = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())

    check = verify(model, folded, [example, torch.randn(args.batch, 3, SPATIAL, SPATIAL)], devices=["cpu"])
    result = benchmark(model, folded, (example,), ideal=ideal, warmup=args.warmup, repeat=args.repeat,
                       threads=args.threads)

    ratio = result.folded_vs_ideal
    bar_ok = ratio <= BAR
    print(f"ResNet-18, input [{args.batch}, 3, {SPATIAL}, {SPATIAL}] float32, eager CPU, torch {torch.__version__}, "
          f"{result.threads} thread(s), median of {result.repeat} interleaved rounds after {result.warmup} warm-up")
    print(f"BatchNorm layers: {n_bn} in the original, {n_bn_folded} left in the folded model "
          f"({len(fold_report.folded)} folded, {len(fold_report.skipped)} skipped)")
    print()
    print(f"{'module':<26}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'vs ideal':>10}")
    rows = [("original (with BN)", result.original),
            ("folded (own class)" if args.keep_class else "folded (bnfold)", result.folded),
            ("ideal (BN -> Identity)", result.ideal)]
    for label, t in rows:
        print(f"{label:<26}{t.median_ms:>11.3f}{t.p10_ms:>10.3f}{t.p90_ms:>10.3f}"
              f"{t.median_ms / result.ideal.median_ms:>10.3f}")
    print()
    print(f"speedup original / folded: {result.speedup:.3f}x")
    print(f"folded / ideal: {ratio:.3f}   bar <= {BAR}   {'PASS' if bar_ok else 'FAIL'}")
    cpu = check.providers["cpu"]
    print(f"folded vs original: max abs error {cpu.max_abs_error:.3g}, noise ratio {cpu.max_ratio:.3g} "
          f"(limit {cpu.outputs[0].limit:g})   {'PASS' if check else 'FAIL'}")
    return 0 if bar_ok and check else 1


if __name__ == "__main__":
    sys.exit(main())
