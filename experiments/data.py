"""tf.data input pipelines: image folders, tfds CIFAR, augmentation (the folder listing and the
splits live in experiments.splits, without TensorFlow, and are re-exported here)."""

import os
import warnings

import numpy as np
import tensorflow as tf

from experiments.choices import FLIPS, PREPROCESSING
from experiments.config import check_augmentation
from experiments.grain import GRAIN_THRESHOLD, grain_mask
from experiments.splits import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS, batch_split, file_index, list_image_folder, stratified_split)


# Per-channel statistics of the training images, RGB in [0, 1].
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
AUTOTUNE = tf.data.AUTOTUNE


# ---------------------------------------------------------------- image folders
def find_unreadable(paths):
    """Paths whose bytes do not decode as an image (checked once, up front, so a bad
    file is reported by name instead of failing an epoch halfway)."""
    bad = []
    for p in paths:
        try:
            tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError):
            bad.append(p)
    return bad


def check_readable(paths):
    """Raises a ValueError naming the files that do not decode as images."""
    bad = find_unreadable(paths)
    if bad:
        raise ValueError(f"Cannot decode {len(bad)} image file{'s' * (len(bad) > 1)} (truncated, or not an "
                         f"image): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Remove or replace them.")


def check_splits(labels, split, class_names, names=("train", "val", "test")):
    """Raises a ValueError when a split (index arrays) has no image of some class."""
    for name, idx in zip(names, split):
        missing = sorted(set(range(len(class_names))) - set(np.asarray(labels)[idx].tolist()))
        if missing:
            raise ValueError(f"The {name} split has no image of class {class_names[missing[0]]!r}: too few "
                             f"images per class for the split fractions. Use more images (or a larger "
                             f"--limit-per-class).")


def drop_unreadable(paths, labels):
    bad = set(find_unreadable(paths))
    if bad:
        warnings.warn(f"Skipping {len(bad)} images that cannot be decoded: {', '.join(sorted(bad))}")
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return [paths[i] for i in keep], labels[keep], sorted(bad)


def colour_jitter(hue=0.0, saturation=0.0, brightness=0.0, seed=0):
    """A batch augmentation (for `folder_dataset(augment=...)`) that shifts each image's hue by
    up to +-`hue` of the colour circle, scales its saturation by a factor in
    [1 - saturation, 1 + saturation] and its brightness in [1 - brightness, 1 + brightness].
    Images are RGB in [0, 255]; one draw per image (seeded ops: reproducible run to run
    given the global seed)."""
    check_augmentation(colour_jitter=(hue, saturation, brightness))

    def augment(x):
        n = tf.shape(x)[0]
        draw = lambda a: tf.random.uniform([n, 1, 1], -a, a, seed=seed)  # noqa: E731
        hsv = tf.image.rgb_to_hsv(x / 255.0)
        h = tf.math.floormod(hsv[..., 0] + draw(hue), 1.0)
        s = tf.clip_by_value(hsv[..., 1] * (1 + draw(saturation)), 0.0, 1.0)
        v = tf.clip_by_value(hsv[..., 2] * (1 + draw(brightness)), 0.0, 1.0)
        return tf.image.hsv_to_rgb(tf.stack([h, s, v], -1)) * 255.0

    return augment


def random_affine(zoom=0.0, rotate=0.0, seed=0):
    """A batch augmentation: each image is scaled about its centre by a factor drawn
    log-uniformly between 1 / (1 + `zoom`) and 1 + `zoom`, and turned by an angle drawn
    uniformly in [-`rotate`, `rotate`] degrees (one bilinear resample for both; the border
    is filled with black, the rice dataset's background). Photographic batches differ in
    the camera's zoom and in how the grains lie, so neither a grain's absolute size nor its
    orientation is a reliable cue."""
    check_augmentation(zoom=zoom, rotate=rotate)

    def augment(x):
        n, h, w = tf.shape(x)[0], tf.cast(tf.shape(x)[1], tf.float32), tf.cast(tf.shape(x)[2], tf.float32)
        inv = tf.exp(-tf.random.uniform([n], -1.0, 1.0, seed=seed) * float(np.log1p(zoom)))  # 1 / scale
        angle = tf.random.uniform([n], -1.0, 1.0, seed=seed + 1) * float(np.radians(rotate))
        a, b = inv * tf.cos(angle), inv * tf.sin(angle)
        # Output pixel p reads input c + R(-angle) (p - c) / scale: the centre c stays put.
        cx, cy = (w - 1) / 2, (h - 1) / 2
        zero = tf.zeros_like(inv)
        transforms = tf.stack([a, -b, cx - a * cx + b * cy, b, a, cy - b * cx - a * cy, zero, zero], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")

    return augment


def random_flips(mode, seed=0):
    """A batch augmentation: random horizontal flips (`mode="horizontal"`), or horizontal
    and vertical ones (`"both"`), one draw per image and axis; None for `"none"`."""
    if mode not in FLIPS:
        raise ValueError(f"Expected flips in {FLIPS}. Received: flips={mode!r}")
    if mode == "none":
        return None
    axes = (2,) if mode == "horizontal" else (2, 1)

    def augment(x):
        for axis in axes:
            flip = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], seed=seed) < 0.5
            x = tf.where(flip, tf.reverse(x, [axis]), x)
        return x

    return augment


def grain_crop(out_size, margin=0.15, threshold=GRAIN_THRESHOLD):
    """A batch transform: a square crop around each image's grain (its bright pixels' box,
    widened by `margin` of its longer side, centred), resized to `out_size`. The grain then
    fills the frame whatever the camera's zoom, so shape, not absolute size, is what a model
    sees. An image with no bright pixel is resized whole."""

    def crop(x):
        n, h, w = tf.shape(x)[0], tf.cast(tf.shape(x)[1], tf.float32), tf.cast(tf.shape(x)[2], tf.float32)
        mask = grain_mask(x, threshold) > 0
        rows, cols = tf.reduce_any(mask, axis=2), tf.reduce_any(mask, axis=1)

        def extent(v, size):  # first and last True index along one axis (whole axis if none)
            first = tf.cast(tf.argmax(tf.cast(v, tf.int32), axis=1), tf.float32)
            last = size - 1 - tf.cast(tf.argmax(tf.cast(v[:, ::-1], tf.int32), axis=1), tf.float32)
            found = tf.reduce_any(v, axis=1)
            return tf.where(found, first, 0.0), tf.where(found, last, size - 1)

        y0, y1 = extent(rows, h)
        x0, x1 = extent(cols, w)
        half = tf.maximum(y1 - y0, x1 - x0) / 2 * (1 + margin) + 1
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        boxes = tf.stack([(cy - half) / (h - 1), (cx - half) / (w - 1), (cy + half) / (h - 1),
                          (cx + half) / (w - 1)], axis=1)
        return tf.image.crop_and_resize(x, boxes, tf.range(n), (out_size, out_size))

    return crop


def grey_world(x, threshold=GRAIN_THRESHOLD):
    """Per-image colour normalisation: each channel is scaled so the grain's mean colour is
    grey (the three channel means equal, brightness kept), removing a batch's colour cast."""
    mask = grain_mask(x, threshold)[..., None]
    mean = tf.reduce_sum(x * mask, axis=(1, 2), keepdims=True) / tf.maximum(
        tf.reduce_sum(mask, axis=(1, 2), keepdims=True), 1.0)
    gain = tf.reduce_mean(mean, axis=-1, keepdims=True) / tf.maximum(mean, 1.0)
    return tf.clip_by_value(x * gain, 0.0, 255.0)


def preprocessing(name):
    """The input transform a model was trained with, on RGB batches in [0, 255]:
    vgg16 (BGR minus the ImageNet mean, as the rice models), cifar10 / cifar100 (per-
    channel mean and std, as the CIFAR models), unit ([0, 1]) or none. The input is never
    changed."""
    if name == "vgg16":
        import keras

        def vgg16(x):  # Keras edits a float NumPy array in place: the caller's array is left as it was
            return keras.applications.vgg16.preprocess_input(np.array(x) if isinstance(x, np.ndarray) else x)
        return vgg16
    if name in CIFAR_STATS:
        mean, std = (tf.constant(v, tf.float32) * 255.0 for v in CIFAR_STATS[name])
        return lambda x: (x - mean) / std
    if name == "unit":
        return lambda x: x / 255.0
    if name == "none":
        return None
    raise ValueError(f"Expected preprocessing in {PREPROCESSING}. Received: preprocess={name!r}")


def load_image(path, image_size):
    """Decoded RGB image resized to (image_size, image_size), float32 in [0, 255]."""
    img = tf.cast(tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False), tf.float32)
    # An image already at the size (CIFAR's 32x32) skips the resize: it was most of the decode time.
    same = tf.reduce_all(tf.shape(img)[:2] == image_size)
    img = tf.cond(same, lambda: img,
                  lambda: tf.image.resize(img, (image_size, image_size), antialias=True))
    img.set_shape((image_size, image_size, 3))
    return img


def folder_dataset(paths, labels, image_size, batch_size, preprocess=None, shuffle=False, seed=0,
                   augment=None, cache=True):
    """A batched tf.data pipeline of (image, label) from file paths.

    Decoding and resizing happen once and are cached in memory; `augment` (a
    callable on a batch) and `preprocess` run per batch after the cache.
    """
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int64)))
    ds = ds.map(lambda p, y: (load_image(p, image_size), y), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=AUTOTUNE)
    if preprocess is not None:
        ds = ds.map(lambda x, y: (preprocess(x), y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


# ------------------------------------------------------------------------ CIFAR
TFDS_HOST = ("storage.googleapis.com", 443)


def network_reachable(address=TFDS_HOST, timeout=3.0):
    """Whether a TCP connection to `address` opens within `timeout` seconds."""
    import socket

    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def load_cifar_tfds(name, split, data_dir=None, limit=None, echo=print):
    """(images uint8 (N, 32, 32, 3), labels int64) of a tfds CIFAR split.

    When the data is not prepared in `data_dir` yet, the download host is tried
    first (3 s): offline, a ValueError says so at once instead of after minutes of
    tfds retries."""
    import tensorflow_datasets as tfds

    if name not in CIFAR_STATS:
        raise ValueError(f"Expected dataset in {tuple(CIFAR_STATS)}. Received: dataset={name!r}")
    try:
        # tfds.testing.mock_data replaces the download: nothing to fetch then.
        mocked = tfds.core.dataset_builder.DatasetBuilder.download_and_prepare.__module__.endswith("mocking")
        prepared = mocked or tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # an unreadable data_dir: let tfds.load report it below
        prepared = True
    if not prepared:
        if not network_reachable():
            raise ValueError(
                f"{name} is not in the tfds data_dir ({data_dir or '~/tensorflow_datasets'}) and "
                f"{TFDS_HOST[0]} cannot be reached to download it. Without internet pass --image-dir with "
                "{train,test}/<class>/*.jpg, or --data-dir pointing at a tfds folder that already holds it.")
        echo(f"downloading and preparing {name} with tensorflow_datasets (once; about 170 MB)...")
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True)
    except Exception as e:  # tfds raises download, network and file errors of many types
        raise ValueError(
            f"Could not load {name}/{split} with tensorflow_datasets ({type(e).__name__}: {e}). It downloads "
            "the data on first use; without internet pass --image-dir with {train,test}/<class>/*.jpg, or "
            "--data-dir pointing at a tfds folder that already holds it."
        ) from e
    if limit is not None:
        ds = ds.take(int(limit))
    images, labels = [], []
    for x, y in tfds.as_numpy(ds.batch(4096)):
        images.append(x)
        labels.append(y)
    if not images:
        raise ValueError(f"The tfds split {name}/{split} has no examples.")
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int64)


def load_cifar_folder(root, split, limit=None, seed=0):
    """(images, labels, class_names) from `root/<split>/<class>/*.jpg` (the shared CIFAR
    JPEG layout), decoded into memory; `limit` keeps a seeded stratified subset."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ValueError(f"Data folder not found: {folder!r}. Expected {root}/{split}/<class>/<image>.jpg")
    per_class = None
    if limit is not None:
        n_classes = len([d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))])
        per_class = max(1, int(limit) // max(n_classes, 1))
    paths, labels, names = list_image_folder(folder, per_class, seed)
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: tf.image.decode_jpeg(tf.io.read_file(p), channels=3), num_parallel_calls=AUTOTUNE)
    try:
        images = list(ds.as_numpy_iterator())
    except tf.errors.OpError:
        check_readable(paths)  # names the bad files
        raise
    shape = images[0].shape
    for path, img in zip(paths, images):
        if img.shape != shape:
            raise ValueError(f"Expected every image of {folder!r} to be {shape[1]}x{shape[0]} like "
                             f"{paths[0]!r}. Received: {img.shape[1]}x{img.shape[0]} in {path!r}")
    return np.stack(images).astype(np.uint8), labels, names


def cifar_dataset(images, labels, num_classes, batch_size, mean, std, training=False, seed=0,
                  randaugment=False, random_erasing=0.0, cache=True):
    """Normalised CIFAR batches (x, one-hot y). Training adds 4-pixel-pad random crops,
    horizontal flips, and optionally RandAugment and random erasing."""
    import keras

    mean = tf.constant(mean, tf.float32) * 255.0
    std = tf.constant(std, tf.float32) * 255.0
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    # One fresh stateless seed pair per batch and epoch: reproducible from `seed`.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    aug_layers = []
    if training and randaugment:
        aug_layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed))
    if training and random_erasing > 0:
        aug_layers.append(keras.layers.RandomErasing(factor=random_erasing, value_range=(0, 255), seed=seed))

    def prepare(batch, s):
        x, y = batch
        x = tf.cast(x, tf.float32)
        if training:
            x = random_crop_flip(x, s, pad=4)
            for layer in aug_layers:
                x = layer(x, training=True)
        x = (x - mean) / std
        return x, tf.one_hot(y, num_classes)

    return tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def random_crop_flip(x, seed, pad=4):
    """Per-image random crops of the `pad`-reflect-padded batch and random horizontal
    flips, vectorised over the batch; `seed` is a stateless seed pair."""
    n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform([n, 2], seed=seed, maxval=2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(h)[None]
    cols = offsets[:, 1:] + tf.range(w)[None]
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    x = tf.gather(x, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([n, 1, 1, 1], seed=seed[::-1]) < 0.5
    return tf.where(flip, tf.reverse(x, axis=[2]), x)
