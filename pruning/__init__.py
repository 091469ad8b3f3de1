"""Structured filter pruning for Keras 3 CNNs.

    from pruning import CNNModel, PrunePlan, get_ranker, prune, model_stats

    cnn = CNNModel(model)
    scores = get_ranker("l1").rank_all(cnn)
    plan = PrunePlan.from_scores(cnn, scores, ratio=0.3)
    smaller = prune(cnn, plan)        # an ordinary keras.Model, weights copied

Each layer kind is one handler in a table (`pruning.handlers`); teach the engine a
custom layer with `register_layer_handler(MyLayer, handler)`.
"""

from pruning.callbacks import TimeHistory
from pruning.graph import ChannelGroup, CNNModel, ConvLayer
from pruning.handlers import LayerHandler, get_layer_handler, register_layer_handler
from pruning.plan import PrunePlan, check_ratio, skipped_convs
from pruning.rankers import RANKERS, Ranker, get_ranker, load_scores, register_ranker, save_scores
import pruning.criteria  # noqa: E402,F401  (registers fpgm, apoz, taylor, bn_scale)
from pruning.rebuild import inline, output_change, prune
from pruning.latency import interleaved_latency
from pruning.stats import layer_stats, measure_latency, model_stats

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup", "CNNModel", "ConvLayer", "LayerHandler", "PrunePlan", "Ranker", "RANKERS",
    "TimeHistory", "check_ratio", "get_layer_handler", "get_ranker", "inline", "interleaved_latency", "layer_stats",
    "load_scores", "measure_latency", "model_stats", "output_change", "prune",
    "register_layer_handler", "register_ranker", "save_scores", "skipped_convs",
]
