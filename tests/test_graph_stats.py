"""CNNModel's view of a model, stats, data pipelines and TimeHistory."""

import keras
import numpy as np

from experiments.data import CIFAR_STATS, cifar_dataset
from experiments.models import rice_classifier
from pruning import CNNModel, TimeHistory, layer_stats, model_stats


def test_nested_vgg16_is_listed_with_consumers():
    cnn = CNNModel(rice_classifier(5, 32, weights="none"))
    names = [c.name for c in cnn.conv_layers]
    assert len(names) == 13 and names[0] == "block1_conv1" and names[-1] == "block5_conv3"
    c = cnn.conv("block1_conv2")
    assert (c.filters, c.kernel_size, c.prunable) == (64, (3, 3), True)
    assert c.consumers == ["block1_pool", "block2_conv1"]
    assert cnn.conv("block5_conv3").consumers == ["block5_pool", "fc1", "features"]  # sorted
    assert "block3_conv1" in cnn.summary()


def test_macs_by_hand_for_separable_and_depthwise():
    inp = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(inp)
    x = keras.layers.SeparableConv2D(6, 3, padding="valid", name="sep")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="fc")(x))
    rows = {r["layer"]: r for r in layer_stats(model)}
    assert rows["dw"]["macs"] == 8 * 8 * 8 * 9  # out pixels x out channels x kernel
    assert rows["sep"]["macs"] == 6 * 6 * (9 * 8 + 8 * 6)  # depthwise + pointwise
    assert rows["fc"]["macs"] == 6 * 6 * 6 * 3
    stats = model_stats(model)
    assert stats["params"] == model.count_params()
    assert stats["macs"] == sum(r["macs"] for r in rows.values())


def test_cifar_pipeline_normalises_and_augments():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64)
    mean, std = CIFAR_STATS["cifar10"]
    test = cifar_dataset(images, labels, 10, 64, mean, std)
    x, y = next(iter(test))
    expected = (images.astype("float32") - np.array(mean) * 255) / (np.array(std) * 255)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(y, 1), labels)
    train = cifar_dataset(images, labels, 10, 64, mean, std, training=True, seed=1, randaugment=True,
                          random_erasing=0.5)
    a = next(iter(train))[0].numpy()
    b = next(iter(train))[0].numpy()
    assert a.shape == (64, 32, 32, 3) and not np.allclose(a, b)  # new crops/flips every epoch


def test_time_history_records_each_epoch():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    cb = TimeHistory()
    model.fit(np.zeros((8, 2)), np.zeros(8), epochs=3, verbose=0, callbacks=[cb])
    assert len(cb.times) == 3 and all(t > 0 for t in cb.times)


def test_preprocessing_choices():
    import pytest

    from experiments.data import preprocessing

    x = np.full((1, 2, 2, 3), 255.0, "float32")
    mean, std = CIFAR_STATS["cifar100"]
    np.testing.assert_allclose(preprocessing("cifar100")(x)[0, 0, 0], (1 - np.array(mean)) / np.array(std), rtol=1e-5)
    np.testing.assert_allclose(preprocessing("unit")(x), 1.0)
    assert preprocessing("none") is None
    with pytest.raises(ValueError, match="Expected preprocessing in .*Received: preprocess='imagenet'"):
        preprocessing("imagenet")


def test_channel_counts_and_producers_without_private_names():
    from pruning.graph import is_producer

    inp = keras.Input((6, 6, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inp)
    x = keras.layers.Concatenate()([inp, a, keras.layers.DepthwiseConv2D(3, padding="same")(a)])
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    cnn = CNNModel(model)
    key = next(c for c in cnn.calls if c.layer.name.startswith("concatenate")).outputs[0]
    untracked, made = cnn.channel_counts(key)
    assert untracked == 3 and made.tolist() == [8]
    np.testing.assert_array_equal(cnn.channel_positions(key, "a", [1]), [4, 8])
    assert is_producer(model.get_layer("a")) and not is_producer(model.layers[2])
