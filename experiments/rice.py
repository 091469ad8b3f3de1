"""Experiment 2: transfer learning on the Rice Image Dataset, then L1 pruning.

VGG16 (ImageNet, HED, none, or a weights file) -> frozen-base feature extraction
-> optional fine-tuning of the top convs -> prune the convs at several ratios ->
retrain the head (pruned convs frozen) or everything -> evaluate. The baseline and
each ratio are logged runs; each pruned run points at its baseline.
"""

import dataclasses
import os
from typing import Optional

import keras
import numpy as np

from experiments import common
from experiments.data import (batch_split, colour_jitter, drop_unreadable, folder_dataset, grain_crop,
                              grey_world, list_image_folder, preprocessing, stratified_split)
from experiments.models import resolve_weights, rice_classifier
from pruning import check_ratio, inline

HEAD_LAYERS = ("features", "fc1", "dropout", "predictions")
SPLITS = ("train", "val", "test")
RETRAIN_CHOICES = ("head", "all")
SPLIT_BY = ("random", "batch")
EARLY_STOP = ("loss", "balanced")
# Extra evaluation sets besides the random test split: the held-out photographic batch
# (--split-by batch) and a separate folder (--eval-dir). Each is logged as its own metrics.
EXTRA_EVALS = ("heldout", "eval_dir")


@dataclasses.dataclass
class RiceConfig:
    data_dir: str = os.path.join("data", "rice_sample")
    image_size: int = 224  # pixels, square
    limit_per_class: Optional[int] = None
    split: tuple = (0.7, 0.15, 0.15)  # train / val / test fractions of each class
    split_by: str = "random"  # random | batch: also hold out the images whose file index is in holdout_range
    holdout_range: tuple = (12001, 15000)  # file indices N of '<variety> (N).jpg', inclusive (a later batch)
    eval_dir: Optional[str] = None  # another <variety>/*.jpg folder every model is also evaluated on
    seed: int = 0
    weights: str = "imagenet"  # imagenet | hed | auto (imagenet if it loads, else hed) | none | weights file
    pretrained: Optional[str] = None  # a trained baseline .keras file: skips phases 1 and 2
    pooling: str = "avg"  # avg (GlobalAveragePooling) | flatten
    batch_size: int = 16
    head_epochs: int = 30  # phase 1 (early stopping usually ends it sooner)
    head_lr: float = 1e-3
    unfreeze: int = 0  # phase 2: how many of the top conv layers to fine-tune (0: skip)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-5
    patience: int = 5  # EarlyStopping, best weights restored
    early_stop: str = "loss"  # loss: val_loss | balanced: mean per-class recall on val (every variety counts)
    augment: bool = False  # random flips; turns off feature caching
    grain_crop: bool = False  # square crop around the grain (loaded at 2x image_size first): zoom-invariant
    grey_world: bool = False  # per-image colour normalisation: the grain's mean colour made grey
    colour_jitter: tuple = (0.0, 0.0, 0.0)  # max hue shift (fraction of the circle), saturation, brightness
    views: int = 0  # cached path: jittered copies of the training set run through the frozen part once
    ranker: str = "l1"
    ratios: tuple = (0.05, 0.1, 0.2)
    exclude: tuple = ("block5_conv3",)
    round_to: int = 16  # round kept filter counts to a multiple of this (1: exact int(ratio * n))
    retrain: str = "head"  # head: pruned convs frozen | all
    retrain_epochs: int = 30
    out_dir: str = os.path.join("runs", "rice")
    latency_batch: int = 16
    latency_runs: int = 10
    verbose: int = 2

    def validate(self):
        from pruning.rankers import get_ranker

        if not os.path.isdir(self.data_dir):
            raise ValueError(f"Data folder not found: {self.data_dir!r}. Expected a folder of "
                             "<variety>/<image>.jpg such as Rice_Image_Dataset")
        if self.retrain not in RETRAIN_CHOICES:
            raise ValueError(f"Expected retrain in {RETRAIN_CHOICES}. Received: retrain={self.retrain!r}")
        if self.image_size < 32:
            raise ValueError(f"Expected image_size >= 32 (VGG16 pools 5 times). Received: {self.image_size}")
        for r in self.ratios:
            check_ratio(r)
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"Expected split_by in {SPLIT_BY}. Received: split_by={self.split_by!r}")
        if self.early_stop not in EARLY_STOP:
            raise ValueError(f"Expected early_stop in {EARLY_STOP}. Received: early_stop={self.early_stop!r}")
        if self.eval_dir is not None and not os.path.isdir(self.eval_dir):
            raise ValueError(f"Evaluation folder not found: {self.eval_dir!r}. Expected a folder of "
                             "<variety>/<image>.jpg with the same varieties as the data folder")
        if self.views < 0:
            raise ValueError(f"Expected views >= 0. Received: views={self.views}")
        colour_jitter(*self.colour_jitter)  # checks the ranges
        if any(self.colour_jitter) and not (self.augment or self.views):
            raise ValueError(f"colour_jitter={tuple(self.colour_jitter)} needs views >= 1 (jittered copies on "
                             "the cached-feature path) or augment (training on images).")
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ValueError(f"Pretrained model not found: {self.pretrained!r}")
        get_ranker(self.ranker)


def _flip(x):
    return keras.ops.where(keras.random.uniform((keras.ops.shape(x)[0], 1, 1, 1)) < 0.5, x[:, :, ::-1], x)


def train_augmentation(cfg, flips):
    """The batch augmentation of training images: colour jitter, then random flips."""
    return _chain(([colour_jitter(*cfg.colour_jitter, seed=cfg.seed)] if any(cfg.colour_jitter) else [])
                  + ([_flip] if flips else []))


def _chain(fns):
    """One batch function applying `fns` in order (None if there are none)."""
    if not fns:
        return None

    def chained(x):
        for fn in fns:
            x = fn(x)
        return x

    return chained


def load_size(cfg):
    """Decoded image size: twice the input size when the grain is cropped out of it."""
    return 2 * cfg.image_size if cfg.grain_crop else cfg.image_size


def input_transform(cfg):
    """Batch transform from decoded RGB [0, 255] to model input, at training and evaluation
    alike: --grain-crop, --grey-world, then VGG16's (BGR minus the ImageNet mean). A saved
    model expects inputs made this way (the run's config records the flags)."""
    return _chain(([grain_crop(cfg.image_size)] if cfg.grain_crop else []) + ([grey_world] if cfg.grey_world else [])
                  + [preprocessing("vgg16")])


class RiceData:
    """Files, split and pipelines: `ordered` batches of each split (for features and
    evaluation) and `train`, shuffled (and augmented with --augment), for fitting.
    `ordered` also holds "heldout" (--split-by batch) and "eval_dir" (--eval-dir) when set."""

    def __init__(self, cfg):
        paths, labels, self.class_names = list_image_folder(cfg.data_dir, cfg.limit_per_class, cfg.seed)
        self.paths, self.labels, self.unreadable = drop_unreadable(paths, labels)
        if cfg.split_by == "batch":
            *self.split, heldout = batch_split(self.paths, self.labels, cfg.holdout_range, cfg.split, cfg.seed)
        else:
            self.split, heldout = stratified_split(self.labels, cfg.split, cfg.seed), None
        self.pre = input_transform(cfg)
        self.cfg = cfg
        self.ordered, self.ys, self.files = {}, {}, {}
        for name, idx in zip(SPLITS, self.split):
            if len(idx) == 0:
                raise ValueError(f"The {name} split is empty: {len(self.paths)} images are too few "
                                 f"for fractions {tuple(cfg.split)}.")
            self._add(name, [self.paths[i] for i in idx], self.labels[idx])
        if heldout is not None:
            self._add("heldout", [self.paths[i] for i in heldout], self.labels[heldout])
        if cfg.eval_dir:
            e_paths, e_labels, e_names = list_image_folder(cfg.eval_dir)
            if e_names != self.class_names:
                raise ValueError(f"The evaluation folder {cfg.eval_dir!r} has classes {e_names}; "
                                 f"expected the data folder's {self.class_names}.")
            e_paths, e_labels, self.eval_unreadable = drop_unreadable(e_paths, e_labels)
            self._add("eval_dir", e_paths, e_labels)
        self.train = self.train_images(shuffle=True, flips=cfg.augment)

    def _add(self, name, paths, labels):
        self.files[name], self.ys[name] = paths, labels
        self.ordered[name] = folder_dataset(paths, labels, load_size(self.cfg), self.cfg.batch_size,
                                            preprocess=self.pre)

    def train_images(self, shuffle, flips):
        """Training batches, augmented by --colour-jitter (and flips): re-drawn each pass."""
        cfg = self.cfg
        return folder_dataset(self.files["train"], self.ys["train"], load_size(cfg), cfg.batch_size,
                              preprocess=self.pre, shuffle=shuffle, seed=cfg.seed,
                              augment=train_augmentation(cfg, flips))

    @property
    def num_classes(self):
        return len(self.class_names)

    def y(self, name):
        return self.ys[name]


class BalancedRecall(keras.callbacks.Callback):
    """Adds `val_balanced_recall` (mean per-class recall on the validation data) to the
    epoch logs, for the callbacks after it to monitor: every variety counts equally, so
    a model that gives up one variety to gain on the others is not kept as the best."""

    def __init__(self, x, y, num_classes, batch_size):
        super().__init__()
        self.x, self.y, self.num_classes, self.batch_size = x, np.asarray(y), num_classes, batch_size

    def on_epoch_end(self, epoch, logs=None):
        pred = self.model.predict(self.x, batch_size=self.batch_size, verbose=0).argmax(axis=1)
        cm = common.confusion_matrix(self.y, pred, self.num_classes)
        recall = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
        if logs is not None:
            logs["val_balanced_recall"] = float(recall[cm.sum(axis=1) > 0].mean())


def callbacks(cfg, run, phase, checkpoint, val=None):
    """`val` = (x, y, num_classes): the validation data for --early-stop balanced."""
    monitor, mode, first = "val_loss", "min", []
    if cfg.early_stop == "balanced":
        monitor, mode, first = "val_balanced_recall", "max", [BalancedRecall(*val, cfg.batch_size)]
    return common.epoch_callbacks(run, phase, first + [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.2,
                                          patience=max(1, cfg.patience // 2), min_lr=1e-7),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor=monitor, mode=mode, save_best_only=True,
                                        save_weights_only=True),
    ])


def _layer_input(model, name):
    """The tensor `model` feeds into layer `name` (its first node is the model's own)."""
    return model.get_layer(name)._inbound_nodes[0].input_tensors[0]


def chain_suffix(model, start):
    """A model from layer `start`'s input to the output, sharing `model`'s layers.
    `model` must be a chain (each layer reads the previous one's output)."""
    layers = model.layers
    names = [l.name for l in layers]
    x = inp = keras.Input(_layer_input(model, start).shape[1:], name=f"{start}_input")
    for prev, layer in zip(layers[names.index(start) - 1:], layers[names.index(start):]):
        if _layer_input(model, layer.name) is not prev._inbound_nodes[0].output_tensors[0]:
            raise ValueError(f"Cached training needs a chain model; layer '{layer.name}' does not read "
                             f"'{prev.name}'. Use --augment to train on images instead.")
        x = layer(x)
    return keras.Model(inp, x, name=f"from_{start}")


def set_trainable(model, names):
    for layer in model.layers:
        layer.trainable = layer.name in names


def compile_for(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def train(model, trainable, cfg, data, run, phase, out, lr, epochs):
    """Trains the layers named in `trainable`, everything else frozen.

    Without augmentation the frozen layers before the first trainable one are
    deterministic, so their output is computed once per split and the rest of the
    model trains on it (as in Keras' transfer-learning guide); with augmentation
    the whole model runs on the images every epoch.
    """
    set_trainable(model, trainable)
    checkpoint = os.path.join(out, f"{phase}.weights.h5")
    first = next(l.name for l in model.layers if l.trainable and l.weights)
    if cfg.augment or _layer_input(model, first) is model.inputs[0]:
        compile_for(model, lr)
        cbs = callbacks(cfg, run, phase, checkpoint, (data.ordered["val"], data.y("val"), data.num_classes))
        model.fit(data.train, validation_data=data.ordered["val"], epochs=epochs, verbose=cfg.verbose,
                  callbacks=cbs)
        return
    prefix = keras.Model(model.inputs, _layer_input(model, first))
    feats = {name: prefix.predict(data.ordered[name], verbose=0) for name in ("train", "val")}
    x, y = [feats["train"]], [data.y("train")]
    # --views: jittered copies of the training images, through the frozen part once each.
    jittered = data.train_images(shuffle=False, flips=False) if cfg.views else None
    for _ in range(cfg.views):
        x.append(prefix.predict(jittered, verbose=0))
        y.append(data.y("train"))
    x, y = np.concatenate(x), np.concatenate(y)
    suffix = chain_suffix(model, first)
    compile_for(suffix, lr)
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    cbs = callbacks(cfg, run, phase, checkpoint, (feats["val"], data.y("val"), data.num_classes))
    suffix.fit(x[order], y[order], batch_size=cfg.batch_size, epochs=epochs,
               validation_data=(feats["val"], data.y("val")), verbose=cfg.verbose, callbacks=cbs)


def conv_names(model):
    from pruning import CNNModel

    return [c.name for c in CNNModel(model).conv_layers]


def score(model, data, name):
    """Accuracy, per-class precision/recall and confusion matrix of `model` on one split."""
    pred = model.predict(data.ordered[name], verbose=0).argmax(axis=1)
    y = data.y(name)
    cm = common.confusion_matrix(y, pred, data.num_classes)
    return {"top1": float((pred == y).mean()), "images": int(len(y)), "confusion_matrix": cm.tolist(),
            "per_class": common.per_class_report(cm, data.class_names)}


def evaluate(model, data):
    """Run fields (test_top1) and the metrics JSON: the test split's report at the top
    level, and one report per extra set ("heldout", "eval_dir") under its own key."""
    test = score(model, data, "test")
    details = {"confusion_matrix": test["confusion_matrix"], "class_names": data.class_names,
               "per_class": test["per_class"]}
    for name in EXTRA_EVALS:
        if name in data.ordered:
            details[name] = {**score(model, data, name), "source": _source(data.cfg, name)}
    return {"test_top1": test["top1"]}, details


def _source(cfg, name):
    return cfg.eval_dir if name == "eval_dir" else f"{cfg.data_dir} files {cfg.holdout_range[0]}-{cfg.holdout_range[1]}"


def extra_top1(details):
    """{"heldout_top1": ..., "eval_dir_top1": ...} for the sets that were evaluated."""
    return {f"{name}_top1": details[name]["top1"] for name in EXTRA_EVALS if name in details}


def run_rice(cfg, log, progress=None, echo=print):
    """Baseline + one pruned model per ratio; returns one summary dict per run."""
    cfg.validate()
    common.set_seed(cfg.seed)
    data = RiceData(cfg)
    if data.unreadable:
        echo(f"skipped {len(data.unreadable)} unreadable images: {', '.join(data.unreadable)}")
    weights = cfg.weights if cfg.pretrained else resolve_weights(cfg.weights)
    if weights != cfg.weights:
        echo(f"weights: {cfg.weights} -> {weights}" + (" (ImageNet weights could not be loaded)" if weights == "hed"
                                                       else ""))
    out = os.path.join(cfg.out_dir, f"{os.path.basename(os.path.normpath(cfg.data_dir))}-"
                                    f"{cfg.image_size}px-{os.path.basename(str(weights))}-seed{cfg.seed}")
    os.makedirs(out, exist_ok=True)
    config = {**common.config_dict(cfg), "weights_used": weights, "classes": data.class_names,
              "images": len(data.paths), "split_sizes": [int(len(s)) for s in data.split],
              "extra_eval_sizes": {k: len(data.ys[k]) for k in EXTRA_EVALS if k in data.ys},
              "unreadable": data.unreadable}
    dataset = os.path.basename(os.path.normpath(cfg.data_dir))
    summaries = []

    with log.run("rice", model="vgg16", dataset=dataset, pruning_ratio=0.0, seed=cfg.seed,
                 config=config) as base_run:
        if cfg.pretrained:
            model = inline(keras.models.load_model(cfg.pretrained))
            if model.output_shape[-1] != data.num_classes:
                raise ValueError(f"{cfg.pretrained} predicts {model.output_shape[-1]} classes; "
                                 f"{cfg.data_dir} has {data.num_classes}.")
        else:
            # Inlined into one flat graph, so every layer of the base can be frozen or trained.
            model = inline(rice_classifier(data.num_classes, cfg.image_size, weights, cfg.pooling,
                                           seed=cfg.seed))
            train(model, HEAD_LAYERS, cfg, data, base_run, "head", out, cfg.head_lr, cfg.head_epochs)
            if cfg.unfreeze > 0:
                top = conv_names(model)[-cfg.unfreeze:]
                train(model, set(top) | set(HEAD_LAYERS), cfg, data, base_run, "finetune", out,
                      cfg.finetune_lr, cfg.finetune_epochs)
        metrics, details = evaluate(model, data)
        sizes, latency = common.measure(model, cfg.latency_batch, cfg.latency_runs)
        path = cfg.pretrained or common.save_model(model, os.path.join(out, "baseline.keras"))
        base_run.finish(**metrics, **sizes, artifact=path, metrics={**details, "latency": latency})
    summaries.append({"run_id": base_run.id, "ratio": 0.0, **metrics, **extra_top1(details), **sizes,
                      "speedup": 1.0})
    echo(f"baseline: test accuracy {metrics['test_top1']:.4f}{_extra_text(details)}, {sizes['params']:,} params, "
         f"{sizes['macs']:,} MACs, {sizes['latency_ms']:.1f} ms/batch of {cfg.latency_batch}")

    scores, _ = common.compute_scores(model, cfg.ranker, data=data.ordered["train"], seed=cfg.seed,
                                      rank_batches=20, progress=progress)
    for ratio in cfg.ratios:
        with log.run("rice", model="vgg16", dataset=dataset, ranker=cfg.ranker, pruning_ratio=ratio,
                     parent_id=base_run.id, seed=cfg.seed, config=config) as run:
            common.set_seed(cfg.seed)
            pruned, _ = common.prune_logged(model, scores, ratio, run, exclude=cfg.exclude, ranker=cfg.ranker,
                                            round_to=cfg.round_to)
            trainable = HEAD_LAYERS if cfg.retrain == "head" else {l.name for l in pruned.layers}
            lr = cfg.head_lr if cfg.retrain == "head" else cfg.finetune_lr
            train(pruned, trainable, cfg, data, run, f"retrain_{cfg.retrain}", out, lr, cfg.retrain_epochs)
            p_metrics, p_details = evaluate(pruned, data)
            p_sizes, p_latency = common.measure(pruned, cfg.latency_batch, cfg.latency_runs)
            speedup = sizes["latency_ms"] / p_sizes["latency_ms"]
            path = common.save_model(pruned, os.path.join(out, f"pruned-{cfg.ranker}-{ratio:g}.keras"))
            run.finish(**p_metrics, **p_sizes, artifact=path,
                       metrics={**p_details, "latency": p_latency, "speedup": speedup})
        summaries.append({"run_id": run.id, "ratio": ratio, **p_metrics, **extra_top1(p_details), **p_sizes,
                          "speedup": speedup})
        echo(f"ratio {ratio:g}: test accuracy {p_metrics['test_top1']:.4f}{_extra_text(p_details)}, "
             f"{p_sizes['params']:,} params, "
             f"{p_sizes['macs']:,} MACs, {p_sizes['latency_ms']:.1f} ms/batch ({speedup:.2f}x)")
    return summaries


def _extra_text(details):
    return "".join(f", {k.replace('_top1', '').replace('_', '-')} {v:.4f}" for k, v in extra_top1(details).items())
