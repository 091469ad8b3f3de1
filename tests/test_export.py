import os

import keras
import numpy as np
import pytest

from pruning import CNNModel, PrunePlan, get_ranker, prune
from pruning.export import export_litert, export_saved_model, fold_batchnorm


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics (positive variances), whatever weights the BN has."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, n).astype("float32"))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))


def conv_bn_model():
    inp = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(6, 3, use_bias=False, name="c2")(x)
    x = keras.layers.BatchNormalization(scale=False, name="bn2")(x)  # no gamma, no conv bias
    x = keras.layers.Activation("relu", name="a2")(x)
    skip = keras.layers.Conv2D(6, 1, name="c3")(x)
    y = keras.layers.BatchNormalization(name="bn3")(skip)  # c3 is read twice: not folded
    x = keras.layers.Add(name="add")([y, skip])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(5, name="fc")(x)
    out = keras.layers.BatchNormalization(name="bn_fc")(x)
    return keras.Model(inp, out)


def test_fold_batchnorm_keeps_outputs_and_removes_bn(tmp_path):
    model = conv_bn_model()
    randomize_bn(model)
    assert np.isfinite(np.asarray(model(np.ones((1, 12, 12, 3)), training=False))).all()
    folded = fold_batchnorm(model)
    names = [l.name for l in folded.layers]
    assert "c1_bn1" in names and "c2_bn2" in names and "fc_bn_fc" in names
    assert {"bn1", "r1", "bn2", "a2", "bn_fc"}.isdisjoint(names)
    assert "bn3" in names and "c3" in names  # c3's output has two readers
    assert folded.get_layer("c1_bn1").get_config()["activation"] == "relu"
    x = np.random.default_rng(0).normal(size=(4, 12, 12, 3)).astype("float32") * 3
    ref = np.asarray(model(x, training=False))
    out = np.asarray(folded(x))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    np.testing.assert_allclose(np.asarray(keras.models.load_model(path)(x)), out, rtol=1e-6, atol=1e-6)


def test_fold_batchnorm_of_pruned_vgg_equals_unfolded():
    from experiments.models import vgg16_bn_cifar

    model = vgg16_bn_cifar(10, width=0.125, seed=0)
    randomize_bn(model, seed=1)
    cnn = CNNModel(model)
    pruned = prune(cnn, PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5))
    folded = fold_batchnorm(pruned)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert len(folded.layers) < len(pruned.layers) - 25  # 14 BN + 14 ReLU gone
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype("float32")
    ref = np.asarray(pruned(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_fold_without_activation_fusion_keeps_relu_layers():
    folded = fold_batchnorm(conv_bn_model(), fuse_activations=False)
    assert "r1" in [l.name for l in folded.layers]
    assert folded.get_layer("c1_bn1").get_config()["activation"] == "linear"


def test_serving_exports_run_and_match(tmp_path):
    tf = pytest.importorskip("tensorflow")
    model = conv_bn_model()
    randomize_bn(model)
    model = fold_batchnorm(model)
    x = np.random.default_rng(2).normal(size=(1, 12, 12, 3)).astype("float32")
    ref = np.asarray(model(x))
    saved = export_saved_model(model, tmp_path / "sm")
    loaded = tf.saved_model.load(saved)  # keep a reference: its variables die with it
    np.testing.assert_allclose(np.asarray(loaded.serve(x)), ref, rtol=1e-5, atol=1e-5)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pytest.skip("ai-edge-litert is not installed (pip install 'keras-pruning-toolkit[bench]')")
    path = export_litert(model, tmp_path / "m.tflite")
    assert os.path.getsize(path) > 1000
    interp = Interpreter(model_path=path)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
