"""Physically removes filters: PrunePlan + model -> a new, smaller Keras model.

The new model is an ordinary Functional model built from the old layers' configs
(with smaller `filters`), so it saves to `.keras` and loads anywhere without custom
objects. Nested models are inlined: the result is one flat graph whose layers keep
their names. Every tensor's kept channels are derived from where its channels come
from (`CNNModel.origins`), so a selection flows through pooling, activations,
BatchNormalization, Flatten, Concatenate and Add into the next weighted layer.
"""

import keras
import numpy as np

from pruning.graph import _STRIDE, CNNModel, _is_conv, is_producer
from pruning.plan import PrunePlan


def prune(model, plan):
    """Returns a new model without the filters `plan` removes (weights copied).

    Args:
        model: a built keras.Model (or CNNModel).
        plan: a `PrunePlan`, or a dict {conv name: kept indices}.
    """
    cnn = model if isinstance(model, CNNModel) else CNNModel(model)
    if not isinstance(plan, PrunePlan):
        plan = PrunePlan(plan)
    plan.validate(cnn)  # every error is raised here, before anything is built
    keep = {cnn.conv(n).index: np.asarray(k) for n, k in plan.keep.items()
            if len(k) < cnn.conv(n).filters}

    def kept(key):
        """Indices of the channels of tensor `key` that survive, or None for all."""
        origin = cnn.origins[key]
        conv_ids = np.where(origin >= 0, origin // _STRIDE, -1)
        mask = np.ones(origin.shape[0], bool)
        for i, k in keep.items():
            sel = conv_ids == i
            if sel.any():
                mask[sel] = np.isin(origin[sel] % _STRIDE, k)
        return None if mask.all() else np.nonzero(mask)[0]

    new_inputs = [
        keras.Input(shape=cnn.shapes[k][1:], dtype=dt, name=name)
        for k, dt, name in zip(cnn.input_keys, cnn.input_dtypes, cnn.input_names)
    ]
    built = {}  # id(old layer) -> (new layer, input selection signature)
    used_names = set(cnn.input_names)

    def call_fn(call, args, kwargs):
        layer = call.layer
        in_keep = kept(call.inputs[0]) if call.inputs else None
        out_keep = None
        if is_producer(layer):
            conv = cnn.conv(layer.name)
            out_keep = keep.get(conv.index)
        signature = (None if in_keep is None else in_keep.tobytes(),
                     None if out_keep is None else out_keep.tobytes())
        if id(layer) in built:
            new, sig = built[id(layer)]
            if sig != signature:
                raise ValueError(f"Shared layer '{layer.name}' is called on tensors pruned differently.")
            return new(*args, **kwargs)
        config = layer.get_config()
        if out_keep is not None:
            config["filters"] = int(len(out_keep))
        config["name"] = _unique(layer.name, used_names)
        new = type(layer).from_config(config)
        outputs = new(*args, **kwargs)
        new.set_weights(slice_weights(layer, in_keep, out_keep))
        built[id(layer)] = (new, signature)
        return outputs

    outputs = cnn.walk(new_inputs, call_fn)
    return keras.Model(
        inputs=new_inputs[0] if len(new_inputs) == 1 else new_inputs,
        outputs=outputs[0] if len(outputs) == 1 else outputs,
        name=cnn.model.name,
    )


def inline(model):
    """A flat copy of `model` with nested models inlined and nothing pruned."""
    return prune(model, PrunePlan({}))


def slice_weights(layer, in_keep, out_keep):
    """`layer`'s weights restricted to input channels `in_keep` and filters `out_keep`
    (None: all). The order is that of `layer.get_weights()`."""
    weights = layer.get_weights()
    if in_keep is None and out_keep is None:
        return weights

    def take(w, idx, axis):
        return w if idx is None else np.take(w, idx, axis=axis)

    if _is_conv(layer):  # kernel (*spatial, in, out), bias (out,)
        out = [take(take(weights[0], in_keep, -2), out_keep, -1)]
        return out + [take(b, out_keep, 0) for b in weights[1:]]
    if isinstance(layer, keras.layers.SeparableConv2D):
        # depthwise (h, w, in, m), pointwise (1, 1, in * m, out), bias (out,)
        m = layer.depth_multiplier
        rows = None if in_keep is None else _expand(in_keep, m)
        out = [take(weights[0], in_keep, 2), take(take(weights[1], rows, 2), out_keep, -1)]
        return out + [take(b, out_keep, 0) for b in weights[2:]]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # kernel (h, w, in, m), bias (in * m,)
        m = layer.depth_multiplier
        return [take(weights[0], in_keep, 2)] + [take(b, _expand(in_keep, m), 0) for b in weights[1:]]
    if isinstance(layer, keras.layers.BatchNormalization):  # gamma, beta, mean, var: (C,)
        return [take(w, in_keep, 0) for w in weights]
    if isinstance(layer, keras.layers.Dense):  # kernel (in, units), bias (units,)
        return [take(weights[0], in_keep, 0)] + weights[1:]
    if weights:
        raise ValueError(
            f"Cannot slice the weights of layer '{layer.name}' of class {type(layer).__name__}."
        )
    return weights


def _expand(idx, multiplier):
    """Channel c with depth multiplier m becomes rows c*m .. c*m+m-1."""
    return (np.asarray(idx)[:, None] * multiplier + np.arange(multiplier)).reshape(-1)


def _unique(name, used):
    candidate, i = name, 1
    while candidate in used:
        candidate = f"{name}_{i}"
        i += 1
    used.add(candidate)
    return candidate
