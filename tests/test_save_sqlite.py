import json
import multiprocessing
import sqlite3

import keras
import numpy as np
import pytest

from pruning import TimeHistory
import save_sqlite
from save_sqlite import (ENV_VAR, MIGRATIONS, ExperimentLog, Migration, default_db_path, migrate,
                         save_training_log_to_sqlite)

# The reference notebook's table, as its save_training_log_to_sqlite created it.
REFERENCE_SQL = """
CREATE TABLE IF NOT EXISTS training_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_name TEXT,
    pruning_ratio REAL,
    test_accuracy REAL,
    epoch_times TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)"""


def test_migrations_on_empty_file(tmp_path):
    log = ExperimentLog(str(tmp_path / "new.db"))
    assert log.applied == [m.name for m in MIGRATIONS]
    assert {"runs", "epochs", "layer_prunes", "_migrations"} <= set(log.db.table_names())
    assert "training_logs" in log.db.view_names()
    assert log.db.journal_mode == "wal"
    log.close()
    assert ExperimentLog(str(tmp_path / "new.db")).applied == []  # applied once only


def test_migrates_a_database_written_by_the_reference_function(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute(REFERENCE_SQL)
    conn.execute("INSERT INTO training_logs (model_name, pruning_ratio, test_accuracy, epoch_times) "
                 "VALUES ('vgg16_pruned', 0.1, 0.986, '[12.5, 11.0, 10.75]')")
    conn.commit()
    conn.close()
    log = ExperimentLog(path)
    (run,) = log.runs()
    assert (run["model"], run["pruning_ratio"], run["test_top1"], run["status"]) == \
        ("vgg16_pruned", 0.1, 0.986, "completed")
    assert [e["seconds"] for e in log.epochs(run["id"])] == [12.5, 11.0, 10.75]
    row = log.db.execute("SELECT model_name, epoch_times FROM training_logs").fetchone()
    assert row[0] == "vgg16_pruned" and json.loads(row[1]) == [12.5, 11.0, 10.75]


def _old_positional_database(path):
    """A log as the first, positional migration list wrote it: `_migrations` rows
    (1, m001...), (2, m002...) keyed by position, no pid/run_dir columns."""
    import sqlite_utils

    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("CREATE TABLE _migrations (id INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    for number, m in enumerate(MIGRATIONS[:2], start=1):
        m.fn(db)
        conn.execute("INSERT INTO _migrations (id, name, applied_at) VALUES (?, ?, '2025-01-01')",
                     (number, m.name))
    db["runs"].insert({"experiment": "rice", "status": "running", "started_at": "2025-01-01", "host": "h"})
    db["runs"].insert({"experiment": "rice", "status": "completed", "started_at": "2025-01-01",
                       "test_top1": 0.9})
    conn.close()


def test_old_positional_database_opens_and_migrates_by_name(tmp_path):
    path = str(tmp_path / "old.db")
    _old_positional_database(path)
    log = ExperimentLog(path)
    assert log.applied == [m.name for m in MIGRATIONS[2:]]  # m001/m002 recognised by their stored names
    assert [r["status"] for r in log.runs()] == ["running", "completed"]  # no pid: not guessed dead
    assert {"pid", "run_dir"} <= set(log.db["runs"].columns_dict)
    names = [r[0] for r in log.db.execute("SELECT name FROM _migrations ORDER BY id")]
    assert names == [m.name for m in MIGRATIONS]
    assert ExperimentLog(path).applied == []


def test_inserted_and_renamed_migrations(tmp_path):
    path = str(tmp_path / "m.db")
    _old_positional_database(path)
    log = ExperimentLog(path)
    calls = []

    def m002b_inserted(db):
        calls.append("inserted")
        db["runs"].add_column("note", str)

    def m003_renamed(db):  # m003_run_pid_and_folder under a new name: must not run again
        calls.append("renamed")
        db["runs"].add_column("pid", int)  # would fail: the column exists

    new_list = [MIGRATIONS[0], MIGRATIONS[1], Migration("m002b_inserted", m002b_inserted),
                Migration("m003_renamed", m003_renamed, aliases=("m003_run_pid_and_folder",))]
    assert migrate(log.db, new_list) == ["m002b_inserted"]
    assert calls == ["inserted"] and "note" in log.db["runs"].columns_dict
    assert migrate(log.db, new_list) == []  # each applied once
    assert calls == ["inserted"]


def test_reference_function_writes_a_run(tmp_path):
    cb = TimeHistory()
    cb.times = [1.5, 2.5]
    path = str(tmp_path / "ref.db")
    run_id = save_training_log_to_sqlite(cb, "vgg16", 0.2, 0.97, db_path=path)
    log = ExperimentLog(path)
    assert log.get_run(run_id)["test_top1"] == 0.97
    row = log.db.execute("SELECT model_name, pruning_ratio, epoch_times FROM training_logs").fetchone()
    assert row[0] == "vgg16" and row[1] == 0.2 and json.loads(row[2]) == [1.5, 2.5]


def test_db_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.db"))
    assert default_db_path() == str(tmp_path / "env.db")
    ExperimentLog().close()
    assert (tmp_path / "env.db").exists()


class Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("disk full")


def test_crash_inside_fit_marks_run_failed_and_keeps_epochs(tmp_path):
    log = ExperimentLog(str(tmp_path / "crash.db"))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.rand(16, 3), np.random.randint(0, 2, 16)
    with pytest.raises(RuntimeError, match="disk full"):
        with log.run("unit", model="dense", seed=7, config={"epochs": 5}) as run:
            # The logger runs before Boom, so epochs 0 and 1 are written before the crash.
            logger = run.callback("train")
            model.fit(x, y, epochs=5, verbose=0, callbacks=[logger, Boom()])
    (row,) = log.runs()
    assert row["status"] == "failed" and "disk full" in row["error"]
    assert json.loads(row["config"]) == {"epochs": 5} and row["seed"] == 7
    epochs = log.epochs(row["id"])
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["seconds"] > 0 and e["loss"] is not None and e["lr"] == pytest.approx(0.01)
               for e in epochs)
    assert isinstance(logger, TimeHistory) and [e["seconds"] for e in epochs] == logger.times


def test_interrupted_and_completed(tmp_path):
    log = ExperimentLog(str(tmp_path / "s.db"))
    with pytest.raises(KeyboardInterrupt):
        with log.run("unit"):
            raise KeyboardInterrupt
    with log.run("unit", parent_id=1) as run:
        run.finish(test_top1=0.5, params=10)
    a, b = log.runs()
    assert a["status"] == "interrupted"
    assert (b["status"], b["parent_id"], b["params"]) == ("completed", 1, 10)
    with pytest.raises(ValueError, match="Unknown run fields"):
        log.update_run(b["id"], accuracy=1)


def _writer(path, name, n):
    log = ExperimentLog(path)
    with log.run("concurrent", model=name) as run:
        for i in range(n):
            log.log_epoch(run.id, "train", i, 0.01 * i, {"loss": 1.0 / (i + 1)})
        run.finish(test_top1=0.1)


def test_two_concurrent_writers_both_land(tmp_path):
    path = str(tmp_path / "c.db")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"w{i}", 200)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = ExperimentLog(path)
    runs = log.runs("concurrent")
    assert sorted(r["model"] for r in runs) == ["w0", "w1"]
    assert all(r["status"] == "completed" and len(log.epochs(r["id"])) == 200 for r in runs)


def test_callback_lives_next_to_time_history_and_is_re_exported():
    from pruning.callbacks import SQLiteLogger as Canonical

    assert save_sqlite.SQLiteLogger is Canonical and issubclass(Canonical, TimeHistory)


def test_an_epoch_logged_again_after_a_resume_replaces_its_row(tmp_path):
    from pruning import PrunePlan

    log = ExperimentLog(str(tmp_path / "u.db"))
    run_id = log.start_run("unit")
    for loss in (1.0, 0.5):  # epoch 1 ran, was logged, then the process died before its backup
        log.log_epoch(run_id, "train", 0, 1.0, {"loss": 2.0})
        log.log_epoch(run_id, "train", 1, 1.0, {"loss": loss})
    log.log_epoch(run_id, "other", 1, 1.0)
    assert [(e["phase"], e["epoch"], e["loss"]) for e in log.epochs(run_id)] == \
        [("train", 0, 2.0), ("train", 1, 0.5), ("other", 1, None)]
    for _ in range(2):
        log.log_layer_prunes(run_id, PrunePlan({"c1": [0, 1]}, {"c1": 4}), "l1")
    assert [(p["layer"], p["filters_after"]) for p in log.layer_prunes(run_id)] == [("c1", 2)]


def test_query_helper_knows_its_tables(tmp_path):
    log = ExperimentLog(str(tmp_path / "q.db"))
    with log.run("unit") as run:
        run.finish(test_top1=0.5)
    columns, rows = log.rows("runs")
    assert "pid" in columns and rows[0]["test_top1"] == 0.5 and rows[0]["pid"] == __import__("os").getpid()
    with pytest.raises(ValueError, match="Expected table in"):
        log.rows("sqlite_master")


def test_layer_prunes_failing_midway_keep_the_earlier_rows(tmp_path, monkeypatch):
    from pruning import PrunePlan

    log = ExperimentLog(str(tmp_path / "log.db"))
    with log.run("prune") as run:
        log.log_layer_prunes(run.id, PrunePlan({"c1": [0, 1], "c2": [0]}, {"c1": 4, "c2": 2}), "l1")
        before = log.layer_prunes(run.id)
        table = type(log.db["layer_prunes"])
        insert_all = table.insert_all

        def first_row_then_fail(self, rows, *args, **kwargs):
            insert_all(self, list(rows)[:1], *args, **kwargs)  # one new row lands, then the write fails
            raise RuntimeError("disk gone")

        monkeypatch.setattr(table, "insert_all", first_row_then_fail)
        with pytest.raises(RuntimeError, match="disk gone"):
            log.log_layer_prunes(run.id, PrunePlan({"c1": [0], "c2": [1]}, {"c1": 4, "c2": 2}), "l1")
        monkeypatch.undo()
        assert log.layer_prunes(run.id) == before  # neither the delete nor the first new row stayed
        assert [(p["layer"], p["filters_after"]) for p in before] == [("c1", 2), ("c2", 1)]
