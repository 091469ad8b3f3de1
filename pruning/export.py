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
    cnn = CNNModel.of(model)
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


def export_litert(model, path, quantize="none", calibration_images=None):
    """Writes a LiteRT (.tflite) flatbuffer of `model`; run it with
    `ai_edge_litert.interpreter.Interpreter`. Needs TensorFlow's converter.

    quantize: see `export_model`; a LiteRT op that cannot be quantized (dynamic, int8) is
    a ValueError naming it."""
    path = os.fspath(path)
    options = _litert_options(quantize, calibration_images)
    try:
        try:
            model.export(path, format="litert", verbose=False, **options)
        except TypeError:  # Keras versions whose LiteRT export takes no `verbose`
            model.export(path, format="litert", **options)
    except Exception as e:  # the converter's errors (ConverterError and others) name the op in their text
        if quantize in ("none", "float16"):
            raise
        raise ValueError(_quantize_error(e, quantize)) from None
    if not os.path.exists(path):
        raise ValueError(f"LiteRT export wrote nothing at {path!r}.")
    return path


def _litert_options(quantize, calibration_images):
    """The converter options of `model.export(format="litert")` for a quantization."""
    if quantize == "none":
        return {}
    import tensorflow as tf

    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    if quantize == "int8":
        images = np.asarray(calibration_images, np.float32)

        def representative():
            for i in range(len(images)):
                yield [images[i:i + 1]]

        options["representative_dataset"] = representative
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


# ------------------------------------------------------------------ serving files
from pruning.choices import EXPORT_FORMATS as FORMATS, QUANTIZATIONS  # noqa: E402  (importable without Keras)


def check_export(format, quantize="none", calibration_images=None):
    """One-line ValueErrors for a format, quantization or calibration set that cannot work."""
    if format not in FORMATS:
        raise ValueError(f"Expected format in {FORMATS}. Received: format={format!r}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Expected quantize in {QUANTIZATIONS}. Received: quantize={quantize!r}")
    if quantize != "none" and format != "litert":
        raise ValueError(f"Quantization is a LiteRT option: use format='litert' or quantize='none'. "
                         f"Received: format={format!r}, quantize={quantize!r}")
    if quantize == "int8" and calibration_images is not None and len(calibration_images) == 0:
        raise ValueError("int8 quantization needs calibration images (a representative dataset). Received: 0 images")
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import tf2onnx  # noqa: F401
        except ImportError as e:
            raise ValueError(f"ONNX export needs tf2onnx and onnxruntime ({e.name} is not installed): "
                             "pip install -e \".[onnx]\"") from None


def fixed_input_shape(model):
    """The input shape of `model` without the batch axis; a ValueError when it is not fixed."""
    if len(model.inputs) != 1:
        raise ValueError(f"Expected a model with one image input. Received: {len(model.inputs)} inputs")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"Export needs a fixed input shape (height, width, channels). Received: input shape "
                         f"{(None, *shape)}; rebuild the model with keras.Input(shape=(224, 224, 3)) or similar.")
    return shape


def export_model(model, path, format="litert", quantize="none", calibration_images=None):
    """Writes `model` as a serving file: LiteRT (.tflite, float or quantized), SavedModel
    (folder) or ONNX (.onnx, Keras' own `model.export(format="onnx")`, needs tf2onnx).

    quantize (LiteRT only): none; float16 (float16 weights); dynamic (int8 weights, float
    activations); int8 (full-integer: weights and activations int8, float input and
    output, calibrated on `calibration_images`, an array of model inputs). A LiteRT op that
    cannot be quantized is a ValueError naming it.
    """
    check_export(format, quantize, calibration_images if quantize == "int8" else None)
    shape = fixed_input_shape(model)
    if quantize == "int8" and calibration_images is None:
        raise ValueError("int8 quantization needs calibration images (a representative dataset).")
    path = os.fspath(path)
    model(np.zeros((1, *shape), np.float32))  # traced once (the ONNX export needs a called model)
    if format == "saved_model":
        return export_saved_model(model, path)
    if format == "onnx":
        model.export(path, format="onnx", verbose=False)
        return path
    return export_litert(model, path, quantize, calibration_images)


def _quantize_error(error, quantize):
    import re

    text = str(error)
    ops = sorted(set(re.findall(r"'((?:tfl?|stablehlo|mhlo)\.[A-Za-z0-9_]+)'", text)))
    ops = [op for op in ops if op not in ("tfl.quantize", "tfl.dequantize")] or ops
    line = next((l.strip() for l in text.splitlines() if "error" in l.lower()), text.strip().splitlines()[0]
                if text.strip() else type(error).__name__)
    what = f"op {', '.join(ops)}" if ops else "an op of this model"
    hint = " Use --quantize dynamic (int8 weights, float activations) instead." if quantize == "int8" else ""
    return f"LiteRT cannot quantize {what} to {quantize}: {line[:300]}.{hint}"


def litert_interpreter(path, threads=None):
    """A LiteRT interpreter of a .tflite file: ai-edge-litert's, else TensorFlow's own copy."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(os.fspath(path), num_threads=threads or os.cpu_count())


class Runner:
    """An exported file as a callable `runner(x) -> outputs` on float32 batches (LiteRT
    interpreter, ONNX Runtime session or loaded SavedModel), for checking and timing.
    `input_shape_fixed` is the input shape without the batch axis."""

    def __init__(self, path, format, batch_size=1, threads=None):
        self.path, self.format, self.batch_size = os.fspath(path), format, batch_size
        threads = threads or os.cpu_count()
        if format == "litert":
            self._interpreter = litert_interpreter(self.path, threads)
            detail = self._interpreter.get_input_details()[0]
            self.input_shape_fixed = tuple(int(d) for d in detail["shape"][1:])
            self._interpreter.resize_tensor_input(detail["index"], [batch_size, *self.input_shape_fixed])
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]
        elif format == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            self._session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            first = self._session.get_inputs()[0]
            self._input_name = first.name
            self.input_shape_fixed = tuple(int(d) for d in first.shape[1:])
        elif format == "saved_model":
            import tensorflow as tf

            self._loaded = tf.saved_model.load(self.path)
            self._signature = self._loaded.signatures["serving_default"]
            self._input_name, spec = next(iter(self._signature.structured_input_signature[1].items()))
            self.input_shape_fixed = tuple(int(d) for d in spec.shape[1:])
        else:
            raise ValueError(f"Expected format in {FORMATS}. Received: format={format!r}")

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        if self.format == "onnx":
            return self._session.run(None, {self._input_name: x})[0]
        if self.format == "saved_model":
            return np.asarray(next(iter(self._signature(**{self._input_name: x}).values())))
        if len(x) != self.batch_size:
            raise ValueError(f"This runner takes batches of {self.batch_size}. Received: {len(x)} images")
        dtype = self._input["dtype"]
        if dtype != np.float32:  # an integer input: quantize with the file's own scale and zero point
            scale, zero = self._input["quantization"]
            x = np.clip(np.round(x / scale + zero), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output["index"])
        if self._output["dtype"] != np.float32:
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    def predict(self, x):
        """Outputs on any number of images, in batches of `batch_size` (the last one padded)."""
        x = np.asarray(x, np.float32)
        if self.format != "litert":
            return np.concatenate([self(x[i:i + 256]) for i in range(0, len(x), 256)])
        outs = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            outs.append(self(chunk)[:self.batch_size - pad])
        return np.concatenate(outs)


def file_size(path):
    """Bytes of a file, or of every file in a folder (a SavedModel)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)
