"""Issue 21: `export` (LiteRT float/float16/dynamic/int8, SavedModel, ONNX), checked, timed, logged;
each bad input one clear line with nothing written."""

import dataclasses
import json
import os
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import SAMPLE_RICE
from experiments.compress import recalibrate_batchnorm
from experiments.data import preprocessing
from experiments.deploy import load_images
from main_train import cli
from pruning.export import Runner, litert_interpreter
from save_sqlite import ExperimentLog

SIZE = 32


def small_cnn(classes=5, shape=(SIZE, SIZE, 3), width=8):
    inp = keras.Input(shape)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="c1")(inp)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.MaxPooling2D(name="p1")(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", name="c2")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(x)
    x = keras.layers.Activation("relu", name="a2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="out")(x))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on the bundled rice sample (vgg16 preprocessing), saved."""
    keras.utils.set_random_seed(0)
    images, labels, _ = load_images(SAMPLE_RICE, small_cnn(), what="data")
    model = small_cnn(width=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x = preprocessing("vgg16")(images)
    model.fit(x, labels, epochs=12, batch_size=32, verbose=0)
    model.optimizer.learning_rate.assign(1e-3)
    model.fit(x, labels, epochs=6, batch_size=32, verbose=0)
    recalibrate_batchnorm(model, preprocessing("vgg16")(images))  # BN statistics of the final weights
    path = str(tmp_path_factory.mktemp("model") / "rice_small.keras")
    model.save(path)
    return path, model


def export(args, db):
    return CliRunner().invoke(cli, ["export", *args, "--runs", "3", "--latency-batch", "4", "--db", db])


@pytest.mark.parametrize("fmt,quantize,name", [
    ("litert", "none", "m.tflite"), ("litert", "float16", "m16.tflite"), ("litert", "dynamic", "md.tflite"),
    ("saved_model", "none", "m_saved/"), ("onnx", "none", "m.onnx")])
def test_every_float_format_matches_the_keras_model(trained, tmp_path, fmt, quantize, name):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="the [onnx] extra is not installed")
    path, model = trained
    out, db = os.path.join(str(tmp_path), name), str(tmp_path / "log.db")  # keeps "m_saved/" a folder path
    r = export([path, "-o", out, "--format", fmt, "--quantize", quantize, "--eval-dir", SAMPLE_RICE], db)
    assert r.exit_code == 0, r.output
    assert f"{name.rstrip('/')}: " in r.output and "ms at batch 1" in r.output
    (run,) = ExperimentLog(db).runs("export")
    metrics = json.loads(run["metrics"])
    assert run["status"] == "completed" and run["artifact"] == os.path.normpath(out)
    assert metrics["format"] == fmt and metrics["quantize"] == quantize and metrics["file_bytes"] > 0
    assert set(metrics["latency"]) == {"batch1", "batch4"}
    assert metrics["latency"]["batch4"]["rounds"] == 3 and metrics["latency"]["batch1"]["machine_before"]
    # The file itself, run outside this code, on raw pixels: the .keras model on preprocessed ones.
    x = load_images(SAMPLE_RICE, model, limit=10, what="data")[0]
    ref = model.predict_on_batch(preprocessing("vgg16")(x))
    got = Runner(out, fmt, batch_size=10)(x)
    tol = 1e-4 if quantize == "none" else 2e-2
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert metrics["top1_agreement"] >= (1.0 if quantize == "none" else 0.98)
    if quantize == "none":
        assert metrics["max_rel_diff"] <= 1e-4
    if fmt == "litert" and quantize != "none":
        float_size = os.path.getsize(path)
        assert metrics["file_bytes"] < float_size / (2 if quantize == "float16" else 3)


def test_int8_on_the_rice_sample_agrees_and_is_logged_under_the_model_run(trained, tmp_path):
    path, model = trained
    db = str(tmp_path / "log.db")
    log = ExperimentLog(db)
    with log.run("prune", config={"preprocess": "vgg16"}) as parent:
        parent.finish(artifact=path)
    out = str(tmp_path / "rice_small-int8.tflite")
    r = export([path, "-o", out, "--quantize", "int8", "--calibration-dir", SAMPLE_RICE, "--calibration-images",
                "100", "--eval-dir", SAMPLE_RICE], db)
    assert r.exit_code == 0, r.output
    (run,) = ExperimentLog(db).runs("export")
    metrics = json.loads(run["metrics"])
    assert run["parent_id"] == parent.id and metrics["calibration_images"] == 100
    assert metrics["images"] == 500 and metrics["top1_agreement"] >= 0.99, metrics
    assert abs(metrics["accuracy"] - metrics["float_accuracy"]) <= 0.02 and metrics["float_accuracy"] > 0.9
    assert f"top-1 agreement {metrics['top1_agreement']:.3f}" in r.output
    interpreter = litert_interpreter(out)
    interpreter.allocate_tensors()
    ops = [d for d in interpreter._get_ops_details()]
    assert {"QUANTIZE", "CONV_2D", "DEQUANTIZE"} <= {d["op_name"] for d in ops}
    details = {d["index"]: d["dtype"] for d in interpreter.get_tensor_details()}
    convs = [d for d in ops if d["op_name"] == "CONV_2D"]
    assert len(convs) == 2 and all(details[i] == np.int8 for d in convs for i in d["inputs"][:2])  # full-integer
    # A logged file is never replaced without --force.
    r = export([path, "-o", out, "--quantize", "dynamic"], db)
    assert r.exit_code == 2 and "--force" in r.output and f"run {run['id']}" in r.output
    assert ExperimentLog(db).runs("export")[0]["status"] == "completed" and len(ExperimentLog(db).runs("export")) == 1


def _images(folder, n=2, flat=False, broken=False):
    for c in ("a", "b"):
        sub = folder if flat else os.path.join(folder, c)
        os.makedirs(sub, exist_ok=True)
        for i in range(n):
            name = os.path.join(sub, f"{c}{i}.jpg")
            if broken:
                open(name, "wb").write(b"not an image")
            else:
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(name)
    return str(folder)


BAD = {
    "format": (["--format", "tensorrt"], 2, "'tensorrt' is not one of"),
    "quantize": (["--quantize", "int4"], 2, "'int4' is not one of"),
    "quantize_onnx": (["--format", "onnx", "--quantize", "int8"], 2, "Quantization is a LiteRT option"),
    "int8_no_images": (["--quantize", "int8"], 2, "needs --calibration-dir"),
    "empty": (["--quantize", "int8", "--calibration-dir", "{empty}"], 2, "is empty"),
    "missing": (["--quantize", "int8", "--calibration-dir", "{tmp}/nope"], 2, "is not a folder"),
    "undecodable": (["--quantize", "int8", "--calibration-dir", "{broken}"], 2, "Cannot decode 4 image files"),
    "layout": (["--quantize", "int8", "--calibration-dir", "{flat}"], 2, "No class folders"),
    "eval_classes": (["--eval-dir", "{good}"], 2, "has 2 classes"),
    "folder": (["-o", "{tmp}"], 2, "is a folder. Expected a file path ending in .tflite"),
    "extension": (["-o", "{tmp}/m.onnx"], 2, "ending in .tflite"),
    "under_a_file": (["-o", "{model}/m.tflite"], 2, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, case):
    path, _ = trained
    args, code, message = BAD[case]
    folders = {"empty": str(tmp_path / "empty"), "tmp": str(tmp_path), "broken": _images(tmp_path / "broken", broken=True),
               "flat": _images(tmp_path / "flat", flat=True), "good": _images(tmp_path / "good"), "model": path}
    os.makedirs(folders["empty"])
    args = [a.format(**folders) for a in args]
    if "-o" not in args:
        args = ["-o", str(tmp_path / "out.tflite"), *args]
    before = set(os.listdir(tmp_path))
    db = str(tmp_path / "log.db")
    r = export([path, *args], db)
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if message in line]) == 1, r.output
    assert {f for f in set(os.listdir(tmp_path)) - before if not f.startswith("log.db")} == set()
    assert not os.path.exists(db) or not ExperimentLog(db).runs("export")


def test_no_fixed_input_shape_and_onnx_without_its_extra(tmp_path, monkeypatch):
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    path = str(tmp_path / "any_size.keras")
    model.save(path)
    db = str(tmp_path / "log.db")
    r = export([path, "-o", str(tmp_path / "m.tflite")], db)
    assert r.exit_code == 2 and "fixed input shape" in r.output and "(None, None, None, 3)" in r.output
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the [onnx] extra were not installed
    r = export([path, "-o", str(tmp_path / "m.onnx"), "--format", "onnx"], db)
    assert r.exit_code == 2 and "tf2onnx" in r.output and "[onnx]" in r.output
    assert [f for f in os.listdir(tmp_path) if not f.startswith("log.db")] == ["any_size.keras"]


def test_int8_converter_failure_names_the_op_and_suggests_dynamic(tmp_path):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.Lambda(lambda t: keras.ops.erf(t))(x)  # no int8 kernel
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    from pruning.export import export_model

    calibration = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"(?s)cannot quantize op .*--quantize dynamic") as e:
        export_model(model, str(tmp_path / "m.tflite"), "litert", "int8", calibration)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "m.tflite")
    from experiments.deploy import write_export

    (tmp_path / "old.tflite").write_bytes(b"the previous export")
    with pytest.raises(ValueError, match="--quantize dynamic"):
        write_export(model, str(tmp_path / "old.tflite"), "litert", "int8", calibration)
    assert (tmp_path / "old.tflite").read_bytes() == b"the previous export"  # atomic: untouched, no partial file
    assert sorted(os.listdir(tmp_path)) == ["old.tflite"]


def test_vgg16_preprocessing_leaves_its_input_as_it_was():
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    before = x.copy()
    out = preprocessing("vgg16")(x)
    np.testing.assert_array_equal(x, before)  # Keras' preprocess_input alone edits it in place
    np.testing.assert_allclose(out, keras.applications.vgg16.preprocess_input(before.copy()))


def test_compress_exports_int8_as_its_last_step(tmp_path):
    from experiments.compress import run_compress
    from experiments.config import CompressConfig
    from test_compress import write_cifar_layout

    data = str(tmp_path / "data")
    write_cifar_layout(data, size=SIZE)
    path = str(tmp_path / "m.keras")
    small_cnn(classes=2).save(path)
    db = str(tmp_path / "log.db")
    out = str(tmp_path / "small.keras")
    cfg = CompressConfig(model=path, data_dir=data, target_macs=0.5, epochs=0, ranker="l1", preprocess="unit",
                         out_dir=str(tmp_path / "runs"), output=out, latency_runs=2, latency_batch=2, verbose=0,
                         export="litert", quantize="int8", calibration_images=8)
    lines = []
    s = run_compress(cfg, ExperimentLog(db), echo=lines.append)
    assert os.path.exists(str(tmp_path / "small-int8.tflite"))
    (run,) = ExperimentLog(db).runs("export")
    assert run["parent_id"] == s["run_id"] and run["artifact"] == str(tmp_path / "small-int8.tflite")
    metrics = json.loads(run["metrics"])
    assert metrics["quantize"] == "int8" and metrics["calibration_images"] == 8 and metrics["images"] == 12
    assert lines[-1].startswith("small-int8.tflite: ") and s["export"]["run_id"] == run["id"]
    from experiments.deploy import model_run

    assert model_run(ExperimentLog(db), out)["id"] == s["run_id"]  # `export small.keras` finds the compress run
    # A file a finished export run wrote is not replaced by a compress whose export lands there.
    from experiments.config import InputError

    log = ExperimentLog(db)
    with log.run("export") as other:
        other.finish(artifact=str(tmp_path / "new-int8.tflite"))
    again = dataclasses.replace(cfg, output=str(tmp_path / "new.keras"))
    with pytest.raises(InputError, match="new-int8.tflite' is the model of finished run"):
        run_compress(again, log, echo=lines.append)
    assert len(log.runs("compress")) == 2 and not os.path.exists(again.output)  # the parent and its one step
    with pytest.raises(ValueError, match="needs export='litert'"):
        CompressConfig(model=path, data_dir=data, target_macs=0.5, quantize="int8").validate()
