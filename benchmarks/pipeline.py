"""Training throughput from a JPEG folder (experiments.data.folder_dataset) against the
same images fed from memory.

    python -m benchmarks.pipeline --images 2048 --epochs 3 --rounds 2

Target: while training, the folder pipeline delivers at least 95% of the
images per second of the in-memory pipeline. Both feed the same decoded images through
the same shuffle, batch, preprocessing and prefetch into the same model's `fit`; the
folder pipeline also reads and decodes every JPEG in its first epoch (then caches).
Rounds alternate folder and memory runs, each on a freshly built model and dataset.
"""

import os

import click
import numpy as np

from benchmarks import command, invocation, machine_line, timed, write

CIFAR = os.path.join("..", "shared", "data", "cifar10", "train")


def decode_throughput(paths, image_size, rounds):
    """Images/s of decoding alone, interleaved: with `load_image` and with a decode that always
    resizes (the resize `load_image` skips at the target size); and their max difference."""
    import tensorflow as tf

    from experiments.data import AUTOTUNE, load_image

    def always_resize(p):
        img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        return tf.image.resize(tf.cast(img, tf.float32), (image_size, image_size), antialias=True)

    res = {"before: always resize": [], "after: load_image": []}
    for _ in range(rounds):
        for name, fn in zip(res, (always_resize, lambda p: load_image(p, image_size))):
            ds = tf.data.Dataset.from_tensor_slices(paths).map(fn, num_parallel_calls=AUTOTUNE).batch(64)
            n, seconds = timed(lambda: sum(int(b.shape[0]) for b in ds.prefetch(AUTOTUNE)))
            res[name].append(n / seconds)
    diff = max(float(np.abs(always_resize(p).numpy() - load_image(p, image_size).numpy()).max()) for p in paths[:64])
    return {k: float(np.median(v)) for k, v in res.items()}, diff


@command("pipeline")
@click.option("--data", default=CIFAR, show_default=True, help="Folder of <class>/<image>.jpg.")
@click.option("--images", type=int, default=2048, show_default=True, help="Images used (stratified).")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating folder/memory rounds.")
@click.option("--width", type=float, default=0.25, show_default=True, help="VGG16-BN width of the model trained.")
def main(data, images, image_size, batch_size, epochs, rounds, width, output):
    """Measure images/s of fit() from both pipelines; write a markdown table."""
    import keras
    import tensorflow as tf

    from experiments.data import AUTOTUNE, folder_dataset, list_image_folder, load_image, preprocessing
    from experiments.models import vgg16_bn_cifar
    from pruning import TimeHistory
    from pruning.stats import machine_description

    n_classes = len([d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d))])
    paths, labels, _ = list_image_folder(data, max(1, images // n_classes), seed=0)
    prep = preprocessing("cifar10")
    decoded = np.stack(list(tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: load_image(p, image_size), num_parallel_calls=AUTOTUNE).as_numpy_iterator()))

    def memory_dataset():
        ds = tf.data.Dataset.from_tensor_slices((decoded, labels))
        ds = ds.shuffle(len(paths), seed=0, reshuffle_each_iteration=True).batch(batch_size)
        return ds.map(lambda x, y: (prep(x), y), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    def folder():
        return folder_dataset(paths, labels, image_size, batch_size, preprocess=prep, shuffle=True, seed=0)

    def train(make_ds):
        keras.utils.set_random_seed(0)
        model = vgg16_bn_cifar(n_classes, width=width, input_shape=(image_size, image_size, 3), seed=0)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy", jit_compile=False)
        model.fit(make_ds().take(1), epochs=1, verbose=0)  # trace the train step outside the timing
        timer = TimeHistory()
        model.fit(make_ds(), epochs=epochs, verbose=0, callbacks=[timer])
        return timer.times

    before = machine_description()
    times = {"folder": [], "memory": []}
    for _ in range(rounds):
        for name, make in (("folder", folder), ("memory", memory_dataset)):
            times[name].append(train(make))
    n = len(paths)
    ips = {k: np.asarray([[n / t for t in run] for run in v]) for k, v in times.items()}  # rounds x epochs
    total = {k: float(np.median([n * epochs / sum(run) for run in v])) for k, v in times.items()}
    lines = [
        f"## Input pipeline while training: JPEG folder vs memory ({n} images, {image_size}x{image_size})", "",
        f"{machine_line(before)} TensorFlow {tf.__version__}. Model: VGG16-BN width {width}, batch {batch_size}, SGD; images/s of `fit` per epoch, median over "
        f"{rounds} alternating rounds. Folder epoch 1 includes reading and decoding the JPEGs.",
        f"Command: `{invocation()}`", "",
        "| pipeline | " + " | ".join(f"epoch {e + 1} img/s" for e in range(epochs)) + " | all epochs img/s |",
        "|---|" + "---|" * (epochs + 1),
    ]
    for k in ("folder", "memory"):
        lines.append(f"| {k} | " + " | ".join(f"{v:.0f}" for v in np.median(ips[k], axis=0))
                     + f" | {total[k]:.0f} |")
    decode, diff = decode_throughput(paths, image_size, rounds + 1)
    lines += ["", "Decoding alone (no training), img/s: " + "; ".join(f"{k} {v:.0f}" for k, v in decode.items())
              + f" (max |difference| of the images: {diff:g})."]
    lines += ["", f"Folder / memory, all epochs: **{total['folder'] / total['memory']:.3f}**; epochs 2+: "
              f"**{np.median(ips['folder'][:, 1:]) / np.median(ips['memory'][:, 1:]):.3f}**"
              if epochs > 1 else ""]
    write(output, lines)


if __name__ == "__main__":
    main()
