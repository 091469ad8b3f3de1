import keras
import numpy as np
import pytest

from pruning import RANKERS, get_ranker


def one_by_one(filters=2, kernel=None, bias=False, bn=False, softmax=False, classes=2, w=None):
    """Input (2, 2, 2) -> 1x1 Conv -> [BN] -> ReLU -> GAP -> Dense(classes)."""
    inp = keras.Input((2, 2, 2))
    x = keras.layers.Conv2D(filters, 1, use_bias=bias, name="c")(inp)
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="r")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes, use_bias=False, activation="softmax" if softmax else None, name="d")(x)
    model = keras.Model(inp, out)
    if kernel is not None:
        model.get_layer("c").set_weights([np.asarray(kernel, "float32").reshape(1, 1, 2, filters)])
    if w is not None:
        model.get_layer("d").set_weights([np.asarray(w, "float32")])
    return model


def test_new_criteria_are_registered():
    for name in ("fpgm", "apoz", "taylor", "bn_scale"):
        assert name in RANKERS and get_ranker(name).name == name


def test_fpgm_is_the_summed_distance_to_the_other_filters():
    inp = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(3, 2, use_bias=False, name="c")(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(x)))
    kernel = np.zeros((2, 2, 1, 3), "float32")
    kernel[0, 0, 0, 0] = 1.0  # a = e1
    kernel[0, 1, 0, 1] = 1.0  # b = e2
    kernel[0, 0, 0, 2] = 3.0  # c = 3 e1
    model.get_layer("c").set_weights([kernel])
    # By hand: |a-b| = sqrt(2), |a-c| = 2, |b-c| = sqrt(10).
    expected = [np.sqrt(2) + 2, np.sqrt(2) + np.sqrt(10), 2 + np.sqrt(10)]
    np.testing.assert_allclose(get_ranker("fpgm").rank(model, "c"), expected, rtol=1e-6)


def test_apoz_counts_zeros_after_the_relu():
    # Channel 0 copies input channel 0, channel 1 negates input channel 1.
    model = one_by_one(kernel=[[1, 0], [0, -1]])
    x = np.zeros((1, 2, 2, 2), "float32")
    x[0, :, :, 0] = [[1, -1], [2, -3]]  # 2 of 4 negative -> APoZ 0.5
    x[0, :, :, 1] = [[1, 2], [3, -1]]  # negated: 3 of 4 negative -> APoZ 0.75
    np.testing.assert_allclose(get_ranker("apoz").rank(model, "c", data=x), [0.5, 0.25])


def test_taylor_is_activation_times_gradient_by_hand():
    w = np.array([[1.0, -2.0], [0.5, 1.5]], "float32")  # Dense kernel (channels, classes)
    model = one_by_one(kernel=[[1, 0], [0, 1]], w=w)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 2, (3, 2, 2, 2)).astype("float32")
    y = np.array([0, 1, 1])
    # By hand: a = relu(x); z = mean_hw(a) @ w; dL/da[h, w, c] = (p - onehot(y)) @ w[c] / 4.
    a = np.maximum(x, 0)
    m = a.mean(axis=(1, 2))
    z = m @ w
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    g_m = (p - np.eye(2)[y]) @ w.T  # (batch, channels)
    per_example = np.abs(m * g_m)  # sum_hw a * g_m / 4 = mean_hw(a) * g_m
    expected = per_example.mean(axis=0)
    np.testing.assert_allclose(get_ranker("taylor").rank(model, "c", data=(x, y)), expected, rtol=1e-5)
    # One-hot labels and a softmax output give the same scores.
    soft = one_by_one(kernel=[[1, 0], [0, 1]], w=w, softmax=True)
    np.testing.assert_allclose(get_ranker("taylor").rank(soft, "c", data=[(x, np.eye(2)[y])]), expected,
                               rtol=1e-4)


def test_taylor_needs_labels():
    with pytest.raises(ValueError, match="needs labels"):
        get_ranker("taylor").rank(one_by_one(), "c", data=np.zeros((1, 2, 2, 2), "float32"))


def test_bn_scale_is_abs_gamma_and_needs_a_batchnorm():
    model = one_by_one(filters=3, bn=True)
    bn = model.get_layer("bn")
    bn.set_weights([np.array([0.5, -2.0, 1.0], "float32")] + bn.get_weights()[1:])
    np.testing.assert_allclose(get_ranker("bn_scale").rank(model, "c"), [0.5, 2.0, 1.0])
    with pytest.raises(ValueError, match="BatchNormalization"):
        get_ranker("bn_scale").rank(one_by_one(), "c")
