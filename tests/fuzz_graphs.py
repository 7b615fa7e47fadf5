"""Random ONNX models that mix every fold pattern and every refusal, and the property every fold must satisfy.

Shared by ``tests/test_fuzz.py`` (a modest profile in CI) and ``benchmarks/fuzz_soak.py`` (10,000+ examples).

:func:`fuzz_cases` is a hypothesis strategy. It builds a model from a random sequence of *blocks* applied to a
running activation whose shape it tracks (rank 2 ``[N, F]``, rank 3 ``[N, T, F]`` in passing, or ``[N, C, *spatial]``
with 1 to 3 spatial axes). The blocks cover every rule of :data:`bnfold.onnx.rules.RULES` and the refusals:

=================  ==========================================================================================
block              what it builds
=================  ==========================================================================================
conv_bn            Conv (groups incl. depthwise, kernel 1-3, pads/auto_pad, strides, dilations, bias or not,
                   weight/bias from initializers, Constant nodes or shared with other nodes) -> BN, or
                   Conv -> BN -> BN (chain), Conv -> Relu/Identity -> BN; refused: the Conv output also a graph
                   output, read by a residual Add or by two BNs, the Conv weight an overridable graph input
convtranspose_bn   ConvTranspose (groups, strides, dilations, pads, output_padding) -> BN [-> BN]
concat_bn          Concat of 2-3 Conv/ConvTranspose along axis 1 or -rank -> BN; refused variants: a slice also
                   read elsewhere, a slice not from a linear op, the same slice twice
bn_conv            [Relu ->] BN -> Conv without padding (folds) or with padding (refused), or BN -> two Convs
conv_affine        Conv -> chain of per-channel Mul/Add/Sub/Div (exporter-decomposed BN, constant first or
                   second), or by a constant that is not per channel / c - x (left alone)
shared_conv        two Convs reading the same weight initializer, each [-> BN | -> Mul], summed
fp16_overflow      float16 only: a fold whose folded weights would overflow float16 (after or before a Conv):
                   must be refused, never produced
if                 If whose branches hold Conv [-> BN [-> BN]] with weights/BN parameters local or from the
                   outer graph; or an outer Conv -> BN whose Conv output a branch also reads (refused)
gemm_bn            Gemm (transA, transB, alpha, beta, bias none/[n]/[1,n]/[1]/scalar/[m,n]) -> BN [-> BN]
matmul_bn          MatMul [-> Add(constant first or second)] -> BN (rank 2)
bn_gemm            [Relu ->] BN -> Gemm; transA=1 (refused)
bn_matmul          [Relu ->] BN -> MatMul [-> Add] (rank 2)
dense_affine       Gemm/MatMul -> per-channel Mul/Add/Sub/Div
concat_dense_bn    Concat(Gemm, MatMul [-> Add]) -> BN
rank3              rank-3 MatMul -> BN and BN -> rank-3 MatMul (refused, also when the sizes happen to match);
                   BN over T of [N, T, F] -> Reshape [0, -1] -> Gemm/MatMul (folds)
flatten            [[Relu ->] BN ->] Flatten / Reshape ([0,-1], [N,-1], [-1,K], ...) [-> Gemm/MatMul]; Flatten
                   axis=2 and a Reshape that moves the batch axis after a BN (refused)
unflatten          [N, F] -> [N, C, h, w...] by Reshape, back to convolutions
bn                 a BN on whatever comes before (folds or not, depending on the neighbours); sometimes with
                   parameters that are overridable graph inputs (refused)
training_bn        BN with training_mode=1 (opset >= 15; refused)
per_sample         LayerNormalization (opset 17) or InstanceNormalization: reported as not foldable
branches           2-4 parallel branches of one tensor (Conv 3/1/asymmetric [-> BN], a lone BN, the tensor itself,
                   AveragePool [-> BN]; grouped or not) summed by Add, some subtracted by Sub: merge-branches
act                Relu or Identity
output / fanout    the running value becomes a graph output, or is also read by a Relu that is one
=================  ==========================================================================================

BN statistics are random but valid: typical, wide (gamma in [-2, 2], var log-uniform in [1e-3, 10]), tiny
(var 1e-8 with the default epsilon 1e-5) or some variances exactly 0, with a random epsilon; parameters come from
initializers or Constant nodes, sometimes shared with an earlier BN or read as a bias elsewhere, and (float16
models, opset >= 15) sometimes in float32. dtypes: float32 mostly, float64 and float16 sometimes; opsets 11, 13,
15, 17. float64 models use no Conv/ConvTranspose/InstanceNormalization (onnxruntime's CPU provider has no float64
kernel for them). float16 models keep activations small (typical statistics only), so that the original model
itself does not overflow. A whole model may also get value_info for every intermediate value (shape inference),
some tensors in typed fields (float_data, ...) instead of raw_data, and be read by ``fold_file`` from a file with
all its tensors in external data.

Normalizations by per-sample or batch statistics (LayerNormalization, InstanceNormalization, training-mode BN) are
only placed where the float64 value they normalize is well conditioned (:meth:`_Builder.well_conditioned`): a
nearly constant group far from 0 makes the ORIGINAL model's float32 run miss the exact result by more than any
tolerance, and such a case would say nothing about the fold.

Each case also says what must happen (``must_fold``: label -> rule, ``must_keep``: label -> part of the reason,
``must_stay``: Mul/Add/Sub/Div left alone), where the construction makes it certain; and, when the model holds a
training-mode BN (which the float64 reference does not implement), a reference twin in which that node is written
out in primitive ops.

:func:`check_case` is the property: see its docstring.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

try:  # tests/ on sys.path (rootdir-less "prepend" import mode, or the soak script)
    from onnx_builders import (
        TOL,
        Net,
        _all_nodes,
        fold_and_check,
        random_feeds,
        run_ort,
        run_ref,
        unused_initializers,
    )
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.onnx_builders import (
        TOL,
        Net,
        _all_nodes,
        fold_and_check,
        random_feeds,
        run_ort,
        run_ref,
        unused_initializers,
    )

import bnfold
from bnfold.onnx.fold import PER_SAMPLE_NORMS, fold_file
from bnfold.onnx.merge import MERGE_RULE_NAMES

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
_ELEM = {F16: TP.FLOAT16, F32: TP.FLOAT, F64: TP.DOUBLE}
OPSETS = (11, 13, 15, 17)
MAX_CHANNELS = 12


@dataclass
class FuzzCase:
    """A generated model, the model the float64 reference runs for it, and what its fold must do."""

    model: onnx.ModelProto
    reference: onnx.ModelProto
    dtype: np.dtype
    opset: int
    seed: int
    blocks: list[str]
    must_fold: dict[str, str] = field(default_factory=dict)  # node label -> "rule|rule" ("" when any rule)
    must_keep: dict[str, str] = field(default_factory=dict)  # BN label -> part of its skip reason
    must_stay: list[str] = field(default_factory=list)  # labels of Mul/Add/Sub/Div nodes no rule may fold
    external: bool = False  # fold_file reads it from a file with all tensors in external data

    def describe(self) -> str:
        return (f"{self.dtype.name} opset {self.opset} seed {self.seed}: {' -> '.join(self.blocks)} "
                f"({len(self.model.graph.node)} nodes)")

    def save(self, directory: str | Path) -> Path:
        """Write model.onnx, reference.onnx and case.json (everything :func:`load_case` needs) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(self.model, directory / "model.onnx")
        onnx.save(self.reference, directory / "reference.onnx")
        meta = {"dtype": self.dtype.name, "opset": self.opset, "seed": self.seed, "blocks": self.blocks,
                "must_fold": self.must_fold, "must_keep": self.must_keep, "must_stay": self.must_stay,
                "external": self.external}
        (directory / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
        return directory


def load_case(directory: str | Path) -> FuzzCase:
    directory = Path(directory)
    meta = json.loads((directory / "case.json").read_text())
    return FuzzCase(onnx.load(directory / "model.onnx"), onnx.load(directory / "reference.onnx"),
                    np.dtype(meta["dtype"]), meta["opset"], meta["seed"], meta["blocks"], meta["must_fold"],
                    meta["must_keep"], meta["must_stay"], meta.get("external", False))


# ============================================================================================ the generator


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Builder:
    """The running state of one generated model."""

    def __init__(self, draw, dtype: np.dtype, opset: int, seed: int):
        self.draw = draw
        self.dtype, self.opset, self.seed = dtype, opset, seed
        self.net = Net(dtype, seed=seed, opset=opset)
        self.rng = self.net.rng
        self.cur = ""
        self.shape: list[int] = []
        self.blocks: list[str] = []
        self.must_fold: dict[str, str] = {}
        self.must_keep: dict[str, str] = {}
        self.must_stay: list[str] = []
        self.outputs: list[str] = []
        self.training: list[dict] = []
        self.conv_weights: dict[tuple, list[str]] = {}  # shape -> initializer names, for sharing
        # (channels, dtypes) -> [((scale, bias, mean, var) names, statistics kind, some var == 0)]
        self.bn_params: dict[tuple, list[tuple]] = {}
        self.vectors: dict[tuple, list[str]] = {}  # (length, dtype) -> 1-D float constants, for sharing
        self.tiny_left = 2  # tiny-variance BNs per model (each multiplies activations by up to ~600)
        self.names = 0

    # ---- draws ---------------------------------------------------------------------------------------------
    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) >= 100 - percent

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    # ---- small helpers -----------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def convs_ok(self) -> bool:
        return self.dtype != F64

    def node(self, op: str, inputs, outputs=None, *, named: bool = False, **attrs) -> str:
        if named:
            self.names += 1
            attrs["name"] = f"{op.lower()}_{self.names}"
        return self.net.node(op, inputs, outputs, **attrs)

    def last_label(self) -> str:
        n = self.net.nodes[-1]
        return n.name or f"{n.op_type}({n.output[0]})"

    def tensor(self, value: np.ndarray, base: str = "c", as_constant: bool | None = None) -> str:
        """An initializer or a Constant node holding ``value``."""
        if as_constant is None:
            as_constant = self.chance(20)
        if as_constant:
            return self.net.constant(value, self.net.fresh(base))
        return self.net.init(self.net.fresh(base), value)

    def weight(self, shape, *, share: bool = False, as_constant: bool | None = None) -> str:
        shape = tuple(int(s) for s in shape)
        pool = self.conv_weights.get(shape, [])
        if share and pool and self.chance(60):
            return self.pick(pool)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(self.dtype)
        if as_constant is None:
            as_constant = self.chance(10)
        if as_constant:
            return self.net.constant(value, self.net.fresh("Wc"))
        name = self.net.init(self.net.fresh("W"), value)
        self.conv_weights.setdefault(shape, []).append(name)
        return name

    def bias(self, n: int, shape=None) -> str:
        """A bias of ``shape`` (default [n]); a 1-D one is sometimes a constant that other nodes read too (another
        bias, a BN parameter: the same initializer in different roles)."""
        shape = [n] if shape is None else shape
        pool = self.vectors.get((tuple(shape), self.dtype.name), []) if len(shape) == 1 else []
        if pool and self.chance(10):
            return self.pick(pool)
        name = self.tensor((0.3 * self.rng.standard_normal(shape)).astype(self.dtype), "B", self.chance(10))
        if len(shape) == 1:
            self.vectors.setdefault((tuple(shape), self.dtype.name), []).append(name)
        return name

    # ---- conditioning ----------------------------------------------------------------------------------------
    def value(self, name: str) -> np.ndarray:
        """The float64 reference value of ``name`` on the feeds the property will use (same seed, same inputs)."""
        graph = helper.make_graph(self.net.nodes, "partial", self.net.inputs,
                                  [helper.make_empty_tensor_value_info(name)], self.net.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = _reference_twin(model, self.training)
        return run_ref(model, random_feeds(model, seed=1))[name]

    def well_conditioned(self, axes: tuple[int, ...]) -> bool:
        """Whether normalizing ``self.cur`` over ``axes`` (per-sample norms, training-mode BN) is well posed in the
        model's dtype: its values, over each group's standard deviation, stay small. A group that is constant or
        nearly so but far from 0 (a Relu'd channel shifted by a BN, say) turns the rounding error of the original
        model's own run into an error larger than any tolerance, fold or no fold."""
        value = self.value(self.cur)
        with np.errstate(all="ignore"):
            spread = np.sqrt(value.var(axis=axes, keepdims=True) + 1e-5)
            ratio = np.abs(value) / spread
        limit = {F16: 8.0, F32: 200.0, F64: 1e7}[self.dtype]
        return bool(np.all(np.isfinite(value)) and np.all(ratio <= limit))

    def mark_output(self, name: str) -> None:
        if name == "x":  # a graph input is not also a graph output here
            name = self.node("Identity", [name])
        if name not in self.outputs:
            self.outputs.append(name)

    # ---- BatchNormalization -----------------------------------------------------------------------------------
    def bn(self, x: str, channels: int, *, training: bool = False, overridable: bool = False) -> tuple[str, str]:
        """A BatchNormalization over ``channels``; returns (output, label). ``overridable``: its parameters are
        initializers that are also graph inputs (IR >= 4: a caller may feed other values)."""
        rng = self.rng
        if self.dtype == F16:
            kind = "typical"  # activations must stay far from 65504 in the original model
        else:
            kind = self.pick(["typical", "wide", "tiny", "zero_var"])
            if kind == "tiny" and self.tiny_left <= 0:
                kind = "wide"
        c = channels
        if kind == "typical":
            stats = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.5, c), rng.uniform(0.2, 3, c)]
        else:
            stats = [rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), rng.uniform(-3, 3, c),
                     10.0 ** rng.uniform(-3, 1, c)]
        if kind == "tiny":
            self.tiny_left -= 1
            stats[3] = np.where(rng.random(c) < 0.5, 1e-8, stats[3])
            stats[3][0] = 1e-8
            epsilon = self.pick([None, 1e-5])
        elif kind == "zero_var":
            stats[3] = np.where(rng.random(c) < 0.5, 0.0, stats[3])
            epsilon = self.pick([None, 1e-5, 1e-3, 0.1])
        elif training:  # a batch's variance can be 0 (a channel all zeros after a Relu, say)
            epsilon = self.pick([None, 1e-5, 1e-3, 0.1])
        else:
            epsilon = self.pick([None, 1e-5, 1e-3, 1e-6, 0.1, 0.0])
        # float16 activations with float32 parameters: BatchNormalization-15 types scale/bias and mean/var apart
        dtypes = [self.dtype, self.dtype]
        if self.dtype == F16 and self.opset >= 15:
            dtypes = [F32 if self.chance(25) else F16, F32 if self.chance(25) else F16]
        key = (c, dtypes[0].name, dtypes[1].name)
        shared = [p for p in self.bn_params.get(key, []) if p[1] != "tiny" or self.tiny_left > 0]
        if overridable:
            names = []
            for i, (role, value) in enumerate(zip(("scale", "bias", "mean", "var"), stats)):
                names.append(self.net.init(self.net.fresh(f"bn_{role}"), np.asarray(value).astype(dtypes[i // 2])))
                self.net.input(names[-1], [c], dtypes[i // 2])
        elif not training and shared and self.chance(15):  # the parameters of an earlier BN, read again
            names, kind, has_zero = self.pick(shared)
            names = list(names)
            if kind == "tiny":
                self.tiny_left -= 1
            if (has_zero or kind == "tiny") and epsilon == 0.0:
                epsilon = 1e-5  # var + eps must stay positive (and tiny variances need the epsilon)
        else:
            names = []
            for i, (role, value) in enumerate(zip(("scale", "bias", "mean", "var"), stats)):
                names.append(self.tensor(np.asarray(value).astype(dtypes[i // 2]), f"bn_{role}"))
            # onnxruntime writes a training-mode BN's running statistics over its mean and var initializers, in
            # place: another reader of them would see other values than the model holds. Not shared, then.
            if not training:
                self.bn_params.setdefault(key, []).append((tuple(names), kind, bool(np.any(stats[3] == 0))))
                if dtypes[0] == self.dtype:
                    self.vectors.setdefault(((c,), self.dtype.name), []).extend(names[:2])
        attrs = {}
        if epsilon is not None:
            attrs["epsilon"] = epsilon
        y = self.net.fresh("bn")
        outputs = [y]
        if training:
            attrs["training_mode"] = 1
            # onnxruntime 1.32 crashes (SIGSEGV) on a training-mode BN whose running-statistics outputs are unnamed
            outputs = [y, self.net.fresh("running_mean"), self.net.fresh("running_var")]
            self.training.append({"x": x, "y": y, "rank": self.rank, "scale": stats[0], "bias": stats[1],
                                  "epsilon": float(np.float32(1e-5 if epsilon is None else epsilon)),
                                  "dtypes": dtypes})
        self.node("BatchNormalization", [x] + names, outputs, named=self.chance(30), **attrs)
        return y, self.last_label()

    # ---- convolution attributes ----------------------------------------------------------------------------
    def conv_geometry(self, spatial, *, unpadded: bool = False, same_size: bool = False):
        """(attrs, kernel, output spatial sizes, pads_input) of a random Conv over ``spatial``."""
        nd = len(spatial)
        if same_size:  # stride 1, output size == input size
            kernel = [self.pick([1, 3]) for _ in spatial]
            if self.chance(50):
                return {"auto_pad": "SAME_UPPER"}, kernel, list(spatial), any(k > 1 for k in kernel)
            dil = [self.integer(1, 2) for _ in spatial]
            pads = [(k - 1) // 2 * d for k, d in zip(kernel, dil)]
            return {"pads": pads * 2, "dilations": dil}, kernel, list(spatial), any(pads)
        mode = self.pick(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
        kernel = [self.integer(1, 3) for _ in spatial]
        strides = [self.integer(1, 3) if size > 2 else 1 for size in spatial]
        dil = [self.integer(1, 2) for _ in spatial]
        if mode.startswith("SAME"):
            dil = [1] * nd  # onnxruntime refuses dilations with SAME_*
            if unpadded:
                kernel = [1] * nd
        pb = [0] * nd
        pe = [0] * nd
        if mode == "NOTSET" and not unpadded:
            for i, (k, d) in enumerate(zip(kernel, dil)):
                keff = (k - 1) * d + 1
                pb[i], pe[i] = self.integer(0, min(2, keff - 1)), self.integer(0, min(2, keff - 1))
        out = []
        for i, size in enumerate(spatial):
            if mode.startswith("SAME"):
                out.append(math.ceil(size / strides[i]))
                continue
            while size + pb[i] + pe[i] < (kernel[i] - 1) * dil[i] + 1:
                if dil[i] > 1:
                    dil[i] = 1
                else:
                    kernel[i] -= 1
            out.append((size + pb[i] + pe[i] - (kernel[i] - 1) * dil[i] - 1) // strides[i] + 1)
        attrs: dict = {}
        if mode != "NOTSET":
            attrs["auto_pad"] = mode
        elif any(pb + pe) or self.chance(30):
            attrs["pads"] = pb + pe
        if any(s != 1 for s in strides) or self.chance(20):
            attrs["strides"] = strides
        if any(d != 1 for d in dil) or self.chance(20):
            attrs["dilations"] = dil
        if self.chance(30):
            attrs["kernel_shape"] = kernel
        pads_input = any(pb + pe) or (mode.startswith("SAME") and any(k > 1 for k in kernel))
        return attrs, kernel, out, pads_input

    def conv_channels(self, c_in: int, transpose: bool = False) -> tuple[int, int]:
        """(group, c_out) with group | c_in (depthwise sometimes)."""
        group = c_in if self.chance(20) else self.pick(_divisors(c_in))
        mult = self.integer(1, max(1, min(3, MAX_CHANNELS // group)))
        return group, group * mult

    def conv(self, x: str, shape, *, unpadded: bool = False, same_size: bool = False, share: bool = True,
             weight: str | None = None, geometry=None, group_cout=None):
        """A Conv on ``x`` of ``shape``; returns (output, output shape, pads_input, weight, geometry, group_cout)."""
        c_in, spatial = shape[1], shape[2:]
        geometry = geometry or self.conv_geometry(spatial, unpadded=unpadded, same_size=same_size)
        attrs, kernel, out, pads_input = geometry
        group, c_out = group_cout or self.conv_channels(c_in)
        if weight is None:
            weight = self.weight([c_out, c_in // group, *kernel], share=share)
        inputs = [x, weight]
        if self.chance(60):
            inputs.append(self.bias(c_out))
        if group != 1:
            attrs = dict(attrs, group=group)
        y = self.node("Conv", inputs, named=self.chance(20), **attrs)
        return y, [shape[0], c_out, *out], pads_input, weight, geometry, (group, c_out)

    def conv_transpose(self, x: str, shape, *, same_size: bool = False) -> tuple[str, list[int]]:
        c_in, spatial = shape[1], shape[2:]
        group, c_out = self.conv_channels(c_in)
        kernel, strides, dil, pb, pe, opad, out = [], [], [], [], [], [], []
        for size in spatial:
            k = self.pick([1, 3]) if same_size else self.integer(1, 3)
            s = 1 if same_size or size > 4 else self.integer(1, 3)
            d = 1 if same_size else self.integer(1, 2)
            keff = (k - 1) * d + 1
            if same_size:
                b = e = (k - 1) // 2
                o = 0
            else:
                b, e = self.integer(0, k - 1), self.integer(0, k - 1)
                o = self.integer(0, s - 1)
                while s * (size - 1) + o + keff - b - e < 1:
                    b, e = max(0, b - 1), max(0, e - 1)
            kernel.append(k)
            strides.append(s)
            dil.append(d)
            pb.append(b)
            pe.append(e)
            opad.append(o)
            out.append(s * (size - 1) + o + keff - b - e)
        attrs: dict = {}
        if any(pb + pe) or self.chance(30):
            attrs["pads"] = pb + pe
        if any(s != 1 for s in strides) or self.chance(20):
            attrs["strides"] = strides
        if any(d != 1 for d in dil):
            attrs["dilations"] = dil
        if any(opad):
            attrs["output_padding"] = opad
        if group != 1:
            attrs["group"] = group
        inputs = [x, self.weight([c_in, c_out // group, *kernel], share=True)]
        if self.chance(60):
            inputs.append(self.bias(c_out))
        y = self.node("ConvTranspose", inputs, named=self.chance(20), **attrs)
        return y, [shape[0], c_out, *out]

    def per_channel(self, channels: int, rank: int, *, nonzero: bool = False, mild: bool = False) -> np.ndarray:
        """A constant that broadcasts onto [N, C, ...] along C only, in one of the shapes exporters write."""
        if self.dtype == F16 or mild:
            values = self.rng.uniform(0.5, 1.5, channels) * self.rng.choice([-1.0, 1.0], channels)
        else:
            values = self.rng.uniform(-2, 2, channels)
        if nonzero:
            values = np.where(np.abs(values) < 0.25, 0.25, values)
        options = [[channels] + [1] * (rank - 2), [1, channels] + [1] * (rank - 2)]
        if channels == 1:
            options += [[], [1]]
        if rank == 2:
            options.append([channels])
        shape = self.pick(options)
        if self.chance(10):  # one value for every channel
            shape = self.pick([[], [1]])
            values = values[:1]
        return np.asarray(values, dtype=self.dtype).reshape(shape)

    def not_per_channel(self) -> np.ndarray | None:
        """A constant whose broadcast varies along a non-channel axis, or None when the shape has none."""
        axes = [i for i in range(self.rank) if i != 1 and self.shape[i] > 1]
        if not axes:
            return None
        axis = self.pick(axes)
        shape = [1] * self.rank
        shape[axis] = self.shape[axis]
        return np.asarray(self.rng.uniform(0.5, 1.5, shape), dtype=self.dtype)

    # ================================================================================================ blocks
    def block_conv_bn(self):
        variant = self.pick(["plain", "chain", "between", "extra_output", "residual", "weight_input", "two_bns"])
        if variant == "weight_input":  # an initializer also listed as a graph input: overridable, not constant
            geometry = self.conv_geometry(self.shape[2:])
            group, c_out = self.conv_channels(self.channels)
            w_shape = [c_out, self.channels // group, *geometry[1]]
            w = self.net.init(self.net.fresh("Winput"), (self.rng.standard_normal(w_shape) / 3).astype(self.dtype))
            self.net.input(w, w_shape)
            c, shape, *_ = self.conv(self.cur, self.shape, weight=w, geometry=geometry, group_cout=(group, c_out))
        else:
            c, shape, *_ = self.conv(self.cur, self.shape)
        self.blocks.append(f"conv_bn[{variant}]")
        if variant == "between":
            c = self.node(self.pick(["Relu", "Identity"]), [c])
        if variant == "extra_output":
            self.mark_output(c)
        self.shape = shape
        y, label = self.bn(c, shape[1])
        if variant in ("plain", "chain"):
            self.must_fold[label] = "conv-bn"
        if variant == "chain":
            for _ in range(self.integer(1, 2)):
                y, label = self.bn(y, shape[1])
                self.must_fold[label] = "conv-bn"
        if variant in ("extra_output", "weight_input"):
            self.must_keep[label] = "also used elsewhere" if variant == "extra_output" else "is not constant"
            y = self.node("Relu", [y])
        if variant == "residual":
            self.must_keep[label] = "also used elsewhere"
            y = self.node("Add", [y, c] if self.chance(50) else [c, y])
        if variant == "two_bns":  # the Conv output read by two BNs: neither may change the Conv
            z, label2 = self.bn(c, shape[1])
            self.must_keep[label] = self.must_keep[label2] = "also used elsewhere"
            y = self.node("Add", [y, z])
        self.cur = y

    def block_convtranspose_bn(self):
        y, shape = self.conv_transpose(self.cur, self.shape)
        self.blocks.append("convtranspose_bn")
        self.shape = shape
        for _ in range(1 + (self.chance(20))):
            y, label = self.bn(y, shape[1])
            self.must_fold[label] = "convtranspose-bn"
        self.cur = y

    def block_concat_bn(self):
        variant = self.pick(["clean", "clean", "shared_slice", "nonlinear_slice", "same_twice"])
        self.blocks.append(f"concat_bn[{variant}]")
        parts, widths = [], []
        for _ in range(self.integer(2, 3)):
            if self.chance(25):
                y, shape = self.conv_transpose(self.cur, self.shape, same_size=True)
            else:
                y, shape, *_ = self.conv(self.cur, self.shape, same_size=True)
            parts.append(y)
            widths.append(shape[1])
        if variant == "shared_slice":
            self.mark_output(parts[-1])
        elif variant == "nonlinear_slice":
            parts.append(self.node("Relu", [self.cur]))
            widths.append(self.channels)
        elif variant == "same_twice":
            parts.append(parts[0])
            widths.append(widths[0])
        channels = sum(widths)
        axis = self.pick([1, 1 - self.rank])
        cat = self.node("Concat", parts, axis=axis)
        self.shape = [self.shape[0], channels, *self.shape[2:]]
        y, label = self.bn(cat, channels)
        if variant == "clean":
            self.must_fold[label] = "concat-bn"
        else:
            self.must_keep[label] = {"shared_slice": "also used elsewhere", "nonlinear_slice": "does not come from",
                                     "same_twice": "twice"}[variant]
            y = self.node("Relu", [y])
        self.cur = y

    def block_bn_conv(self):
        padded = self.chance(35)
        relu_first = self.chance(70)
        fanout = self.chance(15)  # the BN feeds two Convs: neither can take it alone
        self.blocks.append(f"bn_conv[{'padded' if padded else 'unpadded'}{',relu' if relu_first else ''}"
                           f"{',fanout' if fanout else ''}]")
        x = self.node("Relu", [self.cur]) if relu_first else self.cur
        b, label = self.bn(x, self.channels)
        y, shape, pads_input, _, geometry, gc = self.conv(b, self.shape, unpadded=not padded)
        if fanout:
            z, *_ = self.conv(b, self.shape, geometry=geometry, group_cout=gc)
            y = self.node("Add", [y, z])
            if relu_first:
                self.must_keep[label] = "no foldable linear op"
        elif not pads_input:
            self.must_fold[label] = "bn-conv" if relu_first else ""
        elif relu_first:
            self.must_keep[label] = "pads its input"
        self.cur, self.shape = y, shape

    def block_conv_affine(self):
        variant = self.pick(["chain", "decomposed_bn", "not_per_channel", "constant_first"])
        self.blocks.append(f"conv_affine[{variant}]")
        y, shape, *_ = self.conv(self.cur, self.shape)
        self.cur, self.shape = y, shape
        self._affine_chain(variant, "affine-mul-add")

    def _affine_chain(self, variant: str, rule: str, ops=("Mul", "Add", "Sub", "Div")):
        """Per-channel Mul/Add/Sub/Div after the linear op that produced ``self.cur``."""
        c = self.channels
        y = self.cur
        if variant == "decomposed_bn":  # (x - mean) / sqrt(var + eps) * gamma + beta, as some exporters write it
            chain = [op for op in ("Sub", "Div", "Mul", "Add") if op in ops]
        else:
            chain = [self.pick(ops) for _ in range(self.integer(1, 3))]
        for op in chain:
            const = self.tensor(self.per_channel(c, self.rank, nonzero=op == "Div"), "k")
            first = op in ("Mul", "Add") and self.chance(30)
            y = self.node(op, [const, y] if first else [y, const], named=self.chance(20))
            self.must_fold[self.last_label()] = rule
        if variant in ("not_per_channel", "constant_first"):
            if variant == "not_per_channel":
                value = self.not_per_channel()
                if value is None:
                    self.cur = y
                    return
                op = self.pick(ops)
                y = self.node(op, [y, self.tensor(np.abs(value) + 0.5 if op == "Div" else value, "k")])
            else:  # c - x: the rule reads Sub and Div with the constant second only
                y = self.node("Sub", [self.tensor(self.per_channel(c, self.rank, mild=True), "k"), y])
            self.must_stay.append(self.last_label())
        self.cur = y

    def block_shared_conv(self):
        self.blocks.append("shared_conv")
        a, shape, _, w, geometry, gc = self.conv(self.cur, self.shape, share=True)
        b, _, _, _, _, _ = self.conv(self.cur, self.shape, weight=w, geometry=geometry, group_cout=gc)
        a, la = self.bn(a, shape[1])
        self.must_fold[la] = "conv-bn"
        second = self.pick(["bn", "mul", "none"])
        if second == "bn":
            b, lb = self.bn(b, shape[1])
            self.must_fold[lb] = "conv-bn"
        elif second == "mul":
            b = self.node("Mul", [b, self.tensor(self.per_channel(shape[1], len(shape)), "k")])
            self.must_fold[self.last_label()] = "affine-mul-add"
        self.cur, self.shape = self.node("Add", [a, b]), shape

    def block_fp16_overflow(self):
        """The folded weights would overflow float16 while every activation stays small: must be refused."""
        where = self.pick(["after", "before"])
        if not np.max(np.abs(self.value(self.cur)), initial=0.0) <= 100:  # the activations stay far below 65504
            return self.block_act()
        self.blocks.append(f"fp16_overflow[{where}]")
        small = np.asarray(2.0 ** -10, dtype=F16)
        r = self.node("Relu", [self.cur])
        x = self.node("Mul", [r, self.tensor(small, "tiny")])
        c_in = self.channels

        def big_weight(shape):
            value = (self.rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[1:])), 1))).astype(F16)
            value.flat[0] = 4000.0
            return self.net.init(self.net.fresh("Wbig"), value)

        def big_bn(inp, channels):
            # s = gamma / sqrt(1e-4 + 1e-5) ~ 38..48: 4000 * s > 65504 but activations stay far below it
            stats = [self.rng.uniform(0.4, 0.5, channels) * self.rng.choice([-1.0, 1.0], channels),
                     self.rng.normal(0, 0.3, channels), self.rng.normal(0, 0.01, channels), np.full(channels, 1e-4)]
            names = [self.tensor(np.asarray(v, dtype=F16), f"bn_{role}")
                     for v, role in zip(stats, ("scale", "bias", "mean", "var"))]
            self.node("BatchNormalization", [inp] + names, named=self.chance(30))
            return self.net.nodes[-1].output[0], self.last_label()

        if where == "after":
            geometry = self.conv_geometry(self.shape[2:])
            group, c_out = self.conv_channels(c_in)
            c, shape, *_ = self.conv(x, self.shape, weight=big_weight([c_out, c_in // group, *geometry[1]]),
                                     geometry=geometry, group_cout=(group, c_out))
            y, label = big_bn(c, c_out)
        else:
            y, label = big_bn(x, c_in)
            geometry = self.conv_geometry(self.shape[2:], unpadded=True)
            group, c_out = self.conv_channels(c_in)
            y, shape, *_ = self.conv(y, self.shape, weight=big_weight([c_out, c_in // group, *geometry[1]]),
                                     geometry=geometry, group_cout=(group, c_out))
            # not a Mul right after the Conv: folding it would shrink the weight and let the BN fold after all
            y = self.node("Relu", [y])
        self.must_keep[label] = "overflow float16"
        self.cur = self.node("Mul", [y, self.tensor(small, "tiny")])
        self.shape = shape

    # ---- rank 2 ----------------------------------------------------------------------------------------
    def _features(self) -> int:
        return self.integer(1, 8)

    def gemm(self, x: str, shape, *, trans_a: int = 0) -> tuple[str, list[int]]:
        m, k = (shape[1], shape[0]) if trans_a else (shape[0], shape[1])
        n = self._features()
        trans_b = self.integer(0, 1)
        inputs = [x, self.weight([n, k] if trans_b else [k, n], share=True)]
        bias = self.pick(["none", "n", "1n", "scalar", "mn", "1"])
        if bias != "none":
            inputs.append(self.bias(n, {"n": [n], "1n": [1, n], "scalar": [], "mn": [m, n], "1": [1]}[bias]))
        attrs = {}
        if trans_a:
            attrs["transA"] = 1
        if trans_b or self.chance(20):
            attrs["transB"] = trans_b
        if self.chance(30):
            attrs["alpha"] = self.pick([0.5, -1.0, 2.0, 0.25])
        if self.chance(30):
            attrs["beta"] = self.pick([0.5, -1.0, 2.0, 0.0])
        return self.node("Gemm", inputs, named=self.chance(20), **attrs), [m, n]

    def matmul(self, x: str, shape, *, add: bool = False) -> str:
        n = self._features()
        y = self.node("MatMul", [x, self.weight([shape[-1], n], share=True)], named=self.chance(20))
        if add:
            const = self.bias(n, self.pick([[n], [1, n]]))
            y = self.node("Add", [y, const] if self.chance(50) else [const, y])
        return y, [*shape[:-1], n]

    def block_gemm_bn(self):
        trans_a = self.chance(10)  # contracts over the batch axis; the BN after it still reads its output channels
        self.blocks.append("gemm_bn[transA]" if trans_a else "gemm_bn")
        y, shape = self.gemm(self.cur, self.shape, trans_a=trans_a)
        self.shape = shape
        for _ in range(1 + self.chance(20)):
            y, label = self.bn(y, shape[1])
            self.must_fold[label] = "gemm-bn"
        self.cur = y

    def block_matmul_bn(self):
        add = self.chance(50)
        self.blocks.append(f"matmul_bn[{'add' if add else 'plain'}]")
        y, self.shape = self.matmul(self.cur, self.shape, add=add)
        self.cur, label = self.bn(y, self.shape[1])
        # a BN before the MatMul may have turned it into a Gemm (carrying the shift as its bias) first
        self.must_fold[label] = "matmul-bn" if add else "matmul-bn|gemm-bn"

    def block_bn_gemm(self):
        trans_a = self.chance(15)
        relu_first = self.chance(70)
        self.blocks.append(f"bn_gemm[{'transA' if trans_a else ''}{',relu' if relu_first else ''}]")
        x = self.node("Relu", [self.cur]) if relu_first else self.cur
        b, label = self.bn(x, self.channels)
        self.cur, self.shape = self.gemm(b, self.shape, trans_a=trans_a)
        if not trans_a:
            self.must_fold[label] = "bn-gemm" if relu_first else ""
        elif relu_first:
            self.must_keep[label] = "transA=1"

    def block_bn_matmul(self):
        relu_first = self.chance(70)
        add = self.chance(40)
        self.blocks.append(f"bn_matmul[{'add' if add else 'plain'}{',relu' if relu_first else ''}]")
        x = self.node("Relu", [self.cur]) if relu_first else self.cur
        b, label = self.bn(x, self.channels)
        self.cur, self.shape = self.matmul(b, self.shape, add=add)
        self.must_fold[label] = "bn-matmul" if relu_first else ""

    def block_dense_affine(self):
        variant = self.pick(["chain", "decomposed_bn", "not_per_channel"])
        gemm = self.chance(50)
        self.blocks.append(f"dense_affine[{'gemm' if gemm else 'matmul'},{variant}]")
        if gemm:
            self.cur, self.shape = self.gemm(self.cur, self.shape)
            ops = ("Mul", "Add", "Sub", "Div")
        else:  # an Add or Sub after a MatMul is its bias, not a normalization
            self.cur, self.shape = self.matmul(self.cur, self.shape)
            ops = ("Mul", "Div")
        self._affine_chain(variant, "affine-mul-add", ops)

    def block_concat_dense_bn(self):
        self.blocks.append("concat_dense_bn")
        a, sa = self.gemm(self.cur, self.shape)
        b, sb = self.matmul(self.cur, self.shape, add=self.chance(40))
        parts = [a, b] if self.chance(50) else [b, a]
        cat = self.node("Concat", parts, axis=self.pick([1, -1]))
        self.shape = [self.shape[0], sa[1] + sb[1]]
        self.cur, label = self.bn(cat, self.shape[1])
        self.must_fold[label] = "concat-bn"

    def block_rank3(self):
        n, f = self.shape
        t = self.pick(_divisors(f))
        where = self.pick(["matmul_bn", "bn_matmul", "bn_flatten"])
        self.blocks.append(f"rank3[{where}]")
        r = self.node("Reshape", [self.cur, self.tensor(np.array([n, t, f // t], dtype=np.int64), "shape")])
        if where == "bn_flatten":  # [N, T, F/T] -> BN over T -> [N, F] -> Gemm/MatMul: T covers F/T features each
            b, label = self.bn(r, t)
            flat = self.node("Reshape", [b, self.tensor(np.array([0, -1], dtype=np.int64), "shape")])
            if self.chance(50):
                self.cur, self.shape = self.gemm(flat, [n, f])
            else:
                self.cur, self.shape = self.matmul(flat, [n, f], add=self.chance(40))
            self.must_fold[label] = "bn-gemm|bn-matmul"
            return
        k = t if self.chance(50) else self._features()  # BN's channel count may equal the weight's out size
        w = self.weight([f // t, k])
        if where == "matmul_bn":
            m = self.node("MatMul", [r, w])
            b, label = self.bn(m, t)
            y = self.node("Relu", [b])
        else:
            b, label = self.bn(r, t)
            y = self.node("MatMul", [b, w])
        self.must_keep[label] = "rank-3"
        self.cur = self.node("Reshape", [y, self.tensor(np.array([0, -1], dtype=np.int64), "shape")])
        self.shape = [n, t * k]

    # ---- subgraphs -----------------------------------------------------------------------------------------
    def block_if(self):
        """An If whose branches hold Conv -> BN (weights and BN parameters local or from the outer graph), or an
        outer Conv -> BN whose Conv output is also read inside a branch (refused)."""
        if not any(i.name == "cond" for i in self.net.inputs):
            self.net.inputs.append(helper.make_tensor_value_info("cond", TP.BOOL, []))
        variant = self.pick(["branches", "branches", "outer_reader"])
        self.blocks.append(f"if[{variant}]")
        geometry = self.conv_geometry(self.shape[2:])
        gc = self.conv_channels(self.channels)
        outer = None
        if variant == "outer_reader":
            outer, shape, *_ = self.conv(self.cur, self.shape, geometry=geometry, group_cout=gc)
            outer_bn, label = self.bn(outer, shape[1])
            self.must_keep[label] = "also used elsewhere"
        graphs = {}
        for branch in ("then_branch", "else_branch"):
            pools = ({k: list(v) for k, v in self.conv_weights.items()}, {k: list(v) for k, v in self.vectors.items()},
                     {k: list(v) for k, v in self.bn_params.items()})
            nodes, inits = self.net.nodes, self.net.inits
            self.net.nodes, self.net.inits = [], []
            try:
                if outer is not None:
                    y = self.node(self.pick(["Relu", "Identity"]), [outer])
                else:
                    y, shape, *_ = self.conv(self.cur, self.shape, geometry=geometry, group_cout=gc)
                    for _ in range(self.pick([0, 1, 1, 1, 2])):
                        y, label = self.bn(y, shape[1])
                        self.must_fold[label] = "conv-bn"
                out = helper.make_tensor_value_info(y, _ELEM[self.dtype], shape)
                graphs[branch] = helper.make_graph(self.net.nodes, self.net.fresh(branch), [], [out], self.net.inits)
            finally:  # branch-local names must not leak into the outer graph's pools
                self.net.nodes, self.net.inits = nodes, inits
                self.conv_weights, self.vectors, self.bn_params = pools
        y = self.node("If", ["cond"], named=True, **graphs)
        if outer is not None:
            y = self.node("Add", [outer_bn, y])
        self.cur, self.shape = y, shape

    # ---- rank changes ------------------------------------------------------------------------------------
    def block_flatten(self):
        variant = self.pick(["plain", "bn_head", "bn_head", "bad_axis", "bad_reshape"])
        relu_first = variant in ("bad_axis", "bad_reshape") or self.chance(70)
        n, rest = self.shape[0], int(np.prod(self.shape[1:]))
        self.channels_before_flatten = self.channels
        x, label = self.cur, None
        if variant != "plain":
            if relu_first:
                x = self.node("Relu", [x])
            x, label = self.bn(x, self.channels)
        if variant == "bad_axis":
            y = self.node("Flatten", [x], axis=2)
            shape = [n * self.channels, int(np.prod(self.shape[2:]))]
        elif variant == "bad_reshape":  # moves spatial positions into the batch axis
            inner = int(np.prod(self.shape[2:]))
            if inner == 1:  # nothing to move: the channels go to the batch axis instead
                target, shape = [-1, 1], [n * self.channels, 1]
            else:
                target, shape = [-1, inner], [n * self.channels, inner]
            y = self.node("Reshape", [x, self.tensor(np.array(target, dtype=np.int64), "shape")])
        else:
            how = self.pick(["flatten", "flatten_neg", "0,-1", "n,-1", "-1,k", "n,k", "0,k"])
            if how.startswith("flatten"):
                y = self.node("Flatten", [x], **({"axis": 1 - self.rank} if how == "flatten_neg" else
                                                  ({"axis": 1} if self.chance(50) else {})))
            else:
                target = [{"0": 0, "n": n, "-1": -1}[a] if a in ("0", "n", "-1") else rest for a in how.split(",")]
                y = self.node("Reshape", [x, self.tensor(np.array(target, dtype=np.int64), "shape")])
            shape = [n, rest]
        head = variant != "plain" or self.chance(50)
        self.blocks.append(f"flatten[{variant}{',head' if head else ''}]")
        self.cur, self.shape = y, shape
        if head:
            if self.chance(50):
                self.cur, self.shape = self.gemm(y, shape)
                rule = "bn-gemm"
            else:
                self.cur, self.shape = self.matmul(y, shape, add=self.chance(40))
                rule = "bn-matmul"
            if variant == "bn_head":
                self.must_fold[label] = rule if relu_first else ""
        if variant == "bad_axis":
            self.must_keep[label] = "Flatten axis=2"
        elif variant == "bad_reshape" and self.channels_before_flatten > 1:  # one channel: a plain flatten
            self.must_keep[label] = "can not prove Reshape"

    def block_unflatten(self):
        n, f = self.shape
        nd = self.integer(1, 3)
        spatial = [1] * nd
        if nd == 1 or self.chance(50):  # [N, F] -> [N, F/h, h]: channels outermost, as flattening left them
            h = self.pick(_divisors(f))
            spatial[0] = h
        c = f // int(np.prod(spatial))
        self.blocks.append(f"unflatten[{nd}d]")
        shape = [n, c, *spatial]
        self.cur = self.node("Reshape", [self.cur, self.tensor(np.array(shape, dtype=np.int64), "shape")])
        self.shape = shape

    # ---- anywhere -----------------------------------------------------------------------------------------
    def block_branches(self):
        """Parallel linear branches of one tensor, summed or subtracted (RepVGG/MobileOne/ACNet/DBB/FastViT style):
        Convs with centred kernels (1, 3 or asymmetric), each with or without its BN, a lone BN, the tensor itself,
        an AveragePool (padding counted or not). What ``merge-branches`` merges, or refuses with its reason."""
        c, rank = self.channels, self.rank - 2
        group = self.pick([1, c])
        x = self.node("Relu", [self.cur])  # the shared input: read by every branch
        kinds, terms = [], []
        for _ in range(self.integer(2, 4)):
            kind = self.pick(["conv3", "conv3", "conv1", "asym", "bn", "identity", "avgpool"])
            kinds.append(kind)
            if kind in ("conv3", "conv1", "asym"):
                kernel = [{"conv3": 3, "conv1": 1}.get(kind) or self.pick([1, 3]) for _ in range(rank)]
                pads = [(k - 1) // 2 for k in kernel] * 2
                inputs = [x, self.weight([c, c // group, *kernel])]
                if self.chance(30):
                    inputs.append(self.bias(c))
                y = self.node("Conv", inputs, kernel_shape=kernel, pads=pads, group=group)
                if self.chance(70):
                    y, _ = self.bn(y, c)
            elif kind == "bn":
                y, _ = self.bn(x, c)
            elif kind == "identity":
                y = x
            else:
                y = self.node("AveragePool", [x], kernel_shape=[3] * rank, pads=[1] * (2 * rank),
                              count_include_pad=self.pick([0, 1]))
                if self.chance(50):
                    y, _ = self.bn(y, c)
            terms.append(y)
        ops = ["Sub" if self.chance(25) else "Add" for _ in terms[1:]]  # Sub: FastViT's RepMixer subtracts one
        self.blocks.append(f"branches[{','.join(kinds)},group={'1' if group == 1 else 'c'}"
                           f"{',sub' if 'Sub' in ops else ''}]")
        total = terms[0]
        for op, term in zip(ops, terms[1:]):
            total = self.node(op, [total, term])
        self.cur = self.node("Relu", [total])

    def block_bn(self):
        overridable = self.chance(15)
        self.blocks.append("bn[overridable]" if overridable else "bn")
        self.cur, label = self.bn(self.cur, self.channels, overridable=overridable)
        if overridable:
            self.must_keep[label] = "can be overridden at run time"

    def block_training_bn(self):
        if not self.well_conditioned((0, *range(2, self.rank))):
            return self.block_act()
        self.blocks.append("training_bn")
        self.cur, label = self.bn(self.cur, self.channels, training=True)
        self.must_keep[label] = "training mode"

    # Normalizing by statistics of fewer than MIN_REDUCED values (a variance of 0 or nearly) makes the original
    # model itself ill-conditioned in float32: onnxruntime's result then differs from the exact one by more than
    # any tolerance, fold or no fold. Such normalizations are not generated.
    MIN_REDUCED = 4

    def _ln_axes(self) -> list[int]:
        return [a for a in range(1, self.rank) if math.prod(self.shape[a:]) >= self.MIN_REDUCED]

    def _per_sample_options(self) -> list[str]:
        options = []
        if self.opset >= 17 and self._ln_axes():
            options.append("LayerNormalization")
        if self.rank >= 3 and self.convs_ok and math.prod(self.shape[2:]) >= self.MIN_REDUCED:
            options.append("InstanceNormalization")
        return options

    def block_per_sample(self):
        op = self.pick(self._per_sample_options())
        axis = self.pick(self._ln_axes()) if op == "LayerNormalization" else 2
        if not self.well_conditioned(tuple(range(axis, self.rank))):
            return self.block_act()
        self.blocks.append(op)
        if op == "LayerNormalization":
            shape = self.shape[axis:]
            axis_attr = axis - self.rank if self.chance(50) else axis
            inputs = [self.cur, self.weight(shape, as_constant=False)]
            if self.chance(70):
                inputs.append(self.bias(0, list(shape)))
            self.cur = self.node(op, inputs, named=self.chance(30), axis=axis_attr)
        else:
            c = self.channels
            scale = self.net.init(self.net.fresh("in_scale"), self.rng.uniform(0.5, 1.5, c).astype(self.dtype))
            self.cur = self.node(op, [self.cur, scale, self.bias(c)], named=self.chance(30))

    def block_act(self):
        op = self.pick(["Relu", "Identity"])
        self.blocks.append(op.lower())
        self.cur = self.node(op, [self.cur])

    def block_output(self):
        self.blocks.append("output")
        self.mark_output(self.cur)

    def block_fanout(self):
        self.blocks.append("fanout")
        self.mark_output(self.node("Relu", [self.cur]))

    # ---- the menu ------------------------------------------------------------------------------------------
    def menu(self) -> list[str]:
        common = ["bn", "act", "output", "fanout"]
        if self.opset >= 15 and self.shape[0] * math.prod(self.shape[2:]) >= self.MIN_REDUCED:
            common.append("training_bn")
        if self._per_sample_options():
            common.append("per_sample")
        if self.rank == 2:
            dense = ["gemm_bn", "gemm_bn", "matmul_bn", "matmul_bn", "bn_gemm", "bn_matmul", "dense_affine",
                     "concat_dense_bn", "rank3"]
            if self.convs_ok:
                dense.append("unflatten")
            return dense * 2 + common
        spatial = ["flatten"]
        if self.convs_ok:
            spatial += ["conv_bn", "conv_bn", "conv_bn", "convtranspose_bn", "concat_bn", "bn_conv", "bn_conv",
                        "conv_affine", "shared_conv", "if", "branches"]
            if self.dtype == F16:
                spatial.append("fp16_overflow")
        return spatial * 2 + common


def _start_shape(b: _Builder) -> list[int]:
    n = b.integer(1, 3)
    rank = b.pick([2, 3, 4, 5] if b.convs_ok else [2, 2, 4])
    if rank == 2:
        return [n, b.integer(1, 8)]
    nd = rank - 2
    top = {1: 10, 2: 6, 3: 4}[nd]
    return [n, b.integer(1, 6), *[b.integer(1, top) for _ in range(nd)]]


def _reference_twin(model: onnx.ModelProto, training: list[dict]) -> onnx.ModelProto:
    """``model`` with every training-mode BatchNormalization written out in ops the float64 reference knows."""
    if not training:
        return model
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    by_output = {t["y"]: t for t in training}
    nodes = []
    for node in twin.graph.node:
        t = by_output.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if t is None:
            nodes.append(node)
            continue
        y, x, rank = t["y"], t["x"], t["rank"]
        axes = [0] + list(range(2, rank))
        shape = [len(t["scale"])] + [1] * (rank - 2)

        def init(name, value):
            twin.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float64), name))
            return name

        def cast(values, dtype, shape=shape):  # the parameter as stored, exactly, in float64
            return np.asarray(values).astype(dtype).astype(np.float64).reshape(shape)

        p = f"__twin_{y}_"
        scale = init(p + "scale", cast(t["scale"], t["dtypes"][0]))
        bias = init(p + "bias", cast(t["bias"], t["dtypes"][0]))
        eps = init(p + "eps", np.float64(t["epsilon"]))
        nodes += [
            helper.make_node("ReduceMean", [x], [p + "mean"], axes=axes, keepdims=1),
            helper.make_node("Sub", [x, p + "mean"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"]),
            helper.make_node("ReduceMean", [p + "d2"], [p + "var"], axes=axes, keepdims=1),
            helper.make_node("Add", [p + "var", eps], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "std"]),
            helper.make_node("Div", [p + "d", p + "std"], [p + "n"]),
            helper.make_node("Mul", [p + "n", scale], [p + "s"]),
            helper.make_node("Add", [p + "s", bias], [y]),
        ]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    return twin


def _store_typed(model: onnx.ModelProto, rng: np.random.Generator, which: str) -> None:
    """Rewrite some initializers and Constant values with typed fields instead of raw_data, as some converters
    write them (same values). ``which``: "some" (about a third), "all", or the tensors of one role ("biases",
    "weights", "bn_params", by the names the builder gives them)."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    def role(name: str) -> str:
        return "bn_params" if name.startswith("bn_") else "biases" if name.startswith("B") else \
            "weights" if name.startswith("W") else "other"

    for t in tensors:
        if which == "some" and rng.random() >= 1 / 3:
            continue
        if which not in ("some", "all") and role(t.name) != which:
            continue
        value = numpy_helper.to_array(t)
        typed = helper.make_tensor(t.name, t.data_type, list(t.dims), value.flatten().tolist(), raw=False)
        t.CopyFrom(typed)


@st.composite
def fuzz_cases(draw, max_blocks: int = 6) -> FuzzCase:
    """A random valid model (full checker, onnxruntime) and what folding it must do; deterministic in the draws."""
    dtype = draw(st.sampled_from([F32, F32, F32, F32, F64, F16, F16]))
    opset = draw(st.sampled_from(OPSETS))
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(draw, dtype, opset, seed)
    b.shape = _start_shape(b)
    b.cur = b.net.input("x", b.shape)
    for _ in range(draw(st.integers(1, max_blocks))):
        getattr(b, "block_" + b.pick(b.menu()))()
    b.mark_output(b.cur)
    for name in b.outputs:
        b.net.output(name)
    model = b.net.model()
    if b.chance(25):  # some tensors in typed fields (float_data, int32_data for float16, ...), not raw_data
        which = b.pick(["some", "all", "biases", "weights", "bn_params"])
        _store_typed(model, b.rng, which)
        b.blocks.append(f"typed_fields[{which}]")
    if b.chance(25):  # value_info on every intermediate value, as many exporters leave it: it must not go stale
        model = onnx.shape_inference.infer_shapes(model)
        b.blocks.append("value_info")
    external = b.chance(25)
    if external:
        b.blocks.append("external_data")
    return FuzzCase(model, _reference_twin(model, b.training), dtype, opset, seed, b.blocks, b.must_fold,
                    b.must_keep, b.must_stay, external)


# ============================================================================================ the property


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({next((o for o in node.output if o), '?')})"


def _non_finite_constants(model: onnx.ModelProto) -> list[str]:
    bad = []
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(_label(n), a.t) for n in _all_nodes(model.graph) if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for name, t in tensors:
        if t.data_type in (TP.FLOAT, TP.FLOAT16, TP.DOUBLE, TP.BFLOAT16):
            value = numpy_helper.to_array(t)
            if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
                bad.append(name)
    return bad


def check_case(case: FuzzCase, *, through_files: bool = True, workdir: str | Path | None = None) -> None:
    """Everything bnfold promises about folding ``case.model``; raises AssertionError (or the error) when not.

    * the generated model itself is valid: full checker, onnxruntime runs it;
    * :func:`onnx_builders.fold_and_check`: the input is not modified, the folded model passes the full checker,
      keeps its inputs/outputs, leaves no initializer unused, and (onnxruntime CPU, no graph optimizations)
      matches the float64 reference run of the ORIGINAL model (its twin) within the dtype's tolerance;
    * report: ``bn_after`` is the number of BatchNormalization nodes left, each has a skip reason; every
      LayerNormalization/InstanceNormalization left is reported; the BN folds listed account for the difference;
    * no folded constant is NaN or infinite (float16 overflow is refused, never produced);
    * what the construction makes certain (``must_fold``, ``must_keep``, ``must_stay``) happened;
    * determinism: folding again gives byte-identical output and the same report;
    * idempotence: folding the folded model folds nothing and gives identical bytes;
    * ``through_files``: ``fold_file`` to disk twice writes identical bytes, the same model as ``fold_onnx``, and
      ``fold_file`` of its own output writes identical bytes again.
    """
    model = case.model
    onnx.checker.check_model(model, full_check=True)
    assert unused_initializers(model) == [], "generator bug: the original model has unused initializers"
    feeds = random_feeds(model, seed=1)
    if "cond" in feeds:  # both branches of every If
        feeds = [dict(feeds, cond=np.array(v)) for v in (True, False)]
    else:
        feeds = [feeds]
    try:
        for f in feeds:
            run_ort(model, f)
    except Exception as exc:  # a generator bug, not a bnfold one: say so
        raise AssertionError(f"the generated model does not run in onnxruntime: {exc}") from exc

    # The construction's promises (must_fold, must_keep, must_stay) are about the fold rules: the generator does
    # not build branch structures on purpose, so they are checked with the branch merges off; the merged model
    # (the default) is then held to everything that holds for any model.
    first, first_report = bnfold.fold_onnx(model, skip=MERGE_RULE_NAMES)
    folded, report = fold_and_check(model, bn_left=first_report.bn_after, expected_model=case.reference,
                                    tol=TOL[case.dtype], feeds=feeds, skip=MERGE_RULE_NAMES)

    # determinism
    data = folded.SerializeToString()
    assert first.SerializeToString() == data, "two folds of the same model differ"
    assert first_report.to_dict() == report.to_dict(), "two folds of the same model report differently"

    # the report
    left = Counter(_label(n) for n in _all_nodes(folded.graph) if n.op_type == "BatchNormalization")
    skipped = Counter(s.bn for s in report.skipped if s.op_type == "BatchNormalization")
    assert left == skipped, f"BN left {sorted(left)} vs skipped {sorted(skipped)}"
    assert all(s.reason for s in report.skipped), report.summary_lines()
    norms = Counter((n.op_type, _label(n)) for n in _all_nodes(folded.graph) if n.op_type in PER_SAMPLE_NORMS)
    assert norms == Counter((s.op_type, s.bn) for s in report.skipped if s.op_type in PER_SAMPLE_NORMS)
    bn_labels = {_label(n) for n in _all_nodes(model.graph) if n.op_type == "BatchNormalization"}
    assert report.bn_before - report.bn_after == sum(f.bn in bn_labels for f in report.folded), \
        report.summary_lines()
    assert len(folded.graph.node) <= len(model.graph.node)
    bad = _non_finite_constants(folded)
    assert not bad, f"non-finite folded constants: {bad}"

    # what the construction makes certain
    folds = {f.bn: f.rule for f in report.folded}
    reasons = {s.bn: s.reason for s in report.skipped}
    for label, rule in case.must_fold.items():
        assert label in folds, f"{label} should fold ({rule or 'any rule'}): {reasons.get(label)}"
        assert not rule or folds[label] in rule.split("|"), f"{label} folded by {folds[label]}, expected {rule}"
    for label, reason in case.must_keep.items():
        assert label in reasons, f"{label} should stay ({reason}), folded by {folds.get(label)}"
        assert reason.lower() in reasons[label].lower(), f"{label}: expected '{reason}' in '{reasons[label]}'"
    labels_left = {_label(n) for n in folded.graph.node}
    for label in case.must_stay:
        assert label in labels_left and label not in folds, f"{label} should have been left alone"

    # idempotence
    again, again_report = bnfold.fold_onnx(folded, skip=MERGE_RULE_NAMES)
    assert again_report.folded == [], again_report.summary_lines()
    assert again_report.bn_before == again_report.bn_after == report.bn_after
    assert again.SerializeToString() == data, "folding the folded model changed it"

    # the default: folds and branch merges
    first, first_report = bnfold.fold_onnx(model)
    merged, report = fold_and_check(model, bn_left=first_report.bn_after, expected_model=case.reference,
                                    tol=TOL[case.dtype], feeds=feeds)
    data = merged.SerializeToString()
    assert first.SerializeToString() == data, "two merges of the same model differ"
    assert first_report.to_dict() == report.to_dict(), "two merges of the same model report differently"
    assert report.bn_before - report.bn_after == sum(f.bn in bn_labels for f in report.folded), \
        report.summary_lines()
    assert len(merged.graph.node) <= len(folded.graph.node)
    left = Counter(_label(n) for n in _all_nodes(merged.graph) if n.op_type == "BatchNormalization")
    assert left == Counter(s.bn for s in report.skipped if s.op_type == "BatchNormalization")
    again, again_report = bnfold.fold_onnx(merged)
    assert not again_report.modified, again_report.summary_lines()
    assert again.SerializeToString() == data, "merging the merged model changed it"

    if through_files:
        check_files(model, data, workdir, external=case.external)


#: Bugs in files this fuzzer may not fix, while they are open: a case that hits one is counted here (the soak
#: prints the counts) instead of failing, so that new failures stand out, and an ``xfail(strict=True)`` test in
#: tests/test_fuzz.py pins it; when it is fixed, that test and the tolerance go. None is open at present.
KNOWN_ISSUES: Counter = Counter()


def _write_external(model: onnx.ModelProto, path: Path, size_threshold: int = 0) -> None:
    """Save ``model`` with its tensors in ``<name>.data`` (all of them with size_threshold 0, as some exporters
    do; onnx.save's default 1024 keeps small ones inline)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
              size_threshold=size_threshold)


def _files(directory: Path) -> dict[str, bytes]:
    """The files of a directory by name (an empty data file counts as none)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.stat().st_size}


def _canonical(model: onnx.ModelProto) -> bytes:
    """The model with every tensor (initializers, subgraphs', Constant values) stored as plain raw_data: the same
    model whatever the storage."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def graphs(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from graphs(g)

    for graph in graphs(copy.graph):
        tensors = list(graph.initializer)
        tensors += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in tensors:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    return copy.SerializeToString()


def check_files(model: onnx.ModelProto, folded_bytes: bytes | None = None,
                workdir: str | Path | None = None, *, external: bool = False) -> None:
    """``fold_file`` is deterministic, agrees with ``fold_onnx`` (``folded_bytes``) and is idempotent on disk.

    ``external``: the input is saved with all its tensors in an external data file (the folded models are then
    compared value by value, whatever the storage)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        dirs = {k: tmp / k for k in ("src", "a", "b", "c")}
        for d in dirs.values():
            d.mkdir()
        src = dirs["src"] / "model.onnx"
        if external:
            _write_external(model, src)
        else:
            src.write_bytes(model.SerializeToString())
        fold_file(src, dirs["a"] / "model.onnx")
        fold_file(src, dirs["b"] / "model.onnx")
        written = _files(dirs["a"])
        assert written == _files(dirs["b"]), "fold_file wrote different bytes on repeat"
        if folded_bytes is not None:
            loaded = onnx.load(dirs["a"] / "model.onnx")
            if not external:
                same = loaded.SerializeToString() == folded_bytes
            else:
                same = _canonical(loaded) == _canonical(onnx.load_from_string(folded_bytes))
            assert same, "fold_file and fold_onnx give different models"
        fold_file(dirs["a"] / "model.onnx", dirs["c"] / "model.onnx")
        assert _files(dirs["c"]) == written, "fold_file of its own output changed it"
