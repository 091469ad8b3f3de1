"""Rice recipe pieces: the batch-aware split, colour jitter, balanced early stopping and --eval-dir."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_RICE
from experiments.data import batch_split, colour_jitter, file_index, list_image_folder
from experiments.models import resolve_weights
from experiments.rice import BalancedRecall
from main_train import cli
from save_sqlite import ExperimentLog

CLASSES = ["Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"]


def _names(n_per_class=100, step=150):
    paths = [f"/d/{c}/{c} ({1 + i * step}).jpg" for c in CLASSES[:2] for i in range(n_per_class)]
    return paths, np.repeat([0, 1], n_per_class)


def test_batch_split_holds_out_the_whole_index_range():
    paths, labels = _names()  # indices 1, 151, ..., 14851 in each class
    train, val, test, held = batch_split(paths, labels, (12001, 15000), (0.7, 0.15, 0.15), seed=0)
    index = np.array([file_index(p) for p in paths])
    assert set(held) == set(np.nonzero((index >= 12001) & (index <= 15000))[0]) and len(held) == 2 * 20
    parts = [set(train), set(val), set(test), set(held)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 200  # disjoint, complete
    assert index[np.concatenate([train, val, test])].max() < 12001  # nothing of the batch in training
    assert list(np.bincount(labels[train])) == [56, 56] and list(np.bincount(labels[test])) == [12, 12]
    again = batch_split(paths, labels, (12001, 15000), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test, held), again))
    assert file_index("/x/basmati (7).jpg") == 7


def test_batch_split_errors_name_the_value():
    paths, labels = _names()
    with pytest.raises(ValueError, match="No image has a file index in the holdout range 20000-30000"):
        batch_split(paths, labels, (20000, 30000))
    with pytest.raises(ValueError, match="Received: holdout=9-3"):
        batch_split(paths, labels, (9, 3))
    with pytest.raises(ValueError, match="no image outside the holdout range"):
        batch_split(paths, labels, (1, 15000))
    with pytest.raises(ValueError, match=r"Received: '/d/A/a.jpg'"):
        batch_split(["/d/A/a.jpg"], np.array([0]), (1, 2))


def test_colour_jitter_changes_colour_not_grey_or_range():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 6, 6, 3)).astype("float32")
    grey = np.repeat(rng.uniform(0, 255, (8, 6, 6, 1)).astype("float32"), 3, axis=-1)
    y = np.asarray(colour_jitter(hue=0.3, saturation=0.5, seed=1)(x))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255.01
    assert np.abs(y - x).mean() > 5  # colours really moved
    g = np.asarray(colour_jitter(hue=0.5, saturation=0.9, seed=1)(grey))
    np.testing.assert_allclose(g, grey, atol=0.05)  # hue and saturation leave grey pixels grey
    np.testing.assert_allclose(np.asarray(colour_jitter()(x)), x, atol=0.05)  # nothing asked: identity
    with pytest.raises(ValueError, match=r"Expected hue jitter in \[0, 0.5\]. Received: hue=0.7"):
        colour_jitter(hue=0.7)


def test_balanced_recall_is_the_mean_per_class_recall():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, use_bias=False, trainable=False)])
    model.layers[0].set_weights([np.array([[1.0, -1.0]], "float32")])  # class 0 iff x > 0
    x = np.array([[1.0], [1.0], [1.0], [-1.0], [1.0]], "float32")
    y = np.array([0, 0, 0, 1, 1])  # class 0: 3/3 right, class 1: 1/2 right; accuracy 0.8
    cb = BalancedRecall(x, y, 2, batch_size=4)
    cb.set_model(model)
    logs = {}
    cb.on_epoch_end(0, logs)
    assert logs["val_balanced_recall"] == pytest.approx(0.75)


def test_auto_weights_fall_back_to_hed_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    assert resolve_weights("auto") == "hed" and resolve_weights("none") == "none"


def test_eval_dir_and_batch_split_are_logged_for_every_run(tmp_path):
    eval_dir = tmp_path / "eval"
    paths, labels, names = list_image_folder(SAMPLE_RICE)
    for c, name in enumerate(names):  # 3 images per variety
        (eval_dir / name).mkdir(parents=True)
        for p in [p for p, y in zip(paths, labels) if y == c][:3]:
            shutil.copy(p, eval_dir / name)
    db = str(tmp_path / "log.db")
    r = CliRunner().invoke(cli, [
        "rice", "--weights", "none", "--image-size", "32", "--limit-per-class", "30", "--head-epochs", "1",
        "--retrain-epochs", "1", "--ratios", "0.5", "--split-by", "batch", "--holdout-range", "10001-15000",
        "--eval-dir", str(eval_dir), "--early-stop", "balanced", "--colour-jitter", "0.1,0.2,0.1",
        "--views", "1", "--zoom", "0.5", "--rotate", "30", "--flips", "both", "--unfreeze", "1", "--finetune-epochs", "1",
        "--retrain", "top", "--latency-batch", "2", "--out-dir", str(tmp_path / "runs"), "-v", "0", "--db", db])
    assert r.exit_code == 0, r.output
    base, pruned = ExperimentLog(db).runs("rice")
    config = json.loads(base["config"])
    held_n = config["extra_eval_sizes"]["heldout"]
    assert config["extra_eval_sizes"]["eval_dir"] == 15 and held_n > 0
    assert config["split_by"] == "batch" and config["holdout_range"] == [10001, 15000]
    assert sum(config["split_sizes"]) + held_n == 150
    for run in (base, pruned):
        m = json.loads(run["metrics"])
        for key, n in (("eval_dir", 15), ("heldout", held_n)):
            cm = np.array(m[key]["confusion_matrix"])
            assert cm.shape == (5, 5) and cm.sum() == m[key]["images"] == n
            assert m[key]["top1"] == pytest.approx(np.trace(cm) / n)
            assert set(m[key]["per_class"]) == set(CLASSES)
        assert np.array(m["confusion_matrix"]).sum() == config["split_sizes"][2]
        assert "experts" not in m  # one head, no experts
    assert json.loads(base["metrics"])["eval_dir"]["source"] == str(eval_dir)
    assert "heldout" in r.output and "eval-dir" in r.output


def test_eval_dir_with_other_classes_is_a_one_line_error(tmp_path):
    for other in ("Oat", "Wheat"):  # two classes (one is refused earlier), not the rice varieties
        (tmp_path / "eval" / other).mkdir(parents=True)
        shutil.copy(os.path.join(SAMPLE_RICE, "Arborio", sorted(os.listdir(os.path.join(SAMPLE_RICE, "Arborio")))[0]),
                    tmp_path / "eval" / other)
    r = CliRunner().invoke(cli, ["rice", "--weights", "none", "--image-size", "32", "--limit-per-class", "10",
                                 "--eval-dir", str(tmp_path / "eval"), "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0
    assert "has classes ['Oat', 'Wheat']; expected the data folder's" in r.output
    r = CliRunner().invoke(cli, ["rice", "--holdout-range", "5", "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "Expected holdout_range FIRST,LAST" in r.output


def test_grain_crop_and_grey_world():
    from experiments.data import grain_crop, grey_world

    x = np.zeros((2, 40, 40, 3), "float32")
    x[0, 10:14, 20:30] = (200, 220, 250)  # a small bluish grain
    x[1, 5:35, 5:25] = (240, 240, 200)  # a large yellowish one
    y = np.asarray(grain_crop(16)(x))
    assert y.shape == (2, 16, 16, 3)
    for i in range(2):  # whatever its size, the grain's longer side spans most of the crop
        m = y[i].sum(-1) > 60
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 12
    assert (y[0].sum(-1) > 60).mean() > 5 * (x[0].sum(-1) > 60).mean()
    g = np.asarray(grey_world(x))
    for i in range(2):
        grain = g[i][x[i].sum(-1) > 60]
        np.testing.assert_allclose(grain.mean(0), grain.mean(), rtol=1e-3)  # mean colour is grey


def test_random_affine_scales_about_the_centre_with_a_black_border():
    import tensorflow as tf

    from experiments.data import random_affine

    x = np.zeros((64, 33, 33, 3), "float32")
    x[:, 12:21, 12:21] = 200.0  # a 9x9 grain in the centre
    tf.random.set_seed(0)
    y = np.asarray(random_affine(0.6, seed=1)(tf.constant(x)))
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 200.0 + 1e-3
    sides = []
    for img in y:
        m = img.sum(-1) > 300  # more than half bright
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        sides.append(rows[-1] - rows[0] + 1)
        assert abs((rows[0] + rows[-1]) / 2 - 16) <= 1 and abs((cols[0] + cols[-1]) / 2 - 16) <= 1  # centred
        assert img[0, 0].sum() == 0.0  # the border stays black
    # 9 px times a factor in [1/1.6, 1.6]: between 5 and 15 px, both smaller and larger drawn
    assert 5 <= min(sides) < 9 < max(sides) <= 15
    np.testing.assert_allclose(np.asarray(random_affine(0.0)(tf.constant(x))), x, atol=1e-4)  # zoom 0: identity
    with pytest.raises(ValueError, match=r"Expected zoom in \[0, 3\]. Received: zoom=-0.1"):
        random_affine(-0.1)


def test_random_affine_rotates_about_the_centre():
    import tensorflow as tf

    from experiments.data import random_affine

    x = np.zeros((64, 33, 33, 3), "float32")
    x[:, 16, 4:29] = 255.0  # a horizontal bar through the centre, 25 px long
    tf.random.set_seed(0)
    y = np.asarray(random_affine(0.0, 90, seed=1)(tf.constant(x)))
    angles, lengths = [], []
    for img in y:
        rows, cols = np.nonzero(img.sum(-1) > 200)
        cov = np.cov(np.stack([cols, rows]).astype(float))
        ev, vec = np.linalg.eigh(cov)
        angles.append(np.degrees(np.arctan2(vec[1, 1], vec[0, 1])) % 180)
        lengths.append(np.ptp(rows) + np.ptp(cols))
        assert abs(rows.mean() - 16) <= 1 and abs(cols.mean() - 16) <= 1  # turned about the centre
        assert img[0, 0].sum() == 0.0
    folded = np.minimum(angles, 180 - np.asarray(angles))  # 0: horizontal, 90: vertical
    assert folded.min() < 15 and folded.max() > 60  # near-horizontal and steep bars both drawn
    assert 20 <= min(lengths) and max(lengths) <= 40  # no zoom: the bar keeps its length (|dx| + |dy|)
    with pytest.raises(ValueError, match=r"Expected rotate in \[0, 180\] \(degrees\). Received: rotate=200"):
        random_affine(0.0, 200)


def test_random_flips_both_flips_each_axis_and_keeps_the_pixels():
    import tensorflow as tf

    from experiments.data import random_flips

    x = np.zeros((200, 8, 8, 3), "float32")
    x[:, 0, 1] = 255.0  # one bright pixel near the top-left corner
    tf.random.set_seed(0)
    y = np.asarray(random_flips("both", seed=3)(tf.constant(x)))
    where = {tuple(np.argwhere(img.sum(-1) > 0)[0]) for img in y}
    assert where == {(0, 1), (0, 6), (7, 1), (7, 6)}  # none, horizontal, vertical, both
    assert np.allclose(y.sum((1, 2, 3)), 765.0)
    h = np.asarray(random_flips("horizontal", seed=3)(tf.constant(x)))
    assert {tuple(np.argwhere(img.sum(-1) > 0)[0]) for img in h} == {(0, 1), (0, 6)}
    assert random_flips("none") is None
    with pytest.raises(ValueError, match="Expected flips in"):
        random_flips("diagonal")


def test_retrain_top_trains_the_unfrozen_convs_and_the_head():
    from experiments.config import RiceConfig
    from experiments.models import rice_classifier
    from experiments.rice import HEAD_LAYERS, retrain_layers
    from pruning import inline

    model = inline(rice_classifier(5, 32, weights=None))
    cfg = RiceConfig(data_dir=SAMPLE_RICE, unfreeze=3, retrain="top")
    assert retrain_layers(model, cfg) == {"block5_conv1", "block5_conv2", "block5_conv3", *HEAD_LAYERS}
    assert retrain_layers(model, RiceConfig(data_dir=SAMPLE_RICE, retrain="head")) == set(HEAD_LAYERS)


@pytest.mark.parametrize("args, message", [
    (["--zoom", "0.5"], "zoom=0.5 needs views >= 1"),
    (["--rotate", "90"], "rotate=90.0 needs views >= 1"),
    (["--views", "1", "--rotate", "200"], "Invalid value for '--rotate'"),
    (["--retrain", "top"], "retrain='top' retrains the --unfreeze top convs; it needs unfreeze >= 1"),
    (["--flips", "diagonal"], "Invalid value for '--flips'"),
])
def test_augmentation_flags_are_checked_before_training(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["rice", "--data-dir", SAMPLE_RICE, "--weights", "none", *args,
                                 "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output


def _ellipse(size, a, b, angle_deg, centre=None, colour=(200.0, 210.0, 230.0)):
    """An RGB image in [0, 255] with one filled ellipse (semi-axes a, b pixels) on black."""
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    t = np.deg2rad(angle_deg)
    yy, xx = np.mgrid[:size, :size].astype("float64")
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    img = np.zeros((size, size, 3), "float32")
    img[(u / a) ** 2 + (v / b) ** 2 <= 1] = colour
    return img


def test_grain_shape_reads_aspect_ratio_and_colour_not_size_position_or_angle():
    from experiments.grain import SHAPE_FEATURES, grain_shape

    small = _ellipse(96, 24, 8, 30, centre=(40, 50))
    large = _ellipse(96, 40, 13.3, -70)  # the same shape, 1.66 times longer, elsewhere, turned
    round_ = _ellipse(96, 20, 16, 0)
    f = np.asarray(grain_shape(np.stack([small, large, round_])))
    assert f.shape == (3, len(SHAPE_FEATURES))
    np.testing.assert_allclose(np.exp(f[:2, 0]), 3.0, rtol=0.04)  # long / short axis of a 3:1 ellipse
    np.testing.assert_allclose(f[0, :3], f[1, :3], atol=0.05)  # size, place and angle do not matter
    assert np.exp(f[2, 0]) < 1.4 and f[2, 2] > f[0, 2]  # a rounder grain: lower ratio, rounder outline
    np.testing.assert_allclose(f[0, 3:6], np.array([200, 210, 230]) / 255, atol=1e-4)  # mean R, G, B
    np.testing.assert_allclose(f[0, 6:], 0, atol=1e-3)  # a flat colour has no spread


def test_upright_centres_turns_and_scales_every_grain_to_one_length():
    from experiments.grain import grain_mask, moments, principal_variances, upright

    x = np.stack([_ellipse(96, 12, 4, 60, centre=(30, 60)), _ellipse(96, 36, 12, -20)])
    y = upright(x, 48)
    assert tuple(y.shape) == (2, 48, 48, 3)
    area, cx, cy, cxx, cyy, cxy = (np.asarray(v) for v in moments(grain_mask(y)))
    np.testing.assert_allclose(cx, 23.5, atol=0.7)  # centred
    np.testing.assert_allclose(cy, 23.5, atol=0.7)
    assert (cxx > 6 * cyy).all() and (np.abs(cxy) < 0.05 * cxx).all()  # long axis horizontal
    length = 4 * np.sqrt(np.asarray(principal_variances(cxx, cyy, cxy)[0]))
    np.testing.assert_allclose(length, 0.8 * 48, rtol=0.06)  # the same length, 3 times apart before
    np.testing.assert_allclose(area[0], area[1], rtol=0.1)


def test_grain_model_saves_plain_adapts_and_prunes(tmp_path):
    """--grain-shape --upright: a plain .keras file; the descriptors are standardised on the
    training images and survive pruning of the convs."""
    from experiments.grain import to_vgg
    from experiments.models import rice_classifier
    from experiments.rice import adapt_shape_norm
    from pruning.graph import CNNModel
    from pruning.plan import PrunePlan
    from pruning.rankers import get_ranker
    from pruning.rebuild import inline, prune

    keras.utils.set_random_seed(0)
    model = inline(rice_classifier(5, 32, weights=None, seed=0, grain_shape=True, upright=True))
    assert model.input_shape == (None, 64, 64, 3)
    rng = np.random.default_rng(0)
    images = np.stack([_ellipse(64, rng.uniform(8, 25), rng.uniform(4, 8), rng.uniform(-90, 90),
                                colour=tuple(rng.uniform(150, 250, 3))) for _ in range(12)])
    x = np.asarray(to_vgg(images))
    values = adapt_shape_norm(model, x)
    norm = model.get_layer("shape_norm")
    standardised = keras.Model(model.inputs, norm.output).predict(x, verbose=0)
    np.testing.assert_allclose(standardised.mean(0), 0, atol=1e-4)
    assert values.shape == (12, 9) and np.all(np.abs(standardised.std(0) - 1) < 1e-2)
    path = str(tmp_path / "grain.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    scores = get_ranker("l1").rank_all(CNNModel(model))
    plan = PrunePlan.from_scores(model, scores, 0.5)
    pruned = prune(model, plan)
    assert pruned.count_params() < model.count_params()
    np.testing.assert_array_equal(pruned.get_layer("shape_norm").get_weights()[0], norm.get_weights()[0])
    again = keras.Model(pruned.inputs, pruned.get_layer("shape_norm").output).predict(x, verbose=0)
    np.testing.assert_allclose(again, standardised, atol=1e-5)


def test_splits_too_large_for_memory_are_decoded_on_each_pass(monkeypatch):
    """The full Kaggle dataset at --upright 224 (448 px decoded) would need 126 GB of
    cache; such splits are decoded again on each pass, with the same batches."""
    from experiments import rice
    from experiments.config import RiceConfig

    cfg = RiceConfig(data_dir=SAMPLE_RICE, image_size=32, limit_per_class=10, upright=True)
    cached = rice.RiceData(cfg)
    assert cached.fits_in_memory(len(cached.files["train"]))
    assert not rice.RiceData(RiceConfig(data_dir=SAMPLE_RICE, image_size=224, upright=True,
                                        limit_per_class=10)).fits_in_memory(52_500)
    monkeypatch.setattr(rice, "CACHE_LIMIT_BYTES", 0)
    fresh = rice.RiceData(cfg)
    assert not fresh.fits_in_memory(1)
    for a, b in zip(cached.ordered["test"], fresh.ordered["test"]):
        np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


def test_vgg_input_round_trip_is_exact():
    """The model reads RGB back from its VGG16 input: any offset or channel swap would shift the
    grain mask and colour descriptors."""
    from experiments.grain import from_vgg, to_vgg

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    vgg = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(to_vgg(x)), vgg, atol=1e-4)
    np.testing.assert_allclose(np.asarray(from_vgg(vgg)), x, atol=1e-3)
