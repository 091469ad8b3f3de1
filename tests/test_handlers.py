"""One small hand-built model per handler: keras.ops graphs, squeeze-and-excitation,
a U-Net with Conv2DTranspose, Conv1D, grouped convs, ties across filter indices,
LayerNormalization behind allow_inexact, and a custom layer taught through the
public registry. Each must pass the zero-filter invariance test."""

import keras
import numpy as np
import pytest

from conftest import prune_zeroed, relative_diff
from pruning import CNNModel, PrunePlan, get_ranker, prune, register_layer_handler
from pruning import handlers
from pruning.rankers import filter_kernel

L = keras.layers


def _assert_invariant(model, **kw):
    before, after, cnn, plan, pruned = prune_zeroed(model, **kw)
    assert plan.keep, "the plan must prune something"
    assert relative_diff(before, after) < 1e-4
    assert pruned.count_params() < model.count_params()
    return cnn, plan, pruned


def _round_trip(pruned, tmp_path, shape):
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)  # no custom objects
    x = np.random.default_rng(3).normal(size=(2, *shape)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pruned(x)), keras.ops.convert_to_numpy(loaded(x)),
                               atol=1e-6)


def ops_residual_model():
    inp = keras.Input((10, 10, 3))
    x = keras.ops.relu(L.Conv2D(8, 3, padding="same", name="stem")(inp))
    y = L.Conv2D(8, 3, padding="same", name="res_a")(x)
    y = keras.ops.relu(L.BatchNormalization()(y))
    y = L.Conv2D(8, 3, padding="same", name="res_b")(y)
    z = x + y  # an operator node, not an Add layer
    z = keras.ops.multiply(keras.ops.maximum(z, 0.0), 2.0)  # scalars pass through
    w = L.Conv2D(4, 1, name="side")(z)
    z = keras.ops.concatenate([z, keras.ops.sigmoid(w) * w], axis=-1)
    z = L.Conv2D(6, 3, name="head")(z)
    return keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(z)))


def test_ops_residual(tmp_path):
    model = ops_residual_model()
    cnn = CNNModel(model)
    assert cnn.conv("stem").group == ("stem", "res_b")
    assert all(c.prunable for c in cnn.conv_layers)
    cnn, plan, pruned = _assert_invariant(model)
    assert plan.keep["stem"] == plan.keep["res_b"]
    _round_trip(pruned, tmp_path, (10, 10, 3))


def test_other_op_blocks_with_its_name():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    y = L.Conv2D(5, 3, padding="same", name="c2")(inp)
    s = keras.ops.sum(x, axis=-1, keepdims=True)  # mixes channels: not sliceable
    z = L.Concatenate()([y, s])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(3, 1)(z))))
    cnn = CNNModel(model)
    assert "of class Sum" in cnn.conv("c1").blocked_by
    assert cnn.conv("c2").prunable
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.4)
    assert "c1" not in plan.keep and "c2" in plan.keep and "Sum" in plan.meta["skipped"]["c1"]
    with pytest.raises(ValueError, match="'c1' cannot be pruned.*Sum"):
        PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), {"c1": 0.5})
    _assert_invariant(model)


def se_model():
    inp = keras.Input((8, 8, 3))
    x = L.Activation("swish")(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="expand")(inp)))
    x = L.Activation("swish")(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(x)))
    s = L.Reshape((1, 1, 8), name="se_reshape")(L.GlobalAveragePooling2D()(x))
    s = L.Conv2D(4, 1, activation="swish", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply()([x, s])  # (B, 8, 8, 8) * (B, 1, 1, 8): broadcast gate
    x = L.Conv2D(6, 1, name="project")(x)
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def test_squeeze_excitation_block(tmp_path):
    cnn = CNNModel(se_model())
    assert cnn.conv("expand").group == ("expand", "se_expand")
    assert all(c.prunable for c in cnn.conv_layers)
    cnn, plan, pruned = _assert_invariant(se_model())
    kept = len(plan.keep["expand"])
    assert tuple(pruned.get_layer("se_reshape").target_shape) == (1, 1, kept)
    _round_trip(pruned, tmp_path, (8, 8, 3))


def unet_model():
    inp = keras.Input((16, 16, 3))
    e1 = L.Conv2D(8, 3, padding="same", activation="relu", name="enc1")(inp)
    e2 = L.Conv2D(12, 3, padding="same", activation="relu", name="enc2")(L.MaxPooling2D()(e1))
    u = L.Conv2DTranspose(8, 2, strides=2, name="up")(e2)
    d = L.Conv2D(8, 3, padding="same", activation="relu", name="dec")(L.Concatenate()([u, e1]))
    return keras.Model(inp, L.Conv2D(2, 1, name="seg")(d))


def test_unet_with_transposed_conv_and_skip(tmp_path):
    model = unet_model()
    cnn = CNNModel(model)
    assert [c.name for c in cnn.prunable_layers] == ["enc1", "enc2", "up", "dec"]
    assert "model output" in cnn.conv("seg").blocked_by
    k = filter_kernel(model.get_layer("up"))
    assert k.shape == (2, 2, 12, 8)  # filters last for the rankers
    cnn, plan, pruned = _assert_invariant(model)
    up = pruned.get_layer("up").get_weights()[0]
    assert up.shape == (2, 2, len(plan.keep["up"]), len(plan.keep["enc2"]))
    _round_trip(pruned, tmp_path, (16, 16, 3))


def test_conv1d_separable_depthwise_and_transpose():
    inp = keras.Input((20, 4))
    x = L.ReLU()(L.BatchNormalization()(L.Conv1D(8, 3, padding="same", name="c1")(inp)))
    x = L.SeparableConv1D(6, 3, padding="same", name="sep")(x)
    x = L.DepthwiseConv1D(3, padding="same", depth_multiplier=2)(x)
    x = L.Conv1DTranspose(5, 3, strides=2, padding="same", name="up1")(x)
    x = L.Conv1D(4, 3, name="c2")(x)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    cnn = CNNModel(model)
    assert [c.name for c in cnn.prunable_layers] == ["c1", "sep", "up1", "c2"]
    _assert_invariant(model)


def grouped_model():
    inp = keras.Input((8, 8, 4))
    x = L.ReLU()(L.Conv2D(8, 1, name="pre")(inp))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(x))
    x = L.Conv2D(16, 3, padding="same", groups=8, name="dw")(x)  # depthwise, multiplier 2
    x = L.Conv2D(6, 1, name="post")(x)
    return keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def test_grouped_conv_keeps_equal_counts_per_group():
    model = grouped_model()
    cnn = CNNModel(model)
    assert [c.name for c in cnn.conv_layers] == ["pre", "grouped", "post"]  # dw passes through
    cnn, plan, pruned = _assert_invariant(model, ratio=0.5)
    for name in ("pre", "grouped"):
        keep = np.asarray(plan.keep[name])
        assert np.bincount(keep // 4, minlength=2).tolist() == [2, 2]
    assert pruned.get_layer("grouped").get_weights()[0].shape == (3, 3, 2, 4)
    dw = pruned.get_layer("dw")
    assert (dw.groups, dw.filters) == (4, 8)
    with pytest.raises(ValueError, match="same number of filters in every group"):
        PrunePlan.from_indices(cnn, {"pre": [0, 1, 2, 4]})


def test_ties_map_different_filter_indices():
    """NASNet-style: Add(Concatenate([a, b]), c) ties a:i with c:i and b:i with c:4+i."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(inp)
    c = L.Conv2D(8, 1, name="c")(inp)
    z = L.Add()([L.Concatenate()([a, b]), c])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(5, 3, name="head")(z))))
    cnn = CNNModel(model)
    assert cnn.conv("a").group == ("a", "b", "c") and cnn.conv("a").prunable
    cnn, plan, pruned = _assert_invariant(model, ratio=0.5)
    expected = sorted(plan.keep.get("a", []) + [4 + i for i in plan.keep.get("b", [])])
    assert plan.keep["c"] == expected and len(expected) == 4
    with pytest.raises(ValueError, match="tied by an elementwise merge"):
        PrunePlan.from_indices(cnn, {"a": [0, 1], "c": [0, 1, 2]})


def test_layer_norm_needs_allow_inexact():
    inp = keras.Input((8, 8, 3))
    x = L.LayerNormalization(name="ln")(L.Conv2D(8, 3, padding="same", name="c1")(inp))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="c2")(x))))
    assert "allow_inexact" in CNNModel(model).conv("c1").blocked_by
    cnn = CNNModel(model, allow_inexact=True)
    assert cnn.conv("c1").prunable and cnn.inexact_layers == ["ln"]
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert plan.meta["allow_inexact"] is True
    with pytest.warns(UserWarning, match=r"Pruned inexactly through ln: the outputs changed by \d"):
        pruned = prune(model, plan)  # the plan carries the opt-in
    assert pruned.get_layer("ln").get_weights()[0].shape == (4,)


class ChannelScale(L.Layer):
    """A custom layer with one learnable scale per channel."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(self.channels,), initializer="random_uniform")

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@pytest.fixture
def registry():
    saved = dict(handlers._HANDLERS)
    yield
    handlers._HANDLERS.clear()
    handlers._HANDLERS.update(saved)


def test_custom_layer_through_public_registry(registry):
    def build():
        inp = keras.Input((8, 8, 3))
        x = ChannelScale(6, name="scale")(L.Conv2D(6, 3, padding="same", name="c1")(inp))
        return keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 3, name="c2")(x))))

    assert "'scale' of class ChannelScale" in CNNModel(build()).conv("c1").blocked_by
    register_layer_handler(ChannelScale, handlers.ChannelwiseHandler(size_keys=("channels",)))
    cnn, plan, pruned = _assert_invariant(build())
    assert pruned.get_layer("scale").channels == len(plan.keep["c1"])
    with pytest.raises(ValueError, match="Expected a pruning.handlers.LayerHandler"):
        register_layer_handler(ChannelScale, object())
