"""Recipe measurements on cached frozen features (scratch; not part of the package).
usage: PYTHONPATH=. python scratch/measure.py SIZE TRANSFORM[,TRANSFORM...] [--views K] [--finetune E]"""
import os, re, sys, time, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np, tensorflow as tf, keras
from experiments.data import list_image_folder, load_image, stratified_split
from experiments.models import vgg16_base

ROOT = "../shared/data/rice/Rice_Image_Dataset"
size = int(sys.argv[1]); transforms = sys.argv[2].split(",")
views = int(sys.argv[sys.argv.index("--views") + 1]) if "--views" in sys.argv else 0
ft = int(sys.argv[sys.argv.index("--finetune") + 1]) if "--finetune" in sys.argv else 0
t0 = time.time()
paths, labels, names = list_image_folder(ROOT)
idx = np.array([int(re.search(r"\((\d+)\)", p).group(1)) for p in paths])
_r = np.random.default_rng(0); keep = []
for c in range(5):
    lo = np.nonzero((labels == c) & (idx <= 12000))[0]; hi = np.nonzero((labels == c) & (idx > 12000))[0]
    keep += sorted(_r.choice(lo, 160, replace=False)) + sorted(_r.choice(hi, 60, replace=False))
keep = np.array(keep); paths = [paths[i] for i in keep]; labels = labels[keep]; idx = idx[keep]
ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: load_image(p, size), num_parallel_calls=2).batch(256)
X = np.concatenate([b.numpy() for b in ds]).astype(np.float32)
print(f"loaded {X.shape} in {time.time()-t0:.0f}s", flush=True)

def grayworld(x):  # per-image channel gains so the three channel means are equal (removes the cast)
    m = x.mean(axis=(1, 2), keepdims=True)
    return np.clip(x * m.mean(-1, keepdims=True) / np.maximum(m, 1e-3), 0, 255)
def gray(x):
    g = x @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(g[..., None], 3, -1)
def jitter(x, rng):
    t = tf.convert_to_tensor(x / 255.0)
    n = len(x)
    out = []
    for i in range(0, n, 256):
        b = t[i:i+256]
        k = b.shape[0]
        h = tf.image.rgb_to_hsv(b)
        dh = rng.uniform(-0.15, 0.15, (k, 1, 1)).astype(np.float32)
        ds_ = rng.uniform(0.5, 1.5, (k, 1, 1)).astype(np.float32)
        dv = rng.uniform(0.8, 1.2, (k, 1, 1)).astype(np.float32)
        h = tf.stack([tf.math.floormod(h[..., 0] + dh, 1.0), tf.clip_by_value(h[..., 1] * ds_, 0, 1),
                      tf.clip_by_value(h[..., 2] * dv, 0, 1)], -1)
        out.append(tf.image.hsv_to_rgb(h).numpy() * 255)
    return np.concatenate(out)
X250 = None
def crop(_x):
    """square crop around the grain (from the 250 px originals), resized to `size`"""
    global X250
    if X250 is None:
        d = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: load_image(p, 250), num_parallel_calls=2).batch(128)
        X250 = np.concatenate([b.numpy() for b in d]).astype(np.float32)
    out = []
    for im in X250:
        m = im.sum(-1) > 60
        ys, xs = np.nonzero(m)
        if len(ys) == 0: out.append(tf.image.resize(im, (size, size)).numpy()); continue
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 * 1.15 + 2
        y0, y1, x0, x1 = int(cy - half), int(cy + half), int(cx - half), int(cx + half)
        pad = max(0, -y0, -x0, y1 - 250, x1 - 250)
        imp = np.pad(im, ((pad, pad), (pad, pad), (0, 0)))
        c = imp[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
        out.append(tf.image.resize(c, (size, size), antialias=True).numpy())
    return np.stack(out)
TF = {"none": lambda x: x, "grayworld": grayworld, "gray": gray, "crop": crop,
      "crop_grayworld": lambda x: grayworld(crop(x))}

base = vgg16_base((size, size, 3), "hed")
prefix = keras.Model(base.inputs, base.get_layer("block4_pool").output)
block5_layers = [base.get_layer(n) for n in ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")]

def feats(x):
    return prefix.predict(keras.applications.vgg16.preprocess_input(x.copy()), batch_size=64, verbose=0)

def head_model(in_shape, train_block5):
    inp = keras.Input(in_shape); h = inp
    for l in (block5_layers if train_block5 else []):
        c = l.__class__.from_config(l.get_config()); c.build(h.shape); 
        if l.weights: c.set_weights(l.get_weights())
        c.trainable = train_block5; h = c(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(256, activation="relu")(h); h = keras.layers.Dropout(0.5)(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax")(h))

class Balanced(keras.callbacks.Callback):
    """early stopping on mean per-class recall of val"""
    def __init__(s, xv, yv, patience=5): super().__init__(); s.xv, s.yv, s.p = xv, yv, patience
    def on_train_begin(s, logs=None): s.best, s.wait, s.w = -1, 0, None
    def on_epoch_end(s, e, logs=None):
        pred = s.model.predict(s.xv, verbose=0, batch_size=256).argmax(1)
        r = np.mean([(pred[s.yv == c] == c).mean() for c in range(5)])
        if r > s.best: s.best, s.wait, s.w = r, 0, s.model.get_weights()
        else:
            s.wait += 1
            if s.wait >= s.p: s.model.stop_training = True
    def on_train_end(s, logs=None): s.model.set_weights(s.w)

def recall(pred, y): return {names[c]: round(float((pred[y == c] == c).mean()), 3) for c in range(5)}

_b5 = {}
def frozen_block5(F):
    key = id(F)
    if key not in _b5:
        inp = keras.Input(F.shape[1:]); h = inp
        for l in block5_layers: h = l(h)
        _b5[key] = keras.Model(inp, h).predict(F, batch_size=128, verbose=0)
    return _b5[key]

def fit_eval(F, tr, va, tests, balanced, epochs=30, extra=None, block5=False, lr=1e-3):
    keras.utils.set_random_seed(0)
    if not block5:
        F = frozen_block5(F)
        if extra is not None: extra = (frozen_block5(extra[0]), extra[1])
    m = head_model(F.shape[1:], block5)
    m.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    Xtr, ytr = F[tr], labels[tr]
    if extra is not None: Xtr, ytr = np.concatenate([Xtr, extra[0]]), np.concatenate([ytr, extra[1]])
    cb = [Balanced(F[va], labels[va])] if balanced else [keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)]
    o = np.random.default_rng(0).permutation(len(Xtr))
    m.fit(Xtr[o], ytr[o], batch_size=32, epochs=epochs, validation_data=(F[va], labels[va]), verbose=0, callbacks=cb)
    res = {}
    for k, t in tests.items():
        pred = m.predict(F[t], verbose=0, batch_size=256).argmax(1)
        res[k] = (round(float((pred == labels[t]).mean()), 4), recall(pred, labels[t]))
    return res

held = (idx >= 12001)
rest = np.nonzero(~held)[0]
btr, bva, bte = (rest[s] for s in stratified_split(labels[rest], (0.5625, 0.1875, 0.25), 0))
bho = np.nonzero(held)[0]
rtr, rva, rte = stratified_split(labels, (0.5, 0.15, 0.35), 0)
print("batch split sizes", len(btr), len(bva), len(bte), len(bho), flush=True)
for T in transforms:
    t1 = time.time()
    cache = f"runs/feat_{size}_{T}.npy"
    F = np.load(cache) if os.path.exists(cache) else feats(TF[T](X)); np.save(cache, F)
    print(f"[{size}px {T}] features {F.shape} {time.time()-t1:.0f}s", flush=True)
    extra_b = extra_r = None
    if views:
        rng = np.random.default_rng(1)
        for v in range(views):
            Xa = TF[T](jitter(X, rng))
            cache = f"runs/feat_{size}_{T}_view{v}.npy"
            Fa = np.load(cache) if os.path.exists(cache) else feats(Xa); np.save(cache, Fa)
            eb = (Fa[btr], labels[btr]); er = (Fa[rtr], labels[rtr])
            extra_b = eb if extra_b is None else (np.concatenate([extra_b[0], eb[0]]), np.concatenate([extra_b[1], eb[1]]))
            extra_r = er if extra_r is None else (np.concatenate([extra_r[0], er[0]]), np.concatenate([extra_r[1], er[1]]))
        print(f"  +{views} jitter views {time.time()-t1:.0f}s", flush=True)
    for bal, blk5, uv in [(b_, k_, u_) for b_ in (False,) for k_ in ([False, True] if ft else [False])
                          for u_ in ([False, True] if views else [False])]:
        if True:
            t2 = time.time()
            kw = dict(block5=blk5, lr=1e-4 if blk5 else 1e-3, epochs=ft if blk5 else 30)
            rb = fit_eval(F, btr, bva, {"batch_test_random": bte, "batch_heldout": bho}, bal, extra=extra_b if uv else None, **kw)
            rr = fit_eval(F, rtr, rva, {"random_test": rte}, bal, extra=extra_r if uv else None, **kw)
            print(json.dumps({"size": size, "T": T, "views": views if uv else 0, "balanced_es": bal, "block5": blk5,
                              "random_test": rr["random_test"][0], "batch_test_in_range": rb["batch_test_random"][0],
                              "batch_heldout": rb["batch_heldout"][0], "heldout_recall": rb["batch_heldout"][1],
                              "s": round(time.time()-t2)}), flush=True)
