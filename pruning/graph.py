"""The prunable structure of a Keras model.

`CNNModel` flattens a built Keras model (Sequential, Functional, or one that nests
other models as layers) into one list of layer calls in topological order, and
traces where every channel of every tensor comes from. That trace tells

* which convolutions can be pruned (`CNNModel.conv_layers`),
* which convolutions must share one filter selection because an `Add`-like layer
  mixes their channels elementwise (`CNNModel.groups`), and which filter of one
  matches which filter of the other (`CNNModel.channel_group`),
* which layers consume a convolution's channels (`ConvLayer.consumers`),
* which layer stops a convolution from being pruned (`ConvLayer.blocked_by`).
"""

import hashlib
from dataclasses import dataclass, field

import keras
import numpy as np

from pruning.handlers import (  # noqa: F401 (public here too)
    OpaqueLayerError, channel_count, handler_for, hidden_convs, is_producer)

# A channel's origin is encoded as conv_index * _STRIDE + filter_index, or _NO_ORIGIN
# when the channel does not come from a prunable convolution (input pixels, Dense
# outputs...). 2**24 filters per layer is far beyond any real network. The encoding
# is private to this module: handlers see the labels as opaque, and other modules
# ask `CNNModel.channel_selector` / `CNNModel.channel_positions`.
_STRIDE = 1 << 24
_NO_ORIGIN = -1


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


@dataclass
class OpaqueLayer:
    """A layer the engine cannot see into, and the convolutions it hides."""

    name: str
    class_name: str
    reason: str
    convs: list  # names of the producer layers inside it

    @property
    def message(self):
        n = len(self.convs)
        return (f"{n} conv{'s' if n != 1 else ''} inside '{self.name}' ({self.class_name}) "
                f"not visible: {self.reason}")


@dataclass
class ChannelGroup:
    """Convolutions whose filters are tied by elementwise merges, and how.

    Their filters fall into `n_classes` classes: filters in one class meet in some
    `Add`/`Multiply` and must be kept or removed together. `classes[name][f]` is the
    class of filter `f` of conv `name`. When a grouped convolution reads or makes
    these channels, `segments[c]` is the group of class `c`, and every segment must
    keep the same number of classes (None: no such constraint).
    """

    names: tuple
    classes: dict
    n_classes: int
    segments: object = None

    @property
    def n_segments(self):
        """How many groups of a grouped convolution split the classes (1: none)."""
        return 1 if self.segments is None else int(self.segments.max()) + 1


class CNNModel:
    """A built Keras model seen as a graph of prunable convolutions.

    Args:
        model: a built `keras.Model` (Sequential, Functional, or nesting either).
        allow_inexact: also pass channel selections through layers whose output then
            changes, such as LayerNormalization over channels (listed in
            `inexact_layers`); `prune` reports the measured change.
    """

    def __init__(self, model, allow_inexact=False):
        if isinstance(model, CNNModel):
            allow_inexact = allow_inexact or model.allow_inexact
            model = model.model
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"Expected a keras.Model. Received: model={model!r} of type {type(model).__name__}"
            )
        self.model = model
        self.allow_inexact = bool(allow_inexact)
        self.inexact_layers = []
        self.calls = []
        self.shapes = {}  # canonical key -> shape tuple (batch axis included)
        self._alias = {}  # id(tensor) -> (canonical key, where it was aliased)
        self._subgraphs = []
        self.opaque = []  # OpaqueLayer: layers that hide convolutions from the engine
        fm = _functional(model)
        self.functional = fm
        self.input_keys = [self._key(t) for t in fm.inputs]
        for t in fm.inputs:
            self.shapes[self._key(t)] = tuple(t.shape)
        self.input_names = [t._keras_history.operation.name for t in fm.inputs]
        self.input_dtypes = [t.dtype for t in fm.inputs]
        self._trace(fm)
        self.output_keys = [self._key(t) for t in fm.outputs]
        self._analyse()

    @classmethod
    def of(cls, model, allow_inexact=False):
        """`model` itself when it is a CNNModel allowing at least `allow_inexact`, else a
        CNNModel of it: what every function taking "a keras.Model or CNNModel" calls."""
        if isinstance(model, CNNModel) and model.allow_inexact >= bool(allow_inexact):
            return model
        return cls(model, allow_inexact=allow_inexact)

    # ------------------------------------------------------------------ trace
    def _key(self, tensor):
        k = id(tensor)
        while k in self._alias:
            k = self._alias[k][0]
        return k

    def _set_alias(self, tensor, target, where):
        """Makes `tensor` stand for the canonical key `target`. A model called on its own
        input (a keras-hub task's `backbone(backbone.input)`) aliases a tensor to itself:
        nothing to do. Any other alias that would close a loop is an error naming the layer
        and the tensor, so `_key` always ends."""
        k = id(tensor)
        if k == target:
            return
        seen, j = {k}, target
        while j in self._alias:
            if j in seen:
                break
            seen.add(j)
            j = self._alias[j][0]
        if j in seen:
            raise ValueError(
                f"Cannot trace {where}: tensor '{getattr(tensor, 'name', tensor)}' would stand for "
                "itself through a cycle of nested calls. Received: a graph with a cycle at this tensor"
            )
        self._alias[k] = (target, where)

    def _trace(self, fm):
        for depth in sorted(fm._nodes_by_depth, reverse=True):
            for node in fm._nodes_by_depth[depth]:
                if node.is_input or node.operation is None:
                    continue
                op = node.operation
                inner = self._subgraph(op, node)
                if inner is not None:
                    where = f"layer '{op.name}' of class {type(op).__name__}"
                    if len(inner.inputs) != len(node.input_tensors):
                        raise ValueError(
                            f"Cannot inline {where}: it was called with "
                            f"{len(node.input_tensors)} tensors for {len(inner.inputs)} inputs."
                        )
                    if len(inner.outputs) != len(node.outputs):
                        raise ValueError(
                            f"Cannot inline {where}: its graph has {len(inner.outputs)} outputs "
                            f"and its call {len(node.outputs)}."
                        )
                    for inner_in, outer_in in zip(inner.inputs, node.input_tensors):
                        self._set_alias(inner_in, self._key(outer_in), where)
                    self._trace(inner)
                    for outer_out, inner_out in zip(node.outputs, inner.outputs):
                        self._set_alias(outer_out, self._key(inner_out), where)
                    continue
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

    def _subgraph(self, op, node):
        """The graph to inline for this call (a nested model, or a composite layer's
        call traced on symbolic tensors), or None to keep it as one call. A layer that
        hides convolutions and cannot be traced is recorded in `opaque`."""
        try:
            inner = handler_for(op).subgraph(op, node)
        except OpaqueLayerError as e:
            hidden = hidden_convs(op)
            if hidden:
                self.opaque.append(OpaqueLayer(op.name, type(op).__name__, str(e), hidden))
            return None
        if inner is not None:
            self._subgraphs.append(inner)  # keep its tensors alive: keys are their ids
        return inner

    # ---------------------------------------------------------------- analyse
    def _analyse(self):
        t = _Tracer(self)
        origins = {k: np.full(channel_count(self.shapes[k]), _NO_ORIGIN, np.int64) for k in self.input_keys}
        for call in self.calls:
            ins = [origins[k] for k in call.inputs]
            outs = t.run(call, ins)
            for k, o in zip(call.outputs, outs):
                origins[k] = o
        at_output = set()
        for k in self.output_keys:
            # The classifier is never pruned: channels that reach a model output stay.
            at_output |= _sources(origins[k])
            t.block(_sources(origins[k]), "its channels reach a model output")
        self.origins = origins
        self._finish(t, at_output)

    def _finish(self, t, at_output):
        """Turns the trace into convs, their tied groups and the filter classes of each."""
        roots = [np.array([t.ties.find(i * _STRIDE + f) for f in range(t.filters[i])], np.int64)
                 for i in range(len(t.convs))]
        group_of, members = _conv_groups(roots)
        classes = {g: _filter_classes(roots, ms) for g, ms in members.items()}
        segments = _segments(t, group_of, members, classes)
        _block_whole_groups(t, members)
        self._make_convs(t, at_output, group_of, members, classes, segments)

    def _make_convs(self, t, at_output, group_of, members, classes, segments):
        """Sets `conv_layers` and the `ChannelGroup` of every conv."""
        self.conv_layers = []
        self._channel_groups = {}
        conv_names = _distinct([call.layer.name for call in t.convs])
        for i, call in enumerate(t.convs):
            layer = call.layer
            ms = members[group_of[i]]
            self.conv_layers.append(ConvLayer(
                name=conv_names[i],
                layer=layer,
                index=i,
                filters=t.filters[i],
                kernel_size=tuple(getattr(layer, "kernel_size", ())),
                consumers=sorted(t.consumers.get(i, ())),
                group=tuple(conv_names[j] for j in ms),
                blocked_by=t.blocked.get(i, ""),
                feeds_output=bool(at_output & set(ms)),
            ))
        for g, ms in members.items():
            class_of, index = classes[g]
            names = tuple(conv_names[j] for j in ms)
            info = ChannelGroup(names, {conv_names[j]: class_of[j] for j in ms}, len(index), segments.get(g))
            for name in names:
                self._channel_groups[name] = info
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

    def key_of(self, tensor):
        """The traced key of a KerasTensor of the model's graph, or None when it has none."""
        k = self._key(tensor)
        return k if k in self.shapes else None

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

    def channel_group(self, name):
        """The `ChannelGroup` of conv `name`: its tied convs and how their filters match."""
        return self._channel_groups[self.conv(name).name]

    def channel_selector(self, keep):
        """A function: tensor key -> indices of its channels that survive `keep`
        ({conv name: kept filter indices}), or None when all of them do."""
        removed = [self.conv(n).index * _STRIDE +
                   np.setdiff1d(np.arange(self.conv(n).filters), np.asarray(k, np.int64))
                   for n, k in keep.items()]
        removed = np.concatenate(removed) if removed else np.zeros(0, np.int64)

        def kept(key):
            mask = ~np.isin(self.origins[key], removed)
            return None if mask.all() else np.nonzero(mask)[0]

        return kept

    def channel_positions(self, key, name, filters):
        """Positions in tensor `key` of the channels made by `filters` of conv `name`."""
        conv = self.conv(name)
        ids = conv.index * _STRIDE + np.asarray(filters, np.int64)
        return np.nonzero(np.isin(self.origins[key], ids))[0]

    def channel_counts(self, key):
        """(channels of tensor `key` made by no prunable conv, an array with how many
        of its channels each conv made, indexed by `ConvLayer.index`)."""
        origin = self.origins[key]
        made = np.bincount(origin[origin >= 0] // _STRIDE, minlength=len(self.conv_layers))
        return int((origin < 0).sum()), made

    @property
    def fingerprint(self):
        """A short hash of the convolutions' names, filter counts and kernel shapes:
        two models with the same fingerprint accept the same plans."""
        text = ";".join(
            f"{c.name}:{c.filters}:{tuple(c.layer.kernel.shape) if hasattr(c.layer, 'kernel') else ()}"
            for c in self.conv_layers
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self):
        rows = [f"{'#':>3} {'layer':<24} {'filters':>7} {'kernel':<10} status"]
        for c in self.conv_layers:
            tied = f" (tied: {', '.join(g for g in c.group if g != c.name)})" if len(c.group) > 1 else ""
            status = "prunable" + tied if c.prunable else f"blocked: {c.blocked_by}"
            rows.append(f"{c.index:>3} {c.name:<24} {c.filters:>7} {str(c.kernel_size):<10} {status}")
        for o in self.opaque:
            rows.append(f"  - {o.message}: {', '.join(o.convs)}")
        return "\n".join(rows)


def leaf_layers(model):
    """Every layer of `model` that is not itself a model, nested models walked in order."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


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


def _distinct(names):
    """The names, with `_1`, `_2`... added to the second and later uses of one name (two
    nested models or blocks may name their convs alike), avoiding every name in use."""
    taken, seen, out = set(names), set(), []
    for name in names:
        candidate, i = name, 0
        while candidate in seen or (i and candidate in taken):
            i += 1
            candidate = f"{name}_{i}"
        seen.add(candidate)
        out.append(candidate)
    return out


def _sources(origin):
    """Indices of the convs that made the channels labelled `origin`."""
    o = origin[origin >= 0]
    return set((o // _STRIDE).tolist())


def _conv_groups(roots):
    """({conv index: its group}, {group: conv indices in order}): convs are in one
    group when any of their filters are tied (`roots[i]`: the tie root of each filter
    of conv i)."""
    convs = _UnionFind()
    first_conv = {}
    for i, r in enumerate(roots):
        for root in r.tolist():
            convs.union(first_conv.setdefault(root, i), i)
    group_of = {i: convs.find(i) for i in range(len(roots))}
    members = {}
    for i, g in group_of.items():
        members.setdefault(g, []).append(i)
    return group_of, members


def _filter_classes(roots, ms):
    """({conv index: class of each filter}, {tie root: class}) for the convs `ms` of one
    group: tied filters share a class, numbered in order of first appearance."""
    index, class_of = {}, {}
    for i in ms:
        class_of[i] = np.array([index.setdefault(r, len(index)) for r in roots[i].tolist()])
    return class_of, index


def _segments(t, group_of, members, classes):
    """{group: segment of each class} for the groups read by grouped convolutions (each
    segment must keep an equal count); a grouped conv whose channels cannot be split so
    blocks the convs it reads."""
    segments = {}
    for g in members:
        index = classes[g][1]
        for ids, count, what in t.segments:
            tracked = ids >= 0
            if not tracked.any():
                continue
            fed = _sources(ids)
            if group_of[next(iter(fed))] != g:
                continue
            reason = None
            if not tracked.all() or len({group_of[i] for i in fed}) > 1:
                reason = f"{what} mixes channels of several groups of convs"
            else:
                cls = np.array([index[t.ties.find(int(c))] for c in ids])
                if len(set(cls.tolist())) != len(ids) or len(ids) != len(index) or len(ids) % count:
                    reason = f"{what} reads channels that cannot be split into {count} equal groups"
                else:
                    labels = np.empty(len(index), np.int64)
                    labels[cls] = np.arange(len(ids)) // (len(ids) // count)
                    if g in segments and not np.array_equal(segments[g], labels):
                        reason = f"{what} groups channels differently from another grouped conv"
                    segments[g] = labels
            if reason:
                t.block(fed, reason)
    return segments


def _block_whole_groups(t, members):
    """A blocked member blocks its whole group: the indices must stay aligned."""
    for ms in members.values():
        culprit = next((i for i in ms if i in t.blocked), None)
        if culprit is not None:
            for i in ms:
                t.blocked.setdefault(i, f"it is tied to '{t.convs[culprit].layer.name}', "
                                        f"which cannot be pruned: {t.blocked[culprit]}")


class _UnionFind:
    """Disjoint sets of hashable items; an item not yet joined is a set of its own."""

    def __init__(self):
        self.parent = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a, b):
        """Joins the sets of `a` and `b` (the root of `a`'s stays the root)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _Tracer:
    """Runs every call's handler over channel labels, collecting convs, ties,
    grouped-conv constraints and the reasons convs cannot be pruned."""

    def __init__(self, cnn):
        self.cnn = cnn
        self.convs, self.filters = [], []
        self.ties = _UnionFind()  # channel labels that must be kept or removed together
        self.blocked = {}  # conv index -> reason
        self.consumers = {}  # conv index -> set of layer names
        self.segments = []  # (labels, groups, what)

    def block(self, conv_ids, reason):
        for i in conv_ids:
            self.blocked.setdefault(i, reason)

    def run(self, call, ins):
        for i in set().union(*(_sources(o) for o in ins)) if ins else ():
            self.consumers.setdefault(i, set()).add(call.layer.name)
        ctx = _Context(self, call, ins)
        outs = handler_for(call.layer).channels(call.layer, ctx)
        if len(outs) != len(call.outputs) or any(
                len(o) != channel_count(ctx.out_shapes[j]) for j, o in enumerate(outs)):
            raise ValueError(
                f"The handler of layer '{call.layer.name}' of class {type(call.layer).__name__} "
                f"returned channels for shapes {[len(o) for o in outs]}; its outputs have "
                f"{[channel_count(s) for s in ctx.out_shapes]} channels."
            )
        return [np.asarray(o, np.int64) for o in outs]


class _Context:
    """What a handler sees of one call: its inputs' channel labels and shapes, and
    the operations it may ask for. The labels are opaque to it."""

    def __init__(self, tracer, call, ins):
        self._t = tracer
        self._call = call
        self.node = call.node
        self.inputs = ins
        self.in_shapes = [tracer.cnn.shapes[k] for k in call.inputs]
        self.out_shapes = [tracer.cnn.shapes[k] for k in call.outputs]
        self.allow_inexact = tracer.cnn.allow_inexact

    @property
    def _name(self):
        return f"layer '{self._call.layer.name}' of class {type(self._call.layer).__name__}"

    @staticmethod
    def tracked(labels):
        """True when some of these channels come from a prunable convolution."""
        return bool((np.asarray(labels) >= 0).any())

    @staticmethod
    def untracked(n):
        """Labels for `n` channels that no convolution's pruning touches."""
        return np.full(int(n), _NO_ORIGIN, np.int64)

    def new_filters(self):
        """Makes this call's layer a prunable producer; labels of its output filters."""
        t, layer = self._t, self._call.layer
        if any(c.layer is layer for c in t.convs):
            raise ValueError(f"Shared convolution '{layer.name}' is called more than once; "
                             "only layers called once can be pruned.")
        i, n = len(t.convs), int(self.out_shapes[0][-1])
        t.convs.append(self._call)
        t.filters.append(n)
        return i * _STRIDE + np.arange(n, dtype=np.int64)

    def tie(self, arrays):
        """Channel j of every array must be kept or removed together."""
        arrays = [np.asarray(a) for a in arrays]
        for other in arrays[1:]:
            for a, b in zip(arrays[0].tolist(), other.tolist()):
                if (a < 0) != (b < 0):
                    self._t.block(_sources(np.array([a, b])),
                                  f"{self._name} mixes its channels elementwise with channels "
                                  "that do not come from a prunable convolution")
                elif a >= 0:
                    self._t.ties.union(a, b)

    def segment(self, labels, groups, what):
        """These channels split into `groups` equal runs that must keep equal counts."""
        self._t.segments.append((np.asarray(labels, np.int64), int(groups), what))

    def block(self, reason):
        """No conv whose channels reach this call can be pruned; untracked outputs."""
        self._t.block(set().union(*(_sources(o) for o in self.inputs)), reason)
        return [self.untracked(channel_count(s)) for s in self.out_shapes]

    def inexact(self, reason):
        """True when the model allows an inexact pass here (it is recorded); else
        blocks the convs reaching this call with `reason` and returns False."""
        if self.allow_inexact:
            if self._call.layer.name not in self._t.cnn.inexact_layers:
                self._t.cnn.inexact_layers.append(self._call.layer.name)
            return True
        self.block(reason)
        return False
