"""The rebuilder: zero-filter invariance on every supported topology, ratio 0,
saving and loading, and clear errors."""

import keras
import numpy as np
import pytest

from conftest import randomize_bn
from pruning import CNNModel, PrunePlan, get_ranker, model_stats, prune


def sequential_model():
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(6, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(5),
    ])


def functional_bn_model():
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = keras.layers.SeparableConv2D(7, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(4, 1)(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def nested_model():
    """A VGG-like base used as one layer of a classifier, as with keras.applications."""
    b_in = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv1")(b_in)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv2")(x)
    x = keras.layers.MaxPooling2D(name="block1_pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="block2_conv1")(x)
    base = keras.Model(b_in, x, name="base")
    inp = keras.Input((16, 16, 3))
    y = base(inp)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.Dense(10, activation="relu")(y)
    return keras.Model(inp, keras.layers.Dense(4, activation="softmax")(y))


def flatten_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(4)(x))


def residual_model():
    inp = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same", name="res_a")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(8, 3, padding="same", name="res_b")(y)
    z = keras.layers.Add()([x, y])
    z = keras.layers.ReLU()(z)
    c = keras.layers.Conv2D(3, 1, name="side")(z)
    z = keras.layers.Concatenate()([z, c])
    z = keras.layers.Conv2D(6, 3, name="head_conv")(z)
    z = keras.layers.GlobalAveragePooling2D()(z)
    return keras.Model(inp, keras.layers.Dense(2)(z))


MODELS = {
    "sequential": sequential_model,
    "functional_bn": functional_bn_model,
    "nested": nested_model,
    "flatten_dense": flatten_model,
    "residual_add": residual_model,
}


def _zero_then_prune(model, seed):
    """Zeroes the filters a random plan removes, then removes them; returns both outputs."""
    randomize_bn(model)
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, get_ranker("random", seed=seed).rank_all(cnn), 0.5)
    assert plan.keep, "the plan must prune something"
    for conv in cnn.conv_layers:
        if conv.name not in plan.keep:
            continue
        removed = np.setdiff1d(np.arange(conv.filters), plan.keep[conv.name])
        weights = conv.layer.get_weights()
        kernel_pos = 1 if isinstance(conv.layer, keras.layers.SeparableConv2D) else 0
        weights[kernel_pos][..., removed] = 0
        if conv.layer.use_bias:
            weights[-1][removed] = 0
        conv.layer.set_weights(weights)
        # Zero the BN that follows (gamma and beta) so the removed channels are exactly 0.
        for call in cnn.calls:
            if isinstance(call.layer, keras.layers.BatchNormalization) and \
                    call.layer.name in conv.consumers:
                pos = cnn.channel_positions(call.inputs[0], conv.name, removed)
                bn = call.layer.get_weights()
                bn[0][pos] = 0
                bn[1][pos] = 0
                call.layer.set_weights(bn)
    x = np.random.default_rng(seed).normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")
    before = keras.ops.convert_to_numpy(model(x))
    pruned = prune(cnn, plan)
    return before, keras.ops.convert_to_numpy(pruned(x)), model, pruned, plan


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_filter_invariance(name):
    before, after, model, pruned, plan = _zero_then_prune(MODELS[name](), seed=1)
    assert np.max(np.abs(before - after)) < 1e-4
    assert pruned.count_params() < model.count_params()
    for conv, keep in plan.keep.items():
        assert pruned.get_layer(conv).filters == len(keep)


def test_residual_add_ties_the_merged_convs():
    cnn = CNNModel(residual_model())
    assert cnn.conv("stem").group == ("stem", "res_b")
    assert cnn.conv("res_a").group == ("res_a",)
    # The classifier-side conv feeds the Dense and is prunable; nothing reaches outputs.
    assert all(c.prunable for c in cnn.conv_layers)
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert plan.keep["stem"] == plan.keep["res_b"]


def test_flatten_selects_dense_rows():
    model = flatten_model()
    cnn = CNNModel(model)
    plan = PrunePlan.from_indices(cnn, {cnn.conv_layers[1].name: [0, 3]})
    pruned = prune(cnn, plan)
    dense_old = model.layers[-1].get_weights()[0]
    dense_new = pruned.layers[-1].get_weights()[0]
    # Flatten of (4, 4, 5): row p*5 + c for kept c in (0, 3).
    rows = (np.arange(16)[:, None] * 5 + np.array([0, 3])).reshape(-1)
    np.testing.assert_array_equal(dense_new, dense_old[rows])


def test_ratio_zero_is_identity():
    model = functional_bn_model()
    randomize_bn(model)
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.0)
    pruned = prune(cnn, plan)
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(model(x), pruned(x), atol=1e-6)
    assert pruned.count_params() == model.count_params()


def test_saved_keras_file_loads_without_custom_objects(tmp_path):
    model = nested_model()
    cnn = CNNModel(model)
    pruned = prune(cnn, PrunePlan.from_scores(cnn, get_ranker("l2").rank_all(cnn), 0.4))
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(pruned(x), loaded(x), atol=1e-6)
    assert loaded.count_params() == pruned.count_params() < model.count_params()


def test_classifier_conv_is_never_pruned():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="features")(inp)
    out = keras.layers.Conv2D(2, 1, name="segment_head")(x)  # fully convolutional output
    cnn = CNNModel(keras.Model(inp, out))
    assert cnn.conv("features").prunable
    assert not cnn.conv("segment_head").prunable
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert list(plan.keep) == ["features"]
    with pytest.raises(ValueError, match="segment_head.*model output"):
        PrunePlan.from_indices(cnn, {"segment_head": [0]})


def test_unsupported_layer_is_named_before_building():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    cnn = CNNModel(keras.Model(inp, keras.layers.Dense(2)(x)))
    assert "'ln' of class LayerNormalization" in cnn.conv("c1").blocked_by
    with pytest.raises(ValueError, match="'c1' cannot be pruned.*'ln' of class LayerNormalization"):
        PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), {"c1": 0.5})
    # A uniform ratio skips it and says why.
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert plan.keep == {} and "LayerNormalization" in plan.meta["skipped"]["c1"]
    with pytest.raises(ValueError, match="LayerNormalization"):
        prune(cnn, {"c1": [0, 1]})


def test_subclassed_and_unbuilt_models_get_clear_errors():
    with pytest.raises(ValueError, match="not built"):
        CNNModel(keras.Sequential([keras.layers.Dense(2)]))

    class Custom(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        CNNModel(Custom())


def test_pruned_vgg_is_physically_smaller():
    """Speed is measured by `python -m benchmarks.latency` (results/latency.md), not by a timed test."""
    from experiments.models import vgg16_bn_cifar

    model = vgg16_bn_cifar(10, width=0.5)
    cnn = CNNModel(model)
    pruned = prune(cnn, PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.7))
    # 0.7 keeps 30% of each conv's filters: about 9% of the conv MACs remain.
    assert model_stats(pruned)["macs"] < 0.15 * model_stats(model)["macs"]
    assert [w.shape for w in pruned.get_layer("conv1").get_weights()] == [(3, 3, 3, 10), (10,)]
    assert pruned.get_layer("linear1").get_weights()[0].shape == (77, 256)


def test_per_image_scalars_and_an_adapted_normalization_survive_pruning():
    """A side branch of keras.ops that reduces each image to scalars (no channel axis)
    and an adapted Normalization: the convs still prune, and the branch computes the
    same values after the rebuild."""
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, name="c1")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    total = keras.ops.sum(inputs, axis=(1, 2, 3))  # shape (batch,)
    spread = keras.ops.std(inputs, axis=(1, 2, 3))
    norm = keras.layers.Normalization(name="norm")
    side = norm(keras.ops.stack([total, spread], axis=-1))
    outputs = keras.layers.Dense(3, name="out")(keras.layers.Concatenate()([x, side]))
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype("float32")
    norm.adapt(np.stack([data.sum((1, 2, 3)), data.std((1, 2, 3))], -1))
    cnn = CNNModel(model)
    assert cnn.conv("c1").prunable
    pruned = prune(cnn, PrunePlan.from_indices(cnn, {"c1": [0, 2, 5]}))
    assert pruned.get_layer("c1").filters == 3
    side_of = lambda m: keras.Model(m.inputs, m.get_layer("norm").output).predict(data, verbose=0)  # noqa: E731
    np.testing.assert_allclose(side_of(pruned), side_of(model), atol=1e-5)
    np.testing.assert_allclose(side_of(model).mean(0), 0, atol=1e-4)
