"""Rice recipe search on a GPU, in PyTorch (the lent GPU machine has no TensorFlow).

Exploration only: it mirrors the Keras recipe of `experiments/rice.py` (VGG16 with the
HED backbone, GAP + Dense 256 + Dropout 0.5 + softmax, VGG preprocessing, Adam, head
then top-conv fine-tuning on cached frozen features, K augmented views, early stopping
on the balanced val recall, L1 pruning then retraining) so that many recipes can be
compared in minutes. The chosen recipe is then run with the real tool on the CPU
(README, results/rice_results.md); only those numbers are the project's results.

usage (one config per line of the grid, N worker processes on one GPU):
    python benchmarks/rice_recipe_torch.py --data DIR --weights hed16.npz --out results.jsonl --workers 8
"""

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.splits import batch_split, list_image_folder, stratified_split  # noqa: E402

VGG = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]  # (convs, filters) per block
MEAN_BGR = (103.939, 116.779, 123.68)


def splits(labels, paths, mode, seed=0, holdout=(12001, 15000)):
    """train/val/test (+ heldout) index arrays, exactly as the Keras run makes them."""
    if mode == "batch":
        return dict(zip(("train", "val", "test", "heldout"), batch_split(paths, labels, holdout, seed=seed)))
    return dict(zip(("train", "val", "test"), stratified_split(labels, seed=seed)))


def worker(wid, args, configs, out_path):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    paths, labels, names = list_image_folder(args.data, args.limit or None, seed=0)
    raw = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((250, 250)))
                                     for p in paths])).to(dev)  # N,250,250,3 uint8
    w = np.load(args.weights)
    jas = names.index("Jasmine")

    def conv_params():
        ps, i = [], 0
        for n, f in VGG:
            for _ in range(n):
                ps.append([torch.tensor(w[f"w{i}"], dtype=torch.float32, device=dev).permute(3, 2, 0, 1).contiguous(),
                           torch.tensor(w[f"b{i}"], dtype=torch.float32, device=dev)])
                i += 1
        return ps

    def run_convs(ps, x, lo, hi):
        """Convs lo..hi-1 (0-based, 13 in all), with the block's max pool after each block's last conv."""
        ends = np.cumsum([n for n, _ in VGG])
        for i in range(lo, hi):
            x = F.relu(F.conv2d(x, ps[i][0], ps[i][1], padding=1))
            if i + 1 in ends:
                x = F.max_pool2d(x, 2)
        return x

    def load(idx, size, transform):
        x = raw[idx].permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 255)

    def input_transform(x, t):
        if t == "greyworld":
            m = (x.sum(1, keepdim=True) > 60).float()
            mean = (x * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp_min(1)
            x = (x * mean.mean(1, keepdim=True) / mean.clamp_min(1)).clamp(0, 255)
        elif t == "gray":
            g = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = g.repeat(1, 3, 1, 1)
        x = x[:, [2, 1, 0]] - torch.tensor(MEAN_BGR, device=x.device).view(1, 3, 1, 1)
        return x

    def rgb_to_hsv(x):  # x in [0,1], N3HW
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        mx, _ = x.max(1)
        mn, _ = x.min(1)
        d = mx - mn
        h = torch.zeros_like(mx)
        dd = d.clamp_min(1e-8)
        h = torch.where(mx == r, ((g - b) / dd) % 6, h)
        h = torch.where(mx == g, (b - r) / dd + 2, h)
        h = torch.where(mx == b, (r - g) / dd + 4, h)
        h = torch.where(d == 0, torch.zeros_like(h), h) / 6
        s = torch.where(mx > 0, d / mx.clamp_min(1e-8), torch.zeros_like(mx))
        return h % 1.0, s, mx

    def hsv_to_rgb(h, s, v):
        i = torch.floor(h * 6)
        f = h * 6 - i
        p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
        i = i.long() % 6
        r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None]).squeeze(1)
        g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None]).squeeze(1)
        b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None]).squeeze(1)
        return torch.stack([r, g, b], 1)

    def augment(x, cfg, gen):
        n = x.shape[0]
        u = lambda *s: torch.rand(*s, generator=gen, device=x.device)  # noqa: E731
        if cfg["flip"]:
            x = torch.where(u(n, 1, 1, 1) < 0.5, x.flip(3), x)
            x = torch.where(u(n, 1, 1, 1) < 0.5, x.flip(2), x)
        if cfg["zoom"]:
            s = (1 + cfg["zoom"]) ** (u(n) * 2 - 1)  # scale factor of the grain, log-uniform
            theta = torch.zeros(n, 2, 3, device=x.device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if cfg["hue"] or cfg["sat"] or cfg["bright"]:
            h, s, v = rgb_to_hsv(x / 255)
            d = lambda a: (u(n, 1, 1) * 2 - 1) * a  # noqa: E731
            h = (h + d(cfg["hue"])) % 1.0
            s = (s * (1 + d(cfg["sat"]))).clamp(0, 1)
            v = (v * (1 + d(cfg["bright"]))).clamp(0, 1)
            x = hsv_to_rgb(h, s, v) * 255
        return x

    @torch.no_grad()
    def features(ps, x_fn, idx, lo, bs=256):
        outs = []
        for i in range(0, len(idx), bs):
            outs.append(run_convs(ps, x_fn(idx[i:i + bs]), 0, lo))
        return torch.cat(outs)

    class Top(nn.Module):
        def __init__(self, ps, lo, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.lo = lo
            self.convs = nn.ParameterList([nn.Parameter(t.clone()) for p in ps[lo:] for t in p])
            c = ps[-1][0].shape[0]
            self.fc1 = nn.Linear(c, 256)
            self.fc2 = nn.Linear(256, len(names))
            for lin in (self.fc1, self.fc2):  # Glorot uniform, zero bias (Keras' defaults)
                a = (6 / (lin.in_features + lin.out_features)) ** 0.5
                lin.weight.data = (torch.rand(lin.weight.shape, generator=g) * 2 - 1) * a
                lin.bias.data.zero_()

        def forward(self, x):
            ps = [[self.convs[2 * i], self.convs[2 * i + 1]] for i in range(len(self.convs) // 2)]
            full = [None] * self.lo + ps
            x = run_convs(full, x, self.lo, 13)
            x = x.mean((2, 3))
            return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.5, self.training))

    def predict(model, x, bs=512):
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])

    def report(pred, y):
        y = y.to(pred.device)
        rec = [float((pred[y == c] == c).float().mean()) for c in range(len(names))]
        return float((pred == y).float().mean()), rec

    def fit(model, trainable, x, y, xv, yv, lr, epochs, bs, seed, patience=5):
        """Adam, EarlyStopping(balanced val recall, restore best) + ReduceLROnPlateau(0.2, patience//2)."""
        for p in model.parameters():
            p.requires_grad = False
        params = [p for n, p in model.named_parameters() if any(n.startswith(t) for t in trainable)]
        for p in params:
            p.requires_grad = True
        opt = torch.optim.Adam(params, lr=lr, eps=1e-7)
        g = torch.Generator(device=x.device).manual_seed(seed)
        best, best_state, wait, plateau = -1, None, 0, 0
        for ep in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=g, device=x.device)
            for i in range(0, len(x), bs):
                b = order[i:i + bs]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _, rec = report(predict(model, xv), yv)
            score = float(np.mean(rec))
            if score > best:
                best, wait, plateau = score, 0, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                wait += 1
                plateau += 1
                if plateau >= max(1, patience // 2):
                    for gr in opt.param_groups:
                        gr["lr"] = max(gr["lr"] * 0.2, 1e-7)
                    plateau = 0
                if wait >= patience:
                    break
        model.load_state_dict(best_state)
        return model, ep + 1

    def l1_prune(ps, ratio, exclude_last=True, round_to=1):
        """Keeps the filters with the largest sum |W| (per output filter) in every conv but the last."""
        new = [[p[0].clone(), p[1].clone()] for p in ps]
        keep_prev = None
        for i in range(13):
            wgt, b = new[i]
            if keep_prev is not None:
                wgt = wgt[:, keep_prev]
            f = wgt.shape[0]
            if i == 12 and exclude_last:
                keep = torch.arange(f, device=wgt.device)
            else:
                n = f - int(ratio * f)
                n = max(round_to, int(round(n / round_to)) * round_to) if round_to > 1 else n
                keep = torch.sort(torch.argsort(ps[i][0].abs().sum((1, 2, 3)), descending=True)[:n]).values
            new[i] = [wgt[keep], b[keep]]
            keep_prev = keep
        return new

    def run_config(cfg):
        t0 = time.time()
        sp = splits(labels, paths, cfg["split"], cfg["seed"])
        size, tf = cfg["size"], cfg["transform"]
        lo = 13 - cfg["depth"]
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
        torch.manual_seed(cfg["seed"])

        def images(idx, aug=False):
            idx_t = torch.as_tensor(idx, device=dev)
            x = load(idx_t, size, tf)
            if aug:
                x = augment(x, cfg, gen)
            return input_transform(x, tf)

        def pool_features(ps, first):
            tr = sp["train"]
            xs = [features(ps, lambda i: images(i), tr, first)]
            for _ in range(cfg["views"]):
                xs.append(features(ps, lambda i: images(i, True), tr, first))
            ys = torch.as_tensor(np.tile(labels[tr], cfg["views"] + 1), device=dev)
            return torch.cat(xs), ys

        ps = conv_params()
        y = {k: torch.as_tensor(labels[v], device=dev) for k, v in sp.items()}
        res = dict(cfg, zoom_law="log")
        # phase 1: head on cached block5 features; phase 2: top `depth` convs + head
        model = Top(ps, 13, cfg["seed"]).to(dev)
        xh, yh = pool_features(ps, 13)
        xv = features(ps, images, sp["val"], 13)
        model, res["head_epochs_run"] = fit(model, ("fc",), xh, yh, xv, y["val"], 1e-3, cfg["head_epochs"],
                                             cfg["bs"], cfg["seed"])
        del xh
        if lo < 13:
            top = Top(ps, lo, cfg["seed"]).to(dev)
            top.fc1.load_state_dict(model.fc1.state_dict())
            top.fc2.load_state_dict(model.fc2.state_dict())
            xf, yf = pool_features(ps, lo)
            xv = features(ps, images, sp["val"], lo)
            top, res["ft_epochs_run"] = fit(top, ("convs", "fc"), xf, yf, xv, y["val"], cfg["ft_lr"],
                                            cfg["ft_epochs"], cfg["bs"], cfg["seed"])
            del xf
            ps = ps[:lo] + [[top.convs[2 * i].detach(), top.convs[2 * i + 1].detach()]
                            for i in range(len(top.convs) // 2)]
            model = top
        for k in ("test", "heldout"):
            if k in sp:
                acc, rec = report(predict(model, features(ps, images, sp[k], lo)), y[k])
                res[f"{k}_acc"], res[f"{k}_jasmine"] = acc, rec[jas]
                res[f"{k}_recall"] = rec
        # pruning: L1 at each ratio, then retrain (head, or the same top convs + head)
        for ratio in cfg["ratios"]:
            pp = l1_prune(ps, ratio)
            plo = 13 if cfg["retrain"] == "head" else lo
            pm = Top(pp, plo, cfg["seed"]).to(dev)
            pm.fc1.load_state_dict(model.fc1.state_dict())
            pm.fc2.load_state_dict(model.fc2.state_dict())
            xr, yr = pool_features(pp, plo)
            xv = features(pp, images, sp["val"], plo)
            trainable = ("fc",) if plo == 13 else ("convs", "fc")
            lr = 1e-3 if plo == 13 else cfg["ft_lr"]
            pm, _ = fit(pm, trainable, xr, yr, xv, y["val"], lr, cfg["retrain_epochs"], cfg["bs"], cfg["seed"])
            del xr
            for k in ("test", "heldout"):
                if k in sp:
                    acc, rec = report(predict(pm, features(pp, images, sp[k], plo)), y[k])
                    res[f"p{ratio:g}_{k}_acc"], res[f"p{ratio:g}_{k}_jasmine"] = acc, rec[jas]
        res["seconds"] = round(time.time() - t0, 1)
        res["worker"] = wid
        return res

    for cfg in configs:
        try:
            res = run_config(cfg)
        except Exception as e:  # keep the other configs going
            res = {**cfg, "error": f"{type(e).__name__}: {e}"}
        with open(out_path, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                          if not k.endswith("recall")}), flush=True)


def grid(name):
    base = dict(split="batch", seed=0, size=64, transform="none", depth=3, views=0, flip=False, zoom=0.0, hue=0.0,
                sat=0.0, bright=0.0, head_epochs=30, ft_epochs=10, ft_lr=1e-5, bs=32, retrain="top",
                retrain_epochs=10, ratios=(0.2,))
    out = []
    if name == "zoom":  # wide log-uniform zoom: the late batches are photographed up to ~1.5x larger
        z = dict(base, views=4, flip=True, zoom=0.6, depth=6, ratios=())
        return [dict(z, depth=3), z, dict(z, transform="gray"), dict(z, hue=0.1, sat=0.4, bright=0.2),
                dict(z, zoom=1.0), dict(z, views=8), dict(z, transform="greyworld"), dict(z, ft_epochs=20)]
    if name == "zoomcolour":  # zoom and colour together gave the best held-out Jasmine recall
        z = dict(base, views=4, flip=True, zoom=0.6, depth=6, hue=0.1, sat=0.4, bright=0.2, ratios=())
        return [dict(z, hue=0.2, sat=0.6, bright=0.3), dict(z, zoom=1.0), dict(z, transform="gray"),
                dict(z, views=8), dict(z, depth=9), dict(z, size=96), dict(z, seed=1), dict(z, transform="greyworld")]
    if name == "smoke":
        return [dict(base, size=32, views=1, flip=True, zoom=0.2, hue=0.1, head_epochs=2, ft_epochs=1,
                     retrain_epochs=1, transform=t) for t in ("none", "greyworld", "gray")]
    augs = {"none": dict(views=0), "flip": dict(views=4, flip=True), "zoom": dict(views=4, flip=True, zoom=0.25),
            "colour": dict(views=4, flip=True, zoom=0.25, hue=0.1, sat=0.4, bright=0.2)}
    main = [dict(base, size=size, transform=tf, depth=depth, aug=aug, **augs[aug])
            for size, tf, aug, depth in itertools.product((64, 96), ("none", "greyworld", "gray"), augs, (3, 6))
            if not (aug == "none" and depth == 6)]
    # seed 0 on the batch split first, then the random split, then seed 1: a cut-off run keeps the first.
    out += main
    out += [dict(c, split="random") for c in main if c["aug"] in ("zoom", "colour") and c["depth"] == 3
            and c["transform"] in ("none", "gray")]
    out += [dict(c, seed=1) for c in main]
    return out


def report(rows_path, out):
    """A Markdown table of the rows (one per config), held-out batch accuracy first."""
    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    rows = [r for r in rows if "error" not in r]
    rows.sort(key=lambda r: -r["heldout_acc"] if "heldout_acc" in r else 0)
    head = ("| split | px | input | views: flips, zoom, hue/sat/bright | convs tuned | seed | random test | "
            "Jasmine | held-out batch | Jasmine | 20 % pruned: test / held-out | s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        zoom = ("-" if not r["zoom"] else f"x/{1 + r['zoom']:g} log" if r.get("zoom_law") == "log"
                else f"+-{r['zoom']:g} lin")
        aug = (f"{r['views']}: {'hv' if r['flip'] else '-'}, {zoom}, {r['hue']:g}/{r['sat']:g}/{r['bright']:g}"
               if r["views"] else "none")
        pr = (f"{r['p0.2_test_acc']:.4f} / {r.get('p0.2_heldout_acc', float('nan')):.4f}"
              if "p0.2_test_acc" in r else "-")
        held = f"{r['heldout_acc']:.4f} | {r['heldout_jasmine']:.2f}" if "heldout_acc" in r else "- | -"
        lines.append(f"| {r['split']} | {r['size']} | {r['transform']} | {aug} | {r['depth']} | {r['seed']} | "
                     f"{r['test_acc']:.4f} | {r['test_jasmine']:.2f} | {held} | {pr} | {r['seconds']:.0f} |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default=None, help="rows.jsonl: write its table to --out and stop")
    ap.add_argument("--data")
    ap.add_argument("--weights")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", default="main")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="images per class (0: all)")
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.out)
    configs = grid(args.grid)
    print(f"{len(configs)} configs, {args.workers} workers", flush=True)
    if args.workers == 1:
        worker(0, args, configs, args.out)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(i, args, configs[i::args.workers], args.out))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    sys.exit(main())
