"""Models as other people write them (issue 24), without keras-hub: a task that calls its
backbone on the backbone's own input, custom composite layers traced and inlined,
layers whose config does not round-trip, shared weightless layers, pass-through layers
and operations, and subclassed functional models. Each fails on the engine before it."""

import keras
import numpy as np
import pytest

from conftest import prune_zeroed, relative_diff
from pruning import CNNModel, PrunePlan, get_ranker, prune

L = keras.layers


def _invariant(model, tmp_path=None, ratio=0.5):
    before, after, cnn, plan, pruned = prune_zeroed(model, ratio=ratio)
    assert plan.keep, "the plan must prune something"
    assert relative_diff(before, after) < 1e-4
    assert pruned.count_params() < model.count_params()
    if tmp_path is not None:
        path = str(tmp_path / "pruned.keras")
        pruned.save(path)
        loaded = keras.models.load_model(path)  # no custom objects
        x = np.random.default_rng(5).normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
        a = np.concatenate([np.ravel(v) for v in keras.tree.flatten(pruned(x))])
        b = np.concatenate([np.ravel(v) for v in keras.tree.flatten(loaded(x))])
        np.testing.assert_allclose(a, b, atol=1e-5)
    return cnn, plan, pruned


def _backbone(name="backbone", model_name=None):
    inp = keras.Input((16, 16, 3), name=f"{name}_in")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name=f"{name}_c1")(inp)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name=f"{name}_c2")(x)
    return keras.Model(inp, x, name=model_name or name)


# ---------------------------------------------------------------- 1. self-alias
def test_task_calling_its_backbone_on_its_own_input_is_traced(time_limit, tmp_path):
    time_limit(60)
    backbone = _backbone()
    x = backbone(backbone.input)  # what every keras-hub task does
    x = L.GlobalAveragePooling2D()(x)
    task = keras.Model(backbone.input, L.Dense(3, name="head")(x), name="task")
    cnn = CNNModel(task)
    assert [c.name for c in cnn.conv_layers] == ["backbone_c1", "backbone_c2"]
    _invariant(task, tmp_path)


# ------------------------------------------------------- 2. composite layers
class InvertedResidual(L.Layer):
    """An MBConv block as keras-hub writes them: Keras layers and keras.ops in `call`."""

    def __init__(self, filters, expand, **kwargs):
        super().__init__(**kwargs)
        self.expand = L.Conv2D(expand, 1, name=f"{self.name}_expand")
        self.bn = L.BatchNormalization(name=f"{self.name}_bn")
        self.dw = L.DepthwiseConv2D(3, padding="same", name=f"{self.name}_dw")
        self.project = L.Conv2D(filters, 1, name=f"{self.name}_project")
        self.drop = L.Dropout(0.1)

    def call(self, x, training=None):
        y = keras.ops.relu(self.bn(self.expand(x), training=training))
        y = keras.ops.hard_silu(self.dw(y))
        y = self.drop(self.project(y), training=training)
        return keras.ops.add(x, y)


class Stage(L.Layer):
    """A composite layer made of composite layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [InvertedResidual(8, 16, name=f"{self.name}_block{i}") for i in range(2)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class NoisyBlock(L.Layer):
    """Takes another path when training: a traced graph cannot follow it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 3, padding="same", name=f"{self.name}_conv")

    def call(self, x, training=None):
        if training:
            x = keras.ops.clip(x, -1.0, 1.0)
        return self.conv(x)


def composite_model():
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = Stage(name="stage")(x)
    x = L.Conv2D(8, 3, name="top")(x)
    return keras.Model(inp, L.Dense(2)(L.Flatten()(x)))


def test_custom_composite_layers_are_traced_and_inlined(tmp_path):
    model = composite_model()
    cnn = CNNModel(model)
    names = [c.name for c in cnn.conv_layers]
    assert names == ["stem", "stage_block0_expand", "stage_block0_project",
                     "stage_block1_expand", "stage_block1_project", "top"]
    assert cnn.conv("stage_block0_expand").prunable
    # The residual adds tie the stem to both projections.
    assert set(cnn.conv("stem").group) == {"stem", "stage_block0_project", "stage_block1_project"}
    cnn, plan, pruned = _invariant(model, tmp_path)  # the file loads without the custom classes
    assert "stage_block1_expand" in plan.keep
    assert not [la for la in pruned.layers if isinstance(la, (Stage, InvertedResidual))]
    assert pruned.get_layer("stage_block0_expand").filters == len(plan.keep["stage_block0_expand"])


def test_opaque_layer_names_its_hidden_convs():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = NoisyBlock(name="noisy")(x)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 3, name="c2")(x))))
    cnn = CNNModel(model)
    assert [c.name for c in cnn.conv_layers] == ["c1", "c2"]
    assert "noisy" in cnn.conv("c1").blocked_by
    [opaque] = cnn.opaque
    assert opaque.convs == ["noisy_conv"] and "different path when training" in opaque.reason
    assert "1 conv inside 'noisy' (NoisyBlock) not visible" in cnn.summary()
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert plan.meta["skipped"]["noisy_conv"].startswith("inside 'noisy' (NoisyBlock), not visible: ")
    assert "c1" in plan.meta["skipped"] and "c2" in plan.keep


def test_model_with_nothing_prunable_says_so():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, NoisyBlock(name="noisy")(inp))
    cnn = CNNModel(model)
    with pytest.warns(UserWarning, match=r"Nothing to prune in model .*1 conv inside 'noisy'"):
        plan = PrunePlan.from_scores(cnn, {}, 0.3)
    assert plan.keep == {} and "noisy_conv" in plan.meta["skipped"]


def test_raw_tensorflow_op_keeps_a_layer_opaque_with_the_line():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs the TensorFlow backend")
    import tensorflow as tf

    class TFBlock(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(8, 1, name="tf_block_conv")

        def call(self, x):
            return tf.nn.depth_to_space(self.conv(x), 2)

    inp = keras.Input((8, 8, 4))
    cnn = CNNModel(keras.Model(inp, TFBlock(name="tfb")(inp)))
    [opaque] = cnn.opaque
    assert "tf.nn.depth_to_space" in opaque.reason, opaque.reason


# ------------------------------------- 3. layers whose config does not round-trip
class FixedScale(L.Layer):
    """A keras-io style layer: its constructor takes no **kwargs, so its config (which
    holds `name`, `trainable`, `dtype`) does not round-trip, and it has its own weight."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.scale = self.add_weight(shape=(channels,), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_unchanged_layer_that_does_not_round_trip_is_reused():
    inp = keras.Input((8, 8, 3))
    scale = FixedScale(3)
    scale.scale.assign([0.5, 2.0, 1.5])
    x = L.Conv2D(6, 3, padding="same", name="c1")(scale(inp))
    x = L.Conv2D(4, 3, name="c2")(x)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    with pytest.warns(UserWarning, match="does not round-trip.*shares its weights"):
        cnn, plan, pruned = _invariant(model)
    assert "c1" in plan.keep
    assert scale in pruned.layers  # reused, as the warning says


# -------------------------------------------- 4. shared weightless layers
def test_shared_leaky_relu_across_differently_pruned_convs(tmp_path):
    act = L.LeakyReLU(negative_slope=0.2)  # one instance, as keras-io's learnable resizer does
    pool = L.MaxPooling2D(1)
    inp = keras.Input((8, 8, 3))
    a = pool(act(L.Conv2D(8, 3, padding="same", name="c1")(inp)))
    b = pool(act(L.Conv2D(6, 3, padding="same", name="c2")(a)))
    c = L.Conv2D(4, 3, name="c3")(L.Dropout(0.1)(b))
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(c)))
    cnn, plan, pruned = _invariant(model, tmp_path)
    assert {"c1", "c2"} <= set(plan.keep)


def test_cli_prune_of_a_model_with_nothing_prunable_fails_before_work(tmp_path):
    from click.testing import CliRunner

    from main_train import cli

    inp = keras.Input((8, 8, 3))
    x = L.LayerNormalization(name="ln")(L.Conv2D(4, 3, name="c1")(inp))
    path = str(tmp_path / "m.keras")
    keras.Model(inp, L.GlobalAveragePooling2D()(x)).save(path)
    out = str(tmp_path / "p.keras")
    r = CliRunner().invoke(cli, ["prune", path, "--ranker", "l1", "--ratio", "0.3", "-o", out,
                                 "--db", str(tmp_path / "log.db")])
    assert r.exit_code == 2 and "Nothing to prune in model" in r.output, r.output
    assert "'ln' of class LayerNormalization" in r.output
    assert not (tmp_path / "p.keras").exists()


# ------------------------------------------------------------ 5. pass-throughs
def _through(fn, filters=8, shape=(8, 8, 3)):
    def build():
        inp = keras.Input(shape)
        x = fn(L.Conv2D(filters, 3, padding="same", name="c1")(inp))
        x = L.Conv2D(4, 3, padding="same", name="c2")(x)
        return keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    return build


ops = keras.ops
PASS_THROUGHS = {
    "resizing": _through(L.Resizing(6, 5)),
    "rescaling_scalar": _through(L.Rescaling(0.5)),
    "rescaling_per_channel": _through(L.Rescaling(np.linspace(0.5, 2.0, 8).tolist())),
    "zero_padding_cropping": _through(lambda x: L.Cropping2D(1)(L.ZeroPadding2D(2)(x))),
    "ops_pad": _through(lambda x: ops.pad(x, [[0, 0], [1, 2], [2, 1], [0, 0]])),
    "ops_split_equal": _through(lambda x: ops.concatenate(
        [L.ReLU()(p) for p in ops.split(x, 2, axis=-1)][::-1], axis=-1)),
    "ops_split_points": _through(lambda x: ops.concatenate(
        [L.Conv2D(3, 1, name=f"p{i}")(p) for i, p in enumerate(ops.split(x, [3], axis=-1))], axis=-1)),
    "ops_split_spatial": _through(lambda x: ops.concatenate(ops.split(x, 2, axis=1), axis=1)),
    "depth_to_space": _through(lambda x: ops.depth_to_space(x, 2), filters=16),
    "space_to_depth": _through(lambda x: ops.space_to_depth(x, 2)),
    "ops_transpose": _through(lambda x: ops.transpose(x, (0, 2, 1, 3))),
    "channel_slices": _through(lambda x: ops.concatenate(
        [L.Conv2D(3, 1, name="head")(x[..., :3]), x[..., -5:],
         L.ZeroPadding2D(((1, 0), (0, 0)))(x[:, 1:, :, :])], axis=-1)),
    "permute": _through(L.Permute((2, 1, 3))),
}


@pytest.mark.parametrize("name", list(PASS_THROUGHS))
def test_pass_through(name, tmp_path):
    cnn, plan, pruned = _invariant(PASS_THROUGHS[name](), tmp_path)
    assert cnn.conv("c1").prunable and "c1" in plan.keep, cnn.conv("c1").blocked_by


def test_depth_to_space_prunes_whole_blocks():
    cnn = CNNModel(PASS_THROUGHS["depth_to_space"]())
    group = cnn.channel_group("c1")
    assert group.n_classes == 4  # 16 filters in 4 blocks of r*r = 4 tied filters
    assert sorted(np.bincount(group.classes["c1"]).tolist()) == [4, 4, 4, 4]


def test_split_points_move_with_the_kept_channels():
    model = PASS_THROUGHS["ops_split_points"]()
    pruned = prune(model, {"c1": [0, 2, 5, 7]})  # 2 of the first part, 2 of the second
    assert pruned.get_layer("p0").get_weights()[0].shape[-2] == 2
    assert pruned.get_layer("p1").get_weights()[0].shape[-2] == 2


def test_permute_moving_the_channels_blocks():
    cnn = CNNModel(_through(L.Permute((3, 1, 2)), shape=(8, 8, 3))())
    assert "permute" in cnn.conv("c1").blocked_by.lower()


# --------------------------------------------------------- 6. the model's class
class FeatureModel(keras.Model):
    """A subclassed functional model, as keras-hub backbones are: its own constructor,
    a dict output, a dict attribute of its feature maps, and its own train_step."""

    def __init__(self, **kwargs):
        inp = keras.Input((8, 8, 3), name="image")
        a = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
        b = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c2")(a)
        c = L.Conv2D(6, 3, padding="same", name="c3")(b)
        super().__init__(inputs=inp, outputs={"logits": L.Dense(2, name="head")(L.Flatten()(c)),
                                              "features": c}, **kwargs)
        self.pyramid_outputs = {"P1": a, "P2": b}

    def train_step(self, data):
        return super().train_step(data)


def test_subclassed_model_keeps_output_structure_and_warns(tmp_path):
    model = FeatureModel(name="features")
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    with pytest.warns(UserWarning, match=r"'features' of class FeatureModel .*pyramid_outputs"):
        pruned = prune(cnn, plan)
    assert set(pruned.output) == {"logits", "features"}
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    out = pruned(x)
    assert out["features"].shape == (2, 4, 4, 6) and out["logits"].shape == (2, 2)
    assert sorted(pruned.pyramid_outputs) == ["P1", "P2"]
    p2 = pruned.pyramid_outputs["P2"]
    assert p2.shape[-1] == len(plan.keep["c2"]) < 8
    feats = keras.Model(pruned.inputs, pruned.pyramid_outputs)  # as a keras-hub task does
    assert feats(x)["P1"].shape[-1] == len(plan.keep["c1"])
    path = str(tmp_path / "p.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x)["logits"], out["logits"], atol=1e-5)


class TwiceBlock(L.Layer):
    """Calls one conv twice: its filters cannot be pruned for one call only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, padding="same", name=f"{self.name}_conv")

    def call(self, x):
        return self.conv(self.conv(x))


def test_composite_layer_calling_a_conv_twice_stays_opaque():
    inp = keras.Input((8, 8, 4))
    x = TwiceBlock(name="twice")(L.Conv2D(4, 3, padding="same", name="c1")(inp))
    cnn = CNNModel(keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 3, name="c2")(x)))))
    [opaque] = cnn.opaque
    assert opaque.convs == ["twice_conv"] and "more than once" in opaque.reason
    assert cnn.conv("c2").prunable


def test_channel_slice_bounds_move_with_the_kept_channels():
    model = PASS_THROUGHS["channel_slices"]()
    pruned = prune(model, {"c1": [0, 4, 5, 7]})
    assert pruned.get_layer("head").get_weights()[0].shape[-2] == 1  # of channels 0..2, 0 is kept
    # c2 reads head's 3 filters, 3 of the last 5 channels and the 4 kept channels shifted down.
    assert pruned.get_layer("c2").get_weights()[0].shape[-2] == 3 + 3 + 4


def test_channel_slices_of_a_loaded_model_prune_as_before(tmp_path):
    # Keras' loader turns a saved `x[..., a:b]` key into a list; it still slices the channels.
    path = str(tmp_path / "slices.keras")
    PASS_THROUGHS["channel_slices"]().save(path)
    loaded = keras.models.load_model(path)
    pruned = prune(loaded, {"c1": [0, 4, 5, 7]})
    assert pruned.get_layer("head").get_weights()[0].shape[-2] == 1
    assert pruned.get_layer("c2").get_weights()[0].shape[-2] == 3 + 3 + 4


def test_convs_named_alike_in_two_nested_models_get_distinct_names(tmp_path):
    first, second = _backbone("net"), _backbone("net", "net2")  # both hold 'net_c1' and 'net_c2'
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(3, 1, name="adapt")(first(inp))
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(second(x))))
    cnn = CNNModel(model)
    assert [c.name for c in cnn.conv_layers] == ["net_c1", "net_c2", "adapt", "net_c1_1", "net_c2_1"]
    pruned = prune(cnn, {"net_c1": [0, 1], "net_c1_1": [0, 1, 2]})
    kernels = sorted(la.get_weights()[0].shape[-1] for la in pruned.layers if la.name.startswith("net_c1"))
    assert kernels == [2, 3]
    _invariant(model, tmp_path)
