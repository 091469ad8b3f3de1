"""Grain colour, size, shape and orientation per file-index range of the shared rice folder:
where the photographic batches change, and what changes.

    python benchmarks/rice_batches.py [--data FOLDER] [--split 12000]

Per variety and 1,000-index range: mean colour cast (G-R, B-R), grain area (fraction of the
frame). Then per variety, images N <= --split against N > --split: the grain's length and width
(4 standard deviations along its principal axes, pixels of the 250x250 image), their ratio, and
the share lying near horizontal (principal axis within 20 degrees) or diagonal (25-65 degrees).
"""
import os
import sys

import click
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.splits import file_index, list_image_folder  # noqa: E402  (no TensorFlow)


def grain_stats(path):
    """(G-R, B-R, area fraction, length px, width px, axis angle in degrees [0, 180))."""
    a = np.asarray(Image.open(path).convert("RGB"), np.float32)
    mask = a.sum(-1) > 60  # grain pixels on the black background
    g = a[mask]
    ys, xs = np.nonzero(mask)
    ev, vec = np.linalg.eigh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    angle = np.degrees(np.arctan2(vec[1, 1], vec[0, 1])) % 180
    return (g[:, 1] - g[:, 0]).mean(), (g[:, 2] - g[:, 0]).mean(), mask.mean(), 4 * np.sqrt(ev[1]), \
        4 * np.sqrt(ev[0]), angle


@click.command()
@click.option("--data", default="../shared/data/rice/Rice_Image_Dataset", show_default=True)
@click.option("--split", default=12000, show_default=True, help="Compare files N <= SPLIT with N > SPLIT.")
def main(data, split):
    paths, labels, names = list_image_folder(data)
    for label, v in enumerate(names):
        files = [paths[i] for i in np.flatnonzero(labels == label)]
        n = np.array([file_index(f) for f in files])
        s = np.array([grain_stats(f) for f in files])
        print(v, len(files), "images, indices", n.min(), "-", n.max())
        for lo in range(0, 15000, 1000):
            k = (n > lo) & (n <= lo + 1000)
            if k.sum():
                print(f"  {lo + 1:5d}-{lo + 1000:5d} n={k.sum():3d} G-R={s[k, 0].mean():5.1f} "
                      f"B-R={s[k, 1].mean():5.1f} area={s[k, 2].mean():.3f}")
        for name, k in ((f"N <= {split}", n <= split), (f"N > {split}", n > split)):
            length, width, angle = s[k, 3], s[k, 4], s[k, 5]
            folded = np.minimum(angle, 180 - angle)  # 0: horizontal, 90: vertical
            print(f"  {name:>9}: length {length.mean():5.1f} +- {length.std():4.1f} px, width {width.mean():4.1f} px, "
                  f"length/width {np.mean(length / width):4.2f} +- {np.std(length / width):4.2f}, "
                  f"horizontal {np.mean(folded < 20):.2f}, diagonal {np.mean((folded > 25) & (folded < 65)):.2f}")


if __name__ == "__main__":
    main()
