"""Prunes every keras.applications family (weights=None) at a uniform ratio and
writes a table: convs prunable / total, why the rest are blocked, params and MACs
before and after, rebuild seconds, and the machine and load that produced it.

    PYTHONPATH=. python benchmarks/zoo.py --out results/zoo.md

"Convs" are the layers whose filters the engine can remove (Conv, SeparableConv,
Conv*Transpose, and Dense layers applied to feature maps, as in ConvNeXt).
"""

import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402

# Family -> (constructor in keras.applications, smallest convenient input).
ZOO = {
    "VGG16": (32, 32, 3), "VGG19": (32, 32, 3),
    "ResNet50": (32, 32, 3), "ResNet50V2": (32, 32, 3),
    "MobileNet": (32, 32, 3), "MobileNetV2": (32, 32, 3),
    "MobileNetV3Small": (32, 32, 3), "MobileNetV3Large": (32, 32, 3),
    "DenseNet121": (32, 32, 3), "InceptionV3": (75, 75, 3), "Xception": (71, 71, 3),
    "EfficientNetB0": (32, 32, 3), "EfficientNetV2B0": (32, 32, 3),
    "NASNetMobile": (32, 32, 3), "ConvNeXtTiny": (32, 32, 3),
    "InceptionResNetV2": (75, 75, 3),
}


def build(name, classes=10, seed=0):
    """A keras.applications model with random weights, logits out (where the
    constructor allows it), and BatchNorm with beta = moving mean = 0 so that a
    zeroed filter stays zero along every path (for the invariance test)."""
    import keras

    keras.utils.set_random_seed(seed)
    kwargs = {}
    if not name.startswith(("NASNet", "DenseNet")):
        kwargs["classifier_activation"] = None
    model = getattr(keras.applications, name)(weights=None, input_shape=ZOO[name], classes=classes,
                                              **kwargs)
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([
                rng.uniform(0.5, 1.5, w.shape).astype("float32")
                if v.path.split("/")[-1] in ("gamma", "moving_variance") else np.zeros_like(w)
                for v, w in zip(layer.weights, layer.get_weights())
            ])
    return model


def excluded_from_target(conv):
    """Blocked for a reason the engine must respect: its channels reach the output,
    or feed LayerNormalization (only prunable with allow_inexact)."""
    reason = conv.blocked_by
    return "model output" in reason or "LayerNormalization" in reason


def zoo_row(name, ratio=0.3):
    """One table row for family `name`."""
    from pruning import CNNModel, PrunePlan, get_ranker, model_stats, prune

    model = build(name)
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), ratio)
    start = time.perf_counter()
    pruned = prune(cnn, plan)
    seconds = time.perf_counter() - start
    before, after = model_stats(model), model_stats(pruned)
    blocked = [c for c in cnn.conv_layers if not c.prunable]
    reasons = {}
    for c in blocked:
        tied = c.blocked_by.startswith("it is tied to")
        if "LayerNormalization" in c.blocked_by:
            key = ("tied to a conv that " if tied else "") + \
                "feeds LayerNormalization (allow_inexact=True prunes it)"
        elif tied:
            key = "tied to a blocked conv: " + c.blocked_by.split(": ", 1)[-1]
        else:
            key = c.blocked_by
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "model": name, "convs": len(cnn.conv_layers), "prunable": len(cnn.prunable_layers),
        "excluded": sum(excluded_from_target(c) for c in blocked),
        "reasons": "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])),
        "params": (before["params"], after["params"]), "macs": (before["macs"], after["macs"]),
        "seconds": seconds,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ratio", type=float, default=0.3, show_default=True, help="Uniform ratio.")
@click.option("--models", default=",".join(ZOO), show_default=True, help="Comma-separated families.")
@click.option("--out", default=os.path.join("results", "zoo.md"), show_default=True,
              help="Markdown file for the table.")
def main(ratio, models, out):
    """Measure and write the zoo table."""
    import keras

    from experiments.common import write_text

    load_before = os.getloadavg()
    rows = []
    for name in models.split(","):
        click.echo(f"{name}...", err=True)
        rows.append(zoo_row(name, ratio))
        keras.backend.clear_session()
    load_after = os.getloadavg()
    total = sum(r["convs"] for r in rows)
    prunable = sum(r["prunable"] for r in rows)
    target = total - sum(r["excluded"] for r in rows)
    lines = [
        f"# Every keras.applications family pruned at a uniform ratio of {ratio}",
        "",
        f"Written by `PYTHONPATH=. python benchmarks/zoo.py` on {platform.node()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
        f"Keras {keras.__version__} on {keras.backend.backend()}, "
        f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after. "
        "Random weights (weights=None), 10 classes, no exclusions, L1 scores.",
        "",
        f"**{prunable} of {total} convs prunable ({100 * prunable / total:.1f}%); "
        f"{prunable} of {target} ({100 * prunable / max(target, 1):.1f}%) excluding the "
        "convs whose channels reach the output or feed LayerNormalization "
        "(prunable with `allow_inexact=True`).**",
        "",
        "| model | input | convs prunable / total | params before | params after | "
        "MACs before | MACs after | rebuild s | blocked: why |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {ZOO[r['model']][0]}px | {r['prunable']} / {r['convs']} | "
            f"{r['params'][0]:,} | {r['params'][1]:,} | {r['macs'][0]:,} | {r['macs'][1]:,} | "
            f"{r['seconds']:.1f} | {r['reasons'] or '-'} |"
        )
    write_text(out, "\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
