"""Experiment 2: transfer learning on the Rice Image Dataset, then L1 pruning.

VGG16 (ImageNet, HED, auto, none, or a weights file) -> frozen-base feature extraction
-> optional fine-tuning of the top convs -> prune the convs at several ratios ->
retrain the head (pruned convs frozen) or everything -> evaluate. The baseline and
each ratio are logged runs; each pruned run points at its baseline.
"""

import os

import keras
import numpy as np

from experiments import common
from experiments.config import RiceConfig
from experiments.data import (batch_split, check_splits, colour_jitter, drop_unreadable, folder_dataset, grain_crop,
                              grey_world, list_image_folder, preprocessing, random_affine, random_flips,
                              stratified_split)
from experiments.models import resolve_weights, rice_classifier
from experiments.study import Study, Variant, resumed_config, run_study
from pruning import CNNModel, inline

HEAD_LAYERS = ("features", "fc1", "dropout", "predictions", "cnn_predictions")
# The grain descriptors' expert (--grain-shape), trained on its own output after the CNN head.
SHAPE_LAYERS = ("shape_fc1", "shape_dropout", "shape_predictions")
SPLITS = ("train", "val", "test")
# Extra evaluation sets besides the random test split: the held-out photographic batch
# (--split-by batch) and a separate folder (--eval-dir). Each is logged as its own metrics.
EXTRA_EVALS = ("heldout", "eval_dir")
# Decoded images of one split are cached in memory up to this size (float32 bytes); a larger
# split (the full Kaggle dataset at 224 px is about 32 GB) is decoded again on each pass.
CACHE_LIMIT_BYTES = 2 * 1024 ** 3


def train_augmentation(cfg):
    """The batch augmentation of training images (--augment, --views): colour jitter,
    zoom and rotation (one resample), then random flips."""
    flips = random_flips(cfg.flips, seed=cfg.seed)
    return _chain(([colour_jitter(*cfg.colour_jitter, seed=cfg.seed)] if any(cfg.colour_jitter) else [])
                  + ([random_affine(cfg.zoom, cfg.rotate, seed=cfg.seed)] if cfg.zoom or cfg.rotate else [])
                  + ([flips] if flips else []))


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
    """Decoded image size: twice the input size when the grain is cropped out of it or
    turned upright inside the model."""
    return 2 * cfg.image_size if cfg.grain_crop or cfg.upright else cfg.image_size


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
        check_splits(self.labels, self.split, self.class_names, SPLITS)
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
        self.train = self.train_images(shuffle=True, augment=cfg.augment)

    def _add(self, name, paths, labels):
        self.files[name], self.ys[name] = paths, labels
        self.ordered[name] = folder_dataset(paths, labels, load_size(self.cfg), self.cfg.batch_size,
                                            preprocess=self.pre, cache=self.fits_in_memory(len(paths)))

    def fits_in_memory(self, images):
        """Whether `images` decoded images stay under CACHE_LIMIT_BYTES."""
        return images * load_size(self.cfg) ** 2 * 3 * 4 <= CACHE_LIMIT_BYTES

    def train_images(self, shuffle, augment):
        """Training batches; with `augment`, augmented as `train_augmentation` says, drawn
        anew on each pass."""
        cfg = self.cfg
        return folder_dataset(self.files["train"], self.ys["train"], load_size(cfg), cfg.batch_size,
                              preprocess=self.pre, shuffle=shuffle, seed=cfg.seed,
                              augment=train_augmentation(cfg) if augment else None,
                              cache=self.fits_in_memory(len(self.files["train"])))

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


def stopping(cfg, val):
    """EarlyStopping and ReduceLROnPlateau on val loss, or with --early-stop balanced on
    the mean per-class val recall; `val` = (x, y, num_classes). Returns (first, last):
    `first` must run before the epoch logger so it logs the recall."""
    if cfg.early_stop != "balanced":
        monitor, mode, first = "val_loss", "min", []
    else:
        monitor, mode, first = "val_balanced_recall", "max", [BalancedRecall(*val, cfg.batch_size)]
    return first, [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.2,
                                          patience=max(1, cfg.patience // 2), min_lr=1e-7),
    ]


def _layer_input(model, name):
    """The tensor `model` feeds into layer `name` (its first node is the model's own)."""
    return model.get_layer(name)._inbound_nodes[0].input_tensors[0]


def adapt_shape_norm(model, images):
    """Sets the `shape_norm` layer's mean and variance to those of the grain descriptors
    of `images` (a dataset of model inputs, or an array); returns the descriptors.
    A model without that layer is left as it is (returns None)."""
    try:
        norm = model.get_layer("shape_norm")
    except ValueError:
        return None
    values = keras.Model(model.inputs, _layer_input(model, "shape_norm")).predict(images, verbose=0)
    norm.adapt(values)
    return values


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


def compile_model(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def expert_output(model, name="cnn_predictions"):
    """The layer name a phase trains toward: an expert's own softmax in a model with
    two experts (--grain-shape), else None (the model's output)."""
    try:
        model.get_layer(name)
    except ValueError:
        return None
    return name


def train(model, trainable, cfg, data, run, phase, lr, epochs, output=None):
    """Trains the layers named in `trainable`, everything else frozen, as a resumable
    phase of `run` (see `common.train_phase`); returns the trained model. With
    `output` (a layer name), the loss is taken on that layer's output instead of the
    model's (one expert of --grain-shape, whose layers the model shares).

    Without augmentation the frozen layers before the first trainable one are
    deterministic, so their output is computed once per split and the rest of the
    model trains on it (as in Keras' transfer-learning guide); with augmentation
    the whole model runs on the images every epoch.
    """
    set_trainable(model, trainable)

    def fit(full, callbacks):
        model = full if output is None else keras.Model(full.inputs, full.get_layer(output).output)
        first = next(l.name for l in model.layers if l.trainable and l.weights)
        if cfg.augment or _layer_input(model, first) is model.inputs[0]:
            compile_model(model, lr)
            before, after = stopping(cfg, (data.ordered["val"], data.y("val"), data.num_classes))
            model.fit(data.train, validation_data=data.ordered["val"], epochs=epochs, verbose=cfg.verbose,
                      callbacks=[*before, *callbacks, *after])
            return
        prefix = keras.Model(model.inputs, _layer_input(model, first))
        feats = {name: prefix.predict(data.ordered[name], verbose=0) for name in ("train", "val")}
        x, y = [feats["train"]], [data.y("train")]
        # --views: augmented copies of the training images, through the frozen part once each.
        jittered = data.train_images(shuffle=False, augment=True) if cfg.views else None
        for _ in range(cfg.views):
            x.append(prefix.predict(jittered, verbose=0))
            y.append(data.y("train"))
        x, y = np.concatenate(x), np.concatenate(y)
        suffix = chain_suffix(model, first)
        compile_model(suffix, lr)
        order = np.random.default_rng(cfg.seed).permutation(len(x))
        before, after = stopping(cfg, (feats["val"], data.y("val"), data.num_classes))
        suffix.fit(x[order], y[order], batch_size=cfg.batch_size, epochs=epochs,
                   validation_data=(feats["val"], data.y("val")), verbose=cfg.verbose,
                   callbacks=[*before, *callbacks, *after])

    return common.train_phase(run, phase, model, fit)


def retrain_layers(model, cfg):
    """Layer names trained after pruning: the head (--retrain head), the --unfreeze top
    convs and the head (top), or every layer (all)."""
    if cfg.retrain == "head":
        return set(HEAD_LAYERS)
    if cfg.retrain == "top":
        return set(conv_names(model)[-cfg.unfreeze:]) | set(HEAD_LAYERS)
    return {layer.name for layer in model.layers}


def conv_names(model):
    return [c.name for c in CNNModel(model).conv_layers]


EXPERTS = ("cnn_predictions", "shape_predictions")


def predict_classes(model, data, name):
    """Predicted classes of `model` on one split, and of each expert of a --grain-shape
    model ({expert layer: classes}), from one pass over the images."""
    experts = [n for n in EXPERTS if expert_output(model, n)]
    probe = model if not experts else keras.Model(
        model.inputs, [model.outputs[0], *(model.get_layer(n).output for n in experts)])
    probs = probe.predict(data.ordered[name], verbose=0)
    probs = probs if experts else [probs]
    return probs[0].argmax(axis=1), {n: p.argmax(axis=1) for n, p in zip(experts, probs[1:])}


def score(pred, data, name):
    """Accuracy, per-class precision/recall and confusion matrix of predictions `pred`
    on one split."""
    y = data.y(name)
    cm = common.confusion_matrix(y, pred, data.num_classes)
    return {"top1": float((pred == y).mean()), "images": int(len(y)), "confusion_matrix": cm.tolist(),
            "per_class": common.per_class_report(cm, data.class_names)}


def evaluate(model, data):
    """Run fields of `model`: test_top1 on the test split; under "metrics" the test
    split's confusion matrix and per-class precision and recall, and one such report
    per extra set ("heldout", "eval_dir") under its own key; under "summary" the
    extra sets' accuracies (heldout_top1, eval_dir_top1) for the results table.
    A --grain-shape model also gets metrics["experts"]: each expert's accuracy alone
    on every set ({"cnn_predictions": {"test": ..., "heldout": ...}, ...})."""
    sets = ["test", *(name for name in EXTRA_EVALS if name in data.ordered)]
    details, experts = {"class_names": data.class_names}, {}
    for name in sets:
        pred, by_expert = predict_classes(model, data, name)
        report = score(pred, data, name)
        if name == "test":
            details.update(confusion_matrix=report["confusion_matrix"], per_class=report["per_class"])
            test_top1 = report["top1"]
        else:
            details[name] = {**report, "source": _source(data.cfg, name)}
        for expert, p in by_expert.items():
            experts.setdefault(expert, {})[name] = float((p == data.y(name)).mean())
    if experts:
        details["experts"] = experts
    return {"test_top1": test_top1, "metrics": details,
            "summary": {f"{name}_top1": details[name]["top1"] for name in EXTRA_EVALS if name in details}}


def _source(cfg, name):
    return cfg.eval_dir if name == "eval_dir" else f"{cfg.data_dir} files {cfg.holdout_range[0]}-{cfg.holdout_range[1]}"


def run_rice(cfg, log, progress=None, echo=print, resume=None):
    """Baseline + one pruned model per ratio; returns one summary dict per run.

    With `resume=run_id` (an interrupted rice run of `log`), `cfg` is ignored: the
    run's recorded config is used and the run continues in its own row; a resumed
    baseline then goes on with every ratio.
    """
    resumed, recorded = resumed_config(log, resume, "rice", RiceConfig)
    cfg = recorded or cfg
    cfg.validate()
    with common.distributed(cfg):
        return run_study(RiceStudy(cfg, progress, echo), log, resume)


class RiceStudy(Study):
    """The rice steps of `experiments.study.run_study`: the data and weights once, a
    VGG16 baseline trained (head, fine-tuning, shape expert) or --pretrained, the filter
    scores once, then per ratio: prune, retrain (`--retrain`), evaluate."""

    experiment = "rice"

    def __init__(self, cfg, progress=None, echo=print):
        common.set_seed(cfg.seed)
        self.cfg, self.progress, self.seed, self.out_dir = cfg, progress, cfg.seed, cfg.out_dir
        self.data = data = RiceData(cfg)
        if data.unreadable:
            echo(f"skipped {len(data.unreadable)} unreadable images: {', '.join(data.unreadable)}")
        self.weights = weights = cfg.weights if cfg.pretrained else resolve_weights(cfg.weights)
        if weights != cfg.weights:
            echo(f"weights: {cfg.weights} -> {weights}" + (" (ImageNet weights could not be loaded)"
                                                           if weights == "hed" else ""))
        config = {**common.config_dict(cfg), "weights_used": weights, "classes": data.class_names,
                  "images": len(data.paths), "split_sizes": [int(len(s)) for s in data.split],
                  "extra_eval_sizes": {k: len(data.ys[k]) for k in EXTRA_EVALS if k in data.ys},
                  "unreadable": data.unreadable}
        dataset = os.path.basename(os.path.normpath(cfg.data_dir))
        self.name = common.slug(dataset, f"{cfg.image_size}px", os.path.basename(str(weights)), f"seed{cfg.seed}")
        self.fields = {"model": "vgg16", "dataset": dataset, "seed": cfg.seed, "config": config}
        self.measure = {"latency_batch": cfg.latency_batch, "latency_runs": cfg.latency_runs, "echo": echo}
        self.baseline_finish = {"filename": "baseline.keras", "artifact": cfg.pretrained,
                                "save": not cfg.pretrained, "label": "baseline"}
        self.baseline_summary = {"ratio": 0.0}

    def evaluate(self, model):
        return evaluate(model, self.data)

    def load_parent(self, path):
        return inline(keras.models.load_model(path))

    def baseline(self, run):
        cfg, data = self.cfg, self.data
        if cfg.pretrained:
            model = inline(keras.models.load_model(cfg.pretrained))
            if model.output_shape[-1] != data.num_classes:
                raise ValueError(f"{cfg.pretrained} predicts {model.output_shape[-1]} classes; "
                                 f"{cfg.data_dir} has {data.num_classes}.")
            if tuple(model.input_shape[1:3]) != (load_size(cfg),) * 2:
                raise ValueError(f"{cfg.pretrained} takes {model.input_shape[1]}x{model.input_shape[2]} "
                                 f"images; --image-size {cfg.image_size} gives {load_size(cfg)}x"
                                 f"{load_size(cfg)} (twice the size with --upright or --grain-crop).")
            for layer in cfg.exclude:
                CNNModel(model).conv(layer)  # an unknown name fails before any work
            return model
        # Inlined into one flat graph, so every layer of the base can be frozen or trained.
        model = inline(rice_classifier(data.num_classes, cfg.image_size, self.weights, cfg.pooling, seed=cfg.seed,
                                       grain_shape=cfg.grain_shape, upright=cfg.upright, grey=cfg.grey))
        adapt_shape_norm(model, data.ordered["train"])
        cnn_out = expert_output(model)
        model = train(model, HEAD_LAYERS, cfg, data, run, "head", cfg.head_lr, cfg.head_epochs, cnn_out)
        top = conv_names(model)[-cfg.unfreeze:] if cfg.unfreeze else []
        if top:
            model = train(model, set(top) | set(HEAD_LAYERS), cfg, data, run, "finetune", cfg.finetune_lr,
                          cfg.finetune_epochs, cnn_out)
        if cfg.grain_shape:
            model = train(model, SHAPE_LAYERS, cfg, data, run, "shape_head", cfg.head_lr, cfg.head_epochs,
                          "shape_predictions")
            # The run's trainable count: every layer some phase trained, both experts.
            set_trainable(model, set(HEAD_LAYERS) | set(SHAPE_LAYERS) | set(top))
        return model

    def prepare(self, model, base):
        self.scores, _ = common.compute_scores(model, self.cfg.ranker, data=self.data.ordered["train"],
                                               seed=self.cfg.seed, rank_batches=20, progress=self.progress)

    def _variant(self, ratio):
        ranker = self.cfg.ranker
        return Variant(ratio, {"ranker": ranker, "pruning_ratio": ratio}, folder=f"{ranker}-{ratio:g}",
                       filename=f"pruned-{ranker}-{ratio:g}.keras", label=f"ratio {ratio:g}",
                       summary={"ratio": ratio})

    def variants(self):
        return [self._variant(ratio) for ratio in self.cfg.ratios]

    def variant_of(self, row):
        return self._variant(row["pruning_ratio"])

    def variant(self, run, model, base, variant):
        cfg = self.cfg
        pruned, _ = common.prune_logged(model, self.scores, variant.key, run, exclude=cfg.exclude, ranker=cfg.ranker,
                                        round_to=cfg.round_to, round_mode=cfg.round_mode)
        lr = cfg.head_lr if cfg.retrain == "head" else cfg.finetune_lr
        return train(pruned, retrain_layers(pruned, cfg), cfg, self.data, run, f"retrain_{cfg.retrain}", lr,
                     cfg.retrain_epochs, expert_output(pruned))
