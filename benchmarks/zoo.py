"""Every keras.applications family, and tiny configs of every keras-hub image family, pruned at
a uniform ratio (L1 scores, no exclusions, random weights): convs prunable / total, why the rest
are blocked, params (and MACs) before and after, and rebuild seconds.

    python -m benchmarks.zoo [--tables apps|hub|all] [--ratio 0.3]

"Convs" are the layers whose filters the engine can remove (Conv, SeparableConv,
Conv*Transpose, and Dense layers applied to feature maps, as in ConvNeXt). The models are
built by tests/zoo_models.py, the builders the zoo tests prune.
"""

import os
import re
import warnings

import click

from benchmarks import comma_list, command, invocation, machine_line, timed, write
from tests.zoo_models import HUB, HUB_INEXACT, ZOO, build, build_hub, conv_layers_inside, excluded_from_target

HUB_MARK = "<!-- keras-hub table: python -m benchmarks.zoo --tables hub rewrites from here -->"


def blocked_reasons(blocked, anonymous=False):
    """'n x reason; ...' for blocked convs, most frequent first. `anonymous` drops the
    layer names from the reasons, so that one kind of block is counted once."""
    reasons = {}
    for c in blocked:
        tied = c.blocked_by.startswith("it is tied to")
        if "LayerNormalization" in c.blocked_by:
            key = ("tied to a conv that " if tied else "") + \
                "feeds LayerNormalization (allow_inexact=True prunes it)"
        elif tied:
            key = "tied to a blocked conv: " + c.blocked_by.split(": ", 1)[-1]
        else:
            key = c.blocked_by
        if anonymous:
            key = re.sub(r"(layer|conv) '[^']+' ", r"\1 ", key)
        reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def timed_prune(cnn, ratio):
    """(pruned model, seconds of the rebuild) at a uniform L1 `ratio`."""
    from pruning import PrunePlan, get_ranker, prune

    plan = PrunePlan.from_scores(cnn, get_ranker("l1").rank_all(cnn), ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped class; inexact: measured in hub_row
        return timed(prune, cnn, plan)


def zoo_row(name, ratio):
    """One row of the keras.applications table."""
    from pruning import CNNModel, model_stats

    model = build(name)
    cnn = CNNModel(model)
    pruned, seconds = timed_prune(cnn, ratio)
    before, after = model_stats(model), model_stats(pruned)
    blocked = [c for c in cnn.conv_layers if not c.prunable]
    return {"model": name, "input": f"{ZOO[name][0]}px", "convs": len(cnn.conv_layers),
            "visible": len(cnn.conv_layers), "prunable": len(cnn.prunable_layers),
            "excluded": sum(excluded_from_target(c) for c in blocked), "reasons": blocked_reasons(blocked),
            "params": (before["params"], after["params"]), "macs": (before["macs"], after["macs"]),
            "seconds": seconds}


def hub_row(name, ratio):
    """One row of the keras-hub table: Conv* layers visible / inside the model, prunable /
    visible, why the others are blocked, params before and after (count_params: MiT's
    Dense layers on (batch, None, C) sequences have no static MACs for model_stats)."""
    from pruning import CNNModel, output_change

    model = build_hub(name)
    inexact = name in HUB_INEXACT
    cnn = CNNModel(model, allow_inexact=inexact)
    inside = conv_layers_inside(model)
    kinds = tuple({type(la) for la in inside})
    visible = [c for c in cnn.conv_layers if isinstance(c.layer, kinds)]
    blocked = [c for c in visible if not c.prunable]
    pruned, seconds = timed_prune(cnn, ratio)
    reasons = "; ".join(r for r in (blocked_reasons(blocked, anonymous=True), *[o.message for o in cnn.opaque]) if r)
    if inexact:
        reasons = f"(allow_inexact=True: output change {output_change(model, pruned):.2g}) " + reasons
    return {"model": name, "input": "x".join(str(d) for d in model.inputs[0].shape[1:]), "convs": len(inside),
            "visible": len(visible), "prunable": len(visible) - len(blocked),
            "excluded": sum(excluded_from_target(c) for c in blocked), "reasons": reasons,
            "params": (model.count_params(), pruned.count_params()), "seconds": seconds}


def table(title, row, names, ratio, note, headline, macs):
    """Markdown lines of one table: title, machine, command, headline and one row per model."""
    import keras

    from pruning.stats import machine_description

    before, rows = machine_description(), []
    for name in names:
        click.echo(f"{name}...", err=True)
        rows.append(row(name, ratio))
        keras.backend.clear_session()
    total, visible, prunable, excluded = (sum(r[k] for r in rows) for k in ("convs", "visible", "prunable",
                                                                            "excluded"))
    pct = lambda a, b: f"{100 * a / max(b, 1):.1f}%"  # noqa: E731
    lines = [f"# {title} pruned at a uniform ratio of {ratio}", "",
             f"{machine_line(before)} Written by `{invocation([] if macs else ['models'])}`. {note}", "",
             headline.format(total=total, visible=visible, prunable=prunable, target=visible - excluded,
                             p_visible=pct(prunable, visible), p_total=pct(prunable, total),
                             p_target=pct(prunable, visible - excluded)), "",
             "| model | input | convs " + ("prunable / total" if macs else "visible / total | prunable / visible")
             + " | params before | params after | " + ("MACs before | MACs after | " if macs else "")
             + "rebuild s | blocked: why |",
             "|---|---|---|" + ("" if macs else "---|") + "---:|---:|" + ("---:|---:|" if macs else "") + "---:|---|"]
    for r in rows:
        counts = f"{r['prunable']} / {r['convs']}" if macs else \
            f"{r['visible']} / {r['convs']} | {r['prunable']} / {r['visible']}"
        sizes = f"{r['params'][0]:,} | {r['params'][1]:,}" + (f" | {r['macs'][0]:,} | {r['macs'][1]:,}" if macs else "")
        lines.append(f"| {r['model']} | {r['input']} | {counts} | {sizes} | {r['seconds']:.1f} | {r['reasons'] or '-'} |")
    return lines


@command("zoo")
@click.option("--ratio", type=float, default=0.3, show_default=True, help="Uniform ratio.")
@click.option("--models", default=",".join(ZOO), show_default=True, callback=comma_list(str, tuple(ZOO)),
              help="Comma-separated keras.applications families.")
@click.option("--tables", type=click.Choice(["all", "apps", "hub"]), default="all", show_default=True,
              help="Which tables to measure: keras.applications, keras-hub (needs the [hub] extra), "
                   "or both; the other one is kept as it is in --output.")
def main(ratio, models, tables, output):
    """Prune every family and write the zoo tables."""
    old_apps, _, old_hub = (open(output).read() if os.path.exists(output) else "").partition(HUB_MARK)
    apps = old_apps.strip("\n").split("\n")
    if tables in ("all", "apps"):
        apps = table("Every keras.applications family", zoo_row, models, ratio,
                     "Random weights (weights=None), 10 classes, no exclusions, L1 scores.",
                     "**{prunable} of {total} convs prunable ({p_total}); {prunable} of {target} ({p_target}) "
                     "excluding the convs whose channels reach the output or feed LayerNormalization "
                     "(prunable with `allow_inexact=True`).**", macs=True)
    hub = old_hub.strip("\n").split("\n")
    if tables in ("all", "hub"):
        import keras_hub

        hub = table(f"keras-hub {keras_hub.__version__} backbones and tasks", hub_row, HUB, ratio,
                    "Tiny configs of each family (`tests/zoo_models.py`, `build_hub`), random weights, nothing "
                    "downloaded, L1 scores, no exclusions. *Convs* are the filter-making `Conv*` layers anywhere "
                    "inside the model (custom blocks and nested models walked; depthwise convs left out).",
                    "**{visible} of {total} convs visible; {prunable} of {visible} prunable ({p_visible}); "
                    "{prunable} of {target} ({p_target}) leaving out the convs whose channels reach an output "
                    "or feed LayerNormalization.**", macs=False)
    write(output, apps + ["", HUB_MARK, ""] + hub)


if __name__ == "__main__":
    main()
