"""Command line: train, prune, rank, measure, and read the experiment log.

    python main_train.py --help
    python main_train.py rice --data-dir data/rice_sample --weights none --image-size 64
    python main_train.py logs list
"""

import contextlib
import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from experiments.config import (RANKING_FIELDS, CifarConfig, CompressConfig, ExportConfig, InputError,  # noqa: E402
                                PruneConfig, RiceConfig, check_field, cli_fields, field_kind)
from save_sqlite import DEFAULT_DB, ENV_VAR, STATUSES, TABLES  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageFailure(click.ClickException):
    """A bad value found after parsing (by a config's validate): one line, exit code 2."""

    exit_code = 2


def db_option(fn):
    return click.option("--db", envvar=ENV_VAR, default=DEFAULT_DB, show_default=True,
                        help=f"SQLite experiment log (or set ${ENV_VAR}).")(fn)


def comma_list(ctx, param, value):
    """'a,b' -> ('a', 'b'); '' -> ()."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return tuple(v for v in (value or "").replace(" ", "").split(",") if v)


def float_list(ctx, param, value):
    """'0.5' -> (0.5,); '0.1,0.2' -> (0.1, 0.2); None stays None. Always a tuple."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    try:
        parts = tuple(float(v) for v in str(value).replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"Expected a number or comma-separated numbers. Received: {value!r}")
    if not parts:
        raise click.BadParameter(f"Expected at least one number. Received: {value!r}")
    return parts


def int_list(ctx, param, value):
    """'12001,15000' (or '12001-15000') -> (12001, 15000). Always a tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    try:
        parts = tuple(int(v) for v in str(value).replace(" ", "").replace("-", ",").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"Expected whole numbers separated by commas. Received: {value!r}")
    if not parts:
        raise click.BadParameter(f"Expected at least one whole number. Received: {value!r}")
    return parts


PARSERS = {"floats": float_list, "ints": int_list, "names": comma_list}


def config_option(field):
    """The click option of a config field, from its type, default and metadata: the choices and
    range (`click.Choice`, `click.IntRange` / `click.FloatRange` with open bounds) of a value or of
    each value of a repeated option; a comma-separated option is parsed, then checked by the same
    `check_field` as the config's `validate()`."""
    meta = field.metadata
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    decls = [flag, field.name] if flag != "--" + field.name.replace("_", "-") else [flag]
    if flag.startswith("-") and not flag.startswith("--"):
        decls = [flag, "--" + field.name.replace("_", "-")]
    kind, _, item = field_kind(field)
    kwargs = {"default": field.default, "help": meta["help"], "show_default": field.default is not None}
    if kind is bool:
        name = field.name.replace("_", "-")
        return click.option(f"--{name}/--no-{name}", field.name, **kwargs)
    if meta.get("parse"):
        parse = PARSERS[meta["parse"]]

        def parse_and_check(ctx, param, value):
            value = parse(ctx, param, value)
            try:
                check_field(field, value)
            except ValueError as e:
                raise click.BadParameter(str(e)) from e
            return value
        kwargs.update(callback=parse_and_check, type=str, default=None if field.default is None else
                      ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in field.default))
        kwargs["show_default"] = field.default is not None
        return click.option(*decls, **kwargs)
    if meta.get("multiple"):
        kwargs.update(multiple=True, default=list(field.default))
        kind = item
    if meta.get("choices"):
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind in (int, float) and (meta.get("min") is not None or meta.get("max") is not None):
        kwargs["type"] = (click.IntRange if kind is int else click.FloatRange)(
            meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
            max_open=meta.get("max_open", False))
    elif kind in (int, float, str):
        kwargs["type"] = kind
    return click.option(*decls, **kwargs)


def config_options(cls, skip=()):
    """Decorator: one click option per field of config dataclass `cls` (see
    experiments/config.py), in field order."""
    def decorate(fn):
        for field in reversed(cli_fields(cls)):
            if field.name not in skip:
                fn = config_option(field)(fn)
        return fn
    return decorate


def config_from_options(cls, options):
    """The config dataclass from the parsed option values of its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in names})


def resume_option(fn):
    return click.option("--resume", type=int, default=None, metavar="RUN_ID",
                        help="Continue this interrupted run from its last finished epoch, in the same row, "
                             "with the config it was started with (other options are ignored); a resumed "
                             "baseline goes on with its pruned runs.")(fn)


@contextlib.contextmanager
def progressbar(label, total):
    with click.progressbar(length=total, label=label, file=click.get_text_stream("stderr")) as bar:
        yield bar.update


def fail(e):
    raise click.ClickException(str(e)) from e


NOT_RESUMABLE = ("compress", "prune", "export")  # experiments (and their commands) without --resume


def open_log(db, readonly=False):
    """The experiment log, or a one-line error naming the path and the reason."""
    from save_sqlite import ExperimentLog

    try:
        log = ExperimentLog(db, readonly=readonly)
    except ValueError as e:
        fail(e)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # closed when the command ends: its writes are then in the .db file itself, no -wal beside it
        ctx.call_on_close(log.close)
    if log.immutable:
        click.echo(f"note: {db} is on read-only media: opened it with immutable=1 (writes made to it elsewhere "
                   "since are not seen)", err=True)
    for run_id in getattr(log, "interrupted", []):
        how = (f"continue it with --resume {run_id}" if log.get_run(run_id)["experiment"] not in NOT_RESUMABLE
               else "it cannot be resumed: run its command again")
        click.echo(f"run {run_id} was left running by a process that is gone: marked interrupted ({how})", err=True)
    return log


@contextlib.contextmanager
def interrupt_message(resumable=True):
    """Ctrl-C or SIGTERM: the run is already marked interrupted; say how to resume."""
    try:
        yield
    except KeyboardInterrupt as e:
        how = "--resume RUN_ID continues it." if resumable else "this command cannot resume it: run it again."
        click.echo(f"\ninterrupted ({type(e).__name__}); `logs list --status interrupted` shows the run, {how}",
                   err=True)
        raise SystemExit(143 if type(e).__name__ == "Terminated" else 130)


@contextlib.contextmanager
def log_failure():
    """A log that stayed locked or full to the end of a run: its one line, which names
    the cause and where the run's model is saved (exit 1)."""
    from save_sqlite import LogUnavailable

    try:
        yield
    except LogUnavailable as e:
        fail(e)


def run_experiment(run_fn, cfg, db, resume=None, check=None):
    """Opens the log, then runs an experiment. A ValueError in the config (before any
    run) is a usage error (exit 2); one found mid-run (bad data or weights, whose run
    is then already marked failed) exits 1; both print one line. `check(log)`, if
    given, runs once the log is open, before any work (a ValueError: exit 1). Under
    --strategy multiworker the same steps run on this worker of the cluster (`join_cluster`)."""
    if resume is None:
        try:
            cfg.validate()
        except ValueError as e:
            raise UsageFailure(str(e)) from e
        from experiments.files import ensure_writable_dir

        try:
            if getattr(cfg, "out_dir", None):  # prune writes no run folder
                ensure_writable_dir(cfg.out_dir)
        except ValueError as e:
            fail(e)
    cluster = getattr(cfg, "strategy", None) == "multiworker"
    if cluster:
        from experiments import distribute

        given, (cfg, db) = cfg, join_cluster(cfg, db)
    lost = distribute.WorkerLost if cluster else ()  # a cluster's lost worker: restart and resume
    log = open_log(db)
    if check is not None:
        try:
            check(log)
        except ValueError as e:
            fail(e)
    resumable = run_fn.__name__.removeprefix("run_") not in NOT_RESUMABLE
    if cluster and resume is None and resumable:
        resume = distribute.interrupted_run(log, run_fn.__name__.removeprefix("run_"), cfg)
        if resume is not None:
            click.echo(f"resuming interrupted run {resume} of this cluster", err=True)
    with interrupt_message(resumable):
        try:
            summaries = run_fn(cfg, log, progress=progressbar, echo=click.echo, resume=resume)
        except InputError as e:  # found by the experiment's own checks, before any run
            raise UsageFailure(str(e)) from e
        except ValueError as e:
            fail(e)
        except lost:
            log.close()
            distribute.restart_process(echo=lambda m: click.echo(m, err=True))
            raise
    if cluster:
        distribute.remove_worker_files(given)
    return summaries


def join_cluster(cfg, db):
    """Under --strategy multiworker (docs/distributed.md), (config, log path) of this
    worker of the TF_CONFIG cluster, once the cluster has formed: every worker runs the
    same steps; only the chief (worker 0) writes the log and the run folders, the others
    a scratch folder deleted at the end. A worker that finds its own run interrupted (it
    was restarted, or the cluster lost a worker) resumes it; when a worker is lost
    mid-run this one restarts itself and waits for it."""
    from experiments import distribute

    try:  # a bad TF_CONFIG is checked by cfg.validate(), but not with --resume
        cfg, db = distribute.worker_setup(cfg, db)
        distribute.connect_cluster(cfg.worker_timeout)
    except ValueError as e:
        raise UsageFailure(str(e)) from e
    return cfg, db


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="keras-pruning-toolkit")
def cli():
    """Transfer learning and structured filter pruning for Keras 3 CNNs.

    Every training command writes its runs, epochs and pruned layers to an SQLite
    log (logs/experiments.db by default); `logs` and `report` read it.
    """


# ---------------------------------------------------------- cifar and rice
def experiment_command(cls, run, results_help, argument=None, results_files=lambda results: [results]):
    """Decorator: a training command whose options are the fields of config `cls`,
    plus --results (unless `results_help` is None), --db, --resume (unless the command
    is NOT_RESUMABLE) and (unless `cls` has a `force` field) --force
    (`argument`: a field given as the command's positional argument instead). `run`
    ("module:function") runs the experiment; the decorated function
    `fn(cfg, summaries, results)` reports its summaries into the files
    `results_files(results)`, which no finished run may own (unless --force)."""
    def decorate(fn):
        has_force = "force" in {f.name for f in dataclasses.fields(cls)}

        def command(db, results=None, resume=None, force=False, **options):
            import importlib

            from experiments.files import check_output_owner, check_writable_file
            from experiments.distribute import is_chief

            module, name = run.split(":")
            if has_force:
                options["force"] = force
            cfg = config_from_options(cls, options)
            files, opened = [], []  # the --results files this process checks, writes and records; its log

            def check(log):  # on a cluster, once it has formed: only the chief writes the results
                opened.append(log)
                if results and (getattr(cfg, "strategy", None) != "multiworker" or is_chief()):
                    files.extend(results_files(results))
                for path in files:
                    check_writable_file(path, "--results")
                    check_output_owner(log, path, force, "--results")

            summaries = run_experiment(getattr(importlib.import_module(module), name), cfg, db, resume, check)
            try:
                fn(cfg, summaries, results if files else None)
            except ValueError as e:  # an unwritable --results path
                fail(e)
            if files:
                first = summaries[0] if isinstance(summaries, list) else summaries
                opened[0].add_outputs(first["run_id"], {p: "results" for p in files})
        if not has_force:
            command = click.option("--force", is_flag=True,
                                   help="Replace --results even when it holds a finished run's file.")(command)
        if results_help:
            command = click.option("--results", default=None, help=results_help)(command)
        if fn.__name__ not in NOT_RESUMABLE:
            command = resume_option(command)
        command = db_option(command)
        command = cli.command(fn.__name__, context_settings=CONTEXT, help=fn.__doc__)(
            config_options(cls, skip=(argument,))(command))
        if argument:
            command = click.argument(argument.upper())(command)
            command.params.insert(0, command.params.pop())  # the argument first in --help
        return command
    return decorate


@experiment_command(CifarConfig, "experiments.cifar_hrank:run_cifar",
                    "Write the comparison table (Markdown) to this file.")
def cifar(cfg, summaries, results):
    """HRank on CIFAR: pretrain VGG16-BN, rank filters, prune and fine-tune."""
    from experiments.cifar_hrank import comparison_table, results_markdown
    from experiments.files import write_text

    click.echo(comparison_table(summaries))
    if results:
        write_text(results, results_markdown(cfg, summaries))
        click.echo(f"wrote {results}")


@experiment_command(RiceConfig, "experiments.rice:run_rice", "Folder for the results table and plot (e.g. results/).",
                    results_files=lambda results: [os.path.join(results, "rice_results.md"),
                                                   os.path.join(results, "rice_accuracy.png")])
def rice(cfg, summaries, results):
    """Rice varieties: VGG16 transfer learning, then pruning and retraining."""
    from experiments.report import rice_results

    for path in rice_results(cfg, summaries, results) if results else []:
        click.echo(f"wrote {path}")


# ---------------------------------------------------------------- prune / rank
def load_keras_model(path):
    """A .keras (or .h5) model, or a one-line error saying why it cannot be read."""
    from experiments.common import load_model_file

    try:
        return load_model_file(path)
    except ValueError as e:
        raise click.ClickException(str(e)) from e


@experiment_command(PruneConfig, "experiments.prune:run_prune", None, argument="model_path")
def prune(cfg, summary, results):
    """Prune any .keras model with a ranker and ratio (or a plan file)."""
    from experiments.prune import summary_lines

    for line in summary_lines(summary):
        click.echo(line)


@cli.command(context_settings=CONTEXT)
@click.argument("model_path")
@config_options(PruneConfig, skip=[f.name for f in cli_fields(PruneConfig) if f.name not in RANKING_FIELDS])
@click.option("--out-dir", required=True,
              help="Folder for the score files: rank_conv{i}.npy for hrank, {ranker}_conv{i}.npy for others "
                   "(i: 1-based conv order).")
def rank(model_path, out_dir, **ranking):
    """Score every conv's filters and save them as rank_conv{i}.npy (hrank) or {ranker}_conv{i}.npy."""
    from experiments.files import ensure_writable_dir
    from experiments.prune import scores_for
    from pruning import CNNModel
    from pruning.rankers import score_file

    cfg = config_from_options(PruneConfig, {**ranking, "model_path": model_path})
    model = load_keras_model(model_path)
    try:
        ensure_writable_dir(out_dir)
        scores = scores_for(model, cfg, ranks_dir=out_dir, progress=progressbar)
    except ValueError as e:
        fail(e)
    for conv in CNNModel(model).conv_layers:
        s = scores[conv.name]
        click.echo(f"{score_file(cfg.ranker, conv.index)}  {conv.name:<20} {conv.filters:>5} filters  "
                   f"mean {s.mean():.4g}  min {s.min():.4g}  max {s.max():.4g}")


@cli.command(context_settings=CONTEXT)
@click.argument("model_path", required=False)
@click.option("--latency-batch", type=click.IntRange(1), default=16, show_default=True,
              help="Batch size for latency (images).")
@click.option("--runs", type=click.IntRange(1), default=20, show_default=True, help="Timed inference calls.")
@click.option("--per-layer/--no-per-layer", default=False, show_default=True, help="List every layer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--image-size", type=click.IntRange(1), default=None,
              help="Input size (pixels, square) for a model whose input size is dynamic or not yet built.")
@click.option("--compare", nargs=2, default=None, metavar="A.keras B.keras",
              help="Time two models in the same window in interleaved rounds; B's speed-up over A.")
@click.option("--rounds", type=click.IntRange(1), default=None,
              help="Interleaved rounds of --compare (default: --runs rounds of one call per model).")
def stats(model_path, latency_batch, runs, per_layer, as_json, image_size, compare, rounds):
    """Params, MACs and measured latency of a .keras model (or --compare A.keras B.keras)."""
    from experiments.common import dynamic_input, fixed_input, model_sizes
    from pruning import CNNModel, layer_stats, measure_latency

    if compare:
        if model_path:
            raise click.UsageError(f"Give either MODEL_PATH or --compare A B. Received: {model_path!r} and "
                                   f"--compare {' '.join(compare)}")
        return compare_latency(compare, latency_batch, runs, rounds, as_json)
    if not model_path:
        raise click.UsageError("Missing argument 'MODEL_PATH' (or give --compare A.keras B.keras).")
    model = load_keras_model(model_path)
    try:
        model = fixed_input(model, image_size)
    except ValueError as e:
        raise UsageFailure(str(e)) from e
    # What cannot be measured, and why (None: everything can).
    missing = (f"the input shape {tuple(model.inputs[0].shape)} is dynamic: pass --image-size"
               if dynamic_input(model) else None)
    latency, slow = None, missing or (f"latency is timed for one input; the model has {len(model.inputs)}"
                                      if len(model.inputs) > 1 else None)
    if slow is None:
        with progressbar("measuring latency", runs) as update:
            latency = measure_latency(model, batch_size=latency_batch, runs=runs, progress=update)
    totals = model_sizes(model)
    convs = [{"name": c.name, "filters": c.filters, "prunable": c.prunable} for c in CNNModel(model).conv_layers]
    if as_json:
        click.echo(json.dumps({**totals, "latency": latency, "convs": convs, "not_measured": slow,
                               **({"layers": layer_stats(model)} if per_layer and not missing else {})}, indent=1))
        return
    if per_layer and not missing:
        click.echo(f"{'layer':<28}{'class':<22}{'params':>12}{'MACs':>16}")
        for r in layer_stats(model):
            click.echo(f"{r['layer']:<28}{r['class']:<22}{r['params']:>12,}{r['macs']:>16,}")
    macs = f"{totals['macs']:,}" if not missing else f"not counted: {missing}"
    click.echo(f"trainable params  {totals['trainable_params']:,}\nparams (total)    {totals['params']:,}\n"
               f"MACs              {macs}\n"
               + (f"latency           {latency['ms_per_batch']:.2f} ms per batch of {latency_batch} "
                  f"(p90 {latency['ms_p90']:.2f} ms, {latency['ms_per_image']:.3f} ms/image)\n" if latency else
                  f"latency           not measured: {slow}\n")
               + f"prunable convs    {sum(c['prunable'] for c in convs)} of {len(convs)}")


def compare_latency(paths, latency_batch, runs, rounds, as_json):
    """`stats --compare A B`: both models timed in interleaved rounds; B's speed-up over A."""
    from pruning import model_stats
    from pruning.latency import format_timing, interleaved_latency

    models = [load_keras_model(p) for p in paths]
    names = ["A", "B"]
    rounds = rounds or runs
    try:
        with progressbar("measuring latency (interleaved)", 2 * rounds) as update:
            timing = interleaved_latency(dict(zip(names, models)), batch_size=latency_batch,
                                         runs=max(1, -(-runs // rounds)), rounds=rounds, progress=update)
    except ValueError as e:
        fail(e)
    macs = [model_stats(m)["macs"] for m in models]
    if as_json:
        click.echo(json.dumps({**timing, "paths": dict(zip(names, paths)), "macs": dict(zip(names, macs))},
                              indent=1))
        return
    click.echo(format_timing(timing, labels=dict(zip(names, paths))))
    click.echo(f"{paths[1]}: {timing['speedup']['B']:.2f}x the speed of {paths[0]} "
               f"({macs[1] / max(macs[0], 1):.2f}x its MACs)")


# -------------------------------------------------------------------- compress
@experiment_command(CompressConfig, "experiments.compress:run_compress",
                    "Write the summary (Markdown: targets, steps, kept filters) to this file.", argument="model")
def compress(cfg, summary, results):
    """Compress a .keras model to a MAC, parameter or latency target, with fine-tuning."""
    from experiments.files import write_text
    from experiments.compress import kept_filters_line, summary_markdown

    click.echo(kept_filters_line(summary))
    if results:
        write_text(results, summary_markdown(summary))
        click.echo(f"wrote {results}")


# ---------------------------------------------------------------------- export
@experiment_command(ExportConfig, "experiments.deploy:run_export", None, argument="model_path")
def export(cfg, record, results):
    """Fold BatchNorm, export (LiteRT, SavedModel, ONNX; float, float16, dynamic, int8), check and time it."""
    # The run printed its summary line (`experiments.deploy.summary_line`).


# ------------------------------------------------------------------------ logs
@cli.group(context_settings=CONTEXT)
def logs():
    """List, show and export runs of the experiment log."""


@logs.command("list", context_settings=CONTEXT)
@click.option("--experiment", default=None, help="Only runs of this experiment (cifar, rice, prune, ...).")
@click.option("--status", type=click.Choice(STATUSES), default=None,
              help="Only runs with this status (a running row whose process is gone reads as interrupted).")
@db_option
def logs_list(experiment, status, db):
    """One line per run."""
    rows = open_log(db, readonly=True).runs(experiment, status)
    click.echo(f"{'id':>4} {'experiment':<10} {'dataset':<18} {'ranker':<7} {'ratio':>6} {'seed':>4} "
               f"{'status':<11} {'top1':>7} {'params':>12} {'ms':>8} parent")
    for r in rows:
        click.echo(f"{r['id']:>4} {r['experiment']:<10} {str(r['dataset'] or '')[:18]:<18} "
                   f"{r['ranker'] or '':<7} {_fmt(r['pruning_ratio'], '.3g'):>6} {_fmt(r['seed'], 'd'):>4} "
                   f"{r['status']:<11} {_fmt(r['test_top1'], '.4f'):>7} {_fmt(r['params'], ',d'):>12} "
                   f"{_fmt(r['latency_ms'], '.1f'):>8} {r['parent_id'] or ''}")


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


@logs.command("show", context_settings=CONTEXT)
@click.argument("run_id", type=int)
@db_option
def logs_show(run_id, db):
    """A run with its config, pruned layers and epochs."""
    log = open_log(db, readonly=True)
    try:
        run = log.get_run(run_id)
    except ValueError as e:
        fail(e)
    for key, value in run.items():
        if key in ("config", "metrics") and value:
            value = json.dumps(json.loads(value), indent=1)
        if value is not None:
            click.echo(f"{key}: {value}")
    prunes = log.layer_prunes(run_id)
    if prunes:
        click.echo("\npruned layers:")
        for p in prunes:
            click.echo(f"  {p['layer']:<20} {p['filters_before']:>5} -> {p['filters_after']:>5}")
    click.echo(f"\n{'phase':<14}{'epoch':>6}{'seconds':>10}{'loss':>10}{'acc':>8}{'val_loss':>10}{'val_acc':>9}"
               f"{'lr':>10}")
    for e in log.epochs(run_id):
        click.echo(f"{e['phase']:<14}{e['epoch']:>6}{e['seconds']:>10.2f}{_fmt(e['loss'], '.4f'):>10}"
                   f"{_fmt(e['accuracy'], '.4f'):>8}{_fmt(e['val_loss'], '.4f'):>10}"
                   f"{_fmt(e['val_accuracy'], '.4f'):>9}{_fmt(e['lr'], '.2e'):>10}")


@logs.command("export", context_settings=CONTEXT)
@click.option("--table", type=click.Choice(TABLES), default="runs", show_default=True,
              help="Which table or view to export.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
              help="Output format.")
@click.option("--output", "-o", default="-", show_default=True, help="File, or - for standard output.")
@db_option
def logs_export(table, fmt, output, db):
    """Export a table of the log as CSV or JSON."""
    import csv
    import io

    columns, rows = open_log(db, readonly=True).rows(table)
    buf = io.StringIO()
    if fmt == "json":
        json.dump(rows, buf, indent=1)
        buf.write("\n")
    else:
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if output == "-":
        click.echo(buf.getvalue(), nl=False)
    else:
        from experiments.files import write_text

        try:
            write_text(output, buf.getvalue())
        except ValueError as e:
            fail(e)
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)


# ---------------------------------------------------------------------- report
@cli.command(context_settings=CONTEXT)
@click.option("--out-dir", default="results", show_default=True, help="Folder for report.md and the PNGs.")
@click.option("--force", is_flag=True, help="Replace a report.md built from more completed runs than this log has.")
@db_option
def report(out_dir, force, db):
    """Markdown summary and plots of every completed run in the log."""
    from experiments.report import write_report

    log = open_log(db, readonly=True)
    try:
        paths = write_report(log, out_dir, force=force)
    except ValueError as e:
        fail(e)
    for path in paths:
        click.echo(f"wrote {path}")


# ------------------------------------------------------------------- dashboard
@cli.command(context_settings=CONTEXT)
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).")
@db_option
def dashboard(port, host, db):
    """Browse the experiment log in a Streamlit app: runs, one run's curves and reports, comparisons.

    The log is opened read-only (never created, migrated or written); reload the page to see
    runs written meanwhile. Needs the dashboard extra: pip install -e ".[dashboard]".
    """
    import importlib.util
    import subprocess
    import sys

    from save_sqlite import sigterm_as_interrupt

    missing = [m for m in ("streamlit", "altair") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageFailure(f"The dashboard needs {' and '.join(missing)}, from the dashboard extra: "
                           'pip install -e ".[dashboard]"')
    from experiments.dashboard import APP

    open_log(db, readonly=True).close()  # a missing or foreign log: the one line `logs` gives
    command = [sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port), "--server.address", host,
               "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer", "--", "--db", db]
    click.echo(f"dashboard of {db} (read-only) on http://{host}:{port}; Ctrl-C stops it", err=True)
    proc = subprocess.Popen(command)
    try:
        with sigterm_as_interrupt():
            code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
