"""Model builders shared by tests/test_zoo.py, tests/test_keras_hub.py and benchmarks/zoo.py:
every keras.applications family and tiny keras-hub configs of each preset family, all with
random weights (nothing downloaded) and BatchNorm shifts at zero, so that a zeroed filter
stays zero along every path (the invariance tests)."""

import numpy as np

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
