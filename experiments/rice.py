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
from experiments.data import drop_unreadable, folder_dataset, list_image_folder, preprocessing, stratified_split
from experiments.models import rice_classifier
from pruning import check_ratio, inline

HEAD_LAYERS = ("features", "fc1", "dropout", "predictions")
SPLITS = ("train", "val", "test")
RETRAIN_CHOICES = ("head", "all")


@dataclasses.dataclass
class RiceConfig:
    data_dir: str = os.path.join("data", "rice_sample")
    image_size: int = 224  # pixels, square
    limit_per_class: Optional[int] = None
    split: tuple = (0.7, 0.15, 0.15)
    seed: int = 0
    weights: str = "imagenet"  # imagenet | hed | none | path to a weights file
    pretrained: Optional[str] = None  # a trained baseline .keras file: skips phases 1 and 2
    pooling: str = "avg"  # avg (GlobalAveragePooling) | flatten
    batch_size: int = 16
    head_epochs: int = 30  # phase 1 (early stopping usually ends it sooner)
    head_lr: float = 1e-3
    unfreeze: int = 0  # phase 2: how many of the top conv layers to fine-tune (0: skip)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-5
    patience: int = 5  # EarlyStopping on val_loss, best weights restored
    augment: bool = False  # random flips; turns off feature caching
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
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ValueError(f"Pretrained model not found: {self.pretrained!r}")
        get_ranker(self.ranker)


def _flip(x):
    return keras.ops.where(keras.random.uniform((keras.ops.shape(x)[0], 1, 1, 1)) < 0.5, x[:, :, ::-1], x)


class RiceData:
    """Files, split and pipelines: `ordered` batches of each split (for features and
    evaluation) and `train`, shuffled (and augmented with --augment), for fitting."""

    def __init__(self, cfg):
        paths, labels, self.class_names = list_image_folder(cfg.data_dir, cfg.limit_per_class, cfg.seed)
        self.paths, self.labels, self.unreadable = drop_unreadable(paths, labels)
        self.split = stratified_split(self.labels, cfg.split, cfg.seed)
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


def callbacks(cfg, run, phase, checkpoint):
    return common.epoch_callbacks(run, phase, [
        keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, cfg.patience // 2), min_lr=1e-7),
        keras.callbacks.ModelCheckpoint(checkpoint, save_best_only=True, save_weights_only=True),
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
    cbs = callbacks(cfg, run, phase, os.path.join(out, f"{phase}.weights.h5"))
    first = next(l.name for l in model.layers if l.trainable and l.weights)
    if cfg.augment or _layer_input(model, first) is model.inputs[0]:
        compile_for(model, lr)
        model.fit(data.train, validation_data=data.ordered["val"], epochs=epochs, verbose=cfg.verbose,
                  callbacks=cbs)
        return
    prefix = keras.Model(model.inputs, _layer_input(model, first))
    feats = {name: prefix.predict(ds, verbose=0) for name, ds in data.ordered.items() if name != "test"}
    suffix = chain_suffix(model, first)
    compile_for(suffix, lr)
    order = np.random.default_rng(cfg.seed).permutation(len(feats["train"]))
    suffix.fit(feats["train"][order], data.y("train")[order], batch_size=cfg.batch_size, epochs=epochs,
               validation_data=(feats["val"], data.y("val")), verbose=cfg.verbose, callbacks=cbs)


def conv_names(model):
    from pruning import CNNModel

    return [c.name for c in CNNModel(model).conv_layers]


def evaluate(model, data):
    probs = model.predict(data.ordered["test"], verbose=0)
    y = data.y("test")
    pred = probs.argmax(axis=1)
    cm = common.confusion_matrix(y, pred, data.num_classes)
    top1 = float((pred == y).mean())
    return {"test_top1": top1}, {"confusion_matrix": cm.tolist(), "class_names": data.class_names,
                                 "per_class": common.per_class_report(cm, data.class_names)}


def run_rice(cfg, log, progress=None, echo=print):
    """Baseline + one pruned model per ratio; returns one summary dict per run."""
    cfg.validate()
    common.set_seed(cfg.seed)
    data = RiceData(cfg)
    if data.unreadable:
        echo(f"skipped {len(data.unreadable)} unreadable images: {', '.join(data.unreadable)}")
    out = os.path.join(cfg.out_dir, f"{os.path.basename(os.path.normpath(cfg.data_dir))}-"
                                    f"{cfg.image_size}px-{os.path.basename(str(cfg.weights))}-seed{cfg.seed}")
    os.makedirs(out, exist_ok=True)
    config = {**common.config_dict(cfg), "classes": data.class_names, "images": len(data.paths),
              "split_sizes": [int(len(s)) for s in data.split], "unreadable": data.unreadable}
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
            model = inline(rice_classifier(data.num_classes, cfg.image_size, cfg.weights, cfg.pooling,
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
    summaries.append({"run_id": base_run.id, "ratio": 0.0, **metrics, **sizes, "speedup": 1.0})
    echo(f"baseline: test accuracy {metrics['test_top1']:.4f}, {sizes['params']:,} params, "
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
        summaries.append({"run_id": run.id, "ratio": ratio, **p_metrics, **p_sizes, "speedup": speedup})
        echo(f"ratio {ratio:g}: test accuracy {p_metrics['test_top1']:.4f}, {p_sizes['params']:,} params, "
             f"{p_sizes['macs']:,} MACs, {p_sizes['latency_ms']:.1f} ms/batch ({speedup:.2f}x)")
    return summaries
