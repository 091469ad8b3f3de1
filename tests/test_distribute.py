import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from experiments.distribute import get_strategy, set_mixed_precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: logical devices can only be set before TensorFlow starts.
# Pretrain -> rank (L1) -> prune -> fine-tune, once on one device and once mirrored
# over two logical CPUs, each logged to the same SQLite file.
WORKER = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from experiments.common import prune_logged, set_seed
from experiments.distribute import get_strategy, replicas
from pruning import CNNModel, get_ranker
from save_sqlite import ExperimentLog

log = ExperimentLog(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 12, 12, 3)).astype("float32")
y = (x[:, :6].mean(axis=(1, 2, 3)) > 0).astype("int64")  # a learnable label
out = {}
for name in ("default", "mirrored"):
    set_seed(0)
    strategy = get_strategy(name, devices=["/cpu:0", "/cpu:1"] if name == "mirrored" else None)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with log.run("distributed", model="tiny", ranker="l1", seed=0, config={"strategy": name}) as run:
        with strategy.scope():
            inp = keras.Input((12, 12, 3))
            h = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inp)
            h = keras.layers.BatchNormalization(name="bn1")(h)
            h = keras.layers.ReLU()(h)
            h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            model = keras.Model(inp, keras.layers.Dense(2, name="fc")(h))
            model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"], jit_compile=False)
        model.fit(data, epochs=2, verbose=0, callbacks=[run.callback("pretrain")])
        scores = get_ranker("l1").rank_all(model)  # host-side: reads the (mirrored) weights
        with strategy.scope():  # the pruned model's variables must belong to the strategy
            pruned, plan = prune_logged(model, scores, 0.5, run, ranker="l1")
            pruned.compile(keras.optimizers.SGD(0.05),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                           jit_compile=False)
        pruned.fit(data, epochs=1, verbose=0, callbacks=[run.callback("finetune")])
        acc = float(pruned.evaluate(data, verbose=0)[1])
        run.finish(metrics={"accuracy": acc})
    out[name] = {"replicas": replicas(strategy), "run": run.id,
                 "widths": [c.filters for c in CNNModel(pruned).conv_layers],
                 "kept": {k: list(v) for k, v in plan.keep.items()}}
print("RESULT" + json.dumps(out))
"""


def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path):
    from save_sqlite import ExperimentLog

    db = str(tmp_path / "log.db")
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", WORKER, db], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, two = result["default"], result["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["widths"] == two["widths"] == [8, 8]  # both convs halved
    assert one["kept"] == two["kept"]
    log = ExperimentLog(db)
    runs = {r["id"]: r for r in log.runs("distributed")}
    assert [runs[one["run"]]["status"], runs[two["run"]]["status"]] == ["completed", "completed"]

    def rows(run_id):
        epochs = [(e["phase"], e["epoch"], e["loss"] is not None, e["accuracy"] is not None)
                  for e in log.epochs(run_id)]
        layers = [(p["layer"], p["filters_before"], p["filters_after"], p["ranker"])
                  for p in log.layer_prunes(run_id)]
        return epochs, layers

    assert rows(one["run"]) == rows(two["run"])
    assert rows(one["run"])[0] == [("pretrain", 0, True, True), ("pretrain", 1, True, True),
                                   ("finetune", 0, True, True)]
    # Same data, same seed: the losses agree up to the order of the gradient all-reduce.
    loss = [[e["loss"] for e in log.epochs(r)] for r in (one["run"], two["run"])]
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-3)


def test_mixed_precision_builds_and_trains():
    from experiments.models import vgg16_bn_cifar

    try:
        assert set_mixed_precision(True) == "mixed_float16"
        model = vgg16_bn_cifar(10, width=0.0625, seed=0)
        conv = model.get_layer("conv1")
        assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
        model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
        x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
        loss = model.train_on_batch(x, np.arange(8) % 10)
        assert np.isfinite(loss)
        # The classifier keeps float32 logits (a stable loss) while the convs compute in float16.
        assert keras.backend.standardize_dtype(model(x).dtype) == "float32"
    finally:
        assert set_mixed_precision(False) == "float32"
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_strategy_and_precision_errors():
    with pytest.raises(ValueError, match=r"Expected strategy in \('default', 'mirrored', 'multiworker', "
                                         r"'tpu'\). Received: strategy='gpu'"):
        get_strategy("gpu")
    with pytest.raises(ValueError, match="No TPU found.*Received: strategy='tpu'"):
        get_strategy("tpu")
    with pytest.raises(ValueError, match="Expected mixed precision in .*Received: mixed_precision='fp8'"):
        set_mixed_precision("fp8")
    assert get_strategy("default").num_replicas_in_sync == 1


def test_experiment_configs_run_inside_their_strategy_and_policy():
    import dataclasses

    from experiments.common import distributed
    from experiments.config import PRECISIONS, STRATEGIES, CifarConfig, RiceConfig
    from experiments.distribute import PRECISIONS as precisions, STRATEGIES as strategies
    from experiments.models import vgg16_bn_cifar

    assert (STRATEGIES, PRECISIONS) == (strategies, precisions)  # the CLI's choices are the module's
    for cls in (CifarConfig, RiceConfig):
        assert {"strategy", "mixed_precision"} <= {f.name for f in dataclasses.fields(cls)}
    cfg = CifarConfig(strategy="mirrored", mixed_precision="mixed_bfloat16")
    with distributed(cfg) as strategy:
        assert strategy.num_replicas_in_sync >= 1 and type(strategy).__name__ == "MirroredStrategy"
        model = vgg16_bn_cifar(10, width=0.0625, seed=0)
        assert model.get_layer("conv1").compute_dtype == "bfloat16"
        assert model.get_layer("classifier").compute_dtype == "float32"
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored
    with pytest.raises(ValueError, match="Expected strategy in"):
        with distributed(dataclasses.replace(cfg, strategy="gpu")):
            pass
    assert keras.mixed_precision.dtype_policy().name == "float32"
