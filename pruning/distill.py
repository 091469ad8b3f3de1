"""Knowledge distillation while fine-tuning a pruned model (Hinton et al., 2015).

    student = Distiller(pruned, teacher=unpruned, temperature=4.0, alpha=0.5)
    student.compile(optimizer="adam", metrics=["accuracy"])
    student.fit(train_ds, epochs=3)       # trains `pruned` in place

The loss of a batch is

    (1 - alpha) * CE(labels, student) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T))

with s and t the student's and the teacher's logits and T the temperature (the T**2
keeps the soft term's gradients on the scale of the hard one).

Logits or probabilities: many Keras classifiers (the rice models among them) end
in a softmax. For those, log(p) stands in for the logits: it differs from them by a
constant per example, and softmax(log(p) / T) == softmax(z / T) for any T, so both
kinds of model give the same loss (up to the clipping of p at 1e-7).

The teacher runs on the fly inside each training step (needed when the data is
augmented), or its logits come cached with the labels: batches of
(images, (labels, teacher_logits)), see `teacher_logits`. The teacher is never
trained and its weights are not tracked by the Distiller.
"""

import keras
import numpy as np

from pruning.criteria import outputs_probabilities

EPSILON = 1e-7


def as_logits(outputs, probabilities):
    """Logits, or log-probabilities when the model outputs probabilities (see module doc)."""
    if probabilities:
        return keras.ops.log(keras.ops.clip(outputs, EPSILON, 1.0))
    return outputs


def distillation_loss(labels, student_logits, teacher_logits, temperature=4.0, alpha=0.5):
    """Per-example loss (see the module docstring); labels one-hot or integer."""
    check_distill(temperature, alpha)
    s = keras.ops.convert_to_tensor(student_logits, "float32")
    t = keras.ops.convert_to_tensor(teacher_logits, "float32")
    labels = keras.ops.convert_to_tensor(labels)
    if len(labels.shape) == len(s.shape):
        hard = keras.losses.categorical_crossentropy(keras.ops.cast(labels, "float32"), s, from_logits=True)
    else:
        hard = keras.losses.sparse_categorical_crossentropy(labels, s, from_logits=True)
    log_ps = keras.ops.log_softmax(s / temperature, axis=-1)
    log_pt = keras.ops.log_softmax(t / temperature, axis=-1)
    soft = keras.ops.sum(keras.ops.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return (1.0 - alpha) * hard + alpha * temperature ** 2 * soft


def check_distill(temperature, alpha):
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"Expected distillation weight alpha in [0, 1]. Received: alpha={alpha!r}")


class _Frozen:
    """Holds the teacher outside Keras' tracking, so its weights are neither trained
    nor saved with the student."""

    def __init__(self, model):
        self.model = model


class Distiller(keras.Model):
    """Wraps `student` for `fit`: its outputs, a distillation loss, metrics on the labels.

    Args:
        student: the model to train (trained in place; save `student`, not the Distiller).
        teacher: the unpruned model, run on the fly; None when batches carry cached
            teacher logits as (images, (labels, teacher_logits)).
        temperature, alpha: see `distillation_loss`.
    """

    def __init__(self, student, teacher=None, temperature=4.0, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        check_distill(temperature, alpha)
        self.student = student
        self._teacher = _Frozen(teacher) if teacher is not None else None
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self._student_probs = outputs_probabilities(student)
        self._teacher_probs = outputs_probabilities(teacher) if teacher is not None else False

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        labels, cached = _split(y)
        student = as_logits(y_pred, self._student_probs)
        if cached is None and self._teacher is not None:
            t = self._teacher.model(x, training=False)
            cached = keras.ops.stop_gradient(as_logits(t, self._teacher_probs))
        if cached is None:
            # Batches without teacher logits and no teacher (validation data in cached
            # mode): the hard term alone, so the validation loss stays the cross-entropy.
            loss = distillation_loss(labels, student, student, self.temperature, 0.0)
        else:
            loss = distillation_loss(labels, student, cached, self.temperature, self.alpha)
        if sample_weight is not None:
            loss = loss * keras.ops.cast(sample_weight, loss.dtype)
        return keras.ops.mean(loss)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, _split(y)[0], y_pred, sample_weight)


def _split(y):
    if isinstance(y, (tuple, list)) and len(y) == 2:
        return y[0], y[1]
    return y, None


def teacher_logits(teacher, images, batch_size=256):
    """Logits (or log-probabilities, see module doc) of `teacher` for an array of
    preprocessed images or an iterable of image batches, as one numpy array."""
    probs = outputs_probabilities(teacher)
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)] \
        if isinstance(images, np.ndarray) else images
    out = [keras.ops.convert_to_numpy(as_logits(teacher(np.asarray(b), training=False), probs))
           for b in batches]
    return np.concatenate(out).astype(np.float32)
