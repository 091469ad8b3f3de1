"""Acceptance: every keras.applications family (weights=None, small input) prunes at a
uniform 0.3 with no exclusions, keeps zero-filter invariance, round-trips through
`.keras`, and gets smaller. One model per family runs by default; the other sizes
of a family are marked slow (`pytest -m slow`)."""

import keras
import numpy as np
import pytest

from conftest import relative_diff, zero_filters
from pruning import CNNModel, PrunePlan, get_ranker, prune
from zoo_models import ZOO, build, excluded_from_target

SLOW = {"VGG19", "ResNet50V2", "MobileNetV3Large"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO
])
def test_zoo_family(name, tmp_path):
    model = build(name)
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, get_ranker("random", seed=0).rank_all(cnn), 0.3)
    assert plan.keep
    # Every blocked conv is blocked for a reason the engine must respect.
    assert [c.name for c in cnn.conv_layers if not c.prunable and not excluded_from_target(c)] == []
    for conv in cnn.conv_layers:
        if conv.name in plan.keep:
            zero_filters(conv.layer, np.setdiff1d(np.arange(conv.filters), plan.keep[conv.name]))
    x = np.random.default_rng(0).normal(size=(2, *ZOO[name])).astype("float32")
    before = np.asarray(model(x, training=False))
    pruned = prune(cnn, plan)
    assert pruned.count_params() < model.count_params()
    path = str(tmp_path / f"{name}.keras")
    pruned.save(path)
    # The reloaded file (no custom objects) gives the unpruned model's outputs.
    loaded = keras.models.load_model(path)
    assert loaded.count_params() == pruned.count_params()
    assert relative_diff(before, np.asarray(loaded(x, training=False))) < 1e-4


def test_convnext_prunes_more_with_allow_inexact():
    model = build("ConvNeXtTiny")
    exact = CNNModel(model)
    inexact = CNNModel(model, allow_inexact=True)
    assert len(inexact.prunable_layers) > len(exact.prunable_layers)
    plan = PrunePlan.from_scores(inexact, get_ranker("l1").rank_all(inexact), 0.3)
    with pytest.warns(UserWarning, match="Pruned inexactly through"):
        pruned = prune(inexact, plan)
    assert pruned.count_params() < prune(exact, PrunePlan.from_scores(
        exact, get_ranker("l1").rank_all(exact), 0.3)).count_params()
