"""Merge rice runs from several logs (baseline + pruned run in parallel processes) into one
results table: python benchmarks/rice_merge.py OUT_DIR DB:RUN_ID [DB:RUN_ID ...] (first = baseline)."""
import json, sys
from experiments.rice import RiceConfig
from experiments.report import rice_results
from save_sqlite import ExperimentLog

out, specs = sys.argv[1], sys.argv[2:]
rows = []
for spec in specs:
    db, rid = spec.rsplit(":", 1)
    r = [x for x in ExperimentLog(db).runs("rice") if x["id"] == int(rid)][0]
    rows.append((db, r))
cfg = RiceConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(rows[0][1]["config"]).items()
                    if k in RiceConfig.__dataclass_fields__})
base_lat = rows[0][1]["latency_ms"]
summaries = []
for db, r in rows:
    m = json.loads(r["metrics"])
    summaries.append({"run_id": f"{db.split('/')[-1]}#{r['id']}", "ratio": r["pruning_ratio"] or 0.0,
                      "test_top1": r["test_top1"], "heldout_top1": m["heldout"]["top1"], "params": r["params"],
                      "trainable_params": r["trainable_params"], "macs": r["macs"], "latency_ms": r["latency_ms"],
                      "speedup": base_lat / r["latency_ms"]})
    print(summaries[-1], json.dumps({k: round(v["recall"], 3) for k, v in m["heldout"]["per_class"].items()}))
print(rice_results(cfg, summaries, out))
