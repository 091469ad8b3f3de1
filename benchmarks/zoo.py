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
import re
import time
import warnings

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
    _zero_shift_bn(model, np.random.default_rng(seed))
    return model


def _hub_builders():
    """keras-hub 0.32 models built from tiny configs (random weights, nothing downloaded):
    name -> constructor. Each has the structure of the preset family it is named after."""
    import keras_hub as kh

    M = kh.models

    def resnet(filters, blocks, strides, block_type, size=32, **kw):
        return M.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=filters,
            stackwise_num_blocks=blocks, stackwise_num_strides=strides, block_type=block_type,
            image_shape=(size, size, 3), **kw)

    def resnet_v1():  # the first stage must have 64 filters
        return resnet([64, 16], [1, 1], [1, 2], "basic_block")

    def resnet_v2():
        return resnet([64, 16], [1, 2], [1, 2], "bottleneck_block", use_pre_activation=True)

    def csp(**kw):
        return M.CSPNetBackbone(stackwise_depth=[1, 1], image_shape=kw.pop("image_shape", (32, 32, 3)),
                                **kw)

    def cspdarknet():
        return csp(stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_strides=[2, 2],
                   stackwise_num_filters=[16, 32], block_type="dark_block", stage_type="csp",
                   expand_ratio=2.0, bottle_ratio=0.5, down_growth=True)

    def cspresnext():
        return csp(stem_filters=16, stem_kernel_size=7, stem_strides=4, stem_pooling="max",
                   stackwise_strides=[1, 2], stackwise_num_filters=[32, 64],
                   block_type="bottleneck_block", stage_type="csp", groups=4, bottle_ratio=1.0,
                   block_ratio=0.5, cross_linear=True, image_shape=(64, 64, 3))

    def darknet():
        return csp(stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_strides=[2, 2],
                   stackwise_num_filters=[16, 32], block_type="dark_block", stage_type="dark",
                   bottle_ratio=0.5)

    def densenet():
        return M.DenseNetBackbone(stackwise_num_repeats=[1, 2], growth_rate=8, image_shape=(32, 32, 3))

    def efficientnet(types, **kw):
        n = len(types)
        return M.EfficientNetBackbone(
            stackwise_width_coefficients=[0.25] * n, stackwise_depth_coefficients=[1.0] * n,
            stackwise_kernel_sizes=[3] * n, stackwise_block_types=types, num_features=64,
            input_shape=(32, 32, 3), **kw)

    def effnet_v1():
        return efficientnet(
            ["v1", "v1"], stackwise_num_repeats=[1, 2], stackwise_input_filters=[32, 16],
            stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 6],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2])

    def effnet_v2():
        return efficientnet(
            ["fused", "fused", "unfused"], stackwise_num_repeats=[1, 2, 1],
            stackwise_input_filters=[24, 24, 48], stackwise_output_filters=[24, 48, 64],
            stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=[0, 0, 0.25],
            stackwise_strides=[1, 2, 2])

    def mobilenet_v3():
        return M.MobileNetBackbone(
            stackwise_expansion=[[16], [24, 32]], stackwise_num_blocks=[1, 2],
            stackwise_num_filters=[[8], [16, 16]], stackwise_kernel_size=[[3], [5, 5]],
            stackwise_num_strides=[[2], [2, 1]], stackwise_se_ratio=[[None], [0.25, 0.25]],
            stackwise_activation=[["relu"], ["hard_swish", "hard_swish"]],
            stackwise_padding=[[1], [2, 2]], output_num_filters=32, depthwise_filters=8,
            depthwise_stride=2, depthwise_residual=False, last_layer_filter=32,
            squeeze_and_excite=0.5, input_num_filters=8, image_shape=(32, 32, 3))

    def vgg():
        return M.VGGBackbone(stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16],
                             image_shape=(32, 32, 3))

    def xception():
        return M.XceptionBackbone(stackwise_conv_filters=[[8, 16], [16, 32], [32, 32]],
                                  stackwise_pooling=[True, True, False], image_shape=(64, 64, 3))

    def hgnetv2():
        return M.HGNetV2Backbone(
            depths=[1, 1], embedding_size=8, hidden_sizes=[16, 32], stem_channels=[3, 8, 8],
            hidden_act="relu", use_learnable_affine_block=False,
            stackwise_stage_filters=[(8, 8, 16, 1, 2, 3), (16, 8, 32, 1, 2, 3)],
            apply_downsample=[False, True], use_lightweight_conv_block=[False, True],
            image_shape=(32, 32, 3))

    def mit():
        return M.MiTBackbone(
            layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
            layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
            layerwise_strides=[4, 2], hidden_dims=[8, 16], image_shape=(32, 32, 3))

    def resnet_clf():
        return M.ResNetImageClassifier(backbone=resnet_v1(), num_classes=3)

    def densenet_clf():
        return M.DenseNetImageClassifier(backbone=densenet(), num_classes=3)

    def deeplab():
        encoder = resnet([64, 16, 16, 16], [1, 1, 1, 1], [1, 2, 2, 1], "basic_block", size=64)
        backbone = M.DeepLabV3Backbone(
            image_encoder=encoder, spatial_pyramid_pooling_key="P4", upsampling_size=4,
            dilation_rates=[2, 4], low_level_feature_key="P2", projection_filters=8,
            image_shape=(64, 64, 3))
        return M.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=3)

    def segformer():
        backbone = M.SegFormerBackbone(image_encoder=mit(), projection_filters=16)
        return M.SegFormerImageSegmenter(backbone=backbone, num_classes=3)

    return {
        "ResNet v1 (basic)": resnet_v1, "ResNet v2 (bottleneck)": resnet_v2,
        "CSPDarkNet": cspdarknet, "CSPResNeXt": cspresnext, "DarkNet": darknet,
        "DenseNet": densenet, "EfficientNet v1": effnet_v1, "EfficientNet v2 (fused)": effnet_v2,
        "MobileNetV3": mobilenet_v3, "VGG": vgg, "Xception": xception, "HGNetV2": hgnetv2,
        "MiT": mit, "ResNetImageClassifier": resnet_clf, "DenseNetImageClassifier": densenet_clf,
        "DeepLabV3ImageSegmenter": deeplab, "SegFormerImageSegmenter": segformer,
    }


HUB = ("ResNet v1 (basic)", "ResNet v2 (bottleneck)", "CSPDarkNet", "CSPResNeXt", "DarkNet",
       "DenseNet", "EfficientNet v1", "EfficientNet v2 (fused)", "MobileNetV3", "VGG", "Xception",
       "HGNetV2", "MiT", "ResNetImageClassifier", "DenseNetImageClassifier",
       "DeepLabV3ImageSegmenter", "SegFormerImageSegmenter")
# Transformers whose convs all feed LayerNormalization: pruned only with allow_inexact.
HUB_INEXACT = {"MiT"}


def build_hub(name, seed=0):
    """A keras-hub model of `HUB` with random weights and BatchNorm with beta = moving mean
    = 0 (as `build`), every BatchNorm inside custom layers included."""
    import keras

    keras.utils.set_random_seed(seed)
    model = _hub_builders()[name]()
    _zero_shift_bn(model, np.random.default_rng(seed))
    return model


def _zero_shift_bn(model, rng):
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            layer.set_weights([
                rng.uniform(0.5, 1.5, w.shape).astype("float32")
                if v.path.split("/")[-1] in ("gamma", "moving_variance") else np.zeros_like(w)
                for v, w in zip(layer.weights, layer.get_weights())
            ])


def conv_layers_inside(model):
    """Every built filter-making Conv* layer anywhere inside `model` (custom layers and
    nested models walked; depthwise convs, which have no filters of their own, left out)."""
    import keras

    from pruning.handlers import is_producer

    L = keras.layers
    kinds = (L.Conv1D, L.Conv2D, L.Conv3D, L.SeparableConv1D, L.SeparableConv2D,
             L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
    return [la for la in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(la, kinds) and is_producer(la)]


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
    return {
        "model": name, "convs": len(cnn.conv_layers), "prunable": len(cnn.prunable_layers),
        "excluded": sum(excluded_from_target(c) for c in blocked),
        "reasons": blocked_reasons(blocked),
        "params": (before["params"], after["params"]), "macs": (before["macs"], after["macs"]),
        "seconds": seconds,
    }


def blocked_reasons(blocked, anonymous=False):
    """'n x reason; ...' for blocked convs, most frequent first. `anonymous` drops the
    layer names from the reasons, so that one kind of block is counted once."""
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
        if anonymous:
            key = re.sub(r"(layer|conv) '[^']+' ", r"\1 ", key)
        reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def hub_row(name, ratio=0.3):
    """One row of the keras-hub table: Conv* layers visible / inside the model, prunable /
    visible, why the others are blocked, params before and after (count_params: MiT's
    Dense layers on (batch, None, C) sequences have no static MACs for model_stats)."""
    from pruning import CNNModel, PrunePlan, get_ranker, prune

    model = build_hub(name)
    inexact = name in HUB_INEXACT
    cnn = CNNModel(model, allow_inexact=inexact)
    inside = conv_layers_inside(model)
    kinds = tuple({type(la) for la in inside})
    visible = [c for c in cnn.conv_layers if isinstance(c.layer, kinds)]
    prunable = [c for c in visible if c.prunable]
    blocked = [c for c in visible if not c.prunable]
    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), ratio)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped class; inexact: measured below
        pruned = prune(cnn, plan)
    seconds = time.perf_counter() - start
    reasons = blocked_reasons(blocked, anonymous=True)
    reasons = "; ".join([r for r in (reasons, *[o.message for o in cnn.opaque]) if r])
    if inexact:
        from pruning import output_change

        reasons = f"(allow_inexact=True: output change {output_change(model, pruned):.2g}) " + reasons
    return {
        "model": name, "input": tuple(model.inputs[0].shape[1:]), "inside": len(inside),
        "visible": len(visible), "prunable": len(prunable),
        "excluded": sum(excluded_from_target(c) for c in blocked), "reasons": reasons,
        "params": (model.count_params(), pruned.count_params()), "seconds": seconds,
    }


def _measure(row, names, ratio):
    """(rows, a sentence naming the machine, backend and load they were measured under)."""
    import keras

    load_before = os.getloadavg()
    rows = []
    for name in names:
        click.echo(f"{name}...", err=True)
        rows.append(row(name, ratio))
        keras.backend.clear_session()
    load_after = os.getloadavg()
    return rows, (
        f"Written by `PYTHONPATH=. python benchmarks/zoo.py` on {platform.node()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
        f"Keras {keras.__version__} on {keras.backend.backend()}, "
        f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after. ")


def hub_table(ratio, names):
    """Markdown lines of the keras-hub table."""
    import keras_hub

    rows, written = _measure(hub_row, names, ratio)
    inside, visible, prunable, excluded = (sum(r[k] for r in rows)
                                           for k in ("inside", "visible", "prunable", "excluded"))
    target = visible - excluded
    lines = [
        f"# keras-hub {keras_hub.__version__} backbones and tasks pruned at a uniform ratio of {ratio}",
        "",
        written + "Tiny configs of each family (`benchmarks/zoo.py`, `build_hub`), random weights, nothing "
        "downloaded, L1 scores, no exclusions. *Convs* are the filter-making `Conv*` layers anywhere "
        "inside the model (custom blocks and nested models walked; depthwise convs left out).",
        "",
        f"**{visible} of {inside} convs visible; {prunable} of {visible} prunable "
        f"({100 * prunable / max(visible, 1):.1f}%); {prunable} of {target} "
        f"({100 * prunable / max(target, 1):.1f}%) leaving out the convs whose channels reach an "
        "output or feed LayerNormalization.**",
        "",
        "| model | input | convs visible / total | prunable / visible | params before | params after | "
        "rebuild s | blocked: why |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(str(d) for d in r['input'])} | {r['visible']} / {r['inside']} | "
            f"{r['prunable']} / {r['visible']} | {r['params'][0]:,} | {r['params'][1]:,} | "
            f"{r['seconds']:.1f} | {r['reasons'] or '-'} |"
        )
    return lines


HUB_MARK = "<!-- keras-hub table: benchmarks/zoo.py --tables hub rewrites from here -->"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ratio", type=float, default=0.3, show_default=True, help="Uniform ratio.")
@click.option("--models", default=",".join(ZOO), show_default=True, help="Comma-separated families.")
@click.option("--out", default=os.path.join("results", "zoo.md"), show_default=True,
              help="Markdown file for the table.")
@click.option("--tables", type=click.Choice(["all", "apps", "hub"]), default="all", show_default=True,
              help="Which tables to measure: keras.applications, keras-hub (needs the [hub] extra), "
                   "or both; the other one is kept as it is in --out.")
def main(ratio, models, out, tables):
    """Measure and write the zoo tables."""
    from experiments.common import write_text

    old = open(out).read() if os.path.exists(out) else ""
    old_apps, _, old_hub = old.partition(HUB_MARK)
    apps = apps_table(ratio, models) if tables in ("all", "apps") else old_apps.rstrip("\n").split("\n")
    hub = hub_table(ratio, HUB) if tables in ("all", "hub") else old_hub.strip("\n").split("\n")
    text = "\n".join(apps) + "\n\n" + HUB_MARK + "\n\n" + "\n".join(hub) + "\n"
    write_text(out, text)
    click.echo(text)


def apps_table(ratio, models):
    """Markdown lines of the keras.applications table."""
    rows, written = _measure(zoo_row, models.split(","), ratio)
    total, prunable, excluded = (sum(r[k] for r in rows) for k in ("convs", "prunable", "excluded"))
    target = total - excluded
    lines = [
        f"# Every keras.applications family pruned at a uniform ratio of {ratio}",
        "",
        written + "Random weights (weights=None), 10 classes, no exclusions, L1 scores.",
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
    return lines


if __name__ == "__main__":
    main()
