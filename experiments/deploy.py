"""The deployable file of a model: fold, add its preprocessing, export, check, time, log.

    record = export_run(log, model, "rice_half.keras", "rice_half-int8.tflite", quantize="int8",
                        preprocess="vgg16", calibration=raw_images, evaluation=(raw_images, labels))

The exported file takes raw RGB pixels in [0, 255]: the model's own preprocessing (vgg16,
cifar10, ...; see `experiments.data.preprocessing`) is its first layer, after BatchNorm
(and the ReLU after it) is folded into the convs (`pruning.export.fold_batchnorm`). It is
then checked against the `.keras` model on the same images (max abs difference, top-1
agreement, accuracy), and both are timed at batch 1 and batch N in interleaved rounds.
"""

import json
import os
import shutil

import keras
import numpy as np

from experiments import common, files
from experiments.config import InputError
from experiments.data import check_readable, list_image_folder, load_image, preprocessing
from pruning.export import Runner, check_export, export_model, file_size, fixed_input_shape, \
    fold_batchnorm
from pruning.latency import interleaved_latency
from experiments.files import PARTIAL, remove_partial_files


class Preprocessing(keras.layers.Layer):
    """The input transform `name` (see `experiments.data.preprocessing`) as the first layer of
    an exported model, so that the file takes raw RGB pixels in [0, 255]."""

    def __init__(self, transform="vgg16", **kwargs):
        super().__init__(**kwargs)
        self.transform = transform
        self._fn = preprocessing(transform)

    def call(self, x):
        return x if self._fn is None else self._fn(x)

    def get_config(self):
        return {**super().get_config(), "transform": self.transform}


def deployable(model, preprocess):
    """`model` with BatchNorm (+ ReLU) folded and `preprocess` as its first layer: the graph
    that is exported. Its input is raw pixels."""
    shape = fixed_input_shape(model)
    folded = fold_batchnorm(model)
    inp = keras.Input(shape, name="pixels")
    return keras.Model(inp, folded(Preprocessing(preprocess, name="preprocessing")(inp)),
                       name=f"{model.name}_deploy")


def load_images(folder, model, limit=None, seed=0, what="--calibration-dir"):
    """Raw pixels (float32, [0, 255], at the model's input size), labels and class names of the
    images of `folder/<class>/*.jpg`, at most `limit` (a seeded, class-balanced draw).
    ValueErrors in one line: not a folder, empty, no class folders, undecodable files."""
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {folder!r} is not a folder. Expected a folder of <class>/<image>.jpg")
    if not os.listdir(folder):
        raise ValueError(f"{what} {folder!r} is empty. Expected a folder of <class>/<image>.jpg")
    h, w, c = fixed_input_shape(model)
    if h != w or c != 3:
        raise ValueError(f"Images are read as square RGB; the model takes {h}x{w}x{c} inputs.")
    try:
        paths, labels, names = list_image_folder(folder)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if limit is not None and limit < len(paths):
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(np.nonzero(labels == k)[0]) for k in range(len(names))])
        # round-robin over classes, so every class is in the draw
        rank = np.concatenate([np.arange((labels == k).sum()) for k in range(len(names))])
        pick = np.sort(order[np.argsort(rank, kind="stable")][:limit])
        paths, labels = [paths[i] for i in pick], labels[pick]
    try:
        check_readable(paths)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    images = np.stack([load_image(p, h).numpy() for p in paths]).astype(np.float32)
    return images, labels, names


def model_run(log, path):
    """The completed run whose model is `path` (its artifact, or the `output` copy of its config), or None.
    Only runs that wrote a model count (a compress step's config names the output too)."""
    target = os.path.abspath(path)
    for row in reversed(log.runs(status="completed")):
        if not row.get("artifact"):
            continue
        config = json.loads(row["config"]) if row.get("config") else {}
        candidates = [row.get("artifact"), config.get("output") if isinstance(config, dict) else None]
        if any(c and os.path.abspath(c) == target for c in candidates):
            return row
    return None


def logged_preprocess(row):
    """The preprocessing recorded in a run's config, or None."""
    config = json.loads(row["config"]) if row and row.get("config") else {}
    value = config.get("preprocess") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def write_export(model, path, format, quantize, calibration):
    """Exports atomically: to a temporary path beside `path`, moved into place once complete."""
    if format != "saved_model":
        with files.atomic_path(path) as tmp:
            export_model(model, tmp, format, quantize, calibration)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    files.ensure_writable_dir(folder)
    remove_partial_files(folder)  # left in this folder by killed writers
    tmp, old = f"{path}{PARTIAL}{os.getpid()}", f"{path}.old-{os.getpid()}"
    try:
        export_model(model, tmp, format, quantize, calibration)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:  # as `files.atomic_path` says it
        raise ValueError(f"Cannot write {path!r}: {files.os_reason(e)} ({e.strerror or e}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def top1(outputs):
    return np.argmax(np.asarray(outputs).reshape(len(outputs), -1), axis=-1)


def check_against_keras(model, runner, images, preprocess, labels=None):
    """Outputs of the exported file (on raw `images`) against the `.keras` model (on the
    preprocessed images): max abs difference, relative difference, top-1 agreement and, with
    `labels`, the accuracy of both."""
    fn = preprocessing(preprocess) or (lambda x: x)
    ref = np.concatenate([keras.ops.convert_to_numpy(model(fn(images[i:i + 64]), training=False))
                          for i in range(0, len(images), 64)])
    out = runner.predict(images).reshape(ref.shape)
    diff = float(np.max(np.abs(out - ref)))
    result = {"images": int(len(images)), "max_abs_diff": diff,
              "max_rel_diff": diff / max(float(np.max(np.abs(ref))), 1e-12),
              "top1_agreement": float(np.mean(top1(out) == top1(ref)))}
    if labels is not None:
        result["accuracy"] = float(np.mean(top1(out) == labels))
        result["float_accuracy"] = float(np.mean(top1(ref) == labels))
    return result


def time_export(model, path, format, batch_size, runs, shape):
    """Batch-1 and batch-N latency of the `.keras` model and the exported file, interleaved."""
    timings = {}
    for batch in sorted({1, batch_size}):
        runner = Runner(path, format, batch_size=batch)
        timing = interleaved_latency({"keras": model, "export": runner}, batch_size=batch, runs=1, rounds=runs,
                                     input_shape=shape)
        timings[f"batch{batch}"] = timing
    return timings


def export_run(log, model, model_path, output, format="litert", quantize="none", preprocess="vgg16",
               calibration=None, evaluation=None, latency_batch=16, latency_runs=10, parent_id=None, config=None,
               echo=print):
    """Exports `model` (loaded from `model_path`) to `output` and logs an `export` run (child of
    `parent_id`): format, quantization, file size, check against the `.keras` model, latencies.

    calibration: raw images (N x H x W x 3, [0, 255]) for int8 calibration and, without
    `evaluation`, for the check. evaluation: (raw images, labels) for agreement and accuracy.
    Returns the run's record (also its metrics); prints one summary line."""
    check_export(format, quantize, calibration if quantize == "int8" else None)
    if format == "saved_model":  # "serve/" names the folder "serve", not a file inside it
        output = os.path.normpath(output)
    shape = fixed_input_shape(model)
    files.check_export_output(output, format)
    if quantize == "int8" and calibration is None:
        raise ValueError("int8 quantization needs calibration images: pass --calibration-dir IMAGES.")
    export = deployable(model, preprocess)
    if evaluation is not None:
        check_images, labels, source = evaluation[0], np.asarray(evaluation[1]), "evaluation images"
    elif calibration is not None:
        check_images, labels, source = calibration, None, "calibration images"
    else:
        check_images = np.random.default_rng(0).uniform(0, 255, (32, *shape)).astype(np.float32)
        labels, source = None, "random pixels (no images given)"
    config = {"model": model_path, "output": output, "format": format, "quantize": quantize,
              "preprocess": preprocess, "calibration_images": None if calibration is None else int(len(calibration)),
              "latency_batch": latency_batch, "latency_runs": latency_runs, **(config or {})}
    with log.run("export", model=os.path.basename(model_path), parent_id=parent_id, config=config) as run:
        write_export(export, output, format, quantize, calibration if quantize == "int8" else None)
        runner = Runner(output, format, batch_size=min(64, len(check_images)))
        check = check_against_keras(model, runner, check_images, preprocess, labels)
        timings = time_export(model, output, format, latency_batch, latency_runs, shape)
        keras_bytes = os.path.getsize(model_path) if os.path.isfile(model_path) else None
        size = file_size(output)
        latency = {name: {"keras_ms": t["models"]["keras"]["ms_per_batch"],
                          "export_ms": t["models"]["export"]["ms_per_batch"], "speedup": t["speedup"]["export"],
                          "keras_rounds_ms": t["models"]["keras"]["rounds_ms"],
                          "export_rounds_ms": t["models"]["export"]["rounds_ms"],
                          "keras_spread": t["models"]["keras"]["spread"],
                          "export_spread": t["models"]["export"]["spread"], "batch_size": t["batch_size"],
                          "rounds": t["rounds"], "machine_before": t["machine_before"],
                          "machine_after": t["machine_after"]} for name, t in timings.items()}
        record = {"format": format, "quantize": quantize, "preprocess": preprocess, "file_bytes": size,
                  "keras_bytes": keras_bytes, "size_ratio": size / keras_bytes if keras_bytes else None,
                  "calibration_images": config["calibration_images"], "check_on": source, **check,
                  "latency": latency}
        run.finish(test_top1=check.get("accuracy"), latency_ms=latency["batch1"]["export_ms"], artifact=output,
                   metrics=record)
    record["run_id"] = run.id
    echo(summary_line(output, record))
    return record


def run_export(cfg, log, progress=None, echo=print, resume=None):
    """The `export` command: `cfg` (an `ExportConfig`, validated) -> one logged export run
    (`export_run`), child of the run whose model `cfg.model_path` is; its preprocessing is
    `cfg.preprocess`, else that run's, else vgg16. An `InputError` (the CLI exits 2) is a bad
    input found before the run: -o a finished run's file, a model without a fixed input shape,
    unusable --calibration-dir or --eval-dir images; any other ValueError (exit 1) a model
    file that cannot be read, or a failure of the run itself. `progress` and `resume` are
    unused (an export cannot resume). Returns the run's record."""
    try:
        files.check_output_owner(log, cfg.output, cfg.force, "-o")
    except ValueError as e:
        raise InputError(str(e)) from None
    model = common.load_model_file(cfg.model_path, error=ValueError)
    parent = model_run(log, cfg.model_path)
    preprocess = cfg.preprocess or logged_preprocess(parent) or "vgg16"
    try:
        fixed_input_shape(model)
        calibration = (load_images(cfg.calibration_dir, model, cfg.calibration_images, cfg.seed)[0]
                       if cfg.calibration_dir else None)
        evaluation = None
        if cfg.eval_dir:
            images, labels, names = load_images(cfg.eval_dir, model, what="--eval-dir")
            if model.outputs[0].shape[-1] != len(names):
                raise ValueError(f"The model has {model.outputs[0].shape[-1]} outputs but --eval-dir "
                                 f"{cfg.eval_dir!r} has {len(names)} classes ({', '.join(names)}).")
            evaluation = (images, labels)
    except ValueError as e:
        raise InputError(str(e)) from None
    return export_run(log, model, cfg.model_path, cfg.output, cfg.format, cfg.quantize, preprocess, calibration,
                      evaluation, cfg.latency_batch, cfg.runs, parent_id=parent["id"] if parent else None,
                      config={"calibration_dir": cfg.calibration_dir, "eval_dir": cfg.eval_dir, "seed": cfg.seed},
                      echo=echo)


def summary_line(output, r):
    """`rice_half-int8.tflite: 1.9 MB (x0.26), top-1 agreement 0.997, accuracy 0.933 (float 0.933),
    1.8 ms at batch 1 (5.1x the .keras model)`."""
    parts = [f"{r['file_bytes'] / 1e6:.1f} MB" + (f" (x{r['size_ratio']:.2f})" if r["size_ratio"] else "")]
    if r["quantize"] == "none":
        parts.append(f"max abs diff {r['max_abs_diff']:.2g}")
    parts.append(f"top-1 agreement {r['top1_agreement']:.3f}")
    if "accuracy" in r:
        parts.append(f"accuracy {r['accuracy']:.3f} (float {r['float_accuracy']:.3f})")
    b1 = r["latency"]["batch1"]
    parts.append(f"{b1['export_ms']:.1f} ms at batch 1 ({b1['speedup']:.1f}x the .keras model)")
    return f"{os.path.basename(os.path.normpath(output))}: {', '.join(parts)}"
