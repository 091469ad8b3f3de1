"""Reports from the experiment log: a Markdown summary and PNG plots."""

import json
import os
import re

import matplotlib

from experiments.files import atomic_path, check_output_owner, ensure_writable_dir, write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = (("params", "parameters"), ("macs", "MACs"), ("latency_ms", "latency (ms / batch)"))


def _label(run):
    return run["ranker"] or "baseline"


def _ratio(run):
    """The run's one pruning ratio, "per-layer" when it has one per conv, or ""."""
    return run["pruning_ratio"] if run["pruning_ratio"] is not None else ("per-layer" if run["rates"] else "")


def _md_table(runs):
    lines = ["| run | dataset | ranker | ratio | seed | top-1 | top-5 | params | MACs | ms/batch | parent |",
             "|---" * 11 + "|"]
    for r in runs:
        ratio = _ratio(r)
        lines.append(
            f"| {r['id']} | {r['dataset'] or ''} | {_label(r)} | {ratio} | {_v(r['seed'])} | "
            f"{_v(r['test_top1'], '.4f')} | {_v(r['test_top5'], '.4f')} | {_v(r['params'], ',d')} | "
            f"{_v(r['macs'], ',d')} | {_v(r['latency_ms'], '.1f')} | {_v(r['parent_id'])} |")
    return "\n".join(lines)


# Config keys that differ between the seeds of one setting (they do not split a group).
SEED_KEYS = ("seed", "seeds")


def seed_groups(runs):
    """Completed runs grouped by setting: the same experiment, dataset, ranker, ratio or
    rates and config except the seed. Returns [(runs of one setting, in id order)], in
    order of the group's first run."""
    groups = {}
    for r in sorted(runs, key=lambda r: r["id"]):
        config = {k: v for k, v in json.loads(r["config"] or "{}").items() if k not in SEED_KEYS}
        key = (r["experiment"], r["dataset"], r["ranker"], r["pruning_ratio"], r["rates"],
               json.dumps(config, sort_keys=True))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def mean_std(values):
    """(mean, sample standard deviation) of the values that are not None; (None, None) if none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def _metric(run, *path):
    value = json.loads(run["metrics"] or "{}")
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _pm(values, spec=".4f"):
    """'mean ± std'; one value when every seed gave the same (e.g. a pruned size)."""
    mean, std = mean_std(values)
    if mean is None:
        return ""
    return f"{mean:{spec}}" if len(set(values)) == 1 else f"{mean:{spec}} ± {std:{spec}}"


def seeds_table(runs):
    """A Markdown table of every setting run with two or more seeds: test (and held-out
    batch) top-1 and speed-up as mean ± sample std over the seeds; None when there is none."""
    groups = [g for g in seed_groups(runs) if len({r["seed"] for r in g}) > 1]
    if not groups:
        return None
    lines = ["| runs | dataset | ranker | ratio | seeds | top-1 | held-out top-1 | params | MACs | speed-up |",
             "|---" * 10 + "|"]
    for g in groups:
        r = g[0]
        ratio = _ratio(r)
        speedups = [_metric(x, "speedup") for x in g] if r["parent_id"] is not None else []
        lines.append(
            f"| {', '.join(str(x['id']) for x in g)} | {r['dataset'] or ''} | {_label(r)} | {ratio} | "
            f"{len(g)} | {_pm([x['test_top1'] for x in g])} | {_pm([_metric(x, 'heldout', 'top1') for x in g])} | "
            f"{_pm([x['params'] for x in g], ',.0f')} | {_pm([x['macs'] for x in g], ',.0f')} | "
            f"{_pm(speedups, '.2f')} |")
    return "\n".join(lines)


def _v(value, spec=""):
    return "" if value is None else format(value, spec)


def accuracy_plot(runs, title, path):
    """Accuracy against params, MACs and latency; one colour per ranker."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, name) in zip(axes, AXES):
        for label in sorted({_label(r) for r in runs}):
            pts = [(r[key], r["test_top1"]) for r in runs if _label(r) == label and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, label=label, s=36, marker="*" if label == "baseline" else "o")
        ax.set_xlabel(name)
        if key != "latency_ms":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_ylabel("test top-1 accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path):
    """Writes the figure as a PNG atomically (a full disk leaves the previous plot)."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def epoch_time_plot(log, runs, path):
    """Mean seconds per epoch of each run, grouped by phase."""
    rows = []
    for r in runs:
        epochs = log.epochs(r["id"])
        if epochs:
            mean = sum(e["seconds"] for e in epochs) / len(epochs)
            rows.append((f"#{r['id']} {r['experiment']} {_label(r)} {_v(r['pruning_ratio'], 'g')}", mean))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    ax.barh([n for n, _ in rows], [s for _, s in rows], color="#4c72b0")
    ax.set_xlabel("mean seconds per epoch")
    ax.invert_yaxis()
    return _save(fig, path)


def layers_kept_plot(log, runs, path):
    """Fraction of filters kept per layer for every pruned run, one panel per experiment."""
    panels = {}
    for r in runs:
        rows = log.layer_prunes(r["id"])
        if rows:
            kept = {}
            for p in rows:  # a layer pruned in several steps keeps its last count
                kept[p["layer"]] = (p["filters_before"], p["filters_after"])
            label = f"#{r['id']} {_label(r)} {_v(r['pruning_ratio'], 'g')}"
            panels.setdefault(r["experiment"], []).append((label, kept))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.2 * len(panels)), squeeze=False)
    for ax, (experiment, series) in zip(axes[:, 0], sorted(panels.items())):
        layers = list(dict.fromkeys(name for _, kept in series for name in kept))
        for label, kept in series:
            ax.plot([layers.index(n) for n in kept], [a / b for b, a in kept.values()], marker="o", label=label)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("filters kept / before")
        ax.set_title(experiment)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def report_run_count(path):
    """How many completed runs the report.md at `path` was built from (None: no report)."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        match = re.search(r"; (\d+) completed runs", f.read(4000))
    return int(match.group(1)) if match else None


def write_report(log, out_dir, force=False):
    """report.md and PNGs for all completed runs in `log`; returns the paths written.

    A report.md built from more completed runs is not replaced (a ValueError says
    so) unless `force`."""
    runs = log.runs(status="completed")
    previous = report_run_count(os.path.join(out_dir, "report.md"))
    if previous is not None and previous > len(runs) and not force:
        raise ValueError(f"{os.path.join(out_dir, 'report.md')!r} was built from {previous} completed runs; "
                         f"{log.path!r} has {len(runs)}. Pass another --out-dir, or --force to replace it.")
    experiments = sorted({r["experiment"] for r in runs})
    for name in ["report.md", *(f"report_{e}_accuracy.png" for e in experiments), "report_epoch_times.png",
                 "report_layers_kept.png"]:
        check_output_owner(log, os.path.join(out_dir, name), force, "--out-dir")
    ensure_writable_dir(out_dir)
    written, sections = [], [f"# Experiment report\n\nDatabase: `{log.path}`; {len(runs)} completed runs "
                             f"({len(log.runs()) - len(runs)} others).\n"]
    for experiment in experiments:
        exp_runs = [r for r in runs if r["experiment"] == experiment]
        sections.append(f"## {experiment}\n\n{_md_table(exp_runs)}\n")
        over_seeds = seeds_table(exp_runs)
        if over_seeds:
            sections.append(f"### {experiment}: mean ± std over seeds\n\nOne row per setting (same config but "
                            f"the seed); std is the sample standard deviation.\n\n{over_seeds}\n")
        scored = [r for r in exp_runs if r["test_top1"] is not None]
        if scored:
            png = accuracy_plot(scored, f"{experiment}: accuracy against size and speed",
                                os.path.join(out_dir, f"report_{experiment}_accuracy.png"))
            written.append(png)
            sections.append(f"![accuracy]({os.path.basename(png)})\n")
    for fn, name, caption in ((epoch_time_plot, "report_epoch_times.png", "Seconds per epoch"),
                              (layers_kept_plot, "report_layers_kept.png", "Filters kept per layer")):
        png = fn(log, runs, os.path.join(out_dir, name))
        if png:
            written.append(png)
            sections.append(f"## {caption}\n\n![{caption}]({name})\n")
    md = write_text(os.path.join(out_dir, "report.md"), "\n".join(sections))
    return [md, *written]


def rice_results(cfg, summaries, out_dir):
    """rice_results.md (table + config) and rice_accuracy.png for one rice run."""
    from experiments.common import config_dict  # Keras (the rest of the report does without it)

    ensure_writable_dir(out_dir)
    # Accuracy on the held-out batch (--split-by batch) and on --eval-dir, when measured.
    extra = [k for k in ("heldout_top1", "eval_dir_top1") if k in summaries[0]]
    names = {"heldout_top1": "held-out batch accuracy", "eval_dir_top1": "eval-dir accuracy"}
    lines = ["| run | pruning ratio | test accuracy | " + "".join(f"{names[k]} | " for k in extra)
             + "params | trainable | MACs | latency ms/batch | speed-up |", "|---" * (8 + len(extra)) + "|"]
    for s in summaries:
        lines.append(f"| {s['run_id']} | {s['ratio']:g} | {s['test_top1']:.4f} | "
                     + "".join(f"{s[k]:.4f} | " for k in extra)
                     + f"{s['params']:,} | {s['trainable_params']:,} | {s['macs']:,} | {s['latency_ms']:.1f} | "
                     f"{s['speedup'] or 1.0:.2f}x |")
    md = write_text(os.path.join(out_dir, "rice_results.md"),
                    f"# Rice: transfer learning and pruning\n\nLatency: median of {cfg.latency_runs} calls on a "
                f"batch of {cfg.latency_batch} images of {cfg.image_size}x{cfg.image_size}.\n\n"
                + "\n".join(lines) + "\n\n![accuracy](rice_accuracy.png)\n\nConfig:\n\n```json\n"
                    + json.dumps(config_dict(cfg), indent=1) + "\n```\n")
    runs = [{**s, "ranker": None if s["ratio"] == 0 else f"{cfg.ranker} {s['ratio']:g}"} for s in summaries]
    png = accuracy_plot(runs, "rice: accuracy against size and speed", os.path.join(out_dir, "rice_accuracy.png"))
    return [md, png]
