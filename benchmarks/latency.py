"""Latency before and after pruning, every model timed in the same window in interleaved rounds.

    python -m benchmarks.latency [MODEL.keras ...] [--image-size 224 --batch 4 --rounds 5]

Without MODEL files: VGG16 (the rice classifier, random weights) and its L1-pruned versions at
each of --ratios (every conv but block5_conv3), with kept counts exact (`--round-to 1`) and
rounded to multiples of 8 and 16: pruning removes MACs, but a kernel on an odd channel count
(61 instead of 64) can run slower than on a round one. With MODEL files: those saved models,
the first one the baseline of the speed-up.

`pruning.interleaved_latency`: each round times every model in turn (the order rotates), each
the median of --runs calls after warm-up; a model's latency is the median over rounds, so a load
change on a shared machine hits every model alike instead of the one measured at the time.
"""

import click

from benchmarks import comma_list, command, invocation, write


def vgg16_variants(image_size, ratios, round_tos):
    """{label: model}: the unpruned VGG16 rice classifier first, then one per ratio and round_to."""
    from experiments.models import rice_classifier
    from pruning import CNNModel, PrunePlan, get_ranker, inline, prune

    model = inline(rice_classifier(5, image_size, weights="none", seed=0))
    cnn = CNNModel(model)
    scores = get_ranker("l1").rank_all(cnn)
    models = {"VGG16": model}
    for ratio in ratios:
        for round_to in round_tos:
            plan = PrunePlan.from_scores(cnn, scores, ratio, exclude=["block5_conv3"], round_to=round_to)
            models[f"l1 {ratio:g}, round_to {round_to}"] = prune(cnn, plan)
    return models


@command("latency")
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--image-size", type=int, default=224, show_default=True, help="Input size of the VGG16 variants.")
@click.option("--ratios", default="0.05,0.1,0.2,0.5", show_default=True, callback=comma_list(float),
              help="Comma-separated ratios (VGG16).")
@click.option("--round-to", "round_tos", default="1,8,16", show_default=True, callback=comma_list(int),
              help="Comma-separated rounding multiples of the kept filter counts (VGG16).")
@click.option("--batch", type=int, default=4, show_default=True, help="Images per timed call.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed calls per model and round.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Interleaved rounds.")
def main(models, image_size, ratios, round_tos, batch, runs, rounds, output):
    """Median ms per batch of each model over interleaved rounds; speed-up against the first."""
    import keras

    from pruning import interleaved_latency, model_stats
    from pruning.latency import timing_caption

    if models:
        timed = {path: keras.models.load_model(path) for path in models}
        title = "Saved models"
    else:
        timed = vgg16_variants(image_size, ratios, round_tos)
        title = f"VGG16 before and after L1 pruning ({image_size}x{image_size})"
    with click.progressbar(length=len(timed) * rounds, label="rounds x models") as bar:
        timing = interleaved_latency(timed, batch_size=batch, runs=runs, rounds=rounds, warmup=2, progress=bar.update)
    base_macs = model_stats(next(iter(timed.values())))["macs"]
    lines = [f"# {title}: latency, batch {batch}", "", timing_caption(timing) + f" Written by `{invocation()}`.", "",
             "| model | params | MACs | MACs kept | ms / batch | rounds (ms) | speed-up |", "|---|---|---|---|---|---|---|"]
    for name, model in timed.items():
        m, stats = timing["models"][name], model_stats(model)
        lines.append(f"| {name} | {stats['params']:,} | {stats['macs']:,} | {stats['macs'] / base_macs:.3f} | "
                     f"{m['ms_per_batch']:.1f} | {', '.join(f'{v:.0f}' for v in m['rounds_ms'])} | "
                     f"{timing['speedup'][name]:.2f}x |")
    write(output, lines)


if __name__ == "__main__":
    main()
