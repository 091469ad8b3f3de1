"""The dashboard (`main_train.py dashboard`): its data layer, every page through Streamlit's
AppTest on a log of real tiny runs, and the served app in a headless Chromium."""

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("streamlit")
pytest.importorskip("altair")

from conftest import SAMPLE_RICE  # noqa: E402
from experiments.config import CompressConfig  # noqa: E402
from experiments.dashboard import APP, browser, data  # noqa: E402
from main_train import cli  # noqa: E402
from save_sqlite import ExperimentLog, save_training_log_to_sqlite  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

RICE = ["rice", "--data-dir", SAMPLE_RICE, "--weights", "none", "--image-size", "32", "--limit-per-class", "12",
        "--head-epochs", "2", "--retrain-epochs", "1", "--ratios", "0.5", "--split-by", "batch",
        "--holdout-range", "10001-15000", "--latency-batch", "2", "-v", "0"]


def _invoke(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def fixture_log(tmp_path_factory):
    """A log of real tiny runs: rice (baseline -> pruned, with a held-out batch and an
    --eval-dir), a two-step compress of a small CNN at seeds 0 and 1, and a failed and
    an interrupted run."""
    root = tmp_path_factory.mktemp("dash")
    db, eval_dir = str(root / "log.db"), root / "eval"
    for name in sorted(os.listdir(SAMPLE_RICE)):
        if os.path.isdir(os.path.join(SAMPLE_RICE, name)):
            (eval_dir / name).mkdir(parents=True)
            for f in sorted(os.listdir(os.path.join(SAMPLE_RICE, name)))[-2:]:
                shutil.copy(os.path.join(SAMPLE_RICE, name, f), eval_dir / name)
    _invoke([*RICE, "--eval-dir", str(eval_dir), "--out-dir", str(root / "runs"), "--db", db])
    import keras

    small = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5, activation="softmax")])
    small.save(root / "small.keras")
    for seed in ("0", "1"):
        _invoke(["compress", str(root / "small.keras"), "--data-dir", SAMPLE_RICE, "--limit-per-class", "6",
                 "--preprocess", "unit", "--ranker", "l1", "--target-macs", "0.5", "--steps", "2", "--epochs", "1",
                 "--batch-size", "16", "--latency-batch", "1", "--seed", seed, "--out-dir", str(root / "compress"),
                 "-v", "0", "--db", db])
    log = ExperimentLog(db)
    with pytest.raises(ValueError):
        with log.run("prune", model="m.keras", ranker="fpgm", pruning_ratio=0.3, seed=0):
            raise ValueError("Expected ratio in [0, 1). Received: ratio=1.2")
    with pytest.raises(KeyboardInterrupt):
        with log.run("prune", model="m.keras", ranker="l2", pruning_ratio=0.2, seed=0):
            raise KeyboardInterrupt()
    log.close()
    gc.collect()  # the CLI's log connections
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").connection.close()  # copies hold every row
    return db


def _app(db, monkeypatch, page, **params):
    monkeypatch.setattr(sys, "argv", ["app.py", "--db", str(db)])
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"page": page, **{k: str(v) for k, v in params.items()}})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _metrics(at):
    return {m.label: m.value for m in at.metric}


def _charts(at):
    return list(at.get("vega_lite_chart"))


def _values(chart):
    """Every data row of a chart: those inline in its spec (layers, concatenations) and
    those Streamlit sends beside it as Arrow."""
    import pyarrow as pa

    def inline(spec):
        out = list(spec.get("data", {}).get("values", []))
        for key in ("layer", "hconcat", "vconcat", "concat"):
            for part in spec.get(key, []):
                out += inline(part)
        return out + (inline(spec["spec"]) if "spec" in spec else [])

    p = chart.proto
    blobs = [p.data.data] if p.data.data else []
    blobs += [d.data.data for d in p.datasets]
    return inline(json.loads(p.spec)) + [row for b in blobs for row in pa.ipc.open_stream(b).read_all().to_pylist()]


def _scales(spec, field="label"):
    """The (domain, range) of every colour scale on `field` in a spec."""
    found = []
    if isinstance(spec, dict):
        color = spec.get("encoding", {}).get("color", {})
        if color.get("field") == field:
            found.append((color["scale"]["domain"], color["scale"]["range"]))
        for v in spec.values():
            found += _scales(v, field)
    elif isinstance(spec, list):
        for v in spec:
            found += _scales(v, field)
    return found


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------ data layer
def test_data_layer_reads_the_log_into_a_tree(fixture_log):
    log = ExperimentLog(fixture_log, readonly=True)
    raw = {r["id"]: r for r in log.runs()}
    rows = data.runs(data.open_read_only(fixture_log))
    assert sorted(r["id"] for r in rows) == sorted(raw)
    position = {r["id"]: i for i, r in enumerate(rows)}
    for r in rows:  # every child right under its parent's subtree, one level deeper
        if r["parent_id"]:
            parent = next(p for p in rows if p["id"] == r["parent_id"])
            assert position[r["parent_id"]] < position[r["id"]] and r["depth"] == parent["depth"] + 1
            assert r["id"] in parent["children"]
        assert r["epochs"] == len(log.epochs(r["id"]))
        assert r["test_top1"] == raw[r["id"]]["test_top1"] and r["status"] == raw[r["id"]]["status"]
    compress = [r for r in rows if r["experiment"] == "compress"]
    assert [r["depth"] for r in compress] == [0, 1, 1, 0, 1, 1]
    assert compress[1]["tree"].endswith(str(compress[1]["id"])) and compress[1]["parent_id"] == compress[0]["id"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error_line"] == "ValueError: Expected ratio in [0, 1). Received: ratio=1.2"
    assert {r["status"] for r in rows} == {"completed", "failed", "interrupted"}
    baselines = [r for r in compress if not r["parent_id"]]
    group = next(g for g in data.seed_groups(rows) if g["runs"] == [b["id"] for b in baselines])
    tops = [raw[b["id"]]["test_top1"] for b in baselines]
    assert group["n"] == 2 and group["seeds"] == [0, 1]
    assert group["test_top1_mean"] == pytest.approx(statistics.fmean(tops))
    assert group["test_top1_std"] == pytest.approx(statistics.stdev(tops))
    differ = [d["field"] for d in data.differing_fields(baselines)]
    flags = {f.name for f in dataclasses.fields(CompressConfig)}
    assert differ[:2] == ["seed", "config.seed"]  # and what the seed's split measured
    assert {f for f in differ if f.startswith("config.") and f[7:] in flags} == {"config.seed"}
    points, segments = data.frontier(data.family(rows, baselines[0]["id"]))
    assert {p["id"] for p in points} == {baselines[0]["id"], *baselines[0]["children"]}
    assert [(s["segment"], s["id"]) for s in segments] == [
        (c, i) for c in baselines[0]["children"] for i in (baselines[0]["id"], c)]


# --------------------------------------------------------------------- pages
def test_runs_page_shows_every_run_with_the_logs_values(fixture_log, monkeypatch):
    rows = ExperimentLog(fixture_log, readonly=True).runs()
    at = _app(fixture_log, monkeypatch, "Runs")
    table = at.dataframe[0].value
    assert sorted(table["id"]) == [r["id"] for r in rows]
    by_id = table.set_index("id")
    for r in rows:
        assert by_id.loc[r["id"], "status"] == r["status"]
        assert by_id.loc[r["id"], "epochs"] == len(ExperimentLog(fixture_log, readonly=True).epochs(r["id"]))
        if r["test_top1"] is not None:
            assert by_id.loc[r["id"], "test_top1"] == r["test_top1"]
    best = max((r for r in rows if r["test_top1"] is not None), key=lambda r: r["test_top1"])
    metrics = _metrics(at)
    assert metrics["best top-1"] == f"{best['test_top1']:.4f}" and metrics["runs"] == str(len(rows))
    assert metrics["failed or interrupted"] == "2"
    labels = [e.label for e in at.expander]
    assert any("(failed): ValueError: Expected ratio in [0, 1)" in lab for lab in labels)
    assert any("(interrupted): KeyboardInterrupt" in lab for lab in labels)
    tree = at.markdown[-1].value
    for r in rows:
        assert f"[#{r['id']} " in tree and f"?page=Run&run={r['id']}" in tree
    at.multiselect(key="filter_status").set_value(["failed"]).run()
    assert list(at.dataframe[0].value["status"]) == ["failed"]
    at.multiselect(key="filter_status").set_value([]).run()
    at.multiselect(key="filter_experiment").set_value(["compress"])
    at.multiselect(key="filter_seed").set_value([1]).run()
    assert sorted(at.dataframe[0].value["id"]) == [r["id"] for r in rows if r["experiment"] == "compress"
                                                   and r["seed"] == 1] and len(at.dataframe[0].value) == 3


def test_run_page_shows_curves_layers_evaluations_and_latency(fixture_log, monkeypatch):
    log = ExperimentLog(fixture_log, readonly=True)
    pruned = log.runs("rice")[1]
    metrics = json.loads(pruned["metrics"])
    at = _app(fixture_log, monkeypatch, "Run", run=pruned["id"])
    shown = _metrics(at)
    epochs = log.epochs(pruned["id"])
    assert shown["epochs"] == str(len(epochs)) and shown["test top-1"] == f"{pruned['test_top1']:.4f}"
    assert shown["params"] == f"{pruned['params']:,}" and shown["ms / batch"] == f"{pruned['latency_ms']:.1f}"
    assert shown["best val accuracy"] == f"{max(e['val_accuracy'] for e in epochs):.4f}"
    specs = _charts(at)
    curves = _values(specs[0])
    assert {(c["phase"], c["epoch"], c["metric"]) for c in curves} == {
        (e["phase"], e["epoch"], k) for e in epochs for k in data.EPOCH_METRICS if e[k] is not None}
    assert [(v["phase"], v["seconds"]) for v in _values(specs[1])] == [(e["phase"], e["seconds"]) for e in epochs]
    kept = {v["layer"]: (v["filters_before"], v["filters_after"]) for v in _values(specs[2])}
    assert kept == {p["layer"]: (p["filters_before"], p["filters_after"]) for p in log.layer_prunes(pruned["id"])}
    text = " ".join(m.value for m in at.markdown)
    for key, title in (("heldout", "held-out batch"), ("eval_dir", "--eval-dir")):
        assert f"**{title}**: top-1 {metrics[key]['top1']:.4f}, {metrics[key]['images']} images" in text
    heatmaps = [s for s in specs if any("share" in v for v in _values(s))]
    assert len(heatmaps) == 3  # test, held-out and --eval-dir
    for spec, cm in zip(heatmaps, (metrics["confusion_matrix"], metrics["heldout"]["confusion_matrix"],
                                   metrics["eval_dir"]["confusion_matrix"])):
        cells = _values(spec)
        assert sum(c["count"] for c in cells) == sum(map(sum, cm)) and len(cells) == len(cm) ** 2
    recall = [s for s in specs if any("recall" in v for v in _values(s))][0]
    assert {v["class"]: v["recall"] for v in _values(recall)} == {
        c: v["recall"] for c, v in metrics["per_class"].items()}
    latency = _values(specs[-1])  # the run and its parent: median, fastest and slowest round
    lat = {r["id"]: json.loads(r["metrics"])["latency"] for r in (pruned, log.get_run(pruned["parent_id"]))}
    assert lat[pruned["id"]]["interleaved"]
    assert {(v["id"], v["median"], v["low"], v["high"]) for v in latency} == {
        (i, m["ms_per_batch"], min(m["rounds_ms"]), max(m["rounds_ms"])) for i, m in lat.items()}
    assert any(pruned["artifact"] in m.value for m in at.markdown)


def test_run_page_of_a_failed_and_a_compress_run(fixture_log, monkeypatch):
    log = ExperimentLog(fixture_log, readonly=True)
    failed = log.runs(status="failed")[0]
    at = _app(fixture_log, monkeypatch, "Run", run=failed["id"])
    assert at.error[0].value.startswith("failed: ValueError: Expected ratio in [0, 1)")
    assert _metrics(at)["epochs"] == "0" and _metrics(at)["test top-1"] == "–"
    parent, *steps = log.runs("compress")[:3]
    at = _app(fixture_log, monkeypatch, "Run", run=parent["id"])
    assert all(f"?page=Run&run={s['id']}" in at.markdown[1].value for s in steps)
    at = _app(fixture_log, monkeypatch, "Run", run=steps[1]["id"])
    assert _metrics(at)["epochs"] == str(len(log.epochs(steps[1]["id"])))
    assert {e["phase"] for e in _values(_charts(at)[1])} == {"step2"}


def test_compare_page_frontier_seeds_and_differing_fields(fixture_log, monkeypatch):
    log = ExperimentLog(fixture_log, readonly=True)
    compress = log.runs("compress")
    at = _app(fixture_log, monkeypatch, "Compare", experiment="compress")
    frontier = _values(_charts(at)[0])
    points = [v for v in frontier if "segment" not in v]
    assert sorted({p["id"] for p in points}) == [r["id"] for r in compress]
    assert {(s["segment"], s["id"]) for s in frontier if "segment" in s} == {
        (r["id"], i) for r in compress if r["parent_id"] for i in (r["parent_id"], r["id"])}
    groups = at.dataframe[0].value
    parents = [r for r in compress if not r["parent_id"]]
    row = groups[groups["runs"] == ", ".join(f"#{r['id']}" for r in parents)].iloc[0]
    tops = [r["test_top1"] for r in parents]
    assert row["n"] == 2 and row["top-1"] == f"{statistics.fmean(tops):.4f} ± {statistics.stdev(tops):.4f}"
    assert len(groups) == 3  # the compress runs and each of their two steps, over seeds 0 and 1
    spread = next(v for v in _values(_charts(at)[1]) if v["runs"] == row["runs"])  # mean ± std chart
    assert (spread["low"], spread["high"]) == pytest.approx(
        (statistics.fmean(tops) - statistics.stdev(tops), statistics.fmean(tops) + statistics.stdev(tops)))
    diff = at.dataframe[1].value
    assert {"seed", "parent_id", "config.seed", "config.step"} <= set(diff["field"])
    rice = log.runs("rice")
    at = _app(fixture_log, monkeypatch, "Compare", experiment="compress", baselines=parents[1]["id"])
    assert {v["id"] for v in _values(_charts(at)[0])} == {parents[1]["id"], *[r["id"] for r in compress
                                                                               if r["parent_id"] == parents[1]["id"]]}
    at = _app(fixture_log, monkeypatch, "Compare", runs=f"{rice[0]['id']},{rice[1]['id']}")
    assert list(at.dataframe[1].value["field"]) == ["ranker", "pruning_ratio", "parent_id"]
    points = [v for v in _values(_charts(at)[0]) if "segment" not in v]
    assert {(p["id"], p["test_top1"], p["macs"]) for p in points} == {
        (r["id"], r["test_top1"], r["macs"]) for r in rice}


def test_ranker_colours_are_the_same_on_every_page(fixture_log, monkeypatch):
    rows = data.runs(data.open_read_only(fixture_log))
    expected = data.ranker_colours(rows)
    run = _app(fixture_log, monkeypatch, "Run", run=ExperimentLog(fixture_log, readonly=True).runs("rice")[1]["id"])
    compare = _app(fixture_log, monkeypatch, "Compare", experiment="compress")
    scales = [s for at in (run, compare) for c in _charts(at) for s in _scales(json.loads(c.proto.spec))]
    assert len(scales) >= 3 and all(s == (expected[0], expected[1]) for s in scales)
    colour = dict(zip(*expected))
    assert colour["l1"] != colour["baseline"] and len(set(expected[1][:9])) == 9


def test_empty_log_running_row_and_notebook_log(tmp_path, monkeypatch):
    empty = str(tmp_path / "empty.db")
    ExperimentLog(empty).close()
    for page in ("Runs", "Run", "Compare"):
        at = _app(empty, monkeypatch, page)
        assert at.info and "No runs" in at.info[0].value
    running = str(tmp_path / "running.db")
    log = ExperimentLog(running)
    run_id = log.start_run("rice", model="vgg16", seed=3)
    log.log_epoch(run_id, "head", 0, 1.5, {"loss": 2.0, "accuracy": 0.25})
    at = _app(running, monkeypatch, "Runs")
    assert list(at.dataframe[0].value["status"]) == ["running"] and _metrics(at)["best top-1"] == "–"
    at = _app(running, monkeypatch, "Run")
    assert _metrics(at)["epochs"] == "1" and "(running)" in at.header[0].value
    at = _app(running, monkeypatch, "Compare")
    assert "None of these runs has a test accuracy" in at.info[0].value
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    log.update_run(run_id, pid=dead.pid)  # its process is gone: read as interrupted, as `logs list` does
    log.close()
    digest = _sha(running)
    at = _app(running, monkeypatch, "Runs")
    assert list(at.dataframe[0].value["status"]) == ["interrupted"]
    assert _sha(running) == digest  # not marked in the file: a writer would have (see ExperimentLog)
    notebook = str(tmp_path / "notebook.db")
    run_id = save_training_log_to_sqlite([1.25, 1.5, 1.75], "vgg16_pruned", 0.3, 0.91, db_path=notebook)
    at = _app(notebook, monkeypatch, "Runs")
    assert list(at.dataframe[0].value["id"]) == [run_id] and _metrics(at)["best top-1"] == "0.9100"
    at = _app(notebook, monkeypatch, "Run", run=run_id)
    assert _metrics(at)["epochs"] == "3"
    assert [v["seconds"] for v in _values(_charts(at)[0])] == [1.25, 1.5, 1.75]
    _app(notebook, monkeypatch, "Compare")


def test_shows_runs_written_while_open_and_survives_a_write(fixture_log, tmp_path, monkeypatch):
    db = str(tmp_path / "live.db")
    shutil.copy(fixture_log, db)
    at = _app(db, monkeypatch, "Runs")
    before = len(at.dataframe[0].value)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a run being written: the write lock is held, nothing committed yet
    writer.execute("INSERT INTO runs (experiment, status, started_at) VALUES ('rice', 'running', 'now')")
    at.run()
    assert not at.exception and len(at.dataframe[0].value) == before
    writer.execute("COMMIT")
    writer.close()
    at.run()  # a refresh
    assert len(at.dataframe[0].value) == before + 1 and "running" in set(at.dataframe[0].value["status"])


def test_log_unchanged_and_read_only_copy(fixture_log, tmp_path, monkeypatch):
    pages = (("Runs", {}), ("Run", {"run": 2}), ("Compare", {}))
    expected = len(ExperimentLog(fixture_log, readonly=True).runs())
    db = str(tmp_path / "log.db")
    shutil.copy(fixture_log, db)
    digest = _sha(db)
    for page, params in pages:
        _app(db, monkeypatch, page, **params)
    assert _sha(db) == digest
    folder = tmp_path / "ro"  # a read-only copy: file 0444 in a 0555 folder, no -wal or -shm beside it
    folder.mkdir()
    db = str(folder / "log.db")
    shutil.copy(fixture_log, db)
    os.chmod(db, 0o444)
    os.chmod(folder, 0o555)
    try:
        for page, params in pages:
            at = _app(db, monkeypatch, page, **params)
            assert not at.error
            if page == "Runs":
                assert len(at.dataframe[0].value) == expected
        assert len(data.runs(data.open_read_only(db))) == expected
        assert _sha(db) == digest
        if os.geteuid() != 0:  # root ignores the modes, so SQLite may add its -shm there
            assert os.listdir(folder) == ["log.db"]
    finally:
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("content, message", [
    (None, "No experiment log at"),
    (b"not a database, just text" * 100, "is not an SQLite database"),
    ("foreign", "is not an experiment log of this toolkit"),
])
def test_bad_log_is_the_same_one_line_error_as_logs(tmp_path, monkeypatch, content, message):
    db = str(tmp_path / "x.db")
    if content == "foreign":
        sqlite3.connect(db).execute("CREATE TABLE runs (a)").connection.close()
    elif content is not None:
        open(db, "wb").write(content)
    digest = _sha(db) if content is not None else None
    dash = CliRunner().invoke(cli, ["dashboard", "--db", db, "--port", "1"])
    logs = CliRunner().invoke(cli, ["logs", "list", "--db", db])
    assert dash.exit_code == logs.exit_code == 1
    assert dash.output == logs.output and message in dash.output and len(dash.output.strip().splitlines()) == 1
    monkeypatch.setattr(sys, "argv", ["app.py", "--db", db])
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert message in at.error[0].value and not at.exception
    assert (_sha(db) if content is not None else os.path.exists(db)) == (digest or False)


def test_dashboard_without_the_extra_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "streamlit" else real(name, *a))
    r = CliRunner().invoke(cli, ["dashboard", "--db", "whatever.db"])
    assert r.exit_code == 2 and 'pip install -e ".[dashboard]"' in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["dashboard", "--port", "0"])
    assert r.exit_code == 2 and "--port" in r.output


# ------------------------------------------------------------------- browser
@pytest.mark.skipif(browser.browser_missing() is not None, reason=f"no headless browser: {browser.browser_missing()}")
def test_every_page_in_headless_chromium(fixture_log, tmp_path):
    db = str(tmp_path / "log.db")
    shutil.copy(fixture_log, db)
    digest = _sha(db)
    rows = ExperimentLog(fixture_log, readonly=True).runs()
    pruned = next(r for r in rows if r["parent_id"] and r["experiment"] == "rice")
    with browser.serve(db, log_file=str(tmp_path / "server.log")) as url, browser.chrome() as driver:
        from selenium.webdriver.common.by import By

        assert url.startswith("http://127.0.0.1:")
        text = browser.load(driver, f"{url}/?page=Runs", chart=False)
        assert all(f"#{r['id']} {r['experiment']}" in text for r in rows)
        assert "ValueError: Expected ratio in [0, 1)" in text
        browser.screenshot(driver, str(tmp_path / "runs.png"))
        text = browser.load(driver, f"{url}/?page=Run&run={pruned['id']}")
        assert f"#{pruned['id']} rice l1 0.5, seed" in text and f"{pruned['test_top1']:.4f}" in text
        assert len(driver.find_elements(By.CSS_SELECTOR, browser.CHART)) >= 6
        browser.screenshot(driver, str(tmp_path / "run.png"))
        text = browser.load(driver, f"{url}/?page=Compare&experiment=rice")
        assert "Accuracy against size and speed" in text and f"#{pruned['id']}" in text
        assert driver.find_elements(By.CSS_SELECTOR, browser.CHART)
        browser.screenshot(driver, str(tmp_path / "compare.png"))
        assert _sha(db) == digest
        log = ExperimentLog(db)  # a run written while the dashboard is open: a reload shows it
        new = log.start_run("prune", model="new.keras", ranker="taylor", seed=7)
        log.close()
        text = browser.load(driver, f"{url}/?page=Runs", chart=False)
        assert f"#{new} prune taylor, seed 7 (running)" in text
    served = open(tmp_path / "server.log").read()  # bound to 127.0.0.1 without --host
    assert f"URL: http://127.0.0.1:{url.rsplit(':', 1)[1]}" in served and "0.0.0.0" not in served  # Streamlit's
    for name in ("runs.png", "run.png", "compare.png"):
        assert open(tmp_path / name, "rb").read(4) == b"\x89PNG"
