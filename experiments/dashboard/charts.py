"""The dashboard's Altair charts, built from the plain rows of `experiments.dashboard.data`.

Every chart that colours by ranker takes the same `colours` (domain, range) pair,
`data.ranker_colours(all runs)`, so a ranker has one colour on every page.
"""

import altair as alt

AXES = (("macs", "MACs"), ("params", "parameters"), ("latency_ms", "latency (ms / batch)"))
PHASE = alt.Color("phase:N", title="phase")


def _ranker(colours, rows):
    """Colour by ranker on the log-wide scale; the legend lists the rankers of `rows` only."""
    domain, range_ = colours
    labels = {r["label"] for r in rows}
    shown = [d for d in domain if d in labels]
    return alt.Color("label:N", title="ranker", scale=alt.Scale(domain=domain, range=range_),
                     legend=alt.Legend(values=shown))


def epoch_curves(curves):
    """Loss, accuracy, val loss and val accuracy per epoch, one panel each, a colour per phase."""
    base = alt.Chart(alt.Data(values=curves)).mark_line(point=True).encode(
        x=alt.X("step:Q", title="epoch (all phases, in order)"),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
        color=PHASE,
        tooltip=["phase:N", "epoch:Q", "metric:N", alt.Tooltip("value:Q", format=".4f")])
    return base.properties(width=300, height=180).facet(
        facet=alt.Facet("metric:N", title=None, sort=["loss", "accuracy", "val_loss", "val_accuracy"]),
        columns=2).resolve_scale(y="independent")


def epoch_seconds(epoch_rows):
    """Seconds per epoch, a bar per epoch coloured by phase."""
    return alt.Chart(alt.Data(values=epoch_rows)).mark_bar().encode(
        x=alt.X("step:O", title="epoch (all phases, in order)"),
        y=alt.Y("seconds:Q", title="seconds"),
        color=PHASE,
        tooltip=["phase:N", "epoch:Q", alt.Tooltip("seconds:Q", format=".2f")]).properties(height=220)


def layers_kept(layer_rows):
    """Filters before (light) and kept (dark) per conv, in model order."""
    order = [r["layer"] for r in layer_rows]
    base = alt.Chart(alt.Data(values=layer_rows)).encode(
        x=alt.X("layer:N", sort=order, title=None, axis=alt.Axis(labelAngle=-60)))
    tip = ["layer:N", "filters_before:Q", "filters_after:Q", alt.Tooltip("kept:Q", format=".2%")]
    before = base.mark_bar(color="#c7d7ea").encode(y=alt.Y("filters_before:Q", title="filters"), tooltip=tip)
    after = base.mark_bar(color="#1f77b4", width={"band": 0.6}).encode(y="filters_after:Q", tooltip=tip)
    return (before + after).properties(height=260)


def confusion(cells):
    """The confusion matrix as a heatmap (share of each true class), with the counts."""
    base = alt.Chart(alt.Data(values=cells)).encode(
        x=alt.X("predicted:N", title="predicted", sort=None, axis=alt.Axis(labelAngle=-45)),
        y=alt.Y("true:N", title="true", sort=None))
    heat = base.mark_rect().encode(color=alt.Color("share:Q", title="share of true class",
                                                   scale=alt.Scale(scheme="blues", domain=[0, 1])),
                                   tooltip=["true:N", "predicted:N", "count:Q", alt.Tooltip("share:Q", format=".1%")])
    text = base.mark_text(fontSize=11).encode(
        text="count:Q", color=alt.condition("datum.share > 0.5", alt.value("white"), alt.value("black")))
    return (heat + text).properties(width=320, height=320)


def recall(per_class):
    """Recall per class (bars), precision as ticks."""
    base = alt.Chart(alt.Data(values=per_class)).encode(y=alt.Y("class:N", title=None, sort=None))
    tip = ["class:N", alt.Tooltip("recall:Q", format=".3f"), alt.Tooltip("precision:Q", format=".3f"), "support:Q"]
    bars = base.mark_bar(color="#1f77b4").encode(
        x=alt.X("recall:Q", title="recall (bar), precision (tick)", scale=alt.Scale(domain=[0, 1])), tooltip=tip)
    ticks = base.mark_tick(color="#d62728", thickness=2).encode(x="precision:Q", tooltip=tip)
    return (bars + ticks).properties(height=alt.Step(24))


def latency(rows, colours):
    """Median latency per run (point) with its recorded spread (a rule to p90, and to
    min / max where recorded), coloured by ranker."""
    spread = []
    for r in rows:
        low = r.get("ms_min", r["median"])
        high = max(v for k, v in r.items() if k in ("ms_p90", "ms_p95", "ms_p99", "ms_max"))\
            if any(k in r for k in ("ms_p90", "ms_p95", "ms_p99", "ms_max")) else r["median"]
        spread.append({**r, "low": low, "high": high})
    base = alt.Chart(alt.Data(values=spread)).encode(y=alt.Y("run:N", title=None, sort=None,
                                                             axis=alt.Axis(labelLimit=240)))
    tip = ["run:N", alt.Tooltip("median:Q", format=".2f"), alt.Tooltip("low:Q", format=".2f"),
           alt.Tooltip("high:Q", format=".2f"), "batch_size:Q"]
    rule = base.mark_rule(strokeWidth=2).encode(x=alt.X("low:Q", title="ms per batch (median; rule: spread)",
                                                        scale=alt.Scale(zero=False)),
                                                x2="high:Q", color=_ranker(colours, rows), tooltip=tip)
    point = base.mark_point(filled=True, size=90).encode(x="median:Q", color=_ranker(colours, rows), tooltip=tip)
    return (rule + point).properties(height=alt.Step(30))


def frontier(points, segments, colours):
    """Test top-1 against MACs, params and latency (one panel each, side by side): a
    point per run (a square for a run without a parent) and a line from each parent
    to each of its children."""
    panels = []
    for key, title in AXES:
        tip = ["run:N", "seed:Q", alt.Tooltip("test_top1:Q", format=".4f"), alt.Tooltip(f"{key}:Q", format=",.4~g")]
        x = alt.X(f"{key}:Q", title=title, scale=alt.Scale(zero=False), axis=alt.Axis(format="~s"))
        y = alt.Y("test_top1:Q", title="test top-1", scale=alt.Scale(zero=False))
        dots = alt.Chart(alt.Data(values=[p for p in points if p.get(key) is not None])).mark_point(
            filled=True, size=80).encode(
                x=x, y=y, color=_ranker(colours, points), tooltip=tip,
                shape=alt.Shape("role:N", title="run", scale=alt.Scale(domain=["baseline", "pruned"],
                                                                     range=["square", "circle"])))
        lines = alt.Chart(alt.Data(values=[s for s in segments if s.get(key) is not None])).mark_line(
            opacity=0.6).encode(x=x, y=y, color=_ranker(colours, points), detail="segment:N")
        panels.append((lines + dots).properties(width=230, height=260))
    return alt.hconcat(*panels)


def seed_spread(groups, colours):
    """Mean test top-1 of each config run at several seeds against its mean MACs, with a
    rule over mean ± one standard deviation."""
    rows = [{**g, "low": g["test_top1_mean"] - g["test_top1_std"], "high": g["test_top1_mean"] + g["test_top1_std"],
             "runs": ", ".join(f"#{i}" for i in g["runs"])}
            for g in groups if g["n"] > 1 and g["test_top1_std"] is not None and g["macs_mean"] is not None]
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X("macs_mean:Q", title="MACs (mean)", scale=alt.Scale(zero=False), axis=alt.Axis(format="~s")),
        color=_ranker(colours, rows),
        tooltip=["label:N", "n:Q", "runs:N", alt.Tooltip("test_top1_mean:Q", format=".4f"),
                 alt.Tooltip("test_top1_std:Q", format=".4f")])
    rule = base.mark_rule(strokeWidth=2).encode(y=alt.Y("low:Q", title="test top-1 (mean ± std over seeds)",
                                                        scale=alt.Scale(zero=False)), y2="high:Q")
    return (rule + base.mark_point(filled=True, size=70).encode(y="test_top1_mean:Q")).properties(height=260)
