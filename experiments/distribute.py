"""Training beyond one device: tf.distribute strategies and mixed precision by name.

    strategy = get_strategy("mirrored")        # every local GPU (or the CPU)
    with strategy.scope():                     # variables are created per replica
        model = vgg16_bn_cifar(10)
        model.compile(...)
    model.fit(dataset)                         # the global batch is split over replicas

Ranking and pruning run outside the scope (they read weights and rebuild a model on
the host); build and compile the pruned model inside the scope again to fine-tune it.
See docs/distributed.md for several GPUs, several machines (TF_CONFIG) and Colab TPUs.

Several machines: `connect_cluster` joins the TF_CONFIG cluster (bounded wait) and
returns a `MultiWorkerStrategy`; `worker_setup`, `interrupted_run`, `backup_callbacks`
and `restart_process` are what the CLI's `--strategy multiworker` runs with (only the
chief writes; a lost worker interrupts the run, which every worker then resumes).
"""

import json
import os
import socket
import sys

from experiments.choices import PRECISIONS, STRATEGIES  # noqa: F401  (public here too)


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
        return connect_cluster()
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


# ------------------------------------------------------------------ several machines
# The cluster is joined once per process (TensorFlow configures its collectives once).
_CLUSTER = {}


def cluster_from_env(environ=None):
    """(worker addresses, this worker's index) from TF_CONFIG, checked: a ValueError names
    a missing or invalid TF_CONFIG, an empty worker list or an index outside the cluster.
    Worker 0 is the chief (a "chief" task, if listed, comes first)."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable: "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                         '"index": 0}} (see docs/distributed.md). Received: TF_CONFIG unset')
    try:
        spec = json.loads(text)
        cluster, task = spec["cluster"], spec["task"]
        workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
        kind, index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"Expected TF_CONFIG as JSON with cluster.worker (a list of host:port) and task.type / "
                         f"task.index ({type(e).__name__}: {e}). Received: TF_CONFIG={text[:200]!r}") from None
    if kind not in ("worker", "chief") or isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"Expected TF_CONFIG task type 'worker' (or 'chief') and an integer index. Received: "
                         f"task={task!r}")
    if kind == "worker" and "chief" in cluster:
        index += len(cluster["chief"])
    if not workers or not 0 <= index < len(workers):
        raise ValueError(f"Expected TF_CONFIG task index in [0, {len(workers) - 1}]: the cluster lists "
                         f"{len(workers)} worker(s) ({', '.join(map(str, workers))}). Received: index={task['index']}")
    return workers, index


def worker_index():
    """This process's index in the TF_CONFIG cluster (0, the chief, without one)."""
    return cluster_from_env()[1] if os.environ.get("TF_CONFIG") else 0


def is_chief():
    """Whether this process writes: the chief of a TF_CONFIG cluster, or any lone process."""
    return worker_index() == 0


def connect_cluster(timeout=300.0):
    """The `MultiWorkerStrategy` of the TF_CONFIG cluster, once every worker has joined.

    Waits at most `timeout` seconds for the other workers: then a ValueError names the
    addresses that never answered. Later calls return the same strategy."""
    if "strategy" in _CLUSTER:
        return _CLUSTER["strategy"]
    workers, index = cluster_from_env()
    _register_timeout(timeout)
    try:
        strategy = __getattr__("MultiWorkerStrategy")()
    except Exception as e:
        text = str(e).strip()
        if "DeadlineExceeded" in type(e).__name__ + text or "timed out" in text.lower() or "timeout" in text.lower():
            others = [w for i, w in enumerate(workers) if i != index]
            silent = [w for w in others if not _answers(w)] or others
            raise ValueError(f"The cluster did not form within {timeout:g} s: no answer from worker(s) "
                             f"{', '.join(silent)} (this is worker {index} of {len(workers)}, TF_CONFIG). Start "
                             "every worker with the same cluster, or raise --worker-timeout.") from None
        raise ValueError(f"Cannot join the TF_CONFIG cluster {workers} as worker {index}: "
                         f"{type(e).__name__}: {text.splitlines()[0] if text else ''}") from None
    _CLUSTER["strategy"] = strategy
    return strategy


def _register_timeout(seconds):
    """Configures TensorFlow's coordination service as MultiWorkerMirroredStrategy does,
    plus a bounded wait for the workers to register (no public option sets it). Every
    worker registers with worker 0's service."""
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    if context.context().coordination_service is not None:
        return
    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(seconds * 1000))
    # Registration as a barrier: the leader (worker 0) also gives up after the timeout.
    context.context().coordination_service.cluster_register_with_barrier = True


def _answers(address, wait=1.0):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=wait):
            return True
    except (OSError, ValueError):
        return False


def _multiworker_class():
    import tensorflow as tf

    class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy as Keras 3's TensorFlow trainer can use it.

        Keras 3 (up to at least 3.15) calls `strategy.reduce` with a (x, y) batch
        before fit / evaluate and with scalar metrics and `axis=0` after each step;
        the collective reduce takes one tensor and no axis on a scalar, so `fit`
        failed with "Attempt to convert a value (PerReplica...)"
        (keras-team/keras#20585). Here each tensor of a structure is reduced on its
        own, scalars over replicas only. Datasets Keras distributes are sharded by
        data (each worker takes its part of every global batch) unless they say how.
        A MEAN over replicas (axis=None) of a batch, which Keras takes before fit /
        evaluate only for the shapes to build with, is this worker's part of it.
        """

        def reduce(self, reduce_op, value, axis):
            def one(v):
                local = self.experimental_local_results(v)[0]
                if axis is None and local.shape.rank and str(reduce_op).upper().endswith("MEAN"):
                    # Keras' sample batch for building the model: this worker's part (the
                    # workers' parts of a batch may differ in size; no collective needed).
                    return local
                return super(MultiWorkerStrategy, self).reduce(
                    reduce_op, v, axis if axis is None or local.shape.rank else None)
            return tf.nest.map_structure(one, value)

        def experimental_distribute_dataset(self, dataset, options=None):
            policy = tf.data.experimental.AutoShardPolicy
            if dataset.options().experimental_distribute.auto_shard_policy == policy.AUTO:
                shard = tf.data.Options()
                shard.experimental_distribute.auto_shard_policy = policy.DATA
                dataset = dataset.with_options(shard)
            return super().experimental_distribute_dataset(dataset, options)

    return MultiWorkerStrategy


def __getattr__(name):
    if name == "MultiWorkerStrategy":  # defined on first use: this module imports TensorFlow lazily
        globals()[name] = _multiworker_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WorkerLost(KeyboardInterrupt):
    """Another worker of the cluster stopped (its collectives failed): the run is
    interrupted, not failed, and continues when the workers run again."""


def lost_worker_errors():
    """The TensorFlow errors a collective raises when a peer is gone."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError)


MAX_RESTARTS = 3
RESTARTS_VAR = "PRUNING_WORKER_RESTARTS"


def restart_process(echo=print):
    """Runs this command again in this process (os.execv: same pid, argv, environment
    and TF_CONFIG) so that it rejoins the cluster and resumes its interrupted run;
    at most MAX_RESTARTS times. Returns False (nothing done) past that."""
    done = int(os.environ.get(RESTARTS_VAR, "0"))
    if done >= MAX_RESTARTS:
        return False
    os.environ[RESTARTS_VAR] = str(done + 1)
    echo(f"a worker of the cluster was lost: restarting this worker ({done + 1}/{MAX_RESTARTS}) to continue "
         "from the last finished epoch once every worker is back")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


WORKERS_DIR = ".workers"


def worker_setup(cfg, db):
    """(config, log path) this process runs with under --strategy multiworker: the
    chief's own; another worker's point into `<out_dir>/.workers/<index>/` (its log,
    run folders and --output), which only it uses and `remove_worker_files` deletes
    once its command succeeded. The same folder is used again when this worker is
    restarted, so that it resumes the run it was in."""
    import dataclasses

    index = worker_index()
    if index == 0:
        return cfg, db
    scratch = worker_dir(cfg.out_dir, index)
    changes = {"out_dir": os.path.join(scratch, "runs")}
    if getattr(cfg, "output", None):
        changes["output"] = os.path.join(scratch, "output", os.path.basename(cfg.output))
    os.makedirs(scratch, exist_ok=True)
    return dataclasses.replace(cfg, **changes), os.path.join(scratch, "log.db")


def on_scratch(cfg):
    """Whether this process is a non-chief worker of a --strategy multiworker run: what it
    writes goes to its scratch folder (`worker_setup`), deleted at the end, so its output
    names no file (the chief's names the files that stay)."""
    return getattr(cfg, "strategy", None) == "multiworker" and not is_chief()


def worker_dir(out_dir, index):
    return os.path.join(out_dir, WORKERS_DIR, str(index))


def remove_worker_files(cfg):
    """Deletes this (non-chief) worker's scratch folder; nothing for the chief."""
    import shutil

    index = worker_index()
    if index:
        shutil.rmtree(worker_dir(cfg.out_dir, index), ignore_errors=True)
        try:
            os.rmdir(os.path.join(cfg.out_dir, WORKERS_DIR))  # only when no other worker's is left
        except OSError:
            pass


def cluster_config():
    """What the log records of the cluster in a run's config (`cluster`)."""
    workers, index = cluster_from_env()
    return {"workers": len(workers), "addresses": workers}


# Options that may differ when a worker is started again (seeds: a cifar run records its own).
RESUME_IGNORES = ("seeds", "worker_timeout", "verbose")


def interrupted_run(log, experiment, cfg):
    """The id of the last interrupted run of `experiment` in `log` started with the same
    options as `cfg` (a worker restarted with the same command resumes it), or None."""
    import dataclasses

    mine = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    for row in reversed(log.runs(experiment, status="interrupted")):
        recorded = json.loads(row["config"] or "{}")
        if all(recorded.get(k) == v for k, v in mine.items() if k not in RESUME_IGNORES) and \
                (row["seed"] in tuple(cfg.seeds) if hasattr(cfg, "seeds") else True):
            return row["id"]
    return None


class collectives:
    """Context manager around work that runs collectives (fit): in a joined cluster, a
    peer's loss (UnavailableError and the like) becomes `WorkerLost`, so the run is
    marked interrupted and resumable instead of failed."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and "strategy" in _CLUSTER and isinstance(error, lost_worker_errors()):
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise WorkerLost(f"{type(error).__name__}: {first[:300]}") from error
        return False


def chief_text(text):
    """`text` as the chief (worker 0) has it, on every worker of the joined cluster (one
    collective: every worker calls it at the same point); `text` itself otherwise."""
    if "strategy" not in _CLUSTER:
        return text
    import numpy as np
    import tensorflow as tf

    strategy = _CLUSTER["strategy"]
    data = np.zeros(4096, np.int32)
    if is_chief():
        raw = np.frombuffer(text.encode()[:4096], np.uint8)
        data[:len(raw)] = raw
    value = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant(data))
    total = np.asarray(tf.distribute.MultiWorkerMirroredStrategy.reduce(strategy, "SUM", value, axis=None))
    return bytes(total[total > 0].astype(np.uint8)).decode()


def backup_callbacks(own_dir, chief_dir):
    """Keras BackupAndRestore for one training phase: saved after every epoch in this
    worker's `own_dir`; restored from `chief_dir`, the chief's (a folder every worker can
    read), so that a restarted worker continues at the chief's last finished epoch.
    Every worker saves (the saving reads sync-on-read variables, a collective), the
    other workers in their scratch folders. One callback where both are the same."""
    import keras

    if own_dir == chief_dir:
        return [keras.callbacks.BackupAndRestore(own_dir, double_checkpoint=True)]

    class RestoreOnly(keras.callbacks.BackupAndRestore):
        def on_epoch_end(self, epoch, logs=None):
            pass

        def on_train_batch_end(self, batch, logs=None):
            pass

        def on_train_end(self, logs=None):
            pass

    class SaveOnly(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            pass

    return [RestoreOnly(chief_dir, double_checkpoint=True), SaveOnly(own_dir, double_checkpoint=True)]
