"""More filter importance criteria, registered in `pruning.rankers.RANKERS`.

    get_ranker("fpgm").rank_all(model)                       # weights only
    get_ranker("bn_scale").rank_all(model)                   # weights only
    get_ranker("apoz").rank_all(model, data=images)          # from data
    get_ranker("taylor").rank_all(model, data=(x, y) batches)  # from data and labels

Higher scores mean keep, as for every ranker. This module depends on keras and
numpy only: the gradients of the Taylor criterion go through a small switch over
the Keras backend (`value_and_grads`), so it runs under TensorFlow, JAX and torch.
"""

import keras
import numpy as np

from pruning.graph import CNNModel
from pruning.rankers import DataRanker, Ranker, feature_maps, filter_kernel, register_ranker


@register_ranker
class FPGMRanker(Ranker):
    """FPGM (He et al., CVPR 2019): filters near the geometric median of their layer
    are redundant, since the others can stand in for them.

    The score of filter i is the sum of its Euclidean distances to every other filter
    of the layer (the usual approximation of the distance to the geometric median,
    as in the authors' code and Torch-Pruning): low = close to the median = pruned first.
    """

    name = "fpgm"

    def rank(self, model, layer, data=None):
        k = filter_kernel(CNNModel.of(model).conv(layer).layer)
        w = k.reshape(-1, k.shape[-1]).T.astype(np.float64)  # (filters, fan_in)
        dist = np.sqrt(np.maximum(
            (w * w).sum(1)[:, None] + (w * w).sum(1)[None, :] - 2.0 * w @ w.T, 0.0))
        return dist.sum(axis=1)


@register_ranker
class BNScaleRanker(Ranker):
    """|gamma| of the BatchNormalization that directly follows the conv (Network
    Slimming, Liu et al., ICCV 2017): a channel BN scales towards zero contributes little."""

    name = "bn_scale"

    def rank(self, model, layer, data=None):
        cnn = CNNModel.of(model)
        conv = cnn.conv(layer)
        bn = following_batchnorm(cnn, conv)
        if bn is None or not bn.scale:
            raise ValueError(f"The 'bn_scale' ranker needs a BatchNormalization with a scale (gamma) "
                             f"directly after layer '{conv.name}'. Received: "
                             f"{'none' if bn is None else repr(bn.name) + ' with scale=False'}")
        return np.abs(np.asarray(bn.get_weights()[0], np.float64))


def following_batchnorm(cnn, conv):
    """The BatchNormalization layer that is the only reader of `conv`'s output, or None."""
    conv = cnn.conv(conv)
    call = next(c for c in cnn.calls if c.layer is conv.layer)
    readers = [c for c in cnn.calls if call.outputs[0] in c.inputs]
    if len(readers) == 1 and isinstance(readers[0].layer, keras.layers.BatchNormalization):
        return readers[0].layer
    return None


@register_ranker
class APoZRanker(DataRanker):
    """APoZ (Hu et al., 2016): Average Percentage of Zeros of each channel's map after
    the activation (the tensor HRank reads, `CNNModel.feature_key`), over `data`.

    A channel that is mostly zero after ReLU carries little; the score is 1 - APoZ,
    so higher still means keep.

    Args:
        num_batches: how many batches of `data` to use (None: all).
    """

    name = "apoz"

    def rank_all(self, model, layers=None, data=None, progress=None):
        cnn, layers, keys = feature_maps(model, layers)

        def zero_fractions(x, y):  # per layer: sum over the batch's images of each channel's zero fraction
            for fmap in cnn.forward(x, keys):
                fmap = keras.ops.convert_to_numpy(fmap)
                yield (fmap == 0).reshape(-1, fmap.shape[-1]).mean(axis=0) * fmap.shape[0]

        apoz = _mean_over_data(self, layers, data, zero_fractions, progress)
        return {c.name: 1.0 - z for c, z in zip(layers, apoz)}


@register_ranker
class TaylorRanker(DataRanker):
    """First-order Taylor expansion of the loss (Molchanov et al., ICLR 2017).

    For each example, channel c of the activation `a` (the post-BN/ReLU map,
    `CNNModel.feature_key`) and the gradient `g` of the cross-entropy loss with respect
    to it give |sum over positions of a * g|: the first-order change of the loss when
    the channel is zeroed. The score is its mean over the examples of `data`, which
    yields (images, labels) batches, labels as integers or one-hot.

    Args:
        num_batches: how many batches of `data` to use (None: all).
    """

    name = "taylor"

    def rank_all(self, model, layers=None, data=None, progress=None):
        cnn, layers, keys = feature_maps(model, layers)
        probabilities = outputs_probabilities(cnn.model)

        def taylor_sums(x, y):  # per layer: sum over the batch's images of |sum over positions of a * g|
            for a, g in zip(*activation_gradients(cnn, keys, x, y, probabilities)):
                a, g = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(g)
                yield np.abs((a * g).reshape(a.shape[0], -1, a.shape[-1]).sum(axis=1)).sum(axis=0)

        scores = _mean_over_data(self, layers, data, taylor_sums, progress, labels=True)
        return {c.name: t for c, t in zip(layers, scores)}


def outputs_probabilities(model):
    """True when the model's last layer applies softmax (its outputs are probabilities,
    as in the rice models), False when it outputs logits."""
    last = model.layers[-1]
    while isinstance(last, keras.Model):
        last = last.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    act = getattr(last, "activation", None)
    return act is not None and getattr(act, "__name__", "") == "softmax"


def activation_gradients(cnn, keys, x, y, probabilities=False):
    """Values of the tensors `keys` on batch `x` and the gradients of the summed
    cross-entropy against labels `y` with respect to them.

    The gradient with respect to an inner tensor is taken as the gradient with respect
    to a zero tensor added to it, so any backend's autodiff applies (`value_and_grads`).
    """
    x = keras.ops.convert_to_tensor(np.asarray(x, np.float32))
    eps = [keras.ops.zeros((x.shape[0], *cnn.shapes[k][1:])) for k in keys]
    where = {k: i for i, k in enumerate(keys)}

    def loss_fn(eps):
        acts = [None] * len(keys)

        def call_fn(call, args, kwargs):
            out = call.layer(*args, **kwargs)
            i = where.get(call.outputs[0])
            if i is not None:
                acts[i] = out
                out = out + eps[i]
            return out

        (out,) = cnn.walk([x], call_fn, cnn.output_keys[:1])
        loss = cross_entropy(y, out, probabilities)
        return keras.ops.sum(loss), acts

    acts, grads = value_and_grads(loss_fn, eps)
    return acts, grads


def cross_entropy(y, outputs, probabilities=False):
    """Per-example cross-entropy for integer or one-hot labels `y`."""
    y = np.asarray(y)
    if y.ndim == len(outputs.shape):
        return keras.losses.categorical_crossentropy(y.astype(np.float32), outputs,
                                                     from_logits=not probabilities)
    return keras.losses.sparse_categorical_crossentropy(y.astype(np.int64), outputs,
                                                        from_logits=not probabilities)


def value_and_grads(fn, tensors):
    """(aux, gradients of loss with respect to `tensors`) where `fn(tensors)` returns
    (scalar loss, aux), through the autodiff of the current Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss, aux = fn(tensors)
        return aux, tape.gradient(loss, tensors)
    if backend == "jax":
        import jax

        (_, aux), grads = jax.value_and_grad(fn, has_aux=True)(tensors)
        return aux, grads
    if backend == "torch":
        import torch

        tensors = [t.detach().requires_grad_(True) for t in tensors]
        loss, aux = fn(tensors)
        return [a.detach() for a in aux], torch.autograd.grad(loss, tensors)
    raise ValueError(f"Gradients need the tensorflow, jax or torch backend. Received: backend={backend!r}")


def _batches(data, name, num_batches=None, labels=False):
    """(x, y) numpy batches of `data`: an (x, y) tuple of arrays, an array of images, or
    an iterable (tf.data.Dataset...) of (x, y) or x batches."""
    if data is None:
        raise ValueError(f"The '{name}' ranker needs data: batches of "
                         f"{'(images, labels)' if labels else 'images'}.")
    if isinstance(data, np.ndarray):
        data = [data]
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        data = [data]
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        if isinstance(batch, (tuple, list)):
            x, y = np.asarray(batch[0]), (np.asarray(batch[1]) if len(batch) > 1 else None)
        else:
            x, y = np.asarray(batch), None
        if labels and y is None:
            raise ValueError(f"The '{name}' ranker needs labels: batches of (images, labels). "
                             "Received: images only")
        yield x, y


def _mean_over_data(ranker, layers, data, batch_sums, progress=None, labels=False):
    """Per-layer channel scores averaged over the images of `data`: `batch_sums(x, y)`
    yields, for each of `layers`, the sum of its per-image channel scores over one batch."""
    totals = [np.zeros(c.filters) for c in layers]
    count = 0
    for x, y in _batches(data, ranker.name, ranker.num_batches, labels=labels):
        for total, batch in zip(totals, batch_sums(x, y)):
            total += batch
        count += x.shape[0]
        if progress:
            progress(1)
    _check_count(count, ranker.name)
    return [t / count for t in totals]


def _check_count(count, name):
    if count == 0:
        raise ValueError(f"The '{name}' ranker received no batches of data.")
