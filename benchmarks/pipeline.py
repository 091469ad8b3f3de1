"""Training throughput from a JPEG folder (experiments.data.folder_dataset) against the
same images fed from memory.

    PYTHONPATH=. python benchmarks/pipeline.py --images 2048 --epochs 3 --rounds 2

Target (issue 11): while training, the folder pipeline delivers at least 95% of the
images per second of the in-memory pipeline. Both feed the same decoded images through
the same shuffle, batch, preprocessing and prefetch into the same model's `fit`; the
folder pipeline also reads and decodes every JPEG in its first epoch (then caches).
Rounds alternate folder and memory runs, each on a freshly built model and dataset.
"""

import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402

CIFAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                     "cifar10", "train")


def decode_throughput(paths, image_size, rounds):
    """Images/s of decoding alone, with `load_image` and with the resize it now skips
    at the target size (the previous load_image), interleaved; and their max difference."""
    import tensorflow as tf

    from experiments.data import AUTOTUNE, load_image

    def always_resize(p):
        img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        return tf.image.resize(tf.cast(img, tf.float32), (image_size, image_size), antialias=True)

    res = {"before: always resize": [], "after: load_image": []}
    for _ in range(rounds):
        for name, fn in zip(res, (always_resize, lambda p: load_image(p, image_size))):
            ds = tf.data.Dataset.from_tensor_slices(paths).map(fn, num_parallel_calls=AUTOTUNE).batch(64)
            start = time.perf_counter()
            n = sum(int(b.shape[0]) for b in ds.prefetch(AUTOTUNE))
            res[name].append(n / (time.perf_counter() - start))
    diff = max(float(np.abs(always_resize(p).numpy() - load_image(p, image_size).numpy()).max()) for p in paths[:64])
    return {k: float(np.median(v)) for k, v in res.items()}, diff


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default=CIFAR, show_default=True, help="Folder of <class>/<image>.jpg.")
@click.option("--images", type=int, default=2048, show_default=True, help="Images used (stratified).")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating folder/memory rounds.")
@click.option("--width", type=float, default=0.25, show_default=True, help="VGG16-BN width of the model trained.")
@click.option("--out", default=os.path.join("results", "pipeline.md"), show_default=True)
def main(data, images, image_size, batch_size, epochs, rounds, width, out):
    """Measure images/s of fit() from both pipelines; write a markdown table."""
    import keras
    import tensorflow as tf

    from experiments.common import write_text
    from experiments.data import AUTOTUNE, folder_dataset, list_image_folder, load_image, preprocessing
    from experiments.models import vgg16_bn_cifar
    from pruning import TimeHistory

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
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy",
                      jit_compile=False)
        model.fit(make_ds().take(1), epochs=1, verbose=0)  # trace the train step outside the timing
        timer = TimeHistory()
        model.fit(make_ds(), epochs=epochs, verbose=0, callbacks=[timer])
        return timer.times

    load = [os.getloadavg()]
    times = {"folder": [], "memory": []}
    for _ in range(rounds):
        for name, make in (("folder", folder), ("memory", memory_dataset)):
            times[name].append(train(make))
            load.append(os.getloadavg())
    n = len(paths)
    ips = {k: np.asarray([[n / t for t in run] for run in v]) for k, v in times.items()}  # rounds x epochs
    total = {k: float(np.median([n * epochs / sum(run) for run in v])) for k, v in times.items()}
    cmd = (f"PYTHONPATH=. python benchmarks/pipeline.py --images {images} --image-size {image_size} "
           f"--batch-size {batch_size} --epochs {epochs} --rounds {rounds} --width {width}")
    lines = [
        f"## Input pipeline while training: JPEG folder vs memory ({n} images, {image_size}x{image_size})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}. Load average "
        f"(1, 5, 15 min) before and after each run: {'; '.join(', '.join(f'{v:.1f}' for v in l) for l in load)}. "
        f"Model: VGG16-BN width {width}, batch {batch_size}, SGD; images/s of `fit` per epoch, median over "
        f"{rounds} alternating rounds. Folder epoch 1 includes reading and decoding the JPEGs.",
        f"Command: `{cmd}`",
        "",
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
    text = "\n".join(lines) + "\n"
    write_text(out, text)
    click.echo(text)


if __name__ == "__main__":
    main()
