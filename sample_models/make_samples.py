"""Generate the small sample ONNX models used by bnfold's tests and benchmarks.

Five tiny PyTorch models are defined in this file (no torchvision, nothing is
downloaded) and exported to ONNX with the dynamo-based exporter:

* ``resnet_small.onnx``          ResNet-style: stem Conv-BN-ReLU, four basic
                                 residual blocks, one downsampling block with a
                                 Conv1x1(stride 2)-BN shortcut, avg pool, Linear.
* ``mobilenet_small.onnx``       MobileNet-style: depthwise-separable blocks with
                                 ReLU6, an inverted residual block, then
                                 pool -> Flatten -> BatchNorm1d -> Linear
                                 (a BN directly *before* a Linear).
* ``mlp_bn1d.onnx``              MLP: (Linear-BatchNorm1d-ReLU) x3 -> Linear,
                                 dynamic batch dimension named ``batch``.
* ``tcn1d.onnx``                 1-D temporal conv net: input BatchNorm1d feeding a
                                 kernel-1 Conv1d, dilated Conv1d-BN-ReLU residual
                                 blocks, mean over time, Linear.
* ``decoder_convtranspose.onnx`` Decoder: Linear -> reshape -> ConvTranspose2d-BN-ReLU
                                 x3 (one grouped) -> Conv3x3 -> Sigmoid.
* ``repvgg_small.onnx``          RepVGG-style, as trained: each block sums a
                                 Conv3x3-BN branch, a Conv1x1-BN branch and (where
                                 shapes allow) a BN-only identity branch, then ReLU;
                                 bnfold merges each block into one Conv3x3.

Every weight, bias, BatchNorm affine parameter and running statistic is drawn
from one seeded float64 numpy generator (uniform draws only: plain IEEE
arithmetic, no conv, BLAS or transcendental kernel whose last bit depends on
the CPU) and rounded once to float32, so the files are byte-identical on every
machine with the same torch/onnx versions. Weights are He-uniform (activations
keep their scale through ReLU); BatchNorm gets gamma in [0.5, 1.5], beta in
[-0.2, 0.2], running mean in [-0.5, 0.5] and running variance in [0.5, 2],
non-trivial enough that a wrong fold shows.

The models are exported with ``optimize=False`` on purpose: the exporter's
default optimisation pass already folds BatchNormalization into the adjacent
Conv/Gemm, and these samples exist precisely to *keep* the BatchNormalization
nodes so that bnfold has something to fold.

Each export is checked (BN count > 0, ``onnx.checker``, onnxruntime vs. torch),
then normalised for byte-determinism (doc strings and per-node metadata such as
Python stack traces, which embed absolute paths, are cleared) and written
atomically (temp file in the target folder + ``os.replace``).

Usage::

    python sample_models/make_samples.py [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SEED = 0
STAT_BATCHES = 20  # num_batches_tracked recorded in the BatchNorm buffers (as if trained on that many batches)

# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Conv3x3-BN-ReLU-Conv3x3-BN + skip, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layers = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),  # Conv1x1(stride 2)-BN shortcut
            BasicBlock(32, 32),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class DepthwiseSeparable(nn.Module):
    """Depthwise Conv3x3 (groups=C)-BN-ReLU6, pointwise Conv1x1-BN-ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn_dw(self.dw(x)))
        return self.act(self.bn_pw(self.pw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1-BN-ReLU6, dw 3x3-BN-ReLU6, project 1x1-BN, + skip."""

    def __init__(self, c: int, expansion: int = 4) -> None:
        super().__init__()
        h = c * expansion
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.features = nn.Sequential(
            DepthwiseSeparable(16, 32),
            DepthwiseSeparable(32, 48, stride=2),
            InvertedResidual(48, expansion=4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.bn_head = nn.BatchNorm1d(48)  # BN directly before the Linear
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(self.stem(x))))
        return self.fc(self.bn_head(x))


class MLPBN1d(nn.Module):
    def __init__(self, din: int = 64, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = din
        for _ in range(3):
            layers += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TCNBlock(nn.Module):
    """Dilated Conv1d(k=3)-BN-ReLU with a residual connection (length preserved)."""

    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=dilation, dilation=dilation)
        self.bn = nn.BatchNorm1d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu(self.bn(self.conv(x)))


class TCN1d(nn.Module):
    def __init__(self, cin: int = 8, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.in_norm = nn.BatchNorm1d(cin)  # input normalisation ...
        self.in_proj = nn.Conv1d(cin, c, kernel_size=1)  # ... directly into a k=1 conv, no padding
        self.blocks = nn.Sequential(*(TCNBlock(c, d) for d in (1, 2, 4)))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.in_proj(self.in_norm(x)))
        return self.fc(x.mean(dim=-1))


class DecoderConvTranspose(nn.Module):
    def __init__(self, zdim: int = 32, c: int = 64) -> None:
        super().__init__()
        self.c = c
        self.fc = nn.Linear(zdim, c * 4 * 4)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Conv2d(16, 3, 3, padding=1)
        self.out = nn.Sigmoid()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).reshape(-1, self.c, 4, 4)
        return self.out(self.head(self.up(x)))


class RepVGGBlock(nn.Module):
    """Train-time RepVGG block: Conv3x3-BN + Conv1x1-BN (+ BN identity when stride 1 and cin == cout), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if stride == 1 and cin == cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(x) + self.conv1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.relu(y)


class RepVGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.Sequential(RepVGGBlock(3, 16, 2), RepVGGBlock(16, 32, 2), RepVGGBlock(32, 32),
                                    RepVGGBlock(32, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- specs


def _image_batch(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=g)


def _tcn_batch(g: torch.Generator, n: int) -> torch.Tensor:
    # Per-channel offset/scale so the input BatchNorm has real work to do.
    scale = torch.linspace(0.5, 3.0, 8).view(1, 8, 1)
    offset = torch.linspace(-2.0, 2.0, 8).view(1, 8, 1)
    return torch.randn(n, 8, 64, generator=g) * scale + offset


SPECS: list[tuple[str, Callable[[], nn.Module], Callable[[torch.Generator, int], torch.Tensor], int, bool]] = [
    # (file name, model factory, data(gen, n), example batch size, dynamic batch)
    ("resnet_small.onnx", ResNetSmall, _image_batch, 1, False),
    ("mobilenet_small.onnx", MobileNetSmall, _image_batch, 1, False),
    # The example batch is 2 because torch.export specialises size-1 dims to the
    # constant 1, which would defeat the dynamic "batch" dimension.
    ("mlp_bn1d.onnx", MLPBN1d, lambda g, n: torch.randn(n, 64, generator=g) * 1.5 + 0.25, 2, True),
    ("tcn1d.onnx", TCN1d, _tcn_batch, 1, False),
    ("decoder_convtranspose.onnx", DecoderConvTranspose, lambda g, n: torch.randn(n, 32, generator=g), 1, False),
    ("repvgg_small.onnx", RepVGGSmall, _image_batch, 1, False),
]

# --------------------------------------------------------------------------- helpers


_LINEAR = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _set_parameters(model: nn.Module, rng: np.random.Generator) -> nn.Module:
    """Every parameter and BatchNorm statistic from ``rng`` (float64 uniform draws, rounded once to float32)."""

    def draw(low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, size=tuple(like.shape)).astype(np.float32))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _LINEAR):
                bound = math.sqrt(6.0 / module.weight[0].numel())  # He-uniform over one output's fan-in
                module.weight.copy_(draw(-bound, bound, module.weight))
                if module.bias is not None:
                    module.bias.copy_(draw(-0.1, 0.1, module.bias))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(draw(0.5, 1.5, module.weight))
                module.bias.copy_(draw(-0.2, 0.2, module.bias))
                module.running_mean.copy_(draw(-0.5, 0.5, module.running_mean))
                module.running_var.copy_(draw(0.5, 2.0, module.running_var))
                module.num_batches_tracked.fill_(STAT_BATCHES)
            else:
                own = [p for p in module.parameters(recurse=False)]
                assert not own, f"{type(module).__name__} has parameters this generator does not set"
    return model.eval()


# Per-node metadata the exporter writes.  Only the module path is kept (handy for
# reports); stack traces embed absolute file paths and line numbers, and the class
# hierarchy/namespace embed the script's module name ("__main__" vs "make_samples").
_KEEP_NODE_METADATA = {"pkg.torch.onnx.name_scopes"}


def _normalise(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Strip doc strings and path/invocation-dependent metadata (byte-determinism)."""

    def clean_nodes(nodes) -> None:
        for node in nodes:
            node.ClearField("doc_string")
            keep = [(p.key, p.value) for p in node.metadata_props if p.key in _KEEP_NODE_METADATA]
            del node.metadata_props[:]
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clean_graph(attr.g)
                for sub in attr.graphs:
                    clean_graph(sub)

    def clean_graph(graph: onnx.GraphProto) -> None:
        graph.ClearField("doc_string")
        del graph.metadata_props[:]
        for item in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            item.ClearField("doc_string")
            del item.metadata_props[:]
        clean_nodes(graph.node)

    proto.ClearField("doc_string")
    del proto.metadata_props[:]
    clean_graph(proto.graph)
    for fn in proto.functions:
        fn.ClearField("doc_string")
        clean_nodes(fn.node)
    return proto


def _export(name: str, factory, data, batch: int, dynamic: bool, out_dir: Path) -> None:
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)  # inputs only: the example (its values do not reach the file) and checks
    model = _set_parameters(factory(), np.random.default_rng(SEED))
    example = data(g, batch)

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, optimize=False, dynamic_shapes=dynamic_shapes
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use normal file permissions
    try:
        program.save(tmp, external_data=False)
        proto = _normalise(onnx.load(tmp))
        onnx.save_model(proto, tmp)
        _verify(name, tmp, model, data, g, dynamic)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    proto = onnx.load(final)
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    print(
        f"{name:28s} {final.stat().st_size / 1024:7.1f} KB  "
        f"BN={len(bn):2d}  nodes={len(proto.graph.node):3d}  "
        f"opset={proto.opset_import[0].version} ir={proto.ir_version}"
    )


def _verify(name: str, path: str, model: nn.Module, data, g: torch.Generator, dynamic: bool) -> None:
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert bn, f"{name}: no BatchNormalization nodes left in the export"
    print(f"{name}: BatchNormalization nodes: {', '.join(n.name for n in bn)}")
    ops = Counter(n.op_type for n in proto.graph.node)
    print(f"{name}: ops: {dict(sorted(ops.items()))}")

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    for n in ((1, 5) if dynamic else (1,)):
        x = data(g, n)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {in_name: x.numpy()})[0]
        assert np.isfinite(ref).all()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} batch={n}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent,
        help="output folder (default: the folder of this script)",
    )
    args = parser.parse_args(argv)

    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    for name, factory, data, batch, dynamic in SPECS:
        _export(name, factory, data, batch, dynamic, args.out)


if __name__ == "__main__":
    main()
