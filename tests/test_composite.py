"""Models as other people write them (issue 24), without keras-hub: a task that calls its
backbone on the backbone's own input, custom composite layers traced and inlined,
layers whose config does not round-trip, shared weightless layers, pass-through layers
and operations, and subclassed functional models. Each fails on the engine before it."""

import signal
import warnings

import keras
import numpy as np
import pytest

from conftest import prune_zeroed, relative_diff
from pruning import CNNModel, PrunePlan, get_ranker, prune

L = keras.layers


class _Timeout(Exception):
    pass


@pytest.fixture
def time_limit():
    """Fails a test that runs longer than `seconds` instead of letting it hang."""
    def arm(seconds):
        def fire(*_):
            raise _Timeout(f"still running after {seconds} s")
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(seconds)
    yield arm
    signal.alarm(0)


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


def _backbone(name="backbone"):
    inp = keras.Input((16, 16, 3), name=f"{name}_in")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name=f"{name}_c1")(inp)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name=f"{name}_c2")(x)
    return keras.Model(inp, x, name=name)


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
