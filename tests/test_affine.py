"""bnfold.affine against hand-written float64 numpy: the BN formula, and linear ops written as explicit einsums.

Each absorb test applies the affine and the op separately (affine then op, or op then affine) and compares
with the op run on the folded weight and bias.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from bnfold.affine import FoldRefused, absorb_after, absorb_before, bn_to_affine, cast_checked, channel_multiplier

# ---------------------------------------------------------------------------------------------- numpy ops


def conv2d(x, w, b, groups=1, stride=(1, 1)):
    """Grouped 2-D convolution without padding. x [N, C_in, H, W], w [C_out, C_in/g, kh, kw]."""
    n, c_in, _, _ = x.shape
    c_out, cg, kh, kw = w.shape
    assert c_in == cg * groups and c_out % groups == 0
    patches = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride[0], ::stride[1]]  # [N,C,H',W',kh,kw]
    patches = patches.reshape(n, groups, cg, *patches.shape[2:])
    wg = w.reshape(groups, c_out // groups, cg, kh, kw)
    y = np.einsum("ngchwab,gmcab->ngmhw", patches, wg).reshape(n, c_out, *patches.shape[3:5])
    return y if b is None else y + np.reshape(b, (1, -1, 1, 1))


def conv_transpose1d(x, w, b, groups=1, stride=1):
    """Grouped 1-D transposed convolution, no padding. x [N, C_in, L], w [C_in, C_out/g, K]."""
    n, c_in, length = x.shape
    _, mg, k = w.shape
    cg = c_in // groups
    y = np.zeros((n, groups, mg, (length - 1) * stride + k))
    xg = x.reshape(n, groups, cg, length)
    wg = w.reshape(groups, cg, mg, k)
    for j in range(k):
        y[..., j: j + stride * (length - 1) + 1: stride] += np.einsum("ngcl,gcm->ngml", xg, wg[..., j])
    y = y.reshape(n, groups * mg, -1)
    return y if b is None else y + np.reshape(b, (1, -1, 1))


def gemm(x, w, b, trans_b):
    y = x @ (w.T if trans_b else w)
    return y if b is None else y + b


def per_channel(v, ndim):
    """Shape a channel vector to broadcast along axis 1 of an [N, C, ...] tensor."""
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


def affine(x, s, t):
    return per_channel(s, x.ndim) * x + per_channel(t, x.ndim)


def random_st(rng, c):
    return rng.uniform(0.3, 2.0, c) * rng.choice([-1, 1], c), rng.normal(0, 1, c)


# ---------------------------------------------------------------------------------------------- bn_to_affine


def test_bn_to_affine_formula():
    rng = np.random.default_rng(0)
    c = 6
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c)
    mean, var = rng.normal(0, 0.5, c), rng.uniform(0.2, 3, c)
    eps = 1e-3
    s, t = bn_to_affine(gamma, beta, mean, var, eps)
    np.testing.assert_allclose(s, gamma / np.sqrt(var + eps), rtol=1e-15)
    np.testing.assert_allclose(t, beta - mean * gamma / np.sqrt(var + eps), rtol=1e-14, atol=1e-15)
    x = rng.standard_normal((3, c, 4, 4))
    bn = per_channel(gamma, 4) * (x - per_channel(mean, 4)) / np.sqrt(per_channel(var, 4) + eps) + \
        per_channel(beta, 4)
    np.testing.assert_allclose(affine(x, s, t), bn, rtol=1e-13, atol=1e-14)
    assert s.dtype == t.dtype == np.float64


def test_bn_to_affine_works_in_float64_for_low_precision_inputs():
    gamma = np.array([1.3, 0.7], np.float16)
    var = np.array([1e-3, 2.0], np.float16)
    zeros = np.zeros(2, np.float16)
    s, _ = bn_to_affine(gamma, zeros, zeros, var, 1e-5)
    exact = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, exact)


def test_bn_to_affine_zero_variance_uses_epsilon():
    s, t = bn_to_affine([2.0], [1.0], [3.0], [0.0], 1e-4)
    np.testing.assert_allclose(s, [200.0])
    np.testing.assert_allclose(t, [1.0 - 600.0])


@pytest.mark.parametrize("var,eps", [([-1.0, 1.0], 1e-5), ([-1e-5, 1.0], 1e-5), ([np.nan, 1.0], 1e-5),
                                     ([1.0, 1.0], -2.0)])
def test_bn_to_affine_refuses_non_positive_or_non_finite_variance(var, eps):
    with pytest.raises(FoldRefused):
        bn_to_affine([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], var, eps)


@pytest.mark.parametrize("which", ["scale", "bias", "mean"])
def test_bn_to_affine_refuses_non_finite_parameters(which):
    p = {"scale": [1.0, 1.0], "bias": [0.0, 0.0], "mean": [0.0, 0.0]}
    p[which] = [np.inf, 1.0]
    with pytest.raises(FoldRefused):
        bn_to_affine(p["scale"], p["bias"], p["mean"], [1.0, 1.0], 1e-5)


# ---------------------------------------------------------------------------------------------- absorb_after


@pytest.mark.parametrize("c_in,c_out,groups", [(4, 6, 1), (6, 4, 2), (6, 9, 3), (4, 4, 4)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_absorb_after_conv(c_in, c_out, groups, has_bias):
    rng = np.random.default_rng(c_in * c_out + groups)
    x = rng.standard_normal((2, c_in, 6, 5))
    w = rng.standard_normal((c_out, c_in // groups, 3, 2))
    b = rng.standard_normal(c_out) if has_bias else None
    s, t = random_st(rng, c_out)
    new_w, new_b = absorb_after(w, b, s, t, axis=0)
    assert new_w.shape == w.shape and new_b.shape == (c_out,)
    np.testing.assert_allclose(conv2d(x, new_w, new_b, groups), affine(conv2d(x, w, b, groups), s, t),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in,c_out,groups,stride", [(3, 4, 1, 1), (4, 6, 2, 2), (6, 3, 3, 3), (4, 4, 4, 1)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_absorb_after_conv_transpose(c_in, c_out, groups, stride, has_bias):
    rng = np.random.default_rng(c_in * c_out + groups)
    x = rng.standard_normal((2, c_in, 5))
    w = rng.standard_normal((c_in, c_out // groups, 3))
    b = rng.standard_normal(c_out) if has_bias else None
    s, t = random_st(rng, c_out)
    new_w, new_b = absorb_after(w, b, s, t, axis=1, groups=groups)
    assert new_w.shape == w.shape and new_b.shape == (c_out,)
    np.testing.assert_allclose(conv_transpose1d(x, new_w, new_b, groups, stride),
                               affine(conv_transpose1d(x, w, b, groups, stride), s, t), rtol=1e-12, atol=1e-12)


def test_absorb_after_conv_transpose_group_layout_is_not_axis0():
    # With groups, output channel c of group g is column c - g*(C_out/g) of group g's rows: a multiplier
    # indexed as if axis 1 held all output channels would be wrong, so check against an explicit table.
    w = np.ones((4, 2, 1))  # C_in=4, groups=2 -> C_out=4
    s = np.array([1.0, 2.0, 3.0, 4.0])
    new_w, _ = absorb_after(w, None, s, np.zeros(4), axis=1, groups=2)
    np.testing.assert_array_equal(new_w[:, :, 0], [[1, 2], [1, 2], [3, 4], [3, 4]])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5), (3, 5), ()])
def test_absorb_after_gemm(trans_b, bias_shape):
    rng = np.random.default_rng(trans_b)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((5, 4) if trans_b else (4, 5))
    b = None if bias_shape is None else rng.standard_normal(bias_shape)
    s, t = random_st(rng, 5)
    new_w, new_b = absorb_after(w, b, s, t, axis=0 if trans_b else 1)
    np.testing.assert_allclose(gemm(x, new_w, new_b, trans_b), s * gemm(x, w, b, trans_b) + t, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- absorb_before


@pytest.mark.parametrize("c_in,c_out,groups,kernel,stride", [
    (4, 6, 1, (1, 1), (1, 1)), (6, 4, 2, (1, 1), (2, 2)), (6, 9, 3, (3, 2), (1, 2)), (4, 4, 4, (2, 2), (1, 1))])
@pytest.mark.parametrize("has_bias", [True, False])
def test_absorb_before_conv(c_in, c_out, groups, kernel, stride, has_bias):
    rng = np.random.default_rng(c_in + c_out + groups)
    x = rng.standard_normal((2, c_in, 6, 5))
    w = rng.standard_normal((c_out, c_in // groups, *kernel))
    b = rng.standard_normal(c_out) if has_bias else None
    s, t = random_st(rng, c_in)
    new_w, new_b = absorb_before(w, b, s, t, in_axis=1, out_axis=0, groups=groups)
    assert new_w.shape == w.shape and new_b.shape == (c_out,)
    np.testing.assert_allclose(conv2d(x, new_w, new_b, groups, stride), conv2d(affine(x, s, t), w, b, groups, stride),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5)])
def test_absorb_before_gemm(trans_b, bias_shape):
    rng = np.random.default_rng(10 + trans_b)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((5, 4) if trans_b else (4, 5))
    b = None if bias_shape is None else rng.standard_normal(bias_shape)
    s, t = random_st(rng, 4)
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    new_w, new_b = absorb_before(w, b, s, t, in_axis=in_axis, out_axis=out_axis)
    np.testing.assert_allclose(gemm(x, new_w, new_b, trans_b), gemm(s * x + t, w, b, trans_b), rtol=1e-12)


def test_absorb_returns_float64_for_float16_weights():
    w = np.ones((2, 3, 1, 1), np.float16)
    new_w, new_b = absorb_after(w, None, [1.0 / 3, 2.0], [0.1, 0.2], axis=0)
    assert new_w.dtype == new_b.dtype == np.float64
    assert new_w[0, 0, 0, 0] == 1.0 / 3  # not rounded to float16 on the way


# ---------------------------------------------------------------------------------------------- channel_multiplier


@pytest.mark.parametrize("shape,axis,groups,channels", [
    ((4, 3, 1, 1), 0, 1, 3),  # 4 output channels, 3 values
    ((4, 3, 1, 1), 1, 1, 4),  # 3 input channels, 4 values
    ((4, 3, 1, 1), 1, 3, 6),  # rows (4) do not split into 3 groups
    ((6, 2, 1, 1), 1, 3, 4),  # 3 groups x 2 = 6 channels, not 4
    ((6, 2, 1, 1), 0, 2, 6),  # axis 0 never splits into groups
])
def test_channel_mismatch_is_refused(shape, axis, groups, channels):
    with pytest.raises(FoldRefused):
        channel_multiplier(np.ones(channels), shape, axis, groups)
    with pytest.raises(FoldRefused):
        absorb_after(np.ones(shape), None, np.ones(channels), np.zeros(channels), axis=axis, groups=groups)


# ---------------------------------------------------------------------------------------------- cast_checked


def test_cast_checked_rounds_once():
    values = np.array([1.0 / 3, 2.0 / 3, 1e-3, -65504.0, 65504.0])
    for dtype in (np.float16, np.float32, ml_dtypes.bfloat16):
        out = cast_checked(values if dtype is not ml_dtypes.bfloat16 else values[:3], dtype)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, (values if dtype is not ml_dtypes.bfloat16 else values[:3]).astype(dtype))


@pytest.mark.parametrize("value", [65536.0, 1e5, -2e5, 1e300])
def test_cast_checked_refuses_fp16_overflow(value):
    with pytest.raises(FoldRefused, match="overflow"):
        cast_checked(np.array([1.0, value]), np.float16)


def test_cast_checked_refuses_bf16_and_fp32_overflow():
    with pytest.raises(FoldRefused, match="overflow"):
        cast_checked(np.array([1e39]), ml_dtypes.bfloat16)
    with pytest.raises(FoldRefused, match="overflow"):
        cast_checked(np.array([1e39]), np.float32)
    assert cast_checked(np.array([1e39]), np.float64)[0] == 1e39


def test_cast_checked_warns_nowhere_and_its_core_refuses_the_same_inside_an_errstate():
    """cast_checked holds its own errstate (an overflow is refused, never warned about); the core the ONNX pass
    calls inside its errstate refuses the same values with the same message."""
    import warnings

    from bnfold.affine import cast_checked_in_errstate

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FoldRefused, match="overflow float16") as guarded:
            cast_checked(np.array([1.0, 1e5]), np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(FoldRefused, match="overflow float16") as core:
            cast_checked_in_errstate(np.array([1.0, 1e5]), np.float16)
        values = np.array([1.0 / 3, -65504.0])
        np.testing.assert_array_equal(cast_checked_in_errstate(values, np.float16), values.astype(np.float16))
    assert str(core.value) == str(guarded.value) and core.value.code == guarded.value.code == "would-overflow"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cast_checked_refuses_non_finite(value, dtype):
    with pytest.raises(FoldRefused):
        cast_checked(np.array([0.5, value]), dtype)


def test_cast_checked_names_what_overflowed():
    with pytest.raises(FoldRefused, match="folded bias"):
        cast_checked(np.array([1e6]), np.float16, "folded bias")


# ---------------------------------------------------------------------------------------------- properties


@settings(deadline=None, max_examples=40, derandomize=True)
@given(groups=st.integers(1, 4), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), kh=st.integers(1, 3),
       kw=st.integers(1, 3), sh=st.integers(1, 2), sw=st.integers(1, 2), has_bias=st.booleans(),
       before=st.booleans(), seed=st.integers(0, 2**16))
def test_property_conv_absorb(groups, cin_g, cout_g, kh, kw, sh, sw, has_bias, before, seed):
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * cin_g, groups * cout_g
    x = rng.standard_normal((2, c_in, kh + 3, kw + 2))
    w = rng.standard_normal((c_out, cin_g, kh, kw))
    b = rng.standard_normal(c_out) if has_bias else None
    if before:
        s, t = random_st(rng, c_in)
        new_w, new_b = absorb_before(w, b, s, t, in_axis=1, out_axis=0, groups=groups)
        want = conv2d(affine(x, s, t), w, b, groups, (sh, sw))
    else:
        s, t = random_st(rng, c_out)
        new_w, new_b = absorb_after(w, b, s, t, axis=0)
        want = affine(conv2d(x, w, b, groups, (sh, sw)), s, t)
    np.testing.assert_allclose(conv2d(x, new_w, new_b, groups, (sh, sw)), want, rtol=1e-11, atol=1e-11)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(groups=st.integers(1, 4), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), k=st.integers(1, 4),
       stride=st.integers(1, 3), has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_conv_transpose_absorb_after(groups, cin_g, cout_g, k, stride, has_bias, seed):
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * cin_g, groups * cout_g
    x = rng.standard_normal((2, c_in, 4))
    w = rng.standard_normal((c_in, cout_g, k))
    b = rng.standard_normal(c_out) if has_bias else None
    s, t = random_st(rng, c_out)
    new_w, new_b = absorb_after(w, b, s, t, axis=1, groups=groups)
    np.testing.assert_allclose(conv_transpose1d(x, new_w, new_b, groups, stride),
                               affine(conv_transpose1d(x, w, b, groups, stride), s, t), rtol=1e-11, atol=1e-11)


def test_bn_to_affine_flat_validity_is_the_full_definition():
    """bn_to_affine_flat's short validity test (s, t and var finite, var >= 0) flags exactly the channels the full
    definition does: every parameter finite, var >= 0, var + eps > 0, s and t finite."""
    from bnfold.affine import bn_to_affine_flat

    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, -1e300, 1e-45, np.inf, -np.inf, np.nan, 3.5e38])
    grid = np.array(np.meshgrid(special, special, special, special, indexing="ij")).reshape(4, -1)
    for eps in (1e-5, 0.0, -1.0, 1e-320):
        scale, bias, mean, var = grid
        with np.errstate(all="ignore"):  # (as its callers hold one)
            s, t, valid = bn_to_affine_flat(scale, bias, mean, var, np.float64(eps))
            denom = var + eps
            full = (np.isfinite(grid).all(axis=0) & (var >= 0) & (denom > 0) & np.isfinite(s) & np.isfinite(t))
            np.testing.assert_array_equal(s, scale / np.sqrt(denom))
            np.testing.assert_array_equal(t, bias - mean * s)
        np.testing.assert_array_equal(valid, full)
