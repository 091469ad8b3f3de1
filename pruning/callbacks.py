"""Keras callbacks of the toolkit."""

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
