"""One handler per layer kind, kept in a table keyed by class.

A handler says everything the engine needs to know about one kind of layer or
operation (Torch-Pruning keeps its per-op index mappings and prune functions the
same way):

* `channels(layer, ctx)`: how channels map from its inputs to its outputs;
* `config(...)` and `slice_weights(...)`: how to rebuild it with fewer channels;
* `macs(...)`: its multiply-accumulates;
* `filter_kernel(layer)`: for producers, the kernel whose last axis indexes its filters.

Channels travel as integer arrays, one label per channel of a tensor (last axis).
A handler treats the labels as opaque: it only moves them around (concatenate,
repeat, tile) and asks the context `ctx` to create, tie, segment or block them.
What a label means is private to `pruning.graph`.

Teach the engine a custom layer without editing the package:

    class MyScaleHandler(pruning.handlers.ChannelwiseHandler):
        size_keys = ("units",)            # config entries that hold the channel count

    pruning.register_layer_handler(MyScale, MyScaleHandler())
"""

import inspect
import os
import traceback
import warnings

import keras
import numpy as np

_HANDLERS = {}  # class -> handler instance


def register_layer_handler(layer_class, handler):
    """Makes `handler` (a `LayerHandler`) handle `layer_class` and its subclasses.

    `layer_class` is a Keras layer or operation class (for example a custom layer).
    A later registration for the same class replaces the earlier one; the most
    derived registered class of a layer wins.
    """
    if not isinstance(layer_class, type):
        raise ValueError(f"Expected a layer class. Received: layer_class={layer_class!r}")
    if not isinstance(handler, LayerHandler):
        raise ValueError(
            f"Expected a pruning.handlers.LayerHandler instance. Received: handler={handler!r}"
        )
    _HANDLERS[layer_class] = handler
    return handler


def get_layer_handler(layer):
    """The handler registered for `layer`'s class or its nearest base class, or None."""
    for cls in type(layer).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def handler_for(layer):
    """The registered handler of `layer`, or the default one for unknown layers/operations."""
    handler = get_layer_handler(layer)
    if handler is not None:
        return handler
    return _UNKNOWN_LAYER if isinstance(layer, keras.layers.Layer) else _UNKNOWN_OP


def filter_kernel(layer):
    """The kernel of a producer with its output filters on the last axis."""
    return handler_for(layer).filter_kernel(layer)


def is_producer(layer):
    """True for layer kinds whose handler has filters to remove (a Dense layer counts
    only when `CNNModel` sees it applied to a feature map). A layer never built has none."""
    if not getattr(layer, "built", True):
        return False
    try:
        filter_kernel(layer)
    except ValueError:
        return False
    return True


def layer_macs(layer, in_shape, out_shape):
    """Multiply-accumulates of one call for one input example (biases, BN and
    activations not counted); 0 for a layer kind without a handler."""
    handler = get_layer_handler(layer)
    return int(handler.macs(layer, in_shape, out_shape)) if handler is not None else 0


def _take(w, idx, axis):
    return w if idx is None else np.take(w, idx, axis=axis)


def _expand(idx, multiplier):
    """Channel c with depth multiplier m becomes rows c*m .. c*m+m-1."""
    return (np.asarray(idx)[:, None] * multiplier + np.arange(multiplier)).reshape(-1)


def _channel_axis_is_last(layer, ndim):
    axis = getattr(layer, "axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return axis in (-1, ndim - 1)


# --------------------------------------------------------------------- base
def channel_count(shape):
    """Channels of a tensor of this shape (batch axis first): its last axis, or 0 for a
    tensor with no axis besides the batch (a per-image scalar such as `ops.sum(x,
    axis=(1, 2, 3))`) or with an unknown last axis, whose values no filter maps to."""
    return 0 if len(shape) < 2 or shape[-1] is None else int(shape[-1])


class LayerHandler:
    """How one kind of layer maps, slices and counts channels.

    The defaults describe a weightless layer that the engine knows nothing about:
    its outputs carry no prunable channels, and any convolution whose channels
    reach it cannot be pruned.
    """

    def channels(self, layer, ctx):
        """A list with one channel-label array per output of this call."""
        if any(ctx.tracked(x) for x in ctx.inputs):
            return ctx.block(f"its channels reach layer '{layer.name}' of class "
                             f"{type(layer).__name__}, which the rebuilder cannot slice")
        return [ctx.untracked(channel_count(s)) for s in ctx.out_shapes]

    def config(self, layer, config, in_keep, out_keep):
        """`layer.get_config()` adapted to kept input channels / output filters (None: all)."""
        return config

    def slice_weights(self, layer, weights, in_keep, out_keep):
        """`weights` (as `layer.get_weights()`) restricted to the kept channels."""
        if weights and (in_keep is not None or out_keep is not None):
            raise ValueError(
                f"Cannot slice the weights of layer '{layer.name}' of class {type(layer).__name__}."
            )
        return weights

    def macs(self, layer, in_shape, out_shape):
        return 0

    def filter_kernel(self, layer):
        raise ValueError(
            f"Layer '{layer.name}' of class {type(layer).__name__} has no filters to rank."
        )

    def subgraph(self, layer, node):
        """A Functional graph that computes this call, inlined in its place (its inputs
        in the order of `node.input_tensors`, its outputs in the order of `node.outputs`),
        or None: the layer is one call, handled by `channels`. Raises `OpaqueLayerError`
        with the reason when the layer should be inlined but cannot be."""
        return None

    def rebuild(self, layer, args, kwargs, in_keep, out_keep, name):
        """A new layer with the kept channels, called on `args`: (new layer, outputs).

        A layer whose channels do not change is copied from its config as well, so that
        the pruned model shares no variables with the original; when that round trip
        fails (a custom layer whose config does not match its constructor), the original
        layer itself is reused, with a warning: the two models then share its weights.
        """
        try:
            config = self.config(layer, _layer_config(layer), in_keep, out_keep)
            config["name"] = name
            new = type(layer).from_config(config)
            outputs = new(*args, **kwargs)
            new.set_weights(self.slice_weights(layer, layer.get_weights(), in_keep, out_keep))
        except Exception as e:  # the class's own config, constructor or build failed
            if in_keep is not None or out_keep is not None:
                raise ValueError(
                    f"Cannot rebuild layer '{layer.name}' of class {type(layer).__name__} with fewer "
                    f"channels: its from_config(get_config()) fails ({type(e).__name__}: {e})"
                ) from None
            warnings.warn(
                f"Layer '{layer.name}' of class {type(layer).__name__} does not round-trip through "
                f"its config ({type(e).__name__}: {str(e)[:120]}); its channels do not change, so "
                "the pruned model reuses this layer and shares its weights with the original.",
                stacklevel=2,
            )
            return layer, layer(*args, **kwargs)
        if hasattr(new, "finalize_state"):  # an adapted Normalization reads its weights here, as on loading
            new.finalize_state()
        return new, outputs


def _layer_config(layer):
    """`layer.get_config()`; for a layer whose constructor takes only `**kwargs` (Identity)
    but was given a DTypePolicy object (keras-hub does), which Keras' automatic config
    refuses, the base config that such a constructor accepts."""
    try:
        return layer.get_config()
    except NotImplementedError:
        params = inspect.signature(type(layer).__init__).parameters
        if set(params) - {"self", "kwargs"}:
            raise
        return {"name": layer.name, "trainable": layer.trainable,
                "dtype": keras.saving.serialize_keras_object(layer.dtype_policy)}


class PassthroughHandler(LayerHandler):
    """Acts on each channel alone and holds no per-channel weights: activations,
    pooling, padding, dropout, upsampling. A selection passes through unchanged."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        return [ctx.inputs[0]]


class ChannelwiseHandler(PassthroughHandler):
    """Holds per-channel vectors on the last axis (BatchNormalization, LayerScale).

    Args:
        size_keys: config entries that hold the channel count, rewritten on rebuild.
        exact: False for layers whose output depends on which other channels exist
            (LayerNormalization): they pass a selection only with `allow_inexact`.
    """

    def __init__(self, size_keys=(), exact=True):
        self.size_keys = tuple(size_keys)
        self.exact = exact

    def channels(self, layer, ctx):
        if ctx.tracked(ctx.inputs[0]):
            if not _channel_axis_is_last(layer, len(ctx.in_shapes[0])):
                return ctx.block(f"layer '{layer.name}' of class {type(layer).__name__} "
                                 "acts on an axis other than the channels")
            if not self.exact and not ctx.inexact(
                    f"layer '{layer.name}' of class {type(layer).__name__} normalizes over the "
                    "channels, so removing channels changes its output (pass allow_inexact=True "
                    "to prune anyway and measure the change)"):
                # Keep the labels: convs tied to these downstream are blocked for this reason.
                return [ctx.inputs[0]]
        return [ctx.inputs[0]]

    def config(self, layer, config, in_keep, out_keep):
        if in_keep is not None:
            for key in self.size_keys:
                config[key] = int(len(in_keep))
        return config

    def slice_weights(self, layer, weights, in_keep, out_keep):
        return [_take(w, in_keep, -1) if w.ndim else w for w in weights]


class ReshapeHandler(LayerHandler):
    """A Reshape that keeps the channel axis last and its size unchanged (the
    squeeze-and-excitation `Reshape((1, 1, C))`) passes the selection through."""

    def channels(self, layer, ctx):
        x = ctx.inputs[0]
        if len(x) == ctx.out_shapes[0][-1] and len(ctx.in_shapes[0]) > 1:
            return [x]
        return LayerHandler.channels(self, layer, ctx)

    def config(self, layer, config, in_keep, out_keep):
        if in_keep is not None:
            config["target_shape"] = (*tuple(config["target_shape"])[:-1], int(len(in_keep)))
        return config


class FlattenHandler(LayerHandler):
    """Flatten of (..., C) repeats the channel labels once per spatial position."""

    def channels(self, layer, ctx):
        spatial = int(np.prod(ctx.in_shapes[0][1:-1]))
        if len(ctx.in_shapes[0]) > 2 and getattr(layer, "data_format", "channels_last") \
                != "channels_last" and ctx.tracked(ctx.inputs[0]):
            return ctx.block(f"layer '{layer.name}' flattens channels-first maps")
        return [np.tile(ctx.inputs[0], spatial)]


class ConcatenateHandler(LayerHandler):
    """Concatenate on the channel axis joins the labels; on any other axis, channel i
    of every input becomes channel i of the output, so the inputs are tied."""

    def axis(self, layer, ctx):
        return getattr(layer, "axis", -1)

    def channels(self, layer, ctx):
        ndim = len(ctx.in_shapes[0])
        if self.axis(layer, ctx) in (-1, ndim - 1):
            return [np.concatenate(ctx.inputs)]
        ctx.tie(ctx.inputs)
        return [ctx.inputs[0]]


class ElementwiseHandler(LayerHandler):
    """Add, Subtract, Multiply, Maximum...: channel i of every input meets channel i of
    the others (after broadcasting), so the convolutions feeding them are tied
    channel by channel. A size-1 channel axis broadcasts and ties nothing."""

    def channels(self, layer, ctx):
        width = channel_count(ctx.out_shapes[0])
        full = [x for x in ctx.inputs if len(x) == width]
        ctx.tie(full)
        return [full[0] if full else ctx.untracked(width)]


# ------------------------------------------------------------------ weighted
class ConvHandler(LayerHandler):
    """Conv1D/2D/3D, kernel (*spatial, in / groups, out).

    Grouped convolutions (1 < groups): their filters are pruned by an equal count
    in every group, and their input channels may be sliced only by an equal count
    per group as well (the producer upstream is then pruned per group). With
    `groups == in channels` the convolution is depthwise: channels pass through.
    """

    def _groups(self, layer):
        return int(getattr(layer, "groups", 1) or 1)

    def _depthwise(self, layer):
        # groups == in channels, i.e. one input channel per group.
        return self._groups(layer) > 1 and layer.kernel.shape[-2] == 1

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            if ctx.tracked(ctx.inputs[0]):
                return ctx.block(f"its channels reach layer '{layer.name}', which is channels-first")
            return [ctx.untracked(ctx.out_shapes[0][-1])]
        g = self._groups(layer)
        if self._depthwise(layer):
            return [np.repeat(ctx.inputs[0], layer.filters // g)]
        if g > 1:
            ctx.segment(ctx.inputs[0], g, f"grouped conv '{layer.name}' (groups={g})")
            out = ctx.new_filters()
            ctx.segment(out, g, f"grouped conv '{layer.name}' (groups={g})")
            return [out]
        return [ctx.new_filters()]

    def config(self, layer, config, in_keep, out_keep):
        g = self._groups(layer)
        if in_keep is not None and self._depthwise(layer):
            m = layer.filters // g
            config["groups"] = int(len(in_keep))
            config["filters"] = int(len(in_keep)) * m
        elif out_keep is not None:
            config["filters"] = int(len(out_keep))
        return config

    def slice_weights(self, layer, weights, in_keep, out_keep):
        g = self._groups(layer)
        if g == 1:
            out = [_take(_take(weights[0], in_keep, -2), out_keep, -1)]
            return out + [_take(b, out_keep, 0) for b in weights[1:]]
        cin, filters = weights[0].shape[-2] * g, layer.filters
        if self._depthwise(layer):  # kernel (*spatial, 1, C*m)
            rows = None if in_keep is None else _expand(in_keep, filters // g)
            return [_take(weights[0], rows, -1)] + [_take(b, rows, 0) for b in weights[1:]]
        return _slice_grouped(weights, g, cin, filters, in_keep, out_keep)

    def macs(self, layer, in_shape, out_shape):
        spatial = int(np.prod(out_shape[1:-1]))
        return spatial * int(np.prod(layer.kernel_size)) * (in_shape[-1] // self._groups(layer)) \
            * out_shape[-1]

    def filter_kernel(self, layer):
        if self._depthwise(layer):
            return LayerHandler.filter_kernel(self, layer)
        return layer.get_weights()[0]


def _slice_grouped(weights, groups, cin, filters, in_keep, out_keep):
    """Slices a grouped kernel (*spatial, cin/g, filters) group by group: each group
    keeps its own input channels (an equal count everywhere) and its own filters."""
    in_keep = np.arange(cin) if in_keep is None else np.asarray(in_keep)
    out_keep = np.arange(filters) if out_keep is None else np.asarray(out_keep)
    cin_g, f_g = cin // groups, filters // groups
    kernel, parts = weights[0], []
    for g in range(groups):
        rows = in_keep[(in_keep // cin_g) == g] - g * cin_g
        cols = out_keep[(out_keep // f_g) == g]
        parts.append(np.take(np.take(kernel, rows, axis=-2), cols, axis=-1))
    return [np.concatenate(parts, axis=-1)] + [np.take(b, out_keep, 0) for b in weights[1:]]


class ConvTransposeHandler(ConvHandler):
    """Conv1D/2D/3DTranspose, kernel (*spatial, out, in)."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        return [ctx.new_filters()]

    def slice_weights(self, layer, weights, in_keep, out_keep):
        out = [_take(_take(weights[0], in_keep, -1), out_keep, -2)]
        return out + [_take(b, out_keep, 0) for b in weights[1:]]

    def macs(self, layer, in_shape, out_shape):
        # Every input pixel scatters a kernel-sized patch into every output channel.
        spatial = int(np.prod(in_shape[1:-1]))
        return spatial * int(np.prod(layer.kernel_size)) * in_shape[-1] * out_shape[-1]

    def filter_kernel(self, layer):
        return np.moveaxis(layer.get_weights()[0], -2, -1)


class SeparableConvHandler(ConvHandler):
    """SeparableConv1D/2D: depthwise (*spatial, in, m), pointwise (*1, in*m, out)."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        return [ctx.new_filters()]

    def config(self, layer, config, in_keep, out_keep):
        if out_keep is not None:
            config["filters"] = int(len(out_keep))
        return config

    def slice_weights(self, layer, weights, in_keep, out_keep):
        m = layer.depth_multiplier
        rows = None if in_keep is None else _expand(in_keep, m)
        out = [_take(weights[0], in_keep, -2), _take(_take(weights[1], rows, -2), out_keep, -1)]
        return out + [_take(b, out_keep, 0) for b in weights[2:]]

    def macs(self, layer, in_shape, out_shape):
        spatial = int(np.prod(out_shape[1:-1]))
        mid = in_shape[-1] * layer.depth_multiplier
        return spatial * (int(np.prod(layer.kernel_size)) * mid + mid * out_shape[-1])

    def filter_kernel(self, layer):
        return layer.get_weights()[1]


class DepthwiseConvHandler(LayerHandler):
    """DepthwiseConv1D/2D: kernel (*spatial, in, m), bias (in*m,). Channel c becomes
    outputs c*m .. c*m+m-1, so a selection passes through (expanded by m)."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        return [np.repeat(ctx.inputs[0], layer.depth_multiplier)]

    def slice_weights(self, layer, weights, in_keep, out_keep):
        m = layer.depth_multiplier
        return [_take(weights[0], in_keep, -2)] + \
            [_take(b, None if in_keep is None else _expand(in_keep, m), 0) for b in weights[1:]]

    def macs(self, layer, in_shape, out_shape):
        return int(np.prod(out_shape[1:])) * int(np.prod(layer.kernel_size))


class DenseHandler(LayerHandler):
    """Dense, kernel (in, units). On a flat input it absorbs the channels (rows are
    sliced, its units are never pruned: that is the classifier side). On a feature
    map (rank > 2) it is a pointwise convolution, and its units are filters."""

    def channels(self, layer, ctx):
        if len(ctx.in_shapes[0]) > 2:
            return [ctx.new_filters()]
        return [ctx.untracked(ctx.out_shapes[0][-1])]

    def config(self, layer, config, in_keep, out_keep):
        if out_keep is not None:
            config["units"] = int(len(out_keep))
        return config

    def slice_weights(self, layer, weights, in_keep, out_keep):
        return [_take(_take(weights[0], in_keep, 0), out_keep, 1)] + \
            [_take(b, out_keep, 0) for b in weights[1:]]

    def macs(self, layer, in_shape, out_shape):
        return int(np.prod(in_shape[1:])) * out_shape[-1]

    def filter_kernel(self, layer):
        return layer.get_weights()[0]


# ---------------------------------------------------------------- operations
class OpHandler(LayerHandler):
    """Keras operations in a Functional graph (`x + y`, `keras.ops.relu(x)`): no
    weights, rebuilt as a fresh operation of the same class and config."""

    def rebuild(self, op, args, kwargs, in_keep, out_keep, name):
        try:
            config = self.config(op, op.get_config(), in_keep, out_keep)
            config["name"] = name
            new = type(op).from_config(config)
        except (NotImplementedError, TypeError, ValueError):
            new = op  # an operation without a config: its call does not depend on channels
        return new, new(*args, **kwargs)


def _constants(ctx):
    """Non-tensor arguments of a call that have more than one element."""
    leaves = keras.tree.flatten((ctx.node.arguments.args, ctx.node.arguments.kwargs))
    return [v for v in leaves if not isinstance(v, keras.KerasTensor)
            and hasattr(v, "shape") and int(np.prod(v.shape)) > 1]


class ElementwiseOpHandler(OpHandler, ElementwiseHandler):
    """Binary and unary elementwise operations; a scalar argument passes through,
    a constant array could hold per-channel values and blocks."""

    def channels(self, layer, ctx):
        if _constants(ctx):
            return LayerHandler.channels(self, layer, ctx)
        return ElementwiseHandler.channels(self, layer, ctx)


class ConcatenateOpHandler(OpHandler, ConcatenateHandler):
    def axis(self, layer, ctx):
        return getattr(layer, "axis", -1)


def _last_axis(axis, ndim):
    return axis in (-1, ndim - 1)


class ReduceOpHandler(OpHandler):
    """ops.mean / max / min / sum over axes that leave the channels alone (the squeeze
    of a squeeze-and-excitation block): the selection passes through."""

    def channels(self, layer, ctx):
        ndim = len(ctx.in_shapes[0])
        axis = getattr(layer, "axis", None)
        axes = [axis] if isinstance(axis, int) else list(axis or ())
        if axis is not None and not any(_last_axis(a, ndim) for a in axes) \
                and channel_count(ctx.out_shapes[0]) == len(ctx.inputs[0]):
            return [ctx.inputs[0]]
        return LayerHandler.channels(self, layer, ctx)


class PadOpHandler(OpHandler):
    """ops.pad with no padding on the channel axis."""

    def channels(self, layer, ctx):
        width = np.asarray(getattr(layer, "pad_width", None) or [[1, 1]], dtype=object)
        if width.ndim == 2 and len(width) == len(ctx.in_shapes[0]) and \
                tuple(int(v) for v in width[-1]) == (0, 0):
            return [ctx.inputs[0]]
        return LayerHandler.channels(self, layer, ctx)


class ReshapeOpHandler(OpHandler):
    """ops.reshape keeping the channel axis last and its size ((B, H, W, C) <-> (B, H*W, C)
    of a transformer block): the selection passes through, the new shape is rewritten."""

    def channels(self, layer, ctx):
        shape = tuple(getattr(layer, "newshape", ()) or ())
        if len(ctx.in_shapes[0]) > 1 and shape and shape[-1] == len(ctx.inputs[0]) and \
                channel_count(ctx.out_shapes[0]) == len(ctx.inputs[0]):
            return [ctx.inputs[0]]
        return LayerHandler.channels(self, layer, ctx)

    def config(self, layer, config, in_keep, out_keep):
        if in_keep is not None:
            config["newshape"] = (*tuple(config["newshape"])[:-1], int(len(in_keep)))
        return config

    def rebuild(self, op, args, kwargs, in_keep, out_keep, name):
        shape = tuple(self.config(op, op.get_config(), in_keep, out_keep)["newshape"])
        if shape and shape[0] is None and None not in shape[1:]:
            # A traced `ops.reshape(x, (ops.shape(x)[0], ...))` holds the unknown batch size:
            # a Reshape layer says the same without it.
            new = keras.layers.Reshape(shape[1:], name=name)
            return new, new(*args, **kwargs)
        return OpHandler.rebuild(self, op, args, kwargs, in_keep, out_keep, name)


class TransposeHandler(OpHandler):
    """ops.transpose / Permute that keep the channel axis last."""

    def channels(self, layer, ctx):
        ndim = len(ctx.in_shapes[0])
        if hasattr(layer, "dims"):  # Permute: 1-based, batch axis left out
            last = tuple(layer.dims)[-1] == ndim - 1
        else:
            axes = getattr(layer, "axes", None)
            last = axes is not None and _last_axis(tuple(axes)[-1], ndim)
        if last:
            return [ctx.inputs[0]]
        return LayerHandler.channels(self, layer, ctx)


class PermuteHandler(TransposeHandler):
    rebuild = LayerHandler.rebuild


class SplitOpHandler(OpHandler):
    """ops.split: on the channel axis each part is a slice of the labels (the inverse of
    Concatenate); equal sections keep equal counts (a segment each), explicit split
    points are moved to the kept channels. On any other axis every part passes through."""

    def channels(self, layer, ctx):
        x, ndim = ctx.inputs[0], len(ctx.in_shapes[0])
        if not _last_axis(layer.axis, ndim):
            return [x] * len(ctx.out_shapes)
        sections = layer.indices_or_sections
        if isinstance(sections, int):
            ctx.segment(x, sections, f"split '{layer.name}' into {sections} equal parts")
            return list(np.split(x, sections))
        return list(np.split(x, list(sections)))

    def rebuild(self, op, args, kwargs, in_keep, out_keep, name):
        sections = op.indices_or_sections
        if in_keep is None or isinstance(sections, int) or not _last_axis(op.axis, len(args[0].shape)):
            return OpHandler.rebuild(self, op, args, kwargs, in_keep, out_keep, name)
        new = type(op)([int(np.sum(np.asarray(in_keep) < i)) for i in sections], axis=op.axis, name=name)
        return new, new(*args, **kwargs)


def _channel_slice(key, ndim):
    """The slice a `x[key]` takes of the last (channel) axis of an `ndim`-D tensor, or None
    when the key does anything else there (an index, a new axis, a step, a tensor). A list
    key is a tuple: Keras' loader turns a saved `x[..., a:b]` key into a list."""
    key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    if any(k is None or isinstance(k, keras.KerasTensor) for k in key) or key.count(Ellipsis) > 1:
        return None
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (ndim - len(key))
    if len(key) != ndim or any(not isinstance(k, slice) for k in key[-1:]):
        return None
    last = key[-1]
    if any(isinstance(k, int) for k in key[:-1]) or last.step not in (None, 1):
        return None
    return last


class GetItemHandler(OpHandler):
    """`x[..., a:b]` takes channels a..b-1 (a slice of the labels; the bounds move with
    the kept channels); slicing other axes passes the channels through."""

    def channels(self, layer, ctx):
        key = ctx.node.arguments.args[1] if len(ctx.node.arguments.args) > 1 else None
        last = _channel_slice(key, len(ctx.in_shapes[0]))
        if last is None or len(ctx.in_shapes[0]) < 2:
            return LayerHandler.channels(self, layer, ctx)
        return [ctx.inputs[0][last]]

    def rebuild(self, op, args, kwargs, in_keep, out_keep, name):
        x, key = args[0], args[1]
        key = tuple(key) if isinstance(key, list) else key
        last = _channel_slice(key, len(x.shape))
        if in_keep is not None and last is not None and last != slice(None):
            channels = int(op._inbound_nodes[0].input_tensors[0].shape[-1])  # before pruning
            start, stop, _ = last.indices(channels)
            kept = np.asarray(in_keep)
            new_last = slice(int(np.sum(kept < start)), int(np.sum(kept < stop)))
            key = (*key[:-1], new_last) if isinstance(key, tuple) else new_last
        new = type(op)(name=name)
        return new, new(x, key)


class DepthToSpaceHandler(OpHandler):
    """ops.depth_to_space(x, b): output channel c gathers input channels k * C' + c
    (k < b*b), so those b*b channels are tied: whole blocks are kept or removed."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        x, n = ctx.inputs[0], int(layer.block_size) ** 2
        parts = np.split(x, n)
        ctx.tie(parts)
        return [parts[0]]


class SpaceToDepthHandler(OpHandler):
    """ops.space_to_depth(x, b): output channel k * C + c is input channel c."""

    def channels(self, layer, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return LayerHandler.channels(self, layer, ctx)
        return [np.tile(ctx.inputs[0], int(layer.block_size) ** 2)]


class RescalingHandler(PassthroughHandler):
    """Rescaling: a scalar scale and offset pass through; per-channel ones are sliced."""

    def config(self, layer, config, in_keep, out_keep):
        if in_keep is not None:
            for key in ("scale", "offset"):
                v = np.asarray(config.get(key, 0.0), dtype="float64")
                if v.ndim and v.shape[-1] > 1:
                    config[key] = np.take(v, in_keep, axis=-1).tolist()
        return config


class ScaledAddHandler(ElementwiseHandler):
    """keras.applications' InceptionResNetV2 `CustomScaleLayer`: inputs[0] + inputs[1] * scale."""


class OpaqueLayerError(ValueError):
    """A layer's call cannot be traced into a graph of Keras layers and operations."""


def hidden_convs(layer):
    """Names of the producers (convs) anywhere inside `layer`."""
    return [sub.name for sub in layer._flatten_layers(include_self=False, recursive=True)
            if is_producer(sub)]


_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (keras, np))


def _where(error):
    """The line outside Keras that raised `error` (or called what raised it)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(_INTERNAL) and "tensorflow" not in f.filename
              and not f.filename.endswith(os.path.join("pruning", "handlers.py"))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at `{(f.line or '').strip()}` ({os.path.basename(f.filename)}:{f.lineno})"


def _trace_call(layer, node, training):
    """`layer.call` run on fresh symbolic inputs shaped like this call's, as a Functional model."""
    tensors = node.arguments.keras_tensors
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in tensors]
    args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(tensors, inputs)})
    if training is not None:
        kwargs["training"] = training
    outputs = keras.tree.flatten(layer.call(*args, **kwargs))
    if not outputs or not all(isinstance(o, keras.KerasTensor) for o in outputs):
        raise OpaqueLayerError("its call returns values that are not tensors")
    return keras.Model(inputs, outputs, name=f"{layer.name}_traced")


class CompositeHandler(LayerHandler):
    """Layers without a handler of their own: nested models are inlined, and so is a
    custom layer whose `call` uses only Keras layers and `keras.ops` (its call is traced
    on symbolic tensors, like a nested model's graph). A layer that cannot be traced is
    one opaque call: convs whose channels reach it are blocked."""

    def subgraph(self, layer, node):
        if isinstance(layer, keras.Sequential) and getattr(layer, "_functional", None) is not None:
            return layer._functional
        if isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth"):
            return layer
        if not isinstance(layer, keras.layers.Layer):
            return None
        inside = {id(v) for sub in layer._flatten_layers(include_self=False, recursive=True)
                  for v in sub.weights}
        own = [v.name for v in layer.weights if id(v) not in inside]
        if own:
            raise OpaqueLayerError(f"it holds its own weights ({', '.join(own[:4])}), which only "
                                   "its class knows how to use")
        try:
            takes_training = "training" in inspect.signature(layer.call).parameters
        except (TypeError, ValueError):
            takes_training = False
        explicit = "training" in node.arguments.kwargs
        try:
            graph = _trace_call(layer, node, None)
            if takes_training and not explicit:
                other = _trace_call(layer, node, True)
                if [type(op).__name__ for op in graph.operations] != \
                        [type(op).__name__ for op in other.operations]:
                    raise OpaqueLayerError("its call takes a different path when training, "
                                           "which one traced graph cannot follow")
            calls = {}
            for nodes in graph._nodes_by_depth.values():
                for n in nodes:
                    if n.operation is not None and is_producer(n.operation):
                        calls[id(n.operation)] = calls.get(id(n.operation), 0) + 1
                        if calls[id(n.operation)] > 1:
                            raise OpaqueLayerError(f"it calls conv '{n.operation.name}' more than "
                                                   "once (one set of weights for several calls)")
        except OpaqueLayerError:
            raise
        except Exception as e:  # anything the symbolic trace cannot run
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise OpaqueLayerError(f"its call cannot run on symbolic tensors{_where(e)}: "
                                   f"{type(e).__name__}: {first}") from None
        return graph


_UNKNOWN_LAYER = CompositeHandler()
_UNKNOWN_OP = OpHandler()


# -------------------------------------------------------------------- table
def _register_defaults():
    L = keras.layers
    passthrough = PassthroughHandler()
    for name in (
        "Activation", "ReLU", "LeakyReLU", "ELU", "Identity",
        "ActivityRegularization", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
        "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D",
        "UpSampling1D", "UpSampling2D", "UpSampling3D", "Resizing",
    ):
        if hasattr(L, name):
            register_layer_handler(getattr(L, name), passthrough)
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_layer_handler(cls, ConvHandler())
    for name in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        register_layer_handler(getattr(L, name), ConvTransposeHandler())
    for name in ("SeparableConv1D", "SeparableConv2D"):
        register_layer_handler(getattr(L, name), SeparableConvHandler())
    for name in ("DepthwiseConv1D", "DepthwiseConv2D"):
        register_layer_handler(getattr(L, name), DepthwiseConvHandler())
    register_layer_handler(L.Dense, DenseHandler())
    register_layer_handler(L.BatchNormalization, ChannelwiseHandler())
    register_layer_handler(L.LayerNormalization, ChannelwiseHandler(exact=False))
    register_layer_handler(L.Reshape, ReshapeHandler())
    register_layer_handler(L.Flatten, FlattenHandler())
    register_layer_handler(L.Concatenate, ConcatenateHandler())
    elementwise = ElementwiseHandler()
    for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
        register_layer_handler(cls, elementwise)

    # keras.ops nodes of Functional graphs (there is no public path to their classes).
    from keras.src.ops import nn as ops_nn
    from keras.src.ops import numpy as ops_np

    op = ElementwiseOpHandler()
    for module, names in (
        (ops_np, ("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum",
                  "Absolute", "Abs", "Negative", "Square", "Sqrt", "Exp", "Log", "Tanh", "Sign",
                  "Clip", "Power", "Reciprocal", "Copy")),
        (ops_nn, ("Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "Swish", "HardSilu",
                  "HardSwish", "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign",
                  "Tanh", "Mish", "Celu", "LogSigmoid")),
    ):
        for name in names:
            if hasattr(module, name):
                register_layer_handler(getattr(module, name), op)
    register_layer_handler(ops_np.Concatenate, ConcatenateOpHandler())
    from keras.src.ops import core as ops_core

    register_layer_handler(ops_core.Cast, op)
    for name in ("Mean", "Max", "Min", "Sum", "Amax", "Amin"):
        if hasattr(ops_np, name):
            register_layer_handler(getattr(ops_np, name), ReduceOpHandler())
    register_layer_handler(ops_np.Pad, PadOpHandler())
    register_layer_handler(ops_np.Reshape, ReshapeOpHandler())
    register_layer_handler(ops_np.Transpose, TransposeHandler())
    register_layer_handler(ops_np.Split, SplitOpHandler())
    register_layer_handler(ops_np.GetItem, GetItemHandler())
    register_layer_handler(ops_nn.DepthToSpace, DepthToSpaceHandler())
    register_layer_handler(ops_nn.SpaceToDepth, SpaceToDepthHandler())
    register_layer_handler(L.Permute, PermuteHandler())
    register_layer_handler(L.Rescaling, RescalingHandler())

    # keras.applications' own custom layers.
    try:
        from keras.src.applications.convnext import LayerScale
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
    except ImportError:  # pragma: no cover - older Keras
        return
    register_layer_handler(CustomScaleLayer, ScaledAddHandler())
    register_layer_handler(LayerScale, ChannelwiseHandler(size_keys=("projection_dim",)))


_register_defaults()
