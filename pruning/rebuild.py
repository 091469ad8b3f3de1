"""Physically removes filters: PrunePlan + model -> a new, smaller Keras model.

The new model is an ordinary Functional model built from the old layers' configs
(with smaller `filters`), so it saves to `.keras` and loads anywhere without custom
objects. Nested models are inlined: the result is one flat graph whose layers keep
their names. Every tensor's kept channels are derived from where its channels come
from (`CNNModel.channel_selector`), and each layer is rebuilt and sliced by its
handler (`pruning.handlers`), so a selection flows through pooling, activations,
BatchNormalization, Flatten, Concatenate, Add and keras.ops into the next weighted layer.
"""

import warnings

import keras
import numpy as np

from pruning.graph import CNNModel
from pruning.handlers import handler_for
from pruning.plan import PrunePlan


def prune(model, plan, allow_inexact=False):
    """Returns a new model without the filters `plan` removes (weights copied).

    Args:
        model: a built keras.Model (or CNNModel).
        plan: a `PrunePlan`, or a dict {conv name: kept indices}.
        allow_inexact: also prune convs that feed layers whose output then changes
            (LayerNormalization over channels). The change on a random batch is
            measured and reported with a warning.
    """
    if not isinstance(plan, PrunePlan):
        plan = PrunePlan(plan)
    allow_inexact = bool(allow_inexact or plan.meta.get("allow_inexact"))
    cnn = CNNModel.of(model, allow_inexact)
    plan.validate(cnn)  # every error is raised here, before anything is built
    keep = {n: np.asarray(k) for n, k in plan.keep.items() if len(k) < cnn.conv(n).filters}
    kept = cnn.channel_selector(keep)
    conv_name = {id(c.layer): c.name for c in cnn.conv_layers}  # names are distinct there

    new_inputs = [
        keras.Input(shape=cnn.shapes[k][1:], dtype=dt, name=name)
        for k, dt, name in zip(cnn.input_keys, cnn.input_dtypes, cnn.input_names)
    ]
    built = {}  # id(old layer) -> (new layer, input selection signature)
    used_names = set(cnn.input_names)
    touched = []  # inexact layers that lose channels

    def call_fn(call, args, kwargs):
        layer = call.layer
        in_keep = kept(call.inputs[0]) if call.inputs else None
        out_keep = keep.get(conv_name[id(layer)]) if id(layer) in conv_name else None
        if in_keep is not None and layer.name in cnn.inexact_layers:
            touched.append(layer.name)
        signature = (None if in_keep is None else in_keep.tobytes(),
                     None if out_keep is None else out_keep.tobytes())
        # A layer without weights works on any number of channels: a shared activation or
        # pooling layer gets one copy per selection it is called on.
        key = id(layer) if getattr(layer, "weights", None) else (id(layer), signature)
        if key in built:
            new, sig = built[key]
            if sig != signature:
                raise ValueError(f"Shared layer '{layer.name}' of class {type(layer).__name__} holds "
                                 "weights and is called on tensors pruned differently; exclude the "
                                 "convs that feed it, or prune them alike.")
            return new(*args, **kwargs)
        new, outputs = handler_for(layer).rebuild(
            layer, args, kwargs, in_keep, out_keep, _unique(layer.name, used_names))
        built[key] = (new, signature)
        return outputs

    carried = _tensor_attributes(cnn)
    extra = [k for _, keys in carried for k in keras.tree.flatten(keys)]
    values = cnn.walk(new_inputs, call_fn, cnn.output_keys + extra)
    outputs, extra_values = values[:len(cnn.output_keys)], values[len(cnn.output_keys):]
    fm = cnn.functional
    pruned = keras.Model(
        inputs=keras.tree.pack_sequence_as(fm._inputs_struct, new_inputs),
        outputs=keras.tree.pack_sequence_as(fm._outputs_struct, outputs),
        name=cnn.model.name,
    )
    _carry_over(cnn.model, pruned, carried, extra_values)
    if touched:
        change = output_change(cnn.model, pruned)
        warnings.warn(
            f"Pruned inexactly through {', '.join(touched)}: the outputs changed by "
            f"{change:.3g} (max abs difference relative to the output scale, one random batch).",
            stacklevel=2,
        )
    return pruned


def _plain(model):
    """True for a model of Keras' own classes, which the rebuilt Functional model replaces whole."""
    return type(model) in (keras.Model, keras.Sequential) or type(model).__name__ == "Functional"


def _tensor_attributes(cnn):
    """[(attribute, its tensors' keys)] for the attributes of a subclassed model that hold
    tensors of its graph (keras-hub's `pyramid_outputs`), so the pruned model gets them too."""
    model = cnn.model
    if _plain(model):
        return []
    found = []
    for attr, value in vars(model).items():
        if attr.startswith("_"):
            continue
        try:
            leaves = keras.tree.flatten(value) if isinstance(value, (dict, list, tuple)) else [value]
        except (TypeError, ValueError):  # a structure the tree utilities cannot walk
            continue
        if not leaves or \
                not all(isinstance(t, keras.KerasTensor) for t in leaves):
            continue
        keys = [cnn.key_of(t) for t in leaves]
        if all(k is not None for k in keys):
            found.append((attr, keras.tree.pack_sequence_as(value, keys)))
    return found


def _carry_over(model, pruned, carried, values):
    """Sets the tensor attributes on `pruned`, and warns that the model's class is dropped."""
    if _plain(model):
        return
    it = iter(values)
    for attr, keys in carried:
        setattr(pruned, attr, keras.tree.pack_sequence_as(keys, [next(it) for _ in keras.tree.flatten(keys)]))
    kept = [attr for attr, _ in carried]
    warnings.warn(
        f"Model '{model.name}' of class {type(model).__name__} is rebuilt as a plain Functional "
        "model with the same inputs, outputs and output structure; what its class adds (its own "
        "methods such as train_step or from_preset, its constructor config) is not carried over"
        + (f"; its tensor attributes {', '.join(kept)} are set on the pruned model (not saved "
           "with it)" if kept else "")
        + ". See docs/engine.md, 'Subclassed models and keras-hub'.",
        stacklevel=3,
    )


def output_change(model, pruned, batch_size=2, seed=0):
    """Max abs difference of the two models' outputs on one random normal batch,
    relative to the largest abs output of `model`."""
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(seed).normal(size=(batch_size, *shape)).astype("float32")
    a = np.concatenate([np.ravel(keras.ops.convert_to_numpy(t))
                        for t in keras.tree.flatten(model(x, training=False))])
    b = np.concatenate([np.ravel(keras.ops.convert_to_numpy(t))
                        for t in keras.tree.flatten(pruned(x, training=False))])
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12))


def inline(model):
    """A flat copy of `model` with nested models inlined and nothing pruned."""
    return prune(model, PrunePlan({}))


def slice_weights(layer, in_keep, out_keep):
    """`layer`'s weights restricted to input channels `in_keep` and filters `out_keep`
    (None: all). The order is that of `layer.get_weights()`."""
    return handler_for(layer).slice_weights(layer, layer.get_weights(), in_keep, out_keep)


def _unique(name, used):
    candidate, i = name, 1
    while candidate in used:
        candidate = f"{name}_{i}"
        i += 1
    used.add(candidate)
    return candidate
