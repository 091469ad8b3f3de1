"""Issue 25: no finished run's file replaced, a run that survives a failing log,
compress checks before any run, atomic output paths, reading damaged or read-only
logs, and odd models. Tiny models and generated 16 px images: seconds each."""

import errno
import json
import os
import sqlite3
import subprocess
import threading
import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from main_train import cli
from save_sqlite import ExperimentLog


def image_folder(root, classes=("a", "b"), n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c] = 255  # something to learn
            Image.fromarray(img).save(os.path.join(root, name, f"{i}.jpg"))
    return str(root)


def tiny_model(classes=2, size=16):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="out")(x))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a folder of 2 x 12 images."""
    root = tmp_path_factory.mktemp("faults")
    model = str(root / "m.keras")
    tiny_model().save(model)
    return {"model": model, "data": image_folder(root / "images")}


def compress_args(setup, tmp_path, *extra):
    return ["compress", setup["model"], "--data-dir", setup["data"], "--target-macs", "0.6", "--epochs", "0",
            "--ranker", "l1", "--no-distill", "--preprocess", "unit", "--latency-batch", "2", "-v", "0",
            "--out-dir", str(tmp_path / "runs"), "--db", str(tmp_path / "log.db"), *extra]


def invoke(args):
    return CliRunner().invoke(cli, args)


def one_line_error(r, code):
    """The command exited with `code` and ended with one error line (after click's usage
    lines for a bad option), no traceback; returns that line."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert "Traceback" not in r.output and [l for l in lines if l.startswith("Error:")] == lines[-1:], r.output
    return lines[-1]


def n_runs(db):
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT count(*) FROM runs").fetchone()[0]


def no_run_folder(tmp_path):
    return not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------ 1. data loss
def test_no_command_replaces_a_finished_runs_file(setup, tmp_path):
    db, out, plan = str(tmp_path / "log.db"), tmp_path / "p.keras", tmp_path / "p_plan.json"
    r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(out), "--save-plan", str(plan), "--db", db])
    assert r.exit_code == 0, r.output
    model_bytes, plan_bytes, runs = out.read_bytes(), plan.read_bytes(), n_runs(db)
    # compress --output onto run 1's model: refused before any row or folder exists.
    r = invoke(compress_args(setup, tmp_path, "--output", str(out)))
    assert "is the model of finished run 1" in one_line_error(r, 2) and "--force" in r.output
    assert out.read_bytes() == model_bytes and n_runs(db) == runs and no_run_folder(tmp_path)
    # --save-plan, --results and report onto run 1's plan (its --save-plan file).
    r = invoke(["prune", setup["model"], "--ratio", "0.25", "-o", str(tmp_path / "q.keras"), "--save-plan",
                str(plan), "--db", db])
    assert "is the plan of finished run 1" in one_line_error(r, 1) and not (tmp_path / "q.keras").exists()
    r = invoke(compress_args(setup, tmp_path, "--results", str(plan)))
    assert "is the plan of finished run 1" in one_line_error(r, 1)
    assert plan.read_bytes() == plan_bytes and n_runs(db) == runs
    (tmp_path / "rep").mkdir()
    r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(tmp_path / "r.keras"), "--save-plan",
                str(tmp_path / "rep" / "report.md"), "--db", db])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_bytes()
    r = invoke(["report", "--db", db, "--out-dir", str(tmp_path / "rep")])
    assert "report.md' is the plan of finished run 2" in one_line_error(r, 1)
    assert (tmp_path / "rep" / "report.md").read_bytes() == md and len(os.listdir(tmp_path / "rep")) == 1
    # A compress copy (--output) is recorded: a later run cannot replace it, --force can.
    other = tmp_path / "c.keras"
    assert invoke(compress_args(setup, tmp_path, "--output", str(other))).exit_code == 0
    first = other.read_bytes()
    parent = n_runs(db) - 1  # the parent row comes before its one step
    r = invoke(compress_args(setup, tmp_path, "--output", str(other)))
    assert f"is the model of finished run {parent}" in one_line_error(r, 2)
    assert other.read_bytes() == first
    r = invoke(compress_args(setup, tmp_path, "--output", str(other), "--force", "--seed", "1"))
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ 2. a failing log
def fit_logged(log, run, epochs=3, on_epoch=None):
    """Fits a tiny model for `epochs` with the run's epoch logger; `on_epoch(epoch)` runs
    before the logger at each epoch end."""
    model = tiny_model(size=8)
    model.compile("sgd", "categorical_crossentropy")
    x = np.random.default_rng(0).random((8, 8, 8, 3), dtype=np.float32)
    y = keras.utils.to_categorical(np.arange(8) % 2, 2)
    hook = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: on_epoch and on_epoch(e))
    model.fit(x, y, epochs=epochs, verbose=0, callbacks=[hook, run.callback("train")])
    return model


def short_lock_timeout(log, seconds=1):
    log.db.conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
    return log


def test_a_lock_held_longer_than_the_timeout_loses_no_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_DB_WRITE_TIMEOUT", "2")
    db = str(tmp_path / "log.db")
    log = short_lock_timeout(ExperimentLog(db))
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    released = []

    def lock(epoch):
        if epoch == 0:  # another process takes the write lock for 3 s (longer than the 2 s timeout)
            other.execute("BEGIN IMMEDIATE")
            threading.Timer(3.0, lambda: (other.execute("COMMIT"), released.append(time.monotonic()))).start()

    start = time.monotonic()
    with log.run("x") as run:
        fit_logged(log, run, on_epoch=lock)
        run.finish(test_top1=0.5)
    assert released and time.monotonic() - start >= 3.0  # the run waited out the lock
    assert log.get_run(run.id)["status"] == "completed"
    assert [e["epoch"] for e in log.epochs(run.id)] == [0, 1, 2]
    assert log.pending == []


def test_a_log_that_never_comes_back_keeps_the_model_and_says_why(tmp_path, monkeypatch):
    from save_sqlite import LogUnavailable

    monkeypatch.setenv("PRUNING_DB_WRITE_TIMEOUT", "0.5")
    db = str(tmp_path / "log.db")
    log = short_lock_timeout(ExperimentLog(db), 0.5)
    other = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(LogUnavailable) as e:
        with log.run("x") as run:
            run.make_dir(str(tmp_path / "runs"), "x")
            other.execute("BEGIN IMMEDIATE")  # held past the end of the run
            model = fit_logged(log, run, epochs=2)
            path = os.path.join(run.dir, "model.keras")
            model.save(path)
            run.finish(artifact=path, test_top1=0.5)
    message = str(e.value)
    assert "locked by another process" in message and f"model is saved at {path}" in message
    assert "\n" not in message and os.path.exists(path)
    other.execute("COMMIT")
    assert log.flush()  # what was kept lands once the log takes writes again
    assert log.get_run(run.id)["status"] == "completed" and len(log.epochs(run.id)) == 2


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   sqlite3.OperationalError("database or disk is full")])
def test_a_full_disk_under_the_log_during_compress(setup, tmp_path, monkeypatch, error):
    """Every log write fails once the run has its folder: compress still trains and saves its
    model, and ends with one line naming the full disk and the model."""
    import sqlite_utils

    import save_sqlite

    monkeypatch.setenv("PRUNING_DB_WRITE_TIMEOUT", "0.2")
    full = []
    execute = sqlite_utils.Database.execute

    def failing(self, sql, *args, **kwargs):
        if full and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise error
        return execute(self, sql, *args, **kwargs)

    make_dir = save_sqlite.Run.make_dir
    monkeypatch.setattr(sqlite_utils.Database, "execute", failing)
    monkeypatch.setattr(save_sqlite.Run, "make_dir", lambda *a: (make_dir(*a), full.append(1))[0])
    r = invoke(compress_args(setup, tmp_path, "--epochs", "1"))
    assert r.exit_code == 1, (r.output, r.exception)
    last = r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output and "the disk is full" in last and "model is saved at" in last, r.output
    saved = last.split("model is saved at ")[1].rstrip(".")
    assert os.path.exists(saved) and keras.models.load_model(saved).count_params() > 0


# ------------------------------------------------------------------ 3. compress checks
def rewrite_member(src, dst, member, cut=None, drop=False):
    """A copy of zip `src` with `member` cut to its first half (or left out)."""
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            if name == member and drop:
                continue
            out.writestr(name, data[:len(data) // 2] if name == member else data)
    return str(dst)


def no_conv_model(path):
    inp = keras.Input((16, 16, 3))
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inp))).save(path)
    return str(path)


def _case(name, setup, tmp_path):
    """(extra args or a replaced model/data, expected text) of one compress check."""
    import zipfile

    model, data, extra = setup["model"], setup["data"], []
    if name == "zip_not_keras":
        model = str(tmp_path / "z.keras")
        with zipfile.ZipFile(model, "w") as z:
            z.writestr("hello.txt", "hi")
        expect = "is a zip archive but not a Keras model"
    elif name == "truncated_weights":
        model = rewrite_member(setup["model"], tmp_path / "w.keras", "model.weights.h5")
        expect = "weights cannot be read"
    elif name == "truncated_config":
        model = rewrite_member(setup["model"], tmp_path / "c.keras", "config.json")
        expect = "config.json is not valid JSON"
    elif name == "undecodable_image":
        data = image_folder(tmp_path / "img")
        (tmp_path / "img" / "a" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        expect = f"Cannot decode 1 image file (truncated, or not an image): {tmp_path / 'img' / 'a' / '3.jpg'}"
    elif name == "five_images_per_class":
        data, expect = image_folder(tmp_path / "few", n=5), "split has no image of class"
    elif name == "unknown_exclude":
        extra, expect = ["--exclude", "c1,nosuch"], "nosuch"
    elif name == "unreachable_target":
        extra, expect = ["--target-macs", "0.01", "--max-ratio", "0.5"], "Cannot reach target_macs=0.01"
    elif name == "nothing_prunable":
        model, expect = no_conv_model(tmp_path / "dense.keras"), "Nothing to prune"
    elif name == "all_excluded":
        extra, expect = ["--exclude", "c1,c2"], "Nothing to prune"
    elif name == "ranker_option_type":
        extra = ["--ranker", "taylor", "--ranker-option", "num_batches=abc"]
        expect = "Expected ranker option num_batches to be int. Received: num_batches='abc'"
    else:  # steps
        extra, expect = ["--steps", "1000000"], "1000000 is not in the range"
    return model, data, extra, expect


@pytest.mark.parametrize("case", ["zip_not_keras", "truncated_weights", "truncated_config", "undecodable_image",
                                  "five_images_per_class", "unknown_exclude", "unreachable_target",
                                  "nothing_prunable", "all_excluded", "ranker_option_type", "steps"])
def test_compress_checks_everything_before_any_run(setup, tmp_path, case):
    model, data, extra, expect = _case(case, setup, tmp_path)
    args = compress_args({"model": model, "data": data}, tmp_path, *extra)
    out = one_line_error(invoke(args), 2)
    assert expect in out, out
    if case.startswith(("zip", "truncated")):
        assert repr(model) in out  # names the file
    assert n_runs(str(tmp_path / "log.db")) == 0 and no_run_folder(tmp_path)


def test_interrupted_compress_does_not_offer_resume(setup, tmp_path, monkeypatch):
    import experiments.compress
    from save_sqlite import Terminated

    def killed(*a, **k):
        raise Terminated("SIGTERM")

    monkeypatch.setattr(experiments.compress, "finetune", killed)
    r = invoke(compress_args(setup, tmp_path, "--epochs", "1"))
    assert r.exit_code == 143 and "run it again" in r.output and "--resume" not in r.output, r.output
    assert {row["status"] for row in ExperimentLog(str(tmp_path / "log.db")).runs()} == {"interrupted"}


# ------------------------------------------------------------------ 4. output paths
def test_output_paths_are_checked_before_the_work(setup, tmp_path):
    db = str(tmp_path / "log.db")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "folder.keras").mkdir()
    prune = ["prune", setup["model"], "--ratio", "0.5", "--db", db]
    r = invoke([*prune, "-o", str(tmp_path / "folder.keras")])
    assert f"Received a folder: '{tmp_path / 'folder.keras'}'" in one_line_error(r, 1)
    r = invoke([*prune, "-o", str(tmp_path / "p.keras"), "--save-plan", str(blocker / "plan.json")])
    assert f"'{blocker}' is a file, not a folder" in one_line_error(r, 1)
    assert not (tmp_path / "p.keras").exists() and n_runs(db) == 0
    r = invoke(compress_args(setup, tmp_path, "--output", str(blocker / "c.keras")))
    assert f"'{blocker}' is a file, not a folder" in one_line_error(r, 2) and n_runs(db) == 0
    r = invoke(["logs", "export", "--db", db, "-o", str(tmp_path / "folder.keras")])
    assert "Received a folder" in one_line_error(r, 1)
    # A missing folder of --save-plan is created; the plan is written before the run is completed.
    r = invoke([*prune, "-o", str(tmp_path / "p.keras"), "--save-plan", str(tmp_path / "new" / "sub" / "plan.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "sub" / "plan.json").read_text())["keep"]


def test_partial_leftovers_are_removed_by_the_next_save_there(setup, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = tmp_path / f"other.partial-{gone.pid}.keras"
    leftover.write_bytes(b"")  # a writer of another file was SIGKILLed mid-copy
    r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(tmp_path / "p.keras"),
                "--db", str(tmp_path / "log.db")])
    assert r.exit_code == 0 and not leftover.exists()


def test_plan_save_is_atomic(tmp_path, monkeypatch):
    from pruning import PrunePlan

    plan = PrunePlan({"c1": [0, 1]}, filters={"c1": 4})
    path = tmp_path / "plan.json"
    plan.save(str(path))
    before = path.read_text()

    def broken(self):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(PrunePlan, "to_json", broken)
    with pytest.raises(RuntimeError):
        plan.save(str(path))
    assert path.read_text() == before and os.listdir(tmp_path) == ["plan.json"]


def test_report_on_a_full_disk_keeps_the_previous_plots(tmp_path, monkeypatch):
    import matplotlib.figure

    db, out = str(tmp_path / "log.db"), tmp_path / "results"
    log = ExperimentLog(db)
    with log.run("prune", pruning_ratio=0.5) as run:
        run.finish(test_top1=0.5, params=10, macs=100, latency_ms=1.0)
    assert invoke(["report", "--db", db, "--out-dir", str(out)]).exit_code == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    savefig = matplotlib.figure.Figure.savefig

    def full(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")  # a few bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    r = invoke(["report", "--db", db, "--out-dir", str(out), "--force"])
    assert "the disk is full" in one_line_error(r, 1)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before  # nothing replaced, no leftovers


def _mount(*args):
    """Runs mount (root only); skips the test where it is not allowed."""
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")


def test_real_full_disk_and_read_only_folder(setup, tmp_path):
    small, ro = tmp_path / "small", tmp_path / "ro"
    small.mkdir()
    ro.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small))
    try:
        db = str(tmp_path / "log.db")
        r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(small / "p.keras"), "--db", db])
        assert f"Cannot write '{small / 'p.keras'}': the disk is full" in one_line_error(r, 1)
        assert os.listdir(small) == []  # no partial file left
        _mount("--bind", str(ro), str(ro))
        try:
            _mount("-o", "remount,bind,ro", str(ro))
            r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(ro / "p.keras"), "--db", db])
            assert f"the folder '{ro}' is read-only" in one_line_error(r, 1)
        finally:
            subprocess.run(["umount", "-l", str(ro)])
    finally:
        subprocess.run(["umount", "-l", str(small)])


# ------------------------------------------------------------------ 5. reading the log
def _log_with_runs(db, n=40):
    log = ExperimentLog(db)
    for i in range(n):
        with log.run("prune", pruning_ratio=0.5, config={"pad": "x" * 200}) as run:
            log.log_epoch(run.id, "train", 0, 1.0, {"loss": 0.5})
            run.finish(test_top1=0.5, params=10, macs=100)
    log.close()


def test_a_log_on_read_only_media_is_read_and_says_so(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    db = str(folder / "log.db")
    _log_with_runs(db, 2)
    _mount("--bind", str(folder), str(folder))
    try:
        _mount("-o", "remount,bind,ro", str(folder))
        for args in (["logs", "list"], ["logs", "export"], ["logs", "show", "1"]):
            r = invoke([*args, "--db", db])
            assert r.exit_code == 0 and "read-only media" in r.output and "immutable=1" in r.output, r.output
        assert "completed" in invoke(["logs", "list", "--db", db]).output
    finally:
        subprocess.run(["umount", "-l", str(folder)])


def test_a_damaged_log_is_one_line_naming_it(setup, tmp_path):
    db = str(tmp_path / "log.db")
    _log_with_runs(db)
    size = os.path.getsize(db)
    with open(db, "r+b") as f:  # a bad sector: garbage over every page after the first
        for page in range(1, size // 4096):
            f.seek(page * 4096)
            f.write(b"\xee" * 64)
    for args in (["logs", "list"], ["logs", "show", "3"], ["logs", "export"], ["report", "--out-dir",
                                                                               str(tmp_path / "r")],
                 ["prune", setup["model"], "--ratio", "0.5", "-o", str(tmp_path / "p.keras")]):
        r = invoke([*args, "--db", db])
        assert f"The experiment log '{db}' is damaged" in one_line_error(r, 1), (args, r.output)
    assert not (tmp_path / "p.keras").exists()


def test_export_shows_the_status_list_shows(tmp_path):
    db = str(tmp_path / "log.db")
    log = ExperimentLog(db)
    run_id = log.start_run("prune")
    gone = subprocess.Popen(["true"])
    gone.wait()
    log.db.execute("UPDATE runs SET pid = ? WHERE id = ?", [gone.pid, run_id])  # its process died
    log.close()
    listed = invoke(["logs", "list", "--db", db]).output
    exported = invoke(["logs", "export", "--format", "json", "--db", db]).output
    assert "interrupted" in listed and json.loads(exported)[0]["status"] == "interrupted"
    assert json.loads(invoke(["logs", "export", "--table", "runs_now", "--format", "json", "--db", db])
                      .output)[0]["status_now"] == "interrupted"


def test_running_rows_carry_a_heartbeat_and_runs_now_shows_stale(tmp_path, monkeypatch):
    import save_sqlite

    monkeypatch.setattr(save_sqlite, "HEARTBEAT_S", 0.2)
    db = str(tmp_path / "log.db")
    log = ExperimentLog(db)
    reader = sqlite3.connect(db)
    with log.run("x") as run:
        log.db.execute("UPDATE runs SET heartbeat = '2000-01-01T00:00:00+00:00' WHERE id = ?", [run.id])
        assert reader.execute("SELECT status_now FROM runs_now WHERE id = ?", [run.id]).fetchone()[0] == "stale"
        time.sleep(1.0)  # the heartbeat thread writes it again
        beat = reader.execute("SELECT heartbeat, status_now FROM runs_now WHERE id = ?", [run.id]).fetchone()
        assert beat[0] > "2001" and beat[1] == "running"
    assert reader.execute("SELECT status_now FROM runs_now").fetchone()[0] == "completed"


# ------------------------------------------------------------------ 6. odd models
@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))).save(root / "dynamic.keras")
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    g = keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate()([keras.layers.Conv2D(4, 3)(a),
                                                                         keras.layers.Conv2D(4, 3)(b)]))
    keras.Model([a, b], [keras.layers.Dense(2)(g), keras.layers.Dense(3)(g)]).save(root / "two_in_out.keras")
    with pytest.warns(UserWarning):
        keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(2)]).save(root / "unbuilt.keras")
    no_conv_model(root / "dense.keras")
    return {p.stem: str(p) for p in root.iterdir()}


def test_stats_on_odd_models(odd_models):
    r = invoke(["stats", odd_models["dynamic"], "--runs", "1", "--latency-batch", "1"])
    assert r.exit_code == 0 and "params (total)    270" in r.output, r.output
    assert "MACs              not counted: the input shape (None, None, None, 3) is dynamic: pass --image-size" \
        in r.output and "latency           not measured" in r.output
    r = invoke(["stats", odd_models["dynamic"], "--image-size", "10", "--runs", "1", "--latency-batch", "1"])
    # c1: 8x8 outputs x 4 filters x 27, c2: 6x6 x 4 x 36, dense 4 x 2
    assert r.exit_code == 0 and f"MACs              {8 * 8 * 4 * 27 + 6 * 6 * 4 * 36 + 8:,}" in r.output, r.output
    assert "ms per batch of 1" in r.output
    r = invoke(["stats", odd_models["two_in_out"], "--runs", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["macs"] == 2 * 6 * 6 * 4 * 27 + 8 * 2 + 8 * 3 and out["latency"] is None and "2" in out["not_measured"]
    r = invoke(["stats", odd_models["unbuilt"], "--runs", "1"])
    assert "unbuilt Sequential): pass --image-size" in one_line_error(r, 2)
    r = invoke(["stats", odd_models["unbuilt"], "--image-size", "8", "--runs", "1", "--latency-batch", "1"])
    assert r.exit_code == 0 and f"MACs              {6 * 6 * 4 * 27 + 8:,}" in r.output, r.output


def test_prune_on_odd_models(odd_models, tmp_path):
    db = str(tmp_path / "log.db")
    r = invoke(["prune", odd_models["dynamic"], "--ratio", "0.5", "-o", str(tmp_path / "d.keras"), "--db", db])
    assert r.exit_code == 0 and "MACs not counted: the input size is dynamic" in r.output, r.output
    pruned = keras.models.load_model(tmp_path / "d.keras")
    assert pruned.get_layer("c1").filters == 2 and pruned(np.zeros((1, 12, 12, 3))).shape == (1, 2)
    for args, expect in (([odd_models["dense"], "--ratio", "0.5"], "Nothing to prune in"),
                         ([odd_models["dynamic"], "--ratio", "0.1"], "the plan removes no filter"),
                         ([odd_models["dynamic"], "--ratio", "1.2"], "Expected ratio in [0, 1). Received: ratio=1.2"),
                         ([odd_models["dynamic"], "--ratio", "0.5,0.5", "--exclude", "c1,c2"], "Nothing to prune")):
        r = invoke(["prune", *args, "-o", str(tmp_path / "n.keras"), "--db", db])
        assert expect in one_line_error(r, 2), (args, r.output)
    assert n_runs(db) == 1 and not (tmp_path / "n.keras").exists()
    # A --ratio list with --exclude logs the rates applied, not the ones given.
    r = invoke(["prune", odd_models["dynamic"], "--ratio", "0.5,0.5", "--exclude", "c2", "-o",
                str(tmp_path / "e.keras"), "--db", db])
    assert r.exit_code == 0, r.output
    assert json.loads(ExperimentLog(db).runs()[-1]["rates"]) == [0.5, 0.0]


def test_compress_on_odd_models(setup, odd_models, tmp_path):
    for model, expect in ((odd_models["dynamic"], "has a dynamic input shape (None, None, None, 3): pass --image-size"),
                          (odd_models["two_in_out"], "has 2 inputs and 2 outputs"),
                          (odd_models["unbuilt"], "unbuilt Sequential")):
        r = invoke(compress_args({"model": model, "data": setup["data"]}, tmp_path))
        assert expect in one_line_error(r, 2), r.output
    assert n_runs(str(tmp_path / "log.db")) == 0


# ------------------------------------------------------------------ 7. smaller items
def test_a_missed_target_is_a_warning_and_goals_have_no_float_noise(setup, tmp_path):
    from experiments.compress import step_targets

    assert step_targets(0.001, 1) == [0.001] and step_targets(0.3, 3) == [0.766666666667, 0.533333333333, 0.3]
    r = invoke(compress_args(setup, tmp_path))  # 0.6 of the MACs: whole filters reach 0.6137
    assert r.exit_code == 0, r.output
    assert "warning: the compressed model keeps 0.614 of the baseline macs, above the target 0.6" in r.output


def test_a_locked_or_full_log_says_so_not_permissions(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_DB_WRITE_TIMEOUT", "0.3")
    db = str(tmp_path / "log.db")
    ExperimentLog(db).close()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(tmp_path / "p.keras"), "--db", db])
        line = one_line_error(r, 1)
        assert "locked by another process" in line and "wait for the other process" in line, line
        assert "permission" not in line and time.monotonic() - start < 20
    finally:
        other.execute("ROLLBACK")
    from save_sqlite import log_error_hint

    assert "free space" in log_error_hint(sqlite3.OperationalError("database or disk is full"))
    assert "free space" in log_error_hint(OSError(errno.ENOSPC, "No space left on device"))


def test_a_step_started_while_the_log_fails_keeps_its_rows_even_if_its_id_is_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_DB_WRITE_TIMEOUT", "0.3")
    db = str(tmp_path / "log.db")
    log = ExperimentLog(db)
    other = sqlite3.connect(db, isolation_level=None)
    with log.run("compress") as parent:
        other.execute("BEGIN IMMEDIATE")  # another process holds the lock ...
        with log.run("compress", parent_id=parent.id) as step:  # ... when a step starts
            log.log_epoch(step.id, "step1", 0, 1.0, {"loss": 0.5})
            other.execute("INSERT INTO runs (experiment, status, started_at) VALUES ('other', 'running', 'x')")
            other.execute("COMMIT")  # and it took the id the step was given
            step.finish(test_top1=0.5)
        parent.finish(test_top1=0.5)
    rows = {r["experiment"]: r for r in log.runs() if r["parent_id"]}
    assert rows["compress"]["status"] == "completed" and rows["compress"]["parent_id"] == parent.id
    assert len(log.epochs(rows["compress"]["id"])) == 1 and log.pending == []


def test_a_dead_compress_run_is_not_offered_resume(setup, tmp_path):
    db = str(tmp_path / "log.db")
    log = ExperimentLog(db)
    ids = [log.start_run("compress"), log.start_run("rice")]
    gone = subprocess.Popen(["true"])
    gone.wait()
    log.db.execute("UPDATE runs SET pid = ?", [gone.pid])  # their process died
    log.close()
    r = invoke(["prune", setup["model"], "--ratio", "0.5", "-o", str(tmp_path / "p.keras"), "--db", db])
    assert f"run {ids[0]} was left running by a process that is gone: marked interrupted (it cannot be resumed: " \
           "run its command again)" in r.output
    assert f"(continue it with --resume {ids[1]})" in r.output
