"""Every command through click's CliRunner: --help, the happy path and bad input."""

import json
import os
import shutil
import sqlite3

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from main_train import cli
from save_sqlite import ExperimentLog

COMMANDS = [[], ["cifar"], ["rice"], ["compress"], ["prune"], ["rank"], ["stats"], ["logs"], ["logs", "list"],
            ["logs", "show"], ["logs", "export"], ["report"], ["dashboard"], ["export"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "main")
def test_help(args):
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
    if args:
        # Every option of the command carries help text.
        command = cli
        for name in args:
            command = command.commands[name]
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{' '.join(args)} --{param.name} has no help"


@pytest.fixture()
def model_file(tmp_path):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(name="p1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(x))
    path = str(tmp_path / "model.keras")
    model.save(path)
    return path


def test_a_command_leaves_every_run_in_the_db_file_itself(model_file, tmp_path):
    """The log is closed when a command ends, so SQLite moves its write-ahead log into the .db file:
    copying that one file (or committing it) copies every finished run."""
    db = str(tmp_path / "log.db")
    r = CliRunner().invoke(cli, ["prune", model_file, "--ranker", "l1", "--ratio", "0.5", "-o",
                                 str(tmp_path / "p.keras"), "--db", db])
    assert r.exit_code == 0, r.output
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
    shutil.copy(db, tmp_path / "copy.db")
    (count,) = sqlite3.connect(tmp_path / "copy.db").execute(
        "SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()
    assert count == 1


def test_prune_stats_and_plan_replay(model_file, tmp_path):
    db = str(tmp_path / "log.db")
    out = str(tmp_path / "pruned.keras")
    plan = str(tmp_path / "plan.json")
    runner = CliRunner()
    r = runner.invoke(cli, ["prune", model_file, "--ranker", "l1", "--ratio", "0.5", "-o", out,
                            "--save-plan", plan, "--db", db])
    assert r.exit_code == 0, r.output
    pruned = keras.models.load_model(out)
    assert pruned.get_layer("c1").filters == 4 and pruned.get_layer("c2").filters == 8
    assert json.load(open(plan))["keep"]["c2"] == sorted(json.load(open(plan))["keep"]["c2"])
    log = ExperimentLog(db)
    (run,) = log.runs("prune")
    assert run["status"] == "completed" and run["params"] == pruned.count_params()
    assert [(p["layer"], p["filters_before"], p["filters_after"]) for p in log.layer_prunes(run["id"])] == \
        [("c1", 8, 4), ("c2", 16, 8)]
    again = str(tmp_path / "again.keras")
    r = runner.invoke(cli, ["prune", model_file, "--plan", plan, "-o", again, "--db", db])
    assert r.exit_code == 0, r.output
    assert keras.models.load_model(again).count_params() == pruned.count_params()

    r = runner.invoke(cli, ["stats", out, "--runs", "3", "--latency-batch", "2", "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output[r.output.index("{"):])
    assert stats["params"] == pruned.count_params() and stats["latency"]["runs"] == 3
    r = runner.invoke(cli, ["stats", out, "--runs", "2", "--per-layer"])
    assert r.exit_code == 0 and "c2" in r.output and "MACs" in r.output


@pytest.mark.parametrize("args,message", [
    (["--ranker", "l3", "--ratio", "0.5"], "Unknown ranker: 'l3'"),
    (["--ratio", "1.2"], "Expected ratio in [0, 1). Received: ratio=1.2"),
    (["--ratio", "0.5", "--exclude", "nope"], "Unknown convolution layer: 'nope'"),
    (["--ranker", "hrank", "--ratio", "0.5"], "needs images"),
    (["--ratio", "abc"], "Expected a number"),
    ([], "exactly one of --ratio and --plan"),
])
def test_prune_bad_input(model_file, tmp_path, args, message):
    out = tmp_path / "x.keras"
    r = CliRunner().invoke(cli, ["prune", model_file, "-o", str(out), "--db", str(tmp_path / "l.db"), *args])
    assert r.exit_code != 0
    assert message in r.output
    assert not out.exists()  # nothing half-written


def test_prune_missing_model(tmp_path):
    r = CliRunner().invoke(cli, ["prune", str(tmp_path / "none.keras"), "--ratio", "0.1", "-o", "x.keras"])
    assert r.exit_code != 0 and "Model file not found" in r.output


def test_rank_writes_npy_files(model_file, tmp_path):
    out = tmp_path / "ranks"
    r = CliRunner().invoke(cli, ["rank", model_file, "--ranker", "l2", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    # Named by what they hold: L2 norms, not ranks (rank_conv{i}.npy is HRank's name).
    assert sorted(os.listdir(out)) == ["l2_conv1.npy", "l2_conv2.npy"]
    assert np.load(out / "l2_conv2.npy").shape == (16,)
    assert "l2_conv1.npy" in r.output


def test_rank_hrank_on_images(model_file, tmp_path):
    from conftest import SAMPLE_RICE

    out = tmp_path / "ranks"
    r = CliRunner().invoke(cli, ["rank", model_file, "--ranker", "hrank", "--out-dir", str(out),
                                 "--data-dir", SAMPLE_RICE, "--limit-per-class", "2", "--batch-size", "5",
                                 "--rank-batches", "2", "--preprocess", "cifar10"])
    assert r.exit_code == 0, r.output
    scores = np.load(out / "rank_conv1.npy")
    assert scores.shape == (8,) and np.all((scores >= 0) & (scores <= 16))


def _small_log(path):
    log = ExperimentLog(path)
    with log.run("rice", model="vgg16", dataset="d", pruning_ratio=0.0, seed=1, config={"a": 1}) as base:
        log.log_epoch(base.id, "head", 0, 2.0, {"loss": 1.0, "accuracy": 0.5})
        base.finish(test_top1=0.9, params=100, macs=1000, latency_ms=10.0)
    with log.run("rice", model="vgg16", dataset="d", ranker="l1", pruning_ratio=0.5, parent_id=base.id,
                 seed=1) as run:
        log.log_epoch(run.id, "retrain_head", 0, 1.0, {"loss": 1.2})
        from pruning import PrunePlan

        log.log_layer_prunes(run.id, PrunePlan({"c1": [0, 1]}, {"c1": 4}), "l1")
        run.finish(test_top1=0.8, params=50, macs=500, latency_ms=6.0)
    return log


def test_logs_list_show_export(tmp_path):
    db = str(tmp_path / "l.db")
    _small_log(db)
    runner = CliRunner()
    r = runner.invoke(cli, ["logs", "list", "--db", db])
    assert r.exit_code == 0 and "completed" in r.output and "0.9000" in r.output
    r = runner.invoke(cli, ["logs", "show", "2", "--db", db])
    assert r.exit_code == 0 and "retrain_head" in r.output and "c1" in r.output and "4 ->     2" in r.output
    r = runner.invoke(cli, ["logs", "show", "99", "--db", db])
    assert r.exit_code != 0 and "No run with id 99" in r.output
    out = tmp_path / "runs.json"
    r = runner.invoke(cli, ["logs", "export", "--format", "json", "-o", str(out), "--db", db])
    assert r.exit_code == 0
    assert [row["test_top1"] for row in json.loads(out.read_text())] == [0.9, 0.8]
    r = runner.invoke(cli, ["logs", "export", "--table", "training_logs", "--db", db])
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith("id,model_name,pruning_ratio")


def test_db_from_environment(tmp_path):
    db = str(tmp_path / "env.db")
    _small_log(db)
    r = CliRunner().invoke(cli, ["logs", "list"], env={"PRUNING_DB": db})
    assert r.exit_code == 0 and "rice" in r.output


def test_report_writes_markdown_and_plots(tmp_path):
    db = str(tmp_path / "l.db")
    _small_log(db)
    out = tmp_path / "results"
    r = CliRunner().invoke(cli, ["report", "--out-dir", str(out), "--db", db])
    assert r.exit_code == 0, r.output
    names = set(os.listdir(out))
    assert {"report.md", "report_rice_accuracy.png", "report_epoch_times.png", "report_layers_kept.png"} <= names
    md = (out / "report.md").read_text()
    assert "| 2 | d | l1 | 0.5 |" in md and "0.8000" in md
    assert (out / "report_rice_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_rice_missing_folder_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["rice", "--data-dir", str(tmp_path / "nope"), "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "Data folder not found" in r.output
    r = CliRunner().invoke(cli, ["rice", "--ratios", "0.1,1.5", "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "Expected ratio in [0, 1). Received: ratio=1.5" in r.output


def test_cifar_bad_compress_rate(tmp_path):
    r = CliRunner().invoke(cli, ["cifar", "--compress-rate", "0.5,0.5", "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "Expected one compress rate or 13" in r.output
    r = CliRunner().invoke(cli, ["cifar", "--ranker", "magic", "--db", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "Unknown ranker: 'magic'" in r.output


def test_rice_failure_mid_run_is_logged_as_failed(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline)
    db = str(tmp_path / "l.db")
    r = CliRunner().invoke(cli, ["rice", "--weights", "imagenet", "--image-size", "32", "--db", db,
                                 "--out-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and "Could not download the ImageNet VGG16 weights" in r.output
    assert "Traceback" not in r.output
    (run,) = ExperimentLog(db).runs("rice")
    assert run["status"] == "failed" and "ImageNet" in run["error"]


def test_cluster_resume_with_a_bad_tf_config_is_one_line(tmp_path, monkeypatch):
    # --resume skips the config checks (TF_CONFIG among them): joining the cluster says it.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1111"]},
                                                "task": {"type": "worker", "index": 5}}))
    r = CliRunner().invoke(cli, ["cifar", "--strategy", "multiworker", "--resume", "1", "--db",
                                 str(tmp_path / "l.db"), "--out-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "Expected TF_CONFIG task index in [0, 0]" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "l.db").exists()


def test_cifar_missing_image_dir_fails_before_any_run(tmp_path):
    db = str(tmp_path / "l.db")
    r = CliRunner().invoke(cli, ["cifar", "--image-dir", str(tmp_path / "nope"), "--db", db])
    assert r.exit_code != 0 and "Data folder not found" in r.output and "Traceback" not in r.output
    assert ExperimentLog(db).runs() == []


@pytest.mark.parametrize("command,cls,args", [("cifar", "CifarConfig", []), ("rice", "RiceConfig", []),
                                              ("compress", "CompressConfig", ["m.keras"])])
def test_every_option_default_is_its_config_field_default(command, cls, args):
    import dataclasses

    import experiments.config as config

    cls = getattr(config, cls)
    ctx = cli.commands[command].make_context(command, list(args))
    defaults = cls()
    # The positional argument (compress's MODEL) is the only field without an option.
    fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)} - ({"model"} if args else set())
    assert fields <= set(ctx.params)  # every config field has an option
    for name in fields:
        value = ctx.params[name]
        assert (tuple(value) if isinstance(value, list) else value) == getattr(defaults, name), name
    # Choice lists and ranges (open bounds too) come from the config's metadata.
    by_name = {p.name: p for p in cli.commands[command].params}
    ranges = 0
    for f in dataclasses.fields(cls):
        if f.metadata.get("choices"):
            assert tuple(by_name[f.name].type.choices) == f.metadata["choices"]
        elif f.name in by_name and not f.metadata["parse"] and (f.metadata["min"], f.metadata["max"]) != (None, None):
            t, m = by_name[f.name].type, f.metadata
            assert (t.min, t.max, t.min_open, t.max_open) == (m["min"], m["max"], m["min_open"], m["max_open"]), f.name
            ranges += 1
    assert ranges >= 8


def test_float_list_returns_one_type():
    from main_train import float_list

    assert float_list(None, None, "0.5") == (0.5,)
    assert float_list(None, None, "0.1, 0.2") == (0.1, 0.2)
    assert float_list(None, None, 0.3) == (0.3,)
    assert float_list(None, None, None) is None


def test_help_imports_no_tensorflow():
    import subprocess
    import sys

    from conftest import REPO

    code = "import sys, main_train; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_version_is_written_once():
    from conftest import REPO

    import pruning

    cfg = open(os.path.join(REPO, "setup.cfg")).read()
    assert "version = attr: pruning.__version__" in cfg and pruning.__version__ not in cfg


def test_prune_lists_the_convs_a_uniform_ratio_skips(tmp_path):
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(inp)
    x = keras.layers.Concatenate()([keras.layers.LayerNormalization(name="ln")(a), b])
    out = keras.layers.Conv2D(2, 1, name="head")(x)
    path, pruned = str(tmp_path / "m.keras"), str(tmp_path / "p.keras")
    keras.Model(inp, out).save(path)
    r = CliRunner().invoke(cli, ["prune", path, "--ratio", "0.5", "-o", pruned, "--db", str(tmp_path / "l.db")])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("skipped"))
    assert line.startswith("skipped 2 convs: ") and "a (" in line and "head (" in line and "model output" in line
    m = keras.models.load_model(pruned)
    assert m.get_layer("b").filters == 4 and m.get_layer("a").filters == 8
    # --allow-inexact prunes through the LayerNormalization too and prints the measured change
    inexact = str(tmp_path / "i.keras")
    r = CliRunner().invoke(cli, ["prune", path, "--ratio", "0.5", "-o", inexact, "--allow-inexact",
                                 "--db", str(tmp_path / "l.db")])
    assert r.exit_code == 0, r.output
    assert "Pruned inexactly through ln: the outputs changed by" in r.output
    m = keras.models.load_model(inexact)
    assert m.get_layer("a").filters == 4 and m.get_layer("ln").get_weights()[0].shape == (4,)
