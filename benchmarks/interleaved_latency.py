"""Latency of saved `.keras` models measured in interleaved rounds on this machine.

    PYTHONPATH=. python benchmarks/interleaved_latency.py baseline.keras pruned-l1-0.1.keras \\
        --batch 16 --rounds 5 --out results/rice_grain/latency.md

Each round measures every model in turn (the order rotates), each with `pruning.measure_latency`
(median of --runs calls after warm-up); the table gives the median over rounds and the speed-up
against the first model. A load change on a shared machine then hits every model alike instead
of the one measured at the time (as the per-run latencies logged after each training can).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", type=int, default=16, show_default=True, help="Images per timed call.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed calls per model and round.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Interleaved rounds.")
@click.option("--out", default=None, help="Markdown file for the table (printed if not given).")
def main(models, batch, runs, rounds, out):
    """Median ms per batch of each model over interleaved rounds; speed-up against the first."""
    import keras

    from experiments.common import write_text
    from pruning import measure_latency, model_stats
    from pruning.stats import machine_description

    loaded = [keras.models.load_model(p) for p in models]
    load_before = machine_description()
    times = [[] for _ in loaded]
    for r in range(rounds):
        order = np.roll(np.arange(len(loaded)), r)
        for i in order:
            times[i].append(measure_latency(loaded[i], batch_size=batch, runs=runs, warmup=2)["ms_per_batch"])
    medians = [float(np.median(t)) for t in times]
    lines = [f"Machine: {load_before} before, {machine_description()} after. Median over {rounds} interleaved "
             f"rounds of the median of {runs} calls on a batch of {batch}.", "",
             "| model | MACs | ms / batch | rounds (ms) | speed-up |", "|---|---|---|---|---|"]
    for path, model, m, t in zip(models, loaded, medians, times):
        lines.append(f"| {path} | {model_stats(model)['macs']:,} | {m:.1f} | {', '.join(f'{v:.0f}' for v in t)} "
                     f"| {medians[0] / m:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_text(out, text)


if __name__ == "__main__":
    main()
