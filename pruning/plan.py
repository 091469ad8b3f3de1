"""PrunePlan: which filters of which convolution survive.

A plan maps conv layer names to the sorted indices of the filters they keep. It is
made from scores and a ratio (uniform, per layer, or by name), or from explicit
indices, and it round-trips through JSON so any run can be replayed.
"""

import json
import numbers

import numpy as np

from pruning.graph import CNNModel


def check_ratio(ratio, name="ratio"):
    """Returns `ratio` as a float, or raises if it is not in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ValueError(f"Expected {name} in [0, 1). Received: {name}={ratio!r}")
    return float(ratio)


def n_kept(filters, ratio, round_to=1, round_mode="nearest"):
    """Filters left after removing int(ratio * filters); at least one always stays.

    With `round_to` > 1 the count is rounded to a multiple (at least one multiple, at
    most `filters`): CPU and GPU kernels run fastest on channel counts that are
    multiples of 8 or 16, so an odd count can be slower than the original.
    `round_mode="nearest"` may round back up (61 of 64 -> 64: nothing removed);
    `"down"` always removes at least what the ratio asks (61 -> 56).
    """
    if round_mode not in ("nearest", "down"):
        raise ValueError(f"Expected round_mode in ('nearest', 'down'). Received: round_mode={round_mode!r}")
    kept = max(1, filters - int(check_ratio(ratio) * filters))
    if round_to > 1 and kept < filters:
        steps = kept // round_to if round_mode == "down" else int(round(kept / round_to))
        kept = min(filters, max(round_to, steps * round_to))
    return kept


def resolve_ratios(cnn, ratio, exclude=()):
    """Per-conv ratios {name: ratio} from a number, a list (one per conv, model order)
    or a dict by name. Excluded and blocked convs get 0."""
    names = [c.name for c in cnn.conv_layers]
    for name in exclude:
        cnn.conv(name)  # raises for an unknown name
    if isinstance(ratio, dict):
        for name in ratio:
            cnn.conv(name)
        ratios = {n: check_ratio(ratio.get(n, 0.0), f"ratio['{n}']") for n in names}
    elif isinstance(ratio, (list, tuple, np.ndarray)):
        if len(ratio) != len(names):
            raise ValueError(
                f"Expected one ratio per convolution ({len(names)}: {', '.join(names)}). "
                f"Received: {len(ratio)} ratios"
            )
        ratios = {n: check_ratio(r, f"ratio[{i}]") for i, (n, r) in enumerate(zip(names, ratio))}
    else:
        r = check_ratio(ratio)
        # A uniform ratio skips the classifier side; a conv blocked by a layer the
        # rebuilder cannot handle is an error below (exclude it to go on).
        ratios = {c.name: (0.0 if c.feeds_output else r) for c in cnn.conv_layers}
    excluded = set(exclude)
    for c in cnn.conv_layers:
        if excluded & set(c.group):
            ratios[c.name] = 0.0  # excluding one member of a tied group keeps the group
    for c in cnn.conv_layers:
        if ratios[c.name] > 0 and not c.prunable:
            raise ValueError(f"Layer '{c.name}' cannot be pruned: {c.blocked_by}. "
                             "Exclude it to prune the others.")
    return ratios


class PrunePlan:
    """Kept filter indices per convolution layer.

    Args:
        keep: {layer name: kept filter indices}. Layers not named keep all filters.
        filters: {layer name: filter count before pruning}, for reports and checks.
        meta: free JSON-serialisable details (ranker, ratios...).
    """

    def __init__(self, keep, filters=None, meta=None):
        self.keep = {name: sorted(int(i) for i in idx) for name, idx in keep.items()}
        self.filters = dict(filters or {})
        self.meta = dict(meta or {})

    # --------------------------------------------------------------- builders
    @classmethod
    def from_scores(cls, model, scores, ratio, exclude=(), meta=None, round_to=1):
        """Keeps the highest-scoring filters of each conv.

        Args:
            model: a keras.Model or CNNModel.
            scores: {conv name: one score per filter}; higher means keep.
            ratio: a number in [0, 1) for every prunable conv, a list with one per
                conv in model order, or a dict by name. Removes int(ratio * filters).
            exclude: conv names that keep all their filters.
            round_to: round kept counts to a multiple of this (see `n_kept`).
        """
        cnn = model if isinstance(model, CNNModel) else CNNModel(model)
        ratios = resolve_ratios(cnn, ratio, exclude)
        keep, filters = {}, {}
        for group in cnn.groups:
            members = [cnn.conv(n) for n in group]
            rates = {ratios[m.name] for m in members}
            if len(rates) > 1:
                raise ValueError(
                    f"Layers {', '.join(group)} are tied by an elementwise merge and must share one "
                    f"ratio. Received: {sorted(rates)}"
                )
            rate = rates.pop()
            if rate == 0:
                continue
            total = None
            for m in members:
                if m.name not in scores:
                    raise ValueError(f"No scores for layer '{m.name}'. Received scores for: "
                                     f"{', '.join(scores) or '(none)'}")
                s = np.asarray(scores[m.name], dtype=np.float64).reshape(-1)
                if s.shape[0] != m.filters:
                    raise ValueError(f"Expected {m.filters} scores for layer '{m.name}'. "
                                     f"Received: {s.shape[0]}")
                total = s if total is None else total + s  # a group is scored by its sum
            k = n_kept(members[0].filters, rate, round_to)
            # Stable sort on -score: among equal scores the lower index is kept.
            kept = np.sort(np.argsort(-total, kind="stable")[:k])
            for m in members:
                keep[m.name] = kept
                filters[m.name] = m.filters
        meta = {"ratios": ratios, "exclude": list(exclude), "round_to": round_to, **(meta or {})}
        return cls(keep, filters, meta)

    @classmethod
    def from_indices(cls, model, keep, meta=None):
        """A plan from explicit kept indices, checked against the model."""
        cnn = model if isinstance(model, CNNModel) else CNNModel(model)
        plan = cls(keep, {n: cnn.conv(n).filters for n in keep}, meta)
        plan.validate(cnn)
        return plan

    # ------------------------------------------------------------- checking
    def validate(self, cnn):
        """Raises ValueError unless this plan can be applied to `cnn`."""
        for name, idx in self.keep.items():
            conv = cnn.conv(name)
            if len(idx) < conv.filters and not conv.prunable:
                raise ValueError(f"Layer '{name}' cannot be pruned: {conv.blocked_by}.")
            if not idx:
                raise ValueError(f"Layer '{name}' must keep at least one filter. Received: keep=[]")
            if len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= conv.filters:
                raise ValueError(
                    f"Expected distinct filter indices in [0, {conv.filters}) for layer '{name}'. "
                    f"Received: {idx[:8]}{'...' if len(idx) > 8 else ''}"
                )
            for other in conv.group:
                mine = self.keep.get(name)
                theirs = self.keep.get(other, list(range(cnn.conv(other).filters)))
                if theirs != mine:
                    raise ValueError(
                        f"Layers '{name}' and '{other}' are tied by an elementwise merge and must "
                        "keep the same filter indices."
                    )

    # ---------------------------------------------------------------- views
    def __repr__(self):
        parts = [f"{n}: {len(k)}/{self.filters.get(n, '?')}" for n, k in self.keep.items()]
        return f"PrunePlan({', '.join(parts)})"

    # ------------------------------------------------------------------ json
    def to_dict(self):
        return {"keep": self.keep, "filters": self.filters, "meta": self.meta}

    @classmethod
    def from_dict(cls, d):
        if "keep" not in d:
            raise ValueError(f"Expected a plan with a 'keep' mapping. Received keys: {sorted(d)}")
        return cls(d["keep"], d.get("filters"), d.get("meta"))

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(f.read())
