"""Parameters, multiply-accumulates (MACs) and measured latency of a model."""

import time

import keras
import numpy as np

from pruning.graph import CNNModel, _is_conv


def layer_macs(layer, in_shape, out_shape):
    """Multiply-accumulates of one call for one input example (biases, BN and
    activations not counted)."""
    if _is_conv(layer):
        spatial = int(np.prod(out_shape[1:-1]))
        return spatial * int(np.prod(layer.kernel_size)) * in_shape[-1] * out_shape[-1]
    if isinstance(layer, keras.layers.SeparableConv2D):
        spatial = int(np.prod(out_shape[1:-1]))
        mid = in_shape[-1] * layer.depth_multiplier
        return spatial * (int(np.prod(layer.kernel_size)) * mid + mid * out_shape[-1])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return int(np.prod(out_shape[1:])) * int(np.prod(layer.kernel_size))
    if isinstance(layer, keras.layers.Dense):
        return int(np.prod(in_shape[1:])) * out_shape[-1]
    return 0


def _count(weights):
    return int(sum(int(np.prod(w.shape)) for w in weights))


def layer_stats(model):
    """One dict per leaf layer call: name, class, trainable/total params, MACs, output shape."""
    cnn = model if isinstance(model, CNNModel) else CNNModel(model)
    rows, seen = [], set()
    for call in cnn.calls:
        layer = call.layer
        first = id(layer) not in seen  # a shared layer's weights count once
        seen.add(id(layer))
        in_shape = cnn.shapes[call.inputs[0]] if call.inputs else ()
        out_shape = cnn.shapes[call.outputs[0]]
        rows.append({
            "layer": layer.name,
            "class": type(layer).__name__,
            "output_shape": list(out_shape[1:]),
            "trainable_params": _count(layer.trainable_weights) if first else 0,
            "params": _count(layer.weights) if first else 0,
            "macs": layer_macs(layer, in_shape, out_shape),
        })
    return rows


def model_stats(model):
    """Totals: trainable and total parameters (total == model.count_params()) and MACs."""
    model = model.model if isinstance(model, CNNModel) else model
    return {
        "trainable_params": _count(model.trainable_weights),
        "non_trainable_params": _count(model.non_trainable_weights),
        "params": int(model.count_params()),
        "macs": int(sum(r["macs"] for r in layer_stats(model))),
    }


def measure_latency(model, batch_size=1, runs=20, warmup=3, input_shape=None, progress=None):
    """Median and 90th-percentile milliseconds of one inference call on random inputs.

    The call goes through one compiled `tf.function`, so graph tracing is excluded
    (it happens in the warm-up runs).
    """
    import tensorflow as tf

    shape = input_shape or tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"Latency needs a fixed input shape. Received: input_shape={shape}")
    x = tf.random.uniform((batch_size, *shape), seed=0)
    fn = tf.function(lambda t: model(t, training=False))
    for _ in range(warmup):
        keras.tree.map_structure(lambda t: t.numpy(), fn(x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        keras.tree.map_structure(lambda t: t.numpy(), fn(x))
        times.append((time.perf_counter() - start) * 1000.0)
        if progress:
            progress(1)
    times = np.asarray(times)
    return {
        "batch_size": batch_size,
        "runs": runs,
        "ms_per_batch": float(np.median(times)),
        "ms_p90": float(np.percentile(times, 90)),
        "ms_per_image": float(np.median(times) / batch_size),
    }


def format_stats(before, after=None):
    """A small text table of params and MACs, before and optionally after pruning."""
    lines = [f"{'':<18}{'before':>16}" + (f"{'after':>16}{'ratio':>9}" if after else "")]
    for key in ("trainable_params", "params", "macs"):
        line = f"{key:<18}{before[key]:>16,}"
        if after:
            line += f"{after[key]:>16,}{after[key] / max(before[key], 1):>9.3f}"
        lines.append(line)
    return "\n".join(lines)
