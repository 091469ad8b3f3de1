"""Knowledge distillation while fine-tuning a pruned model (Hinton et al., 2015).

    trainer = Distiller(pruned, teacher=unpruned, temperature=4.0, alpha=0.5)
    trainer.compile(optimizer="adam", metrics=["accuracy"])
    trainer.fit(train_ds, epochs=3)       # trains `pruned` in place; save `pruned`

The loss of a batch is

    (1 - alpha) * CE(labels, student) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T))

with s and t the student's and the teacher's logits and T the temperature (the T**2
keeps the soft term's gradients on the scale of the hard one).

Keras' own `keras.distillation` does the work where it can:

* with a teacher, `Distiller` returns a `keras.distillation.Distiller` (its training
  step, the frozen teacher: it sets `teacher.trainable = False`, and its weighting,
  `student_loss_weight = 1 - alpha`);
* the soft term is `keras.distillation.LogitsDistillation` with
  `keras.losses.KLDivergence`, in both modes;
* the hard term is the loss given to `compile`, by default
  `keras.losses.CategoricalCrossentropy` on one-hot labels (pass
  `loss="sparse_categorical_crossentropy"` for integer labels).

Our own pieces, each for something `keras.distillation` lacks:

* `SoftTargets` (a `LogitsDistillation`): Keras divides the outputs by T as if they
  were logits, but many Keras classifiers (the rice models among them) end in a
  softmax. For those, log(p) stands in for the logits: it differs from them by a
  constant per example, and softmax(log(p) / T) == softmax(z / T) for any T, so both
  kinds of model give the same loss (up to the clipping of p at 1e-7).
* `CachedDistiller` and `teacher_logits`: Keras' Distiller runs the teacher in every
  training step. Without augmentation the teacher sees the same images every epoch,
  so `compress` runs it once over the data (`teacher_logits`) and the batches carry
  its logits: (images, (labels, teacher_logits)). Keras has no such mode.
* `TeacherDistiller` only gives Keras' Distiller its defaults (the loss above, our
  `alpha` and `temperature`) so both modes compile alike.

Either way only the student is trained, and the student is an ordinary Keras model:
it saves as a plain `.keras` file that loads without this module.
"""

import numbers

import keras
import numpy as np

from pruning.criteria import outputs_probabilities

EPSILON = 1e-7


def as_logits(outputs, probabilities):
    """Logits, or log-probabilities when the model outputs probabilities (see module doc)."""
    if probabilities:
        return keras.ops.log(keras.ops.clip(outputs, EPSILON, 1.0))
    return outputs


def check_distill(temperature, alpha):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"Expected distillation weight alpha in [0, 1]. Received: alpha={alpha!r}")


class SoftTargets(keras.distillation.LogitsDistillation):
    """`LogitsDistillation` (KL divergence, scaled by T**2) that first turns the
    outputs of a model ending in a softmax into log-probabilities (see module doc).

    Args:
        temperature: T, > 0.
        teacher_probabilities, student_probabilities: whether each side's outputs are
            probabilities (cached teacher logits are logits already).
    """

    def __init__(self, temperature=4.0, teacher_probabilities=False, student_probabilities=False):
        super().__init__(temperature=float(temperature), loss=keras.losses.KLDivergence())
        self.teacher_probabilities = bool(teacher_probabilities)
        self.student_probabilities = bool(student_probabilities)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return super().compute_loss(as_logits(teacher_outputs, self.teacher_probabilities),
                                    as_logits(student_outputs, self.student_probabilities), **kwargs)

    def get_config(self):
        return {"temperature": self.temperature, "teacher_probabilities": self.teacher_probabilities,
                "student_probabilities": self.student_probabilities}


def default_loss(student):
    """Cross-entropy on one-hot labels from the model's logits or probabilities, as its last
    layer gives them: the hard term here, and `compress`'s loss without distillation."""
    return keras.losses.CategoricalCrossentropy(from_logits=not outputs_probabilities(student))


def Distiller(student, teacher=None, temperature=4.0, alpha=0.5):
    """The model to `compile` and `fit` in place of `student` (trained in place).

    Args:
        student: the model to train; save it, not the trainer.
        teacher: the unpruned model, run on the fly (a `TeacherDistiller`, Keras'
            Distiller); None when batches carry cached teacher logits as
            (images, (labels, teacher_logits)), see `teacher_logits` (a `CachedDistiller`).
        temperature: T, > 0.
        alpha: weight of the soft term in [0, 1]; the labels weigh 1 - alpha.
    """
    if teacher is None:
        return CachedDistiller(student, temperature, alpha)
    return TeacherDistiller(student, teacher, temperature, alpha)


class TeacherDistiller(keras.distillation.Distiller):
    """`keras.distillation.Distiller` with a `SoftTargets` term and `default_loss` as
    the `compile` default. The teacher is frozen (`trainable = False`), as Keras does."""

    def __init__(self, student, teacher, temperature=4.0, alpha=0.5, **kwargs):
        check_distill(temperature, alpha)
        soft = SoftTargets(temperature, outputs_probabilities(teacher), outputs_probabilities(student))
        super().__init__(teacher=teacher, student=student, distillation_losses=soft,
                         student_loss_weight=1.0 - float(alpha), **kwargs)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        super().compile(optimizer=optimizer, loss=loss if loss is not None else default_loss(self.student),
                        metrics=metrics, **kwargs)


class CachedDistiller(keras.Model):
    """Trains `student` on batches (images, (labels, teacher_logits)) with the loss of
    the module docstring; batches of (images, labels) alone (validation data) get the
    hard term only, so the validation loss stays the cross-entropy.

    Args:
        student: the model to train (in place; save `student`, not this model).
        temperature, alpha: see `Distiller`.
    """

    def __init__(self, student, temperature=4.0, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        check_distill(temperature, alpha)
        self.student = student
        self.alpha = float(alpha)
        self.soft = SoftTargets(temperature, False, outputs_probabilities(student))

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        self.hard = keras.losses.get(loss) if loss is not None else default_loss(self.student)
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        labels, cached = _split(y)
        hard = keras.ops.mean(self.hard(labels, y_pred))  # sample weights unused, as in Keras' Distiller
        if cached is None:
            return hard
        return (1.0 - self.alpha) * hard + self.alpha * self.soft.compute_loss(cached, y_pred)

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
