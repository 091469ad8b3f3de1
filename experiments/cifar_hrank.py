"""Experiment 1: HRank on CIFAR with VGG16-BN.

pretrain -> rank every conv's filters -> prune (block by block, or at once) with
fine-tuning -> evaluate; each baseline and each pruned model is one logged run with
its own folder. `run_cifar` takes lists of rankers and seeds, so one call also
compares criteria; `resume=run_id` continues an interrupted run.
"""

import json
import math
import os

import keras
import numpy as np

from experiments import common
from experiments.config import CifarConfig
from experiments.data import CIFAR_STATS, cifar_dataset, load_cifar_folder, load_cifar_tfds
from experiments.distribute import on_scratch
from experiments.models import VGG16_BLOCKS, vgg16_bn_cifar
from experiments.study import Study, Variant, resumed_config, run_study
from pruning import CNNModel
from pruning.plan import resolve_ratios


def load_data(cfg, seed, echo=print):
    """Train/test arrays, class count and normalisation statistics."""
    if cfg.image_dir:
        x_train, y_train, names = load_cifar_folder(cfg.image_dir, "train", cfg.train_limit, seed)
        x_test, y_test, test_names = load_cifar_folder(cfg.image_dir, "test", cfg.test_limit, seed)
        if test_names != names:
            raise ValueError(f"The train and test folders of {cfg.image_dir!r} have different classes: "
                             f"{names} and {test_names}.")
        # Statistics of the training images actually used, RGB in [0, 1].
        mean = tuple(float(v) for v in x_train.reshape(-1, 3).mean(0) / 255)
        std = tuple(float(v) for v in x_train.reshape(-1, 3).std(0) / 255)
        return x_train, y_train, x_test, y_test, len(names), (mean, std)
    x_train, y_train = load_cifar_tfds(cfg.dataset, "train", cfg.data_dir, cfg.train_limit, echo=echo)
    x_test, y_test = load_cifar_tfds(cfg.dataset, "test", cfg.data_dir, cfg.test_limit, echo=echo)
    classes = 100 if cfg.dataset == "cifar100" else 10
    return x_train, y_train, x_test, y_test, classes, CIFAR_STATS[cfg.dataset]


def compile_model(model, optimizer, label_smoothing=0.0):
    """Cross-entropy on logits with top-1 ("accuracy") and top-5 metrics."""
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
    """Run fields of `model` on the test set: test_top1, test_top5, test_loss."""
    res = model.evaluate(test_ds, verbose=0, return_dict=True)
    return {"test_top1": float(res["accuracy"]), "test_top5": float(res["top5"]),
            "test_loss": float(res["loss"])}


def train(model, cfg, train_ds, test_ds, epochs, schedule_fn, run, phase):
    """Fits `model` for `epochs` with SGD on the learning rate `schedule_fn(total
    steps)`, as a resumable phase of `run`; returns the trained model."""
    if epochs <= 0:
        return model

    def fit(m, callbacks):
        compile_model(m, sgd(cfg, schedule_fn(epochs * int(train_ds.cardinality()))), cfg.label_smoothing)
        m.fit(train_ds, validation_data=test_ds, epochs=epochs, verbose=cfg.verbose, callbacks=callbacks)

    return common.train_phase(run, phase, model, fit)


def prune_and_finetune(model, scores, cfg, ranker, train_ds, test_ds, run):
    """Applies the schedule; returns the pruned, fine-tuned model. A resumed run
    starts after its last finished phase."""
    rates = resolve_ratios(CNNModel(model), cfg.rate_spec)  # {conv name: compress rate}, model order
    names = list(rates)
    phases = ["oneshot"] if cfg.schedule == "oneshot" else [f"block{b}" for b in range(1, len(VGG16_BLOCKS) + 1)]
    done = common.last_finished_phase(run, [*phases, "final"])
    if done == "final":
        return keras.models.load_model(common.phase_checkpoint(run, "final"))
    start_block = phases.index(done) + 1 if done else 0
    if done:
        model = keras.models.load_model(common.phase_checkpoint(run, done))
    if cfg.schedule == "oneshot":
        if not done:
            model, _ = common.prune_logged(model, scores, rates, run, ranker=ranker, round_to=cfg.round_to, round_mode=cfg.round_mode)
            if run is not None and run.dir:  # a resume must not prune twice
                common.save_model(model, common.phase_checkpoint(run, "oneshot"))
    else:
        start = sum(VGG16_BLOCKS[:start_block])
        for b, size in enumerate(VGG16_BLOCKS[start_block:], start=start_block + 1):
            block = names[start:start + size]
            start += size
            # Only this block's convs change now; earlier blocks are already pruned.
            model, _ = common.prune_logged(
                model, {n: scores[n] for n in block}, {n: (rates[n] if n in block else 0.0) for n in names},
                run, ranker=ranker, round_to=cfg.round_to, round_mode=cfg.round_mode)
            model = train(model, cfg, train_ds, test_ds, cfg.block_epochs, lambda steps: cfg.finetune_lr, run,
                          f"block{b}")
    return train(model, cfg, train_ds, test_ds, cfg.final_epochs, lambda steps: step_decay(cfg.finetune_lr, steps),
                 run, "final")


def run_cifar(cfg, log, progress=None, echo=print, resume=None):
    """Runs the experiment for every seed and ranker; returns one summary dict per run.

    With `resume=run_id` (an interrupted cifar run of `log`), `cfg` is ignored: the
    run's recorded config is used and the run continues in its own row; a resumed
    baseline then goes on with its pruned runs.
    """
    _, recorded = resumed_config(log, resume, "cifar", CifarConfig, seeds=lambda row: (row["seed"],))
    cfg = recorded or cfg
    cfg.validate()
    summaries = []
    with common.distributed(cfg):
        for seed in cfg.seeds:
            summaries += run_study(CifarStudy(cfg, seed, progress, echo), log, resume)
    return summaries


class CifarStudy(Study):
    """The CIFAR steps of `experiments.study.run_study` for one seed: the data, a
    VGG16-BN baseline pretrained (or --pretrained), then per ranker: rank (scores
    cached beside the baseline), prune on the schedule with fine-tuning, evaluate."""

    experiment = "cifar"

    def __init__(self, cfg, seed, progress=None, echo=print):
        common.set_seed(seed)
        self.cfg, self.seed, self.progress, self.echo, self.out_dir = cfg, seed, progress, echo, cfg.out_dir
        x_train, y_train, x_test, y_test, classes, (mean, std) = load_data(cfg, seed, echo)
        dataset = os.path.basename(os.path.normpath(cfg.image_dir)) if cfg.image_dir else cfg.dataset
        self.train_ds = cifar_dataset(x_train, y_train, classes, cfg.batch_size, mean, std, training=True, seed=seed,
                                      randaugment=cfg.randaugment, random_erasing=cfg.random_erasing)
        self.test_ds = cifar_dataset(x_test, y_test, classes, 256, mean, std)
        self.rank_ds = cifar_dataset(x_train, y_train, classes, cfg.rank_batch_size, mean, std)
        self.classes, self.steps_per_epoch = classes, math.ceil(len(x_train) / cfg.batch_size)
        config = {**common.config_dict(cfg), "seed": seed, "num_classes": classes,
                  "train_images": int(len(x_train)), "test_images": int(len(x_test)),
                  "normalization": {"mean": mean, "std": std}}
        self.name = common.slug(dataset, f"w{cfg.width:g}", f"seed{seed}")
        self.fields = {"model": "vgg16_bn", "dataset": dataset, "seed": seed, "config": config}
        self.measure = {"latency_batch": cfg.latency_batch, "latency_runs": cfg.latency_runs, "echo": echo}
        self.baseline_finish = {"filename": "baseline.keras", "label": f"seed {seed} baseline"}
        self.baseline_summary = {"seed": seed, "ranker": None}

    def evaluate(self, model):
        return evaluate(model, self.test_ds)

    def baseline(self, run):
        cfg = self.cfg
        if cfg.pretrained:
            model = keras.models.load_model(cfg.pretrained)
        else:
            model = vgg16_bn_cifar(self.classes, cfg.width, seed=self.seed)
            model = train(model, cfg, self.train_ds, self.test_ds, cfg.epochs,
                          lambda steps: warmup_cosine(cfg.lr, cfg.warmup_epochs * self.steps_per_epoch, steps),
                          run, "pretrain")
        compile_model(model, sgd(cfg, cfg.lr), cfg.label_smoothing)
        return model

    def prepare(self, model, base):
        # Scores are cached beside the model they were computed on (its own run folder).
        self.ranks_root = os.path.join(os.path.dirname(self.cfg.pretrained or base["artifact"]), "ranks")

    def _variant(self, ranker):
        rate_spec = self.cfg.rate_spec
        return Variant(ranker, {"ranker": ranker, "pruning_ratio": rate_spec if isinstance(rate_spec, float) else None,
                                "rates": rate_spec if isinstance(rate_spec, list) else None},
                       folder=ranker, filename=f"pruned-{ranker}.keras", label=f"  {ranker}",
                       summary={"seed": self.seed, "ranker": ranker})

    def variants(self):
        return [self._variant(ranker) for ranker in self.cfg.rankers]

    def variant_of(self, row):
        return self._variant(row["ranker"])

    def variant(self, run, model, base, variant):
        cfg, ranker, seed = self.cfg, variant.key, self.seed
        ranks_dir = os.path.join(self.ranks_root, ranker if ranker != "random" else f"random{seed}")
        scores, cached = common.compute_scores(model, ranker, data=self.rank_ds, ranks_dir=ranks_dir, seed=seed,
                                               rank_batches=cfg.rank_batches, progress=self.progress)
        if not on_scratch(cfg):  # a worker's scratch folder is deleted at the end
            self.echo(f"  {ranker}: scores {'reused from' if cached else 'saved to'} {ranks_dir}")
        pruned = prune_and_finetune(model, scores, cfg, ranker, self.train_ds, self.test_ds, run)
        compile_model(pruned, sgd(cfg, cfg.finetune_lr), cfg.label_smoothing)
        return pruned


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
            f"{np.mean([r.get('speedup') or 1.0 for r in rows]):.2f}x |")
    return "\n".join(lines)


def results_markdown(cfg, summaries):
    """The --results file: the runs, their comparison table and the config."""
    return (f"# CIFAR pruning comparison\n\nRuns: {', '.join(str(s['run_id']) for s in summaries)} in the experiment "
            f"log.\n\n{comparison_table(summaries)}\n\nConfig:\n\n```json\n"
            f"{json.dumps(common.config_dict(cfg), indent=1)}\n```\n")
