"""HRank rank generation against one forward pass, on VGG16-BN (CIFAR, 32x32).

    python -m benchmarks.hrank_speed --batches 20 --batch-size 128 --rounds 2

Target: HRank scores of all 13 convs over 20 x 128 images cost at most 3x
one forward pass over the same images, with ranks equal to numpy.linalg.matrix_rank's.

Per batch it runs the feature probe once, then ranks every layer's maps twice: with
`numpy.linalg.matrix_rank` (the reference, "before") and with `feature_map_ranks`
("after"), asserting that they are equal. Then it times, in
interleaved rounds, one forward pass of the model over all batches and a whole
`HRankRanker.rank_all` (forward + ranks, overlapped) over the same batches.
"""

import os

import click
import numpy as np

from benchmarks import command, invocation, machine_line, timed, write

CIFAR = os.path.join("..", "shared", "data", "cifar10")


def cifar_batches(root, n_batches, batch_size, seed=0):
    """Normalised float32 batches of CIFAR-10 training JPEGs (random normal if absent)."""
    from experiments.data import CIFAR_STATS, load_cifar_folder

    n = n_batches * batch_size
    if os.path.isdir(os.path.join(root, "train")):
        images, _, _ = load_cifar_folder(root, "train", limit=n, seed=seed)
        mean, std = (np.asarray(v, np.float32) * 255 for v in CIFAR_STATS["cifar10"])
        x = (images.astype(np.float32) - mean) / std
        source = "CIFAR-10 train JPEGs from " + os.path.normpath(root)
    else:
        x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
        source = "random normal images (CIFAR folder not found)"
    x = x[: n // batch_size * batch_size]
    source = f"{len(x)} {source}"
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)], source


@command("hrank_speed")
@click.option("--batches", type=int, default=20, show_default=True, help="Batches of images.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Images per batch.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Interleaved rounds of (forward, rank_all).")
@click.option("--data", default=CIFAR, show_default=True, help="CIFAR-10 JPEG root ({train,test}/<class>).")
@click.option("--seed", type=int, default=0, show_default=True)
def main(batches, batch_size, rounds, data, seed, output):
    """Measure HRank's cost in forward passes and write a markdown table."""
    import keras
    import tensorflow as tf

    from experiments.models import vgg16_bn_cifar
    from pruning import CNNModel
    from pruning.rankers import HRankRanker, feature_map_ranks, feature_probe
    from pruning.stats import machine_description

    keras.utils.set_random_seed(seed)
    xs, source = cifar_batches(data, batches, batch_size, seed)
    model = vgg16_bn_cifar(10, width=1.0, seed=seed)
    cnn = CNNModel(model)
    probe = feature_probe(cnn, [cnn.feature_key(c) for c in cnn.conv_layers])
    names = [c.name for c in cnn.conv_layers]
    before_machine = machine_description()

    # --- per layer: numpy.linalg.matrix_rank (before) vs feature_map_ranks (after), equal ranks
    before, after = np.zeros(len(names)), np.zeros(len(names))
    probe_s, mismatches, n_maps, deficient = 0.0, 0, 0, 0
    with click.progressbar(xs, label="per-layer ranks") as bar:
        for x in bar:
            maps, seconds = timed(lambda: [np.asarray(m) for m in probe.predict_on_batch(x)])
            probe_s += seconds
            for j, m in enumerate(maps):
                ref, seconds = timed(np.linalg.matrix_rank, np.transpose(m, (0, 3, 1, 2)))
                before[j] += seconds
                new, seconds = timed(feature_map_ranks, m)
                after[j] += seconds
                mismatches += int(np.count_nonzero(ref != new))
                n_maps += ref.size
                deficient += int(np.count_nonzero(ref < min(m.shape[1:3])))

    # --- interleaved: one forward pass over all batches vs a whole rank_all
    fwd = tf.function(lambda t: model(t, training=False))
    fwd(xs[0]).numpy()
    ranker = HRankRanker()
    fwd_s, hrank_s = [], []
    for _ in range(rounds):
        fwd_s.append(timed(lambda: [fwd(x).numpy() for x in xs])[1])
        hrank_s.append(timed(ranker.rank_all, cnn, data=xs)[1])
    f, h = float(np.median(fwd_s)), float(np.median(hrank_s))
    before_total = probe_s + before.sum()

    lines = [

        f"## HRank rank generation, VGG16-BN width 1, {batches} x {batch_size} images (32x32)", "",
        f"{machine_line(before_machine)} TensorFlow {tf.__version__}, numpy {np.__version__}. Images: {source}; "
        f"model: random init (seed {seed}).",
        f"Command: `{invocation()}`", "",
        f"Ranks equal to numpy.linalg.matrix_rank: {n_maps - mismatches:,} of {n_maps:,} maps "
        f"({mismatches} differ); {deficient:,} maps are rank-deficient.", "",
        "| | seconds | x forward |", "|---|---|---|",
        f"| forward pass over all batches (median of {rounds}) | {f:.2f} | 1.00 |",
        f"| before: probe + numpy.linalg.matrix_rank, sequential | {before_total:.2f} | {before_total / f:.2f} |",
        f"| after: probe + feature_map_ranks, sequential | {probe_s + after.sum():.2f} | "
        f"{(probe_s + after.sum()) / f:.2f} |",
        f"| after: HRankRanker.rank_all, overlapped (median of {rounds}) | {h:.2f} | **{h / f:.2f}** |", "",
        "| layer | map | before: matrix_rank s | after: feature_map_ranks s | speed-up |", "|---|---|---|---|---|",
    ]
    for j, (name, m) in enumerate(zip(names, maps)):
        lines.append(f"| {name} | {m.shape[1]}x{m.shape[2]}x{m.shape[3]} | {before[j]:.2f} | {after[j]:.2f} | "
                     f"{before[j] / max(after[j], 1e-9):.1f}x |")
    lines.append(f"| all (+ probe {probe_s:.2f} s) | | {before.sum():.2f} | {after.sum():.2f} | "
                 f"{before.sum() / max(after.sum(), 1e-9):.1f}x |")
    write(output, lines)
    if mismatches:
        raise SystemExit(f"{mismatches} ranks differ from numpy.linalg.matrix_rank")


if __name__ == "__main__":
    main()
