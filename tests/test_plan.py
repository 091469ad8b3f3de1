import json

import keras
import numpy as np
import pytest

from experiments.models import VGG16_BLOCKS, vgg16_bn_cifar
from pruning import CNNModel, PrunePlan, get_ranker, layer_stats, model_stats, prune


@pytest.fixture(scope="module")
def vgg100():
    return vgg16_bn_cifar(100)


def test_vgg16_bn_cifar_reference_counts(vgg100):
    stats = model_stats(vgg100)
    assert stats["trainable_params"] == 15_038_116  # PyTorch's count for HRank's VGG16-BN
    assert stats["params"] == vgg100.count_params() == 15_038_116 + 9_472
    assert stats["macs"] == 313_509_888  # conv + dense, ~313.5M
    rows = {r["layer"]: r for r in layer_stats(vgg100)}
    assert rows["conv1"]["macs"] == 32 * 32 * 3 * 3 * 3 * 64
    assert rows["classifier"]["macs"] == 512 * 100
    assert sum(VGG16_BLOCKS) == len(CNNModel(vgg100).conv_layers) == 13


@pytest.mark.parametrize("rate,trainable", [(0.3, 7_484_551), (0.5, 3_868_292), (0.7, 1_468_043)])
def test_uniform_compress_rate_matches_hrank(vgg100, rate, trainable):
    cnn = CNNModel(vgg100)
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), rate)
    pruned = prune(cnn, plan)
    stats = model_stats(pruned)
    assert stats["trainable_params"] == trainable
    assert stats["params"] == pruned.count_params()
    if rate == 0.5:
        assert 78e6 < stats["macs"] < 80e6


def test_keeps_highest_scores_and_at_least_one():
    model = vgg16_bn_cifar(10, width=1 / 32)  # conv1 has 2 filters
    cnn = CNNModel(model)
    scores = {c.name: np.arange(c.filters, dtype=float)[::-1] for c in cnn.conv_layers}
    plan = PrunePlan.from_scores(cnn, scores, 0.5)
    assert plan.keep["conv1"] == [0]
    assert plan.keep["conv13"] == list(range(8))  # 16 filters, highest scores first
    plan = PrunePlan.from_scores(cnn, scores, 0.99)
    assert all(len(k) >= 1 for k in plan.keep.values())


def test_per_layer_rates_exclusion_and_json(tmp_path):
    cnn = CNNModel(vgg16_bn_cifar(10, width=0.25))
    scores = get_ranker("l1").rank_all(cnn)
    rates = [0.5] * 12 + [0.0]
    plan = PrunePlan.from_scores(cnn, scores, rates, exclude=["conv1"])
    assert "conv1" not in plan.keep and "conv13" not in plan.keep
    assert len(plan.keep["conv2"]) == 8
    path = tmp_path / "plan.json"
    plan.save(str(path))
    again = PrunePlan.load(str(path))
    assert again.keep == plan.keep and json.loads(path.read_text())["filters"]["conv2"] == 16
    assert prune(cnn, again).count_params() == prune(cnn, plan).count_params()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.2, "half"])
def test_bad_ratio(ratio):
    cnn = CNNModel(vgg16_bn_cifar(10, width=0.125))
    with pytest.raises(ValueError, match=r"Expected ratio in \[0, 1\). Received: ratio="):
        PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), ratio)


def test_bad_names_and_lengths():
    cnn = CNNModel(vgg16_bn_cifar(10, width=0.125))
    scores = get_ranker("l1").rank_all(cnn)
    with pytest.raises(ValueError, match="Unknown convolution layer: 'conv99'. Expected one of: conv1"):
        PrunePlan.from_scores(cnn, scores, 0.5, exclude=["conv99"])
    with pytest.raises(ValueError, match="Expected one ratio per convolution \\(13"):
        PrunePlan.from_scores(cnn, scores, [0.5, 0.5])
    with pytest.raises(ValueError, match="distinct filter indices in \\[0, 8\\)"):
        PrunePlan.from_indices(cnn, {"conv1": [0, 8]})
    with pytest.raises(ValueError, match="No scores for layer 'conv1'"):
        PrunePlan.from_scores(cnn, {}, 0.5)


def test_plan_for_another_model_is_refused(tmp_path):
    small = CNNModel(vgg16_bn_cifar(10, width=0.0625))
    wide = CNNModel(vgg16_bn_cifar(10, width=0.125))
    plan = PrunePlan.from_scores(small, get_ranker("l1").rank_all(small), 0.5)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    with pytest.raises(ValueError, match="another model: layer 'conv1' had 4 filters there and has 8 here"):
        prune(wide, PrunePlan.load(str(path)))
    # Same names and filter counts, other kernels: the fingerprint tells them apart.
    def build(k):
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, k, padding="same", name="c")(inp)
        return CNNModel(keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x))))
    plan = PrunePlan.from_indices(build(3), {"c": [0, 1]})
    with pytest.raises(ValueError, match="another model.*fingerprint"):
        prune(build(5), plan)
    assert prune(build(3), plan).get_layer("c").filters == 2


@pytest.mark.parametrize("text,match", [
    (None, "Plan file not found"),
    ("[1, 2]", "a JSON object with a 'keep' mapping. Received: a JSON list"),
    ('{"keep": [1, 2]}', "Expected 'keep' in plan file .* to map layer names to lists"),
    ('{"keep": {"conv1": [0, 1]', "Expected plan file .* to hold JSON. Received invalid JSON"),
    ('{"kept": {}}', "to hold a 'keep' mapping"),
])
def test_bad_plan_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "plan.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        PrunePlan.load(str(path))
    assert str(path) in str(info.value)


def test_uniform_ratio_skips_blocked_convs_and_lists_them():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inp)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(inp)
    x = keras.layers.Concatenate()([keras.layers.LayerNormalization(name="ln")(a), b])
    out = keras.layers.Conv2D(2, 1, name="head")(x)
    cnn = CNNModel(keras.Model(inp, out))
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), 0.5)
    assert list(plan.keep) == ["b"]
    assert set(plan.meta["skipped"]) == {"a", "head"}
    assert "model output" in plan.meta["skipped"]["head"]
    with pytest.raises(ValueError, match="Layer 'a' cannot be pruned"):
        PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), [0.5, 0.5, 0.0])

def test_n_kept_rounds_down_or_to_nearest():
    from pruning.plan import n_kept

    # 5% of 64 leaves 61: nearest rounds back to 64 (nothing removed), down to 56.
    assert n_kept(64, 0.05, round_to=8) == 64
    assert n_kept(64, 0.05, round_to=8, round_mode="down") == 56
    assert n_kept(64, 0.3, round_to=8, round_mode="down") == 40  # 45 -> 40
    assert n_kept(64, 0.3, round_to=8) == 48  # 45 -> 48
    assert n_kept(64, 0.95, round_to=8, round_mode="down") == 8  # at least one multiple
    assert n_kept(64, 0.25, round_to=16, round_mode="down") == 48  # already a multiple
    assert n_kept(61, 0.05, round_to=1, round_mode="down") == 58  # no rounding asked
    with pytest.raises(ValueError, match="Expected round_mode in .*Received: round_mode='up'"):
        n_kept(64, 0.1, round_to=8, round_mode="up")


def test_from_scores_rounds_down_when_asked():
    cnn = CNNModel(vgg16_bn_cifar(10, width=0.125))  # 8 filters in conv1
    scores = get_ranker("l1").rank_all(cnn)
    nearest = PrunePlan.from_scores(cnn, scores, 0.05, round_to=4)
    down = PrunePlan.from_scores(cnn, scores, 0.05, round_to=4, round_mode="down")
    # conv5 has 32 filters: 5% removes one (31 kept); to nearest 4 that is 32 again, down it is 28.
    assert len(nearest.keep["conv5"]) == 32
    assert len(down.keep["conv5"]) == 28 and down.meta["round_mode"] == "down"
    with pytest.raises(ValueError, match="Expected round_mode in .*Received: round_mode='up'"):
        PrunePlan.from_scores(cnn, scores, 0.5, round_mode="up")


def _tied_and_grouped():
    """c1 and c2 tied by an Add; c3 feeds a convolution of 2 groups."""
    x = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(6, 3, padding="same", name="c1")(x)
    b = keras.layers.Conv2D(6, 3, padding="same", name="c2")(x)
    c = keras.layers.Conv2D(8, 3, padding="same", name="c3")(keras.layers.Add()([a, b]))
    d = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="g")(c)
    y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(d))
    return CNNModel(keras.Model(x, y))


def test_from_counts_keeps_exactly_the_counts_given():
    cnn = _tied_and_grouped()
    scores = {c.name: np.random.default_rng(c.index).random(c.filters) for c in cnn.conv_layers}
    plan = PrunePlan.from_counts(cnn, scores, {"c1": 5, "c3": 6})
    tied = scores["c1"] + scores["c2"]  # the tied conv follows, on the scores of both
    assert plan.keep["c1"] == plan.keep["c2"] == sorted(np.argsort(-tied, kind="stable")[:5].tolist())
    assert "g" not in plan.keep and plan.meta["counts"] == {"c1": 5, "c2": 5, "c3": 6}
    # c3's two halves feed the two groups of g: 3 of the 4 best of each half stay.
    halves = [sorted(np.argsort(-scores["c3"][h:h + 4], kind="stable")[:3] + h) for h in (0, 4)]
    assert plan.keep["c3"] == [int(i) for h in halves for i in h]
    pruned = prune(cnn, plan)
    assert [l.filters for l in pruned.layers if isinstance(l, keras.layers.Conv2D)] == [5, 5, 6, 4]
    # Every count of a plain conv gives exactly that many filters: no ratio in between.
    vgg = CNNModel(vgg16_bn_cifar(10, width=0.25))
    vscores = get_ranker("l1").rank_all(vgg)
    for n in range(1, vgg.conv("conv4").filters):
        assert len(PrunePlan.from_counts(vgg, vscores, {"conv4": n}).keep["conv4"]) == n


@pytest.mark.parametrize("counts,match", [
    ({"c1": 0}, r"Expected counts\['c1'\] a whole number in \[1, 6\].*Received: counts\['c1'\]=0"),
    ({"c1": 7}, r"Expected counts\['c1'\] a whole number in \[1, 6\].*Received: counts\['c1'\]=7"),
    ({"c1": 2.5}, r"Received: counts\['c1'\]=2.5"),
    ({"nope": 3}, r"Unknown convolution layer: 'nope'"),
    ({"c1": 4, "c2": 5}, r"tied by an elementwise merge and must keep one count. Received: \[4, 5\]"),
    ({"c3": 5}, r"grouped convolution of 2 groups: expected a count that is a multiple of 2. Received: 5"),
])
def test_from_counts_refuses_bad_counts(counts, match):
    cnn = _tied_and_grouped()
    scores = {c.name: np.ones(c.filters) for c in cnn.conv_layers}
    with pytest.raises(ValueError, match=match):
        PrunePlan.from_counts(cnn, scores, counts)
