"""Training beyond one device: tf.distribute strategies and mixed precision by name.

    strategy = get_strategy("mirrored")        # every local GPU (or the CPU)
    with strategy.scope():                     # variables are created per replica
        model = vgg16_bn_cifar(10)
        model.compile(...)
    model.fit(dataset)                         # the global batch is split over replicas

Ranking and pruning run outside the scope (they read weights and rebuild a model on
the host); build and compile the pruned model inside the scope again to fine-tune it.
See docs/distributed.md for several GPUs, several machines (TF_CONFIG) and Colab TPUs.
"""

import json
import os

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def get_strategy(name="default", devices=None, tpu=None):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: "default" (one device, no distribution), "mirrored" (synchronous
            data parallelism over the GPUs of this machine, or `devices`),
            "multiworker" (the same over the machines listed in the TF_CONFIG
            environment variable), or "tpu" (a Cloud / Colab TPU).
        devices: device names for "mirrored" (default: all GPUs, else the CPU).
        tpu: TPU name or grpc address for "tpu" (default: found from the
            environment, as on Colab).
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"Expected strategy in {STRATEGIES}. Received: strategy={name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" in os.environ:
            try:
                json.loads(os.environ["TF_CONFIG"])
            except ValueError as e:
                raise ValueError(f"TF_CONFIG is not valid JSON ({e}). Received: "
                                 f"TF_CONFIG={os.environ['TF_CONFIG'][:200]!r}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise ValueError(
            f"No TPU found ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). On Colab choose "
            "Runtime > Change runtime type > TPU, or pass the TPU's name or grpc:// address. "
            f"Received: strategy='tpu', tpu={tpu!r}"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def set_mixed_precision(policy):
    """Sets Keras' global dtype policy; returns the policy name.

    `policy`: True (mixed_float16: GPUs with tensor cores), False / None (float32),
    or a name in PRECISIONS (mixed_bfloat16 for TPUs and recent CPUs). Call it before
    building the model; layers keep float32 variables and compute in half precision.
    Keep the last layer (softmax / logits) in float32, e.g. `dtype="float32"`.
    """
    import keras

    name = {True: "mixed_float16", False: "float32", None: "float32"}.get(policy, policy)
    if name not in PRECISIONS:
        raise ValueError(f"Expected mixed precision in {PRECISIONS} (or True / False). "
                         f"Received: mixed_precision={policy!r}")
    keras.mixed_precision.set_global_policy(name)
    return name


def replicas(strategy):
    """Replicas the global batch is split over (1 for the default strategy)."""
    return int(strategy.num_replicas_in_sync)
