"""Issue 12: no overwritten models, no run left `running`, resume after a kill,
read commands that never write, and one clear line for every bad input."""

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, SAMPLE_RICE
from main_train import cli
from save_sqlite import ExperimentLog

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _image_folder(root, splits=(("train", 8), ("test", 3)), classes=("a", "b"), size=32, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for c in classes:
            folder = os.path.join(root, split, c) if split else os.path.join(root, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f"{i}.jpg"))
    return str(root)


@pytest.fixture()
def tiny_cifar(tmp_path):
    return _image_folder(tmp_path / "cifar")


def _cifar_args(image_dir, tmp_path, *extra):
    return ["cifar", "--image-dir", image_dir, "--width", "0.0625", "--epochs", "3", "--batch-size", "4",
            "--schedule", "oneshot", "--final-epochs", "0", "--ranker", "l1", "--latency-batch", "2",
            "--rank-batches", "1", "--rank-batch-size", "4", "-v", "0", "--out-dir", str(tmp_path / "runs"),
            "--db", str(tmp_path / "log.db"), *extra]


# A driver that runs the CLI and kills itself at an exact point: SIGKILL (or
# SIGTERM) right after the backup of epoch KILL_EPOCH of phase KILL_PHASE is saved.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import keras
orig = keras.callbacks.BackupAndRestore.on_epoch_end
def on_epoch_end(self, epoch, logs=None):
    orig(self, epoch, logs)
    if epoch == int(os.environ["KILL_EPOCH"]) and self.backup_dir.endswith(os.environ["KILL_PHASE"]):
        os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))
keras.callbacks.BackupAndRestore.on_epoch_end = on_epoch_end
import main_train
main_train.cli(sys.argv[1:])
"""


def _run_killed(args, tmp_path, sig, phase="pretrain", epoch=0):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO))
    env = {**os.environ, "KILL_EPOCH": str(epoch), "KILL_PHASE": phase, "KILL_SIGNAL": sig,
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(driver), *args], env=env, capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    return p


# ------------------------------------------------------------- kill and resume
def test_sigkill_after_first_epoch_then_resume(tiny_cifar, tmp_path):
    db = str(tmp_path / "log.db")
    p = _run_killed(_cifar_args(tiny_cifar, tmp_path), tmp_path, "SIGKILL")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT status FROM runs").fetchall() == [("running",)]  # nobody could mark it
    first = raw.execute("SELECT id, epoch, created_at FROM epochs").fetchall()
    raw.close()
    assert [e[1] for e in first] == [0]

    log = ExperimentLog(db)  # the next open sees the process is gone
    (base,) = log.runs()
    assert base["status"] == "interrupted" and "ended without finishing" in base["error"]
    assert log.interrupted == [base["id"]]
    log.close()

    r = CliRunner().invoke(cli, ["cifar", "--resume", str(base["id"]), "--db", db])
    assert r.exit_code == 0, r.output
    log = ExperimentLog(db)
    base, pruned = log.runs()
    assert base["status"] == pruned["status"] == "completed" and pruned["parent_id"] == base["id"]
    epochs = log.epochs(base["id"])
    assert [(e["phase"], e["epoch"]) for e in epochs] == [("pretrain", 0), ("pretrain", 1), ("pretrain", 2)]
    assert (epochs[0]["id"], epochs[0]["created_at"]) == first[0][::2]  # continued, not restarted
    # The warm-up schedule went on from the restored optimizer step: 16 images / batch 4 = 4 steps an
    # epoch, 5 warm-up epochs = 20 steps, so the rate after epoch k is 0.01 * 4 (k + 1) / 20.
    assert [e["lr"] for e in epochs] == pytest.approx([0.002, 0.004, 0.006])
    assert log.epochs(pruned["id"]) == [] and len(log.layer_prunes(pruned["id"])) == 13
    for run in (base, pruned):
        model = keras.models.load_model(run["artifact"])
        assert model.count_params() == run["params"]
        assert os.path.dirname(run["artifact"]) == run["run_dir"]
        assert not os.path.exists(os.path.join(run["run_dir"], "backup", "pretrain"))
        assert not [f for f in os.listdir(run["run_dir"]) if ".partial-" in f]


def test_sigterm_marks_the_run_interrupted(tiny_cifar, tmp_path):
    p = _run_killed(_cifar_args(tiny_cifar, tmp_path), tmp_path, "SIGTERM")
    assert p.returncode == 143, p.stderr[-2000:]
    assert "interrupted" in p.stderr and "--resume" in p.stderr
    raw = sqlite3.connect(str(tmp_path / "log.db"))  # marked by the process itself
    assert raw.execute("SELECT status, error FROM runs").fetchall() == [("interrupted", "Terminated: SIGTERM")]


def test_rerunning_the_same_command_keeps_both_models(tiny_cifar, tmp_path):
    args = _cifar_args(tiny_cifar, tmp_path)
    args[args.index("--epochs") + 1] = "0"  # untrained models are models too; keeps the test fast
    for _ in range(2):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
    runs = ExperimentLog(str(tmp_path / "log.db")).runs()
    paths = [r["artifact"] for r in runs]
    assert len(runs) == 4 and len(set(paths)) == 4
    for r in runs:
        assert keras.models.load_model(r["artifact"]).count_params() == r["params"]
    # A second log writing to the same folder gets new folders too (ids start again at 1).
    other = [*args[:-1], str(tmp_path / "other.db")]
    assert CliRunner().invoke(cli, other).exit_code == 0
    new = ExperimentLog(str(tmp_path / "other.db")).runs()
    assert {r["artifact"] for r in new}.isdisjoint(paths) and all(os.path.exists(p) for p in paths)


def test_resume_refuses_a_completed_run(tmp_path):
    db = str(tmp_path / "l.db")
    log = ExperimentLog(db)
    with log.run("cifar") as run:
        run.finish()
    r = CliRunner().invoke(cli, ["cifar", "--resume", str(run.id), "--db", db])
    assert r.exit_code == 1 and "Only an interrupted run can be resumed. Run 1 is completed." in r.output


def test_dead_process_row_and_its_partial_file(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs" / "1-x"
    run_dir.mkdir(parents=True)
    partial = run_dir / f"baseline.partial-{dead.pid}.keras"
    partial.write_bytes(b"")
    saved_model = run_dir / f"deploy.partial-{dead.pid}"  # a killed SavedModel export: a folder
    (saved_model / "variables").mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"")
    db = str(tmp_path / "l.db")
    log = ExperimentLog(db)
    run_id = log.start_run("cifar")
    log.update_run(run_id, pid=dead.pid, run_dir=str(run_dir))
    live = log.start_run("cifar")  # this process: alive
    log.close()
    # Read-only: shown as interrupted, file untouched.
    r = CliRunner().invoke(cli, ["logs", "list", "--status", "running", "--db", db])
    assert r.exit_code == 0 and f"{live:>4} cifar" in r.output and f"{run_id:>4} cifar" not in r.output
    assert sqlite3.connect(db).execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone() == ("running",)
    # A writer marks it and removes the temporary file its killed save left.
    log = ExperimentLog(db)
    assert log.get_run(run_id)["status"] == "interrupted" and log.get_run(live)["status"] == "running"
    assert not partial.exists() and not saved_model.exists()


# ------------------------------------------------------------------ saving
def test_atomic_save_uses_umask_and_leaves_no_temp_file(tmp_path):
    from experiments.common import save_model
    from experiments.files import atomic_path, write_text

    old = os.umask(0o022)
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        path = save_model(model, str(tmp_path / "m.keras"))
        text = write_text(str(tmp_path / "r.md"), "x")
        assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(text).st_mode) == 0o644
        with pytest.raises(RuntimeError):
            with atomic_path(str(tmp_path / "n.keras")) as tmp:
                open(tmp, "w").write("half")
                raise RuntimeError("crash mid-save")
        assert sorted(os.listdir(tmp_path)) == ["m.keras", "r.md"]
    finally:
        os.umask(old)


# ----------------------------------------------------- read commands never write
@pytest.mark.parametrize("args", [["logs", "list"], ["logs", "show", "1"], ["logs", "export"], ["report"]])
def test_read_commands_fail_on_a_missing_log_and_create_nothing(tmp_path, args):
    db = tmp_path / "typo.db"
    r = CliRunner().invoke(cli, [*args, "--db", str(db)], catch_exceptions=False) if args[0] != "report" else \
        CliRunner().invoke(cli, [*args, "--db", str(db), "--out-dir", str(tmp_path / "res")])
    assert r.exit_code == 1 and f"No experiment log at '{db}'" in r.output
    assert not db.exists() and not (tmp_path / "res").exists()


def test_read_commands_leave_a_foreign_database_alone(tmp_path):
    db = str(tmp_path / "other.sqlite")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    before = open(db, "rb").read()
    for args in (["logs", "list"], ["logs", "export"], ["cifar", "--epochs", "0"]):
        r = CliRunner().invoke(cli, [*args, "--db", db, *(["--image-dir", "/no"] if args[0] == "cifar" else [])])
        assert r.exit_code != 0
    r = CliRunner().invoke(cli, ["logs", "list", "--db", db])
    assert "is not an experiment log of this toolkit: its tables (runs) were not created by it" in r.output
    with pytest.raises(ValueError, match="not an experiment log of this toolkit"):
        ExperimentLog(db)  # a writer refuses too, instead of `table "runs" already exists`
    assert open(db, "rb").read() == before
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["runs"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"


def test_a_file_that_is_not_sqlite(tmp_path):
    db = tmp_path / "notes.db"
    db.write_text("just some text, long enough to be read as a header of a database file\n" * 20)
    for args in (["logs", "list", "--db", str(db)], ["prune", "m.keras", "--ratio", "0.1", "-o",
                                                    str(tmp_path / "o.keras"), "--db", str(db)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and f"'{db}' is not an SQLite database" in r.output, r.output
    assert not (tmp_path / "o.keras").exists()


def test_prune_opens_the_log_before_writing_its_model(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    src = str(tmp_path / "m.keras")
    model.save(src)
    broken = tmp_path / "dir.db"
    broken.mkdir()  # a folder where the log file should be
    out = tmp_path / "p.keras"
    r = CliRunner().invoke(cli, ["prune", src, "--ratio", "0.5", "-o", str(out), "--db", str(broken)])
    assert r.exit_code == 1 and "Received a folder" in r.output and not out.exists()
    # A file that is a finished run's model is not replaced without --force.
    db = str(tmp_path / "l.db")
    assert CliRunner().invoke(cli, ["prune", src, "--ratio", "0.5", "-o", str(out), "--db", db]).exit_code == 0
    r = CliRunner().invoke(cli, ["prune", src, "--ratio", "0.25", "-o", str(out), "--db", db])
    assert r.exit_code == 1 and "is the model of finished run 1" in r.output
    assert CliRunner().invoke(cli, ["prune", src, "--ratio", "0.25", "-o", str(out), "--db", db,
                                    "--force"]).exit_code == 0


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_read_only_folder_and_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(ValueError, match="folder .* is not writable"):
            ExperimentLog(str(ro / "x.db"))
    finally:
        os.chmod(ro, 0o755)
    db = tmp_path / "ro.db"
    ExperimentLog(str(db)).close()
    os.chmod(db, 0o444)
    with pytest.raises(ValueError, match="Cannot write to the experiment log"):
        ExperimentLog(str(db)).start_run("x")


def test_unwritable_paths_are_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    db = str(tmp_path / "l.db")
    ExperimentLog(db).close()
    r = CliRunner().invoke(cli, ["logs", "export", "--db", db, "-o", str(blocker / "out.csv")])
    assert r.exit_code == 1 and f"'{blocker}' is a file, not a folder" in r.output
    r = CliRunner().invoke(cli, ["rice", "--out-dir", str(blocker / "runs"), "--db", db, "--weights", "none"])
    assert r.exit_code == 1 and f"Cannot create the output folder '{blocker / 'runs'}'" in r.output
    assert "Not a directory" in r.output
    r = CliRunner().invoke(cli, ["logs", "list", "--db", str(blocker / "x.db")])
    assert r.exit_code == 1 and "No experiment log at" in r.output
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ExperimentLog(str(blocker / "x.db"))
    assert ExperimentLog(db).runs() == []  # nothing started


# ------------------------------------------------------------------ report
def test_report_never_silently_replaces_a_bigger_report(tmp_path):
    full, empty, out = str(tmp_path / "full.db"), str(tmp_path / "empty.db"), tmp_path / "results"
    log = ExperimentLog(full)
    for _ in range(2):
        with log.run("rice", pruning_ratio=0.0) as run:
            run.finish(test_top1=0.5, params=10, macs=100, latency_ms=1.0)
    ExperimentLog(empty).close()
    assert CliRunner().invoke(cli, ["report", "--db", full, "--out-dir", str(out)]).exit_code == 0
    before = (out / "report.md").read_text()
    assert "2 completed runs" in before
    r = CliRunner().invoke(cli, ["report", "--db", empty, "--out-dir", str(out)])
    assert r.exit_code == 1 and "was built from 2 completed runs" in r.output and "--force" in r.output
    assert (out / "report.md").read_text() == before
    r = CliRunner().invoke(cli, ["report", "--db", empty, "--out-dir", str(out), "--force"])
    assert r.exit_code == 0 and "0 completed runs" in (out / "report.md").read_text()


# ---------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("args,message", [
    (["cifar", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["rice", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["stats", "m.keras", "--runs", "0"], "'--runs': 0 is not in the range x>=1"),
    (["rice", "--limit-per-class", "-1"], "'--limit-per-class': -1 is not in the range x>=1"),
    (["rank", "m.keras", "--out-dir", "x", "--limit-per-class", "-1"], "-1 is not in the range x>=1"),
    (["rice", "--head-epochs", "-1"], "'--head-epochs': -1 is not in the range x>=0"),
    (["cifar", "--train-limit", "0"], "'--train-limit': 0 is not in the range x>=1"),
    (["cifar", "--latency-batch", "0"], "'--latency-batch': 0 is not in the range x>=1"),
    (["rice", "--latency-batch", "0"], "'--latency-batch': 0 is not in the range x>=1"),
    (["stats", "m.keras", "--latency-batch", "0"], "'--latency-batch': 0 is not in the range x>=1"),
    (["rice", "--ratios", ""], "Expected at least one number"),
    (["cifar", "--compress-rate", ""], "Expected at least one number"),
    (["prune", "m.keras", "-o", "x.keras", "--ratio", ""], "Expected at least one number"),
])
def test_bad_numbers_are_usage_errors(tmp_path, args, message):
    r = CliRunner().invoke(cli, [*args, "--db", str(tmp_path / "l.db")] if args[0] in ("cifar", "rice") else args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "l.db").exists()


def test_unknown_exclude_fails_before_training(tmp_path):
    db = str(tmp_path / "l.db")
    r = CliRunner().invoke(cli, ["rice", "--data-dir", SAMPLE_RICE, "--weights", "none", "--exclude",
                                 "block5_conv3,block9_conv1", "--db", db])
    assert r.exit_code == 2 and "Unknown convolution layer: 'block9_conv1'" in r.output
    assert not os.path.exists(db)  # no run started, nothing trained


def test_keras_file_as_weights_is_one_line(tmp_path):
    path = tmp_path / "model.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(str(path))
    r = CliRunner().invoke(cli, ["rice", "--weights", str(path), "--db", str(tmp_path / "l.db")])
    assert r.exit_code == 2 and "pass it as --pretrained" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_text_file_named_model_keras(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    for args in (["stats", str(path)], ["prune", str(path), "--ratio", "0.1", "-o", str(tmp_path / "o.keras"),
                                        "--db", str(tmp_path / "l.db")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "is not a Keras model: a .keras file is a zip archive" in r.output
        assert "not found" not in r.output
    assert zipfile.is_zipfile(str(path)) is False


# ---------------------------------------------------------------- bad data
def _corrupt(folder):
    files = sorted(os.listdir(folder))
    text = os.path.join(folder, "notes.jpg")
    open(text, "w").write("this is text, not a JPEG")
    trunc = os.path.join(folder, files[0])
    data = open(trunc, "rb").read()
    open(trunc, "wb").write(data[: len(data) // 3])
    return text, trunc


def test_bad_images_in_cifar_image_dir_are_named(tiny_cifar, tmp_path):
    text, trunc = _corrupt(os.path.join(tiny_cifar, "train", "a"))
    db = str(tmp_path / "l.db")
    r = CliRunner().invoke(cli, _cifar_args(tiny_cifar, tmp_path))
    assert r.exit_code == 1 and "Cannot decode" in r.output and text in r.output, r.output
    assert "Traceback" not in r.output


def test_cifar_images_of_different_sizes_are_named(tmp_path):
    root = _image_folder(tmp_path / "c")
    odd = os.path.join(root, "train", "b", "odd.jpg")
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(odd)
    r = CliRunner().invoke(cli, _cifar_args(root, tmp_path))
    assert r.exit_code == 1 and "Received: 32x30 in" in r.output and odd in r.output, r.output


def test_bad_images_in_rank_data_are_named(tmp_path):
    folder = _image_folder(tmp_path / "imgs", splits=(("", 3),))
    text, _ = _corrupt(os.path.join(folder, "a"))
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    path = str(tmp_path / "m.keras")
    model.save(path)
    for cmd in (["rank", path, "--out-dir", str(tmp_path / "r")],
                ["prune", path, "--ratio", "0.5", "-o", str(tmp_path / "p.keras"), "--db", str(tmp_path / "l.db")]):
        r = CliRunner().invoke(cli, [*cmd, "--ranker", "hrank", "--data-dir", folder, "--rank-batches", "1"])
        assert r.exit_code == 1 and "Cannot decode 2 image files" in r.output and text in r.output, r.output
    assert not (tmp_path / "p.keras").exists()


def test_one_class_and_empty_split(tmp_path):
    one = _image_folder(tmp_path / "one", splits=(("", 5),), classes=("only",))
    r = CliRunner().invoke(cli, ["rice", "--data-dir", one, "--weights", "none", "--image-size", "32",
                                 "--db", str(tmp_path / "l.db"), "--out-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and "Expected at least 2 class folders" in r.output
    r = CliRunner().invoke(cli, ["rice", "--data-dir", SAMPLE_RICE, "--limit-per-class", "2", "--weights", "none",
                                 "--image-size", "32", "--db", str(tmp_path / "l.db"),
                                 "--out-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and "split has no image of class" in r.output


def test_offline_tfds_fails_fast(tmp_path, monkeypatch):
    import time

    from experiments import data

    monkeypatch.setattr(data, "network_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot be reached to download it.*--image-dir"):
        data.load_cifar_tfds("cifar10", "train", data_dir=str(tmp_path / "tfds"))
    assert time.perf_counter() - start < 30


def test_rice_pruned_run_interrupted_then_resumed(tmp_path, monkeypatch):
    """Ctrl-C in the retraining of a pruned run (after its first epoch's backup), then --resume."""
    orig = keras.callbacks.BackupAndRestore.on_epoch_end

    def interrupt(self, epoch, logs=None):
        orig(self, epoch, logs)
        if epoch == 0 and self.backup_dir.endswith("retrain_head"):
            raise KeyboardInterrupt

    db = str(tmp_path / "l.db")
    args = ["rice", "--data-dir", SAMPLE_RICE, "--weights", "none", "--image-size", "32", "--head-epochs", "1",
            "--retrain-epochs", "2", "--patience", "5", "--ratios", "0.5", "--latency-batch", "2", "-v", "0",
            "--out-dir", str(tmp_path / "runs"), "--db", db]
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", interrupt)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    base, pruned = ExperimentLog(db).runs()
    assert (base["status"], pruned["status"], pruned["error"]) == ("completed", "interrupted", "KeyboardInterrupt")
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", orig)
    r = CliRunner().invoke(cli, ["rice", "--resume", str(pruned["id"]), "--db", db])
    assert r.exit_code == 0, r.output
    log = ExperimentLog(db)
    assert len(log.runs()) == 2  # the same row, no new run
    pruned = log.get_run(pruned["id"])
    assert pruned["status"] == "completed" and pruned["parent_id"] == base["id"]
    assert [(e["phase"], e["epoch"]) for e in log.epochs(pruned["id"])] == [("retrain_head", 0), ("retrain_head", 1)]
    assert [p["layer"] for p in log.layer_prunes(pruned["id"])].count("block1_conv1") == 1
    assert keras.models.load_model(pruned["artifact"]).count_params() == pruned["params"] < base["params"]
