"""Accuracy against MACs on CIFAR-10 JPEGs: criteria x allocations x targets x seeds.

    python -m benchmarks.frontier [--train-images 10000 --epochs 10 ...]

For each model (VGG16-BN at width 0.25, ResNet-20) and seed: train a baseline on a
subset (cached in --cache-dir), rank its filters with every criterion, prune to each
MAC target with every allocation, and measure test accuracy right after pruning,
after a fixed fine-tuning budget, and after the same budget with distillation from
the unpruned model (cached teacher logits; no augmentation). Writes a Markdown table
(mean +- std over seeds), which settings beat random by more than the seed spread,
a plot of accuracy against MACs (<output>.png) and the rows (<output>.json, which
`--from-json` turns into the report again without training). CPU-sized: small subsets, few epochs.
"""

import json
import os
import time
import types

import click
import keras
import numpy as np

from benchmarks import comma_list, command, invocation, write
from experiments import common, files
from experiments.compress import accuracy_fn, array_dataset, make_ranker, recalibrate_batchnorm
from experiments.data import load_cifar_folder
from experiments.models import resnet20_cifar, vgg16_bn_cifar
from pruning import CNNModel, model_stats, prune
from pruning.allocation import ALLOCATIONS, PlanCost, allocate
from pruning.criteria import following_batchnorm
from pruning.distill import Distiller, teacher_logits
from pruning.rankers import RANKERS
from pruning.stats import machine_description

MODELS = {
    "vgg16_bn_w0.25": lambda seed: vgg16_bn_cifar(10, 0.25, seed=seed),
    "resnet20_w0.5": lambda seed: resnet20_cifar(10, 0.5, seed=seed),
}
PHASES = ("pruned", "finetuned", "distilled")


def baseline(name, seed, args, train_ds):
    path = os.path.join(args.cache_dir, f"{name}-seed{seed}-n{args.train_images}-e{args.epochs}.keras")
    if os.path.exists(path):
        return keras.models.load_model(path), True
    common.set_seed(seed)
    model = MODELS[name](seed)
    steps = args.epochs * int(train_ds.cardinality())
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(args.lr, steps)),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    model.fit(train_ds, epochs=args.epochs, verbose=0)  # augmented: crops and flips
    common.save_model(model, path)
    return model, False


class MaskedTrainer:
    """Fine-tunes `model` as if pruned by a plan, by zeroing the removed filters (kernel,
    bias, and the following BatchNormalization's gamma and beta, so the channel is exactly
    0) and zeroing them again after every batch. Every kept weight then sees the same
    forward pass, gradients and Adam updates as in the rebuilt model, but one compiled
    train step serves every plan (no graph is traced per pruned model). `check_masked`
    compares with the rebuilt model."""

    def __init__(self, model, lr, temperature, alpha, calibration):
        self.model, self.cnn, self.weights, self.calibration = model, CNNModel(model), model.get_weights(), calibration
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        self.kd = Distiller(model, None, temperature, alpha)
        self.kd.compile(optimizer=keras.optimizers.Adam(lr))
        self.zeros = []

    def apply(self, plan):
        """Restores the baseline weights and zeroes what `plan` removes."""
        self.model.set_weights(self.weights)
        self.zeros = []
        for name, keep in plan.keep.items():
            conv = self.cnn.conv(name)
            gone = np.setdiff1d(np.arange(conv.filters), keep)
            if not len(gone):
                continue
            bn = following_batchnorm(self.cnn, conv)
            if bn is None:
                raise ValueError(f"Masked fine-tuning needs a BatchNormalization after '{name}'.")
            targets = [(conv.layer.kernel, -1)] + ([(conv.layer.bias, 0)] if conv.layer.use_bias else [])
            targets += [(bn.gamma, 0), (bn.beta, 0)]
            for var, axis in targets:
                shape = [1] * len(var.shape)
                shape[axis] = -1
                keep = np.isin(np.arange(var.shape[axis]), gone, invert=True)
                self.zeros.append((var, keep.astype("float32").reshape(shape)))
        self._zero()
        recalibrate_batchnorm(self.model, self.calibration)

    def _zero(self, *args, **kwargs):
        for var, mask in self.zeros:
            var.assign(keras.ops.convert_to_numpy(var) * mask)

    def finetune(self, ds, epochs, distill=False):
        trainer = self.kd if distill else self.model
        for v in trainer.optimizer.variables:  # a fresh Adam for every plan
            if "learning_rate" not in v.path:
                v.assign(np.zeros(v.shape, v.dtype))
        zero = keras.callbacks.LambdaCallback(on_train_batch_end=self._zero)
        trainer.fit(ds, epochs=epochs, verbose=0, callbacks=[zero])


def run(args, rows_path):
    keras.config.disable_interactive_logging()
    x, y, _ = load_cifar_folder(args.data_dir, "train", args.train_images, args.baseline_seed)
    x_te, y_te, _ = load_cifar_folder(args.data_dir, "test", args.test_images, args.baseline_seed)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    prep = lambda t: (t - mean) / std  # noqa: E731  (statistics of the training subset)
    x_eval = np.concatenate([b[0].numpy() for b in array_dataset(x_te, y_te, 10, 500, prep)])
    accuracy = accuracy_fn(x_eval, y_te, 250)  # eager calls: no graph tracing per pruned model
    train_ds = array_dataset(x, y, 10, 64, prep, training=True, augment=True, seed=args.baseline_seed)
    calib_idx = np.random.default_rng(args.baseline_seed).permutation(len(x))[:args.calibration_images]
    calibration = np.concatenate([b[0].numpy() for b in array_dataset(x[calib_idx], y[calib_idx], 10, 256, prep)])
    models = {}
    for name in args.models:
        t0 = time.time()
        model, cached = baseline(name, args.baseline_seed, args, train_ds)
        models[name] = (model, accuracy(model), model_stats(model)["macs"],
                        MaskedTrainer(model, args.finetune_lr, args.temperature, args.alpha, calibration))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: baseline {models[name][1]:.4f} "
              f"({'cached' if cached else f'trained in {time.time() - t0:.0f}s'})", flush=True)
    rows, checked = [], set()
    for seed in args.seeds:
        ft = np.random.default_rng(seed).permutation(len(x))[:args.finetune_images]
        rank_ds = array_dataset(x[ft], y[ft], 10, 64, prep).take(args.rank_batches)
        for name, (model, base, base_macs, trainer) in models.items():
            rows.append({"model": name, "seed": seed, "criterion": "baseline", "allocation": "-", "target": 1.0,
                         "macs": 1.0, **{p: base for p in PHASES}})
            logits = teacher_logits(model, array_dataset(x[ft], y[ft], 10, 256, prep).map(lambda a, b: a))
            plain_ds = array_dataset(x[ft], y[ft], 10, args.finetune_batch, prep, training=True, seed=seed)
            kd_ds = array_dataset(x[ft], y[ft], 10, args.finetune_batch, prep, training=True, seed=seed,
                                  teacher=logits)
            cnn = CNNModel(model)
            rankers = {crit: make_ranker(crit, seed=seed) for crit in args.criteria}
            scores = {c: r.rank_all(cnn, data=rank_ds if r.needs_data else None) for c, r in rankers.items()}
            cost = PlanCost(cnn)
            # Criteria innermost: a run cut short still compares every criterion at the first settings.
            for target in args.targets:
                for alloc in args.allocations:
                    for crit in args.criteria:
                        t1 = time.time()
                        plan = allocate(cnn, scores[crit], target, metric="macs", allocation=alloc)
                        trainer.apply(plan)
                        row = {"model": name, "seed": seed, "criterion": crit, "allocation": alloc, "target": target,
                               "macs": cost(plan)["macs"] / base_macs, "pruned": accuracy(model)}
                        if name not in checked:  # the masked model is the pruned model
                            checked.add(name)
                            row["check"] = check_masked(model, trainer, plan, x_eval[:64])
                        common.set_seed(seed)
                        trainer.finetune(plain_ds, args.finetune_epochs)
                        row["finetuned"] = accuracy(model)
                        trainer.apply(plan)
                        common.set_seed(seed)
                        trainer.finetune(kd_ds, args.finetune_epochs, distill=True)
                        row["distilled"] = accuracy(model)
                        row["layers"] = {n: len(k) for n, k in plan.keep.items()}
                        rows.append(row)
                        files.write_text(rows_path, json.dumps({"rows": rows}, indent=1))  # a cut-off run keeps them
                        print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {name} {crit:>6} {alloc:>7} {target:.2f}: "
                              f"macs {row['macs']:.3f} pruned {row['pruned']:.4f} ft {row['finetuned']:.4f} "
                              f"kd {row['distilled']:.4f} ({time.time() - t1:.0f}s)", flush=True)
            model.set_weights(trainer.weights)
    return rows


def check_masked(model, trainer, plan, x):
    """Max |difference| between the masked model's outputs and the rebuilt pruned model's
    (built from the baseline weights), on images `x`."""
    masked = keras.ops.convert_to_numpy(model(x, training=False))
    rebuilt = prune(CNNModel(model), plan)  # from the masked weights: the removed ones are zero
    diff = float(np.max(np.abs(keras.ops.convert_to_numpy(rebuilt(x, training=False)) - masked)))
    print(f"  masked vs rebuilt pruned model: max |logit difference| {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise AssertionError(f"The masked model differs from the pruned model by {diff}")
    return diff


def summarise(rows):
    """{(model, criterion, allocation, target): {phase: (mean, std, n), macs}}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["criterion"], r["allocation"], r["target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {p: (float(np.mean([r[p] for r in rs])), float(np.std([r[p] for r in rs], ddof=1))
                        if len(rs) > 1 else 0.0, len(rs)) for p in PHASES}
        out[key]["macs"] = float(np.mean([r["macs"] for r in rs]))
    return out


def beats_random(summary):
    """Lines: each (model, allocation, target, phase) where a criterion's mean exceeds
    random's by more than the larger of the two seed standard deviations."""
    wins, losses = [], []
    for (model, crit, alloc, target), s in sorted(summary.items()):
        ref = summary.get((model, "random", alloc, target))
        if crit in ("random", "baseline") or ref is None:
            continue
        for p in PHASES:
            diff = s[p][0] - ref[p][0]
            spread = max(s[p][1], ref[p][1])
            line = (f"{model}, {alloc}, {target:g} MACs, {p}: {crit} {s[p][0]:.4f} vs random {ref[p][0]:.4f} "
                    f"(diff {diff:+.4f}, spread {spread:.4f})")
            (wins if diff > spread else losses).append(line)
    return wins, losses


def best_setting(summary):
    """(criterion, allocation, phase) with the highest mean accuracy after fine-tuning,
    averaged over models and targets."""
    scores = {}
    for (model, crit, alloc, target), s in summary.items():
        if crit == "baseline":
            continue
        for p in ("finetuned", "distilled"):
            scores.setdefault((crit, alloc, p), []).append(s[p][0])
    return max(scores.items(), key=lambda kv: np.mean(kv[1]))


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        base = summary[(model, "baseline", "-", 1.0)]["finetuned"][0]
        series = sorted({(k[1], k[2]) for k in summary if k[0] == model and k[1] != "baseline"})
        for crit, alloc in series:
            pts = sorted((s["macs"], s["distilled"][0], s["distilled"][1]) for k, s in summary.items()
                         if k[:3] == (model, crit, alloc))
            xs = [1.0] + [p[0] for p in pts][::-1]
            ys = [base] + [p[1] for p in pts][::-1]
            ax.errorbar(xs, ys, yerr=[0] + [p[2] for p in pts][::-1], marker="o", capsize=2,
                        linestyle="-" if alloc == "global" else "--", label=f"{crit} {alloc}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="MACs kept (fraction of baseline)", ylabel="test top-1 after fine-tuning + distillation", title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(args, summary, wins, losses, best, wall, load, png):
    machine = [m if isinstance(m, str) else "load average (1, 5, 15 min) " + ", ".join(map(str, m)) for m in load]
    lines = [
        "# Frontier: accuracy against MACs (CIFAR-10 JPEGs, CPU)", "",
        (f"Report written from saved rows: `{invocation(['note'])}` (the command that measured them is in the "
         "note below)." if args.from_json else f"Command: `{invocation(['note'])}`"), "",
        f"Wall time {wall / 60:.1f} min. Machine at start / end: {machine[0]} / {machine[1]}.", "",
        *([args.note, ""] if args.note else []),
        f"Setup: one baseline per model (seed {args.baseline_seed}) trained {args.epochs} epochs on {args.train_images} "
        f"training images (Adam {args.lr}, cosine, crop+flip); the seeds vary the ranking and fine-tuning images, the "
        f"random ranker and the fine-tuning order. Pruning on {args.rank_batches} batches of 64 for taylor/hrank; "
        f"fine-tuning {args.finetune_epochs} epoch(s) on {args.finetune_images} images, batch {args.finetune_batch} "
        f"(Adam {args.finetune_lr}, no augmentation), with distillation T={args.temperature}, alpha={args.alpha} "
        f"(cached teacher logits); after pruning, BatchNorm statistics are re-estimated on {args.calibration_images} "
        f"training images (no weight update; without it every pruned model predicted one class); test on "
        f"{args.test_images} test images. Seeds {','.join(map(str, args.seeds))}: mean +- std (ddof 1) over seeds.", "",
        "| model | criterion | allocation | MACs kept | pruned (BN re-estimated) | fine-tuned | fine-tuned + KD |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, crit, alloc, target), s in sorted(summary.items(), key=lambda kv: (kv[0][0], -kv[0][3], kv[0][2], kv[0][1])):
        cells = " | ".join(f"{s[p][0]:.4f} +- {s[p][1]:.4f}" for p in PHASES)
        lines.append(f"| {model} | {crit} | {alloc} | {s['macs']:.3f} | {cells} |")
    lines += ["", f"![accuracy against MACs]({os.path.basename(png)})", "",
              "## Which settings beat random by more than the seed spread", "",
              "Spread = the larger of the two standard deviations over seeds.", ""]
    lines += [f"- {w}" for w in wins] or ["- none"]
    lines += ["", f"Not beating random by more than the spread: {len(losses)} of {len(wins) + len(losses)} "
              "comparisons.", "", "<details><summary>all of them</summary>", ""]
    lines += [f"- {l}" for l in losses] + ["", "</details>", ""]
    (crit, alloc, phase), accs = best
    lines += ["## Best setting", "",
              f"Highest mean accuracy after fine-tuning, over models and targets: **{crit}, {alloc}, "
              f"{'with' if phase == 'distilled' else 'without'} distillation** (mean {np.mean(accs):.4f}).", ""]
    return "\n".join(lines)


@command("frontier")
@click.option("--data-dir", default=os.path.join("..", "shared", "data", "cifar10"), show_default=True)
@click.option("--models", default=",".join(MODELS), show_default=True, callback=comma_list(str, tuple(MODELS)))
@click.option("--criteria", default="random,l1,fpgm,taylor,hrank", show_default=True, callback=comma_list(str, tuple(RANKERS)))
@click.option("--allocations", default="global,uniform", show_default=True, callback=comma_list(str, ALLOCATIONS))
@click.option("--targets", default="0.5,0.25", show_default=True, callback=comma_list(float),
              help="MACs kept (0.5: 2x, 0.25: 4x reduction).")
@click.option("--seeds", default="0,1,2", show_default=True, callback=comma_list(int))
@click.option("--train-images", type=int, default=2000, show_default=True, help="Baseline training subset.")
@click.option("--finetune-images", type=int, default=256, show_default=True, help="Fine-tuning subset (of the train subset).")
@click.option("--finetune-batch", type=int, default=32, show_default=True)
@click.option("--test-images", type=int, default=500, show_default=True)
@click.option("--calibration-images", type=int, default=256, show_default=True,
              help="Training images on which BN statistics are re-estimated after pruning (no weight update).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Baseline epochs.")
@click.option("--baseline-seed", type=int, default=0, show_default=True,
              help="One baseline per model, trained with this seed (the seeds vary ranking data, the random "
                   "ranker and fine-tuning).")
@click.option("--finetune-epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Adam, baseline.")
@click.option("--finetune-lr", type=float, default=1e-3, show_default=True, help="Adam, fine-tuning.")
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("--rank-batches", type=int, default=2, show_default=True, help="Batches of 64 for taylor / hrank.")
@click.option("--cache-dir", default=os.path.join("runs", "frontier"), show_default=True)
@click.option("--from-json", default=None, help="Only write the report from the rows an earlier run saved.")
@click.option("--note", default="", help="A line added to the report (e.g. how the runs were split).")
def main(**params):
    """Train, prune, fine-tune and distil every setting; write the frontier table and plot."""
    args = types.SimpleNamespace(**params)
    rows_path = os.path.splitext(args.output)[0] + ".json"
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, wall, load = saved["rows"], saved["wall_s"], saved["load"]
    else:
        load, start = [machine_description()], time.time()
        rows = run(args, rows_path)
        wall = time.time() - start
        load.append(machine_description())
    summary = summarise(rows)
    wins, losses = beats_random(summary)
    png = os.path.splitext(args.output)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot(summary, png)
    write(args.output, [markdown(args, summary, wins, losses, best_setting(summary), wall, load, png)])
    files.write_text(rows_path, json.dumps({"rows": rows, "wall_s": wall, "load": load}, indent=1))


if __name__ == "__main__":
    main()
