"""The study skeleton (experiments/study.py) on a toy study: tiny Dense models, no training."""

import os

import keras
import numpy as np
import pytest

from experiments.study import Study, Variant, run_study
from save_sqlite import ExperimentLog


class Toy(Study):
    """Baseline: a Dense model whose bias is 1; variant k: that model with bias + k.
    `stop` names a variant key (or "baseline") that is interrupted (Ctrl-C) once."""

    experiment = "toy"
    seed = 3
    measure = {"latency_batch": None, "echo": lambda line: None}

    def __init__(self, out_dir, keys=(1, 2, 3), stop=None):
        self.out_dir, self.name, self.keys, self.stop = out_dir, "toy", keys, stop
        self.fields = {"model": "dense", "seed": 3, "config": {"keys": list(keys)}}
        self.baseline_summary = {"key": None}
        self.calls = []

    def _maybe_stop(self, what):
        self.calls.append(what)
        if what == self.stop:
            self.stop = None
            raise KeyboardInterrupt

    def baseline(self, run):
        self._maybe_stop("baseline")
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, bias_initializer="ones")])
        return model

    def load_parent(self, path):
        self.calls.append(("parent", path))
        return super().load_parent(path)

    def evaluate(self, model):
        return {"test_top1": float(model.layers[-1].bias.numpy()[0]) / 10}

    def _variant(self, key):
        return Variant(key, {"pruning_ratio": key / 10}, folder=f"v{key}", filename=f"v{key}.keras",
                       label=f"variant {key}", summary={"key": key})

    def variants(self):
        return [self._variant(k) for k in self.keys]

    def variant_of(self, row):
        return self._variant(round(row["pruning_ratio"] * 10))

    def variant(self, run, model, base, variant):
        self._maybe_stop(variant.key)
        assert np.random.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)  # seeded per variant
        clone = keras.models.clone_model(model)
        clone.set_weights([w + (variant.key if w.ndim == 1 else 0) for w in model.get_weights()])
        return clone


def test_baseline_variants_then_resume_of_an_interrupted_variant(tmp_path):
    log = ExperimentLog(str(tmp_path / "log.db"))
    out = str(tmp_path / "runs")
    study = Toy(out, stop=2)
    with pytest.raises(KeyboardInterrupt):  # variant 2 interrupted: variant 3 never starts
        run_study(study, log)
    rows = log.runs("toy")
    assert [(r["pruning_ratio"], r["status"], r["parent_id"]) for r in rows] == [
        (0.0, "completed", None), (0.1, "completed", 1), (0.2, "interrupted", 1)]
    assert os.path.basename(rows[1]["run_dir"]) == "2-toy-v1" and rows[0]["artifact"].endswith("1-toy-baseline"
                                                                                               "/baseline.keras")
    assert rows[1]["test_top1"] == pytest.approx(0.2)  # bias 1 + 1

    again = Toy(out)
    summaries = run_study(again, log, resume=3)
    # Only the interrupted variant runs again, in its own row and folder, from the finished baseline.
    assert again.calls == [("parent", rows[0]["artifact"]), 2]
    assert [s["key"] for s in summaries] == [2] and summaries[0]["run_id"] == 3
    assert summaries[0]["test_top1"] == pytest.approx(0.3)
    rows = log.runs("toy")
    assert len(rows) == 3 and rows[2]["status"] == "completed" and os.path.basename(rows[2]["run_dir"]) == "3-toy-v2"
    assert keras.models.load_model(rows[2]["artifact"]).layers[-1].bias.numpy()[0] == pytest.approx(3.0)


def test_a_resumed_baseline_goes_on_with_every_variant(tmp_path):
    log = ExperimentLog(str(tmp_path / "log.db"))
    out = str(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        run_study(Toy(out, keys=(1, 2), stop="baseline"), log)
    assert [r["status"] for r in log.runs("toy")] == ["interrupted"]
    study = Toy(out, keys=(1, 2))
    summaries = run_study(study, log, resume=1)
    assert study.calls == ["baseline", 1, 2]
    assert [(s["run_id"], s["key"]) for s in summaries] == [(1, None), (2, 1), (3, 2)]
    assert [(r["status"], r["parent_id"]) for r in log.runs("toy")] == [("completed", None), ("completed", 1),
                                                                        ("completed", 1)]


def test_an_unlogged_baseline_gives_one_row_without_parent_or_folder(tmp_path):
    log = ExperimentLog(str(tmp_path / "log.db"))
    study = Toy(None, keys=(1,))
    study.logged = False
    study.variants = lambda: [Variant(1, {"pruning_ratio": 0.1}, artifact=str(tmp_path / "out.keras"))]
    (summary,) = run_study(study, log)
    (row,) = log.runs("toy")
    assert row["parent_id"] is None and row["run_dir"] is None and row["artifact"] == str(tmp_path / "out.keras")
    assert summary["run_id"] == row["id"] and os.path.exists(tmp_path / "out.keras")
