"""Property tests over random small CNNs (Sequential and Functional; BatchNorm,
pooling, Flatten, Add, Concatenate, depthwise) and random keep sets: the rebuilt
model always builds, has the parameter count of the same architecture built
directly with the kept widths, and keeps zero-filter invariance."""

import keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import prune_zeroed, relative_diff

L = keras.layers
BLOCKS = ("conv", "conv", "depthwise", "pool", "add", "concat")


def make_model(spec, widths):
    """The architecture `spec` with filter counts `widths` {conv name: filters}."""
    functional = spec["functional"]
    inp = keras.Input((6, 6, 3))
    x, layers, channels = inp, [], 3

    def apply(layer, t):
        layers.append(layer)
        return layer(t) if functional else t

    for j, kind in enumerate(spec["blocks"]):
        if kind == "conv" or (not functional and kind in ("add", "concat")):
            x = apply(L.Conv2D(widths[f"c{j}"], 3, padding="same", name=f"c{j}"), x)
            channels = widths[f"c{j}"]
            if spec["bn"]:
                x = apply(L.BatchNormalization(name=f"bn{j}"), x)
            x = apply(L.ReLU(name=f"relu{j}"), x)
        elif kind == "depthwise":
            x = apply(L.DepthwiseConv2D(3, padding="same", name=f"d{j}"), x)
        elif kind == "pool":
            x = apply(L.MaxPooling2D(2, padding="same", name=f"p{j}"), x)
        elif kind == "add":  # a residual: the branch is tied to whatever made x
            y = L.Conv2D(widths.get(f"r{j}", channels), 3, padding="same", name=f"r{j}")(x)
            x = L.Add(name=f"add{j}")([x, y])
        else:
            y = L.Conv2D(widths[f"k{j}"], 1, name=f"k{j}")(x)
            x = L.Concatenate(name=f"cat{j}")([x, y])
            channels += widths[f"k{j}"]
    head = L.GlobalAveragePooling2D(name="gap") if spec["head"] == "gap" else L.Flatten(name="flat")
    dense = L.Dense(3, name="out")
    if functional:
        return keras.Model(inp, dense(head(x)))
    return keras.Sequential([inp, *layers, head, dense])


specs = st.fixed_dictionaries({
    "functional": st.booleans(),
    "bn": st.booleans(),
    "blocks": st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    "head": st.sampled_from(["gap", "flatten"]),
    "widths": st.lists(st.integers(2, 6), min_size=4, max_size=4),
})


def _widths(spec):
    return {f"{p}{j}": spec["widths"][j % 4] for j in range(len(spec["blocks"])) for p in "ck"}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, ratio=st.floats(0.0, 0.9), seed=st.integers(0, 1000))
def test_random_cnn_prunes_exactly(spec, ratio, seed):
    model = make_model(spec, _widths(spec))
    before, after, cnn, plan, pruned = prune_zeroed(model, ratio=ratio, seed=seed)
    assert relative_diff(before, after) < 1e-4
    kept = {c.name: len(plan.keep.get(c.name, range(c.filters))) for c in cnn.conv_layers}
    widths = {**_widths(spec), **kept}
    assert pruned.count_params() == make_model(spec, widths).count_params()
    if any(len(k) < cnn.conv(n).filters for n, k in plan.keep.items()):
        assert pruned.count_params() < model.count_params()
