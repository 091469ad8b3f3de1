"""Issue 21: speed-ups timed in interleaved rounds in one window, trustworthy on a loaded machine."""

import contextlib
import json
import subprocess
import sys

import keras
import pytest
from click.testing import CliRunner

from experiments import common
from main_train import cli
from pruning.latency import interleaved_latency
from save_sqlite import ExperimentLog


def small_cnn(width=16):
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x))


@contextlib.contextmanager
def busy_machine(processes=2):
    """Background processes that keep cores busy the whole time (and so change the load)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_interleaved_latency_records_rounds_spread_and_load():
    fast = small_cnn()
    slow = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(64, 5, padding="same"),
                             keras.layers.Conv2D(64, 5, padding="same")])
    timing = interleaved_latency({"slow": slow, "fast": fast}, batch_size=4, runs=2, rounds=3)
    assert set(timing["models"]) == {"slow", "fast"} and timing["rounds"] == 3
    for m in timing["models"].values():
        assert len(m["rounds_ms"]) == 3 and m["spread"] >= 0 and m["ms_per_batch"] > 0
    assert "load" in timing["machine_before"] and "load" in timing["machine_after"]
    assert timing["speedup"]["slow"] == 1.0 and timing["speedup"]["fast"] > 1.5  # ~40x fewer MACs
    calls = []
    runner = lambda x: calls.append(x.shape)  # noqa: E731  (a callable: an exported file's runner)
    interleaved_latency({"k": fast, "f": runner}, batch_size=2, runs=1, rounds=2, warmup=1)
    assert calls == [(2, 32, 32, 3)] * 3
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_latency({"k": fast}, rounds=0)
    # One shape check for both timers: a shape that is not fixed is one ValueError naming it.
    from pruning import measure_latency

    for timer in (lambda shape: interleaved_latency({"f": runner}, input_shape=shape),
                  lambda shape: measure_latency(fast, input_shape=shape)):
        with pytest.raises(ValueError, match=r"fixed input shape. Received: input_shape=\(None, 32, 3\)"):
            timer((None, 32, 3))
    with pytest.raises(ValueError, match="Cannot tell the input shape of function: pass input_shape"):
        interleaved_latency({"f": runner})


def test_compare_and_run_loop_speedup_of_a_copy_is_one_under_load(tmp_path):
    model = small_cnn(64)  # ~10-20 ms a batch of 16: calls longer than the scheduler's time slices
    a = str(tmp_path / "a.keras")
    model.save(a)
    log = ExperimentLog(str(tmp_path / "log.db"))
    # The run loop: a baseline run on the machine as it is, then (once the load has changed) an
    # unpruned copy of it as the "pruned" run. Timed in separate windows this reads as 0.5-0.7x.
    with log.run("rice", pruning_ratio=0.0) as base_run:
        base = common.finish_model_run(base_run, model, artifact=a, save=False, latency_batch=16,
                                       latency_runs=21, echo=lambda line: None)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    with busy_machine():
        with log.run("rice", pruning_ratio=0.1, parent_id=base["run_id"]) as run:
            summary = common.finish_model_run(run, copy, artifact=str(tmp_path / "copy.keras"), baseline=base,
                                              latency_batch=16, latency_runs=21, echo=lambda line: None)
        r = CliRunner().invoke(cli, ["stats", "--compare", a, a, "--latency-batch", "16", "--runs", "21",
                                     "--json"])
        assert r.exit_code == 0, r.output
        timing = json.loads(r.output[r.output.index("{"):])
    assert timing["rounds"] == 21 and len(timing["models"]["B"]["rounds_ms"]) == 21
    assert 0.8 <= timing["speedup"]["B"] <= 1.25, timing
    logged = json.loads(log.get_run(summary["run_id"])["metrics"])
    assert 0.8 <= summary["speedup"] <= 1.25, logged["latency"]
    assert logged["latency"]["interleaved"] and len(logged["latency"]["baseline_rounds_ms"]) == 21
    assert "load" in logged["latency"]["machine_before"] and logged["latency"]["spread"] >= 0
    assert logged["speedup"] == summary["speedup"]


def test_compare_bad_input(tmp_path):
    r = CliRunner().invoke(cli, ["stats"])
    assert r.exit_code == 2 and "MODEL_PATH" in r.output
    r = CliRunner().invoke(cli, ["stats", "--compare", str(tmp_path / "missing.keras"), "x.keras"])
    assert r.exit_code == 1 and "missing.keras" in r.output and "Traceback" not in r.output
