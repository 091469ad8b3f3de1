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
    cnn = model if isinstance(model, CNNModel) and model.allow_inexact >= allow_inexact \
        else CNNModel(model, allow_inexact=allow_inexact)
    plan.validate(cnn)  # every error is raised here, before anything is built
    keep = {n: np.asarray(k) for n, k in plan.keep.items() if len(k) < cnn.conv(n).filters}
    kept = cnn.channel_selector(keep)
    producers = {c.layer.name for c in cnn.conv_layers}

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
        out_keep = keep.get(layer.name) if layer.name in producers else None
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

    outputs = cnn.walk(new_inputs, call_fn)
    pruned = keras.Model(
        inputs=new_inputs[0] if len(new_inputs) == 1 else new_inputs,
        outputs=outputs[0] if len(outputs) == 1 else outputs,
        name=cnn.model.name,
    )
    if touched:
        change = output_change(cnn.model, pruned)
        warnings.warn(
            f"Pruned inexactly through {', '.join(touched)}: the outputs changed by "
            f"{change:.3g} (max abs difference relative to the output scale, one random batch).",
            stacklevel=2,
        )
    return pruned


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
