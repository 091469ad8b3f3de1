"""PrunePlan: which filters of which convolution survive.

A plan maps conv layer names to the sorted indices of the filters they keep. It is
made from scores and a ratio (uniform, per layer, or by name), or from explicit
indices, and it round-trips through JSON so any run can be replayed.
"""

import json
import numbers
import os
import warnings

import numpy as np

from pruning.graph import CNNModel


def check_ratio(ratio, name="ratio"):
    """Returns `ratio` as a float, or raises if it is not in [0, 1) (`RATIO_RANGE`)."""
    lo, hi = RATIO_RANGE
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not lo <= ratio < hi:
        raise ValueError(f"Expected {name} in [{lo:g}, {hi:g}). Received: {name}={ratio!r}")
    return float(ratio)


from pruning.choices import RATIO_RANGE, ROUND_MODES  # noqa: E402  (the names, importable without Keras)
from pruning.tempfiles import partial_path  # noqa: E402


def n_kept(filters, ratio, round_to=1, round_mode="nearest"):
    """Filters left after removing int(ratio * filters); at least one always stays.

    With `round_to` > 1 the count is rounded to a multiple (at least one multiple, at
    most `filters`): CPU and GPU kernels run fastest on channel counts that are
    multiples of 8 or 16, so an odd count can be slower than the original.
    `round_mode="nearest"` may round back up (61 of 64 -> 64: nothing removed);
    `"down"` always removes at least what the ratio asks (61 -> 56).
    """
    return round_count(max(1, filters - int(check_ratio(ratio) * filters)), filters, round_to, round_mode)


def round_count(kept, filters, round_to=1, round_mode="nearest"):
    """`kept` of `filters` rounded to a multiple of `round_to` (see `n_kept`)."""
    if round_mode not in ROUND_MODES:
        raise ValueError(f"Expected round_mode in {ROUND_MODES}. Received: round_mode={round_mode!r}")
    if round_to > 1 and kept < filters:
        steps = kept // round_to if round_mode == "down" else int(round(kept / round_to))
        kept = min(filters, max(round_to, steps * round_to))
    return kept


def resolve_ratios(cnn, ratio, exclude=()):
    """Per-conv ratios {name: ratio} from a number, a list (one per conv, model order)
    or a dict by name. Excluded and blocked convs get 0.

    A single number prunes every prunable conv and skips the blocked ones (see
    `skipped_convs`); a list or dict that gives a blocked conv a ratio is an error.
    """
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
        ratios = {c.name: (r if c.prunable else 0.0) for c in cnn.conv_layers}
    excluded = set(exclude)
    for c in cnn.conv_layers:
        if excluded & set(c.group):
            ratios[c.name] = 0.0  # excluding one member of a tied group keeps the group
    for c in cnn.conv_layers:
        if ratios[c.name] > 0 and not c.prunable:
            raise ValueError(f"Layer '{c.name}' cannot be pruned: {c.blocked_by}. "
                             "Exclude it to prune the others.")
    return ratios


def atomic_write(path, write):
    """Calls `write(tmp)` on a temporary file beside `path` (`pruning.tempfiles.partial_path`, the
    name `experiments.files.remove_partial_files` cleans up after a killed writer), which then
    replaces `path`: a failed write leaves the previous file whole and no temporary."""
    tmp = partial_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def skipped_convs(cnn):
    """{conv name: reason} for every conv a uniform ratio leaves whole, the convs hidden
    inside layers the engine cannot see into (`CNNModel.opaque`) included."""
    skipped = {c.name: c.blocked_by for c in cnn.conv_layers if not c.prunable}
    for o in cnn.opaque:
        for name in o.convs:
            skipped.setdefault(name, f"inside '{o.name}' ({o.class_name}), not visible: {o.reason}")
    return skipped


def nothing_prunable(cnn):
    """One line saying why no conv of `cnn` can be pruned, or "" when some can."""
    if cnn.prunable_layers:
        return ""
    reasons = sorted({c.blocked_by for c in cnn.conv_layers} | {o.message for o in cnn.opaque})
    return (f"Nothing to prune in model '{cnn.model.name}': {len(cnn.conv_layers)} convs visible, "
            f"none prunable{': ' + '; '.join(reasons[:6]) if reasons else ' (it has no convolutions)'}.")


def _select(group, scores, kept_of):
    """Kept filter indices per member of a `ChannelGroup`; `kept_of(n)` is how many
    of `n` classes stay (called once per segment for grouped convolutions).

    Tied filters form classes; a class is scored by the sum of its members'
    scores, and the best `kept_of(n_classes)` classes survive (an equal count in
    every segment for grouped convolutions). Among equal scores the lower class
    index is kept.
    """
    total = np.zeros(group.n_classes)
    for name in group.names:
        total += np.bincount(group.classes[name], weights=scores[name], minlength=group.n_classes)
    if group.segments is None:
        chosen = np.argsort(-total, kind="stable")[:kept_of(group.n_classes)]
    else:
        n_seg = group.n_segments
        per = kept_of(group.n_classes // n_seg)
        chosen = np.concatenate([
            np.nonzero(group.segments == s)[0][
                np.argsort(-total[group.segments == s], kind="stable")[:per]]
            for s in range(n_seg)
        ])
    for name in group.names:
        if not np.isin(group.classes[name], chosen).any():
            # Every conv keeps at least one filter: its best class stays as well.
            chosen = np.append(chosen, group.classes[name][np.argmax(total[group.classes[name]])])
    return {n: np.nonzero(np.isin(group.classes[n], chosen))[0] for n in group.names}


class PrunePlan:
    """Kept filter indices per convolution layer.

    Args:
        keep: {layer name: kept filter indices}. Layers not named keep all filters.
        filters: {layer name: filter count before pruning}, checked against the model.
        meta: free JSON-serialisable details (ranker, ratios, skipped convs...).
        fingerprint: `CNNModel.fingerprint` of the model the plan was made for, or None.
    """

    def __init__(self, keep, filters=None, meta=None, fingerprint=None):
        self.keep = {name: sorted(int(i) for i in idx) for name, idx in keep.items()}
        self.filters = dict(filters or {})
        self.meta = dict(meta or {})
        self.fingerprint = fingerprint

    # --------------------------------------------------------------- builders
    @classmethod
    def from_scores(cls, model, scores, ratio, exclude=(), meta=None, round_to=1,
                    allow_inexact=False, round_mode="nearest"):
        """Keeps the highest-scoring filters of each conv.

        Args:
            model: a keras.Model or CNNModel.
            scores: {conv name: one score per filter}; higher means keep.
            ratio: a number in [0, 1) for every prunable conv (blocked convs are
                skipped and listed in `meta["skipped"]`), a list with one per conv in
                model order, or a dict by name. Removes int(ratio * filters).
            exclude: conv names that keep all their filters.
            round_to: round kept counts to a multiple of this (see `n_kept`).
            round_mode: "nearest" or "down" (always removes at least the ratio).
            allow_inexact: also prune convs feeding LayerNormalization (see `CNNModel`).
        """
        if round_mode not in ROUND_MODES:
            raise ValueError(f"Expected round_mode in {ROUND_MODES}. Received: round_mode={round_mode!r}")
        cnn = CNNModel.of(model, allow_inexact)
        ratios = resolve_ratios(cnn, ratio, exclude)
        nothing = (not isinstance(ratio, (dict, list, tuple, np.ndarray)) and ratio > 0
                   and nothing_prunable(cnn))
        if nothing:
            # The plan keeps everything: say so rather than let a x1.00 model pass for a pruned one.
            warnings.warn(nothing, stacklevel=2)
        def kept_of(group):
            rates = {ratios[n] for n in group}
            if len(rates) > 1:
                raise ValueError(
                    f"Layers {', '.join(group)} are tied by an elementwise merge and must share one "
                    f"ratio. Received: {sorted(rates)}"
                )
            rate = rates.pop()
            return None if rate == 0 else lambda n: n_kept(n, rate, round_to, round_mode)

        keep, filters = _select_groups(cnn, scores, kept_of)
        meta = {"ratios": ratios, "exclude": list(exclude), "round_to": round_to, "round_mode": round_mode,
                **(meta or {})}
        if not isinstance(ratio, (dict, list, tuple, np.ndarray)):
            meta.setdefault("skipped", skipped_convs(cnn))
        if cnn.allow_inexact:
            meta["allow_inexact"] = True
        return cls(keep, filters, meta, cnn.fingerprint)

    @classmethod
    def from_counts(cls, model, scores, counts, meta=None, allow_inexact=False):
        """Keeps the `counts[name]` highest-scoring filters of each named conv.

        Args:
            model: a keras.Model or CNNModel.
            scores: {conv name: one score per filter}; higher means keep.
            counts: {conv name: filters kept}, each in [1, filters]. Convs not named
                keep all their filters; convs tied by an elementwise merge keep the
                same count (naming one of them is enough), and a conv feeding a
                grouped convolution keeps a multiple of its group count.
            allow_inexact: also prune convs feeding LayerNormalization (see `CNNModel`).
        """
        cnn = CNNModel.of(model, allow_inexact)
        if not isinstance(counts, dict):
            raise ValueError(f"Expected counts as a dict {{conv name: filters kept}}. Received: counts={counts!r}")
        for name, k in counts.items():
            conv = cnn.conv(name)  # raises for an unknown name
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= conv.filters:
                raise ValueError(f"Expected counts['{name}'] a whole number in [1, {conv.filters}] (the "
                                 f"filters layer '{name}' keeps). Received: counts['{name}']={k!r}")
        def kept_of(group):
            wanted = {int(counts[n]) for n in group if n in counts}
            if len(wanted) > 1:
                raise ValueError(f"Layers {', '.join(group)} are tied by an elementwise merge and must keep "
                                 f"one count. Received: {sorted(wanted)}")
            if not wanted or wanted == {cnn.conv(group[0]).filters}:
                return None
            k = wanted.pop()
            channels = cnn.channel_group(group[0])
            if any(cnn.conv(n).filters != channels.n_classes for n in group):
                _check_prunable(cnn, group)
                raise ValueError(f"Layers {', '.join(group)} tie filters in other than one-to-one pairs (a conv "
                                 "tied to its own channels or to a concatenation), so a count cannot be kept "
                                 f"exactly in each; give them a ratio (`PrunePlan.from_scores`). Received: {k}")
            return k

        return cls._from_class_counts(cnn, scores, kept_of, meta)

    @classmethod
    def _from_class_counts(cls, cnn, scores, count_of, meta=None):
        """The plan keeping `count_of(group)` classes of tied filters of each tied group
        (None: the group keeps everything); for a group of one-to-one ties, the filters each
        of its convs keeps. `from_counts` and `pruning.allocation` build plans this way."""
        def kept_of(group):
            k = count_of(group)
            channels = cnn.channel_group(group[0])
            if k is None or k == channels.n_classes:
                return None
            _check_prunable(cnn, group)
            n_seg = channels.n_segments
            if k % n_seg:
                raise ValueError(
                    f"Layers {', '.join(group)} feed or form a grouped convolution of {n_seg} groups: "
                    f"expected a count that is a multiple of {n_seg}. Received: {k}")
            return lambda n: k // n_seg

        keep, filters = _select_groups(cnn, scores, kept_of)
        ratios = {c.name: 1 - len(keep.get(c.name, range(c.filters))) / c.filters for c in cnn.conv_layers}
        meta = {"counts": {n: len(k) for n, k in keep.items()}, "ratios": ratios, **(meta or {})}
        if cnn.allow_inexact:
            meta["allow_inexact"] = True
        return cls(keep, filters, meta, cnn.fingerprint)

    @classmethod
    def from_indices(cls, model, keep, meta=None, allow_inexact=False):
        """A plan from explicit kept indices, checked against the model."""
        cnn = CNNModel.of(model, allow_inexact)
        meta = dict(meta or {})
        if cnn.allow_inexact:
            meta["allow_inexact"] = True
        plan = cls(keep, {n: cnn.conv(n).filters for n in keep}, meta, cnn.fingerprint)
        plan.validate(cnn)
        return plan

    # ------------------------------------------------------------- checking
    def validate(self, cnn):
        """Raises ValueError unless this plan can be applied to `cnn`."""
        for name, count in self.filters.items():
            conv = cnn.conv(name)
            if int(count) != conv.filters:
                raise ValueError(
                    f"This plan was made for another model: layer '{name}' had {count} filters "
                    f"there and has {conv.filters} here. Received: a plan for fingerprint "
                    f"{self.fingerprint}, model fingerprint {cnn.fingerprint}"
                )
        if self.fingerprint and self.fingerprint != cnn.fingerprint:
            raise ValueError(
                "This plan was made for another model (its convolutions' names, filter counts "
                f"or kernel shapes differ). Expected fingerprint {cnn.fingerprint}. "
                f"Received: fingerprint={self.fingerprint}"
            )
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
        for group in cnn.groups:
            self._check_group(cnn, cnn.channel_group(group[0]))

    def _check_group(self, cnn, group):
        """Tied filters (one class) are kept or removed together in every member."""
        kept = {}
        for name in group.names:
            idx = self.keep.get(name, range(cnn.conv(name).filters))
            kept[name] = set(group.classes[name][list(idx)].tolist())
        union = set().union(*kept.values())
        for name in group.names:
            missing = (union & set(group.classes[name].tolist())) - kept[name]
            if missing:
                other = next(n for n in group.names if kept[n] & missing)
                raise ValueError(
                    f"Layers '{other}' and '{name}' are tied by an elementwise merge and must "
                    "keep the same filter indices (the filters that meet in the merge)."
                )
        if group.segments is not None:
            counts = np.bincount(group.segments[sorted(union)], minlength=group.n_segments)
            if len(set(counts.tolist())) > 1:
                raise ValueError(
                    f"Layers {', '.join(group.names)} feed or form a grouped convolution and must "
                    f"keep the same number of filters in every group. Received per group: "
                    f"{counts.tolist()}"
                )

    # ---------------------------------------------------------------- views
    def __repr__(self):
        parts = [f"{n}: {len(k)}/{self.filters.get(n, '?')}" for n, k in self.keep.items()]
        return f"PrunePlan({', '.join(parts)})"

    # ------------------------------------------------------------------ json
    def to_dict(self):
        d = {"keep": self.keep, "filters": self.filters, "meta": self.meta}
        if self.fingerprint:
            d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d, source="plan"):
        if not isinstance(d, dict):
            raise ValueError(f"Expected {source} to hold a JSON object with a 'keep' mapping. "
                             f"Received: a JSON {type(d).__name__}")
        if "keep" not in d:
            raise ValueError(f"Expected {source} to hold a 'keep' mapping. Received keys: {sorted(d)}")
        keep = d["keep"]
        if not isinstance(keep, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in keep.values()):
            raise ValueError(
                f"Expected 'keep' in {source} to map layer names to lists of filter indices. "
                f"Received: keep={str(keep)[:80]}"
            )
        filters = d.get("filters") or {}
        if not isinstance(filters, dict):
            raise ValueError(f"Expected 'filters' in {source} to map layer names to filter counts. "
                             f"Received: filters={str(filters)[:80]}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"Expected 'meta' in {source} to be an object. Received: meta={meta!r}")
        return cls(keep, filters, meta, d.get("fingerprint"))

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text, source="plan"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Expected {source} to hold JSON. Received invalid JSON: {e}") from None
        return cls.from_dict(d, source)

    def save(self, path):
        """Writes the plan as JSON atomically: a temporary file beside `path` replaces it
        once complete, so a failed save leaves the previous file whole."""
        text = self.to_json()

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(path, write)

    @classmethod
    def load(cls, path):
        """Reads a plan saved by `save`; every problem is one ValueError naming `path`."""
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"Plan file not found. Received: path={str(path)!r}") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise ValueError(f"Cannot read plan file {str(path)!r}: {e}") from None
        return cls.from_json(text, source=f"plan file {str(path)!r}")


def _select_groups(cnn, scores, kept_of):
    """(keep, filters) of a plan: for every tied group whose `kept_of(group)` is a function
    (classes of a segment -> classes kept; None: the group keeps everything), the filters
    `_select` keeps, and each conv's filter count."""
    keep, filters = {}, {}
    for group in cnn.groups:
        kept_of_group = kept_of(group)
        if kept_of_group is None:
            continue
        kept = _select(cnn.channel_group(group[0]), _checked_scores(cnn, group, scores), kept_of_group)
        keep.update(kept)
        filters.update({name: cnn.conv(name).filters for name in kept})
    return keep, filters


def _check_prunable(cnn, group):
    for name in group:
        if not cnn.conv(name).prunable:
            raise ValueError(f"Layer '{name}' cannot be pruned: {cnn.conv(name).blocked_by}.")


def _checked_scores(cnn, group, scores):
    """{name: scores as float64} for the convs of `group`, one score per filter."""
    checked = {}
    for name in group:
        m = cnn.conv(name)
        if m.name not in scores:
            raise ValueError(f"No scores for layer '{m.name}'. Received scores for: "
                             f"{', '.join(scores) or '(none)'}")
        s = np.asarray(scores[m.name], dtype=np.float64).reshape(-1)
        if s.shape[0] != m.filters:
            raise ValueError(f"Expected {m.filters} scores for layer '{m.name}'. Received: {s.shape[0]}")
        checked[m.name] = s
    return checked
