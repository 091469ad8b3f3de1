"""Keras callbacks of the toolkit: epoch timing, and timing written to the experiment log."""

import time

import keras


class TimeHistory(keras.callbacks.Callback):
    """Records the wall-clock seconds of every epoch in `self.times`."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._start = None

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


class SQLiteLogger(TimeHistory):
    """A `TimeHistory` that also writes every epoch to an experiment log as it ends:
    seconds, metrics and learning rate.

    Args:
        log: a `save_sqlite.ExperimentLog` (anything with `log_epoch(run_id, phase,
            epoch, seconds, logs, lr=...)`).
        run_id: the run the epochs belong to.
        phase: a name for this fit within the run (e.g. "pretrain", "block1").
    """

    def __init__(self, log, run_id, phase="train"):
        super().__init__()
        self.log, self.run_id, self.phase = log, run_id, phase

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.log.log_epoch(self.run_id, self.phase, epoch, self.times[-1], logs, lr=current_lr(self.model))


def current_lr(model):
    """The optimizer's learning rate now (a schedule evaluated at its step), or None."""
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # no optimizer, or one without a readable rate
        return None
