"""Experiment 2: transfer learning on the Rice Image Dataset, then L1 pruning.

VGG16 (ImageNet, HED, none, or a weights file) -> frozen-base feature extraction
-> optional fine-tuning of the top convs -> prune the convs at several ratios ->
retrain the head (pruned convs frozen) or everything -> evaluate. The baseline and
each ratio are logged runs; each pruned run points at its baseline.
"""

import json
import os

import keras
import numpy as np

from experiments import common
from experiments.config import RiceConfig, from_dict  # noqa: F401  (RiceConfig: the config block)
from experiments.data import (check_splits, drop_unreadable, folder_dataset, list_image_folder, preprocessing,
                              stratified_split)
from experiments.models import rice_classifier
from pruning import CNNModel, inline

HEAD_LAYERS = ("features", "fc1", "dropout", "predictions")
SPLITS = ("train", "val", "test")


def _flip(x):
    return keras.ops.where(keras.random.uniform((keras.ops.shape(x)[0], 1, 1, 1)) < 0.5, x[:, :, ::-1], x)


class RiceData:
    """Files, split and pipelines: `ordered` batches of each split (for features and
    evaluation) and `train`, shuffled (and augmented with --augment), for fitting."""

    def __init__(self, cfg):
        paths, labels, self.class_names = list_image_folder(cfg.data_dir, cfg.limit_per_class, cfg.seed)
        self.paths, self.labels, self.unreadable = drop_unreadable(paths, labels)
        self.split = stratified_split(self.labels, cfg.split, cfg.seed)
        check_splits(self.labels, self.split, self.class_names, SPLITS)
        pre = preprocessing("vgg16")  # RGB [0, 255] -> BGR minus the ImageNet mean
        self.ordered = {}
        for name, idx in zip(SPLITS, self.split):
            if len(idx) == 0:
                raise ValueError(f"The {name} split is empty: {len(self.paths)} images are too few "
                                 f"for fractions {tuple(cfg.split)}.")
            self.ordered[name] = folder_dataset([self.paths[i] for i in idx], self.labels[idx],
                                                cfg.image_size, cfg.batch_size, preprocess=pre)
        idx = self.split[0]
        self.train = folder_dataset([self.paths[i] for i in idx], self.labels[idx], cfg.image_size,
                                    cfg.batch_size, preprocess=pre, shuffle=True, seed=cfg.seed,
                                    augment=_flip if cfg.augment else None)

    @property
    def num_classes(self):
        return len(self.class_names)

    def y(self, name):
        return self.labels[self.split[SPLITS.index(name)]]


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


def compile_model(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def train(model, trainable, cfg, data, run, phase, lr, epochs):
    """Trains the layers named in `trainable`, everything else frozen, as a resumable
    phase of `run` (see `common.train_phase`); returns the trained model.

    Without augmentation the frozen layers before the first trainable one are
    deterministic, so their output is computed once per split and the rest of the
    model trains on it (as in Keras' transfer-learning guide); with augmentation
    the whole model runs on the images every epoch.
    """
    set_trainable(model, trainable)
    extra = [
        keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, cfg.patience // 2), min_lr=1e-7),
    ]

    def fit(model, callbacks):
        first = next(l.name for l in model.layers if l.trainable and l.weights)
        if cfg.augment or _layer_input(model, first) is model.inputs[0]:
            compile_model(model, lr)
            model.fit(data.train, validation_data=data.ordered["val"], epochs=epochs, verbose=cfg.verbose,
                      callbacks=callbacks)
            return
        prefix = keras.Model(model.inputs, _layer_input(model, first))
        feats = {name: prefix.predict(ds, verbose=0) for name, ds in data.ordered.items() if name != "test"}
        suffix = chain_suffix(model, first)
        compile_model(suffix, lr)
        order = np.random.default_rng(cfg.seed).permutation(len(feats["train"]))
        suffix.fit(feats["train"][order], data.y("train")[order], batch_size=cfg.batch_size, epochs=epochs,
                   validation_data=(feats["val"], data.y("val")), verbose=cfg.verbose, callbacks=callbacks)

    return common.train_phase(run, phase, model, fit, extra)


def conv_names(model):
    return [c.name for c in CNNModel(model).conv_layers]


def evaluate(model, data):
    """Run fields of `model` on the test split: test_top1, and under "metrics" the
    confusion matrix and per-class precision and recall."""
    probs = model.predict(data.ordered["test"], verbose=0)
    y = data.y("test")
    pred = probs.argmax(axis=1)
    cm = common.confusion_matrix(y, pred, data.num_classes)
    return {"test_top1": float((pred == y).mean()),
            "metrics": {"confusion_matrix": cm.tolist(), "class_names": data.class_names,
                        "per_class": common.per_class_report(cm, data.class_names)}}


def run_rice(cfg, log, progress=None, echo=print, resume=None):
    """Baseline + one pruned model per ratio; returns one summary dict per run.

    With `resume=run_id` (an interrupted rice run of `log`), `cfg` is ignored: the
    run's recorded config is used and the run continues in its own row; a resumed
    baseline then goes on with every ratio.
    """
    resumed = log.resumable(resume, "rice") if resume is not None else None
    if resumed is not None:
        cfg = from_dict(RiceConfig, json.loads(resumed["config"] or "{}"))
    cfg.validate()
    common.set_seed(cfg.seed)
    data = RiceData(cfg)
    if data.unreadable:
        echo(f"skipped {len(data.unreadable)} unreadable images: {', '.join(data.unreadable)}")
    config = {**common.config_dict(cfg), "classes": data.class_names, "images": len(data.paths),
              "split_sizes": [int(len(s)) for s in data.split], "unreadable": data.unreadable}
    dataset = os.path.basename(os.path.normpath(cfg.data_dir))
    name = common.slug(dataset, f"{cfg.image_size}px", os.path.basename(str(cfg.weights)), f"seed{cfg.seed}")
    measure = {"latency_batch": cfg.latency_batch, "latency_runs": cfg.latency_runs, "echo": echo}
    evaluate_on_test = lambda m: evaluate(m, data)  # noqa: E731
    summaries, ratios = [], cfg.ratios

    if resumed is not None and resumed["parent_id"] is not None:  # a pruned run: its baseline is finished
        path, base = common.finished_parent(log, resumed)
        model = inline(keras.models.load_model(path))
        ratios = (resumed["pruning_ratio"],)
    else:
        with log.run("rice", resume=resume, model="vgg16", dataset=dataset, pruning_ratio=0.0, seed=cfg.seed,
                     config=config) as base_run:
            base_run.make_dir(cfg.out_dir, f"{name}-baseline")
            if cfg.pretrained:
                model = inline(keras.models.load_model(cfg.pretrained))
                if model.output_shape[-1] != data.num_classes:
                    raise ValueError(f"{cfg.pretrained} predicts {model.output_shape[-1]} classes; "
                                     f"{cfg.data_dir} has {data.num_classes}.")
                for layer in cfg.exclude:
                    CNNModel(model).conv(layer)  # an unknown name fails before any work
            else:
                # Inlined into one flat graph, so every layer of the base can be frozen or trained.
                model = inline(rice_classifier(data.num_classes, cfg.image_size, cfg.weights, cfg.pooling,
                                               seed=cfg.seed))
                model = train(model, HEAD_LAYERS, cfg, data, base_run, "head", cfg.head_lr, cfg.head_epochs)
                if cfg.unfreeze > 0:
                    top = conv_names(model)[-cfg.unfreeze:]
                    model = train(model, set(top) | set(HEAD_LAYERS), cfg, data, base_run, "finetune",
                                  cfg.finetune_lr, cfg.finetune_epochs)
            base = common.finish_model_run(base_run, model, evaluate_on_test, filename="baseline.keras",
                                           artifact=cfg.pretrained, save=not cfg.pretrained, label="baseline", **measure)
        summaries.append({**base, "ratio": 0.0})

    scores, _ = common.compute_scores(model, cfg.ranker, data=data.ordered["train"], seed=cfg.seed,
                                      rank_batches=20, progress=progress)
    for ratio in ratios:
        pruned_resume = resume if resumed is not None and resumed["parent_id"] is not None else None
        with log.run("rice", resume=pruned_resume, model="vgg16", dataset=dataset, ranker=cfg.ranker,
                     pruning_ratio=ratio, parent_id=base["run_id"], seed=cfg.seed, config=config) as run:
            run.make_dir(cfg.out_dir, f"{name}-{cfg.ranker}-{ratio:g}")
            common.set_seed(cfg.seed)
            pruned, _ = common.prune_logged(model, scores, ratio, run, exclude=cfg.exclude, ranker=cfg.ranker,
                                            round_to=cfg.round_to)
            trainable = HEAD_LAYERS if cfg.retrain == "head" else {l.name for l in pruned.layers}
            lr = cfg.head_lr if cfg.retrain == "head" else cfg.finetune_lr
            pruned = train(pruned, trainable, cfg, data, run, f"retrain_{cfg.retrain}", lr, cfg.retrain_epochs)
            summary = common.finish_model_run(run, pruned, evaluate_on_test,
                                              filename=f"pruned-{cfg.ranker}-{ratio:g}.keras", baseline=base,
                                              label=f"ratio {ratio:g}", **measure)
        summaries.append({**summary, "ratio": ratio})
    return summaries
