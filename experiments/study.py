"""The one skeleton of every pruning study: baseline -> variants -> resume.

A study (rice, cifar, prune) is a baseline model and one pruned *variant* of it per
ratio, ranker or plan. `run_study` owns the sequence and the log; a `Study` supplies
the steps:

    resume a child?  -> its finished baseline is loaded (`Study.load_parent`) and
                        only that child's variant runs again, in its own row
    else             -> the baseline run (`Study.baseline`, then `finish_model_run`);
                        with `Study.logged = False` the baseline is only built (prune:
                        the user's model file), with no row
    `Study.prepare`  -> once, outside any run (rice: the filter scores; prune: the plan)
    each variant     -> a child run (`parent_id` = the baseline run): its folder, the
                        seed, `Study.variant`, then `finish_model_run` against the baseline

Every run is a `save_sqlite` run: an exception marks it failed, Ctrl-C or SIGTERM
interrupted (`--resume RUN_ID` continues it), and the runs after it are not started.
"""

import dataclasses
import json

import keras

from experiments import common
from experiments.config import from_dict


@dataclasses.dataclass
class Variant:
    """One child run of a study.

    Attributes:
        key: what tells this variant apart from the others (rice: its ratio; cifar: its ranker).
        fields: its own log fields (ranker, pruning_ratio, rates), besides the study's `fields`.
        folder: its run folder's name under the study's `out_dir` (None: no folder).
        filename: the model's file name in that folder.
        label: the start of its summary line.
        summary: keys added to its summary dict (e.g. {"ratio": 0.5}).
        artifact: where its model is saved instead of `<run folder>/<filename>`.
    """

    key: object
    fields: dict
    folder: str = None
    filename: str = "model.keras"
    label: str = "model"
    summary: dict = dataclasses.field(default_factory=dict)
    artifact: str = None


class Study:
    """The steps of one study, for `run_study`. A subclass sets the attributes and
    overrides the steps it needs.

    Attributes:
        experiment: the log's experiment name of every run.
        fields: log fields of every run (model, dataset, seed, config).
        out_dir: root of the run folders (None: runs without folders).
        name: the start of every run folder's name.
        seed: set (`common.set_seed`) at the start of each variant; None: not set.
        logged: whether the baseline is a run of its own (False: it is only built).
        measure: `finish_model_run` options of every run (latency_batch, latency_runs, echo).
        baseline_finish: `finish_model_run` options of the baseline run.
        baseline_summary: keys added to the baseline's summary dict.
        evaluate: `evaluate(model)`, the run fields of a model (`common.finish_model_run`'s
            `evaluate`); None: no test data.
    """

    experiment = None
    fields = {}
    out_dir = None
    name = ""
    seed = None
    logged = True
    measure = {}
    baseline_finish = {"filename": "baseline.keras", "label": "baseline"}
    baseline_summary = {}
    evaluate = None  # a method `evaluate(model) -> run fields` (see `common.finish_model_run`); None: no test data

    def baseline(self, run):
        """The baseline model, trained or loaded, inside its run (None when not `logged`)."""
        raise NotImplementedError

    def load_parent(self, path):
        """The finished baseline model at `path`, for a resumed child."""
        return keras.models.load_model(path)

    def variants(self):
        """The variants of a fresh (or resumed baseline) study, in order."""
        raise NotImplementedError

    def variant_of(self, row):
        """The variant of a resumed child run (its log row)."""
        raise NotImplementedError

    def prepare(self, model, base):
        """Once, after the baseline (`base`: its summary, None when not logged) and
        before any variant, outside any run."""

    def variant(self, run, model, base, variant):
        """The variant's model (pruned, retrained) from the baseline `model`, inside its run."""
        raise NotImplementedError


def resumed_config(log, resume, experiment, cls, **override):
    """(row, config) of interrupted run `resume` of `experiment`: the config the run
    was started with (its recorded JSON, with `override(row)` values), or (None, None)
    without `resume`. A run that cannot be resumed is a ValueError saying why."""
    if resume is None:
        return None, None
    row = log.resumable(resume, experiment)
    values = json.loads(row["config"] or "{}")
    values.update({k: fn(row) for k, fn in override.items()})
    return row, from_dict(cls, values)


def run_study(study, log, resume=None):
    """Runs `study` in experiment log `log`; returns one summary dict per run (the
    baseline's first when it ran). With `resume=run_id`: a baseline continues in its
    own row and goes on with every variant; a variant (a run with a parent) continues
    in its own row from its finished baseline, alone."""
    row = log.get_run(resume) if resume is not None else None
    child = row is not None and row["parent_id"] is not None
    summaries = []
    if child:
        path, base = common.finished_parent(log, row)
        model = study.load_parent(path)
    elif not study.logged:
        model, base = study.baseline(None), None
    else:
        with log.run(study.experiment, resume=resume, pruning_ratio=0.0, **study.fields) as run:
            if study.out_dir:
                run.make_dir(study.out_dir, f"{study.name}-baseline")
            model = study.baseline(run)
            base = common.finish_model_run(run, model, study.evaluate, **study.baseline_finish, **study.measure)
        summaries.append({**base, **study.baseline_summary})
    study.prepare(model, base)
    for v in [study.variant_of(row)] if child else study.variants():
        parent = {"parent_id": base["run_id"]} if base else {}
        with log.run(study.experiment, resume=resume if child else None, **study.fields, **v.fields,
                     **parent) as run:
            if study.out_dir and v.folder:
                run.make_dir(study.out_dir, f"{study.name}-{v.folder}")
            if study.seed is not None:
                common.set_seed(study.seed)
            pruned = study.variant(run, model, base, v)
            summary = common.finish_model_run(run, pruned, study.evaluate, filename=v.filename, baseline=base,
                                              artifact=v.artifact, label=v.label, **study.measure)
        summaries.append({**summary, **v.summary})
    return summaries
