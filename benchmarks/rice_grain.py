"""What the grain-geometry options of `main_train.py rice` do, one at a time (issue 14).

Same data, batch split, weights and model as `main_train.py rice --split-by batch` (train /
val / test from files N <= 12,000, held-out batch N in 12,001-15,000). For each CNN input
(as given, --upright, --upright --grey) the frozen VGG16 runs once over every split; the
grain descriptors (`experiments.grain.grain_shape`) are computed from the same inputs. Heads
are then trained as the tool trains them (Dense 256, Dropout 0.5, softmax, Adam 1e-3, batch
16, up to 30 epochs, early stopping on the balanced val recall, patience 5, best restored):

    cnn       on the pooled CNN features alone (the tool without --grain-shape)
    shape     on the 9 standardised descriptors alone
    concat    one head on [CNN features, descriptors]
    experts   the cnn and shape heads trained apart, probabilities combined by their
              normalised geometric mean (the tool's --grain-shape)

    PYTHONPATH=. python benchmarks/rice_grain.py --out results/rice_grain/ablation.jsonl
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402

INPUTS = {"plain": {}, "upright": {"upright": True}, "upright_grey": {"upright": True, "grey": True}}
SPLITS = ("train", "val", "test", "heldout")


def extract(data, cfg, flags):
    """Pooled CNN features and grain descriptors of every split, for one CNN input."""
    import keras

    from experiments import grain
    from experiments.models import rice_classifier
    from pruning import inline

    model = inline(rice_classifier(data.num_classes, cfg.image_size, cfg.weights, seed=cfg.seed, **flags))
    both = keras.Model(model.inputs, [model.get_layer("features").output,
                                      grain.grain_shape(grain.from_vgg(model.inputs[0]))])
    return {name: both.predict(data.ordered[name], verbose=0) for name in SPLITS}


def fit_head(cfg, x, y, num_classes):
    """Probabilities of each split from a head trained as the tool trains one."""
    import keras

    from experiments.rice import compile_model, stopping

    keras.utils.set_random_seed(cfg.seed)
    inputs = keras.Input(x["train"].shape[1:])
    glorot = keras.initializers.GlorotUniform
    h = keras.layers.Dense(256, activation="relu", kernel_initializer=glorot(cfg.seed))(inputs)
    h = keras.layers.Dropout(0.5, seed=cfg.seed)(h)
    out = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=glorot(cfg.seed))(h)
    head = keras.Model(inputs, out)
    compile_model(head, cfg.head_lr)
    before, after = stopping(cfg, (x["val"], y["val"], num_classes))
    order = np.random.default_rng(cfg.seed).permutation(len(x["train"]))
    head.fit(x["train"][order], y["train"][order], batch_size=cfg.batch_size, epochs=cfg.head_epochs,
             validation_data=(x["val"], y["val"]), verbose=0, callbacks=[*before, *after])
    return {n: head.predict(x[n], verbose=0) for n in SPLITS[1:]}


def scores(probs, y, names):
    out = {}
    for n in SPLITS[1:]:
        pred = probs[n].argmax(1)
        out[n] = round(float((pred == y[n]).mean()), 4)
    held = probs["heldout"].argmax(1)
    out["heldout_recall"] = {c: round(float((held[y["heldout"] == k] == k).mean()), 3) for k, c in enumerate(names)}
    return out


def geometric_mean(p, q):
    logp = (np.log(p + 1e-7) + np.log(q + 1e-7)) / 2
    e = np.exp(logp - logp.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


HEADS = {"cnn": "CNN head alone", "shape": "descriptors alone", "concat": "one head on both",
         "experts": "two experts, geometric mean (--grain-shape)"}


def write_report(rows_path):
    """A Markdown table of every row in `rows_path`, next to it as ablation.md."""
    rows = [json.loads(line) for line in open(rows_path)]
    lines = ["# Grain geometry options, one at a time (`benchmarks/rice_grain.py`)", "",
             "Batch split of the shared folder (random test: 613 images with N <= 12,000; held-out batch: 910 "
             "images with N 12,001-15,000), HED, frozen convs, heads trained as the tool trains them.", "",
             "| CNN input | head | px (decoded) | seed | val | random test | held-out batch | Jasmine (held-out) "
             "| features s | machine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cnn_input']} | {HEADS[r['head']]} | {r['px']} ({r['decoded_px']}) | {r['seed']} | "
                     f"{r['val']:.4f} | {r['test']:.4f} | {r['heldout']:.4f} | "
                     f"{r['heldout_recall']['Jasmine']:.3f} | {r['features_s']} | {r['machine']} |")
    from experiments.common import write_text

    return write_text(os.path.join(os.path.dirname(os.path.abspath(rows_path)), "ablation.md"),
                      "\n".join(lines) + "\n")


@click.command()
@click.option("--data", default=os.path.join("..", "shared", "data", "rice", "Rice_Image_Dataset"))
@click.option("--size", default=64, help="--image-size of the tool (CNN input).")
@click.option("--inputs", default=",".join(INPUTS), help=f"Comma-separated, of {', '.join(INPUTS)}.")
@click.option("--seed", default=0)
@click.option("--out", default=os.path.join("results", "rice_grain", "ablation.jsonl"))
@click.option("--report-only", is_flag=True, help="Only rewrite ablation.md from the rows in --out.")
def main(data, size, inputs, seed, out, report_only):
    from experiments.config import RiceConfig
    from experiments.rice import RiceData

    if report_only:
        print("wrote", write_report(out))
        return
    from pruning.stats import machine_description

    for name in inputs.split(","):
        flags = INPUTS[name]
        cfg = RiceConfig(data_dir=data, image_size=size, weights="hed", split_by="batch", early_stop="balanced",
                         seed=seed, **flags)
        cfg.validate()
        rice = RiceData(cfg)
        y = {n: rice.y(n) for n in SPLITS}
        host, t = machine_description(), time.time()
        feats = extract(rice, cfg, flags)
        seconds = round(time.time() - t)
        cnn = {n: f[0] for n, f in feats.items()}
        desc = {n: f[1] for n, f in feats.items()}
        mu, sd = desc["train"].mean(0), desc["train"].std(0) + 1e-7  # standardised on train, as shape_norm does
        desc = {n: ((d - mu) / sd).astype("float32") for n, d in desc.items()}
        probs = {"cnn": fit_head(cfg, cnn, y, rice.num_classes), "shape": fit_head(cfg, desc, y, rice.num_classes),
                 "concat": fit_head(cfg, {n: np.concatenate([cnn[n], desc[n]], 1) for n in SPLITS}, y,
                                    rice.num_classes)}
        probs["experts"] = {n: geometric_mean(probs["cnn"][n], probs["shape"][n]) for n in SPLITS[1:]}
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        for head, p in probs.items():
            row = {"cnn_input": name, "head": head, "px": size, "decoded_px": 2 * size if cfg.upright else size,
                   "seed": seed, "features_s": seconds, "machine": host, **scores(p, y, rice.class_names)}
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        print("wrote", write_report(out))


if __name__ == "__main__":
    main()
