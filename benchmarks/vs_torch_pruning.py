"""Pruned VGG16-BN (CIFAR, 32x32) latency: this project's exports against Torch-Pruning's.

    python -m benchmarks.vs_torch_pruning --rounds 3 --runs 5

Both sides prune the same architecture (experiments.models.vgg16_bn_cifar, width 1,
10 classes) with L1 norms at uniform ratios, to the same kept filter counts. Keras
variants: the pruned model as trained (`keras`), with BatchNorm folded into the convs
(`fold-bn`, activations left as layers), with BN folded and ReLU fused (`fold`), the
folded model with kept counts rounded down to multiples of 8 (`fold-r8down`: fewer
MACs, so compared on its own MACs), and the folded model served from a SavedModel
(`savedmodel`) and LiteRT (`litert`). Timings: `pruning.interleaved_latency`, the median
over --rounds interleaved rounds of the median of --runs calls. Torch rows need the `bench`
extra (torch, torch-pruning, ai-edge-litert); they are skipped when it is absent. Never XLA:
plain tf.function graphs.
"""

import importlib.util
import os
import tempfile
import time

# On a loaded machine torch's spinning OpenMP threads starve TensorFlow's; the table records the policy.
if os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import comma_list, command, invocation, timed, write  # noqa: E402

VARIANTS = ("keras", "fold-bn", "fold", "fold-r8down", "savedmodel", "litert", "torch")


def torch_vgg16_bn(widths, num_classes=10):
    """The same VGG16-BN in torch (conv widths as given, "M" = 2x2 max pooling)."""
    import torch.nn as nn

    layers, c_in = [], 3
    for v in widths:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v, eps=1e-5), nn.ReLU(inplace=True)]
        c_in = v
    layers += [nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c_in, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
               nn.Linear(512, num_classes)]
    return nn.Sequential(*layers).eval()


def torch_pruned(kept_counts, num_classes=10):
    """Torch-Pruning's L1 pruning of the full torch VGG16-BN to `kept_counts` filters per
    conv; returns (model, seconds the pruning took)."""
    import torch
    import torch_pruning as tp

    from experiments.models import VGG16_CFG

    torch.manual_seed(0)
    model = torch_vgg16_bn(VGG16_CFG, num_classes)
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv, k in zip(convs, kept_counts):
        l1 = conv.weight.detach().abs().sum(dim=(1, 2, 3))
        drop = torch.argsort(l1, stable=True)[: conv.out_channels - k].tolist()
        if drop:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return model.eval(), time.perf_counter() - start


def torch_runner(model, batch, path=None):
    import torch

    x = torch.randn(batch, 3, 32, 32)
    return torch.inference_mode()(lambda: model(x))


def keras_runner(model, batch, path=None):
    import tensorflow as tf

    x = tf.random.uniform((batch, *model.inputs[0].shape[1:]), seed=0)
    fn = tf.function(lambda t: model(t, training=False))
    return lambda: fn(x).numpy()


def saved_model_runner(model, batch, path):
    import tensorflow as tf

    from pruning.export import export_saved_model

    if not os.path.exists(path):
        export_saved_model(model, path)
    loaded = tf.saved_model.load(path)
    x = tf.random.uniform((batch, *model.inputs[0].shape[1:]), seed=0)
    return lambda: loaded.serve(x).numpy()


def litert_runner(model, batch, path):
    from pruning.export import Runner, export_litert

    path += ".tflite"
    if not os.path.exists(path):
        export_litert(model, path)
    runner, x = Runner(path, "litert", batch_size=batch), np.random.default_rng(0).random((batch, 32, 32, 3), np.float32)
    return lambda: runner(x)


@command("vs_torch_pruning")
@click.option("--ratios", default="0.3,0.5,0.7", show_default=True, callback=comma_list(float),
              help="Comma-separated uniform ratios.")
@click.option("--batches", default="1,64", show_default=True, callback=comma_list(int), help="Comma-separated batch sizes.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds.")
@click.option("--runs", type=int, default=5, show_default=True, help="Timed calls per model and round.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, callback=comma_list(str, VARIANTS),
              help="Which rows to time.")
def main(ratios, batches, rounds, runs, variants, output):
    """Time every variant at every ratio and batch size; write a markdown table."""
    import keras
    import tensorflow as tf

    from experiments.models import vgg16_bn_cifar
    from pruning import CNNModel, PrunePlan, get_ranker, interleaved_latency, model_stats, prune
    from pruning.export import fold_batchnorm

    wanted, skipped = list(variants), []
    for v, modules, how in (("torch", ("torch", "torch_pruning"), "pip install 'keras-pruning-toolkit[bench]'"),
                            ("litert", ("ai_edge_litert",), "pip install ai-edge-litert")):
        if v in wanted and not all(importlib.util.find_spec(m) for m in modules):
            wanted.remove(v)
            skipped.append(f"{v} ({how})")
    keras.utils.set_random_seed(0)
    base = vgg16_bn_cifar(10, width=1.0, seed=0)
    cnn = CNNModel(base)
    scores = get_ranker("l1").rank_all(cnn)
    tmp = tempfile.mkdtemp(prefix="vs_tp_")

    base_macs = model_stats(base)["macs"]
    models = {("keras", 0.0): (base, base_macs, None)}  # (model, MACs, rebuild s)
    if "torch" in wanted:
        import torch

        torch.set_num_threads(os.cpu_count())
        full = [c.filters for c in cnn.conv_layers]
        models[("torch", 0.0)] = (torch_pruned(full)[0], base_macs, None)
    for r in ratios:
        pruned, rebuild = timed(prune, cnn, PrunePlan.from_scores(cnn, scores, r))
        macs = model_stats(pruned)["macs"]
        kept = [c.filters for c in CNNModel(pruned).conv_layers]
        folded = fold_batchnorm(pruned)
        for v in wanted:
            if v == "keras":
                models[(v, r)] = (pruned, macs, rebuild)
            elif v == "fold-bn":
                models[(v, r)] = (fold_batchnorm(pruned, fuse_activations=False), macs, None)
            elif v == "fold":
                models[(v, r)] = (folded, macs, None)
            elif v == "fold-r8down":
                small = fold_batchnorm(prune(cnn, PrunePlan.from_scores(cnn, scores, r, round_to=8,
                                                                        round_mode="down")))
                models[(v, r)] = (small, model_stats(small)["macs"], None)
            elif v in ("savedmodel", "litert"):
                models[(v, r)] = (folded, macs, None)
            elif v == "torch":
                tm, secs = torch_pruned(kept)
                got = [m.out_channels for m in tm.modules() if isinstance(m, torch.nn.Conv2d)]
                assert got == kept, (got, kept)
                models[(v, r)] = (tm, macs, secs)

    rows, machine = {}, []
    for b in batches:
        kinds = {"torch": torch_runner, "savedmodel": saved_model_runner, "litert": litert_runner}
        runners = {(v, r): kinds.get(v, keras_runner)(m, b, os.path.join(tmp, f"{v}_{r}")) for (v, r), (m, _, _) in models.items()}
        timing = interleaved_latency({k: (lambda x, run=run: run()) for k, run in runners.items()},
                                     runs=runs, rounds=rounds, inputs=np.zeros((b, 1), np.float32))
        machine.append(f"batch {b}: {timing['machine_before']} before, {timing['machine_after']} after")
        rows.update({(b, *k): m["ms_per_batch"] for k, m in timing["models"].items()})

    cmd = invocation()
    lines = [
        "## Pruned VGG16-BN (CIFAR 32x32, width 1, L1, uniform ratio): this project vs Torch-Pruning", "",
        f"Machine: {'; '.join(machine)}. TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}" + (f", torch {__import__('torch').__version__}, torch-pruning "
                                  f"{__import__('torch_pruning').__version__}" if "torch" in wanted else "")
        + f". OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}. Median ms per call ({runs} calls x {rounds} interleaved rounds). Speed-up / MAC cut = "
        "(unpruned ms / ms) / (unpruned MACs / MACs) of the same framework; 1.0 means time falls as fast as MACs.",
        f"Command: `{cmd}`" + (f". Skipped: {', '.join(skipped)}" if skipped else ""), "",
        "| batch | variant | ratio | MACs (M) | ms | speed-up / MAC cut | rebuild s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (b, v, r), ms in rows.items():
        macs, rebuild = models[(v, r)][1], models[(v, r)][2]
        ref = rows[(b, "torch" if v == "torch" else "keras", 0.0)]
        eff = (ref / ms) / (base_macs / macs)
        lines.append(f"| {b} | {v} | {r:g} | {macs / 1e6:.0f} | {ms:.2f} | {eff:.2f} | "
                     f"{'' if rebuild is None else f'{rebuild:.2f}'} |")
    write(output, lines)


if __name__ == "__main__":
    main()
