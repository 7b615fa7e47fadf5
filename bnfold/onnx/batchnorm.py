"""The one reader of an ONNX BatchNormalization's inference-mode semantics: used by the fold, the audit and
onnx/calibrate, so that all three agree on the epsilon default and on which nodes normalize by stored statistics.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import InputError
from .constant_ops import attribute_value
from .nodes import node_label
from .plan import Refusal

# ONNX float attributes are float32: an absent epsilon means float32(1e-5), as runtimes read it.
DEFAULT_EPSILON = float(np.float32(1e-5))


def inference_epsilon(node: onnx.NodeProto, opset: int) -> float | Refusal:
    """The epsilon of a BatchNormalization that normalizes by its stored statistics, else why it does not."""
    if opset < 6:
        return Refusal("unsupported-opset", f"BatchNormalization-{opset} (consumed_inputs era) is not supported")
    outputs = node.output
    if len(outputs) > 1 and any(outputs[1:]):
        return Refusal("training-mode", "training mode: the node also outputs running statistics")
    epsilon = training_mode = is_test = spatial = None
    for attr in node.attribute:  # one pass: the first of each name counts, as get_attr reads them
        name = attr.name
        if name == "epsilon" and epsilon is None:
            epsilon = attribute_value(attr)
        elif name == "training_mode" and training_mode is None:
            training_mode = attr.i
        elif name == "is_test" and is_test is None:
            is_test = attr.i
        elif name == "spatial" and spatial is None:
            spatial = attr.i
    if training_mode:
        return Refusal("training-mode", "training mode (training_mode=1): it normalizes by batch statistics")
    if opset < 7 and not is_test:
        return Refusal("training-mode", "training mode (is_test=0 in BatchNormalization-6)")
    if opset < 9 and spatial == 0:
        return Refusal("not-spatial", "spatial=0: statistics per activation, not per channel")
    if len(node.input) < 5 or not outputs or not outputs[0]:
        return Refusal("malformed", "malformed BatchNormalization (needs 5 inputs and an output)")
    return DEFAULT_EPSILON if epsilon is None else epsilon


def check_parameter_lengths(label: "str | onnx.NodeProto", lengths: list[int]) -> None:
    """scale, B, mean and var of different lengths make the model invalid. ``label``: a name, or the node."""
    if len(set(lengths)) > 1:
        raise InputError(f"invalid model: BatchNormalization {_name(label)} has scale, B, mean and var of lengths "
                         f"{lengths}")


def check_channels(label: "str | onnx.NodeProto", channels: int, input_shape: list | None) -> None:
    """A BN whose parameters do not match its input's channel count (when the shape is known) is invalid."""
    if input_shape is not None and len(input_shape) >= 2 and isinstance(input_shape[1], int) and \
            input_shape[1] != channels:
        raise InputError(f"invalid model: BatchNormalization {_name(label)} has {channels} channels, "
                         f"but its input has {input_shape[1]}")


def _name(label: "str | onnx.NodeProto") -> str:
    return label if isinstance(label, str) else node_label(label)  # a node is labelled only for an error
