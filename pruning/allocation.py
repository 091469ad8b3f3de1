"""How much to prune each layer to reach a target cost.

    plan = allocate(model, scores, target=0.5, metric="macs", allocation="global")
    plan.meta["reached"]        # 0.4993: MACs kept, as a fraction of the unpruned model

A target is the fraction of the unpruned model's MACs, parameters or measured
latency that the pruned model keeps. An allocation turns one number, the knob,
into a pruning ratio or a kept filter count per tied group of convolutions; the knob
is bisected until the plan's cost is within `tolerance` (relative) of the target:

* uniform: the knob is the ratio of every prunable conv.
* global: the knob is one threshold over scores normalised per group (divided by
  their mean, Torch-Pruning's default), so filters of all layers compete; at most
  `max_ratio` of a group's filters go, so no layer is emptied.
* sensitivity: each group is pruned alone at a few ratios and the model evaluated
  (`evaluate(model) -> accuracy`, e.g. on a validation batch); the knob is the
  accuracy drop allowed per group, so the budget goes where accuracy drops least.

MACs and parameters of a plan are computed from the channel trace without
rebuilding the model (`PlanCost`); latency is measured on rebuilt models, so that
search is slower and its result as noisy as the timings.
"""

import warnings

import keras
import numpy as np

from pruning.graph import CNNModel
from pruning.plan import PrunePlan, check_ratio, round_count
from pruning.rebuild import prune
from pruning.stats import layer_macs

from pruning.choices import ALLOCATIONS, TARGET_METRICS as METRICS  # noqa: E402  (importable without Keras)
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)


class PlanCost:
    """MACs and parameters of `model` pruned by a plan, without building it.

    Exact for the layers the rebuilder slices (convolutions, separable and depthwise
    convolutions, BatchNormalization, Dense); other layers count as they are.
    """

    def __init__(self, model):
        self.cnn = CNNModel.of(model)
        self._filters = np.array([c.filters for c in self.cnn.conv_layers], np.float64)
        self._mix = {}  # tensor key -> (channels from no conv, channels per conv index)
        for key in self.cnn.origins:
            none, made = self.cnn.channel_counts(key)
            self._mix[key] = (none, made.astype(np.float64))

    def __call__(self, plan):
        """{"macs", "params"} of the pruned model; `plan` a PrunePlan or {name: kept}."""
        keep = plan.keep if isinstance(plan, PrunePlan) else plan
        frac = np.ones(len(self._filters))
        for name, idx in keep.items():
            c = self.cnn.conv(name)
            frac[c.index] = len(idx) / c.filters
        macs = params = 0
        seen = set()
        for call in self.cnn.calls:
            layer = call.layer
            in_shape = self.cnn.shapes[call.inputs[0]] if call.inputs else ()
            out_shape = self.cnn.shapes[call.outputs[0]]
            cin = self._kept(call.inputs[0], frac) if call.inputs else 0
            m, p = _layer_cost(layer, in_shape, out_shape, cin,
                               self._kept(call.outputs[0], frac) if call.outputs[0] in self._mix else 0)
            first = id(layer) not in seen
            seen.add(id(layer))
            macs += m
            params += p if first else 0
        return {"macs": int(round(macs)), "params": int(round(params))}

    def _kept(self, key, frac):
        none, per_conv = self._mix[key]
        return none + float(per_conv @ frac)


_KERNEL_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Conv1DTranspose,
                 keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _layer_cost(layer, in_shape, out_shape, cin, cout):
    """(MACs, params) of one call with `cin` input and `cout` output channels kept.
    MACs come from the layer's handler (`pruning.stats.layer_macs`) on the narrowed
    shapes; parameters from the kernel layout of each weighted kind."""
    def bias(n):
        return n if getattr(layer, "use_bias", False) else 0

    shapes = (tuple(in_shape[:-1]) + (cin,), tuple(out_shape[:-1]) + (cout,)) if len(in_shape) else (in_shape, out_shape)
    macs = layer_macs(layer, *shapes)
    if isinstance(layer, _KERNEL_CONVS):
        k = float(np.prod(layer.kernel_size))
        return macs, k * cin * cout / getattr(layer, "groups", 1) + bias(cout)
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        k, mid = float(np.prod(layer.kernel_size)), cin * layer.depth_multiplier
        return macs, k * mid + mid * cout + bias(cout)
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        k, mid = float(np.prod(layer.kernel_size)), cin * layer.depth_multiplier
        return macs, k * mid + bias(mid)
    if isinstance(layer, keras.layers.BatchNormalization):
        return 0, len(layer.weights) * cin
    if isinstance(layer, keras.layers.Dense):
        units = layer.units
        lead = float(np.prod(in_shape[1:-1])) if len(in_shape) > 2 else 1.0
        return lead * cin * units, cin * units + bias(units)
    return macs, sum(int(np.prod(w.shape)) for w in layer.weights)


# ------------------------------------------------------------------ allocation
def allocate(model, scores, target, metric="macs", allocation="uniform", round_to=1, exclude=(),
             max_ratio=0.9, tolerance=0.02, evaluate=None, sensitivity=None, latency_batch=16,
             latency_runs=10, meta=None):
    """A PrunePlan whose pruned model keeps `target` of the unpruned `metric`.

    Args:
        model: a keras.Model or CNNModel.
        scores: {conv name: one score per filter}; higher means keep.
        target: fraction of the unpruned model's MACs / params / latency kept, in (0, 1].
        metric: "macs", "params" or "latency" (measured, batch `latency_batch`).
        allocation: "uniform", "global" or "sensitivity" (see the module docstring).
        round_to: round kept counts to a multiple of this (see `pruning.plan.n_kept`).
        exclude: conv names that keep all their filters.
        max_ratio: the largest fraction of any group's filters removed, in [0, 1).
        tolerance: the reached value must be within target * (1 +- tolerance).
        evaluate: `evaluate(keras_model) -> accuracy`, needed by "sensitivity".
        sensitivity: precomputed `layer_sensitivity(...)` output (skips evaluating).

    Returns a PrunePlan; `plan.meta` holds the allocation, metric, target, the reached
    value (`reached`, a fraction), `within_tolerance`, the knob and every conv's ratio.
    Raises ValueError when the target cannot be reached within `max_ratio`.
    """
    cnn = CNNModel.of(model)
    if metric not in METRICS:
        raise ValueError(f"Expected metric in {METRICS}. Received: metric={metric!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"Expected allocation in {ALLOCATIONS}. Received: allocation={allocation!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"Expected target_{metric} in (0, 1]. Received: target_{metric}={target!r}")
    max_ratio = check_ratio(max_ratio, "max_ratio")
    groups = prunable_groups(cnn, exclude)
    if not groups:
        raise ValueError("No convolution can be pruned: every conv is blocked, excluded or feeds the output.")

    def by_ratios(ratios_at):
        def plan_at(knob):
            ratios = {name: r for g, r in ratios_at(knob).items() for name in g}
            return PrunePlan.from_scores(cnn, scores, ratios, exclude=exclude, round_to=round_to)
        return plan_at

    if allocation == "uniform":
        knob_range, plan_at = (0.0, max_ratio), by_ratios(lambda t: {g: t for g in groups})
    elif allocation == "global":
        knob_range, kept_at = _global(cnn, scores, groups, max_ratio)

        def plan_at(knob):
            return _counts_plan(cnn, scores, kept_at(knob), round_to)
    else:
        if sensitivity is None:
            if evaluate is None:
                raise ValueError("allocation='sensitivity' needs evaluate(model) -> accuracy "
                                 "(or precomputed sensitivity).")
            sensitivity = layer_sensitivity(cnn, scores, evaluate, max_ratio=max_ratio, round_to=round_to,
                                            groups=groups)
        knob_range, ratios_at = _sensitivity(sensitivity, groups, max_ratio)
        plan_at = by_ratios(ratios_at)

    if metric == "latency":
        from pruning.stats import measure_latency

        def speed(m):
            return measure_latency(m, batch_size=latency_batch, runs=latency_runs)["ms_per_batch"]

        base = speed(cnn.model)

        def cost(plan):
            return speed(prune(cnn, plan)) / base
        iterations = 8  # each step rebuilds and times a model
    else:
        counter = PlanCost(cnn)
        base = counter({})[metric]

        def cost(plan):
            return counter(plan)[metric] / base
        iterations = 60

    knob, plan, reached = _bisect(plan_at, cost, target, knob_range, tolerance, iterations)
    if abs(reached - target) > tolerance * target and metric != "latency":
        plan, reached = _refine(cnn, scores, plan, cost, target, groups, max_ratio, round_to)
    within = abs(reached - target) <= tolerance * target
    if not within:
        warnings.warn(f"The {allocation} allocation reached {metric} {reached:.4f} of the unpruned model "
                      f"for target_{metric}={target}: outside the {tolerance:.0%} tolerance (filter counts "
                      f"are whole numbers{' rounded to ' + str(round_to) if round_to > 1 else ''}).")
    plan.meta.update({"allocation": allocation, "metric": metric, "target": float(target),
                      "reached": float(reached), "within_tolerance": bool(within), "knob": float(knob),
                      "max_ratio": max_ratio, "exclude": list(exclude), **(meta or {})})
    if sensitivity is not None:
        plan.meta["sensitivity"] = {g[0]: pts for g, pts in sensitivity.items()}
    return plan


def _bisect(plan_at, cost, target, knob_range, tolerance, iterations):
    """The knob (more pruning as it grows) whose plan's cost is closest to `target`."""
    lo, hi = knob_range
    plan_hi = plan_at(hi)
    cost_hi = cost(plan_hi)
    if cost_hi > target * (1 + tolerance):
        raise ValueError(f"Cannot reach the target {target} (fraction kept): pruning every layer as far as "
                         f"allowed keeps {cost_hi:.4f}. Raise max_ratio, or exclude fewer layers.")
    best = (abs(cost_hi - target), hi, plan_hi, cost_hi)
    plan_lo = plan_at(lo)
    cost_lo = cost(plan_lo)
    best = min(best, (abs(cost_lo - target), lo, plan_lo, cost_lo), key=lambda b: b[0])
    for _ in range(iterations):
        if best[0] <= tolerance * target / 4 or hi - lo <= 1e-9 * max(1.0, abs(hi)):
            break
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        c = cost(plan)
        if abs(c - target) < best[0]:
            best = (abs(c - target), mid, plan, c)
        if c > target:
            lo = mid
        else:
            hi = mid
    _, knob, plan, reached = best
    return knob, plan, reached


def _refine(cnn, scores, plan, cost, target, groups, max_ratio, round_to, max_moves=64):
    """Moves single groups by one step of `round_to` filters, each time the move that
    brings the cost closest to `target`, while that helps. A step function of the knob
    (whole filter counts) can jump over the target; this closes the gap."""
    step = max(1, int(round_to))
    kept = {g: len(plan.keep.get(g[0], range(cnn.conv(g[0]).filters))) for g in groups}
    filters = {g: cnn.conv(g[0]).filters for g in groups}
    least = {g: max(1, filters[g] - int(np.floor(max_ratio * filters[g]))) for g in groups}

    reached = cost(plan)
    for _ in range(max_moves):
        best = None
        for g in groups:
            for k in (kept[g] - step, kept[g] + step):
                if not least[g] <= k <= filters[g]:
                    continue
                trial = _counts_plan(cnn, scores, {**kept, g: k}, round_to)
                c = cost(trial)
                if best is None or abs(c - target) < abs(best[2] - target):
                    best = (g, k, c, trial)
        if best is None or abs(best[2] - target) >= abs(reached - target):
            break
        g, k, reached, plan = best
        kept[g] = k
    return plan, reached


def _counts_plan(cnn, scores, kept, round_to=1):
    """The plan keeping `kept[group]` of the filters of each tied group's first conv (a
    group is a tuple of conv names), as that share of the group's tied classes (the
    same count when its ties are one-to-one), each rounded to a multiple of `round_to`
    (see `pruning.plan.round_count`) and, for a group feeding a grouped convolution,
    to an equal count per convolution group."""
    counts = {}
    for g, k in kept.items():
        channels = cnn.channel_group(g[0])
        n_seg, classes = channels.n_segments, channels.n_classes
        share = k * classes / cnn.conv(g[0]).filters
        count = round_count(max(1, int(round(share / n_seg))), classes // n_seg, round_to) * n_seg
        counts.update({name: count for name in channels.names})
    return PrunePlan._from_class_counts(cnn, scores, lambda group: counts.get(group[0]), meta={"round_to": round_to})


def prunable_groups(cnn, exclude=()):
    """Tied groups (tuples of conv names) that may lose filters: every member prunable,
    none excluded, none feeding a model output."""
    excluded = set(exclude)
    for name in excluded:
        cnn.conv(name)  # raises for an unknown name
    out = []
    for g in cnn.groups:
        members = [cnn.conv(n) for n in g]
        if all(m.prunable and not m.feeds_output for m in members) and not excluded & set(g):
            out.append(g)
    return out


def _group_scores(cnn, scores, group):
    total = None
    for name in group:
        if name not in scores:
            raise ValueError(f"No scores for layer '{name}'. Received scores for: {', '.join(scores) or '(none)'}")
        s = np.asarray(scores[name], np.float64).reshape(-1)
        total = s if total is None else total + s
    return total


def _global(cnn, scores, groups, max_ratio):
    """Knob: one threshold over per-group mean-normalised scores; the function returns
    the filters each group keeps at a threshold."""
    norm = {}
    for g in groups:
        s = _group_scores(cnn, scores, g)
        norm[g] = np.sort(s / (np.abs(s).mean() + 1e-12))
    caps = {g: int(np.floor(max_ratio * len(norm[g]))) for g in groups}

    def kept_at(t):
        # Scores below t go, at most the cap.
        return {g: len(s) - min(int(np.searchsorted(s, t, side="left")), caps[g]) for g, s in norm.items()}

    top = max(float(s[-1]) for s in norm.values())
    low = min(float(s[0]) for s in norm.values())
    return (low, top + 1e-9 * max(1.0, abs(top))), kept_at


def _sensitivity(sensitivity, groups, max_ratio):
    """Knob: the accuracy drop each group may cost; its ratio is the largest whose
    measured drop (made non-decreasing, interpolated) stays under the knob."""
    curves = {}
    for g in groups:
        pts = sorted(sensitivity[g]) if g in sensitivity else []
        r = np.array([0.0] + [p[0] for p in pts])
        d = np.maximum.accumulate(np.maximum(np.array([0.0] + [p[1] for p in pts]), 0.0))
        curves[g] = (r, d)
    top = max(float(d[-1]) for _, d in curves.values())

    def ratios_at(t):
        out = {}
        for g, (r, d) in curves.items():
            # The largest ratio whose drop is <= t (drops are non-decreasing in r).
            i = int(np.searchsorted(d, t, side="right")) - 1
            if i + 1 < len(r) and d[i + 1] > d[i]:  # between two measured points
                ratio = r[i] + (r[i + 1] - r[i]) * (t - d[i]) / (d[i + 1] - d[i])
            else:
                ratio = r[i]
            out[g] = min(float(ratio), max_ratio)
        return out

    return (0.0, top + 1e-6), ratios_at


def layer_sensitivity(model, scores, evaluate, ratios=SENSITIVITY_RATIOS, max_ratio=0.9, round_to=1,
                      groups=None, exclude=()):
    """{group: [(ratio, accuracy drop)]}: each tied group pruned alone at each ratio
    (capped at `max_ratio`), the model rebuilt and evaluated with `evaluate(model)`."""
    cnn = CNNModel.of(model)
    groups = groups if groups is not None else prunable_groups(cnn, exclude)
    base = float(evaluate(cnn.model))
    # The cap itself is measured too, so the search can reach it.
    rates = sorted({min(float(r), max_ratio) for r in ratios if r > 0} | {max_ratio})
    out = {}
    for g in groups:
        out[g] = []
        for r in rates:
            plan = PrunePlan.from_scores(cnn, {n: scores[n] for n in g}, {n: r for n in g}, round_to=round_to)
            out[g].append((r, base - float(evaluate(prune(cnn, plan)))))
    return out


def compose(first, second):
    """The plan of applying `first`, then `second` (made on the model `first` produced),
    with indices of the original model's filters."""
    keep = {n: list(k) for n, k in first.keep.items()}
    for name, idx in second.keep.items():
        prev = keep.get(name)
        keep[name] = [prev[i] for i in idx] if prev is not None else list(idx)
    filters = {**second.filters, **first.filters}
    return PrunePlan(keep, filters, {"steps": first.meta.get("steps", [first.meta]) + [second.meta]})
