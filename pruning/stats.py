"""Parameters, multiply-accumulates (MACs) and measured latency of a model."""

import os
import platform
import time

import numpy as np

from pruning.graph import CNNModel
from pruning.handlers import layer_macs


def _count(weights):
    return int(sum(int(np.prod(w.shape)) for w in weights))


def layer_stats(model):
    """One dict per leaf layer call: name, class, trainable/total params, MACs, output shape."""
    cnn = CNNModel.of(model)
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
            "trainable_params": _count(getattr(layer, "trainable_weights", ())) if first else 0,
            "params": _count(getattr(layer, "weights", ())) if first else 0,
            "macs": layer_macs(layer, in_shape, out_shape),
        })
    return rows


def model_stats(model):
    """Totals: trainable and total parameters (total == model.count_params()) and MACs."""
    cnn = CNNModel.of(model)
    model = cnn.model
    return {
        "trainable_params": _count(model.trainable_weights),
        "non_trainable_params": _count(model.non_trainable_weights),
        "params": int(model.count_params()),
        "macs": int(sum(r["macs"] for r in layer_stats(cnn))),
    }


def machine_description():
    """Which machine and how loaded (1-minute load average), for the `machine` column that
    every latency or timing table carries."""
    return f"{platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.1f}"


def measure_latency(model, batch_size=1, runs=20, warmup=3, input_shape=None, progress=None):
    """Median and 90th-percentile milliseconds of one inference call on random inputs.

    The call is Keras' compiled predict step (`predict_on_batch`: a tf.function on
    TensorFlow, jax.jit on JAX, eager on PyTorch), so tracing and compilation are
    excluded (they happen in the warm-up runs). Works on every Keras backend.
    """
    shape = input_shape_of(model, input_shape)
    x = np.random.default_rng(0).random((batch_size, *shape), dtype=np.float32)
    # predict_on_batch returns numpy arrays: the work has finished
    times = np.asarray(time_calls(model.predict_on_batch, x, runs, warmup, progress))
    return {
        "batch_size": batch_size,
        "runs": runs,
        "ms_per_batch": float(np.median(times)),
        "ms_p90": float(np.percentile(times, 90)),
        "ms_per_image": float(np.median(times) / batch_size),
    }


def input_shape_of(model, input_shape=None):
    """`input_shape`, else the input shape (without batch) of a Keras model or of a runner
    (`input_shape_fixed`); a ValueError names the shape when a dimension is not fixed."""
    shape = input_shape or getattr(model, "input_shape_fixed", None)
    if shape is None:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(f"Cannot tell the input shape of {type(model).__name__}: pass input_shape.")
        shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"Latency needs a fixed input shape. Received: input_shape={tuple(shape)}")
    return tuple(int(d) for d in shape)


def time_calls(fn, x, runs, warmup=0, progress=None):
    """Milliseconds of each of `runs` calls `fn(x)` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000.0)
        if progress:
            progress(1)
    return times


def format_stats(before, after=None):
    """A small text table of params and MACs, before and optionally after pruning."""
    lines = [f"{'':<18}{'before':>16}" + (f"{'after':>16}{'ratio':>9}" if after else "")]
    for key in ("trainable_params", "params", "macs"):
        line = f"{key:<18}{before[key]:>16,}"
        if after:
            line += f"{after[key]:>16,}{after[key] / max(before[key], 1):>9.3f}"
        lines.append(line)
    return "\n".join(lines)
