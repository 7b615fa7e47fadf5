"""The folding math, on numpy arrays only, in float64.

Every fold is a per-channel affine ``y = s*x + t`` absorbed into a linear op's weight and bias:

* after the op (the affine reads the op's output channels):  ``W' = s·W`` along the output-channel axis,
  ``b' = s·b + t``;
* before the op (the affine feeds the op's input channels):  ``W' = W·s`` along the input-channel axis,
  ``b' = b + Σ W·t`` over everything but the output-channel axis. Exact only when every input value the op reads
  went through the affine (no zero padding).

A linear op only says where its channels are in the weight: ``axis`` and, for grouped convolutions, ``groups``.
With groups, the weight axis holds the channel *within* a group and axis 0 enumerates rows that belong to groups
in order: Conv's input channels (``[C_out, C_in/g, k...]``) and ConvTranspose's output channels
(``[C_in, C_out/g, k...]``) both have that shape.
"""

from __future__ import annotations

import numpy as np


class FoldRefused(ValueError):
    """The math can not be done exactly (shapes do not agree, values would overflow): the fold is skipped.

    ``code`` is the stable kebab-case reason code a report's skip carries."""

    def __init__(self, message: str, code: str = "fold-refused"):
        super().__init__(message)
        self.code = code


def bn_to_affine(scale, bias, mean, var, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization in inference mode as ``y = s*x + t`` (float64); FoldRefused says why when it can not be.

    ``s = scale / sqrt(var + eps)``, ``t = bias - mean * s``: the same float64 operations as
    :func:`bn_to_affine_flat`, so both give identical bits.
    """
    params = np.array([scale, bias, mean, var], dtype=np.float64)
    with np.errstate(all="ignore"):
        s, t, valid = bn_to_affine_flat(*params, np.float64(epsilon))
    if valid.all():
        return s, t
    var = params[3]
    if not np.isfinite(params).all():
        raise FoldRefused("parameters contain NaN or infinity", "invalid-statistics")
    if (var < 0).any():
        raise FoldRefused(f"negative running variance (min {var.min():.3g})", "invalid-statistics")
    if not (var + np.float64(epsilon) > 0).all():
        raise FoldRefused(f"variance + epsilon is not positive (min {(var + np.float64(epsilon)).min():.3g})",
                          "invalid-statistics")
    raise FoldRefused("the folded scale or shift overflows float64", "invalid-statistics")


def bn_to_affine_flat(scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many BatchNormalizations at once, their channels laid end to end: float64 vectors of one value per channel,
    ``epsilon`` one float or one per channel. Returns ``s``, ``t`` and ``valid`` per channel: False where a
    parameter is not finite, the variance is negative, ``var + eps`` is not positive, or ``s``/``t`` overflow (a
    layer with such a channel must not be folded).

    Batching matters: a model with thousands of BN layers would otherwise spend most of its fold time in the
    per-call overhead of numpy on arrays of a few dozen values. Call under ``np.errstate(all="ignore")`` (the bad
    values are what ``valid`` reports; the ONNX fold pass holds one errstate for all of its math).
    """
    s = scale / np.sqrt(var + epsilon)
    t = bias - mean * s
    # Enough to catch every bad parameter: a non-finite scale, bias or mean, or var + eps <= 0, makes s or t
    # non-finite; only an infinite variance (s = 0) needs its own test.
    valid = np.isfinite(s) & np.isfinite(t) & np.isfinite(var) & (var >= 0)
    return s, t, valid


def channel_multiplier(values: np.ndarray, weight_shape: tuple[int, ...], axis: int, groups: int = 1) -> np.ndarray:
    """An array broadcastable against a weight of ``weight_shape`` that puts ``values[c]`` on channel ``c``.

    ``axis == 0``: channels run along axis 0. ``axis == 1``: channel ``c`` of group ``g`` sits at column
    ``c - g*(C/groups)`` of the rows of group ``g`` (rows split evenly into ``groups``).
    """
    values = np.asarray(values, dtype=np.float64)
    channels = values.shape[0]
    ndim = len(weight_shape)
    if axis == 0:
        if groups != 1 or channels != weight_shape[0]:
            raise FoldRefused(f"{channels} channels do not match weight axis 0 of size {weight_shape[0]}",
                              "channel-mismatch")
        return values.reshape((channels,) + (1,) * (ndim - 1))
    if axis != 1:
        raise ValueError("axis must be 0 or 1")
    rows, per_group = weight_shape[0], weight_shape[1]
    if groups < 1 or rows % groups or channels != per_group * groups:
        raise FoldRefused(
            f"{channels} channels do not match a weight of shape {list(weight_shape)} with group={groups}",
            "channel-mismatch")
    if groups == 1:  # one group: a broadcast along axis 1, no table
        return values.reshape((1, channels) + (1,) * (ndim - 2))
    table = np.repeat(values.reshape(groups, per_group), rows // groups, axis=0)
    return table.reshape(table.shape + (1,) * (ndim - 2))


def absorb_after(weight, bias, s, t, *, axis: int, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``s*y + t`` applied to the op's output into its weight and bias (``bias`` may be None)."""
    weight = np.asarray(weight)
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    new_w = np.multiply(weight, channel_multiplier(s, weight.shape, axis, groups), dtype=np.float64)
    new_b = t.copy() if bias is None else s * np.asarray(bias, dtype=np.float64) + t
    return new_w, new_b


def absorb_before(weight, bias, s, t, *, in_axis: int, out_axis: int, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``s*x + t`` applied to the op's input into its weight and bias (``bias`` may be None).

    The bias gains ``Σ W·t`` summed over every weight axis except ``out_axis``; returned with the shape of the
    output channels (broadcast against ``bias`` when given).
    """
    w = np.asarray(weight, dtype=np.float64)
    new_w = w * channel_multiplier(s, w.shape, in_axis, groups)
    reduce_axes = tuple(a for a in range(w.ndim) if a != out_axis)
    shift = (w * channel_multiplier(t, w.shape, in_axis, groups)).sum(axis=reduce_axes)
    new_b = shift if bias is None else np.asarray(bias, dtype=np.float64) + shift
    return new_w, new_b


def cast_checked(values: np.ndarray, dtype, what: str = "folded weights") -> np.ndarray:
    """Round float64 results once to ``dtype``; refuse when a value is not finite or overflows the dtype."""
    with np.errstate(over="ignore", invalid="ignore"):  # (an overflowing cast is refused, not warned about)
        return cast_checked_in_errstate(values, dtype, what)


def cast_checked_in_errstate(values: np.ndarray, dtype, what: str = "folded weights") -> np.ndarray:
    """:func:`cast_checked` for a caller that holds ``np.errstate(over="ignore", invalid="ignore")`` already: the
    ONNX fold pass holds one for all of its math, and entering another per cast costs more than casting a small
    tensor."""
    values = np.asarray(values, dtype=np.float64)
    out = values.astype(dtype)
    if np.isfinite(out).all():  # one pass in the common case; diagnose only on failure
        return out
    if not np.isfinite(values).all():
        raise FoldRefused(f"{what} would not be finite", "would-overflow")
    peak = float(np.max(np.abs(values)))
    raise FoldRefused(f"{what} would overflow {np.dtype(dtype).name} (max |value| {peak:.4g})", "would-overflow")
