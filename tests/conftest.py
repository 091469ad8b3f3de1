import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pruning.graph import leaf_layers  # noqa: E402

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
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3)
                               else rng.normal(0, 0.2, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])




def zero_shift_bn(model, rng=None):
    """BatchNorm with beta = moving mean = 0 and random gamma / variance: a channel
    that is zero before it stays zero after it, along every path."""
    rng = rng or np.random.default_rng(0)
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([
                rng.uniform(0.5, 1.5, w.shape).astype("float32")
                if v.path.split("/")[-1] in ("gamma", "moving_variance") else np.zeros_like(w)
                for v, w in zip(layer.weights, layer.get_weights())
            ])


def zero_filters(layer, removed):
    """Sets the kernel slices and biases of filters `removed` of a producer to 0."""
    weights = layer.get_weights()
    name = type(layer).__name__
    if "Transpose" in name:  # kernel (*spatial, out, in)
        weights[0][..., removed, :] = 0
    else:
        weights[1 if name.startswith("SeparableConv") else 0][..., removed] = 0
    if getattr(layer, "use_bias", False):
        weights[-1][removed] = 0
    layer.set_weights(weights)


def prune_zeroed(model, ratio=0.5, seed=1, **plan_kwargs):
    """Zero-filter invariance: zeroes the filters a random plan removes, then removes
    them. Returns (outputs before, outputs after, CNNModel, plan, pruned model)."""
    from pruning import CNNModel, PrunePlan, get_ranker, prune

    zero_shift_bn(model, np.random.default_rng(seed))
    cnn = CNNModel(model, allow_inexact=plan_kwargs.get("allow_inexact", False))
    scores = get_ranker("random", seed=seed).rank_all(cnn)
    plan = PrunePlan.from_scores(cnn, scores, ratio, **plan_kwargs)
    for conv in cnn.conv_layers:
        if conv.name in plan.keep:
            zero_filters(conv.layer, np.setdiff1d(np.arange(conv.filters), plan.keep[conv.name]))
    shapes = [t.shape[1:] for t in model.inputs]
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(2, *s)).astype("float32") for s in shapes]
    x = x[0] if len(x) == 1 else x
    before = _numpy(model(x, training=False))
    pruned = prune(cnn, plan)
    return before, _numpy(pruned(x, training=False)), cnn, plan, pruned


def _numpy(outputs):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(outputs)])


def relative_diff(a, b):
    """Max abs difference relative to the output scale."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12))


@pytest.fixture
def time_limit():
    """`time_limit(seconds)`: the test fails with an error after `seconds` instead of hanging
    (SIGALRM; pytest-timeout is not a dependency)."""
    import signal

    def fire(*_):
        raise TimeoutError("the test ran past its time limit")

    def arm(seconds):
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(int(seconds))

    yield arm
    signal.alarm(0)
