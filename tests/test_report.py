"""The report's table over seeds: one row per setting, mean ± sample std of its seeds."""

import statistics

from experiments.report import seed_groups, seeds_table, write_report
from save_sqlite import ExperimentLog


def _seeded_log(path, accuracies, heldout=None, config=None):
    log = ExperimentLog(path)
    for seed, (base_acc, pruned_acc) in enumerate(accuracies):
        cfg = {"image_size": 64, "seed": seed, **(config or {})}
        with log.run("rice", model="vgg16", dataset="d", pruning_ratio=0.0, seed=seed, config=cfg) as base:
            base.finish(test_top1=base_acc, params=100, macs=1000, latency_ms=10.0,
                        metrics={"heldout": {"top1": heldout[seed]}} if heldout else None)
        with log.run("rice", model="vgg16", dataset="d", ranker="l1", pruning_ratio=0.5, parent_id=base.id,
                     seed=seed, config=cfg) as run:
            run.finish(test_top1=pruned_acc, params=50 + seed, macs=500, latency_ms=6.0,
                       metrics={"speedup": 1.5 + seed / 10})
    return log


def test_seeds_table_is_mean_and_sample_std(tmp_path):
    accs = [(0.90, 0.80), (0.94, 0.86), (0.95, 0.83)]
    log = _seeded_log(str(tmp_path / "l.db"), accs, heldout=[0.7, 0.8, 0.9])
    table = seeds_table(log.runs(status="completed"))
    base, pruned = table.splitlines()[2:]
    mean, std = statistics.mean(a for a, _ in accs), statistics.stdev(a for a, _ in accs)
    assert f"| 1, 3, 5 | d | baseline | 0.0 | 3 | {mean:.4f} ± {std:.4f} | 0.8000 ± 0.1000 | 100 | 1,000 |" in base
    # sizes that differ between seeds get a spread, equal ones print once; speed-ups only for pruned runs
    assert "| 51 ± 1 | 500 | 1.60 ± 0.10 |" in pruned and base.endswith("|  |")


def test_another_config_is_another_row_and_single_seeds_make_none(tmp_path):
    log = _seeded_log(str(tmp_path / "l.db"), [(0.9, 0.8), (0.92, 0.82)])
    _seeded_log(str(tmp_path / "l.db"), [(0.5, 0.4), (0.6, 0.5)], config={"image_size": 32})
    groups = seed_groups(log.runs(status="completed"))
    assert [[r["id"] for r in g] for g in groups] == [[1, 3], [2, 4], [5, 7], [6, 8]]
    assert seeds_table(log.runs(status="completed", experiment="rice")[:2]) is None


def test_report_shows_the_table_over_seeds(tmp_path):
    log = _seeded_log(str(tmp_path / "l.db"), [(0.9, 0.8), (0.92, 0.82)])
    write_report(log, str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "mean ± std over seeds" in md and "| 0.9100 ± 0.0141 |" in md
