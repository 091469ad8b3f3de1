"""The experiment log: every run, epoch and pruned layer in one SQLite file.

    log = ExperimentLog("logs/experiments.db")
    with log.run(experiment="rice", model="vgg16", seed=0, config=cfg) as run:
        model.fit(..., callbacks=[run.callback("head")])
        run.finish(test_top1=0.99, params=..., macs=...)

The schema is created and changed only by the named migrations below; a database
records the names it has applied in `_migrations`, so inserting or renaming one
never skips or repeats another. The file uses WAL journaling, so reports can read
it while runs write, and every write is its own short transaction, so two
processes can log at once and a run that dies keeps the epochs it finished.

Each run records its host and process id; opening the log for writing marks a
`running` row whose process is gone as `interrupted`, and `log.resume(run_id)`
takes such a run up again in the same row. Read commands open the file
read-only (`ExperimentLog(path, readonly=True)`): they never create, migrate or
alter it.

This module imports no TensorFlow (the CLI reads it for `--help`). The Keras
callback lives in `pruning.callbacks` (next to `TimeHistory`) and is re-exported
here, as is the reference notebook's `save_training_log_to_sqlite(...)`.
"""

import contextlib
import datetime
import errno
import json
import os
import platform
import signal
import sqlite3
import threading
import time
import traceback
import urllib.parse
from contextlib import contextmanager
from typing import Callable, NamedTuple, Tuple

import sqlite_utils

from experiments.files import process_alive, remove_partial_files

ENV_VAR = "PRUNING_DB"
DEFAULT_DB = os.path.join("logs", "experiments.db")
STATUSES = ("running", "completed", "failed", "interrupted")
# Tables and views of the log a user may export (the CLI's `logs export --table`).
TABLES = ("runs", "epochs", "layer_prunes", "training_logs", "runs_now")
OWN_TABLES = ("runs", "epochs", "layer_prunes")


def default_db_path():
    """`$PRUNING_DB` if set, else logs/experiments.db."""
    return os.environ.get(ENV_VAR) or DEFAULT_DB


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ migrations
class Migration(NamedTuple):
    name: str  # the key recorded in `_migrations`
    fn: Callable
    aliases: Tuple[str, ...] = ()  # earlier names of the same migration


MIGRATIONS = []


def migration(fn=None, *, aliases=()):
    """Registers a migration under its function name. A renamed migration lists its
    old names in `aliases`, so databases that applied it under an old name skip it."""
    def register(f):
        MIGRATIONS.append(Migration(f.__name__, f, tuple(aliases)))
        return f
    return register(fn) if fn is not None else register


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


@migration
def m003_run_pid_and_folder(db):
    """The process that runs a run (with `host`, to tell a live run from a dead one)
    and the run's artifact folder (to resume it)."""
    db["runs"].add_column("pid", int)
    db["runs"].add_column("run_dir", str)


@migration
def m004_run_outputs(db):
    """Files a run wrote outside its folder (a copy of its model, its plan, results):
    a JSON object {absolute path: kind}, so no later command replaces them."""
    db["runs"].add_column("outputs", str)


STALE_AFTER_S = 180  # a running row whose heartbeat is older reads as `stale` in the runs_now view
HEARTBEAT_S = 30  # how often a live run's heartbeat is written


@migration
def m005_run_heartbeat_and_runs_now(db):
    """`heartbeat`: when a running run last said it is alive (every HEARTBEAT_S while it
    runs). The view `runs_now` is `runs` plus `status_now`: a running row whose heartbeat
    (or start, before the first) is older than STALE_AFTER_S reads `stale`, so a SQL
    reader tells a dead run without anyone writing the log."""
    db["runs"].add_column("heartbeat", str)
    db.execute(f"""
        CREATE VIEW runs_now AS
        SELECT CASE WHEN status = 'running' AND
                         (julianday('now') - julianday(coalesce(heartbeat, started_at))) * 86400 > {STALE_AFTER_S}
                    THEN 'stale' ELSE status END AS status_now, *
        FROM runs
    """)


def _json_list(text):
    try:
        value = json.loads(text) if text else []
    except (TypeError, ValueError):
        return []
    return [float(v) for v in value] if isinstance(value, list) else []


def applied_migrations(conn):
    """Names recorded in `_migrations` (empty when the table does not exist)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = '_migrations'").fetchone():
        return set()
    return {r[0] for r in conn.execute("SELECT name FROM _migrations")}


def migrate(db, migrations=None):
    """Applies the migrations whose name (or an alias) is not yet in `_migrations`, in
    list order; returns their names."""
    migrations = MIGRATIONS if migrations is None else migrations
    conn = db.conn
    # The table of the first, positional version of this module: ids are kept, names are the key.
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    applied = []
    # One writer at a time: BEGIN IMMEDIATE takes the write lock before reading what is applied.
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = applied_migrations(conn)
        for m in migrations:
            if m.name in done or done.intersection(m.aliases):
                continue
            m.fn(db)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (m.name, now()))
            applied.append(m.name)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


# ------------------------------------------------------------- failing writes
WRITE_TIMEOUT_S = 60.0  # how long one write retries a locked or full log before it is kept for later
WRITE_TIMEOUT_VAR = "PRUNING_DB_WRITE_TIMEOUT"  # seconds, instead of WRITE_TIMEOUT_S


class LogUnavailable(ValueError):
    """The log could not be written for the whole retry time: one line with the cause."""


def write_failure(e):
    """The cause of a failed log write in words, or None when the error is not one that
    can pass (a lock held by another process, a full disk, an I/O error)."""
    text = str(e).lower()
    if isinstance(e, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return f"it is locked by another process ({e})"
        if "full" in text:
            return f"the disk is full ({e})"
        if "disk i/o" in text:
            return f"the disk failed to write ({e})"
        return None
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return ("the disk is full" if e.errno != errno.EIO else "the disk failed to write") + f" ({e})"
    return None


def log_error_hint(e):
    """The one hint that fits why the log cannot be opened for writing."""
    cause = write_failure(e)
    if cause and "locked" in cause:
        return f"{cause}; wait for the other process, or pass another --db"
    if cause:
        return f"{cause}; free space on its disk, or pass another --db"
    return f"{e}; check the permissions of the file and its folder, or pass another --db"


def open_read_only(path):
    """Opens the SQLite file `path` for reading only; returns (connection, immutable).

    The file is opened with `mode=ro` (it sees the writes of running runs). On read-only
    media (an archived log, a read-only mount) a WAL file cannot be opened that way
    (SQLite needs to create its `-shm` file beside it); it is then opened with
    `immutable=1` and `immutable` is True: nothing can change it there, but a process
    that writes it elsewhere is not seen. A missing file, or one that is not SQLite, is
    a ValueError naming it. Nothing is ever created or changed.
    """
    if not os.path.isfile(path):
        raise ValueError(f"No experiment log at {path!r}. Pass --db or set ${ENV_VAR} to an "
                         "existing log; training commands create one.")
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}"
    for immutable in (False, True):
        conn = sqlite3.connect(f"{uri}?{'immutable=1' if immutable else 'mode=ro'}", uri=True, timeout=60,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn, immutable
        except sqlite3.OperationalError:
            conn.close()
            if immutable or os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
                raise  # not read-only media: the caller says why
        except sqlite3.DatabaseError as e:
            conn.close()
            raise ValueError(f"{path!r} is not an SQLite database ({e}).") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so a run ends as `interrupted`."""


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main
    thread, unless the program already handles SIGTERM itself."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------------ log
class ExperimentLog:
    """An open experiment database.

    Args:
        path: the SQLite file; default `$PRUNING_DB` or logs/experiments.db.
        readonly: open an existing log read-only (for reading commands): a missing
            file, a file that is not SQLite, or one without this toolkit's tables is
            a ValueError, and nothing is created, migrated or changed.
        write_timeout: seconds a write retries (with backoff) while the log is locked
            by another process or its disk is full; default `$PRUNING_DB_WRITE_TIMEOUT`
            or 60. A write that still fails is kept in memory and written with the next
            one that succeeds, or at the end of the run (`run`); if the log never takes
            it, the run ends with a `LogUnavailable` naming the cause and the model.

    For writing, the file (and its folder) is created and migrated as needed, and
    `running` rows of dead processes on this host become `interrupted`.
    """

    def __init__(self, path=None, readonly=False, write_timeout=None):
        self.path = path or default_db_path()
        self.readonly = readonly
        value = write_timeout if write_timeout is not None else os.environ.get(WRITE_TIMEOUT_VAR) or WRITE_TIMEOUT_S
        try:
            self.write_timeout = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Expected write_timeout (${WRITE_TIMEOUT_VAR}) in seconds. Received: {value!r}") from None
        self.pending = []  # writes that failed for write_timeout: retried before the next one, and at the end
        self.failure = None  # why the last of them failed (write_failure's words)
        self._depth = 0  # nesting of `run` blocks
        self._reserved = 0  # the last run id taken while the log could not be written
        self._moved = {}  # such an id -> the id its row got, when another process took it meanwhile
        self._beating, self._heart = set(), None  # runs whose heartbeat the heartbeat thread writes
        self.applied = []
        self.immutable = False  # opened read-only with immutable=1 (read-only media)
        self.db = sqlite_utils.Database(self._connect())
        try:
            tables = set(self.db.table_names())
        except sqlite3.DatabaseError as e:
            self.close()
            raise ValueError(f"{self.path!r} is not an SQLite database ({e}).") from None
        self._check_ours(tables)
        self._check_intact()
        if readonly:
            return
        try:
            self._retry(lambda: (self.db.enable_wal(), setattr(self, "applied", migrate(self.db))),
                        self.write_timeout)
            self.interrupted = self._retry(self.mark_dead_runs, self.write_timeout)
        except (sqlite3.OperationalError, OSError) as e:
            self.close()
            raise ValueError(f"Cannot write to the experiment log {self.path!r}: {log_error_hint(e)}.") from None

    def _connect(self):
        path = os.path.abspath(self.path)
        if self.readonly:
            try:
                conn, self.immutable = open_read_only(self.path)
            except sqlite3.OperationalError as e:
                raise ValueError(f"Cannot read the experiment log {self.path!r}: {e}.") from None
            return conn
        if os.path.isdir(path):
            raise ValueError(f"Expected an SQLite file for the log. Received a folder: {self.path!r}")
        folder = os.path.dirname(path)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"Cannot create the experiment log {self.path!r}: {folder!r} is a file, not a folder.")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"Cannot create the folder of the experiment log {folder!r}: "
                             f"{e.strerror}.") from None
        if not os.path.exists(path) and not os.access(folder, os.W_OK):
            raise ValueError(f"Cannot create the experiment log {self.path!r}: folder {folder!r} is "
                             "not writable.")
        # Autocommit: each statement is its own transaction unless one is begun. Each write
        # waits at most a second inside SQLite; `_retry` waits up to write_timeout, with backoff,
        # so concurrent runs wait for each other's writes.
        try:
            return sqlite3.connect(path, timeout=min(1.0, self.write_timeout), isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise ValueError(f"Cannot open the experiment log {self.path!r}: {e}.") from None

    def _check_ours(self, tables):
        """A file with our table names but no `_migrations` was made by something else."""
        mine = "_migrations" in tables and not (set(OWN_TABLES) - tables)
        if mine or (not self.readonly and not tables & set(OWN_TABLES)):
            return  # ours, or (for writing) empty or the reference notebook's training_logs
        self.close()
        if self.readonly and not tables & set(OWN_TABLES) and "training_logs" in tables:
            raise ValueError(f"{self.path!r} holds the reference notebook's training_logs table only; "
                             "a training command (or ExperimentLog(path)) migrates it.")
        foreign = sorted(tables & set(OWN_TABLES)) or sorted(tables)
        raise ValueError(f"{self.path!r} is not an experiment log of this toolkit: its tables "
                         f"({', '.join(foreign) or 'none'}) were not created by it. Pass another --db.")

    def _check_intact(self):
        """A damaged file (a bad sector, a copy cut short) is one ValueError naming it."""
        try:
            problems = [" ".join(str(r[0]).replace("*** in database main ***", "").split())
                        for r in self.db.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.DatabaseError as e:
            problems = [str(e)]
        if problems != ["ok"]:
            self.close()
            raise ValueError(f"The experiment log {self.path!r} is damaged ({'; '.join(problems)[:200]}). Restore "
                             f"it from a backup, or save what is readable with `sqlite3 {self.path} .recover`.")

    def close(self):
        self._stop_heartbeat()
        self.db.conn.close()

    # ---------------------------------------------------------------- writes
    def _retry(self, op, timeout):
        """`op()`, tried again with backoff while it fails with a passing cause (lock, full
        disk) for up to `timeout` seconds; then that error is raised."""
        deadline, wait = time.monotonic() + timeout, 0.05
        while True:
            try:
                return op()
            except (sqlite3.OperationalError, OSError) as e:
                left = deadline - time.monotonic()
                if write_failure(e) is None or left <= 0:
                    raise
                time.sleep(min(wait, left))
                wait = min(wait * 2, 2.0)

    def _write(self, op):
        """Runs write `op` (its own transaction). When the log cannot be written for
        `write_timeout` seconds, the write is kept in `pending` (in order) and the run
        goes on; every later write first retries the pending ones once, and `flush`
        (at the end of the outermost run at the latest) writes them all."""
        if self.pending and not self.flush(timeout=0):
            self.pending.append(op)
            return
        try:
            self._retry(op, self.write_timeout)
        except (sqlite3.OperationalError, OSError) as e:
            if write_failure(e) is None:
                raise
            self.failure = write_failure(e)
            self.pending.append(op)

    def flush(self, timeout=None):
        """Writes the pending writes in order, retrying for up to `timeout` seconds
        (default `write_timeout`); True when none is left."""
        timeout = self.write_timeout if timeout is None else timeout
        while self.pending:
            try:
                self._retry(self.pending[0], timeout)
            except (sqlite3.OperationalError, OSError) as e:
                if write_failure(e) is None:
                    raise
                self.failure = write_failure(e)
                return False
            self.pending.pop(0)
        return True

    def _transaction(self, *statements):
        """A write op: runs the callables in one IMMEDIATE transaction."""
        def op():
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for st in statements:
                    st()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        return op

    def _start_heartbeat(self):
        """A daemon thread that writes `heartbeat` of this log's live runs every
        HEARTBEAT_S seconds, on its own connection (a failing write is skipped)."""
        if self._heart is not None and self._heart.is_alive():
            return
        stop = self._heart_stop = threading.Event()

        def beat():
            conn = sqlite3.connect(os.path.abspath(self.path), timeout=1, isolation_level=None)
            try:
                while not stop.wait(HEARTBEAT_S):
                    ids = list(self._beating)
                    if ids:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute(f"UPDATE runs SET heartbeat = ? WHERE id IN ({', '.join('?' * len(ids))})"
                                         " AND status = 'running'", [now(), *ids])
            finally:
                conn.close()
        self._heart = threading.Thread(target=beat, name="run-heartbeat", daemon=True)
        self._heart.start()

    def _stop_heartbeat(self):
        if getattr(self, "_heart", None) is not None:
            self._heart_stop.set()

    def mark_dead_runs(self):
        """`running` rows of this host whose process is gone become `interrupted`;
        returns their ids."""
        host, ids = platform.node(), []
        for r in self.db.execute("SELECT id, pid, run_dir FROM runs WHERE status = 'running' AND host = ? "
                                 "AND pid IS NOT NULL", [host]).fetchall():
            if r[1] != os.getpid() and not process_alive(r[1]):
                if r[2] and os.path.isdir(r[2]):
                    remove_partial_files(r[2], recursive=True)
                self.db.execute("UPDATE runs SET status = 'interrupted', ended_at = ?, error = ? "
                                "WHERE id = ? AND status = 'running'",
                                [now(), f"process {r[1]} on {host} ended without finishing the run", r[0]])
                ids.append(r[0])
        return ids

    def start_run(self, experiment, model=None, dataset=None, ranker=None, pruning_ratio=None,
                  rates=None, parent_id=None, seed=None, config=None):
        """Inserts a run with status 'running'; returns its id.

        `pruning_ratio` is the fraction of filters removed from every conv (one
        number); `rates` the per-conv fractions when they differ (a list).
        """
        from pruning import __version__

        started = now()
        row = {  # a log opened for writing has every migration's column (heartbeat: m005)
            "experiment": experiment, "model": model, "dataset": dataset, "ranker": ranker,
            "pruning_ratio": pruning_ratio, "rates": _dumps(rates), "parent_id": parent_id,
            "seed": seed, "config": _dumps(config or {}), "status": "running",
            "started_at": started, "heartbeat": started, "version": __version__, "host": platform.node(),
            "pid": os.getpid(),
        }
        if self._depth == 0 or not self.pending:
            try:
                return self._retry(lambda: self.db["runs"].insert(row).last_pk,
                                   self.write_timeout if not self.pending else 0)
            except (sqlite3.OperationalError, OSError) as e:
                if self._depth == 0 or write_failure(e) is None:
                    raise  # before any work: the caller says why
                self.failure = write_failure(e)
        # Inside a run whose log is failing (a compress step): the row is written later, with the next
        # free id read now (a read works while another process holds the lock, or the disk is full).
        row["id"] = max(self.db.execute("SELECT max(id) FROM runs").fetchone()[0] or 0,
                        self._reserved) + 1
        self._reserved = row["id"]

        def insert():
            late = {**row, "parent_id": self._id(row["parent_id"])}
            try:
                self.db["runs"].insert(late)
            except sqlite3.IntegrityError:  # another process took the id meanwhile: the next free one
                del late["id"]
                self._moved[row["id"]] = self.db["runs"].insert(late).last_pk
        self.pending.append(insert)
        return row["id"]

    def _id(self, run_id):
        """The id run `run_id` has in the file (another one when its row was written late and
        its id had been taken meanwhile)."""
        return self._moved.get(run_id, run_id)

    def log_epoch(self, run_id, phase, epoch, seconds, logs=None, lr=None):
        """Writes one finished epoch; an epoch run again after a resume replaces its row."""
        logs = {k: _plain(v) for k, v in (logs or {}).items()}
        row = {  # its run_id is set by _replace_rows
            "phase": phase, "epoch": int(epoch), "seconds": float(seconds),
            "loss": logs.get("loss"), "accuracy": _first(logs, "accuracy", "categorical_accuracy", "acc"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": _first(logs, "val_accuracy", "val_categorical_accuracy", "val_acc"),
            "lr": lr if lr is not None else logs.get("learning_rate"), "logs": json.dumps(logs),
            "created_at": now(),
        }
        self._replace_rows(run_id, "epochs", "phase = ? AND epoch = ?", [phase, int(epoch)], [row])

    def log_layer_prunes(self, run_id, plan, ranker=None):
        """One row per conv the plan touches: filters before and after. A run prunes each
        conv once, so a conv pruned again after a resume replaces its row."""
        names = list(plan.keep)
        rows = [{"layer": name, "filters_before": plan.filters.get(name, len(keep)),
                 "filters_after": len(keep), "ranker": ranker} for name, keep in plan.keep.items()]
        self._replace_rows(run_id, "layer_prunes", f"layer IN ({', '.join('?' * len(names))})", names, rows)

    def _replace_rows(self, run_id, table, where, params, rows):
        """Deletes run `run_id`'s rows of `table` matching `where` and inserts `rows`
        for it, in one transaction: a failure at any point leaves the old rows."""
        def delete():
            self.db.conn.execute(f"DELETE FROM {table} WHERE run_id = ? AND {where}", [self._id(run_id), *params])

        def insert():
            self.db[table].insert_all([{**r, "run_id": self._id(run_id)} for r in rows])

        self._write(self._transaction(delete, insert))

    def add_outputs(self, run_id, files):
        """Records files {path: kind ("model", "plan", "results", ...)} that run `run_id`
        wrote outside its folder (see `file_owner`)."""
        files = {os.path.abspath(p): kind for p, kind in files.items()}

        def merge():
            row = self.db.execute("SELECT outputs FROM runs WHERE id = ?", [self._id(run_id)]).fetchone()
            outputs = {**(json.loads(row[0]) if row and row[0] else {}), **files}
            self.db["runs"].update(self._id(run_id), {"outputs": json.dumps(outputs)})
        self._write(self._transaction(merge))

    def file_owner(self, path):
        """(run id, kind) when `path` is a file of a completed run: its model (the
        recorded artifact), the plan saved beside it, or a file it recorded with
        `add_outputs`; else None."""
        target = os.path.realpath(path)
        columns = set(self.db["runs"].columns_dict)
        outputs = "outputs" if "outputs" in columns else "NULL"
        for run_id, artifact, files in self.db.execute(
                f"SELECT id, artifact, {outputs} FROM runs WHERE status = 'completed' ORDER BY id"):
            owned = json.loads(files) if files else {}
            if artifact:
                owned = {artifact: "model", os.path.splitext(artifact)[0] + ".plan.json": "plan", **owned}
            for p, kind in owned.items():
                if os.path.realpath(p) == target:
                    return run_id, kind
        return None

    def update_run(self, run_id, **fields):
        for key in ("metrics", "config", "rates"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = _dumps(fields[key])
        unknown = set(fields) - set(self.db["runs"].columns_dict)
        if unknown:
            raise ValueError(f"Unknown run fields: {sorted(unknown)}. Expected some of: "
                             f"{sorted(self.db['runs'].columns_dict)}")
        values = {k: _plain(v) for k, v in fields.items()}
        self._write(lambda: self.db["runs"].update(self._id(run_id), values))

    def finish_run(self, run_id, status="completed", **fields):
        if status not in STATUSES:
            raise ValueError(f"Expected status in {STATUSES}. Received: status={status!r}")
        self.update_run(run_id, status=status, ended_at=now(), **fields)

    def resumable(self, run_id, experiment=None):
        """The row of run `run_id` if it can be resumed (interrupted, of `experiment`),
        else a ValueError saying why."""
        row = self.get_run(run_id)
        if experiment is not None and row["experiment"] != experiment:
            raise ValueError(f"Run {run_id} is a {row['experiment']} run, not a {experiment} run.")
        if row["status"] != "interrupted":
            alive = row["status"] == "running" and f" (process {row.get('pid')} on {row['host']})" or ""
            raise ValueError(f"Only an interrupted run can be resumed. Run {run_id} is "
                             f"{row['status']}{alive}.")
        return row

    def resume(self, run_id):
        """Marks interrupted run `run_id` running again in this process; returns its row."""
        self.resumable(run_id)
        self.update_run(run_id, status="running", ended_at=None, error=None, host=platform.node(),
                        pid=os.getpid())
        return self.get_run(run_id)

    @contextmanager
    def run(self, experiment=None, resume=None, **kwargs):
        """A run that is marked completed, failed (with the error) or interrupted
        (Ctrl-C or SIGTERM). With `resume=run_id` the block continues that interrupted
        run in its own row instead of starting one."""
        run_id = self.resume(resume)["id"] if resume is not None else self.start_run(experiment, **kwargs)
        handle = Run(self, run_id)
        self._beating.add(run_id)
        self._start_heartbeat()
        self._depth += 1
        ended = False  # the block ended normally: only then wait for a failing log
        try:
            with sigterm_as_interrupt():
                yield handle
            ended = True
        except KeyboardInterrupt as e:
            self.finish_run(handle.id, "interrupted", error=type(e).__name__ + (f": {e}" if str(e) else ""))
            raise
        except BaseException as e:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
            self.finish_run(handle.id, "failed", error=f"{type(e).__name__}: {e}\n{tb}")
            raise
        else:
            if not handle.finished:
                self.finish_run(handle.id, "completed")
        finally:
            self._beating.discard(run_id)
            self._depth -= 1
            written = self.flush(timeout=self.write_timeout if self._depth == 0 and ended else 0)
        if not written and self._depth == 0:
            where = handle.artifact or handle.dir
            raise LogUnavailable(
                f"Cannot write the experiment log {self.path!r}: {self.failure}. Run {handle.id} finished, but "
                f"{len(self.pending)} of its log writes (epochs, final row) are not in the log"
                + (f"; its model is saved at {where}" if where else "") + ".")

    # ----------------------------------------------------------------- reads
    def runs(self, experiment=None, status=None, parent_id=None, artifact=None):
        """Runs in id order. Read-only, a `running` row of a dead process on this host
        reads as `interrupted` (a writer marks it so)."""
        where, args = [], []
        for column, value in (("experiment", experiment), ("parent_id", parent_id), ("artifact", artifact)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        rows = [self._live_status(r) for r in
                self.db["runs"].rows_where(" AND ".join(where) or None, args, order_by="id")]
        return [r for r in rows if status is None or r["status"] == status]

    def _live_status(self, row):
        """`row` as read: a running row of a dead process of this host reads `interrupted`
        (in `status`, and in `status_now` for a row of the runs_now view)."""
        if (self.readonly and row["status"] == "running" and row.get("pid") and row["host"] == platform.node()
                and not process_alive(row["pid"])):
            return {**row, "status": "interrupted", **({"status_now": "interrupted"} if "status_now" in row else {})}
        return row

    def get_run(self, run_id):
        try:
            return self._live_status(self.db["runs"].get(run_id))
        except sqlite_utils.db.NotFoundError:
            raise ValueError(f"No run with id {run_id} in {self.path}.") from None

    def epochs(self, run_id):
        return list(self.db["epochs"].rows_where("run_id = ?", [run_id], order_by="id"))

    def layer_prunes(self, run_id):
        return list(self.db["layer_prunes"].rows_where("run_id = ?", [run_id], order_by="id"))

    def rows(self, table):
        """Every row of a table or view in TABLES, by id: (columns, list of dicts)."""
        if table not in TABLES:
            raise ValueError(f"Expected table in {TABLES}. Received: table={table!r}")
        if table not in self.db.table_names() + self.db.view_names():
            raise ValueError(f"{self.path!r} has no {table} yet (an older log): a training command, or "
                             "ExperimentLog(path), adds it.")
        cursor = self.db.execute(f"SELECT * FROM [{table}] ORDER BY id")
        columns = [c[0] for c in cursor.description]
        rows = [dict(zip(columns, r)) for r in cursor.fetchall()]
        if table in ("runs", "runs_now"):  # the status `list` and `show` give
            rows = [self._live_status(r) for r in rows]
        return columns, rows


class Run:
    """A handle on one running run: its id, a Keras callback, and finish()."""

    def __init__(self, log, run_id):
        self.log = log
        self.id = run_id
        self.finished = False
        self.artifact = None  # the model it finished with
        self._dir = None

    @property
    def row(self):
        return self.log.get_run(self.id)

    @property
    def dir(self):
        """The run's artifact folder (None until `make_dir`)."""
        if self._dir is None:
            self._dir = self.row.get("run_dir")
        return self._dir

    def make_dir(self, out_dir, slug):
        """Creates the run's own artifact folder `<out_dir>/<run id>-<slug>` (a suffix
        -2, -3, ... when another log's run took the name) and records it; a resumed
        run gets the folder it had. Returns the path."""
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            return self.dir
        os.makedirs(out_dir, exist_ok=True)
        base, n = os.path.join(out_dir, f"{self.id}-{slug}"), 1
        while True:
            path = base if n == 1 else f"{base}-{n}"
            try:
                os.mkdir(path)  # atomic: two processes never share a folder
                break
            except FileExistsError:
                n += 1
        self._dir = path
        self.log.update_run(self.id, run_dir=path)
        return path

    def callback(self, phase="train"):
        from pruning.callbacks import SQLiteLogger

        return SQLiteLogger(self.log, self.id, phase)

    def finish(self, **fields):
        self.artifact = fields.get("artifact", self.artifact)
        self.log.finish_run(self.id, "completed", **fields)
        self.finished = True


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


def __getattr__(name):
    # Compatibility: `from save_sqlite import SQLiteLogger` (imports Keras only when asked).
    if name == "SQLiteLogger":
        from pruning.callbacks import SQLiteLogger

        return SQLiteLogger
    raise AttributeError(f"module 'save_sqlite' has no attribute {name!r}")


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
