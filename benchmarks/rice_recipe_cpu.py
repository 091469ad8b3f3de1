"""Rice recipe comparison on the CPU, on cached features (issue 14): which training-image
augmentation makes the held-out photographic batch readable with the convs the CPU can afford
to train (none, or block5).

Same data, split, weights, preprocessing and augmentation functions as `main_train.py rice
--split-by batch` (train/val/test from files N <= 12,000, held-out batch N in 12,001-15,000):
the images are decoded once at --size, the frozen VGG16 (HED) runs once up to block4_pool on
them and on K augmented views of the training images per recipe (cached in --cache), then
  head: frozen block5 -> GlobalAveragePooling -> Dense 256 -> Dropout 0.5 -> softmax, Adam 1e-3,
        up to 30 epochs, early stopping on the balanced val recall (patience 5, best restored);
  block5: the same head, then block5 + head fine-tuned (Adam 1e-5) for --block5-epochs.

    PYTHONPATH=. python benchmarks/rice_recipe_cpu.py --recipes base,zoom,zoom_rot --views 4 \\
        --out results/rice_recipe_cpu/rows.jsonl
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402

# Recipe name -> augmentation of the training views (flips both always: a grain has no up).
RECIPES = {
    "base": dict(),
    "colour": dict(colour=(0.2, 0.6, 0.3)),
    "zoom": dict(zoom=0.6),
    "zoom35": dict(zoom=0.35),
    "zoom35_colour": dict(zoom=0.35, colour=(0.2, 0.6, 0.3)),
    "rot": dict(rotate=180),
    "zoom_rot": dict(zoom=0.6, rotate=180),
    "zoom_colour": dict(zoom=0.6, colour=(0.2, 0.6, 0.3)),
    "zoom_rot_colour": dict(zoom=0.6, rotate=180, colour=(0.2, 0.6, 0.3)),
    "zoom_rot_grey": dict(zoom=0.6, rotate=180, grey=True),
    "zoom_rot_colour_grey": dict(zoom=0.6, rotate=180, colour=(0.2, 0.6, 0.3), grey=True),
    "zoom_rot_gain": dict(zoom=0.6, rotate=180, gain=0.15),
    "zoom_rot_colour_gain": dict(zoom=0.6, rotate=180, colour=(0.2, 0.6, 0.3), gain=0.15),
    "gain": dict(gain=0.15),
    "colour_gain": dict(colour=(0.2, 0.6, 0.3), gain=0.15),
}


def decode(paths, size=None):
    """Images of `paths` as one array: resized to `size` (float32, the tool's `load_image`),
    or at the photo's own resolution (uint8, `size=None`; all of one size)."""
    import tensorflow as tf

    from experiments.data import load_image

    read = (lambda p: load_image(p, size)) if size else (
        lambda p: tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False))
    ds = tf.data.Dataset.from_tensor_slices(paths).map(read, num_parallel_calls=2)
    return np.concatenate([b.numpy() for b in ds.batch(256)])


def load(root, size):
    from experiments.splits import batch_split, list_image_folder

    paths, labels, names = list_image_folder(root)
    return paths, decode(paths, size), labels, names, dict(zip(
        ("train", "val", "test", "heldout"), batch_split(paths, labels, (12001, 15000), (0.7, 0.15, 0.15), 0)))


def rescaled(x, scale):
    """`x` (a batch at the model's size) as if photographed `scale` times larger: resized
    about the centre (antialiased when shrinking), black border or cropped to the same size."""
    import tensorflow as tf

    size = x.shape[1]
    n = int(round(size * scale))
    r = tf.image.resize(tf.constant(x), (n, n), antialias=scale < 1).numpy()
    if n <= size:
        a = (size - n) // 2
        return np.pad(r, [(0, 0), (a, size - n - a), (a, size - n - a), (0, 0)])
    a = (n - size) // 2
    return r[:, a:a + size, a:a + size]


def channel_gains(gain, seed=0):
    """A batch augmentation measured here only (it did not help, so the tool has no flag
    for it): R, G and B of each image multiplied by factors drawn independently in
    [1 - `gain`, 1 + `gain`], a camera's white balance. The late Jasmine batch's cast is
    about such a gain: G x1.10 and B x1.08 against the earlier images. RGB in [0, 255]."""
    import tensorflow as tf

    def augment(x):
        g = 1.0 + tf.random.uniform([tf.shape(x)[0], 1, 1, 3], -gain, gain, seed=seed)
        return tf.clip_by_value(x * g, 0.0, 255.0)

    return augment


def transform(recipe, seed):
    """(augmentation, input transform) of a recipe: lists of batch functions, the tool's own."""
    from experiments.data import colour_jitter, grey_world, preprocessing, random_affine, random_flips

    r = RECIPES[recipe]
    aug = [colour_jitter(*r["colour"], seed=seed)] if "colour" in r else []
    if r.get("gain"):
        aug.append(channel_gains(r["gain"], seed=seed))
    if r.get("zoom") or r.get("rotate"):
        aug.append(random_affine(r.get("zoom", 0.0), r.get("rotate", 0.0), seed=seed))
    aug.append(random_flips("both", seed=seed))
    pre = [grey_world] if r.get("grey") else []
    pre.append(preprocessing("vgg16"))
    return aug, pre


def apply(fns, x):
    for fn in fns:
        x = fn(x)
    return x


def features(prefix, x, fns, batch=64):
    import tensorflow as tf

    out = []
    for i in range(0, len(x), batch):
        out.append(prefix(apply(fns, tf.cast(tf.constant(x[i:i + batch]), tf.float32)), training=False).numpy())
    return np.concatenate(out)


def resize_to(size):
    """Batch function: antialiased resize to (size, size), after augmenting at the source resolution."""
    import tensorflow as tf

    return lambda x: tf.image.resize(x, (size, size), antialias=True)


def balanced_recall(pred, y, k):
    """Mean per-class recall, from the confusion matrix the tool's reports use."""
    from experiments.common import confusion_matrix

    cm = confusion_matrix(y, pred, k)
    return float(np.mean(np.diag(cm) / cm.sum(axis=1)))


def fit(base, f_train, y_train, f_val, y_val, tune_block5, epochs, lr, head=None, seed=0):
    """Head (and block5 with `tune_block5`) on block4_pool features; early stopping on the
    balanced val recall (patience 5, best weights restored). Returns (predict, head): with
    block5 frozen its output is computed once and the head trained on it (the same model,
    30x less work per epoch)."""
    import keras

    names = ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")

    def block5(inp):
        h = inp
        for name in names:
            layer = base.get_layer(name)
            layer.trainable = tune_block5
            h = layer(h)
        return h

    k = int(y_train.max()) + 1
    if head is None:
        keras.utils.set_random_seed(seed)
        head = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(256, activation="relu"),
                keras.layers.Dropout(0.5), keras.layers.Dense(k, activation="softmax")]
    b5 = keras.Model(inp := keras.Input(f_train.shape[1:]), block5(inp))
    if not tune_block5:
        f_train, f_val = (b5.predict(f, batch_size=128, verbose=0) for f in (f_train, f_val))
    inp = keras.Input(f_train.shape[1:])
    h = inp if not tune_block5 else block5(inp)
    for layer in head:
        h = layer(h)
    model = keras.Model(inp, h)
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    best, wait, weights = -1.0, 0, None
    order = np.random.default_rng(seed).permutation(len(f_train))
    for _ in range(epochs):
        model.fit(f_train[order], y_train[order], batch_size=32, epochs=1, verbose=0)
        r = balanced_recall(model.predict(f_val, batch_size=256, verbose=0).argmax(1), y_val, k)
        if r > best:
            best, wait, weights = r, 0, model.get_weights()
        else:
            wait += 1
            if wait >= 5:
                break
    model.set_weights(weights)
    if tune_block5:
        return (lambda f: model.predict(f, batch_size=256, verbose=0)), head
    return (lambda f: model.predict(b5.predict(f, batch_size=128, verbose=0), batch_size=256, verbose=0)), head


def score(into, name, probs, y, names):
    """Accuracy and per-class recall of `probs` against `y` into `into[name]`,
    `into[name + "_recall"]` (from the tool's confusion matrix and report); returns the matrix."""
    from experiments.common import confusion_matrix, per_class_report

    cm = confusion_matrix(y, probs.argmax(1), len(names))
    into[name] = round(float(np.trace(cm) / cm.sum()), 4)
    into[f"{name}_recall"] = {n: round(v["recall"], 3) for n, v in per_class_report(cm, names).items()}
    return cm


def describe(aug, augment_at="size", mix_with=None):
    parts = ["flips both"] + (["augmented at 250 px, then resized"] if augment_at == "source" else [])
    if aug.get("zoom"):
        parts.append(f"zoom x/{1 + aug['zoom']:g}")
    if aug.get("rotate"):
        parts.append(f"rotate +-{aug['rotate']:g}")
    if aug.get("colour"):
        parts.append("colour " + "/".join(f"{v:g}" for v in aug["colour"]))
    if aug.get("gain"):
        parts.append(f"channel gains +-{aug['gain']:g}")
    if aug.get("grey"):
        parts.append("grey world input")
    return (f"views of {mix_with!r} and of: " if mix_with else "") + ", ".join(parts)


def write_report(rows_path, path):
    """A markdown table of the rows, best held-out accuracy first."""
    rows = [json.loads(line) for line in open(rows_path)]
    lines = ["| recipe | px | views | trained | seed | random test | held-out batch | Jasmine (held-out) | late Jasmine read as "
             "| features s | fit s | machine |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["heldout"]):
        read = ", ".join(f"{k} {v}" for k, v in r.get("jasmine_read_as", {}).items() if v)
        lines.append(f"| {describe(r['aug'], r.get('augment_at', 'size'), r.get('mix_with'))} | {r['size']} | {r['views']} | {r['stage']} | {r.get('seed', 0)} | {r['test']:.4f} | {r['heldout']:.4f} | "
                     f"{r['heldout_recall'].get('Jasmine', float('nan')):.3f} | {read} | {r['features_s']} | "
                     f"{r['fit_s']} | {r['machine']} |")
    scaled = [r for r in rows if r.get("scaled")]
    if scaled:  # --eval-scales: the same heads on rescaled images
        lines += ["", "| recipe | seed | images rescaled by | random test | held-out batch | Jasmine (random test) "
                  "| Jasmine (held-out) | max with scale 1: random test | held-out batch |", "|---|---|---|---|---|---|---|---|---|"]
        for r in scaled:
            for scale, e in sorted({"1": {k: r[k] for k in ("test", "heldout", "test_recall", "heldout_recall")},
                                    **r["scaled"]}.items(), key=lambda kv: float(kv[0])):
                both = (f"{e['test_max_with_1']:.4f} | {e['heldout_max_with_1']:.4f}" if "test_max_with_1" in e
                        else "- | -")
                lines.append(f"| {describe(r['aug'], r.get('augment_at', 'size'))} | {r.get('seed', 0)} | {scale} | "
                             f"{e['test']:.4f} | {e['heldout']:.4f} | {e['test_recall'].get('Jasmine', float('nan')):.3f} | "
                             f"{e['heldout_recall'].get('Jasmine', float('nan')):.3f} | {both} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


@click.command()
@click.option("--data", default="../shared/data/rice/Rice_Image_Dataset", show_default=True)
@click.option("--size", default=64, show_default=True)
@click.option("--recipes", default="base,zoom_rot", show_default=True, help=f"Comma-separated: {list(RECIPES)}")
@click.option("--views", default=4, show_default=True)
@click.option("--block5-epochs", default=0, show_default=True, help="0: head only.")
@click.option("--cache", default="runs/rice_recipe_cpu", show_default=True)
@click.option("--out", default="results/rice_recipe_cpu/rows.jsonl", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seeds the views, the head's initial weights and the order.")
@click.option("--augment-at", type=click.Choice(["size", "source"]), default="size", show_default=True,
              help="Augment the views at --size (as the tool does) or at the photo's own resolution, then resize.")
@click.option("--eval-scales", default="", help="Also evaluate each head on the test and held-out images rescaled "
              "by these factors (comma-separated, e.g. 0.75,1.33): a diagnostic of what size does.")
@click.option("--mix-with", default=None, help="Also train on the --views views of this recipe, made at --size "
              "(e.g. base: half the views keep the grain's size).")
@click.option("--report", default=None, help="Only write a markdown table of the rows in --out to this file.")
def main(data, size, recipes, views, block5_epochs, cache, out, seed, augment_at, eval_scales, mix_with, report):
    if report:
        return write_report(out, report)
    import keras

    from pruning.stats import machine_description

    from experiments.data import preprocessing
    from experiments.models import vgg16_base

    os.makedirs(cache, exist_ok=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    t0 = time.time()
    paths, x, y, names, split = load(data, size)
    print(f"{len(x)} images at {size}px, split {[len(v) for v in split.values()]}, {time.time() - t0:.0f} s",
          flush=True)
    base = vgg16_base((size, size, 3), "hed")
    prefix = keras.Model(base.inputs, base.get_layer("block4_pool").output)
    block5 = {n: base.get_layer(n).get_weights() for n in ("block5_conv1", "block5_conv2", "block5_conv3")}
    scales = [float(v) for v in eval_scales.split(",") if v]
    scaled = {}
    for scale in scales:
        spath = os.path.join(cache, f"{size}_scale{scale:g}.npy")
        if not os.path.exists(spath):
            ev = np.concatenate([split["test"], split["heldout"]])
            np.save(spath, features(prefix, rescaled(x[ev], scale), [preprocessing("vgg16")]))
        scaled[scale] = np.load(spath)
    source = decode([paths[i] for i in split["train"]]) if augment_at == "source" else None
    for recipe in recipes.split(","):
        t1 = time.time()
        _, pre = transform(recipe, seed=seed)  # the input transform; each view set draws its own augmentation
        path = os.path.join(cache, f"{size}_{'grey' if RECIPES[recipe].get('grey') else 'plain'}.npy")
        if not os.path.exists(path):
            np.save(path, features(prefix, x, pre))
        f = np.load(path)
        fv = []
        for name, at in ([(mix_with, "size")] if mix_with else []) + [(recipe, augment_at)]:
            vpath = os.path.join(cache, f"{size}_{name}_v{views}" + (f"_s{seed}" if seed else "")
                                 + ("_source" if at == "source" else "") + ".npy")
            if not os.path.exists(vpath):
                keras.utils.set_random_seed(1 + seed)
                name_aug, _ = transform(name, seed=seed)
                tr, fns = (x[split["train"]], name_aug + pre) if at == "size" else (
                    source, name_aug + [resize_to(size)] + pre)
                np.save(vpath, np.concatenate([features(prefix, tr, fns) for _ in range(views)]))
            fv.append(np.load(vpath))
        fv = np.concatenate(fv)
        t_feat = time.time() - t1
        f_train = np.concatenate([f[split["train"]], fv])
        y_train = np.concatenate([y[split["train"]]] * (len(fv) // len(split["train"]) + 1))
        stages = [("head", False, 30, 1e-3)] + ([("block5", True, block5_epochs, 1e-5)] if block5_epochs else [])
        head = None
        for stage, tune, epochs, lr in stages:
            t2 = time.time()
            predict, head = fit(base, f_train, y_train, f[split["val"]], y[split["val"]], tune, epochs, lr, head, seed)
            row = dict(recipe=recipe, aug=RECIPES[recipe], size=size, views=views, stage=stage, seed=seed,
                       augment_at=augment_at, mix_with=mix_with,
                       features_s=round(t_feat), fit_s=round(time.time() - t2),
                       machine=machine_description())
            probs = {s: predict(f[split[s]]) for s in ("test", "heldout")}
            for s in ("test", "heldout"):
                cm = score(row, s, probs[s], y[split[s]], names)
                if s == "heldout" and "Jasmine" in names:  # what the late Jasmine grains were read as
                    row["jasmine_read_as"] = dict(zip(names, cm[names.index("Jasmine")].tolist()))
            n_test = len(split["test"])
            for scale, fs in scaled.items():  # the same head on rescaled test / held-out images
                entry = {}
                for s, part in (("test", fs[:n_test]), ("heldout", fs[n_test:])):
                    p = predict(part)
                    score(entry, s, p, y[split[s]], names)
                    # Test-time rescaling: the class most probable at scale 1 or at this scale.
                    score(entry, f"{s}_max_with_1", np.maximum(p, probs[s]), y[split[s]], names)
                row.setdefault("scaled", {})[f"{scale:g}"] = entry
            print(json.dumps(row), flush=True)
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        for name, w in block5.items():  # the next recipe starts from the pretrained block5 again
            base.get_layer(name).set_weights(w)


if __name__ == "__main__":
    main()
