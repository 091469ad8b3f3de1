"""Speed-ups you can trust: several models timed in the same window, in interleaved rounds.

    timing = interleaved_latency({"baseline": base, "pruned": pruned}, batch_size=16)
    timing["models"]["pruned"]["ms_per_batch"]      # median over rounds
    timing["speedup"]["pruned"]                     # baseline ms / pruned ms (first entry = baseline)

Each round times every model in turn (`runs` calls each, after warm-up), and the order
rotates from round to round; a model's latency is the median over rounds of its per-round
median. A change of load on a shared machine then hits every model alike, instead of the
one that happened to be measured at the time. The result records each round's value, the
spread over rounds and the machine load before and after (`pruning.stats.machine_description`).

A model is a `keras.Model` (timed with `predict_on_batch`, Keras' compiled predict step) or
any callable `f(x)` on a float32 batch that returns when the work is done (a LiteRT
interpreter or an ONNX Runtime session wrapped by `pruning.export.runner`).
"""


import numpy as np

from pruning.stats import input_shape_of, machine_description, time_calls  # noqa: F401 (public here too)


def _as_callable(model):
    if hasattr(model, "predict_on_batch"):
        return model.predict_on_batch  # returns numpy arrays: the work has finished
    if callable(model):
        return model
    raise ValueError(f"Expected a keras.Model or a callable f(x). Received: {type(model).__name__}")


def interleaved_latency(models, batch_size=1, runs=5, rounds=5, warmup=2, input_shape=None, inputs=None,
                        progress=None):
    """Median ms per batch of each model, timed in `rounds` interleaved rounds of `runs` calls.

    Args:
        models: {name: keras.Model or callable f(x)}, in order; the first is the baseline
            of `speedup`.
        batch_size: images per timed call.
        runs: timed calls per model and round (the round's value is their median).
        rounds: interleaved rounds (the model order rotates by one each round).
        warmup: untimed calls per model before the first round (tracing, compilation).
        input_shape: shape of one input without the batch axis (default: the first model's).
        inputs: the batch to time on (default: seeded uniform values in [0, 255]).
        progress: `progress(n)` after each model's round, if given.

    Returns a dict: batch_size, runs, rounds, machine_before, machine_after, models
    ({name: ms_per_batch, ms_per_image, rounds_ms, spread}), speedup ({name: baseline ms /
    its ms}). `spread` is (max - min) / median of the round values.
    """
    if not models:
        raise ValueError("Expected at least one model to time. Received: models={}")
    for name, value in (("batch_size", batch_size), ("runs", runs), ("rounds", rounds)):
        if int(value) < 1:
            raise ValueError(f"Expected {name} >= 1. Received: {name}={value}")
    if warmup < 0:
        raise ValueError(f"Expected warmup >= 0. Received: warmup={warmup}")
    names = list(models)
    fns = [_as_callable(models[n]) for n in names]
    if inputs is None:
        shape = input_shape_of(models[names[0]], input_shape)
        inputs = (np.random.default_rng(0).random((batch_size, *shape), dtype=np.float32) * 255.0)
    before = machine_description()
    for fn in fns:
        time_calls(fn, inputs, 0, warmup)
    per_round = [[] for _ in names]
    for r in range(rounds):
        for i in np.roll(np.arange(len(names)), -r):
            per_round[i].append(float(np.median(time_calls(fns[i], inputs, runs))))
            if progress:
                progress(1)
    after = machine_description()
    result = {}
    for name, values in zip(names, per_round):
        median = float(np.median(values))
        result[name] = {"ms_per_batch": median, "ms_per_image": median / len(inputs), "rounds_ms": values,
                        "spread": (max(values) - min(values)) / median if median > 0 else 0.0}
    base = result[names[0]]["ms_per_batch"]
    return {"batch_size": int(len(inputs)), "runs": int(runs), "rounds": int(rounds), "machine_before": before,
            "machine_after": after, "models": result,
            "speedup": {n: base / result[n]["ms_per_batch"] for n in names}}


def latency_summary(timing, name):
    """The run-metrics record of model `name` in an `interleaved_latency` result: its
    latency, the baseline's (first model) from the same window, speed-up, spread and load."""
    first = next(iter(timing["models"]))
    own, base = timing["models"][name], timing["models"][first]
    return {"batch_size": timing["batch_size"], "runs": timing["runs"], "rounds": timing["rounds"],
            "ms_per_batch": own["ms_per_batch"], "ms_per_image": own["ms_per_image"], "rounds_ms": own["rounds_ms"],
            "spread": own["spread"], "baseline_ms_per_batch": base["ms_per_batch"],
            "baseline_rounds_ms": base["rounds_ms"], "baseline_spread": base["spread"],
            "speedup": timing["speedup"][name], "interleaved": True,
            "machine_before": timing["machine_before"], "machine_after": timing["machine_after"]}


def timing_caption(timing):
    """The machine line above a table of an `interleaved_latency` result."""
    return (f"Machine: {timing['machine_before']} before, {timing['machine_after']} after. Median over "
            f"{timing['rounds']} interleaved rounds of the median of {timing['runs']} calls on a batch of "
            f"{timing['batch_size']}.")


def format_timing(timing, labels=None):
    """A Markdown table of an `interleaved_latency` result, with the machine line."""
    lines = [timing_caption(timing), "",
             "| model | ms / batch | rounds (ms) | spread | speed-up |", "|---|---|---|---|---|"]
    for name, m in timing["models"].items():
        lines.append(f"| {(labels or {}).get(name, name)} | {m['ms_per_batch']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in m['rounds_ms'])} | {m['spread']:.0%} | "
                     f"{timing['speedup'][name]:.2f}x |")
    return "\n".join(lines)
