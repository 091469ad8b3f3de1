"""Structured filter pruning for Keras 3 CNNs.

    from pruning import CNNModel, PrunePlan, get_ranker, prune, model_stats

    cnn = CNNModel(model)
    scores = get_ranker("l1").rank_all(cnn)
    plan = PrunePlan.from_scores(cnn, scores, ratio=0.3)
    smaller = prune(cnn, plan)        # an ordinary keras.Model, weights copied

Each layer kind is one handler in a table (`pruning.handlers`); teach the engine a
custom layer with `register_layer_handler(MyLayer, handler)`.
"""

__version__ = "0.1.0"

# Public names and their modules, imported on first use (PEP 562): `import pruning.choices` (and the
# command line's --help) stays free of Keras. The first use also imports pruning.criteria, which
# registers fpgm, apoz, taylor and bn_scale: the registry reached from here (`get_ranker`, `make_ranker`,
# `RANKERS`) holds every built-in ranker.
_EXPORTS = {
    "TimeHistory": "callbacks",
    "ChannelGroup": "graph", "CNNModel": "graph", "ConvLayer": "graph",
    "LayerHandler": "handlers", "get_layer_handler": "handlers", "register_layer_handler": "handlers",
    "PrunePlan": "plan", "check_ratio": "plan", "skipped_convs": "plan",
    "RANKERS": "rankers", "Ranker": "rankers", "get_ranker": "rankers", "load_scores": "rankers",
    "make_ranker": "rankers", "register_ranker": "rankers", "save_scores": "rankers",
    "inline": "rebuild", "output_change": "rebuild", "prune": "rebuild",
    "interleaved_latency": "latency",
    "layer_stats": "stats", "measure_latency": "stats", "model_stats": "stats",
}
__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pruning' has no attribute {name!r}")
    import importlib

    importlib.import_module("pruning.criteria")  # registers its rankers
    value = getattr(importlib.import_module(f"pruning.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
