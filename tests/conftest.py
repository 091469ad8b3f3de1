import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
RICE_DIR = os.path.join(SHARED, "rice", "Rice_Image_Dataset")
CIFAR_DIR = os.path.join(SHARED, "cifar10")
SAMPLE_RICE = os.path.join(REPO, "data", "rice_sample")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def randomize_bn(model, rng=None):
    """Gives BatchNorm layers non-trivial statistics so tests exercise their slicing."""
    rng = rng or np.random.default_rng(0)
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3)
                               else rng.normal(0, 0.2, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer
