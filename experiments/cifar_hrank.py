"""Experiment 1: HRank on CIFAR with VGG16-BN.

pretrain -> rank every conv's filters -> prune (block by block, or at once) with
fine-tuning -> evaluate; each baseline and each pruned model is one logged run.
`run_cifar` takes lists of rankers and seeds, so one call also compares criteria.
"""

import dataclasses
import math
import os
import shutil
from typing import Optional

import keras
import numpy as np

from experiments import common
from experiments.data import CIFAR_STATS, cifar_dataset, load_cifar_folder, load_cifar_tfds
from experiments.models import VGG16_BLOCKS, vgg16_bn_cifar
from pruning import CNNModel, check_ratio
from pruning.plan import resolve_ratios

SCHEDULES = ("blockwise", "oneshot")


@dataclasses.dataclass
class CifarConfig:
    dataset: str = "cifar100"  # cifar100 | cifar10 (tfds names)
    data_dir: Optional[str] = None  # tfds data_dir
    image_dir: Optional[str] = None  # or a folder of {train,test}/<class>/*.jpg
    width: float = 1.0  # multiplies every conv's and the hidden Dense's width
    train_limit: Optional[int] = None  # images; None = all
    test_limit: Optional[int] = None
    epochs: int = 120  # pretraining epochs
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    randaugment: bool = False
    random_erasing: float = 0.0  # probability per image
    pretrained: Optional[str] = None  # a baseline .keras file: skips pretraining
    rankers: tuple = ("hrank",)
    compress_rate: object = 0.5  # one number for all 13 convs or a list of 13
    round_to: int = 1  # round kept filter counts to a multiple of this (1: exact, as HRank)
    rank_batches: int = 20
    rank_batch_size: int = 128
    schedule: str = "blockwise"
    block_epochs: int = 15
    final_epochs: int = 50
    finetune_lr: float = 0.01
    seeds: tuple = (0,)
    out_dir: str = os.path.join("runs", "cifar")
    latency_batch: int = 64
    latency_runs: int = 10
    verbose: int = 2

    def validate(self):
        if self.image_dir is None and self.dataset not in CIFAR_STATS:
            raise ValueError(f"Expected dataset in {tuple(CIFAR_STATS)}. Received: dataset={self.dataset!r}")
        if self.image_dir is not None and not os.path.isdir(self.image_dir):
            raise ValueError(f"Data folder not found: {self.image_dir!r}. Expected a folder of "
                             "{train,test}/<class>/<image>.jpg")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Expected schedule in {SCHEDULES}. Received: schedule={self.schedule!r}")
        rates = self.compress_rate
        if isinstance(rates, (list, tuple)):
            if len(rates) != sum(VGG16_BLOCKS):
                raise ValueError(f"Expected one compress rate or 13. Received: {len(rates)} rates")
            for i, r in enumerate(rates):
                check_ratio(r, f"compress_rate[{i}]")
        else:
            check_ratio(rates, "compress_rate")
        from pruning.rankers import get_ranker

        for name in self.rankers:
            get_ranker(name)
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ValueError(f"Pretrained model not found: {self.pretrained!r}")


def load_data(cfg, seed):
    """Train/test arrays, class count and normalisation statistics."""
    if cfg.image_dir:
        x_train, y_train, names = load_cifar_folder(cfg.image_dir, "train", cfg.train_limit, seed)
        x_test, y_test, _ = load_cifar_folder(cfg.image_dir, "test", cfg.test_limit, seed)
        # Statistics of the training images actually used, RGB in [0, 1].
        mean = tuple(float(v) for v in x_train.reshape(-1, 3).mean(0) / 255)
        std = tuple(float(v) for v in x_train.reshape(-1, 3).std(0) / 255)
        return x_train, y_train, x_test, y_test, len(names), (mean, std)
    x_train, y_train = load_cifar_tfds(cfg.dataset, "train", cfg.data_dir, cfg.train_limit)
    x_test, y_test = load_cifar_tfds(cfg.dataset, "test", cfg.data_dir, cfg.test_limit)
    classes = 100 if cfg.dataset == "cifar100" else 10
    return x_train, y_train, x_test, y_test, classes, CIFAR_STATS[cfg.dataset]


def compile_model(model, optimizer, label_smoothing):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
    )


def sgd(cfg, learning_rate):
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)


def warmup_cosine(lr, warmup_steps, total_steps):
    """Linear warm-up from 0 to `lr`, then cosine decay to 0 (per optimizer step)."""
    if warmup_steps <= 0:
        return keras.optimizers.schedules.CosineDecay(lr, max(total_steps, 1))
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(total_steps - warmup_steps, 1), warmup_target=lr, warmup_steps=warmup_steps)


def step_decay(lr, total_steps):
    """lr, then lr/10 after half of the steps and lr/100 after three quarters."""
    bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [lr, lr / 10, lr / 100])


def evaluate(model, test_ds):
    res = model.evaluate(test_ds, verbose=0, return_dict=True)
    return {"test_top1": float(res["accuracy"]), "test_top5": float(res["top5"]),
            "test_loss": float(res["loss"])}


def fit(model, cfg, train_ds, test_ds, epochs, schedule_fn, run, phase):
    if epochs <= 0:
        return
    steps = epochs * int(train_ds.cardinality())
    compile_model(model, sgd(cfg, schedule_fn(steps)), cfg.label_smoothing)
    model.fit(train_ds, validation_data=test_ds, epochs=epochs, verbose=cfg.verbose,
              callbacks=common.epoch_callbacks(run, phase))


def prune_and_finetune(model, scores, cfg, ranker, train_ds, test_ds, run):
    """Applies the schedule; returns the pruned, fine-tuned model."""
    rates = resolve_ratios(CNNModel(model), cfg.compress_rate)  # {conv name: rate}, model order
    names = list(rates)
    if cfg.schedule == "oneshot":
        model, _ = common.prune_logged(model, scores, rates, run, ranker=ranker, round_to=cfg.round_to)
    else:
        start = 0
        for b, size in enumerate(VGG16_BLOCKS, start=1):
            block = names[start:start + size]
            start += size
            # Only this block's convs change now; earlier blocks are already pruned.
            model, _ = common.prune_logged(
                model, {n: scores[n] for n in block}, {n: (rates[n] if n in block else 0.0) for n in names},
                run, ranker=ranker, round_to=cfg.round_to)
            fit(model, cfg, train_ds, test_ds, cfg.block_epochs,
                lambda steps: cfg.finetune_lr, run, f"block{b}")
    fit(model, cfg, train_ds, test_ds, cfg.final_epochs,
        lambda steps: step_decay(cfg.finetune_lr, steps), run, "final")
    return model


def run_cifar(cfg, log, progress=None, echo=print):
    """Runs the experiment for every seed and ranker; returns one summary dict per run."""
    cfg.validate()
    summaries = []
    for seed in cfg.seeds:
        common.set_seed(seed)
        x_train, y_train, x_test, y_test, classes, (mean, std) = load_data(cfg, seed)
        dataset = os.path.basename(os.path.normpath(cfg.image_dir)) if cfg.image_dir else cfg.dataset
        train_ds = cifar_dataset(x_train, y_train, classes, cfg.batch_size, mean, std, training=True,
                                 seed=seed, randaugment=cfg.randaugment, random_erasing=cfg.random_erasing)
        test_ds = cifar_dataset(x_test, y_test, classes, 256, mean, std)
        rank_ds = cifar_dataset(x_train, y_train, classes, cfg.rank_batch_size, mean, std)
        out = os.path.join(cfg.out_dir, f"{dataset}-w{cfg.width:g}-seed{seed}")
        config = {**common.config_dict(cfg), "seed": seed, "num_classes": classes,
                  "train_images": int(len(x_train)), "test_images": int(len(x_test)),
                  "normalization": {"mean": mean, "std": std}}

        with log.run("cifar", model="vgg16_bn", dataset=dataset, pruning_ratio=0.0, seed=seed,
                     config=config) as base_run:
            if cfg.pretrained:
                model = keras.models.load_model(cfg.pretrained)
            else:
                model = vgg16_bn_cifar(classes, cfg.width, seed=seed)
                steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
                fit(model, cfg, train_ds, test_ds, cfg.epochs,
                    lambda steps: warmup_cosine(cfg.lr, cfg.warmup_epochs * steps_per_epoch, steps),
                    base_run, "pretrain")
            compile_model(model, sgd(cfg, cfg.lr), cfg.label_smoothing)
            base_metrics = evaluate(model, test_ds)
            sizes, latency = common.measure(model, cfg.latency_batch, cfg.latency_runs)
            path = common.save_model(model, os.path.join(out, "baseline.keras"))
            # Scores are cached beside the model they were computed on.
            ranks_root = os.path.join(os.path.dirname(cfg.pretrained or path), "ranks")
            if not cfg.pretrained:
                shutil.rmtree(ranks_root, ignore_errors=True)  # a new baseline: old scores are stale
            base_run.finish(**base_metrics, **sizes, artifact=path, metrics={"latency": latency})
        summaries.append({"run_id": base_run.id, "seed": seed, "ranker": None, **base_metrics, **sizes})
        echo(f"seed {seed} baseline: top-1 {base_metrics['test_top1']:.4f}, {sizes['params']:,} params, "
             f"{sizes['macs']:,} MACs, {sizes['latency_ms']:.1f} ms/batch")

        for ranker in cfg.rankers:
            rates = cfg.compress_rate
            with log.run("cifar", model="vgg16_bn", dataset=dataset, ranker=ranker, seed=seed,
                         pruning_ratio=None if isinstance(rates, (list, tuple)) else float(rates),
                         rates=list(rates) if isinstance(rates, (list, tuple)) else None,
                         parent_id=base_run.id, config=config) as run:
                common.set_seed(seed)
                ranks_dir = os.path.join(ranks_root, ranker if ranker != "random" else f"random{seed}")
                scores, cached = common.compute_scores(
                    model, ranker, data=rank_ds, ranks_dir=ranks_dir, seed=seed,
                    rank_batches=cfg.rank_batches, progress=progress)
                echo(f"  {ranker}: scores {'reused from' if cached else 'saved to'} {ranks_dir}")
                pruned = prune_and_finetune(model, scores, cfg, ranker, train_ds, test_ds, run)
                compile_model(pruned, sgd(cfg, cfg.finetune_lr), cfg.label_smoothing)
                metrics = evaluate(pruned, test_ds)
                p_sizes, p_latency = common.measure(pruned, cfg.latency_batch, cfg.latency_runs)
                path = common.save_model(pruned, os.path.join(out, f"pruned-{ranker}.keras"))
                speedup = sizes["latency_ms"] / p_sizes["latency_ms"]
                run.finish(**metrics, **p_sizes, artifact=path,
                           metrics={"latency": p_latency, "speedup": speedup,
                                    "baseline_top1": base_metrics["test_top1"]})
            summaries.append({"run_id": run.id, "seed": seed, "ranker": ranker, **metrics, **p_sizes,
                              "speedup": speedup})
            echo(f"  {ranker}: top-1 {metrics['test_top1']:.4f}, {p_sizes['params']:,} params, "
                 f"{p_sizes['macs']:,} MACs, {p_sizes['latency_ms']:.1f} ms/batch ({speedup:.2f}x)")
    return summaries


def comparison_table(summaries):
    """Markdown: mean and spread over seeds of accuracy, params, MACs and latency per ranker."""
    groups = {}
    for s in summaries:
        groups.setdefault(s["ranker"] or "baseline (unpruned)", []).append(s)
    lines = ["| model | seeds | top-1 mean | top-1 std | top-1 min..max | top-5 mean | params | MACs | "
             "latency ms/batch | speed-up |", "|---" * 10 + "|"]
    for name, rows in groups.items():
        top1 = np.array([r["test_top1"] for r in rows])
        lines.append(
            f"| {name} | {len(rows)} | {top1.mean():.4f} | {top1.std(ddof=1) if len(rows) > 1 else 0:.4f} | "
            f"{top1.min():.4f}..{top1.max():.4f} | {np.mean([r['test_top5'] for r in rows]):.4f} | "
            f"{int(np.mean([r['params'] for r in rows])):,} | {int(np.mean([r['macs'] for r in rows])):,} | "
            f"{np.mean([r['latency_ms'] for r in rows]):.1f} | "
            f"{np.mean([r.get('speedup', 1.0) for r in rows]):.2f}x |")
    return "\n".join(lines)
