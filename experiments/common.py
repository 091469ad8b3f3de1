"""Pieces every experiment shares: seeding, run folders, atomic saves, resumable
training phases, measuring, and the end of a model's run (`finish_model_run`)."""

import contextlib
import dataclasses
import json
import os
import shutil

import keras
import numpy as np

from pruning import CNNModel, PrunePlan, load_scores, measure_latency, model_stats, prune
from pruning.callbacks import TimeHistory
from experiments.files import atomic_path


def set_seed(seed):
    """Seeds Python, NumPy and TensorFlow (the seed is recorded with every run)."""
    keras.utils.set_random_seed(int(seed))


def config_dict(cfg):
    d = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if d.get("strategy") == "multiworker":  # the cluster's size and addresses, with the run
        from experiments.distribute import cluster_config

        d["cluster"] = cluster_config()
    return d


def load_model_file(path, name="model", error=None):
    """Loads a saved Keras model (.keras, .h5); every reason it cannot (missing,
    not a Keras zip, truncated config.json or weights, ...) is one `error` naming the
    file: an `InputError` (the CLI exits 2) by default; `prune` and `export` pass
    ValueError (exit 1, as every command that only reads a model)."""
    import zipfile

    from experiments.config import InputError, check_model_file

    error = error or InputError
    try:
        check_model_file(path, name)
    except ValueError as e:
        raise error(str(e)) from None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise error(f"Could not load {path!r} as a Keras model: {e}") from None
        if "config.json" not in members:
            raise error(f"{path!r} is a zip archive but not a Keras model: it has no config.json (it holds "
                             f"{', '.join(members[:5]) or 'nothing'}{' ...' if len(members) > 5 else ''}).")
    try:
        return keras.models.load_model(path)
    except json.JSONDecodeError as e:
        reason = f"its config.json is not valid JSON (truncated?): {e}"
    except OSError as e:
        reason = f"its weights cannot be read (truncated?): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    except Exception as e:  # Keras raises many types for a file it cannot read
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise error(f"Could not load {path!r} as a Keras model: {reason}") from None


def save_model(model, path):
    """Saves a `.keras` file atomically; returns the path."""
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


def slug(*parts):
    """A file-name-safe run folder suffix from config values."""
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


# ------------------------------------------------------------ training phases
def train_phase(run, phase, model, fit, extra=()):
    """Runs `fit(model, callbacks)` as phase `phase` of `run` once, resumably; returns
    the trained model.

    With a run that has a folder (see `save_sqlite.Run.make_dir`): a phase that
    finished before an interruption is not run again, its saved model is loaded; a
    phase that was cut off continues from its last finished epoch with model,
    optimizer and learning-rate schedule state (Keras `BackupAndRestore` in
    `<run dir>/backup/<phase>`). The callbacks are the run's epoch logger, `extra`,
    then the backup. Without a run, `fit` gets a `TimeHistory` and `extra`.
    """
    if run is None or not run.dir:
        fit(model, [TimeHistory(), *extra])
        return model
    done = phase_checkpoint(run, phase)
    if os.path.exists(done):
        return keras.models.load_model(done)
    from experiments.distribute import backup_callbacks, chief_text, collectives

    # In a cluster every worker restores from the chief's backup (chief_text: its run folder).
    own = os.path.abspath(run.dir)
    backup = backup_callbacks(*(os.path.join(d, "backup", phase) for d in (own, chief_text(own))))
    with collectives():  # a lost worker of a cluster interrupts the run (resumable) instead of failing it
        fit(model, [run.callback(phase), *extra, *backup])
    save_model(model, done)
    return model


def phase_checkpoint(run, phase):
    return os.path.join(run.dir, "phases", f"{phase}.keras")


def last_finished_phase(run, phases):
    """The last of `phases` whose checkpoint exists in `run`'s folder, or None."""
    if run is None or not run.dir:
        return None
    return next((p for p in reversed(phases) if os.path.exists(phase_checkpoint(run, p))), None)


@contextlib.contextmanager
def distributed(cfg):
    """Runs the block under the config's mixed-precision policy (`cfg.mixed_precision`)
    and inside its tf.distribute strategy's scope (`cfg.strategy`): every model built,
    loaded, pruned or compiled in it is placed on the strategy's replicas. The
    previous dtype policy is restored afterwards."""
    from experiments.distribute import get_strategy, set_mixed_precision

    previous = keras.mixed_precision.global_policy().name
    set_mixed_precision(cfg.mixed_precision)
    try:
        strategy = get_strategy(cfg.strategy)
        with strategy.scope():
            yield strategy
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ------------------------------------------------------------ odd models
def dynamic_input(model):
    """Whether some input of `model` has a dimension (besides the batch) of unknown size."""
    try:
        inputs = model.inputs or []
    except (AttributeError, ValueError):  # an unbuilt model: nothing is known
        return False
    return any(d is None for t in inputs for d in t.shape[1:])


def fixed_input(model, image_size=None):
    """`model` with a known input shape: an unbuilt Sequential is built for
    `image_size` x `image_size` x 3, and a model whose input size is dynamic is cloned
    (same weights) onto inputs whose unknown dimensions are `image_size`. Without
    `image_size` a dynamic model is returned as it is (see `dynamic_input`) and an
    unbuilt one is an `InputError`."""
    from experiments.config import InputError

    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        if image_size is None:
            raise InputError(f"The model {model.name!r} has no input shape yet (an unbuilt Sequential): pass "
                             "--image-size.")
        model.build((None, image_size, image_size, 3))
        return model
    if image_size is None or not dynamic_input(model):
        return model
    shaped = [keras.Input(tuple(image_size if d is None else d for d in t.shape[1:]), dtype=t.dtype) for t in inputs]
    clone = keras.models.clone_model(model, input_tensors=shaped if len(shaped) > 1 else shaped[0])
    clone.set_weights(model.get_weights())
    return clone


def model_sizes(model):
    """`pruning.model_stats`, with macs None when the input size is dynamic (the MACs
    depend on the image size)."""
    if dynamic_input(model):
        return {"trainable_params": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
                "non_trainable_params": sum(int(np.prod(w.shape)) for w in model.non_trainable_weights),
                "params": int(model.count_params()), "macs": None}
    return model_stats(model)


def check_prunable(cnn, exclude=(), source="the model"):
    """The tied groups of convs that may lose filters; an `InputError` (one line) when
    there are none: no conv, or every conv excluded, blocked or feeding the output."""
    from experiments.config import InputError
    from pruning.allocation import prunable_groups
    from pruning.plan import nothing_prunable

    try:
        groups = prunable_groups(cnn, exclude)  # also: every exclude name is a conv
    except ValueError as e:
        raise InputError(str(e)) from None
    if not groups:
        # No conv is prunable at all (the engine's reasons, opaque layers' hidden convs
        # included), or the prunable ones are all excluded.
        raise InputError(nothing_prunable(cnn) or (
            f"Nothing to prune in {source}: every prunable convolution is excluded "
            f"({', '.join(c.name for c in cnn.prunable_layers)})."))
    return groups


# ------------------------------------------------------------ measuring
def measure(model, latency_batch=32, latency_runs=10, baseline=None):
    """Params, MACs and inference latency of `model` as run fields, and the latency record.
    With a `baseline` model, both are timed in the same window (`timed_against`) and the
    record holds the speed-up."""
    stats = model_stats(model)
    if baseline is not None:
        latency = timed_against(model, baseline, latency_batch, latency_runs)
    else:
        latency = measure_latency(model, batch_size=latency_batch, runs=latency_runs)
    return {
        "params": stats["params"],
        "trainable_params": stats["trainable_params"],
        "macs": stats["macs"],
        "latency_ms": latency["ms_per_batch"],
    }, latency


def timed_against(model, baseline=None, latency_batch=32, latency_runs=10):
    """The latency record of `model` timed together with `baseline` (a keras.Model; None:
    `model` alone) in `latency_runs` interleaved rounds of one call each (see
    `pruning.latency.interleaved_latency`): ms_per_batch (median over rounds), speedup,
    spread and machine load before and after."""
    from pruning.latency import interleaved_latency, latency_summary

    models = {"model": model} if baseline is None else {"baseline": baseline, "model": model}
    timing = interleaved_latency(models, batch_size=latency_batch, runs=1, rounds=latency_runs)
    return latency_summary(timing, "model")


_BASELINE_MODELS = {}  # (path, mtime) -> loaded baseline, so each ratio of a run does not reload it


def baseline_model(baseline):
    """The model of a baseline summary (`finish_model_run`'s return value), loaded from its
    artifact, or None when that file is gone."""
    path = (baseline or {}).get("artifact")
    if not path or not os.path.exists(path):
        return None
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _BASELINE_MODELS:
        _BASELINE_MODELS.clear()
        _BASELINE_MODELS[key] = keras.models.load_model(path)
    return _BASELINE_MODELS[key]


def finish_model_run(run, model, evaluate=None, *, filename="model.keras", latency_batch=32, latency_runs=10,
                     baseline=None, artifact=None, save=True, metrics=None, label="model", echo=print):
    """The end of every experiment's run: evaluate -> measure -> speed-up -> save ->
    finish the run -> one summary line. Used by cifar, rice, prune and compress.

    Args:
        run: the `save_sqlite.Run` to finish (its folder, from `run.make_dir`, gets the
            model), or None to only measure and save (then `artifact` is the path).
        model: the trained Keras model of this run.
        evaluate: `evaluate(model) -> dict` of run fields (test_top1, test_top5,
            test_loss) plus optionally "metrics", a dict for the run's metrics JSON,
            and "summary", more accuracies (name -> fraction) for the summary dict
            and line only (e.g. rice's heldout_top1); None when there is no test data.
        filename: the model's file name in the run folder.
        latency_batch: images per timed batch; None skips latency (and speed-up).
        latency_runs: timed calls (the median is recorded).
        baseline: the baseline run's summary (this function's return value), for
            `speedup` = baseline latency / this latency, both timed in the same window
            (the baseline model is loaded from its artifact); None for a baseline.
        artifact: the path to record (and write the model to) instead of
            `<run dir>/<filename>`.
        save: False when `artifact` already holds the model (a --pretrained baseline).
        metrics: more entries for the run's metrics JSON.
        label: start of the summary line.
        echo: where the summary line goes.

    Returns the summary dict: run_id, artifact, the evaluation fields, params,
    trainable_params, macs, latency_ms and speedup.
    """
    fields = dict(evaluate(model)) if evaluate is not None else {}
    details = {**fields.pop("metrics", {}), **(metrics or {})}
    extra = fields.pop("summary", {})
    stats = model_sizes(model)
    sizes = {"params": stats["params"], "trainable_params": stats["trainable_params"], "macs": stats["macs"]}
    speedup = None
    if latency_batch:
        # Timed together with the baseline in one window: a load change hits both alike.
        reference = baseline_model(baseline) if baseline else None
        latency = timed_against(model, reference, latency_batch, latency_runs)
        if baseline and reference is None:  # the baseline's file is gone: its logged latency, another window
            latency = {**latency, "interleaved": False, "baseline_ms_per_batch": baseline["latency_ms"],
                       "speedup": baseline["latency_ms"] / latency["ms_per_batch"]}
        sizes["latency_ms"] = latency["ms_per_batch"]
        details["latency"] = latency
        speedup = latency["speedup"]
        details["speedup"] = speedup
        if baseline and baseline.get("test_top1") is not None:
            details["baseline_top1"] = baseline["test_top1"]
    path = artifact or os.path.join(run.dir, filename)
    if save:
        save_model(model, path)
    if run is not None:
        run.finish(**fields, **sizes, artifact=path, metrics=details)
        if run.dir:  # the run's model is saved: its phase checkpoints are no longer needed
            shutil.rmtree(os.path.join(run.dir, "phases"), ignore_errors=True)
    summary = {"run_id": run.id if run is not None else None, "artifact": path, **fields, **extra, **sizes,
               "speedup": speedup}
    echo(summary_line(label, summary, latency_batch, extra))
    return summary


def finished_parent(log, row):
    """(parent model path, parent summary) of pruned run `row`, for resuming it: the
    fields `finish_model_run` returned when the parent finished."""
    parent = log.get_run(row["parent_id"])
    if parent["status"] != "completed" or not parent["artifact"] or not os.path.exists(parent["artifact"]):
        raise ValueError(f"Run {row['id']} cannot be resumed: its baseline run {parent['id']} has no finished "
                         f"model ({parent['status']}, {parent['artifact']!r}).")
    return parent["artifact"], {k: parent[k] for k in ("test_top1", "latency_ms")} | {
        "run_id": parent["id"], "artifact": parent["artifact"]}


def summary_line(label, s, latency_batch=None, extra=()):
    parts = [f"top-1 {s['test_top1']:.4f}"] if s.get("test_top1") is not None else []
    parts += [f"{name.replace('_top1', '').replace('_', '-')} {s[name]:.4f}" for name in extra]
    parts += [f"{s['params']:,} params", f"{s['macs']:,} MACs" if s.get("macs") is not None else "MACs not counted "
              "(dynamic input size)"]
    if s.get("latency_ms") is not None:
        parts.append(f"{s['latency_ms']:.1f} ms/batch of {latency_batch} ({s['speedup']:.2f}x)")
    return f"{label}: {', '.join(parts)}"


# ------------------------------------------------------------------ pruning
def compute_scores(model, ranker, data=None, ranks_dir=None, seed=0, rank_batches=None, progress=None,
                   options=None):
    """Filter scores of every conv, read from `ranks_dir` when all are there, else
    computed with the ranker and saved there (files named by ranker, see
    `pruning.rankers.score_file`). Returns (scores, reused).

    `ranker`: a `pruning.Ranker` or a registered name (+ constructor `options`);
    `seed` and `rank_batches` reach its constructor where it takes them.
    `progress(label, total)`, if given, returns a context manager yielding an
    `update(n)` callable (click.progressbar fits).
    """
    from pruning import make_ranker, save_scores

    ranker = make_ranker(ranker, options, seed=seed, num_batches=rank_batches)
    cnn = CNNModel(model)
    if ranks_dir:
        cached = load_scores(cnn, ranks_dir, ranker=ranker.name)
        if cached is not None:
            return cached, True
    total = rank_batches if ranker.needs_data and rank_batches else len(cnn.conv_layers)
    with (progress or _no_progress)(f"ranking filters ({ranker.name})", total) as update:
        scores = ranker.rank_all(cnn, data=data, progress=update)
    if ranks_dir:
        save_scores(scores, cnn, ranks_dir, ranker=ranker.name)
    return scores, False


@contextlib.contextmanager
def _no_progress(label, total):
    yield None


def prune_logged(model, scores, ratio, run, exclude=(), ranker=None, round_to=1, round_mode="nearest"):
    """Prunes `model` and records the per-layer filter counts of the plan in the log.

    `ratio`: the fraction of filters removed, one number for every conv or
    {conv name: fraction} (see `pruning.plan.resolve_ratios`)."""
    cnn = CNNModel(model)
    plan = PrunePlan.from_scores(cnn, scores, ratio, exclude=exclude, meta={"ranker": ranker},
                                 round_to=round_to, round_mode=round_mode)
    pruned = prune(cnn, plan)
    if run is not None:
        run.log.log_layer_prunes(run.id, plan, ranker)
    return pruned, plan


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
