import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from experiments.compress import CompressConfig, run_compress, step_targets
from experiments.models import resnet20_cifar
from pruning import CNNModel, PrunePlan, model_stats
from pruning.distill import Distiller, teacher_logits
from save_sqlite import ExperimentLog
from tests.conftest import SAMPLE_RICE


def _net(filters, softmax, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(filters, 3)(inp))
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax" if softmax else None)(x))


def _by_hand(labels, s, t, temperature, alpha):
    """The loss of the pruning.distill docstring, batch mean, in numpy."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    hard = -np.log(softmax(s)[np.arange(len(s)), labels])
    ps, pt = softmax(s / temperature), softmax(t / temperature)
    soft = np.sum(pt * np.log(pt / ps), -1)
    return float(np.mean((1 - alpha) * hard + alpha * temperature ** 2 * soft))


def test_distillation_loss_by_hand_in_both_modes():
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32")
    labels = np.array([0, 2, 1, 0])
    y = keras.utils.to_categorical(labels, 3)
    teacher, student = _net(4, True, 1), _net(2, False, 2)
    s = keras.ops.convert_to_numpy(student(x))
    t = np.log(keras.ops.convert_to_numpy(teacher(x)))  # a softmax teacher: its log-probabilities
    expected = _by_hand(labels, s, t, 3.0, 0.3)
    on_the_fly = Distiller(student, teacher, temperature=3.0, alpha=0.3)
    assert isinstance(on_the_fly, keras.distillation.Distiller)
    on_the_fly.compile()
    cached = Distiller(student, None, temperature=3.0, alpha=0.3)
    cached.compile()
    for trainer, target in ((on_the_fly, y), (cached, (y, teacher_logits(teacher, x)))):
        loss = trainer.compute_loss(x, target, keras.ops.convert_to_tensor(s))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    # Validation batches without teacher logits: the cross-entropy alone.
    np.testing.assert_allclose(float(cached.compute_loss(x, y, keras.ops.convert_to_tensor(s))),
                               _by_hand(labels, s, t, 3.0, 0.0), rtol=1e-4)
    with pytest.raises(ValueError, match="Expected temperature > 0. Received: temperature=0"):
        Distiller(student, teacher, 0, 0.3)
    with pytest.raises(ValueError, match=r"Expected distillation weight alpha in \[0, 1\]. Received: alpha=1.5"):
        Distiller(student, None, 3.0, 1.5)


def test_distiller_trains_the_student_only_and_it_saves_plain(tmp_path):
    teacher, student = _net(4, True, 1), _net(2, False, 2)
    before_t = [w.copy() for w in teacher.get_weights()]
    before_s = [w.copy() for w in student.get_weights()]
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(16) % 3, 3)
    d = Distiller(student, teacher, temperature=3.0, alpha=0.7)
    assert len(d.trainable_weights) == len(student.trainable_weights)
    d.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"])
    logs = d.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    assert "accuracy" in logs and np.isfinite(logs["loss"][0])
    assert all(np.array_equal(a, b) for a, b in zip(before_t, teacher.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(before_s, student.get_weights()))
    cached = Distiller(student, None, temperature=3.0, alpha=0.7)
    cached.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"])
    cached.fit(x, (y, teacher_logits(teacher, x)), epochs=1, batch_size=8, verbose=0, validation_data=(x, y))
    path = str(tmp_path / "student.keras")
    student.save(path)
    import zipfile

    with zipfile.ZipFile(path) as z:  # a plain Functional: nothing of this code's classes in the file
        config = z.read("config.json").decode()
    assert json.loads(config)["class_name"] == "Functional" and "pruning" not in config and "istill" not in config
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0), student.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_step_targets_reach_the_target_linearly():
    np.testing.assert_allclose(step_targets(0.25, 3), [0.75, 0.5, 0.25])
    assert step_targets(0.5, 1) == [0.5]


def tiny_cnn(classes, size):
    inp = keras.Input((size, size, 3))
    x = inp
    for i, f in enumerate((8, 16, 16)):
        x = keras.layers.Conv2D(f, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="predictions")(x))


def test_compress_rice_sample_in_two_steps(tmp_path):
    path = str(tmp_path / "tiny.keras")
    tiny_cnn(5, 16).save(path)
    db = str(tmp_path / "log.db")
    cfg = CompressConfig(model=path, data_dir=SAMPLE_RICE, target_macs=0.5, steps=2, epochs=1, ranker="taylor",
                         allocation="global", distill=True, preprocess="unit", out_dir=str(tmp_path / "out"),
                         latency_runs=1, latency_batch=2, verbose=0)
    s = run_compress(cfg, ExperimentLog(db), echo=lambda *a: None)
    smaller = keras.models.load_model(s["model"])
    base = model_stats(keras.models.load_model(path))
    assert abs(model_stats(smaller)["macs"] / base["macs"] - 0.5) <= 0.02 * 0.5
    assert abs(s["reached"] - 0.5) <= 0.01
    assert [st["goal"] for st in s["steps"]] == [0.75, 0.5]
    plan = PrunePlan.load(s["plan"])  # indices of the original filters
    assert plan.meta["target"] == 0.5 and len(plan.meta["steps"]) == 2
    assert {n: len(k) for n, k in plan.keep.items()} == {c.name: c.filters for c in CNNModel(smaller).conv_layers
                                                         if c.name in plan.keep}
    log = ExperimentLog(db)
    runs = log.runs("compress")
    parent = [r for r in runs if r["parent_id"] is None]
    children = [r for r in runs if r["parent_id"] is not None]
    assert len(parent) == 1 and len(children) == 2 and all(r["status"] == "completed" for r in runs)
    assert all(c["parent_id"] == parent[0]["id"] for c in children)
    assert json.loads(parent[0]["config"])["ranker"] == "taylor"
    assert log.layer_prunes(children[0]["id"]) and log.epochs(children[1]["id"])


def write_cifar_layout(root, classes=2, train=12, test=6, size=16):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder)
            for i in range(n):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                img[..., c] = 255 // (c + 1)  # something to learn
                tf.io.write_file(os.path.join(folder, f"{i:04d}.jpg"), tf.io.encode_jpeg(img))


def test_compress_residual_model_on_cifar_layout(tmp_path):
    write_cifar_layout(str(tmp_path / "data"))
    path = str(tmp_path / "resnet.keras")
    model = resnet20_cifar(2, 0.25, input_shape=(16, 16, 3), seed=0)
    model.save(path)
    cfg = CompressConfig(model=path, data_dir=str(tmp_path / "data"), target_params=0.6, allocation="uniform",
                         ranker="random", epochs=1, augment=True, distill=False, preprocess="cifar10",
                         output=str(tmp_path / "small.keras"), latency_runs=1, latency_batch=2, verbose=0)
    s = run_compress(cfg, ExperimentLog(str(tmp_path / "log.db")), echo=lambda *a: None)
    smaller = keras.models.load_model(str(tmp_path / "small.keras"))
    assert abs(model_stats(smaller)["params"] / model_stats(model)["params"] - 0.6) <= 0.02 * 0.6
    assert os.path.exists(str(tmp_path / "small.plan.json"))
    assert s["baseline"]["params"] > s["final"]["params"]


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="Expected exactly one of target_macs, target_params and target_latency"):
        CompressConfig(model="m.keras", data_dir=".", target_macs=0.5, target_params=0.5).validate()
    with pytest.raises(ValueError, match=r"Expected target_macs in \(0, 1\]. Received: target_macs=2"):
        CompressConfig(model="m.keras", data_dir=".", target_macs=2).validate()
    with pytest.raises(ValueError, match="Model file not found"):
        CompressConfig(model=str(tmp_path / "none.keras"), data_dir=".", target_macs=0.5).validate()


def test_compress_cli_help_and_bad_target():
    from main_train import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["compress", "--help"])
    assert result.exit_code == 0
    for opt in ("--target-macs", "--target-params", "--target-latency", "--allocation", "--steps", "--distill",
                "--temperature", "--alpha", "--ranker", "--ranker-option", "--round-to", "--data-dir"):
        assert opt in result.output
    result = runner.invoke(cli, ["compress", "missing.keras", "--data-dir", ".", "--target-macs", "0.5"])
    assert result.exit_code != 0 and "Model file not found" in result.output


def test_recalibrate_batchnorm_sets_the_statistics_of_the_images():
    from experiments.compress import recalibrate_batchnorm

    inp = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 1, name="c")(inp)
    model = keras.Model(inp, keras.layers.BatchNormalization(name="bn")(conv))
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(10, 4, 4, 2)).astype("float32")
    recalibrate_batchnorm(model, x, batch_size=5)  # two batches of equal size: the mean of their statistics
    feats = keras.Model(inp, conv)(x).numpy()
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    per_batch_var = [feats[i:i + 5].var(axis=(0, 1, 2)) for i in (0, 5)]
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean(per_batch_var, axis=0), rtol=1e-3)
    assert bn.momentum == 0.99  # restored (the Keras default)
