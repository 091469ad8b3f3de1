"""Grain geometry computed inside a Keras model, from the image alone.

    rgb = from_vgg(inputs)             # the model's VGG16 input back to RGB in [0, 255]
    shape = grain_shape(rgb)           # (batch, 9): shape and colour, not size

Built from `keras.ops` only, so a model that uses them is an ordinary Functional
graph: it saves as a plain `.keras` file and loads with `keras.models.load_model`
without custom objects, and the pruning engine passes the operations through.

Why: a later photographic batch of the Rice Image Dataset shows Jasmine grains 1.33
times longer (camera distance), so a CNN that learnt size reads them as Basmati
(docs/rice.md). The grain's aspect ratio, outline and colour do not depend on size:
measured on the shared folder, long axis / short axis is Arborio 1.94, Basmati 4.2,
Ipsala 2.15, Jasmine 3.05 (3.14 in the late batch), Karacadag 1.59.
"""

import math

from keras import ops

# keras.applications.vgg16.preprocess_input ("caffe"): RGB -> BGR, minus this mean.
VGG_MEAN_BGR = (103.939, 116.779, 123.68)
# Pixels whose R + G + B (each in [0, 255]) exceed this are grain; the background is black.
GRAIN_THRESHOLD = 60.0
SHAPE_FEATURES = ("log_aspect_ratio", "extent", "roundness_of_outline", "mean_r", "mean_g", "mean_b",
                  "std_r", "std_g", "std_b")


def from_vgg(x):
    """RGB in [0, 255] from VGG16-preprocessed images (the exact inverse of
    `keras.applications.vgg16.preprocess_input`)."""
    b, g, r = (x[..., i:i + 1] + m for i, m in enumerate(VGG_MEAN_BGR))
    return ops.concatenate([r, g, b], axis=-1)


def to_vgg(x):
    """VGG16 input from RGB in [0, 255] (`keras.applications.vgg16.preprocess_input`)."""
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    return ops.concatenate([c - m for c, m in zip((b, g, r), VGG_MEAN_BGR)], axis=-1)


def grey(x):
    """The mean of R, G and B in all three channels."""
    return ops.repeat(ops.mean(x, axis=-1, keepdims=True), 3, axis=-1)


def grain_mask(x, threshold=GRAIN_THRESHOLD):
    """1.0 where R + G + B > `threshold` (x: RGB in [0, 255], shape (batch, h, w, 3))."""
    return ops.cast(ops.greater(ops.sum(x, axis=-1), threshold), x.dtype)


def moments(mask):
    """Area (pixels), centroid (cx, cy) and central second moments (cxx, cyy, cxy, in
    pixels squared) of a (batch, h, w) mask."""
    ones = ops.ones_like(mask)
    xs = ops.cumsum(ones, axis=2) - 1.0  # column index of each pixel
    ys = ops.cumsum(ones, axis=1) - 1.0
    area = ops.maximum(ops.sum(mask, axis=(1, 2)), 1.0)  # an empty mask must not divide by zero

    def mean(v):
        return ops.sum(mask * v, axis=(1, 2)) / area

    cx, cy = mean(xs), mean(ys)
    return area, cx, cy, mean(xs * xs) - cx * cx, mean(ys * ys) - cy * cy, mean(xs * ys) - cx * cy


def principal_variances(cxx, cyy, cxy):
    """Variances along the long and the short axis (eigenvalues of the covariance)."""
    half = (cxx + cyy) / 2.0
    root = ops.sqrt(ops.square((cxx - cyy) / 2.0) + ops.square(cxy))
    return ops.maximum(half + root, 1e-3), ops.maximum(half - root, 1e-3)


def grain_shape(x, threshold=GRAIN_THRESHOLD):
    """(batch, 9) descriptors of the grain in RGB images `x` in [0, 255], none of which
    changes with the grain's size, position or orientation (`SHAPE_FEATURES`):

    - log of the aspect ratio: long axis / short axis of the grain's ellipse of inertia;
    - extent: area / area of that ellipse's bounding box (4 sigma by 4 sigma), about 0.77;
    - roundness of the outline: 4 pi area / perimeter^2 (boundary pixels), 1 for a disc;
    - mean and standard deviation of R, G and B over the grain, divided by 255.
    """
    mask = grain_mask(x, threshold)
    area, _, _, cxx, cyy, cxy = moments(mask)
    long, short = principal_variances(cxx, cyy, cxy)
    log_ratio = 0.5 * ops.log(long / short)
    extent = area / (16.0 * ops.sqrt(long * short))
    # Boundary pixels: grain pixels with a background pixel among their 8 neighbours.
    eroded = 1.0 - ops.max_pool(ops.expand_dims(1.0 - mask, -1), 3, 1, padding="same")[..., 0]
    perimeter = ops.maximum(ops.sum(mask * (1.0 - eroded), axis=(1, 2)), 1.0)
    roundness = 4.0 * math.pi * area / ops.square(perimeter)
    weights = ops.expand_dims(mask, -1)
    pixels = ops.expand_dims(area, -1)
    mean = ops.sum(x * weights, axis=(1, 2)) / pixels
    var = ops.sum(ops.square(x) * weights, axis=(1, 2)) / pixels - ops.square(mean)
    std = ops.sqrt(ops.maximum(var, 0.0))
    return ops.concatenate([ops.stack([log_ratio, extent, roundness], axis=-1), mean / 255.0, std / 255.0],
                           axis=-1)


def upright(x, size, length=0.8, threshold=GRAIN_THRESHOLD):
    """Each grain of the RGB images `x` moved to the centre, turned so its long axis is
    horizontal and scaled so its length (4 sigma along that axis) is `length` of the
    width, then resized to `size` x `size` (antialiased): the CNN sees shape and
    texture, not the grain's size. `x` should be larger than `size` (twice: the
    resample then shrinks every grain, whatever its size, and their sharpness matches)."""
    h, w = x.shape[1], x.shape[2]
    _, cx, cy, cxx, cyy, cxy = moments(grain_mask(x, threshold))
    long, _ = principal_variances(cxx, cyy, cxy)
    theta = 0.5 * ops.arctan2(2.0 * cxy, cxx - cyy)  # angle of the long axis
    step = 4.0 * ops.sqrt(long) / (length * w)  # input pixels per output pixel
    cos, sin = ops.cos(theta) * step, ops.sin(theta) * step
    ox, oy = (w - 1) / 2.0, (h - 1) / 2.0
    # Output pixel (u, v) reads input (cx, cy) + R(theta) (u - ox, v - oy) * step.
    zero = ops.zeros_like(cos)
    transform = ops.stack([cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy, zero, zero],
                          axis=-1)
    x = ops.image.affine_transform(x, transform, interpolation="bilinear", fill_mode="constant", fill_value=0)
    return ops.image.resize(x, (size, size), antialias=True)
