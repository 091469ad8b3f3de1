"""Compress a user's model to a target: rank, allocate, prune, fine-tune, repeat.

    cfg = CompressConfig(model="model.keras", data_dir="images/", target_macs=0.5)
    summary = run_compress(cfg, ExperimentLog())

One parent run holds the baseline and the final model; each prune/fine-tune step
is a child run (`parent_id`) with its plan, the accuracy right after pruning and
after fine-tuning. The result is a plain, smaller `.keras` and the plan (JSON,
with indices of the original model's filters).
"""

import dataclasses
import inspect
import os

import keras
import numpy as np
import tensorflow as tf

from experiments import common, files
from experiments.config import CompressConfig, InputError  # noqa: F401  (CompressConfig: this experiment's config)
from experiments.data import (
    AUTOTUNE, check_readable, check_splits, folder_dataset, list_image_folder, load_cifar_folder, preprocessing,
    random_crop_flip, stratified_split,
)
from experiments.distribute import on_scratch
from pruning import CNNModel, model_stats, prune
from pruning.allocation import PlanCost, allocate, compose
from pruning.plan import n_kept
from pruning.graph import leaf_layers
from pruning.distill import Distiller, default_loss, teacher_logits
from pruning import make_ranker  # the registry with every built-in ranker (pruning.__init__)


def load_arrays(cfg):
    """Images (uint8, N x size x size x 3) and labels of train, val and test, and the
    class names. A folder with train/ and test/ is the CIFAR layout (val: a seeded
    stratified `val_fraction` of train); any other is <class>/*.jpg, split by `split`."""
    size = cfg.image_size
    root = cfg.data_dir
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        per_class_limit = None
        if cfg.limit_per_class is not None:
            n = len([d for d in os.listdir(os.path.join(root, "train"))
                     if os.path.isdir(os.path.join(root, "train", d))])
            per_class_limit = cfg.limit_per_class * n
        x, y, names = load_cifar_folder(root, "train", per_class_limit, cfg.seed)
        x_test, y_test, _ = load_cifar_folder(root, "test", cfg.test_limit, cfg.seed)
        train, val, _ = stratified_split(y, (1 - cfg.val_fraction, cfg.val_fraction, 0.0), cfg.seed)
        check_splits(y, [train], names, ["train"])
        parts = [(x[train], y[train]), (x[val], y[val]), (x_test, y_test)]
        if size and size != x.shape[1]:
            parts = [(_resize(a, size), b) for a, b in parts]
        return parts, names
    paths, labels, names = list_image_folder(root, cfg.limit_per_class, cfg.seed)
    check_readable(paths)
    split = stratified_split(labels, cfg.split, cfg.seed)
    needed = [0, 1, 2] if cfg.allocation == "sensitivity" else [0, 2]  # train and test (and val to measure)
    check_splits(labels, [split[i] for i in needed], names, [("train", "val", "test")[i] for i in needed])
    parts = []
    for idx in split:
        ds = folder_dataset([paths[i] for i in idx], labels[idx], size, 64, cache=False)
        xs = [np.clip(np.round(b[0].numpy()), 0, 255).astype(np.uint8) for b in ds]
        parts.append((np.concatenate(xs) if xs else np.zeros((0, size, size, 3), np.uint8), labels[idx]))
    return parts, names


def _resize(images, size):
    out = tf.image.resize(tf.cast(images, tf.float32), (size, size), antialias=True)
    return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def array_dataset(x, y, num_classes, batch_size, preprocess=None, training=False, augment=False, seed=0,
                  teacher=None):
    """Batches of (preprocessed images, one-hot labels), or (images, (labels, teacher
    logits)) with a cached `teacher` array. Training shuffles (seeded) and, with
    `augment`, randomly shifts (pad size/8, crop) and flips each image."""
    labels = tf.one_hot(np.asarray(y, np.int64), num_classes)
    targets = labels if teacher is None else (labels, teacher)
    ds = tf.data.Dataset.from_tensor_slices((x, targets))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    pad = max(1, x.shape[1] // 8)
    transform = preprocessing(preprocess) if isinstance(preprocess, str) else preprocess

    def prepare(batch, s):
        images, t = batch
        images = tf.cast(images, tf.float32)
        if training and augment:
            images = random_crop_flip(images, s, pad=pad)
        if transform is not None:
            images = transform(images)
        return images, t

    return tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def compile_for_eval(model):
    """Cross-entropy on logits or probabilities (as the model outputs) + accuracy."""
    model.compile(loss=default_loss(model),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


def evaluate(model, ds):
    compile_for_eval(model)
    res = model.evaluate(ds, verbose=0, return_dict=True)
    return {"test_top1": float(res["accuracy"]), "test_loss": float(res["loss"])}


def accuracy_fn(x, y, batch_size=64):
    """`f(model) -> accuracy` on preprocessed images `x` and integer labels `y`
    (the sensitivity allocation's validation batch)."""
    def f(model):
        preds = [np.argmax(keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=False)), -1)
                 for i in range(0, len(x), batch_size)]
        return float(np.mean(np.concatenate(preds) == y))
    return f


def recalibrate_batchnorm(model, images, batch_size=256):
    """Re-estimates every BatchNormalization's moving mean and variance on `images`
    (preprocessed), weights untouched. Pruning changes what each BN layer sees, and
    stale statistics can leave a pruned model predicting one class at inference even
    when its weights are fine (AdaBN-style recalibration; Li et al., 2016)."""
    bns = [l for l in leaf_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not bns or len(images) == 0:
        return model
    sums = {id(b): [0.0, 0.0] for b in bns}
    saved = {id(b): b.momentum for b in bns}
    n = 0
    try:
        for b in bns:
            b.momentum = 0.0  # moving statistics := the statistics of the batch just seen
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            model(chunk, training=True)
            for b in bns:  # average the per-batch statistics, weighted by batch size
                sums[id(b)][0] += keras.ops.convert_to_numpy(b.moving_mean) * len(chunk)
                sums[id(b)][1] += keras.ops.convert_to_numpy(b.moving_variance) * len(chunk)
            n += len(chunk)
    finally:
        for b in bns:
            b.momentum = saved[id(b)]
    for b in bns:
        b.moving_mean.assign(sums[id(b)][0] / n)
        b.moving_variance.assign(sums[id(b)][1] / n)
    return model




def prune_to_target(model, ranker, metric, target, allocation="global", rank_data=None, evaluate_fn=None,
                    round_to=1, exclude=(), max_ratio=0.9, latency_batch=16, progress=None):
    """Ranks `model`'s filters and prunes it to keep `target` of its own `metric`.
    Returns (pruned model, plan with the allocation's report in `plan.meta`)."""
    cnn = CNNModel(model)
    scores = ranker.rank_all(cnn, data=rank_data if ranker.needs_data else None, progress=progress)
    plan = allocate(cnn, scores, target, metric=metric, allocation=allocation, round_to=round_to,
                    exclude=exclude, max_ratio=max_ratio, evaluate=evaluate_fn, latency_batch=latency_batch,
                    meta={"ranker": ranker.name})
    return prune(cnn, plan), plan


def finetune(model, train_ds, epochs, lr=1e-3, teacher=None, distill=False, temperature=4.0, alpha=0.5,
             callbacks=(), verbose=0, validation_data=None):
    """Adam fine-tuning of `model` in place, optionally distilled from `teacher` (run
    on the fly, or cached in `train_ds` as (images, (labels, logits)))."""
    if epochs <= 0:
        return model
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if distill:
        trainer = Distiller(model, teacher, temperature, alpha)
        trainer.compile(optimizer=keras.optimizers.Adam(lr), metrics=metrics)
    else:
        trainer = model
        trainer.compile(optimizer=keras.optimizers.Adam(lr), metrics=metrics,
                        loss=default_loss(model))
    trainer.fit(train_ds, epochs=epochs, verbose=verbose, callbacks=list(callbacks),
                validation_data=validation_data)
    return model


def step_targets(target, steps):
    """Fractions of the baseline kept after each step, reaching `target` linearly."""
    return [round(1.0 - (1.0 - target) * i / steps, 12) for i in range(1, steps + 1)]  # no float noise


def cost_of(model, metric, latency_batch=16, latency_runs=10):
    if metric == "latency":
        from pruning import measure_latency

        return measure_latency(model, batch_size=latency_batch, runs=latency_runs)["ms_per_batch"]
    return PlanCost(model)({})[metric]


# --------------------------------------------------------------- the command
def run_compress(cfg, log, model=None, progress=None, echo=print, resume=None):
    """Evaluates, prunes to the target in `cfg.steps` rounds (each fine-tuned, optionally
    distilled), evaluates again and saves the model and the plan in the run's folder
    (`<out_dir>/<run id>-<slug>/`, and also to `cfg.output` when given). Returns a summary."""
    if resume is not None:
        raise ValueError(f"compress runs cannot be resumed. Received: resume={resume}; run it again instead.")
    cfg.validate()
    with common.distributed(cfg):
        return _run_compress(cfg, log, model, echo)


# How far above its target the allocation may land (`pruning.allocation.allocate`'s default).
TOLERANCE = inspect.signature(allocate).parameters["tolerance"].default


def precheck(cfg, log, model=None):
    """Every check `compress` can make before any run row or folder exists; each failure
    is an `InputError` (one line; the CLI exits 2). Returns (model, cfg with the image
    size, the (train, val, test) arrays, class names)."""
    for path in (cfg.output, cfg.output and plan_path_of(cfg.output)):
        try:
            if path:
                files.check_writable_file(path, "--output")
            files.check_output_owner(log, path, cfg.force, "--output")
        except ValueError as e:
            raise InputError(str(e)) from None
    if cfg.output and not cfg.output.endswith((".keras", ".h5")):
        raise InputError(f"Expected --output to be a .keras (or .h5) file. Received: {cfg.output!r}")
    if cfg.output and cfg.export:  # the exported file beside it (in a new run folder without --output)
        from experiments.files import check_export_output

        exported = export_path_of(cfg.output, cfg.export, cfg.quantize)
        try:
            check_export_output(exported, cfg.export)
            files.check_output_owner(log, exported, cfg.force, "--output")
        except ValueError as e:
            raise InputError(str(e)) from None
    model = model if model is not None else common.load_model_file(cfg.model)
    model = common.fixed_input(model, cfg.image_size)
    if common.dynamic_input(model):
        raise InputError(f"{cfg.model!r} has a dynamic input shape {tuple(model.inputs[0].shape)}: pass --image-size.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(f"compress trains an image classifier with one input and one output; {cfg.model!r} has "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs.")
    try:
        cnn = CNNModel(model)
    except ValueError as e:  # a layer the pruning engine cannot read
        raise InputError(f"Cannot prune {cfg.model!r}: {e}") from None
    groups = common.check_prunable(cnn, cfg.exclude, repr(cfg.model))
    metric, target = cfg.target
    if metric != "latency":  # the most every allowed conv can lose, counted without building it
        keep = {name: np.arange(n_kept(cnn.conv(name).filters, cfg.max_ratio, cfg.round_to))
                for g in groups for name in g}
        counter = PlanCost(cnn)
        least = counter(keep)[metric] / counter({})[metric]
        if least > target * (1 + TOLERANCE):
            raise InputError(f"Cannot reach target_{metric}={target:g}: removing {cfg.max_ratio:g} of the filters "
                             f"of every prunable conv keeps {least:.4f} of the {metric}. Raise --max-ratio, "
                             "exclude fewer layers, or give a larger target.")
    size = cfg.image_size or model.inputs[0].shape[1]
    cfg = dataclasses.replace(cfg, image_size=int(size))
    try:
        arrays, names = load_arrays(cfg)
    except ValueError as e:
        raise InputError(str(e)) from None
    if model.outputs[0].shape[-1] != len(names):
        raise InputError(f"The model has {model.outputs[0].shape[-1]} outputs but {cfg.data_dir!r} has "
                         f"{len(names)} classes ({', '.join(names)}).")
    return model, cfg, arrays, names


def plan_path_of(model_path):
    """The plan JSON written beside a compressed model."""
    return os.path.splitext(model_path)[0] + ".plan.json"


def export_path_of(model_path, format, quantize):
    """The file --export writes beside a compressed model."""
    from pruning.choices import EXTENSIONS

    return os.path.splitext(model_path)[0] + (f"-{quantize}" if quantize != "none" else "") + EXTENSIONS[format]




def _run_compress(cfg, log, model, echo):
    metric, target = cfg.target
    common.set_seed(cfg.seed)
    model, cfg, ((x_tr, y_tr), (x_val, y_val), (x_te, y_te)), names = precheck(cfg, log, model)
    classes = len(names)
    prep = preprocessing(cfg.preprocess)
    test_ds = array_dataset(x_te, y_te, classes, 128, prep)
    val_ds = array_dataset(x_val, y_val, classes, 128, prep) if len(x_val) else None
    rank_ds = array_dataset(x_tr, y_tr, classes, cfg.batch_size, prep).take(cfg.rank_batches)
    cached = None
    if cfg.distill and not cfg.augment:  # the teacher sees the same images every epoch: run it once
        cached = teacher_logits(model, array_dataset(x_tr, y_tr, classes, 128, prep).map(lambda x, y: x))
    train_ds = array_dataset(x_tr, y_tr, classes, cfg.batch_size, prep, training=True, augment=cfg.augment,
                             seed=cfg.seed, teacher=cached)
    n_val = min(cfg.sensitivity_images, len(x_val))
    sens_x = np.concatenate([b[0].numpy() for b in array_dataset(x_val[:n_val], y_val[:n_val], classes, 128, prep)]) \
        if n_val else None
    evaluate_fn = accuracy_fn(sens_x, y_val[:n_val]) if n_val else None
    calib_x = np.concatenate([b[0].numpy() for b in rank_ds])  # BN re-estimation after each prune
    ranker = make_ranker(cfg.ranker, cfg.ranker_kwargs, seed=cfg.seed)
    stem = os.path.splitext(os.path.basename(cfg.model))[0]
    config = {**common.config_dict(cfg), "ranker": ranker.name, "num_classes": classes, "classes": names,
              "images": {"train": len(x_tr), "val": len(x_val), "test": len(x_te)}}
    dataset = os.path.basename(os.path.normpath(cfg.data_dir))

    with log.run("compress", model=os.path.basename(cfg.model), dataset=dataset, ranker=ranker.name,
                 seed=cfg.seed, config=config) as parent:
        parent.make_dir(cfg.out_dir, common.slug(stem, f"{metric}{target:g}", ranker.name, f"seed{cfg.seed}"))
        output = os.path.join(parent.dir, f"{stem}-{metric}{target:g}.keras")
        plan_path = plan_path_of(output)
        base = evaluate(model, test_ds)
        base_sizes, base_latency = common.measure(model, cfg.latency_batch, cfg.latency_runs)
        echo(f"baseline: top-1 {base['test_top1']:.4f}, {base_sizes['params']:,} params, "
             f"{base_sizes['macs']:,} MACs, {base_sizes['latency_ms']:.1f} ms/batch")
        base_cost = base_sizes["latency_ms"] if metric == "latency" else base_sizes[metric]
        teacher = model if cfg.distill and cached is None else None
        current, total_plan, steps = model, None, []
        for i, goal in enumerate(step_targets(target, cfg.steps), start=1):
            with log.run("compress", model=os.path.basename(cfg.model), dataset=dataset, ranker=ranker.name,
                         seed=cfg.seed, parent_id=parent.id, config={**config, "step": i, "goal": goal}) as run:
                now = cost_of(current, metric, cfg.latency_batch, cfg.latency_runs)
                relative = min(1.0, round(goal * base_cost / now, 12))  # no float noise in messages
                pruned, plan = prune_to_target(
                    current, ranker, metric, relative, cfg.allocation, rank_ds, evaluate_fn, cfg.round_to,
                    cfg.exclude, cfg.max_ratio, cfg.latency_batch)
                log.log_layer_prunes(run.id, plan, ranker.name)
                recalibrate_batchnorm(pruned, calib_x)
                total_plan = plan if total_plan is None else compose(total_plan, plan)
                right_after = evaluate(pruned, test_ds)
                if cfg.train_all:
                    pruned.trainable = True
                common.set_seed(cfg.seed + i)
                finetune(pruned, train_ds, cfg.epochs, cfg.lr, teacher, cfg.distill, cfg.temperature, cfg.alpha,
                         [run.callback(f"step{i}")], verbose=cfg.verbose, validation_data=val_ds)
                after = evaluate(pruned, test_ds)
                sizes = model_stats(pruned)
                step = {"step": i, "goal": goal, "reached": plan.meta["reached"] * now / base_cost,
                        "pruned_top1": right_after["test_top1"], **after, "params": sizes["params"],
                        "macs": sizes["macs"]}
                run.finish(test_top1=after["test_top1"], test_loss=after["test_loss"], params=sizes["params"],
                           trainable_params=sizes["trainable_params"], macs=sizes["macs"],
                           metrics={"plan": plan.to_dict(), **step})
            steps.append({"run_id": run.id, **step})
            echo(f"step {i}/{cfg.steps}: keep {goal:.3f} of {metric} -> pruned top-1 "
                 f"{right_after['test_top1']:.4f}, fine-tuned {after['test_top1']:.4f}, {sizes['macs']:,} MACs")
            current = pruned

        final = evaluate(current, test_ds)
        sizes, latency = common.measure(current, cfg.latency_batch, cfg.latency_runs, baseline=model)  # one window
        final_cost = sizes["latency_ms"] if metric == "latency" else sizes[metric]
        total_plan.meta.update({"ranker": ranker.name, "metric": metric, "target": target,
                                "reached": final_cost / base_cost, "allocation": cfg.allocation})
        common.save_model(current, output)
        files.write_text(plan_path, total_plan.to_json())
        if cfg.output:  # a copy (model and plan) where the user asked; the run's own folder keeps the original
            common.save_model(current, cfg.output)
            files.write_text(plan_path_of(cfg.output), total_plan.to_json())
            log.add_outputs(parent.id, {cfg.output: "model", plan_path_of(cfg.output): "plan"})
        summary = {"run_id": parent.id, "metric": metric, "target": target, "reached": final_cost / base_cost,
                   "baseline": {**base, **base_sizes}, "final": {**final, **sizes},
                   "speedup": latency["speedup"], "steps": steps,
                   "model": output, "plan": plan_path,
                   "layers": {n: f"{len(k)}/{total_plan.filters.get(n, len(k))}" for n, k in total_plan.keep.items()}}
        parent.finish(**final, **sizes, artifact=output,
                      metrics={"baseline": summary["baseline"], "baseline_latency": base_latency,
                               "latency": latency, "reached": summary["reached"], "speedup": summary["speedup"],
                               "plan": plan_path, "steps": steps})
    echo(f"compressed: top-1 {final['test_top1']:.4f} (baseline {base['test_top1']:.4f}), {metric} "
         f"{summary['reached']:.3f} of the baseline (target {target}), {sizes['params']:,} params, "
         f"{sizes['macs']:,} MACs, {sizes['latency_ms']:.1f} ms/batch ({summary['speedup']:.2f}x)")
    if summary["reached"] > target * (1 + TOLERANCE):
        echo(f"warning: the compressed model keeps {summary['reached']:.3f} of the baseline {metric}, above the "
             f"target {target:g}" + (" (latency does not fall in proportion to the filters removed on this machine; "
                                     "a smaller target prunes more)" if metric == "latency" else
                                     " (filter counts are whole numbers)") + ".")
    if not on_scratch(cfg):
        echo(f"wrote {output} and {plan_path} (run {parent.id})")
    if cfg.export:  # the last step: the same export as `export MODEL -o ...`, logged under this run
        from experiments.deploy import export_run

        source = cfg.output or output
        pick = np.random.default_rng(cfg.seed).permutation(len(x_tr))[:cfg.calibration_images]
        summary["export"] = export_run(
            log, current, source, export_path_of(source, cfg.export, cfg.quantize), cfg.export, cfg.quantize,
            cfg.preprocess, calibration=x_tr[pick].astype(np.float32), evaluation=(x_te.astype(np.float32), y_te),
            latency_batch=cfg.latency_batch, latency_runs=cfg.latency_runs, parent_id=parent.id, echo=echo)
    return summary


def kept_filters_line(summary):
    """One line: the filters each conv of the compressed model keeps."""
    return "kept filters: " + ", ".join(f"{n} {v}" for n, v in summary["layers"].items())


def summary_markdown(summary):
    """The --results file of a compress run: target, steps and kept filters."""
    steps = "\n".join(f"| {s['step']} | {s['goal']:.3f} | {s['pruned_top1']:.4f} | {s['test_top1']:.4f} | "
                      f"{s['macs']:,} |" for s in summary["steps"])
    return (f"# compress: run {summary['run_id']}\n\ntarget: {summary['metric']} {summary['target']}, reached "
            f"{summary['reached']:.3f}; top-1 {summary['baseline']['test_top1']:.4f} -> "
            f"{summary['final']['test_top1']:.4f}\n\n| step | goal | right after pruning | fine-tuned | MACs |\n"
            f"|---|---|---|---|---|\n{steps}\n\n{kept_filters_line(summary)}\n")
