"""Inference exports of a (pruned) model: BatchNorm folded into convs, activations
fused, and serving formats.

    fast = fold_batchnorm(pruned)              # plain keras.Model, same outputs
    export_saved_model(fast, "serve/")         # TensorFlow Serving / tf.saved_model.load
    export_litert(fast, "model.tflite")        # LiteRT (ai-edge-litert interpreter)

Folding is exact up to float rounding: a BN after a conv (or Dense) computes
gamma * (x - mean) / sqrt(var + eps) + beta per channel, an affine map that is absorbed
by scaling the kernel's output channels and shifting the bias. The folded model is for
inference only (there are no BN statistics left to train).
"""

import os

import keras
import numpy as np

from pruning.graph import CNNModel

# Layers whose output channels (last kernel axis) a following BN can be folded into.
FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)


def fold_batchnorm(model, fuse_activations=True):
    """A new keras.Model with every foldable BatchNormalization merged into the conv
    or Dense before it (and, with `fuse_activations`, a directly following ReLU /
    Activation set as that layer's activation). Other layers are shared, not copied.

    A BN is folded when it reads only the output of a Conv1D/2D/3D or Dense with no
    activation of its own, normalises the last axis, and that output has no other
    reader. Returns a model that loads with `keras.models.load_model` unaided.
    """
    cnn = CNNModel(model)
    readers = {}
    for call in cnn.calls:
        for k in call.inputs:
            readers.setdefault(k, []).append(call)

    def only_reader(call):
        rs = readers.get(call.outputs[0], [])
        return rs[0] if len(rs) == 1 and len(call.outputs) == 1 and call.outputs[0] not in cnn.output_keys \
            else None

    replace, skip = {}, set()  # id(conv call) -> new layer; ids of calls become identity
    for call in cnn.calls:
        layer = call.layer
        if type(layer) not in FOLDABLE or layer.activation is not keras.activations.linear:
            continue
        bn = only_reader(call)
        if bn is None or not _foldable_bn(bn.layer, len(cnn.shapes[bn.inputs[0]])):
            continue
        act, act_call = None, only_reader(bn) if fuse_activations else None
        if act_call is not None:
            act = _activation_name(act_call.layer)
        replace[id(call)] = _folded_layer(layer, bn.layer, act, cnn.shapes[call.inputs[0]])
        skip.add(id(bn))
        if act is not None:
            skip.add(id(act_call))

    def call_fn(call, args, kwargs):
        if id(call) in skip:
            return args[0]
        if id(call) in replace:
            return replace[id(call)](args[0])
        return call.layer(*args, **kwargs)

    inputs = symbolic_inputs(cnn)
    outputs = cnn.walk(inputs, call_fn)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0],
                       outputs if len(outputs) > 1 else outputs[0], name=f"{model.name}_folded")


def symbolic_inputs(cnn):
    """Fresh `keras.Input`s like the model's, to re-call its traced graph on."""
    return [keras.Input(cnn.shapes[k][1:], dtype=d, name=n)
            for k, d, n in zip(cnn.input_keys, cnn.input_dtypes, cnn.input_names)]


def _foldable_bn(layer, ndim):
    return isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (-1, ndim - 1)


def _activation_name(layer):
    """The activation name a conv can take over from `layer`, or None."""
    if isinstance(layer, keras.layers.ReLU):
        plain = layer.max_value is None and not layer.negative_slope and not layer.threshold
        return "relu" if plain else None
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        return name if isinstance(name, str) else None
    return None


def _folded_layer(layer, bn, activation, in_shape):
    """A copy of `layer` (config and weights) with `bn` folded in and `activation`."""
    config = layer.get_config()
    config.update(use_bias=True, activation=activation or "linear", name=f"{layer.name}_{bn.name}")
    new = type(layer).from_config(config)
    new.build(in_shape)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    bias = (keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.use_bias
            else np.zeros(kernel.shape[-1]))

    def value(weight, default):
        return default if weight is None else keras.ops.convert_to_numpy(weight).astype(np.float64)

    n = kernel.shape[-1]
    scale = value(bn.gamma, np.ones(n)) / np.sqrt(value(bn.moving_variance, None) + bn.epsilon)
    shift = value(bn.beta, np.zeros(n)) - value(bn.moving_mean, None) * scale
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    new.set_weights([(kernel * scale).astype(dtype), (bias * scale + shift).astype(dtype)])
    return new


def export_saved_model(model, path):
    """Writes a TensorFlow SavedModel with a `serve` endpoint (TensorFlow Serving,
    `tf.saved_model.load(path).serve(x)`). Needs the TensorFlow backend or package."""
    model.export(os.fspath(path), format="tf_saved_model", verbose=False)
    return os.fspath(path)


def export_litert(model, path):
    """Writes a LiteRT (.tflite) flatbuffer of `model`; run it with
    `ai_edge_litert.interpreter.Interpreter`. Needs TensorFlow's converter."""
    path = os.fspath(path)
    try:
        model.export(path, format="litert", verbose=False)
    except TypeError:  # Keras versions whose LiteRT export takes no `verbose`
        model.export(path, format="litert")
    if not os.path.exists(path):
        raise ValueError(f"LiteRT export wrote nothing at {path!r}.")
    return path
