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
    """The command exited with `code` and printed one line, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0, r.output
    return r.output


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
