"""Latency of VGG16 (the rice classifier) before and after L1 pruning, on this machine.

    python benchmarks/latency.py --image-size 224 --batch 4 --out results/latency_vgg16.md

Pruning removes MACs, but a kernel on an odd channel count (61 instead of 64) can run
slower than on the original: this measures both exact `int(ratio * filters)` pruning
and kept counts rounded to multiples of 8 and 16 (`round_to`).
"""

import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--image-size", type=int, default=224, show_default=True, help="Input size in pixels.")
@click.option("--batch", type=int, default=4, show_default=True, help="Images per timed call.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed calls per model (median reported).")
@click.option("--ratios", default="0.05,0.1,0.2,0.3,0.5", show_default=True, help="Comma-separated ratios.")
@click.option("--round-to", "round_tos", default="1,8,16", show_default=True,
              help="Comma-separated rounding multiples of the kept filter counts.")
@click.option("--out", default=os.path.join("results", "latency_vgg16.md"), show_default=True,
              help="Markdown file for the table.")
def main(image_size, batch, runs, ratios, round_tos, out):
    """Measure and write the latency table."""
    import tensorflow as tf

    from experiments.common import write_text
    from experiments.models import rice_classifier
    from pruning import CNNModel, PrunePlan, get_ranker, inline, measure_latency, model_stats, prune

    model = inline(rice_classifier(5, image_size, weights="none", seed=0))
    cnn = CNNModel(model)
    scores = get_ranker("l1").rank_all(cnn)
    base = measure_latency(model, batch_size=batch, runs=runs)["ms_per_batch"]
    base_macs = model_stats(model)["macs"]
    rows = [("0", "-", model_stats(model)["params"], base_macs, base, 1.0)]
    with click.progressbar(length=len(ratios.split(",")) * len(round_tos.split(",")), label="models") as bar:
        for ratio in (float(r) for r in ratios.split(",")):
            for round_to in (int(r) for r in round_tos.split(",")):
                plan = PrunePlan.from_scores(cnn, scores, ratio, exclude=["block5_conv3"], round_to=round_to)
                pruned = prune(cnn, plan)
                ms = measure_latency(pruned, batch_size=batch, runs=runs)["ms_per_batch"]
                stats = model_stats(pruned)
                rows.append((f"{ratio:g}", str(round_to), stats["params"], stats["macs"], ms, base / ms))
                bar.update(1)
    lines = [
        f"# VGG16 latency before and after L1 pruning ({image_size}x{image_size}, batch {batch})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow "
        f"{tf.__version__}; median of {runs} calls of one compiled tf.function on random inputs. All convs "
        "but block5_conv3 pruned with the l1 ranker. Produced by `python benchmarks/latency.py "
        f"--image-size {image_size} --batch {batch} --runs {runs}`.",
        "",
        "| ratio | round_to | params | MACs | MACs kept | ms/batch | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio, rt, params, macs, ms, speed in rows:
        lines.append(f"| {ratio} | {rt} | {params:,} | {macs:,} | {macs / base_macs:.3f} | {ms:.1f} | {speed:.2f}x |")
    write_text(out, "\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
