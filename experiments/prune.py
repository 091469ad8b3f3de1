"""Prune any Keras model file with a ranker and ratio, or a plan file: one logged run.

    cfg = PruneConfig(model_path="model.keras", ratio=(0.5,), output="pruned.keras")
    summary = run_prune(cfg, ExperimentLog())

The study skeleton (`experiments.study`) with an unlogged baseline (the user's file)
and one variant: every check, the ranking, the plan and the pruning come before the
run's row exists (a bad input leaves no row and no file); the run then records the
plan's per-layer counts, writes --save-plan and the model, and finishes.
"""

import os
import warnings

from experiments import common, files
from experiments.config import InputError
from experiments.study import Study, Variant, run_study
from pruning import CNNModel, PrunePlan, get_ranker
from pruning import prune as prune_model
from pruning.plan import resolve_ratios


def rank_data(model, cfg):
    """Batches of preprocessed images of `cfg.data_dir` (a class folder) for data-driven
    rankers, or None without one; a file that does not decode is an error naming it."""
    if not cfg.data_dir:
        return None
    from experiments.data import check_readable, folder_dataset, list_image_folder, preprocessing

    paths, labels, _ = list_image_folder(cfg.data_dir, cfg.limit_per_class)
    check_readable(paths)
    size = cfg.image_size or model.inputs[0].shape[1]
    return folder_dataset(paths, labels, size, cfg.batch_size, preprocess=preprocessing(cfg.preprocess))


def scores_for(model, cfg, ranks_dir=None, progress=None):
    """Filter scores of every conv of `model` by the ranking fields of `cfg`
    (`config.RANKING_FIELDS`), cached in `ranks_dir` (see `common.compute_scores`)."""
    data = rank_data(model, cfg)
    if get_ranker(cfg.ranker).needs_data and data is None:
        raise ValueError(f"The '{cfg.ranker}' ranker needs images: pass --data-dir.")
    scores, _ = common.compute_scores(model, cfg.ranker, data=data, ranks_dir=ranks_dir, seed=cfg.seed,
                                      rank_batches=cfg.rank_batches, progress=progress)
    return scores


class PruneStudy(Study):
    """The prune steps of `experiments.study.run_study`. An `InputError` (the CLI exits
    2) is a bad input; any other ValueError (exit 1) a file or log that cannot be
    read or written, or a plan that does not fit the model."""

    experiment = "prune"
    logged = False  # the baseline is the user's file, not a run

    def __init__(self, cfg, log, progress=None, echo=print):
        self.cfg, self.log, self.progress, self.echo = cfg, log, progress, echo
        self.measure = {"latency_batch": None, "echo": lambda line: None}

    def baseline(self, run):
        cfg = self.cfg
        outputs = [(path, option) for path, option in ((cfg.output, "--output"), (cfg.save_plan, "--save-plan"))
                   if path]
        for path, option in outputs:
            files.check_writable_file(path, option)
        for path, option in outputs:
            files.check_output_owner(self.log, path, cfg.force, option)
        model = common.load_model_file(cfg.model_path, error=ValueError)
        self.model, self.applied = model, None
        try:
            self.cnn = CNNModel(model, allow_inexact=cfg.allow_inexact)
            if not cfg.plan_path:  # before a possibly long ranking: names, prunable convs, one ratio per conv
                common.check_prunable(self.cnn, cfg.exclude, repr(cfg.model_path))
                self.applied = resolve_ratios(self.cnn, cfg.rate_spec, cfg.exclude)
        except ValueError as e:
            raise InputError(str(e)) from None
        return model

    def prepare(self, model, base):
        cfg, cnn = self.cfg, self.cnn
        if cfg.plan_path:
            plan = PrunePlan.load(cfg.plan_path)
            plan.validate(cnn)
        else:
            plan = PrunePlan.from_scores(cnn, scores_for(model, cfg, progress=self.progress), cfg.rate_spec,
                                         exclude=cfg.exclude, meta={"ranker": cfg.ranker}, round_to=cfg.round_to,
                                         round_mode=cfg.round_mode)
        with warnings.catch_warnings(record=True) as caught:  # --allow-inexact: the measured change
            warnings.simplefilter("always", UserWarning)
            self.pruned = prune_model(cnn, plan)
        for w in caught:
            if str(w.message).startswith("Pruned inexactly"):
                self.echo(str(w.message))
        if all(len(k) == plan.filters.get(n, len(k)) for n, k in plan.keep.items()):
            raise InputError(f"Nothing to prune: the plan removes no filter of {cfg.model_path!r} (whole filter "
                             "counts: a small ratio of a small conv rounds to 0). Give a larger --ratio.")
        rates = cfg.rate_spec
        if self.applied is not None and (isinstance(rates, list) or cfg.exclude):
            rates = [self.applied[c.name] for c in cnn.conv_layers]  # what was applied (excluded convs: 0)
        self.plan, self.rates = plan, rates
        self.fields = {"model": os.path.basename(cfg.model_path), "seed": cfg.seed,
                       "config": {"model": cfg.model_path, "plan": plan.to_dict(), "output": cfg.output}}

    def variants(self):
        rates = self.rates
        return [Variant(None, {"ranker": self.plan.meta.get("ranker"),
                               "pruning_ratio": rates if isinstance(rates, float) else None,
                               "rates": rates if isinstance(rates, list) else None},
                        artifact=self.cfg.output, label="pruned")]

    def variant(self, run, model, base, variant):
        self.log.log_layer_prunes(run.id, self.plan, self.plan.meta.get("ranker"))
        if self.cfg.save_plan:  # before the run is marked completed, so a failing save fails the run
            files.write_text(self.cfg.save_plan, self.plan.to_json())
            self.log.add_outputs(run.id, {self.cfg.save_plan: "plan"})
        return self.pruned


def run_prune(cfg, log, progress=None, echo=print, resume=None):
    """Prunes `cfg.model_path` to `cfg.output` in one run of `log`; returns its summary
    (`common.finish_model_run`'s) with the plan and the sizes before and after."""
    if resume is not None:
        raise ValueError(f"prune runs cannot be resumed. Received: resume={resume}; run it again instead.")
    cfg.validate()
    study = PruneStudy(cfg, log, progress, echo)
    (summary,) = run_study(study, log)
    return {**summary, "plan": study.plan, "before": common.model_sizes(study.model),
            "after": common.model_sizes(study.pruned)}


def summary_lines(summary):
    """What `prune` prints after its run: the convs a uniform ratio left alone and why,
    the sizes before and after, and the file written."""
    from pruning.stats import format_stats

    skipped = summary["plan"].meta.get("skipped") or {}
    lines = [f"skipped {len(skipped)} convs: " + "; ".join(f"{name} ({why})" for name, why in skipped.items())
             ] if skipped else []
    before, after = summary["before"], summary["after"]
    if before["macs"] is None:
        lines.append(f"params {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.3f}); "
                     "MACs not counted: the input size is dynamic (`stats --image-size N` counts them)")
    else:
        lines.append(format_stats(before, after))
    return [*lines, f"wrote {summary['artifact']} (run {summary['run_id']})"]
