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


def test_only_a_non_chief_cluster_worker_is_on_scratch(monkeypatch):
    """A non-chief worker names no file (its scratch folder is deleted at the end)."""
    from types import SimpleNamespace

    from experiments.distribute import on_scratch

    cluster = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}}
    for index, strategy, scratch in [(1, "multiworker", True), (0, "multiworker", False), (1, "default", False)]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({**cluster, "task": {"type": "worker", "index": index}}))
        assert on_scratch(SimpleNamespace(strategy=strategy)) is scratch
    monkeypatch.delenv("TF_CONFIG")
    assert not on_scratch(SimpleNamespace(strategy="default"))


def test_experiment_configs_run_inside_their_strategy_and_policy():
    import dataclasses

    from experiments.common import distributed
    from experiments.config import CifarConfig, RiceConfig
    from experiments.models import vgg16_bn_cifar

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


# ------------------------------------------------------- several workers (TF_CONFIG)
# Two worker processes on free localhost ports, as two machines would run them: the same
# command, TF_CONFIG differing in task.index, one --db and --out-dir (the chief writes them).
from click.testing import CliRunner  # noqa: E402
from conftest import CIFAR_DIR, SAMPLE_RICE  # noqa: E402

WORKER_TIMEOUT = 120  # seconds a test waits for one command of both workers


def free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def start_worker(args, ports, index, tmp_path, tag=""):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "TF_CONFIG": tf_config(ports, index)}
    out = open(tmp_path / f"worker{index}{tag}.log", "w")
    return subprocess.Popen([sys.executable, "main_train.py", *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def finish(procs, tmp_path, timeout=WORKER_TIMEOUT):
    """Waits for every worker (killing all past `timeout`); returns their exit codes."""
    import time

    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs = "\n".join(f.read_text()[-2000:] for f in sorted(tmp_path.glob("worker*.log")))
            pytest.fail(f"workers still running after {timeout} s:\n{logs}")
    return codes


def logs_of(tmp_path):
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp_path.glob("worker*.log")))


def cluster_args(tmp_path, extra=()):
    return [*extra, "--strategy", "multiworker", "--worker-timeout", "60", "--db", str(tmp_path / "log.db"),
            "--out-dir", str(tmp_path / "runs"), "-v", "0"]


CIFAR_TINY = ["cifar", "--image-dir", CIFAR_DIR, "--width", "0.0625", "--train-limit", "64", "--test-limit", "32",
              "--batch-size", "32", "--warmup-epochs", "0", "--schedule", "oneshot", "--final-epochs", "1",
              "--ranker", "hrank", "--rank-batches", "1", "--rank-batch-size", "16", "--compress-rate", "0.5",
              "--latency-batch", "4"]
RICE_TINY = ["rice", "--data-dir", SAMPLE_RICE, "--limit-per-class", "8", "--weights", "none", "--image-size", "32",
             "--batch-size", "8", "--head-epochs", "1", "--unfreeze", "0", "--retrain-epochs", "1", "--ratios", "0.5",
             "--latency-batch", "4"]
needs_cifar = pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason=f"no CIFAR JPEGs at {CIFAR_DIR}")


def check_cluster_log(db, experiment, runs, phases):
    """One row per model, all completed, with the cluster in the config; every epoch
    once. Returns {run: {conv: kept filters}} and {run: test_top1}, baseline first."""
    from save_sqlite import ExperimentLog

    log = ExperimentLog(db)
    rows = log.runs(experiment)
    assert len(rows) == runs and [r["status"] for r in rows] == ["completed"] * runs
    kept, top1 = [], []
    for r in rows:
        config = json.loads(r["config"])
        if "strategy" in config and config["strategy"] == "multiworker":
            assert config["cluster"]["workers"] == 2
        epochs = [(e["phase"], e["epoch"]) for e in log.epochs(r["id"])]
        assert len(epochs) == len(set(epochs)), epochs  # every epoch once
        assert sorted(epochs) == sorted(phases[len(kept)]), epochs
        kept.append({p["layer"]: p["filters_after"] for p in log.layer_prunes(r["id"])})
        top1.append(r["test_top1"])
    return kept, top1


def single_process(args, tmp_path):
    from main_train import cli

    r = CliRunner().invoke(cli, [*args, "--db", str(tmp_path / "one.db"), "--out-dir", str(tmp_path / "one"),
                                 "-v", "0"])
    assert r.exit_code == 0, r.output


def two_workers(args, tmp_path):
    ports = free_ports(2)
    procs = [start_worker(cluster_args(tmp_path, args), ports, i, tmp_path) for i in (0, 1)]
    assert finish(procs, tmp_path) == [0, 0], logs_of(tmp_path)
    # Only the chief wrote: the run folders and the log; worker 1's scratch folder is gone.
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(
        os.path.basename(r["run_dir"]) for r in __import__("save_sqlite").ExperimentLog(
            str(tmp_path / "log.db")).runs())


@needs_cifar
def test_two_workers_cifar_survive_a_killed_worker_and_match_one_process(tmp_path):
    """A tiny cifar run (HRank, one-shot) on two workers. Worker 1 is killed after its
    first epoch and started again with the same command: the chief, whose collectives
    fail, restarts itself; both resume the interrupted baseline from the chief's last
    finished epoch and go on with the pruned run. The log holds one run per model with
    every epoch once, and the same kept filters per conv as one process."""
    import sqlite3
    import time

    args = [*CIFAR_TINY, "--epochs", "2"]
    ports = free_ports(2)
    chief, worker = (start_worker(cluster_args(tmp_path, args), ports, i, tmp_path) for i in (0, 1))
    scratch = tmp_path / "runs" / ".workers" / "1" / "log.db"
    deadline = time.monotonic() + WORKER_TIMEOUT
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with sqlite3.connect(f"file:{scratch}?mode=ro", uri=True) as db:
                if db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    else:
        chief.kill(), worker.kill()
        pytest.fail("worker 1 logged no epoch:\n" + logs_of(tmp_path))
    worker.kill()
    worker.wait()
    worker = start_worker(cluster_args(tmp_path, args), ports, 1, tmp_path, tag="-restarted")
    assert finish([chief, worker], tmp_path, 2 * WORKER_TIMEOUT) == [0, 0], logs_of(tmp_path)
    assert "restarting this worker" in (tmp_path / "worker0.log").read_text()
    assert not (tmp_path / "runs" / ".workers").exists()  # worker 1's scratch folder is gone
    phases = [[("pretrain", 0), ("pretrain", 1)], [("final", 0)]]
    kept, top1 = check_cluster_log(str(tmp_path / "log.db"), "cifar", 2, phases)
    # Only the chief wrote run folders: one per logged run.
    assert len(os.listdir(tmp_path / "runs")) == 2
    # HRank ran on every worker through the cluster's predict (each gets all workers' rows):
    # its scores are still mean ranks of 32x32 (and smaller) maps, at most 32.
    ranks = list((tmp_path / "runs").glob("*-baseline/ranks/hrank/*.npy"))
    assert len(ranks) == 13 and max(float(np.load(f).max()) for f in ranks) <= 32
    single_process(args, tmp_path)
    kept1, top1_one = check_cluster_log(str(tmp_path / "one.db"), "cifar", 2, phases)
    assert kept == kept1 and len(kept[1]) == 13  # the same filters kept per conv
    print("cifar top-1 two workers / one process:", top1, top1_one)
    assert all(abs(a - b) <= 0.2 for a, b in zip(top1, top1_one)), (top1, top1_one)  # 30 test images


def test_two_workers_rice_matches_one_process(tmp_path):
    two_workers(RICE_TINY, tmp_path)
    phases = [[("head", 0)], [("retrain_head", 0)]]
    kept, top1 = check_cluster_log(str(tmp_path / "log.db"), "rice", 2, phases)
    single_process(RICE_TINY, tmp_path)
    kept1, top1_one = check_cluster_log(str(tmp_path / "one.db"), "rice", 2, phases)
    assert kept == kept1 and len(kept[1]) >= 12  # every pruned conv (rice leaves block5_conv3 by default)
    print("rice top-1 two workers / one process:", top1, top1_one)
    assert all(abs(a - b) <= 0.3 for a, b in zip(top1, top1_one)), (top1, top1_one)  # a handful of test images


def test_cluster_input_errors(tmp_path, monkeypatch):
    """One line, exit 2, before any work: no TF_CONFIG, an index outside the cluster,
    and (in a subprocess) a cluster whose other worker never comes up."""
    from main_train import cli

    args = ["rice", "--data-dir", SAMPLE_RICE, "--strategy", "multiworker", "--db", str(tmp_path / "log.db"),
            "--out-dir", str(tmp_path / "runs")]
    monkeypatch.delenv("TF_CONFIG", raising=False)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "needs the TF_CONFIG environment variable" in r.output, r.output
    monkeypatch.setenv("TF_CONFIG", tf_config([1111, 2222], 2))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert "Expected TF_CONFIG task index in [0, 1]: the cluster lists 2 worker(s) (127.0.0.1:1111, " \
           "127.0.0.1:2222). Received: index=2" in r.output
    assert not (tmp_path / "log.db").exists()

    ports = free_ports(2)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "TF_CONFIG": tf_config(ports, 0)}
    proc = subprocess.run([sys.executable, "main_train.py", *args, "--worker-timeout", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("Error")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [f"Error: The cluster did not form within 3 s: no answer from worker(s) 127.0.0.1:{ports[1]} "
                     "(this is worker 0 of 2, TF_CONFIG). Start every worker with the same cluster, or raise "
                     "--worker-timeout."]
    from save_sqlite import ExperimentLog

    assert not os.path.exists(tmp_path / "log.db") or not ExperimentLog(str(tmp_path / "log.db")).runs()
