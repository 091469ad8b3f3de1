"""Filter importance criteria behind one interface, registered by name.

    scores = get_ranker("l1").rank(model, "block1_conv1")   # one score per filter
    all_scores = get_ranker("hrank").rank_all(model, data=batches)

Higher scores mean keep. Adding a criterion is one subclass with a `name` and a
`rank` method, decorated with `@register_ranker`.
"""

import os

import numpy as np

from pruning.graph import CNNModel
from pruning.handlers import filter_kernel as _handler_filter_kernel

RANKERS = {}


def register_ranker(cls):
    """Class decorator that makes a ranker available by `cls.name`."""
    RANKERS[cls.name] = cls
    return cls


def get_ranker(name, **kwargs):
    """A ranker instance by registered name (kwargs go to its constructor)."""
    if isinstance(name, Ranker):
        return name
    if name not in RANKERS:
        raise ValueError(
            f"Unknown ranker: '{name}'. Expected one of: {', '.join(sorted(RANKERS))}"
        )
    return RANKERS[name](**kwargs)


class Ranker:
    """Scores the filters of a convolution; higher = more important."""

    name = ""
    needs_data = False

    def rank(self, model, layer, data=None):
        """One score per output filter of `layer` (a name or ConvLayer) in `model`."""
        raise NotImplementedError

    def rank_all(self, model, layers=None, data=None, progress=None):
        """{layer name: scores} for `layers` (default: every conv of the model)."""
        cnn = _cnn(model)
        layers = [cnn.conv(l) for l in (layers or cnn.conv_layers)]
        out = {}
        for conv in layers:
            out[conv.name] = self.rank(cnn, conv, data)
            if progress:
                progress(1)
        return out

    def __repr__(self):
        return f"{type(self).__name__}()"


def _cnn(model):
    return model if isinstance(model, CNNModel) else CNNModel(model)


def filter_kernel(layer):
    """The kernel whose last axis indexes the output filters, as the layer's handler
    says (Conv's kernel, SeparableConv's pointwise kernel, Conv*Transpose's kernel
    with its axes swapped...)."""
    return _handler_filter_kernel(layer)


@register_ranker
class L1Ranker(Ranker):
    """Sum of |W| per output filter, over kernel height, width and input channels."""

    name = "l1"

    def rank(self, model, layer, data=None):
        k = filter_kernel(_cnn(model).conv(layer).layer)
        return np.abs(k).reshape(-1, k.shape[-1]).sum(axis=0)


@register_ranker
class L2Ranker(Ranker):
    """Euclidean norm of each output filter."""

    name = "l2"

    def rank(self, model, layer, data=None):
        k = filter_kernel(_cnn(model).conv(layer).layer)
        return np.sqrt(np.square(k).reshape(-1, k.shape[-1]).sum(axis=0))


@register_ranker
class RandomRanker(Ranker):
    """Uniform random scores from a seed: the baseline every criterion must beat."""

    name = "random"

    def __init__(self, seed=0):
        self.seed = seed

    def rank(self, model, layer, data=None):
        conv = _cnn(model).conv(layer)
        # One stream per layer, so a layer's scores do not depend on which others are ranked.
        rng = np.random.default_rng([self.seed, conv.index])
        return rng.random(conv.filters)


@register_ranker
class HRankRanker(Ranker):
    """HRank (Lin et al., CVPR 2020): average rank of each channel's feature maps.

    The maps are read after the conv's BatchNormalization and activation (see
    `CNNModel.feature_key`). All layers come from one forward pass per batch, and the
    ranks of a batch are computed as one stacked SVD (`numpy.linalg.matrix_rank` on a
    (batch, channels, H, W) array).

    Args:
        num_batches: how many batches of `data` to use (None: all).
    """

    name = "hrank"
    needs_data = True

    def __init__(self, num_batches=None):
        self.num_batches = num_batches

    def rank(self, model, layer, data=None):
        return self.rank_all(model, [layer], data)[_cnn(model).conv(layer).name]

    def rank_all(self, model, layers=None, data=None, progress=None):
        import tensorflow as tf

        if data is None:
            raise ValueError("The 'hrank' ranker needs data: batches of training images.")
        cnn = _cnn(model)
        layers = [cnn.conv(l) for l in (layers or cnn.conv_layers)]
        keys = [cnn.feature_key(c) for c in layers]
        probe = tf.function(lambda x: cnn.forward(x, keys), reduce_retracing=True)
        totals = [0.0] * len(layers)
        count = 0
        for i, batch in enumerate(iter_batches(data)):
            if self.num_batches is not None and i >= self.num_batches:
                break
            for j, fmap in enumerate(probe(batch)):
                totals[j] = totals[j] + feature_map_ranks(np.asarray(fmap)).sum(axis=0)
            count += batch.shape[0]
            if progress:
                progress(1)
        if count == 0:
            raise ValueError("The 'hrank' ranker received no batches of data.")
        return {c.name: np.asarray(t, np.float64) / count for c, t in zip(layers, totals)}


def feature_map_ranks(fmap):
    """Matrix rank of every channel's map: (batch, H, W, C) -> (batch, C)."""
    fmap = np.asarray(fmap, np.float32)
    if fmap.ndim == 3:  # Conv1D maps (batch, L, C): rank of an L x 1 matrix
        fmap = fmap[:, :, None, :]
    if fmap.ndim != 4:
        raise ValueError(f"Expected feature maps of rank 3 or 4. Received: shape={fmap.shape}")
    return np.linalg.matrix_rank(np.transpose(fmap, (0, 3, 1, 2)))


def iter_batches(data):
    """Images from a tf.data.Dataset / iterable of (x, y) or x, or one array."""
    if isinstance(data, np.ndarray):
        yield data
        return
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield np.asarray(x)


def save_scores(scores, cnn, folder):
    """Writes `rank_conv{i}.npy` (i = 1-based conv position) per layer into `folder`."""
    os.makedirs(folder, exist_ok=True)
    for name, s in scores.items():
        np.save(os.path.join(folder, f"rank_conv{cnn.conv(name).index + 1}.npy"), np.asarray(s))


def load_scores(cnn, folder, layers=None):
    """{name: scores} from `rank_conv{i}.npy` files, or None if any is missing."""
    out = {}
    for conv in [cnn.conv(l) for l in (layers or cnn.conv_layers)]:
        path = os.path.join(folder, f"rank_conv{conv.index + 1}.npy")
        if not os.path.exists(path):
            return None
        s = np.load(path)
        if s.shape != (conv.filters,):
            raise ValueError(f"Scores in {path} have shape {s.shape}; layer '{conv.name}' has "
                             f"{conv.filters} filters.")
        out[conv.name] = s
    return out
