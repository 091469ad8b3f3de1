import keras
import numpy as np
import pytest

from experiments.models import resnet20_cifar, vgg16_bn_cifar
from pruning import CNNModel, PrunePlan, get_ranker, model_stats, prune
from pruning.allocation import PlanCost, allocate, compose, layer_sensitivity
from tests.conftest import randomize_bn


@pytest.fixture(scope="module")
def vgg():
    model = vgg16_bn_cifar(10, 0.125, seed=0)
    return model, CNNModel(model), get_ranker("l1").rank_all(model)


@pytest.fixture(scope="module")
def resnet():
    model = resnet20_cifar(10, 0.5, input_shape=(16, 16, 3), seed=0)
    return model, CNNModel(model), get_ranker("fpgm").rank_all(model)


def small_cnn():
    inp = keras.Input((12, 12, 3))
    x = inp
    for i, f in enumerate((16, 24, 32)):
        x = keras.layers.Conv2D(f, 3, padding="same", name=f"c{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x) if i < 2 else x
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(4, activation="softmax")(x))


@pytest.mark.parametrize("fixture", ["vgg", "resnet"])
def test_plan_cost_equals_the_rebuilt_model(fixture, request):
    model, cnn, scores = request.getfixturevalue(fixture)
    plan = allocate(cnn, scores, 0.4, allocation="global")
    rebuilt = model_stats(prune(cnn, plan))
    est = PlanCost(cnn)(plan)
    assert est == {"macs": rebuilt["macs"], "params": rebuilt["params"]}
    assert PlanCost(cnn)({}) == {"macs": model_stats(model)["macs"], "params": model_stats(model)["params"]}


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("target,round_to", [(0.5, 1), (0.25, 8)])
def test_allocations_reach_the_target_within_2_percent(vgg, allocation, metric, target, round_to):
    model, cnn, scores = vgg
    plan = allocate(cnn, scores, target, metric=metric, allocation=allocation, round_to=round_to)
    reached = model_stats(prune(cnn, plan))[metric] / model_stats(model)[metric]
    assert abs(reached - target) <= 0.02 * target
    assert plan.meta["reached"] == pytest.approx(reached)
    assert plan.meta["within_tolerance"] and plan.meta["allocation"] == allocation
    if round_to > 1:
        assert all(len(k) % round_to == 0 or len(k) == plan.filters[n] for n, k in plan.keep.items())


def test_sensitivity_reaches_the_target_and_spares_sensitive_layers():
    model = small_cnn()
    randomize_bn(model)
    cnn = CNNModel(model)
    scores = get_ranker("l1").rank_all(cnn)
    x = np.random.default_rng(0).normal(size=(32, 12, 12, 3)).astype("float32")
    y = np.argmax(model(x), -1)  # the unpruned model is right on every image
    calls = []

    def evaluate(m):
        calls.append(1)
        return float(np.mean(np.argmax(m(x), -1) == y))

    sens = layer_sensitivity(cnn, scores, evaluate, max_ratio=0.9)
    assert set(sens) == {("c0",), ("c1",), ("c2",)} and len(calls) == 1 + 3 * 4
    drops = {g[0]: np.mean([d for _, d in pts]) for g, pts in sens.items()}
    most, least = max(drops, key=drops.get), min(drops, key=drops.get)
    for metric in ("macs", "params"):
        plan = allocate(cnn, scores, 0.5, metric=metric, allocation="sensitivity", sensitivity=sens)
        reached = model_stats(prune(cnn, plan))[metric] / model_stats(model)[metric]
        assert abs(reached - 0.5) <= 0.01
        # A layer whose pruning costs more accuracy keeps at least as large a share of its filters.
        if drops[most] > drops[least]:
            frac = {n: len(k) / plan.filters[n] for n, k in plan.keep.items()}
            assert frac.get(most, 1.0) >= frac.get(least, 1.0)


def test_global_caps_every_layer_and_respects_ties(resnet):
    model, cnn, scores = resnet
    plan = allocate(cnn, scores, 0.3, allocation="global", max_ratio=0.75)
    for n, k in plan.keep.items():
        assert len(k) >= plan.filters[n] - int(0.75 * plan.filters[n])
    for group in cnn.groups:
        kept = {tuple(plan.keep.get(n, range(cnn.conv(n).filters))) for n in group}
        assert len(kept) == 1, group  # tied convs keep the same indices
    prune(cnn, plan)  # validates


def test_unreachable_target_and_bad_arguments(vgg):
    model, cnn, scores = vgg
    with pytest.raises(ValueError, match="Cannot reach the target 0.01"):
        allocate(cnn, scores, 0.01, max_ratio=0.5)
    with pytest.raises(ValueError, match="Expected allocation in"):
        allocate(cnn, scores, 0.5, allocation="greedy")
    with pytest.raises(ValueError, match=r"Expected target_params in \(0, 1\]. Received: target_params=1.5"):
        allocate(cnn, scores, 1.5, metric="params")
    with pytest.raises(ValueError, match="needs evaluate"):
        allocate(cnn, scores, 0.5, allocation="sensitivity")


def test_composed_plan_equals_pruning_twice(resnet):
    model, cnn, scores = resnet
    randomize_bn(model)
    first = allocate(cnn, scores, 0.7, allocation="uniform")
    once = prune(cnn, first)
    second = allocate(once, get_ranker("l1").rank_all(once), 0.7, allocation="global")
    twice = prune(once, second)
    total = compose(first, second)
    direct = prune(cnn, PrunePlan.from_dict(total.to_dict()))
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(direct(x), twice(x), rtol=1e-4, atol=1e-5)
    assert len(total.meta["steps"]) == 2


def test_uniform_allocation_prunes_a_conv_tied_to_a_concatenation():
    """c is added to concat(a, b): its 16 filters are tied to a's 8 and b's 8, not one to one. The
    counts the allocation moves are shares of the group's tied classes, so it still reaches the target
    (as closely as one class of 16 allows) and the pruned model keeps every tie."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(x)
    c = keras.layers.Conv2D(16, 3, padding="same", name="c")(x)
    y = keras.layers.Conv2D(4, 1, name="d")(keras.layers.Add()([keras.layers.Concatenate()([a, b]), c]))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(y)))
    cnn = CNNModel(model)
    plan = allocate(cnn, get_ranker("l1").rank_all(cnn), 0.7, allocation="uniform")
    assert abs(plan.meta["reached"] - 0.7) <= 0.05
    kept = {n: len(plan.keep[n]) for n in "abc"}
    assert kept["a"] + kept["b"] == kept["c"] < 16
    assert model_stats(prune(cnn, plan))["macs"] / model_stats(model)["macs"] == pytest.approx(plan.meta["reached"])
