"""Latency of saved `.keras` models measured in interleaved rounds on this machine.

    PYTHONPATH=. python benchmarks/interleaved_latency.py baseline.keras pruned-l1-0.1.keras \\
        --batch 16 --rounds 5 --out results/rice_grain/latency.md

`pruning.interleaved_latency`: each round measures every model in turn (the order rotates), each the
median of --runs calls after warm-up; the table gives the median over rounds and the speed-up
against the first model. A load change on a shared machine then hits every model alike instead
of the one measured at the time (as the per-run latencies logged after each training can).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402


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
    from pruning import interleaved_latency, model_stats
    from pruning.latency import timing_caption

    loaded = [keras.models.load_model(p) for p in models]
    # Keyed by position: the same file given twice is timed twice, as two rows.
    timing = interleaved_latency(dict(enumerate(loaded)), batch_size=batch, runs=runs, rounds=rounds, warmup=2)
    lines = [timing_caption(timing), "",
             "| model | MACs | ms / batch | rounds (ms) | speed-up |", "|---|---|---|---|---|"]
    for i, (path, model) in enumerate(zip(models, loaded)):
        m = timing["models"][i]
        lines.append(f"| {path} | {model_stats(model)['macs']:,} | {m['ms_per_batch']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in m['rounds_ms'])} | {timing['speedup'][i]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_text(out, text)


if __name__ == "__main__":
    main()
