import keras
import numpy as np
import pytest

from pruning import CNNModel, get_ranker, load_scores, save_scores
from pruning.rankers import RANKERS, feature_map_ranks


def small_model():
    inp = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 2, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def test_l1_and_l2_are_per_output_filter():
    model = small_model()
    kernel = np.arange(2 * 2 * 2 * 3, dtype="float32").reshape(2, 2, 2, 3) - 10.0
    model.get_layer("c1").set_weights([kernel, np.zeros(3, "float32")])
    l1 = get_ranker("l1").rank(model, "c1")
    # By hand: filter f sums |W[h, w, c, f]| over h, w and input channels c.
    expected = [sum(abs(kernel[h, w, c, f]) for h in range(2) for w in range(2) for c in range(2))
                for f in range(3)]
    np.testing.assert_allclose(l1, expected)
    np.testing.assert_allclose(get_ranker("l2").rank(model, "c1"),
                               [np.sqrt(np.sum(kernel[..., f] ** 2)) for f in range(3)], rtol=1e-6)


def test_hrank_equals_numpy_matrix_rank_of_post_relu_maps():
    model = small_model()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 8, 8, 2)).astype("float32") for _ in range(3)]
    scores = get_ranker("hrank", num_batches=2).rank_all(model, data=batches)
    probe = keras.Model(model.inputs, [model.get_layer("r1").output, model.get_layer("c2").output])
    for name, idx in (("c1", 0), ("c2", 1)):
        maps = np.concatenate([np.asarray(probe(b)[idx]) for b in batches[:2]])
        expected = [np.mean([np.linalg.matrix_rank(maps[i, :, :, c]) for i in range(10)])
                    for c in range(maps.shape[-1])]
        np.testing.assert_allclose(scores[name], expected)


def test_feature_map_ranks_is_batched_matrix_rank():
    fmap = np.zeros((2, 4, 4, 3), "float32")
    fmap[0, :, :, 0] = np.eye(4)
    fmap[1, :2, :2, 2] = 1.0
    np.testing.assert_array_equal(feature_map_ranks(fmap), [[4, 0, 0], [0, 0, 1]])


def test_random_is_seeded_and_per_layer():
    model = small_model()
    a = get_ranker("random", seed=3).rank_all(model)
    b = get_ranker("random", seed=3).rank_all(model)
    c = get_ranker("random", seed=4).rank_all(model)
    np.testing.assert_array_equal(a["c2"], b["c2"])
    assert not np.allclose(a["c2"], c["c2"])


def test_unknown_ranker_and_missing_data():
    assert {"l1", "l2", "random", "hrank"} <= set(RANKERS)
    with pytest.raises(ValueError, match="Unknown ranker: 'l3'. Expected one of: .*hrank.*l1"):
        get_ranker("l3")
    with pytest.raises(ValueError, match="needs data"):
        get_ranker("hrank").rank_all(small_model())


def test_a_taken_ranker_name_is_replaced_only_when_asked(monkeypatch):
    from pruning.rankers import L1Ranker, Ranker, register_ranker

    monkeypatch.setitem(RANKERS, "l1", L1Ranker)  # restored after the test

    class Other(Ranker):
        name = "l1"

        def rank(self, model, layer, data=None):
            return np.zeros(CNNModel(model).conv(layer).filters)

    with pytest.raises(ValueError, match=r"A ranker named 'l1' is already registered \(pruning.rankers.L1Ranker\)"
                                         r"\. Use @register_ranker\(replace=True\) to replace it"):
        register_ranker(Other)
    assert RANKERS["l1"] is L1Ranker
    assert register_ranker(L1Ranker) is L1Ranker  # the same class again: nothing changes
    assert register_ranker(replace=True)(Other) is Other and get_ranker("l1").name == "l1"
    assert isinstance(get_ranker("l1"), Other)
    with pytest.raises(ValueError, match="Expected a subclass of pruning.Ranker. Received: 3"):
        register_ranker(3)


def test_scores_round_trip_as_npy(tmp_path):
    cnn = CNNModel(small_model())
    scores = get_ranker("l1").rank_all(cnn)
    save_scores(scores, cnn, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_conv1.npy", "rank_conv2.npy"]
    loaded = load_scores(cnn, str(tmp_path))
    np.testing.assert_array_equal(loaded["c2"], scores["c2"])
    (tmp_path / "rank_conv2.npy").unlink()
    assert load_scores(cnn, str(tmp_path)) is None


def test_a_failed_score_save_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    cnn = CNNModel(small_model())
    scores = get_ranker("l1").rank_all(cnn)
    save_scores(scores, cnn, str(tmp_path))
    real_save = np.save

    def save_then_fail(path, arr):
        real_save(path, arr[:1])  # half written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_scores({k: v + 1 for k, v in scores.items()}, cnn, str(tmp_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_conv1.npy", "rank_conv2.npy"]
    np.testing.assert_array_equal(load_scores(cnn, str(tmp_path))["c1"], scores["c1"])


def test_score_files_are_named_by_what_they_hold(tmp_path):
    cnn = CNNModel(small_model())
    l1 = get_ranker("l1").rank_all(cnn)
    save_scores(l1, cnn, str(tmp_path / "l1"), ranker="l1")
    assert sorted(p.name for p in (tmp_path / "l1").iterdir()) == ["l1_conv1.npy", "l1_conv2.npy"]
    np.testing.assert_array_equal(load_scores(cnn, str(tmp_path / "l1"), ranker="l1")["c2"], l1["c2"])
    assert load_scores(cnn, str(tmp_path / "l1"), ranker="l2") is None
    # Folders written before the rename hold rank_conv{i}.npy for every ranker.
    save_scores(l1, cnn, str(tmp_path / "old"))
    np.testing.assert_array_equal(load_scores(cnn, str(tmp_path / "old"), ranker="l1")["c1"], l1["c1"])


def _numpy_ranks(fmap):
    return np.linalg.matrix_rank(np.transpose(fmap, (0, 3, 1, 2)))


def test_feature_map_ranks_equal_numpy_on_rank_deficient_maps():
    # Every path of feature_map_ranks: all-zero maps, zero rows and columns, low rank
    # products, duplicated rows, singular values put just above and below numpy's
    # tolerance (its SVD fallback), and well-conditioned full-rank maps.
    rng = np.random.default_rng(0)
    n, h = 400, 8
    maps = np.maximum(rng.normal(size=(n, h, h)), 0).astype("float32")
    maps[:40] = 0
    maps[40:120, rng.integers(0, h, 80)] = 0
    maps[120:200, :, :3] = 0
    low = rng.normal(size=(80, h, 3)) @ rng.normal(size=(80, 3, h))
    maps[200:280] = low.astype("float32")
    maps[280:320, 4:] = maps[280:320, :4]
    u, _, vt = np.linalg.svd(rng.normal(size=(80, h, h)))
    tol = h * np.finfo(np.float32).eps
    s = np.ones((80, h))
    s[:, -1] = tol * rng.choice([0.3, 0.9, 1.1, 3.0, 30.0], 80)
    maps[320:] = ((u * s[:, None, :]) @ vt).astype("float32")
    fmap = np.transpose(maps.reshape(40, 10, h, h), (0, 2, 3, 1))
    expected = _numpy_ranks(fmap)
    assert len(np.unique(expected)) >= 5  # the cases above really span ranks
    np.testing.assert_array_equal(feature_map_ranks(fmap), expected)
    # Non-square maps (either side the shorter) and Conv1D maps.
    wide = np.maximum(rng.normal(size=(6, 3, 7, 5)), 0).astype("float32")
    np.testing.assert_array_equal(feature_map_ranks(wide), _numpy_ranks(wide))
    tall = np.swapaxes(wide, 1, 2).copy()
    np.testing.assert_array_equal(feature_map_ranks(tall), _numpy_ranks(tall))
    np.testing.assert_array_equal(feature_map_ranks(wide[:, 0]), _numpy_ranks(wide[:, 0, :, None, :]))


def test_hrank_probe_runs_on_nested_models():
    inner = small_model()
    inp = keras.Input((8, 8, 2))
    outer = keras.Model(inp, inner(inp))
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 2)).astype("float32")
    nested = get_ranker("hrank").rank_all(outer, data=[x])
    flat = get_ranker("hrank", overlap=False).rank_all(inner, data=[x])
    assert set(nested) == {"c1", "c2"}
    for name in flat:
        np.testing.assert_array_equal(nested[name], flat[name])
