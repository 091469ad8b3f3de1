"""Image-folder listing and splits (numpy only: usable without TensorFlow, e.g. by the
PyTorch recipe search in benchmarks/ on a GPU machine that has no TensorFlow)."""

import os
import re

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_image_folder(root, limit_per_class=None, seed=0):
    """Paths and labels of `root/<class>/*.jpg`, classes sorted by folder name.

    Returns (paths, labels, class_names). With `limit_per_class`, a seeded random
    subset of each class is kept.
    """
    if not os.path.isdir(root):
        raise ValueError(f"Data folder not found: {root!r}. Expected a folder of <class>/<image>.jpg")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not class_names:
        raise ValueError(f"No class folders in {root!r}. Expected a folder of <class>/<image>.jpg")
    if len(class_names) < 2:
        raise ValueError(f"Expected at least 2 class folders in {root!r} (one class trains a model that "
                         f"is always right). Received: {class_names}")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"Expected limit_per_class >= 1. Received: limit_per_class={limit_per_class}")
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"No images in class folder {folder!r}. Expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        if limit_per_class is not None and limit_per_class < len(files):
            files = [files[i] for i in sorted(rng.choice(len(files), limit_per_class, replace=False))]
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64), class_names


def stratified_split(labels, fractions=(0.7, 0.15, 0.15), seed=0):
    """Index arrays (train, val, test): each class is shuffled with `seed` and cut by
    `fractions`, so every split has the class proportions of the whole."""
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"Expected three fractions summing to 1. Received: fractions={tuple(fractions)}")
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            part.extend(chunk.tolist())
    return tuple(np.sort(np.asarray(p, np.int64)) for p in parts)


_INDEX = re.compile(r"\((\d+)\)\.[^.]+$")


def file_index(path):
    """N of a file named `<name> (N).<ext>`: the Rice Image Dataset numbers its images
    in the order they were photographed, so an index range is a photographic batch."""
    m = _INDEX.search(os.path.basename(path))
    if m is None:
        raise ValueError(f"Expected an image named '<name> (N).<ext>' for a batch split. Received: {path!r}")
    return int(m.group(1))


def batch_split(paths, labels, holdout, fractions=(0.7, 0.15, 0.15), seed=0):
    """Index arrays (train, val, test, heldout) that keep a photographic batch out of training.

    `heldout` is every image whose file index N (see `file_index`) lies in the inclusive
    range `holdout` = (first, last), in every class; the other images are split as
    `stratified_split` does, so `test` is a random held-out part of the batches seen in
    training and `heldout` a batch never seen.
    """
    first, last = (int(v) for v in holdout)
    if not 0 <= first <= last:
        raise ValueError(f"Expected a holdout range first-last with 0 <= first <= last. "
                         f"Received: holdout={first}-{last}")
    index = np.array([file_index(p) for p in paths], np.int64)
    labels = np.asarray(labels)
    held = (index >= first) & (index <= last)
    if not held.any():
        raise ValueError(f"No image has a file index in the holdout range {first}-{last} "
                         f"(indices found: {index.min()}-{index.max()}).")
    rest = np.nonzero(~held)[0]
    missing = sorted(set(np.unique(labels).tolist()) - set(np.unique(labels[rest]).tolist()))
    if missing:
        raise ValueError(f"Classes {missing} have no image outside the holdout range {first}-{last}; "
                         "nothing of them is left to train on.")
    train, val, test = (rest[s] for s in stratified_split(labels[rest], fractions, seed))
    return train, val, test, np.nonzero(held)[0]
