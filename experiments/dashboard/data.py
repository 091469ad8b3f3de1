"""The dashboard's data layer: the experiment log, opened read-only, as plain rows.

Every function here takes an open log (`open_read_only`) or rows it returned and
gives back lists of dicts of plain Python values, so pages and charts never run
SQL and this module is testable without Streamlit. Nothing is ever written: the
log is opened with SQLite's `mode=ro` (and `immutable=1` where the file sits on
read-only media, where SQLite cannot create the WAL index beside it).
"""

import dataclasses
import json
import math
import statistics

from experiments.config import CifarConfig, CompressConfig, RiceConfig
from save_sqlite import ExperimentLog

# Rankers in a fixed colour order, so that a ranker has one colour on every page and
# in every log; rankers not named here follow in alphabetical order.
KNOWN_RANKERS = ("baseline", "l1", "l2", "fpgm", "bn_scale", "apoz", "taylor", "hrank", "random")
PALETTE = ("#4c4c4c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
# Config fields that do not make two runs different experiments (seed groups, differing fields).
NOT_CONFIG = ("seed", "seeds", "verbose", "out_dir")
# The evaluation sets a run may record: (metrics key, title). The test set's report sits at
# the top level of the metrics; the others (rice --split-by batch, --eval-dir) under their key.
EVAL_SETS = (("test", "test split"), ("heldout", "held-out batch"), ("eval_dir", "--eval-dir"))
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# The config class of each experiment: its fields are the flags a run was started with.
CONFIGS = {"rice": RiceConfig, "cifar": CifarConfig, "compress": CompressConfig}


def open_read_only(path):
    """The log at `path` for reading only (never created, migrated or changed; on
    read-only media with `immutable=1`: `save_sqlite.open_read_only`); a missing, foreign
    or non-SQLite file is a one-line ValueError, as for `logs`."""
    return ExperimentLog(path, readonly=True)


def _json(text):
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def label(row):
    """What a run is, for colours and legends: its ranker, or "baseline"."""
    return row.get("ranker") or "baseline"


def runs(log):
    """Every run as a plain dict, in tree order (each parent followed by its children,
    depth first): the runs table's columns with `config`, `metrics` and `rates`
    parsed, plus `label` (ranker or baseline), `epochs` (logged epochs), `depth`,
    `children` (their ids), `tree` (the id indented by depth) and `error_line`. A
    `running` row whose process is gone on this host reads as `interrupted`."""
    counts = dict(log.db.execute("SELECT run_id, count(*) FROM epochs GROUP BY run_id").fetchall())
    rows = {}
    for r in log.runs():
        row = dict(r)
        row["config"], row["metrics"] = _json(r.get("config")), _json(r.get("metrics"))
        try:
            row["rates"] = json.loads(r["rates"]) if r.get("rates") else None
        except (TypeError, ValueError):
            row["rates"] = None
        row.update(label=label(r), epochs=counts.get(r["id"], 0), children=[],
                   error_line=(r.get("error") or "").strip().splitlines()[0] if r.get("error") else "")
        rows[r["id"]] = row
    for row in rows.values():
        if row.get("parent_id") in rows:
            rows[row["parent_id"]]["children"].append(row["id"])
    ordered = []

    def visit(row, depth):
        row["depth"] = depth
        row["tree"] = ("\u2003" * (depth - 1) + "\u2514 " if depth else "") + str(row["id"])
        ordered.append(row)
        for child in row["children"]:
            visit(rows[child], depth + 1)

    for row in rows.values():
        if row.get("parent_id") not in rows:
            visit(row, 0)
    return ordered


def filter_runs(rows, experiment=(), status=(), ranker=(), seed=()):
    """The rows matching every non-empty filter (any of its values); `ranker` matches
    `label` (so "baseline" selects unpruned runs)."""
    def keep(r):
        return ((not experiment or r["experiment"] in experiment) and (not status or r["status"] in status)
                and (not ranker or r["label"] in ranker) and (not seed or r.get("seed") in seed))
    return [r for r in rows if keep(r)]


def ranker_colours(rows):
    """(domain, range) of the ranker colour scale: the known rankers in a fixed order,
    then the log's other rankers alphabetically; the same on every page of a log."""
    others = sorted({r["label"] for r in rows} - set(KNOWN_RANKERS))
    domain = [*KNOWN_RANKERS, *others]
    return domain, [PALETTE[i % len(PALETTE)] for i in range(len(domain))]


# -------------------------------------------------------------------- one run
def epochs(log, run_id):
    """The run's epochs in logged order, each with `step` (its position over all
    phases, from 1) and the four curves (None where not logged)."""
    out = []
    for i, e in enumerate(log.epochs(run_id), start=1):
        out.append({"step": i, "phase": e["phase"], "epoch": e["epoch"], "seconds": e["seconds"],
                    "lr": e.get("lr"), **{k: e.get(k) for k in EPOCH_METRICS}})
    return out


def epoch_curves(epoch_rows):
    """Long format of the curves for charting: one row per (epoch, metric) logged."""
    return [{"step": e["step"], "phase": e["phase"], "epoch": e["epoch"], "metric": k, "value": e[k]}
            for e in epoch_rows for k in EPOCH_METRICS if is_number(e.get(k))]


def layers(log, run_id):
    """Filters before and after pruning per conv (a conv pruned again keeps its last
    row), in logged order, with `kept` = after / before."""
    by_layer = {}
    for p in log.layer_prunes(run_id):
        before, after = p["filters_before"], p["filters_after"]
        by_layer[p["layer"]] = {"layer": p["layer"], "filters_before": before, "filters_after": after,
                                "kept": after / before if before else None, "ranker": p.get("ranker")}
    return list(by_layer.values())


def eval_sets(row):
    """The run's evaluation sets that have a report: dicts with key, title, top1,
    images, source, class_names, confusion_matrix (rows: true class) and per_class
    (class, precision, recall, support)."""
    m, out = row["metrics"], []
    for key, title in EVAL_SETS:
        report = {"confusion_matrix": m.get("confusion_matrix"), "per_class": m.get("per_class"),
                  "top1": row.get("test_top1")} if key == "test" else m.get(key)
        if not isinstance(report, dict) or not (report.get("confusion_matrix") or report.get("per_class")
                                                or is_number(report.get("top1"))):
            continue
        cm = report.get("confusion_matrix") or []
        per_class = report.get("per_class") or {}
        names = list(m.get("class_names") or per_class or range(len(cm)))
        out.append({"key": key, "title": title, "top1": report.get("top1"),
                    "images": report.get("images") or (sum(map(sum, cm)) if cm else None),
                    "source": report.get("source"), "class_names": [str(n) for n in names],
                    "confusion_matrix": cm,
                    "per_class": [{"class": str(c), **v} for c, v in per_class.items() if isinstance(v, dict)]})
    return out


def confusion_cells(eval_set):
    """One row per cell of the confusion matrix: true, predicted, count and the share
    of the true class."""
    names, cells = eval_set["class_names"], []
    for i, row in enumerate(eval_set["confusion_matrix"]):
        total = sum(row)
        for j, n in enumerate(row):
            cells.append({"true": names[i] if i < len(names) else str(i),
                          "predicted": names[j] if j < len(names) else str(j),
                          "count": n, "share": n / total if total else 0.0})
    return cells


def latency(row):
    """The run's latency record (median, p90, batch, calls, ...) as a dict; {} if none."""
    value = row["metrics"].get("latency")
    return value if isinstance(value, dict) else {}


def latency_rows(rows, row):
    """Latency with its spread for the run, its parent and its children (context):
    id, label, median (ms_per_batch), every other ms_ field recorded, and for a record of
    interleaved rounds (`rounds_ms`) the fastest and slowest round (ms_min, ms_max) and
    the speed-up against the baseline timed in the same window."""
    ids = {row["id"], row.get("parent_id"), *row["children"]}
    out = []
    for r in rows:
        lat = latency(r)
        if r["id"] in ids and is_number(lat.get("ms_per_batch")):
            rounds = [v for v in lat.get("rounds_ms") or () if is_number(v)]
            out.append({"id": r["id"], "run": f"#{r['id']} {r['label']}", "label": r["label"],
                        "median": lat["ms_per_batch"], "batch_size": lat.get("batch_size"),
                        **{k: v for k, v in lat.items() if k.startswith("ms_") and is_number(v)},
                        **({"ms_min": min(rounds), "ms_max": max(rounds)} if rounds else {}),
                        **({"speedup": lat["speedup"]} if is_number(lat.get("speedup")) else {})})
    return out


def config_items(row):
    """The run's columns that say what it is, then its config, as (field, value) text pairs."""
    head = [(k, row.get(k)) for k in ("experiment", "model", "dataset", "ranker", "pruning_ratio", "rates",
                                      "seed", "parent_id", "status", "started_at", "ended_at", "host",
                                      "version", "artifact", "run_dir") if row.get(k) is not None]
    return head + sorted(row["config"].items())


# -------------------------------------------------------------------- compare
def family(rows, baseline_id):
    """A run and its descendants (children, their steps, ...), in tree order."""
    by_id = {r["id"]: r for r in rows}
    out, todo = [], [baseline_id]
    while todo:
        r = by_id.get(todo.pop(0))
        if r is not None:
            out.append(r)
            todo[:0] = r["children"]
    return out


def frontier(rows):
    """Points (runs with an accuracy) and segments (a pair of points: a parent and
    a child, both among `rows`) for accuracy against params, MACs and latency."""
    points = [{"id": r["id"], "run": f"#{r['id']} {r['label']}", "label": r["label"],
               "role": "pruned" if r.get("parent_id") else "baseline", "parent_id": r.get("parent_id"),
               "seed": r.get("seed"), "test_top1": r["test_top1"], "params": r.get("params"),
               "macs": r.get("macs"), "latency_ms": r.get("latency_ms")}
              for r in rows if is_number(r.get("test_top1"))]
    by_id = {p["id"]: p for p in points}
    segments = []
    for p in points:
        parent = by_id.get(p["parent_id"])
        if parent is not None:
            for end in (parent, p):
                segments.append({**end, "segment": p["id"], "label": p["label"]})
    return points, segments


def _group_key(row):
    config = {k: v for k, v in row["config"].items() if k not in NOT_CONFIG}
    return json.dumps([row["experiment"], row.get("model"), row.get("dataset"), row["label"],
                       row.get("pruning_ratio"), row.get("rates"), _derived_free(row, config)],
                      sort_keys=True, default=str)


def _derived_free(row, config):
    """Config without what a seed changes on its own (values measured from the data,
    e.g. CIFAR's normalization): for a known experiment only the fields of its config
    class count; otherwise every recorded field does."""
    cls = CONFIGS.get(row["experiment"])
    if cls is None:
        return config
    names = {f.name for f in dataclasses.fields(cls)} | {"step", "goal"}  # compress steps: which step
    return {k: v for k, v in config.items() if k in names}


def seed_groups(rows):
    """Runs of the same config (every field but the seed) grouped: one dict per group
    with its runs, seeds, n and mean and standard deviation (None for one run) of
    top-1, params, MACs and latency; groups of several seeds first."""
    groups = {}
    for r in rows:
        if r["status"] == "completed":
            groups.setdefault(_group_key(r), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        g = {"experiment": first["experiment"], "label": first["label"], "pruning_ratio": first.get("pruning_ratio"),
             "runs": [r["id"] for r in members], "seeds": sorted({r.get("seed") for r in members}, key=str),
             "n": len(members)}
        for key in ("test_top1", "params", "macs", "latency_ms"):
            values = [r[key] for r in members if is_number(r.get(key))]
            g[f"{key}_mean"] = statistics.fmean(values) if values else None
            g[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(g)
    return sorted(out, key=lambda g: (-g["n"], g["runs"][0]))


def differing_fields(rows):
    """The fields (run columns and config) whose values differ between `rows`: a dict
    per field with its value for each run id (None where a run lacks it)."""
    def fields(r):
        cols = {k: r.get(k) for k in ("experiment", "model", "dataset", "ranker", "pruning_ratio", "rates",
                                      "seed", "parent_id")}
        return {**cols, **{f"config.{k}": v for k, v in r["config"].items()}}

    per_run = {r["id"]: fields(r) for r in rows}
    names = list(dict.fromkeys(k for f in per_run.values() for k in f))
    out = []
    for name in names:
        values = {rid: f.get(name) for rid, f in per_run.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out.append({"field": name, **{f"#{rid}": as_text(v) for rid, v in values.items()}})
    return out


def as_text(value):
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
