"""The dashboard's Streamlit script: pages Runs, Run and Compare over one experiment log.

    streamlit run experiments/dashboard/app.py -- --db logs/experiments.db

(`python main_train.py dashboard` runs exactly this). The page and its selection
live in the URL (`?page=Run&run=3`, `?page=Compare&experiment=cifar`), so a page
can be linked and reloaded. The log is opened read-only on every rerun, so a
refresh shows runs written meanwhile.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `streamlit run` puts this folder first, not the repository
    sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from experiments.dashboard import charts, data  # noqa: E402
from save_sqlite import default_db_path  # noqa: E402

PAGES = ("Runs", "Run", "Compare")
TABLE_COLUMNS = {  # Runs page: column -> (title, Streamlit column config)
    "tree": ("run", st.column_config.TextColumn("run", help="Children are indented under their parent")),
    "id": ("id", st.column_config.NumberColumn("id", format="%d")),
    "experiment": ("experiment", None), "status": ("status", None), "label": ("ranker", None),
    "pruning_ratio": ("ratio", st.column_config.NumberColumn("ratio", format="%.3g")),
    "seed": ("seed", st.column_config.NumberColumn("seed", format="%d")),
    "test_top1": ("top-1", st.column_config.NumberColumn("top-1", format="%.4f")),
    "test_top5": ("top-5", st.column_config.NumberColumn("top-5", format="%.4f")),
    "params": ("params", st.column_config.NumberColumn("params", format="localized")),
    "macs": ("MACs", st.column_config.NumberColumn("MACs", format="localized")),
    "latency_ms": ("ms/batch", st.column_config.NumberColumn("ms/batch", format="%.1f")),
    "epochs": ("epochs", None), "parent_id": ("parent", st.column_config.NumberColumn("parent", format="%d")),
    "dataset": ("dataset", None), "model": ("model", None), "started_at": ("started", None),
    "error_line": ("error", None),
}


def db_path(argv):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    return parser.parse_known_args(argv)[0].db or default_db_path()


def _param(name, default=None):
    value = st.query_params.get(name)
    return default if value in (None, "") else value


def _ints(text):
    return [int(v) for v in str(text or "").split(",") if v.strip().lstrip("-").isdigit()]


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def run_title(r):
    ratio = f" {r['pruning_ratio']:g}" if r.get("pruning_ratio") else ""
    seed = f", seed {r['seed']}" if r.get("seed") is not None else ""
    return f"#{r['id']} {r['experiment']} {r['label']}{ratio}{seed} ({r['status']})"


# ---------------------------------------------------------------------- pages
def runs_page(log, rows):
    st.title("Runs")
    st.caption(f"{log.path}: {len(rows)} runs")
    if not rows:
        return st.info(f"No runs in {log.path} yet: training commands (rice, cifar, prune, compress) add them.")
    options = {"experiment": sorted({r["experiment"] for r in rows}),
               "status": sorted({r["status"] for r in rows}),
               "ranker": sorted({r["label"] for r in rows}),
               "seed": sorted({r["seed"] for r in rows if r.get("seed") is not None})}
    chosen = {}
    for col, (name, values) in zip(st.columns(4), options.items()):
        chosen[name] = col.multiselect(name, values, key=f"filter_{name}")
    shown = data.filter_runs(rows, **chosen)
    scored = [r for r in shown if r.get("test_top1") is not None]
    best = max(scored, key=lambda r: r["test_top1"]) if scored else None
    cols = st.columns(4)
    cols[0].metric("runs", len(shown))
    cols[1].metric("completed", sum(r["status"] == "completed" for r in shown))
    cols[2].metric("failed or interrupted", sum(r["status"] in ("failed", "interrupted") for r in shown))
    cols[3].metric("best top-1", _fmt(best and best["test_top1"], ".4f"),
                   delta=f"run #{best['id']}" if best else None, delta_color="off")
    frame = pd.DataFrame([{k: r.get(k) for k in TABLE_COLUMNS} for r in shown], columns=list(TABLE_COLUMNS))
    st.dataframe(frame, hide_index=True, width="stretch", key="runs_table", height=min(38 + 35 * len(frame), 600),
                 column_config={k: c for k, (_, c) in TABLE_COLUMNS.items() if c is not None}
                 | {k: t for k, (t, c) in TABLE_COLUMNS.items() if c is None})
    st.download_button("Export these runs (CSV)", frame.to_csv(index=False), "runs.csv", "text/csv")
    broken = [r for r in shown if r["status"] in ("failed", "interrupted")]
    if broken:
        st.subheader("Failed and interrupted runs")
        for r in broken:
            with st.expander(f"{run_title(r)}: {r['error_line'] or 'no error recorded'}"):
                st.code(r.get("error") or "(no error recorded)", language=None)
    st.subheader("Tree")
    st.caption("Baseline → pruned runs, compress → its steps, a model → its exports. Click a run to open it.")
    shown_ids = {r["id"] for r in shown}
    st.markdown("\n".join(f"{'    ' * r['depth']}- [{run_title(r)}](?page=Run&run={r['id']})"
                          + (f" · top-1 {r['test_top1']:.4f}" if r.get("test_top1") is not None else "")
                          for r in shown if r["depth"] == 0 or r.get("parent_id") in shown_ids))


def run_page(log, rows, colours):
    st.title("Run")
    if not rows:
        return st.info(f"No runs in {log.path} yet.")
    by_id = {r["id"]: r for r in rows}
    ids = [r["id"] for r in rows]
    wanted = _ints(_param("run"))
    start = wanted[0] if wanted and wanted[0] in by_id else max(ids)
    run_id = st.selectbox("run", ids, index=ids.index(start), format_func=lambda i: run_title(by_id[i]),
                          key="run_select")
    st.query_params["run"] = str(run_id)
    r = by_id[run_id]
    st.header(run_title(r))
    if r["status"] in ("failed", "interrupted"):
        say = st.error if r["status"] == "failed" else st.warning
        say(f"{r['status']}: {r['error_line'] or 'no error recorded'}")
        if r.get("error") and "\n" in r["error"].strip():
            with st.expander("full error"):
                st.code(r["error"], language=None)
    epoch_rows = data.epochs(log, run_id)
    val = [e["val_accuracy"] for e in epoch_rows if e["val_accuracy"] is not None]
    lat = data.latency(r)
    cols = st.columns(4)
    cols[0].metric("test top-1", _fmt(r.get("test_top1"), ".4f"))
    cols[1].metric("test top-5", _fmt(r.get("test_top5"), ".4f"))
    cols[2].metric("epochs", len(epoch_rows))
    cols[3].metric("best val accuracy", _fmt(max(val) if val else None, ".4f"))
    cols = st.columns(4)
    cols[0].metric("params", _fmt(r.get("params"), ",d"))
    cols[1].metric("MACs", _fmt(r.get("macs"), ",d"))
    speedup = r["metrics"].get("speedup")
    cols[2].metric("speed-up", f"{speedup:.2f}x" if data.is_number(speedup) else "–")
    cols[3].metric("ms / batch", _fmt(r.get("latency_ms"), ".1f"),
                   delta=f"p90 {lat['ms_p90']:.1f}" if data.is_number(lat.get("ms_p90")) else None, delta_color="off")
    st.markdown(f"**artifact** `{r.get('artifact') or '–'}`"
                + (f" · **folder** `{r['run_dir']}`" if r.get("run_dir") else ""))
    family = [f"[#{i}](?page=Run&run={i})" for i in r["children"]]
    if r.get("parent_id") in by_id:
        st.markdown(f"parent: [{run_title(by_id[r['parent_id']])}](?page=Run&run={r['parent_id']})")
    if family:
        st.markdown("children: " + ", ".join(family))
    with st.expander("config", expanded=False):
        st.dataframe(pd.DataFrame([{"field": k, "value": data.as_text(v)} for k, v in data.config_items(r)]),
                     hide_index=True, width="stretch")
    rest = {k: v for k, v in r["metrics"].items() if k not in
            ("confusion_matrix", "per_class", "class_names", "latency", "heldout", "eval_dir")}
    if rest:
        with st.expander("other metrics"):
            st.json(rest)

    st.subheader("Training curves")
    if epoch_rows:
        curves = data.epoch_curves(epoch_rows)
        if curves:
            st.altair_chart(charts.epoch_curves(curves))
        st.caption("Seconds per epoch")
        st.altair_chart(charts.epoch_seconds(epoch_rows), width="stretch")
    else:
        st.info("No epochs logged for this run.")

    layer_rows = data.layers(log, run_id)
    if layer_rows:
        st.subheader("Filters kept per layer")
        st.altair_chart(charts.layers_kept(layer_rows), width="stretch")
        with st.expander("filters per layer (table)"):
            st.dataframe(pd.DataFrame(layer_rows), hide_index=True, width="stretch")

    sets = data.eval_sets(r)
    if sets:
        st.subheader("Evaluation")
        for s in sets:
            st.markdown(f"**{s['title']}**: top-1 {_fmt(s['top1'], '.4f')}, {_fmt(s['images'], 'd')} images"
                        + (f", from `{s['source']}`" if s.get("source") else ""))
            left, right = st.columns(2)
            if s["confusion_matrix"]:
                left.altair_chart(charts.confusion(data.confusion_cells(s)))
            if s["per_class"]:
                right.altair_chart(charts.recall(s["per_class"]), width="stretch")

    if lat:
        lat_rows = data.latency_rows(rows, r)
        st.subheader("Latency")
        how = (f"median of {lat['rounds']} interleaved rounds with its baseline in one window"
               if lat.get("interleaved") else f"median of {lat.get('runs', '?')} timed calls")
        st.caption(f"ms per batch of {lat.get('batch_size', '?')}, {how}; the rule spans the fastest to the "
                   "slowest round (or p90). The run's parent and children are shown for context.")
        st.altair_chart(charts.latency(lat_rows, colours), width="stretch")
        st.dataframe(pd.DataFrame(lat_rows).drop(columns=["label"]), hide_index=True, width="stretch")


def compare_page(rows, colours):
    st.title("Compare")
    if not rows:
        return st.info("No runs to compare yet.")
    experiments = sorted({r["experiment"] for r in rows})
    want = _param("experiment")
    start = want if want in experiments else max(experiments, key=lambda e: sum(r["experiment"] == e for r in rows))
    experiment = st.selectbox("experiment", experiments, index=experiments.index(start), key="compare_experiment")
    st.query_params["experiment"] = experiment
    in_exp = [r for r in rows if r["experiment"] == experiment]
    by_id = {r["id"]: r for r in rows}
    parents = [r["id"] for r in in_exp if r["children"]]
    asked = [i for i in _ints(_param("baselines")) if i in parents]
    baselines = st.multiselect("baselines (each with its children)", parents, default=asked or parents,
                               format_func=lambda i: run_title(by_id[i]), key="compare_baselines")
    picked_ids = st.multiselect("or pick runs (any experiment; replaces the baselines)", [r["id"] for r in rows],
                                default=[i for i in _ints(_param("runs")) if i in by_id],
                                format_func=lambda i: run_title(by_id[i]), key="compare_runs")
    if picked_ids:
        picked = [by_id[i] for i in picked_ids]
    else:
        picked = list({r["id"]: r for b in baselines for r in data.family(rows, b)}.values()) if baselines \
            else in_exp
    st.caption("Runs: " + ", ".join(f"#{r['id']}" for r in picked))
    points, segments = data.frontier(picked)
    st.subheader("Accuracy against size and speed")
    if points:
        st.altair_chart(charts.frontier(points, segments, colours))
        st.caption("Squares: runs without a parent; lines join each parent to its children (the frontier).")
    else:
        st.info("None of these runs has a test accuracy yet.")
    groups = data.seed_groups(picked)
    if groups:
        st.subheader("Mean ± std over seeds (same config)")
        st.dataframe(pd.DataFrame([{
            "ranker": g["label"], "ratio": g["pruning_ratio"], "n": g["n"], "seeds": ", ".join(map(str, g["seeds"])),
            "top-1": _pm(g, "test_top1", ".4f"), "params": _pm(g, "params", ",.0f"), "MACs": _pm(g, "macs", ",.0f"),
            "ms/batch": _pm(g, "latency_ms", ".1f"), "runs": ", ".join(f"#{i}" for i in g["runs"])}
            for g in groups]), hide_index=True, width="stretch")
        if any(g["n"] > 1 and g["test_top1_std"] is not None and g["macs_mean"] is not None for g in groups):
            st.altair_chart(charts.seed_spread(groups, colours), width="stretch")
    diff = data.differing_fields(picked)
    st.subheader("Config fields that differ")
    if diff:
        st.dataframe(pd.DataFrame(diff), hide_index=True, width="stretch")
    else:
        st.info("The picked runs share every config field.")


def _pm(group, key, spec):
    mean, std = group[f"{key}_mean"], group[f"{key}_std"]
    if mean is None:
        return ""
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def main(argv=None):
    st.set_page_config(page_title="Experiment log", layout="wide")
    path = db_path(sys.argv[1:] if argv is None else argv)
    try:
        log = data.open_read_only(path)
    except ValueError as e:
        st.error(str(e))
        return
    try:
        rows = data.runs(log)
        colours = data.ranker_colours(rows)
        want = _param("page", "Runs")
        page = st.sidebar.radio("page", PAGES, index=PAGES.index(want) if want in PAGES else 0, key="page")
        st.query_params["page"] = page
        st.sidebar.caption(f"log: `{path}` (read-only; reload the page for new runs)")
        if page == "Runs":
            runs_page(log, rows)
        elif page == "Run":
            run_page(log, rows, colours)
        else:
            compare_page(rows, colours)
    finally:
        log.close()


main()
