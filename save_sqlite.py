"""The experiment log: every run, epoch and pruned layer in one SQLite file.

    log = ExperimentLog("logs/experiments.db")
    with log.run(experiment="rice", model="vgg16", seed=0, config=cfg) as run:
        model.fit(..., callbacks=[run.callback("head")])
        run.finish(test_top1=0.99, params=..., macs=...)

The schema is created and changed only by the numbered migrations below, applied
in order when a database is opened. The file uses WAL journaling, so reports can
read it while runs write, and every write is its own short transaction, so two
processes can log at once and a run that dies keeps the epochs it finished.

The reference notebook's `save_training_log_to_sqlite(...)` keeps working.
"""

import datetime
import json
import os
import platform
import sqlite3
import traceback
from contextlib import contextmanager

import keras
import sqlite_utils

from pruning.callbacks import TimeHistory

ENV_VAR = "PRUNING_DB"
DEFAULT_DB = os.path.join("logs", "experiments.db")
STATUSES = ("running", "completed", "failed", "interrupted")


def default_db_path():
    """`$PRUNING_DB` if set, else logs/experiments.db."""
    return os.environ.get(ENV_VAR) or DEFAULT_DB


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ migrations
MIGRATIONS = []


def migration(fn):
    """Registers a migration; its number is its position (1-based)."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_runs_epochs_layer_prunes(db):
    db["runs"].create({
        "id": int, "experiment": str, "model": str, "dataset": str, "ranker": str,
        "pruning_ratio": float, "rates": str, "parent_id": int, "seed": int, "config": str,
        "status": str, "error": str, "started_at": str, "ended_at": str,
        "test_top1": float, "test_top5": float, "test_loss": float,
        "params": int, "trainable_params": int, "macs": int, "latency_ms": float,
        "metrics": str, "artifact": str, "version": str, "host": str,
    }, pk="id", not_null={"experiment", "status", "started_at"},
        defaults={"status": "running"}, foreign_keys=[("parent_id", "runs", "id")])
    db["epochs"].create({
        "id": int, "run_id": int, "phase": str, "epoch": int, "seconds": float,
        "loss": float, "accuracy": float, "val_loss": float, "val_accuracy": float,
        "lr": float, "logs": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "runs", "id")])
    db["layer_prunes"].create({
        "id": int, "run_id": int, "layer": str, "filters_before": int, "filters_after": int,
        "ranker": str,
    }, pk="id", foreign_keys=[("run_id", "runs", "id")])
    db["epochs"].create_index(["run_id"])
    db["layer_prunes"].create_index(["run_id"])
    db["runs"].create_index(["experiment"])


@migration
def m002_training_logs_view(db):
    """Moves rows of the reference notebook's `training_logs` table into runs/epochs and
    replaces the table by a view with the reference columns."""
    if "training_logs" in db.table_names():
        legacy = db["training_logs"]
        cols = set(legacy.columns_dict)
        model_col = "model_name" if "model_name" in cols else "model"
        for row in legacy.rows:
            times = _json_list(row.get("epoch_times"))
            run_id = db["runs"].insert({
                "experiment": "notebook", "model": row.get(model_col),
                "pruning_ratio": row.get("pruning_ratio"), "test_top1": row.get("test_accuracy"),
                "status": "completed", "started_at": row.get("created_at") or now(),
                "ended_at": row.get("created_at"), "config": json.dumps({"imported_from": "training_logs"}),
            }).last_pk
            db["epochs"].insert_all(
                {"run_id": run_id, "phase": "train", "epoch": i, "seconds": s} for i, s in enumerate(times)
            )
        db.execute("DROP TABLE training_logs")
    db.execute("""
        CREATE VIEW training_logs AS
        SELECT r.id AS id, r.model AS model_name, r.pruning_ratio AS pruning_ratio,
               r.test_top1 AS test_accuracy,
               (SELECT json_group_array(seconds) FROM
                   (SELECT e.seconds FROM epochs e WHERE e.run_id = r.id ORDER BY e.id)) AS epoch_times,
               r.started_at AS created_at
        FROM runs r
    """)


def _json_list(text):
    try:
        value = json.loads(text) if text else []
    except (TypeError, ValueError):
        return []
    return [float(v) for v in value] if isinstance(value, list) else []


def migrate(db):
    """Applies the migrations not yet recorded in `_migrations`; returns their names."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    applied = []
    # One writer at a time: BEGIN IMMEDIATE takes the write lock before reading what is applied.
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = {r[0] for r in conn.execute("SELECT id FROM _migrations")}
        for number, fn in enumerate(MIGRATIONS, start=1):
            if number in done:
                continue
            fn(db)
            conn.execute("INSERT INTO _migrations (id, name, applied_at) VALUES (?, ?, ?)",
                         (number, fn.__name__, now()))
            applied.append(fn.__name__)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


# ------------------------------------------------------------------------ log
class ExperimentLog:
    """An open experiment database (created and migrated as needed).

    Args:
        path: the SQLite file; default `$PRUNING_DB` or logs/experiments.db.
    """

    def __init__(self, path=None):
        self.path = path or default_db_path()
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        # Autocommit: each statement is its own transaction unless one is begun;
        # a 60 s busy timeout lets concurrent runs wait for each other's writes.
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        self.applied = migrate(self.db)

    def close(self):
        self.db.conn.close()

    # ---------------------------------------------------------------- writes
    def start_run(self, experiment, model=None, dataset=None, ranker=None, pruning_ratio=None,
                  rates=None, parent_id=None, seed=None, config=None):
        """Inserts a run with status 'running'; returns its id."""
        from pruning import __version__

        return self.db["runs"].insert({
            "experiment": experiment, "model": model, "dataset": dataset, "ranker": ranker,
            "pruning_ratio": pruning_ratio, "rates": _dumps(rates), "parent_id": parent_id,
            "seed": seed, "config": _dumps(config or {}), "status": "running",
            "started_at": now(), "version": __version__, "host": platform.node(),
        }).last_pk

    def log_epoch(self, run_id, phase, epoch, seconds, logs=None, lr=None):
        logs = {k: _plain(v) for k, v in (logs or {}).items()}
        self.db["epochs"].insert({
            "run_id": run_id, "phase": phase, "epoch": int(epoch), "seconds": float(seconds),
            "loss": logs.get("loss"), "accuracy": _first(logs, "accuracy", "categorical_accuracy", "acc"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": _first(logs, "val_accuracy", "val_categorical_accuracy", "val_acc"),
            "lr": lr if lr is not None else logs.get("learning_rate"), "logs": json.dumps(logs),
            "created_at": now(),
        })

    def log_layer_prunes(self, run_id, plan, ranker=None):
        """One row per conv the plan touches: filters before and after."""
        self.db["layer_prunes"].insert_all({
            "run_id": run_id, "layer": name, "filters_before": plan.filters.get(name, len(keep)),
            "filters_after": len(keep), "ranker": ranker,
        } for name, keep in plan.keep.items())

    def update_run(self, run_id, **fields):
        for key in ("metrics", "config", "rates"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = _dumps(fields[key])
        unknown = set(fields) - set(self.db["runs"].columns_dict)
        if unknown:
            raise ValueError(f"Unknown run fields: {sorted(unknown)}. Expected some of: "
                             f"{sorted(self.db['runs'].columns_dict)}")
        self.db["runs"].update(run_id, {k: _plain(v) for k, v in fields.items()})

    def finish_run(self, run_id, status="completed", **fields):
        if status not in STATUSES:
            raise ValueError(f"Expected status in {STATUSES}. Received: status={status!r}")
        self.update_run(run_id, status=status, ended_at=now(), **fields)

    @contextmanager
    def run(self, experiment, **kwargs):
        """A run that is marked completed, failed (with the error) or interrupted."""
        handle = Run(self, self.start_run(experiment, **kwargs))
        try:
            yield handle
        except KeyboardInterrupt:
            self.finish_run(handle.id, "interrupted", error="KeyboardInterrupt")
            raise
        except BaseException as e:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
            self.finish_run(handle.id, "failed", error=f"{type(e).__name__}: {e}\n{tb}")
            raise
        else:
            if not handle.finished:
                self.finish_run(handle.id, "completed")

    # ----------------------------------------------------------------- reads
    def runs(self, experiment=None, status=None):
        where, args = [], []
        if experiment:
            where.append("experiment = ?")
            args.append(experiment)
        if status:
            where.append("status = ?")
            args.append(status)
        return list(self.db["runs"].rows_where(" AND ".join(where) or None, args, order_by="id"))

    def get_run(self, run_id):
        try:
            return self.db["runs"].get(run_id)
        except sqlite_utils.db.NotFoundError:
            raise ValueError(f"No run with id {run_id} in {self.path}.") from None

    def epochs(self, run_id):
        return list(self.db["epochs"].rows_where("run_id = ?", [run_id], order_by="id"))

    def layer_prunes(self, run_id):
        return list(self.db["layer_prunes"].rows_where("run_id = ?", [run_id], order_by="id"))


class Run:
    """A handle on one running run: its id, a Keras callback, and finish()."""

    def __init__(self, log, run_id):
        self.log = log
        self.id = run_id
        self.finished = False

    def callback(self, phase="train"):
        return SQLiteLogger(self.log, self.id, phase)

    def finish(self, **fields):
        self.log.finish_run(self.id, "completed", **fields)
        self.finished = True


class SQLiteLogger(TimeHistory):
    """A `TimeHistory` that also writes every epoch to the log as it ends: seconds,
    metrics and learning rate."""

    def __init__(self, log, run_id, phase="train"):
        super().__init__()
        self.log, self.run_id, self.phase = log, run_id, phase

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.log.log_epoch(self.run_id, self.phase, epoch, self.times[-1], logs, lr=_current_lr(self.model))


def _current_lr(model):
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # no optimizer, or one without a readable rate
        return None


def _first(d, *keys):
    return next((d[k] for k in keys if k in d), None)


def _plain(v):
    """Numpy / tensor scalars to Python numbers for SQLite and JSON."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if hasattr(v, "numpy"):
        return _plain(v.numpy())
    return v


def _dumps(value):
    return None if value is None else json.dumps(value, default=_plain)


# -------------------------------------------------------- reference function
def save_training_log_to_sqlite(time_callback, model_name, pruning_ratio, test_accuracy, db_path=None):
    """The reference notebook's entry point: one finished run with its epoch times.

    Args:
        time_callback: a `TimeHistory` (its `.times`) or a list of epoch seconds.
        model_name, pruning_ratio, test_accuracy: as in the notebook.
        db_path: the database (default `$PRUNING_DB` or logs/experiments.db).
    Returns the run id.
    """
    times = list(getattr(time_callback, "times", time_callback))
    log = ExperimentLog(db_path)
    try:
        run_id = log.start_run("notebook", model=model_name, pruning_ratio=pruning_ratio,
                               config={"source": "save_training_log_to_sqlite"})
        for i, s in enumerate(times):
            log.log_epoch(run_id, "train", i, s)
        log.finish_run(run_id, test_top1=test_accuracy)
    finally:
        log.close()
    return run_id
