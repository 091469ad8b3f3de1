"""Filter importance criteria behind one interface, registered by name.

    scores = get_ranker("l1").rank(model, "block1_conv1")   # one score per filter
    all_scores = get_ranker("hrank").rank_all(model, data=batches)

Higher scores mean keep. Adding a criterion is one subclass with a `name` and a
`rank` method, decorated with `@register_ranker`.
"""

from typing import Optional
import inspect
import os
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from pruning.graph import CNNModel
from pruning.handlers import filter_kernel as _handler_filter_kernel
from pruning.plan import atomic_write

RANKERS = {}


def register_ranker(cls=None, *, replace=False):
    """Class decorator that makes a ranker available by `cls.name`.

    A name is registered once: registering another class under a taken name raises,
    unless `@register_ranker(replace=True)` asks to replace the registered one.
    """
    if cls is None:
        return lambda c: register_ranker(c, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Ranker)):
        raise ValueError(f"Expected a subclass of pruning.Ranker. Received: {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected ranker class {cls.__qualname__} to set `name` to a non-empty string. "
                         f"Received: name={name!r}")
    taken = RANKERS.get(name)
    if taken is not None and taken is not cls and not replace:
        raise ValueError(f"A ranker named '{name}' is already registered ({taken.__module__}.{taken.__qualname__}). "
                         f"Use @register_ranker(replace=True) to replace it, or another name. "
                         f"Received: {cls.__module__}.{cls.__qualname__}")
    RANKERS[name] = cls
    return cls


def get_ranker(name, **kwargs):
    """A ranker instance by registered name (kwargs go to its constructor)."""
    if isinstance(name, Ranker):
        return name
    if name not in RANKERS:
        raise ValueError(
            f"Unknown ranker: '{name}'. Expected one of: {', '.join(sorted(RANKERS))}"
        )
    try:
        return RANKERS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"Bad options for ranker '{name}': {e}. Received: {kwargs}") from None


def make_ranker(ranker, options=None, **defaults):
    """A ranker from an instance, or a registered name + constructor `options`.

    `defaults` (for example `seed=0, num_batches=20`) reach the constructor only
    where it takes that argument and `options` does not set it, so a caller treats
    every ranker alike: no special case per ranker name.
    """
    if isinstance(ranker, Ranker):
        return ranker
    options = dict(options or {})
    if ranker in RANKERS:
        accepted = inspect.signature(RANKERS[ranker].__init__).parameters
        for key, value in defaults.items():
            if key in accepted and value is not None:
                options.setdefault(key, value)
    return get_ranker(ranker, **options)


class Ranker:
    """Scores the filters of a convolution; higher = more important."""

    name = ""
    needs_data = False

    def rank(self, model, layer, data=None):
        """One score per output filter of `layer` (a name or ConvLayer) in `model`."""
        raise NotImplementedError

    def rank_all(self, model, layers=None, data=None, progress=None):
        """{layer name: scores} for `layers` (default: every conv of the model)."""
        cnn = CNNModel.of(model)
        layers = [cnn.conv(l) for l in (layers or cnn.conv_layers)]
        out = {}
        for conv in layers:
            out[conv.name] = self.rank(cnn, conv, data)
            if progress:
                progress(1)
        return out

    def __repr__(self):
        return f"{type(self).__name__}()"


class DataRanker(Ranker):
    """A ranker that scores every layer from one pass over `data` (`rank_all`);
    `rank` is `rank_all` for one layer.

    Args:
        num_batches: how many batches of `data` to use (None: all).
    """

    needs_data = True

    def __init__(self, num_batches: Optional[int] = None):
        self.num_batches = num_batches

    def rank(self, model, layer, data=None):
        cnn = CNNModel.of(model)
        return self.rank_all(cnn, [layer], data)[cnn.conv(layer).name]


def feature_maps(model, layers=None):
    """(CNNModel, the convs to score (all by default), the key of each one's post-BN/ReLU map,
    the tensor HRank, APoZ and Taylor read)."""
    cnn = CNNModel.of(model)
    layers = [cnn.conv(l) for l in (layers or cnn.conv_layers)]
    return cnn, layers, [cnn.feature_key(c) for c in layers]


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
        k = filter_kernel(CNNModel.of(model).conv(layer).layer)
        return np.abs(k).reshape(-1, k.shape[-1]).sum(axis=0)


@register_ranker
class L2Ranker(Ranker):
    """Euclidean norm of each output filter."""

    name = "l2"

    def rank(self, model, layer, data=None):
        k = filter_kernel(CNNModel.of(model).conv(layer).layer)
        return np.sqrt(np.square(k).reshape(-1, k.shape[-1]).sum(axis=0))


@register_ranker
class RandomRanker(Ranker):
    """Uniform random scores from a seed: the baseline every criterion must beat."""

    name = "random"

    def __init__(self, seed=0):
        self.seed = seed

    def rank(self, model, layer, data=None):
        conv = CNNModel.of(model).conv(layer)
        # One stream per layer, so a layer's scores do not depend on which others are ranked.
        rng = np.random.default_rng([self.seed, conv.index])
        return rng.random(conv.filters)


@register_ranker
class HRankRanker(DataRanker):
    """HRank (Lin et al., CVPR 2020): average rank of each channel's feature maps.

    The maps are read after the conv's BatchNormalization and activation (see
    `CNNModel.feature_key`). All layers come from one forward pass per batch through a
    multi-output `keras.Model` (any backend), and the ranks of a batch are computed in
    a worker thread while the next batch runs forward. The ranks equal
    `numpy.linalg.matrix_rank`'s (see `feature_map_ranks`).

    Args:
        num_batches: how many batches of `data` to use (None: all).
        overlap: compute the ranks of batch i while batch i + 1 runs forward.
    """

    name = "hrank"

    def __init__(self, num_batches: Optional[int] = None, overlap=True):
        super().__init__(num_batches)
        self.overlap = overlap

    def rank_all(self, model, layers=None, data=None, progress=None):
        if data is None:
            raise ValueError("The 'hrank' ranker needs data: batches of training images.")
        cnn, layers, keys = feature_maps(model, layers)
        probe = feature_probe(cnn, keys)
        totals = [0.0] * len(layers)
        count = 0

        def add(maps):
            for j, fmap in enumerate(maps):
                totals[j] = totals[j] + feature_map_ranks(fmap).sum(axis=0)

        # One worker: numpy's SVD/eigen loops hold one core, the forward pass the others.
        with ThreadPoolExecutor(1) as pool:
            pending = None
            for i, batch in enumerate(iter_batches(data)):
                if self.num_batches is not None and i >= self.num_batches:
                    break
                maps = [np.asarray(m) for m in keras.tree.flatten(probe.predict_on_batch(batch))]
                if pending is not None:
                    pending.result()
                pending = pool.submit(add, maps)
                if not self.overlap:
                    pending.result()
                count += maps[0].shape[0]  # a cluster's predict_on_batch returns every worker's rows
                if progress:
                    progress(1)
            if pending is not None:
                pending.result()
        if count == 0:
            raise ValueError("The 'hrank' ranker received no batches of data.")
        return {c.name: np.asarray(t, np.float64) / count for c, t in zip(layers, totals)}


def feature_probe(cnn, keys):
    """A compiled multi-output `keras.Model` returning the traced tensors `keys`
    (backend-neutral: the graph is re-called on fresh inputs, so nested models are
    reached too). Call `probe.predict_on_batch(x)` for numpy maps."""
    from pruning.export import symbolic_inputs

    inputs = symbolic_inputs(cnn)
    outputs = cnn.forward(inputs, keys)
    probe = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name="feature_probe")
    # predict_on_batch runs one compiled graph per batch instead of eager calls. XLA
    # only on JAX, whose compiler it is; TensorFlow runs its own graph without it.
    probe.compile(jit_compile=keras.backend.backend() == "jax")
    return probe


# A singular value within this factor of numpy's tolerance is left to numpy's own SVD;
# outside the band the float64 Gram decides. Near the tolerance, the Gram's singular
# values differ from float32 SVD's by far less than a factor 2, so the band is wide
# (tests/test_rankers.py compares the ranks with numpy's).
RANK_BAND = 2.0


def feature_map_ranks(fmap):
    """Matrix rank of every channel's map: (batch, H, W, C) -> (batch, C).

    Equal to `numpy.linalg.matrix_rank` on the float32 maps (default tolerance
    `tol = S.max() * max(H, W) * eps`), with most maps decided by a Cholesky instead of an
    SVD. Each map A gets its float64 Gram matrix G (k x k on the shorter side; G's
    eigenvalues are A's squared singular values):
    1. all-zero maps have rank 0;
    2. a map whose G, with the zero rows of A set aside, minus (RANK_BAND * tol)^2 I has
       a Cholesky factor has all other singular values far above tol: its rank is its
       count of nonzero rows (a Cholesky costs a fraction of an SVD);
    3. the others count the eigenvalues of G above tol^2, unless one lies within
       RANK_BAND of it: those few maps are ranked by numpy's own SVD.
    """
    fmap = np.asarray(fmap, np.float32)
    if fmap.ndim == 3:  # Conv1D maps (batch, L, C): rank of an L x 1 matrix
        fmap = fmap[:, :, None, :]
    if fmap.ndim != 4:
        raise ValueError(f"Expected feature maps of rank 3 or 4. Received: shape={fmap.shape}")
    b, h, w, c = fmap.shape
    # Chunks of about CHUNK_BYTES of float64 keep every temporary in cache, instead of
    # allocating arrays the size of a whole layer's maps.
    step = max(1, CHUNK_BYTES // (8 * h * w * c))
    return np.concatenate([_chunk_ranks(np.transpose(fmap[i:i + step], (0, 3, 1, 2)))
                           for i in range(0, b, step)])


CHUNK_BYTES = 2 << 20


def _chunk_ranks(maps):
    """feature_map_ranks of (batch, C, H, W) float32 maps -> (batch, C)."""
    b, c, h, w = maps.shape
    mats = maps.reshape(b * c, h, w)
    ranks = np.zeros(b * c, np.int64)
    live = np.flatnonzero(mats.reshape(b * c, -1).any(axis=1))  # all-zero maps: rank 0
    if not live.size:
        return ranks.reshape(b, c)
    a = mats[live].astype(np.float64)
    if h > w:
        a = np.swapaxes(a, 1, 2)
    gram = a @ np.swapaxes(a, 1, 2)
    k = gram.shape[-1]
    diag = np.diagonal(gram, axis1=1, axis2=2)
    zero_rows = diag == 0
    rel = max(h, w) * np.finfo(np.float32).eps  # numpy's tol / S.max()
    # Both the trace and the largest absolute row sum bound S.max()^2 from above, so
    # the shift is at least (RANK_BAND * tol)^2.
    top = np.minimum(diag.sum(axis=1), np.abs(gram).sum(axis=2).max(axis=1))
    shifted = gram.copy()
    # Subtract the shift; a zero row of A is a zero row and column of G: set it aside
    # with a positive pivot.
    shifted[:, np.arange(k), np.arange(k)] += zero_rows * (top[:, None] + 1) - (
        top * (RANK_BAND * rel) ** 2)[:, None]
    certain = _cholesky_succeeds(shifted)
    ranks[live[certain]] = np.count_nonzero(~zero_rows[certain], axis=1)
    rest = np.flatnonzero(~certain)
    if rest.size:
        sq = np.linalg.eigvalsh(gram[rest])  # squared singular values, ascending
        tol2 = sq[:, -1:] * rel**2
        near = ((sq > tol2 / RANK_BAND**2) & (sq < tol2 * RANK_BAND**2)).any(axis=1)
        ranks[live[rest]] = np.count_nonzero(sq > tol2, axis=1)
        if near.any():
            idx = live[rest[near]]
            ranks[idx] = np.linalg.matrix_rank(mats[idx])
    return ranks.reshape(b, c)


def _cholesky_succeeds(mats):
    """Per matrix of a stack, whether it is numerically positive definite."""
    try:  # numpy's gufunc writes NaN for a failed factor instead of raising for the stack
        from numpy.linalg import _umath_linalg
    except ImportError:  # pragma: no cover - private module moved: decide by eigenvalues
        return np.zeros(len(mats), bool)
    with np.errstate(invalid="ignore"):
        factors = _umath_linalg.cholesky_lo(mats, signature="d->d")
    return np.isfinite(np.diagonal(factors, axis1=1, axis2=2)).all(axis=1)


def iter_batches(data):
    """Images from a tf.data.Dataset / iterable of (x, y) or x, or one array."""
    if isinstance(data, np.ndarray):
        yield data
        return
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield np.asarray(x)


def score_file(ranker, index):
    """File name of conv `index`'s (0-based) scores: `rank_conv{i}.npy` for HRank (the
    name HRank's own code uses: the scores are feature-map ranks), `{ranker}_conv{i}.npy`
    for any other ranker (`l1_conv3.npy` holds L1 norms, not ranks)."""
    name = getattr(ranker, "name", ranker) or "hrank"
    return f"{'rank' if name == 'hrank' else name}_conv{index + 1}.npy"


def save_scores(scores, cnn, folder, ranker="hrank"):
    """Writes one `score_file(ranker, i)` per layer into `folder` (i: the conv's position),
    each atomically: a killed or failed save never leaves a truncated score file."""
    os.makedirs(folder, exist_ok=True)
    for name, s in scores.items():
        s = np.asarray(s)
        atomic_write(os.path.join(folder, score_file(ranker, cnn.conv(name).index)),
                     lambda tmp: np.save(tmp, s))


def load_scores(cnn, folder, layers=None, ranker="hrank"):
    """{name: scores} from `score_file(ranker, i)` files, or None if any is missing.

    `rank_conv{i}.npy` files (HRank's name, which older folders hold for every ranker)
    are read when the ranker's own files are absent.
    """
    out = {}
    for conv in [cnn.conv(l) for l in (layers or cnn.conv_layers)]:
        path = os.path.join(folder, score_file(ranker, conv.index))
        if not os.path.exists(path):
            path = os.path.join(folder, score_file("hrank", conv.index))
        if not os.path.exists(path):
            return None
        s = np.load(path)
        if s.shape != (conv.filters,):
            raise ValueError(f"Scores in {path} have shape {s.shape}; layer '{conv.name}' has "
                             f"{conv.filters} filters.")
        out[conv.name] = s
    return out
