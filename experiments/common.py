"""Pieces both experiments share: seeding, saving, measuring, logging a pruned model."""

import contextlib
import dataclasses
import json
import os
import tempfile

import keras
import numpy as np

from pruning import CNNModel, PrunePlan, get_ranker, load_scores, measure_latency, model_stats, prune
from pruning.callbacks import TimeHistory


def set_seed(seed):
    """Seeds Python, NumPy and TensorFlow (the seed is recorded with every run)."""
    keras.utils.set_random_seed(int(seed))


def config_dict(cfg):
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


@contextlib.contextmanager
def atomic_path(path, suffix):
    """Yields a temporary path beside `path` that replaces it once the block succeeds,
    so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, path):
    """Saves a `.keras` file atomically; returns the path."""
    with atomic_path(path, ".keras") as tmp:
        model.save(tmp)
    return path


def write_text(path, text):
    """Writes a text file atomically; returns the path."""
    with atomic_path(path, ".tmp") as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def measure(model, latency_batch=32, latency_runs=10):
    """Params, MACs and inference latency of `model` as run fields."""
    stats = model_stats(model)
    latency = measure_latency(model, batch_size=latency_batch, runs=latency_runs)
    return {
        "params": stats["params"],
        "trainable_params": stats["trainable_params"],
        "macs": stats["macs"],
        "latency_ms": latency["ms_per_batch"],
    }, latency


def compute_scores(model, ranker_name, data=None, ranks_dir=None, seed=0, rank_batches=None,
                   progress=None):
    """Filter scores of every conv, read from `ranks_dir/rank_conv{i}.npy` when all are
    there, else computed with the ranker and saved there. Returns (scores, reused).

    `progress(label, total)`, if given, returns a context manager yielding an
    `update(n)` callable (click.progressbar fits).
    """
    from pruning.rankers import save_scores

    cnn = CNNModel(model)
    if ranks_dir:
        cached = load_scores(cnn, ranks_dir)
        if cached is not None:
            return cached, True
    kwargs = {"seed": seed} if ranker_name == "random" else {}
    if ranker_name == "hrank":
        kwargs["num_batches"] = rank_batches
    ranker = get_ranker(ranker_name, **kwargs)
    total = rank_batches if ranker.needs_data and rank_batches else len(cnn.conv_layers)
    with (progress or _no_progress)(f"ranking filters ({ranker_name})", total) as update:
        scores = ranker.rank_all(cnn, data=data, progress=update)
    if ranks_dir:
        save_scores(scores, cnn, ranks_dir)
    return scores, False


@contextlib.contextmanager
def _no_progress(label, total):
    yield None


def prune_logged(model, scores, ratio, run, exclude=(), ranker=None, round_to=1):
    """Prunes `model` and records the per-layer filter counts of the plan in the log."""
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, scores, ratio, exclude=exclude, meta={"ranker": ranker},
                                 round_to=round_to)
    pruned = prune(cnn, plan)
    if run is not None:
        run.log.log_layer_prunes(run.id, plan, ranker)
    return pruned, plan


def epoch_callbacks(run, phase, extra=()):
    """Per-epoch timing (the log's writer is a TimeHistory) + extra callbacks."""
    return [run.callback(phase) if run is not None else TimeHistory(), *extra]


def confusion_matrix(y_true, y_pred, num_classes):
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def per_class_report(cm, class_names):
    """Precision and recall per class from a confusion matrix (rows: true)."""
    tp = np.diag(cm).astype(float)
    precision = tp / np.maximum(cm.sum(axis=0), 1)
    recall = tp / np.maximum(cm.sum(axis=1), 1)
    return {name: {"precision": float(p), "recall": float(r), "support": int(s)}
            for name, p, r, s in zip(class_names, precision, recall, cm.sum(axis=1))}
