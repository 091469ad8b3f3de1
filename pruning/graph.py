"""The prunable structure of a Keras model.

`CNNModel` flattens a built Keras model (Sequential, Functional, or one that nests
other models as layers) into one list of layer calls in topological order, and
traces where every channel of every tensor comes from. That trace tells

* which convolutions can be pruned (`CNNModel.conv_layers`),
* which convolutions must share one filter selection because an `Add`-like layer
  mixes their channels elementwise (`CNNModel.groups`),
* which layers consume a convolution's channels (`ConvLayer.consumers`),
* which layer stops a convolution from being pruned (`ConvLayer.blocked_by`).
"""

from dataclasses import dataclass, field

import keras
import numpy as np

# A channel's origin is encoded as conv_index * _STRIDE + filter_index, or -1 when
# the channel does not come from a prunable convolution (input pixels, Dense
# outputs...). 2**24 filters per layer is far beyond any real network.
_STRIDE = 1 << 24
NO_ORIGIN = -1

CONV_CLASSES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

# Layers that act on each channel independently and hold no per-channel weights:
# a channel selection passes through them unchanged.
PASSTHROUGH_CLASSES = tuple(
    getattr(keras.layers, name)
    for name in (
        "Activation", "ReLU", "LeakyReLU", "ELU", "Identity", "ActivityRegularization",
        "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
        "GaussianNoise", "GaussianDropout", "AlphaDropout",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D",
        "UpSampling1D", "UpSampling2D", "UpSampling3D",
    )
    if hasattr(keras.layers, name)
)

# Elementwise merges: channel i of every input meets channel i of the others, so
# the convolutions feeding them must keep the same filter indices.
ALIGNED_MERGE_CLASSES = (
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
    keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
)


def _is_conv(layer):
    # Conv1D/2D/3D share the kernel layout (*spatial, in, out). Grouped
    # convolutions and Conv*Transpose (kernel (*spatial, out, in)) are not.
    return (
        isinstance(layer, CONV_CLASSES)
        and not isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose,
                                   keras.layers.Conv3DTranspose))
        and getattr(layer, "groups", 1) == 1
    )


def is_producer(layer):
    """True for layers whose output filters can be removed."""
    return _is_conv(layer) or isinstance(layer, keras.layers.SeparableConv2D)


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


@dataclass
class Call:
    """One call of a leaf layer in the flattened graph."""

    layer: keras.layers.Layer
    node: object  # the keras Node, for its call arguments
    inputs: list  # canonical tensor keys
    outputs: list
    aliases: dict  # id(KerasTensor in node.arguments) -> canonical key


@dataclass
class ConvLayer:
    """A convolution whose output filters can be pruned."""

    name: str
    layer: keras.layers.Layer
    index: int  # position among the model's convolutions, 0-based
    filters: int
    kernel_size: tuple
    consumers: list = field(default_factory=list)  # names of layers reading its channels
    group: tuple = ()  # names of convs that must be pruned with the same indices
    blocked_by: str = ""  # why it cannot be pruned; "" when it can
    feeds_output: bool = False  # its channels (or a tied conv's) reach a model output

    @property
    def prunable(self):
        return not self.blocked_by

    def __repr__(self):
        state = "prunable" if self.prunable else f"blocked: {self.blocked_by}"
        return (f"ConvLayer(name={self.name!r}, filters={self.filters}, "
                f"kernel_size={self.kernel_size}, {state})")


class CNNModel:
    """A built Keras model seen as a graph of prunable convolutions.

    Args:
        model: a built `keras.Model` (Sequential, Functional, or nesting either).
    """

    def __init__(self, model):
        if isinstance(model, CNNModel):
            model = model.model
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"Expected a keras.Model. Received: model={model!r} of type {type(model).__name__}"
            )
        self.model = model
        self.calls = []
        self.shapes = {}  # canonical key -> shape tuple (batch axis included)
        self._alias = {}
        fm = _functional(model)
        self.input_keys = [self._key(t) for t in fm.inputs]
        for t in fm.inputs:
            self.shapes[self._key(t)] = tuple(t.shape)
        self.input_names = [t._keras_history.operation.name for t in fm.inputs]
        self.input_dtypes = [t.dtype for t in fm.inputs]
        self._trace(fm)
        self.output_keys = [self._key(t) for t in fm.outputs]
        self._analyse()

    # ------------------------------------------------------------------ trace
    def _key(self, tensor):
        k = id(tensor)
        while k in self._alias:
            k = self._alias[k]
        return k

    def _trace(self, fm):
        for depth in sorted(fm._nodes_by_depth, reverse=True):
            for node in fm._nodes_by_depth[depth]:
                if node.is_input or node.operation is None:
                    continue
                op = node.operation
                if isinstance(op, keras.Model):
                    inner = _functional(op)
                    if len(inner.inputs) != len(node.input_tensors):
                        raise ValueError(
                            f"Cannot inline nested model '{op.name}': it was called with "
                            f"{len(node.input_tensors)} tensors for {len(inner.inputs)} inputs."
                        )
                    for inner_in, outer_in in zip(inner.inputs, node.input_tensors):
                        self._alias[id(inner_in)] = self._key(outer_in)
                    self._trace(inner)
                    for outer_out, inner_out in zip(node.outputs, inner.outputs):
                        self._alias[id(outer_out)] = self._key(inner_out)
                    continue
                if not isinstance(op, keras.layers.Layer):
                    raise ValueError(
                        f"Unsupported operation '{getattr(op, 'name', op)}' of class "
                        f"{type(op).__name__}: only Keras layers can be rebuilt."
                    )
                aliases = {id(t): self._key(t) for t in node.arguments.keras_tensors}
                call = Call(
                    layer=op,
                    node=node,
                    inputs=[self._key(t) for t in node.input_tensors],
                    outputs=[id(t) for t in node.outputs],
                    aliases=aliases,
                )
                for t in node.outputs:
                    self.shapes[id(t)] = tuple(t.shape)
                self.calls.append(call)

    # ---------------------------------------------------------------- analyse
    def _analyse(self):
        convs = []
        origins = {k: np.full(self.shapes[k][-1], NO_ORIGIN, np.int64) for k in self.input_keys}
        consumers = {}  # conv index -> set of layer names
        blocked = {}  # conv index -> reason
        parent = {}  # union-find over conv indices

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def sources(origin):
            o = origin[origin >= 0]
            return set((o // _STRIDE).tolist())

        def block(conv_ids, reason):
            for i in conv_ids:
                blocked.setdefault(i, reason)

        for call in self.calls:
            layer = call.layer
            ins = [origins[k] for k in call.inputs]
            fed = set().union(*(sources(o) for o in ins)) if ins else set()
            for i in fed:
                consumers.setdefault(i, set()).add(layer.name)
            rule = channel_rule(layer, len(self.shapes[call.inputs[0]]) if call.inputs else 0)
            if rule is None or (fed and not _channels_last(layer)):
                if fed:
                    block(fed, f"its channels reach layer '{layer.name}' of class "
                               f"{type(layer).__name__}, which the rebuilder cannot slice")
                outs = [np.full(self.shapes[k][-1], NO_ORIGIN, np.int64) for k in call.outputs]
            elif rule == "aligned":
                first = ins[0]
                for other in ins[1:]:
                    if other.shape != first.shape:
                        raise ValueError(f"Layer '{layer.name}' merges tensors of different widths.")
                    for a, b in zip(first, other):
                        if (a < 0) != (b < 0):
                            block(sources(np.array([a, b])),
                                  f"layer '{layer.name}' adds its channels to channels that "
                                  "cannot be pruned")
                        elif a >= 0 and (a % _STRIDE) != (b % _STRIDE):
                            block(sources(np.array([a, b])),
                                  f"layer '{layer.name}' mixes filters of different indices")
                        elif a >= 0:
                            ra, rb = find(a // _STRIDE), find(b // _STRIDE)
                            parent[rb] = ra
                outs = [first.copy()]
            elif rule == "concat":
                outs = [np.concatenate(ins)]
            elif rule == "flatten":
                spatial = int(np.prod(self.shapes[call.inputs[0]][1:-1]))
                outs = [np.tile(ins[0], spatial)]
            elif rule == "depthwise":
                outs = [np.repeat(ins[0], layer.depth_multiplier)]
            elif rule == "passthrough":
                outs = [ins[0].copy()]
            elif rule == "producer":
                i = len(convs)
                convs.append(call)
                parent[i] = i
                filters = self.shapes[call.outputs[0]][-1]
                outs = [i * _STRIDE + np.arange(filters, dtype=np.int64)]
            else:  # "consumer": Dense and other weighted layers that absorb channels
                outs = [np.full(self.shapes[k][-1], NO_ORIGIN, np.int64) for k in call.outputs]
            for k, o in zip(call.outputs, outs):
                origins[k] = o

        at_output = set()
        for k in self.output_keys:
            # The classifier is never pruned: channels that reach a model output stay.
            at_output |= sources(origins[k])
            block(sources(origins[k]), "its channels reach a model output")

        groups = {}
        for i in range(len(convs)):
            groups.setdefault(find(i), []).append(i)
        # A blocked member blocks its whole group: the indices must stay aligned.
        for members in groups.values():
            culprit = next((i for i in members if i in blocked), None)
            if culprit is not None:
                for i in members:
                    blocked.setdefault(i, f"it is tied to '{convs[culprit].layer.name}', "
                                          f"which cannot be pruned: {blocked[culprit]}")

        self.origins = origins
        self.conv_layers = []
        for i, call in enumerate(convs):
            layer = call.layer
            members = groups[find(i)]
            self.conv_layers.append(ConvLayer(
                name=layer.name,
                layer=layer,
                index=i,
                filters=int(self.shapes[call.outputs[0]][-1]),
                kernel_size=tuple(layer.kernel_size),
                consumers=sorted(consumers.get(i, ())),
                group=tuple(convs[j].layer.name for j in members),
                blocked_by=blocked.get(i, ""),
                feeds_output=bool(at_output & set(members)),
            ))
        self._conv_by_name = {c.name: c for c in self.conv_layers}

    # ------------------------------------------------------------------ query
    @property
    def prunable_layers(self):
        return [c for c in self.conv_layers if c.prunable]

    @property
    def groups(self):
        """Tuples of conv names that share one filter selection (singletons included)."""
        seen, out = set(), []
        for c in self.conv_layers:
            if c.group not in seen:
                seen.add(c.group)
                out.append(c.group)
        return out

    def conv(self, name):
        """The `ConvLayer` called `name`, with a clear error when there is none."""
        if isinstance(name, ConvLayer):
            return name
        if name not in self._conv_by_name:
            raise ValueError(
                f"Unknown convolution layer: '{name}'. Expected one of: "
                f"{', '.join(self._conv_by_name) or '(none)'}"
            )
        return self._conv_by_name[name]

    def feature_key(self, conv):
        """The tensor HRank reads for `conv`: its output after directly following
        BatchNormalization and activation layers (the post-ReLU map of conv-BN-ReLU)."""
        conv = self.conv(conv)
        call = next(c for c in self.calls if c.layer is conv.layer)
        key = call.outputs[0]
        readers = {}
        for c in self.calls:
            for k in c.inputs:
                readers.setdefault(k, []).append(c)
        follow = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU,
                  keras.layers.LeakyReLU, keras.layers.ELU)
        while len(readers.get(key, ())) == 1 and isinstance(readers[key][0].layer, follow):
            key = readers[key][0].outputs[0]
        return key

    def walk(self, input_values, call_fn, output_keys=None):
        """Runs the flattened graph: `call_fn(call, args, kwargs)` returns a call's outputs.

        Returns the values of `output_keys` (default: the model outputs), in order.
        """
        values = dict(zip(self.input_keys, input_values))
        for call in self.calls:
            local = {i: values[k] for i, k in call.aliases.items()}
            args, kwargs = call.node.arguments.fill_in(local)
            outs = call_fn(call, args, kwargs)
            outs = keras.tree.flatten(outs)
            for k, v in zip(call.outputs, outs):
                values[k] = v
        return [values[k] for k in (output_keys or self.output_keys)]

    def forward(self, inputs, output_keys):
        """Values of any traced tensors for real inputs, in inference mode."""
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        return self.walk(inputs, lambda call, a, kw: call.layer(*a, **kw), output_keys)

    def summary(self):
        rows = [f"{'#':>3} {'layer':<24} {'filters':>7} {'kernel':<10} status"]
        for c in self.conv_layers:
            tied = f" (tied: {', '.join(g for g in c.group if g != c.name)})" if len(c.group) > 1 else ""
            status = "prunable" + tied if c.prunable else f"blocked: {c.blocked_by}"
            rows.append(f"{c.index:>3} {c.name:<24} {c.filters:>7} {str(c.kernel_size):<10} {status}")
        return "\n".join(rows)


def channel_rule(layer, ndim):
    """How a layer maps channels from its `ndim`-rank input to its outputs (None: unsupported)."""
    if is_producer(layer):
        return "producer"
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "passthrough" if layer.axis in (-1, ndim - 1) else None
    if isinstance(layer, PASSTHROUGH_CLASSES):
        return "passthrough"
    if isinstance(layer, keras.layers.Flatten):
        return "flatten"
    if isinstance(layer, keras.layers.Concatenate):
        return "concat" if layer.axis in (-1, ndim - 1) else None
    if isinstance(layer, ALIGNED_MERGE_CLASSES):
        return "aligned"
    if isinstance(layer, keras.layers.Dense):
        return "consumer"
    return None


def _functional(model):
    """The Functional graph behind a model (Sequential keeps one once built)."""
    if isinstance(model, keras.Sequential):
        fm = getattr(model, "_functional", None)
        if fm is None:
            raise ValueError(
                f"Model '{model.name}' is not built. Build it first, for example by starting the "
                "Sequential with keras.Input(shape=...) or calling model.build(input_shape)."
            )
        return fm
    if not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            f"Model '{model.name}' of class {type(model).__name__} is a subclassed model; only "
            "Sequential and Functional models (nested or not) have a graph to prune."
        )
    return model
