"""What deploying a pruned model gains: size, top-1 and latency of the README quick start's baseline
and its `compress --target-macs 0.5` model as .keras, LiteRT (float, float16, dynamic, int8) and ONNX.

    python -m benchmarks.deploy BASELINE.keras HALF.keras

Top-1 on the bundled rice sample's test split (the split `compress` evaluates: data/rice_sample, seed 0,
70/15/15), int8 calibrated on 100 seeded images of its training split. Every exported file takes raw
pixels (vgg16 preprocessing inside, BatchNorm folded). Latency: every file and model timed in the same
window in interleaved rounds (`pruning.interleaved_latency`), batch 1 and batch 16, median over rounds.
"""

import os

import click
import numpy as np

from benchmarks import command, invocation, write

VARIANTS = [("litert", "none"), ("litert", "float16"), ("litert", "dynamic"), ("litert", "int8"), ("onnx", "none")]


@command("deploy")
@click.argument("baseline", type=click.Path(exists=True, dir_okay=False))
@click.argument("compressed", type=click.Path(exists=True, dir_okay=False))
@click.option("--data-dir", default="data/rice_sample", show_default=True, help="Images (<class>/*.jpg).")
@click.option("--work-dir", default="/tmp/deploy_benchmark", show_default=True, help="Folder for the exported files.")
@click.option("--rounds", type=int, default=7, show_default=True, help="Interleaved timing rounds.")
def main(baseline, compressed, data_dir, work_dir, rounds, output):
    """Export both models in every format; write their size, top-1 and latency."""
    import keras

    from experiments.compress import load_arrays
    from experiments.config import CompressConfig
    from experiments.deploy import check_against_keras, deployable, top1, write_export
    from experiments.data import preprocessing
    from pruning import interleaved_latency
    from pruning.choices import EXTENSIONS
    from pruning.export import Runner, file_size

    models = {"baseline": keras.models.load_model(baseline), "0.5 MACs": keras.models.load_model(compressed)}
    size = models["baseline"].inputs[0].shape[1]
    cfg = CompressConfig(model=baseline, data_dir=data_dir, image_size=int(size), target_macs=0.5)
    ((x_tr, _), _, (x_te, y_te)), _ = load_arrays(cfg)
    x_te = x_te.astype(np.float32)
    calibration = x_tr[np.random.default_rng(0).permutation(len(x_tr))[:100]].astype(np.float32)
    prep = preprocessing("vgg16")
    os.makedirs(work_dir, exist_ok=True)

    rows, timed = [], {}
    for label, model in models.items():
        path = baseline if label == "baseline" else compressed
        acc = float(np.mean(top1(model.predict(prep(x_te.copy()), verbose=0)) == y_te))
        rows.append({"key": f"{label} .keras", "model": label, "format": ".keras float", "bytes": os.path.getsize(path),
                     "top1": acc, "agreement": 1.0})
        timed[f"{label} .keras"] = {1: model, 16: model}
        graph = deployable(model, "vgg16")
        for fmt, quantize in VARIANTS:
            name = f"{label.replace(' ', '').replace('.', '')}-{quantize}{EXTENSIONS[fmt]}"
            target = os.path.join(work_dir, name)
            write_export(graph, target, fmt, quantize, calibration if quantize == "int8" else None)
            check = check_against_keras(model, Runner(target, fmt, batch_size=len(x_te)), x_te, "vgg16", y_te)
            key = f"{label} {fmt} {quantize}"
            rows.append({"key": key, "model": label, "format": f"{'LiteRT' if fmt == 'litert' else 'ONNX'} "
                         f"{'float' if quantize == 'none' else quantize}", "bytes": file_size(target),
                         "top1": check["accuracy"], "agreement": check["top1_agreement"]})
            timed[key] = {b: Runner(target, fmt, batch_size=b) for b in (1, 16)}
            click.echo(f"{key}: {rows[-1]['bytes'] / 1e6:.1f} MB, top-1 {check['accuracy']:.4f}", err=True)

    timings = {b: interleaved_latency({k: v[b] for k, v in timed.items()}, batch_size=b, runs=1, rounds=rounds,
                                      input_shape=(size, size, 3)) for b in (1, 16)}
    base = rows[0]
    lines = [
        "# Deploying the quick start's models", "",
        f"Baseline `{baseline}` and its `compress --target-macs 0.5` model `{compressed}` (made by the README "
        f"quick start's `rice` and `compress` commands, in a scratch folder with a scratch --db); top-1 on the "
        f"{len(x_te)} test images of the bundled rice sample ({data_dir}, the split compress evaluates), int8 "
        f"calibrated on 100 training-split images. Every exported file takes raw pixels (vgg16 preprocessing "
        f"inside, BatchNorm folded). Latency: all {len(timed)} models and files timed in the same window in "
        f"{rounds} interleaved rounds (one call each per round, median), LiteRT and ONNX Runtime with "
        f"{os.cpu_count()} threads. Written by `{invocation()}`.", "",
        f"Machine: batch 1 {timings[1]['machine_before']} before, {timings[1]['machine_after']} after; batch 16 "
        f"{timings[16]['machine_before']} before, {timings[16]['machine_after']} after.", "",
        "| model | format | size (MB) | size vs baseline .keras | top-1 | agreement with its .keras | "
        "ms at batch 1 | ms at batch 16 | speed-up at batch 1 vs baseline .keras | spread (b1 / b16) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    b1_base = timings[1]["models"]["baseline .keras"]["ms_per_batch"]
    for r in rows:
        t1, t16 = timings[1]["models"][r["key"]], timings[16]["models"][r["key"]]
        r.update(ms1=t1["ms_per_batch"], ms16=t16["ms_per_batch"], speedup=b1_base / t1["ms_per_batch"])
        lines.append(f"| {r['model']} | {r['format']} | {r['bytes'] / 1e6:.1f} | x{r['bytes'] / base['bytes']:.2f} | "
                     f"{r['top1']:.4f} | {r['agreement']:.3f} | {r['ms1']:.1f} | {r['ms16']:.1f} | "
                     f"{r['speedup']:.1f}x | {t1['spread']:.0%} / {t16['spread']:.0%} |")
    int8 = next(r for r in rows if r["key"] == "0.5 MACs litert int8")
    targets = [
        (f"int8 LiteRT of the 0.5-MAC model at least 5x faster at batch 1 than the unpruned .keras model: "
         f"{int8['speedup']:.1f}x", int8["speedup"] >= 5),
        (f"at most a quarter of its size: x{int8['bytes'] / base['bytes']:.2f}", int8["bytes"] <= base["bytes"] / 4),
        (f"within 1 point of its top-1: {int8['top1']:.4f} vs {base['top1']:.4f} "
         f"({100 * (int8['top1'] - base['top1']):+.1f} points)", int8["top1"] >= base["top1"] - 0.01),
    ]
    lines += ["", "Targets:", ""] + [f"- {text}: **{'holds' if ok else 'does not hold'}**" for text, ok in targets]
    write(output, lines)


if __name__ == "__main__":
    main()
